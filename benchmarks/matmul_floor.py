"""The matmul floor of a workload: the matrix products one real call runs, each timed alone on this machine.

A speed target below this floor cannot be met by any amount of work on the rest of the step (lookups, element-wise
ops, optimizer, loader): it needs fewer or faster matrix products. The products are captured with the profiler
from one real call (forward and, for training, backward), so they are exactly the model's, and each distinct shape
is then timed in isolation with preallocated operands and output, best of `repeats`: the fastest each product
runs on this CPU, an optimistic floor. The large square GEMM gives the machine's matmul peak for comparison.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from msit_rec.train.auto_precision import best_seconds

# the leaf matmul kernels (linear, matmul and einsum dispatch to these), with the operand positions of (A, B); the
# in-place ones are events of their own (a floor without them missed the products that accumulate into a tensor)
OPERANDS = {"aten::mm": (0, 1), "aten::addmm": (1, 2), "aten::addmm_": (1, 2), "aten::bmm": (0, 1),
            "aten::baddbmm": (1, 2), "aten::baddbmm_": (1, 2)}
PEAK_SIZE = 2048


@dataclass(frozen=True)
class Matmul:
    """`batch` products of [m, k] × [k, n]."""

    batch: int
    m: int
    k: int
    n: int

    @property
    def flop(self) -> int:
        return 2 * self.batch * self.m * self.k * self.n


def capture_matmuls(call: Callable[[], Any]) -> Counter[Matmul]:
    """The matmuls `call()` runs (every thread the profiler sees, so autograd's backward too), with their counts."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        call()
    found: Counter[Matmul] = Counter()
    for event in prof.events():
        if event.name not in OPERANDS:
            continue
        a, b = (event.input_shapes[i] for i in OPERANDS[event.name])
        batch = a[0] if len(a) == 3 else 1
        found[Matmul(batch, a[-2], a[-1], b[-1])] += 1
    return found


def time_matmul(matmul: Matmul, repeats: int, dtype: torch.dtype = torch.float32) -> float:
    """Best seconds of one product of this shape in `dtype`, alone, output preallocated."""
    lead = () if matmul.batch == 1 else (matmul.batch,)
    a, b = torch.randn(*lead, matmul.m, matmul.k, dtype=dtype), torch.randn(*lead, matmul.k, matmul.n, dtype=dtype)
    out = torch.empty(*lead, matmul.m, matmul.n, dtype=dtype)
    return best_seconds(functools.partial(torch.mm if matmul.batch == 1 else torch.bmm, a, b, out=out), repeats)


def matmul_peak_gflops(repeats: int = 3, dtype: torch.dtype = torch.float32) -> float:
    """This machine's matmul rate on a large square product (current thread count)."""
    square = Matmul(1, PEAK_SIZE, PEAK_SIZE, PEAK_SIZE)
    return square.flop / time_matmul(square, repeats, dtype) / 1e9


def matmul_floor(call: Callable[[], Any], repeats: int = 5, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Seconds the matmuls of one `call()` take alone in `dtype` (bf16: what bf16 autocast would run), their GFLOP and
    rate, and the machine's peak rate in that dtype."""
    found = capture_matmuls(call)
    seconds = sum(count * time_matmul(matmul, repeats, dtype) for matmul, count in found.items())
    flop = sum(count * matmul.flop for matmul, count in found.items())
    return {
        "matmuls": sum(found.values()),
        "distinct_shapes": len(found),
        "gflop": round(flop / 1e9, 3),
        "floor_ms": round(seconds * 1e3, 3),
        "matmul_gflops": round(flop / seconds / 1e9, 1),
        "peak_gflops": round(matmul_peak_gflops(dtype=dtype), 1),
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
    }
