"""What a result was produced with: library versions, the code's git commit, the host. Recorded by `fit`
(fit_result.json), `evaluate` (metrics.json) and `export` (manifest.json), so that runs stay comparable across
machines (AVX2-only to AMX, CPU or GPU) and library upgrades.

Collecting it never fails and costs one `git` call (with a timeout) at most: a fact that cannot be had is null
(no git, not a checkout, no /proc/cpuinfo). The standard library only at import; torch is asked for its CPU
dispatch level and GPUs when the provenance is collected.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

# distribution names whose versions decide results; a tuple = alternatives, the first installed one is recorded
PACKAGES: tuple[str | tuple[str, ...], ...] = (
    "torch", "torchrec", ("fbgemm-gpu", "fbgemm-gpu-cpu"), "lightning", "polars", "pyarrow", "msit-rec",
)
# /proc/cpuinfo flags that change which kernels run (and so speed, and in low precision the numbers)
CPU_FLAGS = (
    "sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
    "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16", "amx_fp16",
)
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")  # native bf16 matrix products (others emulate them, slower than fp32)
GIT_TIMEOUT_S = 5.0
REPO_ROOT = Path(__file__).resolve().parents[1]  # the checkout when msit_rec runs from one (editable install)


@dataclass
class GitState:
    commit: str  # full hash of HEAD
    dirty: bool  # tracked files differ from HEAD


@dataclass
class HostFacts:
    hostname: str
    platform: str  # e.g. Linux-6.8.0-x86_64-with-glibc2.39
    python: str
    cpu_model: str | None
    cpu_flags: list[str]  # the CPU_FLAGS this CPU has (empty where /proc/cpuinfo is missing)
    cpu_capability: str | None  # the instruction set torch dispatches CPU kernels to (DEFAULT, AVX2, AVX512, ...)
    logical_cpus: int | None
    usable_cpus: int | None  # this process's CPU affinity (a container or taskset may allow fewer)
    gpus: list[str] = field(default_factory=list)  # CUDA device names, when CUDA is available

    def summary(self) -> str:
        """One line for a benchmark's header: a ratio read without the CPU it was measured on means little."""
        gpus = f"; GPUs: {', '.join(self.gpus)}" if self.gpus else ""
        return (f"{self.cpu_model or 'unknown CPU'}, {self.usable_cpus} usable of {self.logical_cpus} CPUs, torch "
                f"kernels {self.cpu_capability}, flags: {' '.join(self.cpu_flags) or 'none found'}{gpus}")


@dataclass
class Provenance:
    created_at: str  # ISO 8601, UTC
    versions: dict[str, str | None]  # distribution name → version (None: not installed)
    git: GitState | None  # None when msit_rec does not run from a git checkout (or git is missing)
    host: HostFacts


@dataclass
class CheckpointPosition:
    """Where in training a checkpoint was saved (from its trainer_state.pt): Lightning's 0-based epoch
    (`trainer.current_epoch`) and optimizer steps taken (`trainer.global_step`)."""

    epoch: int
    global_step: int

    def __str__(self) -> str:
        return f"epoch {self.epoch}, step {self.global_step}"


def utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for entry in PACKAGES:
        names = (entry,) if isinstance(entry, str) else entry
        found = [(name, _version(name)) for name in names]
        name, version = next(((n, v) for n, v in found if v is not None), (names[0], None))
        versions[name] = version
    return versions


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_state(repo: Path = REPO_ROOT) -> GitState | None:
    """HEAD of the checkout `repo` (and whether tracked files differ from it); None unless `repo` itself is the top
    of a git checkout — code installed into site-packages inside some other repository is not that repository's."""
    if not (repo / ".git").exists():
        return None
    try:  # --exclude='*': no tag names, the hash itself; optional locks off: never contend with a user's git
        done = subprocess.run(
            ["git", "-C", str(repo), "describe", "--always", "--dirty", "--abbrev=64", "--exclude=*"],
            check=True, capture_output=True, text=True, timeout=GIT_TIMEOUT_S,
            env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"},
        )
    except (OSError, subprocess.SubprocessError):  # no git, a timeout, not a repository git trusts (safe.directory)
        return None
    described = done.stdout.strip()
    commit = described.removesuffix("-dirty")
    if len(commit) not in (40, 64):  # SHA-1 or SHA-256 repositories
        return None
    return GitState(commit=commit, dirty=described.endswith("-dirty"))


def cpu_info(path: Path = Path("/proc/cpuinfo")) -> tuple[str | None, list[str]]:
    """(model name, the CPU_FLAGS present) of the first processor listed in `path`; (None, []) without it."""
    model, flags = None, set()
    try:
        with path.open() as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model is None:
                    model = value.strip()
                elif key == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    return model or platform.processor() or None, [flag for flag in CPU_FLAGS if flag in flags]


def native_bf16_flags(flags: list[str] | None = None) -> list[str]:
    """The BF16_CPU_FLAGS among `flags` (default: this CPU's): empty where bf16 products would be emulated."""
    present = cpu_info()[1] if flags is None else flags
    return [flag for flag in BF16_CPU_FLAGS if flag in present]


def host_facts() -> HostFacts:
    import torch

    model, flags = cpu_info()
    affinity = getattr(os, "sched_getaffinity", None)
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return HostFacts(
        hostname=socket.gethostname(),
        platform=platform.platform(),
        python=platform.python_version(),
        cpu_model=model,
        cpu_flags=flags,
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
        logical_cpus=os.cpu_count(),
        usable_cpus=len(affinity(0)) if affinity is not None else None,
        gpus=gpus,
    )


def collect() -> Provenance:
    """The provenance of results this process writes now."""
    return Provenance(created_at=utc_now(), versions=package_versions(), git=git_state(), host=host_facts())

