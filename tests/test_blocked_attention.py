"""The cache-blocked attention unit of training against the composed autograd path and finite differences."""

from __future__ import annotations

import itertools

import pytest
import torch

from msit_rec.modules import TargetAttention, blocked_attention
from msit_rec.modules.blocked_attention import AttentionUnit, block_bounds, blocked_interest
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


def _loss_and_grads(att: TargetAttention, x: dict[str, torch.Tensor], blocked: bool, gated: bool):
    """Interest, weights and the gradients of a loss that reads both outputs, for every input and weight."""
    interest, weights = _run(att, x, blocked, gated)
    loss = (interest * torch.linspace(-1, 2, interest.numel(), dtype=interest.dtype).view_as(interest)).sum()
    loss = loss + (weights * torch.linspace(1, -1, weights.numel(), dtype=weights.dtype)).sum()
    inputs = [x["behaviours"], x["target"], x["scenario"], *([x["gate"]] if gated else []), *att.parameters()]
    return interest, weights, torch.autograd.grad(loss, inputs)


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("pooling", ["sum", "softmax"])
@pytest.mark.parametrize("hidden", [(8,), (8, 5), (8, 5, 4)])
@pytest.mark.parametrize("gated", [False, True])
def test_blocked_unit_equals_the_composed_path_gradients_included(pooling: str, hidden: tuple[int, ...], gated: bool):
    att, x = _attention(pooling, hidden), _inputs()
    assert len(block_bounds(LENGTHS, hidden[0], 8)) > 4  # several blocks, really
    expected = _loss_and_grads(att, x, blocked=False, gated=gated)
    got = _loss_and_grads(att, x, blocked=True, gated=gated)
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


def test_block_bounds_end_on_example_boundaries(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(blocked_attention, "MIN_BLOCK_ROWS", 8)
    monkeypatch.setattr(blocked_attention, "L2_BYTES_PER_THREAD", 1)
    bounds = block_bounds(LENGTHS, 4, 4)
    ends = set(torch.cumsum(LENGTHS, 0).tolist()) | {0}
    assert bounds[0] == 0 and bounds[-1] == int(LENGTHS.sum())
    assert all(b in ends for b in bounds) and bounds == sorted(set(bounds))
    assert not any(9 < b < 28 for b in bounds)  # the 19-behaviour row (9..28) lies in one block, longer than 8
    assert all(end - start <= 8 for start, end in itertools.pairwise(bounds) if end <= 9 or start >= 28)
    assert block_bounds(torch.zeros(4, dtype=torch.long), 4, 4) == [0]
    monkeypatch.setattr(blocked_attention, "L2_BYTES_PER_THREAD", 1 << 30)
    assert block_bounds(LENGTHS, 4, 4) == [0, 50]  # fits one block


@pytest.mark.usefixtures("small_blocks")
def test_blocked_unit_under_bf16_autocast_is_close_to_fp32_with_fp32_gradients():
    """bf16-mixed training: products in bf16, scores, pooling and the gradients summed over blocks in fp32."""
    att, x = _attention("sum", (8, 5), torch.float32), _inputs(torch.float32)
    exact = _loss_and_grads(att, x, blocked=True, gated=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = _loss_and_grads(att, x, blocked=True, gated=True)
    assert low[0].dtype == torch.float32 and low[1].dtype == torch.float32
    torch.testing.assert_close(low[0], exact[0], rtol=0.05, atol=0.1)
    for mine, theirs in zip(low[2], exact[2], strict=True):
        assert mine.dtype == torch.float32
        assert torch.nn.functional.cosine_similarity(mine.flatten(), theirs.flatten(), dim=0) > 0.99


@pytest.mark.usefixtures("small_blocks")
def test_blocked_unit_without_gradients_computes_the_same():
    """Validation and `explain` run it under no_grad (keeping no activations): the same interest and weights."""
    att, x = _attention("softmax", (8, 5)), _inputs()
    with_grad = _run(att, x, blocked=True, gated=True)
    with torch.no_grad():
        without = _run(att, x, blocked=True, gated=True)
    assert not without[0].requires_grad
    torch.testing.assert_close(without[0], with_grad[0])
    torch.testing.assert_close(without[1], with_grad[1])


def test_only_relu_attention_takes_the_blocked_unit():
    assert TargetAttention(D, (8,), activation="relu").blocked
    assert not TargetAttention(D, (8,), activation="prelu").blocked
