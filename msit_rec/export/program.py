"""The serving model as files: a `torch.export` program (portable) and optionally an AOTInductor package (fast).

Both take the contract's inputs positionally and have dynamic row and context dimensions, so one file serves a
request of 1 candidate or of thousands. Loading needs torch alone (`load_program`), which is what the serving side relies on.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from msit_rec.serving.contract import INPUT_NAMES, ROW_INPUTS

MAX_BATCH = 1 << 20  # rows per call the program accepts; a bound keeps the symbolic batch size well defined


def export_program(model: nn.Module, example: tuple[torch.Tensor, ...]) -> torch.export.ExportedProgram:
    """`torch.export` with dimension 0 of every input symbolic: rows (B) for the row inputs, contexts (C) for the
    others. `example` needs ≥ 2 rows and ≥ 2 contexts, in different numbers (equal or 1 would specialise)."""
    rows = torch.export.Dim("rows", min=1, max=MAX_BATCH)
    contexts = torch.export.Dim("contexts", min=1, max=MAX_BATCH)
    dynamic = {name: {0: rows if name in ROW_INPUTS else contexts} for name in INPUT_NAMES}
    example = tuple(t.clone() for t in example)  # the program keeps its example inputs: own storages, not views
    return torch.export.export(model, example, dynamic_shapes=dynamic, strict=False)


def save_program(program: torch.export.ExportedProgram, path: Path) -> None:
    torch.export.save(program, path)


def compile_aoti(program: torch.export.ExportedProgram, path: Path) -> None:
    """AOTInductor package of `program` at `path` (C++ compile: tens of seconds; tied to this torch build)."""
    torch._inductor.aoti_compile_and_package(program, package_path=str(path))


def load_program(path: Path) -> Callable[..., tuple[torch.Tensor, ...]]:
    """A callable `(sparse, history, hist_len, scenario, dense, context) → (logits [B], attention [B, L])` from a
    program file."""
    path = Path(path)
    if path.name.endswith("_aoti.pt2"):
        return torch._inductor.aoti_load_package(str(path))
    return torch.export.load(path).module()
