"""Forward+backward throughput of the dense stack (scenario gate → target attention → tower) on CPU threads.

Compares the naive concatenated attention input with the block-wise fast one, in fp32 and under bf16 autocast, at
the reference size of issue 3 (B=4096, L=50, D=32, E=8, S=5, attention 64-32, tower 426 → 512-256 → 1). Prints a
table and writes JSON. Times are the best of `--repeats` steps (the machine may be shared); examples/s = B / time;
"ded." = B · threads / CPU seconds, the rate on cores not shared with other processes.

    python benchmarks/bench_attention.py [--output benchmarks/results/bench_attention.json] [--malloc-tune]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere: the repo's packages (tests.reference) come first
    sys.path.insert(0, str(REPO))

from msit_rec.fit_config import ModelConfig
from msit_rec.modules import RankingHead, TargetAttention, lengths_to_mask
from msit_rec.modules.scenario_gate import age_padded
from msit_rec.provenance import host_facts
from tests.reference import din_scores

S, D, E = 5, 32, 8
POOLED, DENSE = 20 * 16 + D, 2  # user/context features (and one more D), dense features
MODEL = ModelConfig(variant="msit", attention_hidden=[64, 32], tower_hidden=[512, 256])


class NaiveAttention(TargetAttention):
    """Baseline: the first layer applied to the materialised [B, L, 4D+E] concatenation — the DIN formula of
    tests/reference.py, the oracle tests/test_modules.py checks the fast attention against."""

    def forward(self, behaviours, target, mask, scenario_emb=None, context=None, scale=None):
        rows = behaviours if context is None else behaviours.index_select(0, context)
        mask, scale = (mask, scale) if context is None else (mask[context], None if scale is None else scale[context])
        weights = self.weights_of(din_scores(self, rows, target, scenario_emb), mask, scale)
        return torch.bmm(weights.unsqueeze(1), rows).squeeze(1), weights


class DenseStack(nn.Module):
    """The model's RankingHead over padded behaviours (one context per row), with the attention class given."""

    def __init__(self, attention: type[TargetAttention]) -> None:
        super().__init__()
        self.head = RankingHead(MODEL, pooled_dim=POOLED, dim=D, dense_dim=DENSE, scenario_dim=E, num_scenarios=S,
                                recency=MODEL.gate_recency)
        self.head.attention = attention(D, MODEL.attention_hidden, scenario_dim=E if MODEL.parts.attention_scenario else 0)

    def forward(self, behaviours, behaviour_scenario, scenario, target, mask, pooled, dense):
        e = self.head.scenario_vectors(scenario)
        gate = self.head.gate_padded(behaviours, behaviour_scenario, scenario, None, age_padded(mask.sum(1), mask.shape[1]))
        interest, _ = self.head.interest_padded(behaviours, mask, target, e, torch.arange(scenario.shape[0]), gate)
        return self.head(pooled, target, interest, dense, scenario, e)


def make_inputs(batch: int, length: int) -> tuple[torch.Tensor, ...]:
    return (
        torch.randn(batch, length, D, requires_grad=True),  # behaviour embeddings come from a table: need grad
        torch.randint(0, S, (batch, length)),
        torch.randint(0, S, (batch,)),
        torch.randn(batch, D, requires_grad=True),
        lengths_to_mask(torch.randint(0, length + 1, (batch,)), length),
        torch.randn(batch, POOLED, requires_grad=True),
        torch.randn(batch, DENSE),
    )


def step(model: DenseStack, inputs: tuple[torch.Tensor, ...], labels: torch.Tensor, bf16: bool) -> torch.Tensor:
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with autocast:
        logits = model(*inputs)
    loss = nn.functional.binary_cross_entropy_with_logits(logits.float(), labels)
    loss.backward()
    return logits.detach().float()


def time_steps(fn, repeats: int) -> tuple[list[float], list[float]]:
    """Wall and process-CPU seconds per call. CPU time, divided by the thread count, is the wall time the step
    would take on dedicated cores: robust to other processes sharing the machine (spin-waits make it an upper bound)."""
    fn()  # warm-up
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return walls, cpus


def grads(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    flat = [p.grad.flatten() for p in model.parameters()] + [x.grad.flatten() for x in inputs if x.requires_grad]
    return torch.cat(flat)


def zero_grads(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
    model.zero_grad(set_to_none=True)
    for x in inputs:
        x.grad = None


def tune_malloc() -> None:
    """Keep freed memory in glibc's heap: every large tensor otherwise costs fresh mmap pages (page faults)."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-4, 0)  # M_MMAP_MAX: serve large blocks from the heap
    libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD: never give the heap top back
    libc.mallopt(-2, 256 << 20)  # M_TOP_PAD: grow the heap in 256 MiB steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/bench_attention.json"))
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--length", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--precision", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"])
    parser.add_argument("--malloc-tune", action="store_true", help="glibc mallopt: no mmap for large tensors")
    parser.add_argument("--compile", action="store_true",
                        help="also the fast stack under torch.compile (Inductor; these static padded shapes only: on "
                             "the packed training path, whose N varies per batch, it measured 0.75x eager)")
    args = parser.parse_args()
    if args.malloc_tune:
        tune_malloc()
    torch.set_num_threads(args.threads)
    host = host_facts()
    print(f"host: {host.summary()}", flush=True)
    torch.manual_seed(0)

    inputs = make_inputs(args.batch, args.length)
    labels = torch.randint(0, 2, (args.batch,)).float()
    fast = DenseStack(TargetAttention)
    naive = DenseStack(NaiveAttention)
    naive.load_state_dict(fast.state_dict())

    zero_grads(fast, inputs)
    reference_logits = step(fast, inputs, labels, bf16=False)
    reference_grads = grads(fast, inputs)

    rows = []
    stacks = [("naive", naive), ("fast", fast), *([("compiled", torch.compile(fast))] if args.compile else [])]
    for name, model in stacks:
        for bf16 in [p == "bf16" for p in args.precision]:
            zero_grads(model, inputs)
            logits = step(model, inputs, labels, bf16)
            grad_error = (grads(model, inputs) - reference_grads).norm() / reference_grads.norm()
            times, cpu_times = time_steps(
                lambda model=model, bf16=bf16: (zero_grads(model, inputs), step(model, inputs, labels, bf16)), args.repeats
            )
            rows.append(
                {
                    "attention": name,
                    "precision": "bf16-autocast" if bf16 else "fp32",
                    "best_s": min(times),
                    "median_s": statistics.median(times),
                    "examples_per_s": args.batch / min(times),
                    "best_cpu_s": min(cpu_times),
                    "examples_per_s_dedicated": args.batch * args.threads / min(cpu_times),
                    "max_abs_logit_diff_vs_fast_fp32": (logits - reference_logits).abs().max().item(),
                    "rel_grad_error_vs_fast_fp32": grad_error.item(),
                }
            )

    print(f"B={args.batch} L={args.length} D={D} E={E} S={S} threads={args.threads} malloc_tune={args.malloc_tune}")
    print(f"{'attention':<10}{'precision':<15}{'best ms':>9}{'median ms':>11}{'ex/s':>9}{'ex/s ded.':>10}{'logit diff':>12}{'grad err':>10}")
    for r in rows:
        print(
            f"{r['attention']:<10}{r['precision']:<15}{r['best_s'] * 1e3:>9.1f}{r['median_s'] * 1e3:>11.1f}"
            f"{r['examples_per_s']:>9.0f}{r['examples_per_s_dedicated']:>10.0f}{r['max_abs_logit_diff_vs_fast_fp32']:>12.2e}"
            f"{r['rel_grad_error_vs_fast_fp32']:>10.1e}"
        )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "config": {
            "batch": args.batch,
            "length": args.length,
            "dim": D,
            "scenario_dim": E,
            "scenarios": S,
            "attention_hidden": [64, 32],
            "tower_in": DenseStack(TargetAttention).head.tower.mlp.linears[0].in_features,
            "tower_hidden": [512, 256],
            "threads": args.threads,
            "repeats": args.repeats,
            "malloc_tune": args.malloc_tune,
        },
        "machine": {**asdict(host), "torch": torch.__version__},
        "rows": rows,
    }
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
