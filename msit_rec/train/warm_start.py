"""`fit --init-from`: start a new run from a parent run's checkpoint on examples whose tables grew.

The examples must descend from the parent's (`prepare --vocab-from`, recorded in dataset.json's `lineage`): every
id the parent knew keeps its index, so each parent table is a row prefix of the new one. After the model is sharded
(any number of processes, any placement) and its optimizers exist, every rank reads the parent's tensors whole,
one group at a time, with torch.distributed.checkpoint (no collective: the parent may have been written by any
number of processes) and copies into its own shards:

- embedding tables: rows [0, parent rows) from the parent; the rows after keep their fresh initialisation;
- dense parameters: whole (their shapes must match: same model config, features and scenarios);
- optimizer state: the fused embedding optimizer's per-row state for the known rows (row-wise Adagrad's momentum
  included; new rows start at zero as in a fresh run) and the dense AdamW state (moments and step count) whole.
  Row-wise state of a column-wise sharded table holds one value per row and column shard: with the same number of
  column shards it is copied as is, otherwise each row's mean over the parent's shards is given to every new shard.
  State the parent lacks (another embedding optimizer, a table moved to data-parallel) starts fresh, with a warning.

Epochs, global step and the LR schedule start anew (warm-up included): the new run is a new run, not a resume.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.checkpoint._nested_dict import flatten_state_dict
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from msit_rec.data.spec import DatasetMeta
from msit_rec.errors import ConfigError, DataError
from msit_rec.model import RankingModel, added_since_older_checkpoints
from msit_rec.option_defaults import CHECKPOINT
from msit_rec.run_dir import FIT_CONFIG_FILE, checkpoint_path
from msit_rec.train.checkpoint import (
    DATASET_HASH_KEY,
    MODEL_PREFIX,
    check_checkpoint_dir,
    checkpoint_shapes,
    load_trainer_state,
    saved_tensors,
    unreadable,
)
from msit_rec.train.sharding import table_parameters

log = logging.getLogger(__name__)

OPTIMIZER_PREFIX = "optimizer_states.0.state."  # DCP keys of the (one, combined) optimizer's state
_LOAD_GROUP_BYTES = 256 << 20  # parent tensors read per DCP call: bounds the memory a rank holds at once


def resolve_init_from(path: str | Path) -> Path:
    """`RUN` (a run directory: its `best` checkpoint, what evaluate and export use) or a checkpoint directory."""
    path = Path(path)
    if (path / FIT_CONFIG_FILE).is_file():
        path = checkpoint_path(path, CHECKPOINT)
    return path


def check_warm_startable(init_from: Path, meta: DatasetMeta, data_dir: Path, model: RankingModel) -> None:
    """DataError unless `init_from` is an intact checkpoint of a model like `model` (the one built from `meta`),
    trained on examples `meta` descends from, with no table larger than here. Runs before any process starts."""
    check_checkpoint_dir(init_from)
    flag = f"--init-from {init_from}"
    parent_hash = load_trainer_state(init_from).get(DATASET_HASH_KEY)
    if not isinstance(parent_hash, str) or not meta.descends_from(parent_hash):
        known = meta.lineage.ancestors if meta.lineage is not None else []
        raise DataError(
            f"{flag}: trained on examples with content_hash {parent_hash!r}, and --data {data_dir} was not prepared "
            f"from them (its lineage: {known or 'none'}); prepare --data with --vocab-from <those examples> so every "
            f"known id keeps its row"
        )
    saved = checkpoint_shapes(init_from)
    expected = {f"model.{key}": value.shape for key, value in model.state_dict().items()}
    tables = {f"model.{key}": table for key, table in table_parameters(model).items()}
    older = model.absent_from_older_checkpoints({key.removeprefix("model.") for key in saved})  # start fresh: r = 0
    missing = sorted(set(expected) - set(saved) - {f"model.{key}" for key in older})
    unexpected = sorted(set(saved) - set(expected))
    if missing or unexpected:
        raise DataError(f"{flag}: the checkpoint's model differs from the one --model/--trainer and --data build "
                        f"(missing {missing[:4]}, unexpected {unexpected[:4]}); warm-start with the parent's model "
                        f"config")
    for key, shape in expected.items():
        if key not in saved:  # added since the parent was written: starts fresh (zero, the parent's function)
            continue
        old, new = tuple(saved[key]), tuple(shape)
        if old == new:
            continue
        if key in tables and old[1:] == new[1:] and old[0] <= new[0]:
            continue  # grown: the parent's rows are a prefix
        if key in tables and old[1:] == new[1:]:
            raise DataError(f"{flag}: table '{tables[key]}' has {old[0]} rows in the checkpoint but only {new[0]} in "
                            f"--data {data_dir}: tables can only grow; prepare --data with --vocab-from <the "
                            f"parent's examples>")
        if key not in tables:
            raise DataError(f"{flag}: {key} has shape {old} in the checkpoint but {new} here (same model config, "
                            f"features and scenarios ({len(meta.scenarios)} here) needed)")
        raise DataError(f"{flag}: table '{tables[key]}' has shape {old} in the checkpoint but {new} here (the "
                        f"embedding dim cannot change)")


def check_init_from_flags(init_from: Path | None, resume: Path | None, out_dir: Path) -> None:
    if init_from is None:
        return
    if resume is not None:
        raise ConfigError("--resume continues a run and --init-from starts a new one from another run: pass one of them")
    if out_dir.resolve() == init_from.resolve() or out_dir.resolve() in init_from.resolve().parents:
        raise ConfigError(f"--init-from {init_from} is inside --out {out_dir}: write the new run elsewhere")


@dataclass
class WarmStartReport:
    """What a warm start copied (rank-local counts of tensors) and what it left fresh."""

    tables: dict[str, tuple[int, int]] = field(default_factory=dict)  # table → (parent rows, rows now)
    copied: int = 0
    fresh_state: list[str] = field(default_factory=list)  # optimizer state the parent has no counterpart for

    def summary(self, source: Path) -> str:
        grown = {t: f"{old}→{new}" for t, (old, new) in self.tables.items() if old != new}
        return (f"warm-started from {source}: {self.copied} tensors copied (weights and optimizer state); "
                f"tables grown {grown or 'none'}")


@dataclass
class _Target:
    key: str  # DCP key
    tensor: torch.Tensor | ShardedTensor
    table: str | None  # the table whose rows it indexes (a weight or its optimizer state), else None
    parent_rows: int = 0
    rows: int = 0


def warm_start(module: nn.Module, optimizer: torch.optim.Optimizer, init_from: Path) -> WarmStartReport:
    """Copy the parent checkpoint into the sharded `module` and its (combined) `optimizer` on this rank.

    The optimizer's lazily built state (AdamW moments) must exist already (msit_rec.train.optim.init_dense_state).
    """
    with warnings.catch_warnings():  # DCP's single-process notice, ShardedTensor's deprecation: noise here
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)
        return _warm_start(module, optimizer, check_checkpoint_dir(init_from))


def _warm_start(module: nn.Module, optimizer: torch.optim.Optimizer, ckpt_dir: Path) -> WarmStartReport:
    saved = saved_tensors(ckpt_dir)
    model_state = module.state_dict()
    optimizer_state = optimizer.state_dict()
    flat, _ = flatten_state_dict({"state_dict": model_state, "optimizer_states": [optimizer_state]})
    targets = _targets(module, flat, saved)
    report = WarmStartReport()
    for target in targets:
        if target.key.startswith(MODEL_PREFIX) and target.table is not None:
            report.tables[target.table] = (target.parent_rows, target.rows)
    present = [t for t in targets if t.key in saved]
    report.fresh_state = sorted(t.key.removeprefix(OPTIMIZER_PREFIX) for t in targets if t.key not in saved)
    for group in _load_groups(present, saved):
        sources = _read(ckpt_dir, {t.key: saved[t.key] for t in group})
        for target in group:
            if _copy(target, sources.pop(target.key)):
                report.copied += 1
            elif target.key.startswith(MODEL_PREFIX):  # check_warm_startable refuses this before training
                raise DataError(f"--init-from {ckpt_dir}: {target.key} has shape {tuple(saved[target.key].size)} "
                                f"there and {_global_shape(target.tensor)} here")
            else:
                report.fresh_state.append(target.key.removeprefix(OPTIMIZER_PREFIX))
    module.load_state_dict(model_state)
    optimizer.load_state_dict(optimizer_state)
    return report


def _targets(module: nn.Module, flat: dict[str, Any], saved: dict[str, TensorStorageMetadata]) -> list[_Target]:
    """Every tensor of the module's and optimizer's state, each tied to its table when it indexes one's rows."""
    weights = {MODEL_PREFIX + key: table for key, table in table_parameters(module).items()}
    rows = {key: _global_shape(flat[key])[0] for key in weights if key in flat}
    targets = []
    for key, value in flat.items():
        if not isinstance(value, (torch.Tensor, ShardedTensor)):
            continue
        if key.startswith(MODEL_PREFIX) and key not in saved and not added_since_older_checkpoints(key):
            raise DataError(f"warm start: {key} is not in the checkpoint")  # check_warm_startable ran: a bug
        weight = key if key in weights else _weight_of(key, weights)
        if weight is None:
            targets.append(_Target(key, value, None))
            continue
        parent_rows = saved[weight].size[0] if weight in saved else 0
        targets.append(_Target(key, value, weights[weight], parent_rows, rows[weight]))
    return targets


def _weight_of(key: str, weights: dict[str, str]) -> str | None:
    """The table weight an optimizer-state key belongs to (`optimizer_states.0.state.<group>.<weight>.<state>`)."""
    if not key.startswith(OPTIMIZER_PREFIX):
        return None
    for weight in weights:
        if f".{weight.removeprefix(MODEL_PREFIX)}." in key:
            return weight
    return None


def _global_shape(tensor: torch.Tensor | ShardedTensor) -> tuple[int, ...]:
    return tuple(tensor.size())


def _load_groups(targets: list[_Target], saved: dict[str, TensorStorageMetadata]) -> Iterator[list[_Target]]:
    group: list[_Target] = []
    size = 0
    for target in targets:
        meta = saved[target.key]
        nbytes = meta.size.numel() * meta.properties.dtype.itemsize
        if group and size + nbytes > _LOAD_GROUP_BYTES:
            yield group
            group, size = [], 0
        group.append(target)
        size += nbytes
    if group:
        yield group


def _read(ckpt_dir: Path, wanted: dict[str, TensorStorageMetadata]) -> dict[str, torch.Tensor]:
    """Whole tensors of the checkpoint, whatever world size wrote them; local to this rank (no collective)."""
    state = {key: torch.empty(meta.size, dtype=meta.properties.dtype) for key, meta in wanted.items()}
    try:
        dcp.load(state, checkpoint_id=ckpt_dir, no_dist=True)
    except CheckpointException as exc:
        raise unreadable(ckpt_dir, exc) from None
    return state


def _copy(target: _Target, source: torch.Tensor) -> bool:
    """Write `source` (the parent's whole tensor) into this rank's part of `target`; False when they cannot map."""
    shape = _global_shape(target.tensor)
    if tuple(source.shape) == shape and target.parent_rows == target.rows:
        full, known = source, None
    elif target.table is None:
        return False
    else:
        mapped = _grown(source, shape, target.parent_rows, target.rows)
        if mapped is None:
            return False
        full, known = mapped
    with torch.no_grad():
        if isinstance(target.tensor, ShardedTensor):
            for shard in target.tensor.local_shards():
                region = tuple(slice(o, o + s) for o, s in
                               zip(shard.metadata.shard_offsets, shard.metadata.shard_sizes, strict=True))
                _write(shard.tensor, full[region], None if known is None else known[region[0]])
        else:
            _write(target.tensor, full, known)
    return True


def _write(destination: torch.Tensor, source: torch.Tensor, known: torch.Tensor | None) -> None:
    source = source.to(device=destination.device, dtype=destination.dtype)
    if known is None:
        destination.copy_(source)
    else:
        destination[known] = source[known]


def _grown(
    source: torch.Tensor, shape: tuple[int, ...], parent_rows: int, rows: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The parent's tensor laid out in the new global `shape`, and which entries of dim 0 it knows.

    Weights and element-wise state are `[rows, ...]`: the first `parent_rows` rows are known. Row-wise state is
    `[rows * column shards]`, one block of rows per column shard (TorchRec's layout)."""
    if source.ndim != len(shape) or parent_rows == 0 or rows == 0:
        return None
    if source.ndim > 1 or source.shape[0] == parent_rows and shape[0] == rows:
        if source.shape[0] != parent_rows or shape[0] != rows or tuple(source.shape[1:]) != shape[1:]:
            return None
        full = torch.zeros(shape, dtype=source.dtype)
        full[:parent_rows] = source
        known = torch.zeros(rows, dtype=torch.bool)
        known[:parent_rows] = True
        return full, known
    if source.shape[0] % parent_rows or shape[0] % rows:
        return None
    old_blocks, new_blocks = source.shape[0] // parent_rows, shape[0] // rows
    per_block = source.reshape(old_blocks, parent_rows)  # [column shards, rows]
    if old_blocks != new_blocks:
        per_block = per_block.mean(dim=0, keepdim=True).expand(new_blocks, parent_rows)
    full = torch.zeros(new_blocks, rows, dtype=source.dtype)
    full[:, :parent_rows] = per_block
    known = torch.zeros(new_blocks, rows, dtype=torch.bool)
    known[:, :parent_rows] = True
    return full.reshape(-1), known.reshape(-1)
