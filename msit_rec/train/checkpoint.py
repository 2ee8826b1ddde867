"""Sharded checkpoints: a directory written by every rank with torch.distributed.checkpoint (DCP).

Layout of a checkpoint directory:
- DCP files (`.metadata`, `*.distcp`): every tensor — model `state_dict` (sharded tables as sharded
  tensors, each rank writing its own shards) and optimizer state keyed by parameter name;
- `trainer_state.pt` (rank 0, plain `torch.save`): everything else Lightning keeps (epoch, loops,
  callbacks, LR schedulers, hyper-parameters) plus the dense optimizer's param-group hyper-parameters.

Because DCP stores global shapes and shard offsets, a checkpoint written by N processes loads into any
other number of processes (resharding on load), and into one plain process for export.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from msit_rec.errors import DataError

TRAINER_STATE_FILE = "trainer_state.pt"
TENSOR_KEYS = ("state_dict", "optimizer_states")  # parts of a Lightning checkpoint stored with DCP


def split_checkpoint(checkpoint: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tensor part for DCP, rest for `trainer_state.pt`) of a Lightning checkpoint dict."""
    tensors = {key: checkpoint[key] for key in TENSOR_KEYS if key in checkpoint}
    rest = {key: value for key, value in checkpoint.items() if key not in TENSOR_KEYS}
    return tensors, rest


def save_sharded(tensors: dict[str, Any], trainer_state: dict[str, Any], ckpt_dir: str | Path, is_rank_zero: bool) -> None:
    """Write a checkpoint directory; collective: every rank must call it with its own shards."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    # `last` is rewritten every epoch: overwrite explicitly (the implicit default is deprecated)
    dcp.save(tensors, storage_writer=dcp.FileSystemWriter(ckpt_dir, overwrite=True))
    if is_rank_zero:
        torch.save(trainer_state, ckpt_dir / TRAINER_STATE_FILE)


def check_checkpoint_dir(ckpt_dir: str | Path) -> Path:
    """The checkpoint directory as a Path, or a DataError saying what is missing."""
    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / ".metadata").is_file() or not (ckpt_dir / TRAINER_STATE_FILE).is_file():
        raise DataError(
            f"checkpoint {ckpt_dir}: not a sharded checkpoint directory (expected DCP '.metadata' and "
            f"'{TRAINER_STATE_FILE}' inside it)"
        )
    return ckpt_dir


def load_sharded_into(template: dict[str, Any], ckpt_dir: str | Path) -> dict[str, Any]:
    """Load DCP tensors in place into `template` (this rank's tensors, already sharded) and return it."""
    dcp.load(template, checkpoint_id=check_checkpoint_dir(ckpt_dir))
    return template


def load_trainer_state(ckpt_dir: str | Path) -> dict[str, Any]:
    """The non-tensor part of a checkpoint (trusted file written by this project)."""
    return torch.load(check_checkpoint_dir(ckpt_dir) / TRAINER_STATE_FILE, map_location="cpu", weights_only=False)


def load_unsharded_checkpoint(ckpt_dir: str | Path) -> dict[str, Any]:
    """Every tensor of a sharded checkpoint as full (unsharded) tensors, in one process, no process group.

    Returns `{"state_dict": {...}, "optimizer_states": [...]}` nested as saved.
    """
    ckpt_dir = check_checkpoint_dir(ckpt_dir)
    with tempfile.TemporaryDirectory() as tmp:
        plain_path = Path(tmp) / "unsharded.pt"
        dcp_to_torch_save(ckpt_dir, plain_path)
        return torch.load(plain_path, map_location="cpu", weights_only=True)


def load_unsharded_state_dict(ckpt_dir: str | Path) -> dict[str, torch.Tensor]:
    """The model's full state_dict from a sharded checkpoint: load it into a plain model for export."""
    return load_unsharded_checkpoint(ckpt_dir)["state_dict"]


def remove_checkpoint_dir(path: str | Path) -> None:
    """Delete a checkpoint (directory, or a plain file left by another strategy)."""
    path = Path(path)
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
