"""The cache-blocked attention unit of training against the composed autograd path and finite differences."""

from __future__ import annotations

import pytest
import torch

from msit_rec.modules import TargetAttention, blocked_attention
from msit_rec.modules.blocked_attention import AttentionUnit, blocked_interest, blocks_of
from tests.reference import din_interest

D, E = 6, 3
LENGTHS = torch.tensor([3, 0, 5, 1, 19, 4, 2, 0, 6, 7, 3])  # an empty row; a row longer than the small blocks


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of about 8 rows: LENGTHS (50 behaviours) spans several, one of them a single long row."""
    monkeypatch.setattr(blocked_attention, "MIN_BLOCK_ROWS", 8)
    monkeypatch.setattr(blocked_attention, "L2_BYTES_PER_THREAD", 1)


def _attention(pooling: str, hidden: tuple[int, ...], dtype: torch.dtype = torch.float64) -> TargetAttention:
    att = TargetAttention(D, hidden, scenario_dim=E, pooling=pooling).to(dtype)
    with torch.no_grad():
        for p in att.parameters():
            p.normal_(0, 0.5)  # off the default init, so that ReLUs are both on and off
    return att


def _inputs(dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    batch, rows = len(LENGTHS), int(LENGTHS.sum())
    return {
        "behaviours": torch.randn(rows, D, dtype=dtype, requires_grad=True),
        "example": torch.repeat_interleave(torch.arange(batch), LENGTHS),
        "target": torch.randn(batch, D, dtype=dtype, requires_grad=True),
        "scenario": torch.randn(batch, E, dtype=dtype, requires_grad=True),
        "gate": (2 * torch.rand(rows, dtype=dtype)).requires_grad_(),
    }


def _run(att: TargetAttention, x: dict[str, torch.Tensor], blocked: bool, gated: bool):
    att.blocked = blocked
    return att.interest_packed(x["behaviours"], x["example"], LENGTHS, x["target"], x["scenario"],
                               x["gate"] if gated else None)


def _loss_and_grads(att: TargetAttention, x: dict[str, torch.Tensor], blocked: bool, gated: bool,
                    reads: str = "both"):
    """Interest, weights and the gradients, for every input and weight, of a loss that reads the interest, the
    weights or both (training reads the interest only; the weights reach a loss only through `explain`)."""
    interest, weights = _run(att, x, blocked, gated)
    loss = interest.new_zeros(())
    if reads in ("interest", "both"):
        loss = loss + (interest * torch.linspace(-1, 2, interest.numel(), dtype=interest.dtype).view_as(interest)).sum()
    if reads in ("weights", "both"):
        loss = loss + (weights * torch.linspace(1, -1, weights.numel(), dtype=weights.dtype)).sum()
    inputs = [x["behaviours"], x["target"], x["scenario"], *([x["gate"]] if gated else []), *att.parameters()]
    return interest, weights, torch.autograd.grad(loss, inputs, allow_unused=True, materialize_grads=True)


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("pooling", ["sum", "softmax"])
@pytest.mark.parametrize("hidden", [(8,), (8, 5), (8, 5, 4)])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("reads", ["both", "interest", "weights"])
def test_blocked_unit_equals_the_composed_path_gradients_included(
    pooling: str, hidden: tuple[int, ...], gated: bool, reads: str
):
    att, x = _attention(pooling, hidden), _inputs()
    assert len(blocks_of(LENGTHS, hidden[0], 8)) > 4  # several blocks, really
    expected = _loss_and_grads(att, x, blocked=False, gated=gated, reads=reads)
    got = _loss_and_grads(att, x, blocked=True, gated=gated, reads=reads)
    torch.testing.assert_close(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1])
    for mine, theirs in zip(got[2], expected[2], strict=True):
        torch.testing.assert_close(mine, theirs)
    assert torch.equal(got[0][1], torch.zeros(D, dtype=torch.float64))  # row 1 has no behaviours


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("pooling", ["sum", "softmax"])
def test_blocked_unit_equals_the_naive_formula(pooling: str):
    """The padded naive concatenation formula (tests/reference.py), independent of both packed paths."""
    att, x = _attention(pooling, (8, 5)), _inputs()
    interest, _ = _run(att, x, blocked=True, gated=False)
    length = int(LENGTHS.max())
    mask = torch.arange(length) < LENGTHS[:, None]
    padded = torch.zeros(len(LENGTHS), length, D, dtype=torch.float64)
    padded[mask] = x["behaviours"].detach()
    torch.testing.assert_close(interest, din_interest(att, padded, x["target"], mask, x["scenario"]))


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("pooling", ["sum", "softmax"])
def test_blocked_unit_passes_gradcheck(pooling: str):
    """Its hand-written backward against finite differences, for every input and weight."""
    x = _inputs()
    batch, hidden = len(LENGTHS), (4, 3)
    shapes = [(D, hidden[0]), (D, hidden[0]), (hidden[1], hidden[0]), (hidden[1],), (1, hidden[1]), (1,)]
    weights = [torch.randn(shape, dtype=torch.float64, requires_grad=True) for shape in shapes]
    per_example = torch.randn(batch, hidden[0], dtype=torch.float64, requires_grad=True)

    def unit(behaviours, target, per_example, gate, first_b, first_p, w1, b1, out_w, out_b):
        parts = AttentionUnit(first_b, first_p, ((w1, b1),), out_w, out_b)
        return blocked_interest(behaviours, x["example"], LENGTHS, target, per_example, parts, gate,
                                softmax=pooling == "softmax")

    inputs = (x["behaviours"], x["target"], per_example, x["gate"], *weights)
    assert torch.autograd.gradcheck(unit, inputs)


@pytest.mark.parametrize("lengths", [LENGTHS.tolist(), [5, 5, 5, 5], [0, 0, 9, 0, 3, 3, 0], [8, 8, 1, 7], [12, 3, 3]])
def test_blocks_hold_whole_examples_within_the_cache_size(monkeypatch: pytest.MonkeyPatch, lengths: list[int]):
    monkeypatch.setattr(blocked_attention, "MIN_BLOCK_ROWS", 8)
    monkeypatch.setattr(blocked_attention, "L2_BYTES_PER_THREAD", 1)
    blocks = blocks_of(torch.tensor(lengths), 4, 4)
    example = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    assert [b.start for b in blocks] == [0, *(b.end for b in blocks[:-1])] and blocks[-1].end == sum(lengths)
    for block in blocks:
        owners = example[block.start:block.end]
        assert block.first == owners[0] and block.examples == owners[-1] - owners[0] + 1
        whole = [i for i in range(block.first, block.first + block.examples) if lengths[i]]
        assert sum(lengths[i] for i in whole) == block.end - block.start  # whole examples only
        assert block.end - block.start <= 8 or len(whole) == 1  # cache-sized, or one long example alone
    assert blocks_of(torch.zeros(4, dtype=torch.long), 4, 4) == []


def test_blocks_are_one_when_they_fit_and_lengths_must_match_the_behaviours():
    assert [(b.start, b.end) for b in blocks_of(LENGTHS, 4, 4)] == [(0, 50)]  # the default cache holds them all
    att, x = _attention("sum", (8,)), _inputs()
    with pytest.raises(ValueError, match="lengths sum to 50 behaviours, but 49 were given"):
        att.interest_packed(x["behaviours"][:49], x["example"][:49], LENGTHS, x["target"], x["scenario"])


@pytest.mark.usefixtures("small_blocks")
def test_blocked_unit_under_bf16_autocast_runs_the_products_in_bf16_with_fp32_gradients():
    """bf16-mixed training: the same values as the composed path under the same autocast (products in bf16, so not
    the fp32 ones), and weight gradients summed across blocks in fp32, as close to fp32's as the composed path's."""
    att, x = _attention("sum", (8, 5), torch.float32), _inputs(torch.float32)
    exact = _loss_and_grads(att, x, blocked=True, gated=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = _loss_and_grads(att, x, blocked=True, gated=True)
        composed = _loss_and_grads(att, x, blocked=False, gated=True)
    assert low[0].dtype == torch.float32 and low[1].dtype == torch.float32
    torch.testing.assert_close(low[0], composed[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(low[1], composed[1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(low[1], exact[1], rtol=1e-4, atol=1e-4)  # bf16 products, really
    for mine, theirs, reference in zip(low[2], composed[2], exact[2], strict=True):
        assert mine.dtype == torch.float32
        assert (mine - reference).norm() <= 1.5 * (theirs - reference).norm() + 1e-6


@pytest.mark.usefixtures("small_blocks")
def test_blocked_unit_without_gradients_computes_the_same_and_keeps_no_activations(monkeypatch: pytest.MonkeyPatch):
    """Validation and `explain` run it under no_grad: the same interest and weights, no activations kept."""
    att, x = _attention("softmax", (8, 5)), _inputs()
    with_grad = _run(att, x, blocked=True, gated=True)
    kept = []
    score_block = blocked_attention._score_block
    monkeypatch.setattr(blocked_attention, "_score_block",
                        lambda *args: kept.append(args[-1][0] is not None) or score_block(*args))
    with torch.no_grad():
        without = _run(att, x, blocked=True, gated=True)
    assert kept and not any(kept)
    assert not without[0].requires_grad
    torch.testing.assert_close(without[0], with_grad[0])
    torch.testing.assert_close(without[1], with_grad[1])


def test_weights_may_be_edited_in_place_before_backward():
    """The weights returned are not what backward reads (as with the composed path)."""
    att, x = _attention("sum", (8,)), _inputs()
    for gated in (False, True):
        interest, weights = _run(att, x, blocked=True, gated=gated)
        weights.mul_(2)
        interest.sum().backward()


def test_only_relu_attention_takes_the_blocked_unit():
    assert TargetAttention(D, (8,), activation="relu").blocked
    assert not TargetAttention(D, (8,), activation="prelu").blocked
