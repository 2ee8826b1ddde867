"""The serving model as files: a `torch.export` program (portable) and optionally an AOTInductor package (fast).

Both take the contract's inputs positionally and have a dynamic batch dimension, so one file serves a request of
1 candidate or of thousands. Loading needs torch alone (`load_program`), which is what the serving side relies on.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from msit_rec.serving.contract import INPUT_NAMES

MAX_BATCH = 1 << 20  # rows per call the program accepts; a bound keeps the symbolic batch size well defined


def export_program(model: nn.Module, example: tuple[torch.Tensor, ...]) -> torch.export.ExportedProgram:
    """`torch.export` with dimension 0 of every input symbolic. `example` needs ≥ 2 rows (1 would specialise)."""
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    dynamic = {name: {0: batch} for name in INPUT_NAMES}
    example = tuple(t.clone() for t in example)  # the program keeps its example inputs: own storages, not views
    return torch.export.export(model, example, dynamic_shapes=dynamic, strict=False)


def save_program(program: torch.export.ExportedProgram, path: Path) -> None:
    torch.export.save(program, path)


def compile_aoti(program: torch.export.ExportedProgram, path: Path) -> None:
    """AOTInductor package of `program` at `path` (C++ compile: tens of seconds; tied to this torch build)."""
    torch._inductor.aoti_compile_and_package(program, package_path=str(path))


def load_program(path: Path) -> Callable[..., torch.Tensor]:
    """A callable `(sparse, history, hist_len, scenario, dense) → logits [B]` from program.pt2 or program_aoti.pt2."""
    path = Path(path)
    if path.name.endswith("_aoti.pt2"):
        return torch._inductor.aoti_load_package(str(path))
    return torch.export.load(path).module()
