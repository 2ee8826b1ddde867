"""Checkpoint trees flattened for exact comparison."""

from __future__ import annotations

from typing import Any

import torch


def flat_tensors(tree: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a nested dict/list tree (a loaded checkpoint), keyed by its path ("/state_dict/model.x")."""
    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    out: dict[str, torch.Tensor] = {}
    for key, value in items:
        out.update(flat_tensors(value, f"{prefix}/{key}"))
    return out
