"""Dense modules: shapes, masking, scenario-specificity, parity with naive formulas, gradients, export."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from msit_rec.errors import ConfigError
from msit_rec.fit_config import VARIANTS, ModelConfig
from msit_rec.modules import (
    MLP,
    RankingHead,
    ScenarioGate,
    ScenarioTower,
    StarLinear,
    TargetAttention,
    lengths_to_mask,
)
from msit_rec.modules.scenario_gate import age_bucket, age_packed, age_padded
from msit_rec.modules.segments import pool_packed
from tests.reference import din_interest

B, L, D, E, S = 6, 7, 8, 4, 3
F_IN = 2 * D + D + D + E + 3  # [u, t, interest, e(s), dense] with a 2D-dim user vector and 3 dense features


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _inputs(dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    lengths = torch.tensor([0, 1, 3, 7, 5, 2])
    return {
        "behaviours": torch.randn(B, L, D, dtype=dtype),
        "behaviour_scenario": torch.randint(0, S, (B, L)),
        "scenario": torch.tensor([0, 1, 2, 0, 1, 2]),
        "table": torch.randn(S, E, dtype=dtype),
        "target": torch.randn(B, D, dtype=dtype),
        "mask": lengths_to_mask(lengths, L),
        "lengths": lengths,
    }


# ---------------------------------------------------------------- oracles (independent of the library's tricks)
# (target attention: `din_interest` of tests/reference.py, shared with benchmarks/bench_attention.py)


def naive_gate(gate: ScenarioGate, b, sj, s, table, feedback=None, age=None):
    """Per behaviour: 2σ(w_s·b_j + a_s·e(s_j) + c_s [+ U_s[s_j, v_j]] [+ r_s[min(⌊log2(age_j + 1)⌋, 7)]]) with the
    served scenario's weights."""
    out = torch.empty(b.shape[:2], dtype=b.dtype)
    for i in range(b.shape[0]):
        k = int(s[i])
        for j in range(b.shape[1]):
            logit = gate.behaviour_weight[k] @ b[i, j] + gate.scenario_weight[k] @ table[sj[i, j]] + gate.bias[k]
            if feedback is not None:
                logit = logit + gate.feedback_weight[k, int(sj[i, j]) * gate.feedback_values + int(feedback[i, j])]
            if age is not None:
                profile = gate.recency_weight[k if gate.recency_weight.shape[0] > 1 else 0]  # per scenario, or shared
                logit = logit + profile[min((int(age[i, j]) + 1).bit_length() - 1, 7)]
            out[i, j] = 2 * torch.sigmoid(logit)
    return out


def naive_star(layer: StarLinear, x, s):
    rows = []
    for i in range(x.shape[0]):
        k = int(s[i])
        w = layer.shared.weight * layer.scenario_weight[k]
        rows.append(x[i] @ w.t() + layer.shared.bias + layer.scenario_bias[k])
    return torch.stack(rows)


def _randomise(module: nn.Module) -> nn.Module:
    """Move every parameter off its (often trivial: ones/zeros) initial value so oracles are actually exercised."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return module


# ---------------------------------------------------------------- MLP


def test_mlp_shapes_and_hidden_scales_match_manual_stack():
    mlp = MLP(5, [6, 4], out_dim=2).double()
    x = torch.randn(3, 5, dtype=torch.float64)
    scales = [torch.rand(3, 6, dtype=torch.float64), torch.rand(3, 4, dtype=torch.float64)]
    h = torch.relu(mlp.linears[0](x)) * scales[0]
    h = torch.relu(mlp.linears[1](h)) * scales[1]
    torch.testing.assert_close(mlp(x, hidden_scales=scales), mlp.out(h))
    assert mlp(x).shape == (3, 2)
    assert MLP(5, [6, 4]).out_dim == 4


def test_mlp_options_build_the_named_layers():
    mlp = MLP(5, [6], activation="prelu", dropout=0.1)
    assert [type(m) for m in mlp.post[0]] == [nn.PReLU, nn.Dropout]
    with pytest.raises(ConfigError, match="activation.*'tanhh'"):
        MLP(5, [6], activation="tanhh")


# ---------------------------------------------------------------- scenario gate


def test_gate_equals_the_formula():
    gate = _randomise(ScenarioGate(D, E, S).double())
    x = _inputs()
    out = gate(x["behaviours"], x["behaviour_scenario"], x["scenario"], x["table"])
    assert out.shape == (B, L)
    expected = naive_gate(gate, x["behaviours"], x["behaviour_scenario"], x["scenario"], x["table"])
    torch.testing.assert_close(out, expected)


def test_a_fresh_gate_weighs_every_behaviour_one():
    """All weights start at zero: g = 1, the model starts as its attention alone."""
    x = _inputs()
    gate = ScenarioGate(D, E, S, feedback_values=3).double()
    feedback = torch.randint(0, 3, (B, L))
    out = gate(x["behaviours"], x["behaviour_scenario"], x["scenario"], x["table"], feedback)
    assert torch.equal(out, torch.ones(B, L, dtype=torch.float64))


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_gate_with_feedback_equals_the_formula_and_needs_it(layout: str):
    values = 4
    gate = _randomise(ScenarioGate(D, E, S, feedback_values=values).double())
    x = _inputs()
    feedback = torch.randint(0, values, (B, L))
    expected = naive_gate(gate, x["behaviours"], x["behaviour_scenario"], x["scenario"], x["table"], feedback)
    if layout == "padded":
        out = gate(x["behaviours"], x["behaviour_scenario"], x["scenario"], x["table"], feedback)
        torch.testing.assert_close(out, expected)
    else:
        behaviours, own, example = _packed(x)
        out = gate.values_packed(behaviours, own, x["scenario"][example], x["table"], feedback[x["mask"]])
        torch.testing.assert_close(out, expected[x["mask"]])
    with pytest.raises(ValueError, match="feedback"):
        gate(x["behaviours"], x["behaviour_scenario"], x["scenario"], x["table"])


def _hand_ages(lengths: list[int], max_len: int) -> torch.Tensor:
    """Age of every padded position, written out: the last real behaviour is 0, padding 0."""
    return torch.tensor([[max(n - 1 - j, 0) for j in range(max_len)] for n in lengths])


def test_ages_of_both_layouts_count_back_from_the_most_recent_behaviour():
    x = _inputs()
    ages = _hand_ages(x["lengths"].tolist(), L)
    assert torch.equal(age_padded(x["lengths"], L), ages)
    example = torch.repeat_interleave(torch.arange(B), x["lengths"])
    assert torch.equal(age_packed(x["lengths"], example), ages[x["mask"]])
    assert age_packed(x["lengths"], example)[:4].tolist() == [0, 2, 1, 0]  # rows of 0, 1 and 3 behaviours
    every_age = torch.arange(300)
    assert torch.equal(age_bucket(every_age), torch.tensor([min((a + 1).bit_length() - 1, 7) for a in range(300)]))


@pytest.mark.parametrize("recency", ["scenario", "shared"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_gate_with_recency_equals_the_formula_and_needs_the_ages(layout: str, recency: str):
    gate = _randomise(ScenarioGate(D, E, S, feedback_values=2, recency=recency).double())
    assert gate.recency_weight.shape == (S if recency == "scenario" else 1, 8)
    x = _inputs()
    feedback = torch.randint(0, 2, (B, L))
    age = age_padded(x["lengths"], L)
    expected = naive_gate(gate, x["behaviours"], x["behaviour_scenario"], x["scenario"], x["table"], feedback, age)
    if layout == "padded":
        out = gate(x["behaviours"], x["behaviour_scenario"], x["scenario"], x["table"], feedback, age)
        torch.testing.assert_close(out, expected)
    else:
        behaviours, own, example = _packed(x)
        out = gate.values_packed(behaviours, own, x["scenario"][example], x["table"], feedback[x["mask"]],
                                 age_packed(x["lengths"], example))
        torch.testing.assert_close(out, expected[x["mask"]])
    with pytest.raises(ValueError, match="age"):
        gate(x["behaviours"], x["behaviour_scenario"], x["scenario"], x["table"], feedback)


def test_recency_weighs_behaviours_by_age_per_served_scenario():
    """r_s[k] moves only the behaviours of age bucket k in rows served in s."""
    gate = _randomise(ScenarioGate(D, E, S, recency="scenario").double())
    x = _inputs()
    age = age_padded(x["lengths"], L)
    args = (x["behaviours"], x["behaviour_scenario"], x["scenario"], x["table"], None, age)
    before = gate(*args)
    with torch.no_grad():
        gate.recency_weight[1, 1] += 1.0  # served scenario 1, ages 1–2
    moved = before != gate(*args)
    expected = (x["scenario"][:, None] == 1) & ((age == 1) | (age == 2))
    assert torch.equal(moved, expected) and expected.any()


def test_gate_own_scenario_acts_only_through_the_gate():
    gate = _randomise(ScenarioGate(D, E, S).double())
    x = _inputs()
    b, sj, s, table = x["behaviours"], x["behaviour_scenario"], x["scenario"], x["table"]
    other_sj = (sj + 1) % S
    # changing one behaviour's own scenario changes that behaviour's weight only
    one = sj.clone()
    one[3, 2] = other_sj[3, 2]
    base, moved = gate(b, sj, s, table), gate(b, one, s, table)
    changed = base != moved
    assert changed[3, 2] and changed.sum() == 1
    # with the gate saturated for served scenario 1, own scenarios no longer matter there (g = 2 everywhere)
    with torch.no_grad():
        gate.bias[1] = 60.0
    served_1 = s == 1
    out, out_other = gate(b, sj, s, table), gate(b, other_sj, s, table)
    assert torch.equal(out[served_1], torch.full_like(out[served_1], 2.0))
    assert torch.equal(out_other[served_1], out[served_1])
    assert not torch.equal(out[~served_1], out_other[~served_1])


def test_gate_weights_are_per_served_scenario():
    gate = _randomise(ScenarioGate(D, E, S).double())
    x = _inputs()
    args = (x["behaviours"], x["behaviour_scenario"], x["scenario"], x["table"])
    before = gate(*args)
    with torch.no_grad():
        gate.behaviour_weight[1] += 1.0
        gate.scenario_weight[1] += 1.0
        gate.bias[1] += 1.0
    after = gate(*args)
    served_1 = x["scenario"] == 1
    assert torch.equal(before[~served_1], after[~served_1])
    assert not torch.allclose(before[served_1], after[served_1])


# ---------------------------------------------------------------- target attention


def _packed(x: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(real behaviours [N, D], their own scenarios [N], their example [N]) of the padded inputs, row-major."""
    example = torch.repeat_interleave(torch.arange(B), x["lengths"])
    return x["behaviours"][x["mask"]], x["behaviour_scenario"][x["mask"]], example


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("pooling", ["sum", "softmax"])
@pytest.mark.parametrize("scenario_dim", [0, E])
@pytest.mark.parametrize("activation", ["relu", "prelu"])
def test_fast_attention_equals_naive_concatenation(layout: str, pooling: str, scenario_dim: int, activation: str):
    att = _randomise(
        TargetAttention(D, (16, 8), scenario_dim=scenario_dim, activation=activation, pooling=pooling).double()
    )
    x = _inputs()
    e = torch.randn(B, E, dtype=torch.float64) if scenario_dim else None
    if layout == "padded":
        out, _ = att(x["behaviours"], x["target"], x["mask"], e)
    else:
        behaviours, _, example = _packed(x)  # relu: the blocked unit; prelu: the composed path
        out, _ = att.interest_packed(behaviours, example, x["lengths"], x["target"], e)
    assert out.shape == (B, D)
    torch.testing.assert_close(out, din_interest(att, x["behaviours"], x["target"], x["mask"], e))
    assert torch.equal(out[0], torch.zeros(D, dtype=torch.float64))  # example 0 has no behaviours


@pytest.mark.parametrize("pooling", ["sum", "softmax"])
def test_attention_over_shared_contexts_equals_naive_on_gathered_rows(pooling: str):
    """Rows that share a context (a /rank request's candidates) read its sequence by index: same as copies per row."""
    att = _randomise(TargetAttention(D, (16, 8), scenario_dim=E, pooling=pooling).double())
    x = _inputs()
    context = torch.tensor([2, 0, 2, 5, 3, 3, 1, 2, 4])  # 9 rows over the 6 contexts of `_inputs`, 0 = empty history
    target = torch.randn(len(context), D, dtype=torch.float64)
    e = torch.randn(len(context), E, dtype=torch.float64)
    out, _ = att(x["behaviours"], target, x["mask"], e, context)
    expected = din_interest(att, x["behaviours"][context], target, x["mask"][context], e)
    torch.testing.assert_close(out, expected)
    assert torch.equal(out[1], torch.zeros(D, dtype=torch.float64))


@pytest.mark.parametrize("pooling", ["sum", "softmax"])
def test_attention_over_one_context_equals_naive_and_exports_with_every_branch(pooling: str):
    """Every row reading one context (a /rank request) takes its own branch (one [B, D] × [D, L·H] product): equal to
    the naive formula on copies of the context per row, eagerly and in a program exported with dynamic B and C that
    must still take the other branches for several contexts (C < B) and one per row (C = B)."""
    att = _randomise(TargetAttention(D, (16, 8), scenario_dim=E, pooling=pooling).double()).eval()
    x = _inputs()

    def case(contexts: list[int], rows: int) -> tuple[torch.Tensor, ...]:
        """(behaviours, target, mask, e, context, scale) of `rows` rows over the contexts `contexts` of `_inputs`."""
        return (x["behaviours"][contexts] * x["mask"][contexts, :, None], torch.randn(rows, D, dtype=torch.float64),
                x["mask"][contexts], torch.randn(rows, E, dtype=torch.float64), torch.arange(rows) % len(contexts),
                torch.rand(len(contexts), L, dtype=torch.float64))

    taken = []  # which branch each eager call took
    for name in ("_attend_one_context", "_attend_of_contexts"):
        branch = getattr(att, name)
        setattr(att, name, lambda *args, branch=branch, name=name: taken.append(name) or branch(*args))
    att(*case([0], 3))  # context 0 has no behaviours
    att(*case([3, 0], 3))
    assert taken == ["_attend_one_context", "_attend_of_contexts"]
    for name in ("_attend_one_context", "_attend_of_contexts"):
        delattr(att, name)
    rows_dim, contexts_dim = torch.export.Dim("rows", min=1, max=64), torch.export.Dim("contexts", min=1, max=64)
    shapes = ({0: contexts_dim}, {0: rows_dim}, {0: contexts_dim}, {0: rows_dim}, {0: rows_dim}, {0: contexts_dim})
    program = torch.export.export(att, case([3, 0], 9), dynamic_shapes=shapes).module()  # sizes 1 would specialise
    for contexts, rows in [([3], 9), ([4], 1), ([0], 4), ([3, 0, 5], 9), ([1, 2, 3, 4, 5], 5)]:  # C = 1, C < B, C = B
        behaviours, target, mask, e, context, _ = inputs = case(contexts, rows)
        interest, _ = att(behaviours, target, mask, e, context)
        torch.testing.assert_close(interest, din_interest(att, behaviours[context], target, mask[context], e))
        interest, weights = att(*inputs)  # with the gate's per-behaviour scale
        torch.testing.assert_close(interest, (weights[..., None] * behaviours[context]).sum(1))
        exported = program(*inputs)
        torch.testing.assert_close(exported[0], interest)
        torch.testing.assert_close(exported[1], weights)


def test_packed_gate_equals_the_formula():
    gate = _randomise(ScenarioGate(D, E, S).double())
    x = _inputs()
    behaviours, own, example = _packed(x)
    out = gate.values_packed(behaviours, own, x["scenario"][example], x["table"])
    expected = naive_gate(gate, x["behaviours"], x["behaviour_scenario"], x["scenario"], x["table"])[x["mask"]]
    torch.testing.assert_close(out, expected)


def test_gated_attention_weighs_each_behaviour_by_alpha_times_g():
    """The interest is Σ_j α_j g_j b_j: the gate scales each behaviour's attention weight, on both layouts."""
    gate = _randomise(ScenarioGate(D, E, S).double())
    att = _randomise(TargetAttention(D, (16, 8), scenario_dim=E, pooling="softmax").double())
    x = _inputs()
    e = x["table"][x["scenario"]]
    g = naive_gate(gate, x["behaviours"], x["behaviour_scenario"], x["scenario"], x["table"])  # [B, L]
    interest, weights = att(x["behaviours"], x["target"], x["mask"], e, scale=g)
    _, plain = att(x["behaviours"], x["target"], x["mask"], e)
    torch.testing.assert_close(weights, plain * g)
    torch.testing.assert_close(interest, (weights[..., None] * x["behaviours"]).sum(1))


def test_packed_and_padded_layouts_give_the_same_gradients():
    gate = _randomise(ScenarioGate(D, E, S).double())
    att = _randomise(TargetAttention(D, (16, 8), scenario_dim=E, pooling="softmax").double())
    x = _inputs()
    e = x["table"][x["scenario"]]
    g = gate(x["behaviours"], x["behaviour_scenario"], x["scenario"], x["table"])
    padded, _ = att(x["behaviours"], x["target"], x["mask"], e, scale=g)
    padded.square().sum().backward()
    grads = {name: p.grad.clone() for name, p in [*gate.named_parameters(), *att.named_parameters()]}
    gate.zero_grad()
    att.zero_grad()
    behaviours, own, example = _packed(x)
    g = gate.values_packed(behaviours, own, x["scenario"][example], x["table"])
    packed = pool_packed(att.weights_packed(behaviours, example, x["target"], e) * g, behaviours, example, B)
    packed.square().sum().backward()
    for name, p in [*gate.named_parameters(), *att.named_parameters()]:
        torch.testing.assert_close(p.grad, grads[name], msg=name)


@pytest.mark.parametrize("pooling", ["sum", "softmax"])
def test_padding_never_changes_the_interest(pooling: str):
    gate = _randomise(ScenarioGate(D, E, S).double())
    att = _randomise(TargetAttention(D, (16, 8), scenario_dim=E, pooling=pooling).double())
    x = _inputs()
    e = x["table"][x["scenario"]]

    def interest(b, sj, mask):
        return att(b, x["target"], mask, e, scale=gate(b, sj, x["scenario"], x["table"]))[0]

    base = interest(x["behaviours"], x["behaviour_scenario"], x["mask"])
    pad = ~x["mask"]
    # arbitrary values (and own scenarios) on padded slots
    b2 = torch.where(pad[..., None], torch.randn(B, L, D, dtype=torch.float64) * 100, x["behaviours"])
    sj2 = torch.where(pad, torch.randint(0, S, (B, L)), x["behaviour_scenario"])
    assert torch.equal(interest(b2, sj2, x["mask"]), base)
    # extra empty slots at the end
    extra = 5
    b3 = torch.cat([x["behaviours"], torch.randn(B, extra, D, dtype=torch.float64)], dim=1)
    sj3 = torch.cat([x["behaviour_scenario"], torch.randint(0, S, (B, extra))], dim=1)
    torch.testing.assert_close(interest(b3, sj3, lengths_to_mask(x["lengths"], L + extra)), base, rtol=0, atol=1e-12)
    # an empty history gives a zero interest
    assert torch.equal(base[0], torch.zeros(D, dtype=torch.float64))


def test_attention_rejects_bad_config_and_missing_scenario():
    with pytest.raises(ConfigError, match="pooling"):
        TargetAttention(D, pooling="mean")  # type: ignore[arg-type]
    att = TargetAttention(D, scenario_dim=E)
    x = _inputs(torch.float32)
    with pytest.raises(ValueError, match="scenario_emb"):
        att(x["behaviours"], x["target"], x["mask"])


def test_lengths_to_mask():
    assert lengths_to_mask(torch.tensor([0, 2, 3]), 3).tolist() == [
        [False, False, False],
        [True, True, False],
        [True, True, True],
    ]


# ---------------------------------------------------------------- STAR


def test_star_linear_equals_per_example_formula_and_is_per_scenario():
    layer = _randomise(StarLinear(5, 4, S).double())
    x = torch.randn(9, 5, dtype=torch.float64)
    s = torch.tensor([2, 0, 1, 2, 2, 0, 1, 0, 2])
    out = layer(x, s)
    torch.testing.assert_close(out, naive_star(layer, x, s))
    # a scenario absent from the batch is fine
    torch.testing.assert_close(layer(x[s != 1], s[s != 1]), out[s != 1])
    with torch.no_grad():
        layer.scenario_weight[1] += 1.0
        layer.scenario_bias[1] += 1.0
    after = layer(x, s)
    assert torch.equal(after[s != 1], out[s != 1])
    assert not torch.allclose(after[s == 1], out[s == 1])


def test_star_starts_as_the_shared_linear():
    layer = StarLinear(5, 4, S)
    x = torch.randn(6, 5)
    torch.testing.assert_close(layer(x, torch.tensor([0, 1, 2, 0, 1, 2])), layer.shared(x))


# ---------------------------------------------------------------- tower


def test_tower_gates_start_as_identity():
    plain = ScenarioTower(F_IN, E, (16, 8), input_gate=False)
    gated = ScenarioTower(F_IN, E, (16, 8), input_gate=True, hidden_gates=True)
    gated.mlp.load_state_dict(plain.mlp.state_dict())
    x, e = torch.randn(B, F_IN), torch.randn(B, E)
    out = gated(x, e)
    assert out.shape == (B,)
    torch.testing.assert_close(out, plain(x, e))


def test_tower_gates_follow_epnet_ppnet_formula():
    tower = _randomise(ScenarioTower(F_IN, E, (16, 8), hidden_gates=True).double())
    x, e = torch.randn(B, F_IN, dtype=torch.float64), torch.randn(B, E, dtype=torch.float64)

    def gate(linear: nn.Linear) -> torch.Tensor:
        return 2.0 * torch.sigmoid(e @ linear.weight.t() + linear.bias)

    h = x * gate(tower.input_gate.linear)
    for linear, hidden_gate in zip(tower.mlp.linears, tower.hidden_gates):
        h = torch.relu(linear(h)) * gate(hidden_gate.linear)
    torch.testing.assert_close(tower(x, e), tower.mlp.out(h).squeeze(-1))


def test_star_tower_is_per_scenario():
    tower = _randomise(ScenarioTower(F_IN, E, (16, 8), num_scenarios=S, input_gate=False).double())
    x, e = torch.randn(B, F_IN, dtype=torch.float64), torch.randn(B, E, dtype=torch.float64)
    s = _inputs()["scenario"]
    before = tower(x, e, s)
    with torch.no_grad():
        for layer in [*tower.mlp.linears, tower.mlp.out]:
            layer.scenario_weight[2] *= 1.5
    after = tower(x, e, s)
    assert torch.equal(before[s != 2], after[s != 2])
    assert not torch.allclose(before[s == 2], after[s == 2])


# ---------------------------------------------------------------- the stack: gradients and export


class HeadStack(nn.Module):
    """RankingHead over padded behaviours, one context per row: what ServingModel runs after its lookups."""

    def __init__(self, variant: str) -> None:
        super().__init__()
        config = ModelConfig(variant=variant, attention_hidden=[16, 8], tower_hidden=[16, 8], activation="prelu",
                             pooling="softmax")
        self.head = RankingHead(config, pooled_dim=2 * D, dim=D, dense_dim=3, scenario_dim=E, num_scenarios=S,
                                recency="scenario")

    def forward(self, behaviours, behaviour_scenario, scenario, target, mask, user, dense):
        context = torch.arange(scenario.shape[0])
        age = age_padded(mask.sum(dim=1), L)
        gate = self.head.gate_padded(behaviours, behaviour_scenario, scenario, None, age)
        e = self.head.scenario_vectors(scenario)  # [B, E]
        interest, _ = self.head.interest_padded(behaviours, mask, target, e, context, gate)
        return self.head(user, target, interest, dense, scenario, e)


def _stack_inputs(batch: int) -> tuple[torch.Tensor, ...]:
    lengths = torch.randint(0, L + 1, (batch,))
    return (
        torch.randn(batch, L, D),
        torch.randint(0, S, (batch, L)),
        torch.arange(batch) % S,
        torch.randn(batch, D),
        lengths_to_mask(lengths, L),
        torch.randn(batch, 2 * D),
        torch.randn(batch, 3),
    )


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gradients_reach_every_parameter(variant: str):
    stack = HeadStack(variant)
    inputs = _stack_inputs(12)
    labels = torch.randint(0, 2, (12,)).float()
    nn.functional.binary_cross_entropy_with_logits(stack(*inputs), labels).backward()
    for name, p in stack.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("variant", ["msit", "star", "pepnet"])
def test_export_with_dynamic_batch(variant: str):
    stack = HeadStack(variant).eval()
    batch = torch.export.Dim("batch", min=1, max=4096)
    shapes = tuple({0: batch} for _ in range(7))
    program = torch.export.export(stack, _stack_inputs(8), dynamic_shapes=shapes)
    exported = program.module()
    for size in (1, 5, 37):
        inputs = _stack_inputs(size)
        torch.testing.assert_close(exported(*inputs), stack(*inputs))


def test_packed_attention_trains_under_bf16_autocast():
    """`trainer.precision: bf16-mixed` runs the packed path under autocast (in-place products there must cast):
    close to fp32, with fp32 gradients for every weight."""
    att = _randomise(TargetAttention(D, (16, 8), scenario_dim=E))
    x = _inputs(torch.float32)
    behaviours, _, example = _packed(x)
    e = torch.randn(B, E)
    exact = att.weights_packed(behaviours, example, x["target"], e)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = att.weights_packed(behaviours, example, x["target"], e)
    low.float().sum().backward()
    torch.testing.assert_close(low.float(), exact, rtol=0.05, atol=0.05)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and p.grad.abs().sum() > 0
               for p in att.parameters())


def test_packed_gate_stays_fp32_under_bf16_autocast():
    """bf16-mixed training leaves the gate's few small products in fp32: g exactly as without autocast."""
    gate = _randomise(ScenarioGate(D, E, S, feedback_values=2, recency="scenario"))
    x = _inputs(torch.float32)
    behaviours, own, example = _packed(x)
    args = (behaviours, own, x["scenario"][example], x["table"], torch.randint(0, 2, own.shape),
            age_packed(x["lengths"], example))
    exact = gate.values_packed(*args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(gate.values_packed(*args), exact)
