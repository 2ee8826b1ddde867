"""`trainer.precision: auto`: bf16-mixed only where this host's bf16 matrix products are native and measured faster.

bf16 autocast pays off only where the hardware multiplies bf16 natively (AMX or AVX512-BF16 on CPU, Ampere and later
on GPU); elsewhere it emulates the products and adds casts, so it is slower than fp32. So `auto` checks the CPU flags
and then times the products the model runs (the attention's first layer and the tower's, fp32 against bf16) for a
fraction of a second. The verdict is cached per host (CPU model and flags, torch version, thread count) in
`$XDG_CACHE_HOME/msit-rec/precision_probe.json`: the processes of one job on one host read the same verdict.
The embedding tables stay fp32 whatever the choice: autocast only lowers the dense products.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from msit_rec.errors import ConfigError
from msit_rec.provenance import BF16_CPU_FLAGS, cpu_info, native_bf16_flags

AUTO = "auto"
FP32 = "32-true"
BF16 = "bf16-mixed"
FP16 = "16-mixed"
# (rows, in, out) of the products one training step runs most: the attention's first layer over the packed
# behaviours ([N, 4·D] → 64, N ≈ batch × mean history) and the tower's first layer ([B, F] → 512)
PROBE_SHAPES = ((16384, 256, 64), (4096, 512, 512))
PROBE_REPEATS = 5
MIN_SPEEDUP = 1.25  # bf16 must beat fp32 by this much: autocast's casts cost something the probe does not see


@dataclass(frozen=True)
class PrecisionChoice:
    """What `fit` trains with, and why: logged at start and kept in fit_result.json."""

    precision: str  # Lightning's name: 32-true, bf16-mixed, 16-mixed
    requested: str
    reason: str
    bf16_speedup: float | None = None  # fp32 time / bf16 time of the probe products, when probed


def probe_cache_path() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "msit-rec" / "precision_probe.json"


def best_seconds(product: Callable[[], object], repeats: int = PROBE_REPEATS) -> float:
    """The fastest of `repeats` timed calls, after one untimed (oneDNN picks and caches its kernel on the first)."""
    product()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        product()
        best = min(best, time.perf_counter() - start)
    return best


def measure_bf16_speedup() -> float:
    """fp32 seconds / bf16 seconds of the probe products on this CPU, at the current thread count."""
    generator = torch.Generator().manual_seed(0)
    fp32 = bf16 = 0.0
    for rows, inner, out in PROBE_SHAPES:
        a = torch.randn(rows, inner, generator=generator)
        b = torch.randn(inner, out, generator=generator)
        a16, b16 = a.to(torch.bfloat16), b.to(torch.bfloat16)
        fp32 += best_seconds(lambda a=a, b=b: a @ b)
        bf16 += best_seconds(lambda a=a16, b=b16: a @ b)
    return fp32 / bf16


def _cpu_speedup(model: str | None, flags: list[str], measure: Callable[[], float]) -> float:
    """The cached speedup of this host, measured (and cached) on a miss. An unreadable cache is measured again."""
    key = f"{model}|{' '.join(flags)}|torch {torch.__version__}|{torch.get_num_threads()} threads"
    path = probe_cache_path()
    try:
        cache = json.loads(path.read_text())
        if not isinstance(cache, dict):
            cache = {}
    except (OSError, ValueError):
        cache = {}
    if isinstance(cache.get(key), float):
        return cache[key]
    speedup = measure()
    cache[key] = speedup
    try:  # best effort: a read-only home still trains, it only probes again next time
        path.parent.mkdir(parents=True, exist_ok=True)
        staged = path.with_name(f".{path.name}.{os.getpid()}")
        staged.write_text(json.dumps(cache, indent=1) + "\n")
        staged.replace(path)  # atomic: processes of one job may probe at once
    except OSError:
        pass
    return speedup


def check_precision(requested: str, accelerator: str) -> None:
    """Refuse what Lightning would silently change: fp16 autocast on CPU becomes bf16-mixed, with a warning."""
    if requested == FP16 and accelerator == "cpu":
        raise ConfigError("fit.trainer.precision: 16-mixed (fp16 autocast) does not run on CPU; use bf16-mixed, "
                          "32-true or auto")


def choose_precision(
    requested: str, accelerator: str, measure: Callable[[], float] = measure_bf16_speedup
) -> PrecisionChoice:
    """The precision to train with: `requested` itself unless it is `auto`."""
    check_precision(requested, accelerator)
    if requested != AUTO:
        return PrecisionChoice(requested, requested, "set in the config")
    if accelerator == "gpu":  # emulated bf16 (V100, T4) is slower than fp32: native only
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False):
            return PrecisionChoice(BF16, requested, f"{torch.cuda.get_device_name()} multiplies bf16 natively")
        return PrecisionChoice(FP32, requested, "this GPU has no native bf16")
    model, flags = cpu_info()
    native = native_bf16_flags(flags)
    if not native:
        return PrecisionChoice(FP32, requested, f"no native bf16 products on this CPU (none of {', '.join(BF16_CPU_FLAGS)})")
    speedup = round(_cpu_speedup(model, flags, measure), 2)
    if speedup >= MIN_SPEEDUP:
        return PrecisionChoice(BF16, requested, f"{native[0]}: bf16 products measured {speedup}× faster than fp32",
                               speedup)
    return PrecisionChoice(FP32, requested, f"{native[0]} present, but bf16 products measured only {speedup}× "
                                            f"fp32 (< {MIN_SPEEDUP}×)", speedup)
