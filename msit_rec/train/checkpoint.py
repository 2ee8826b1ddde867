"""Sharded checkpoints: a directory written by every rank with torch.distributed.checkpoint (DCP).

Layout of a checkpoint directory:
- DCP files (`.metadata`, `*.distcp`): every tensor — model `state_dict` (sharded tables as sharded
  tensors, each rank writing its own shards) and optimizer state keyed by parameter name;
- `trainer_state.pt` (rank 0): everything else Lightning keeps (epoch, loops, callbacks, LR schedulers) plus the
  dense optimizer's param-group hyper-parameters and the dataset hash. Plain containers, numbers, strings and
  tensors only: it is read with `torch.load(weights_only=True)`. DCP's own `.metadata` is a pickle that DCP loads
  unrestricted, so it is first read here with an unpickler that knows only DCP's metadata types, and a checkpoint
  holding pickled objects (DCP "bytes" entries) is refused: no file of a checkpoint can run code;
- `checkpoint.json` (rank 0, written last): size and sha256 of every other file. A directory without it is
  incomplete; one whose files disagree with it is corrupt. Both are refused with a one-line error.

A save never touches the previous checkpoint of the same name until the new one is complete: every rank writes
into `.NAME.partial`, rank 0 adds its files and the record once DCP has gathered every rank's writes, then swaps
the directory into place (msit_rec.outputs.replace_dir); a barrier holds the other ranks until it is there. A kill
at any moment leaves the previous checkpoint valid (in the few microseconds between the two renames of the swap
it is kept as `.NAME.old-*`, which `recover_interrupted_swap` moves back).

Because DCP stores global shapes and shard offsets, a checkpoint written by N processes loads into any
other number of processes (resharding on load), and into one plain process for export.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from msit_rec.errors import DataError
from msit_rec.outputs import OLD_TAG, replace_dir

_VERIFIED: set[tuple[str, int]] = set()  # (record path, its mtime) of checkpoints verified by this process
_METADATA_MODULES = {  # globals a DCP .metadata pickle legitimately names, besides DCP's metadata classes and dtypes
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"PosixPath", "WindowsPath", "Path"},
    "collections": {"OrderedDict"},
}
TRAINER_STATE_FILE = "trainer_state.pt"
RECORD_FILE = "checkpoint.json"
RECORD_VERSION = 1
TENSOR_KEYS = ("state_dict", "optimizer_states")  # parts of a Lightning checkpoint stored with DCP
MODEL_PREFIX = "state_dict."  # DCP keys of the LightningModule's state_dict
DATASET_HASH_KEY = "msit_dataset_hash"  # trainer_state key: content hash of the examples the run trains on
_PARTIAL = ".partial"


def split_checkpoint(checkpoint: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tensor part for DCP, rest for `trainer_state.pt`) of a Lightning checkpoint dict."""
    tensors = {key: checkpoint[key] for key in TENSOR_KEYS if key in checkpoint}
    rest = {key: value for key, value in checkpoint.items() if key not in TENSOR_KEYS}
    return tensors, rest


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_record(ckpt_dir: Path) -> None:
    files = {
        p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(ckpt_dir.iterdir())
        if p.is_file() and p.name != RECORD_FILE
    }
    path = ckpt_dir / RECORD_FILE
    path.write_text(json.dumps({"version": RECORD_VERSION, "files": files}, indent=1) + "\n")
    _fsync(path)


def save_sharded(
    tensors: dict[str, Any],
    trainer_state: dict[str, Any],
    ckpt_dir: str | Path,
    is_rank_zero: bool,
    barrier: Callable[[str], None],
    all_succeeded: Callable[[bool], bool],
) -> None:
    """Write a checkpoint directory atomically (see module docstring); collective: every rank must call it.

    `all_succeeded(ok)` is a collective AND over ranks: a failure of rank 0's own part (disk full, a failed
    rename) is raised on every rank at once, instead of leaving the others waiting in a barrier."""
    ckpt_dir = Path(ckpt_dir)
    staging = ckpt_dir.parent / f".{ckpt_dir.name}{_PARTIAL}"
    if is_rank_zero:
        recover_interrupted_swap(ckpt_dir)
        shutil.rmtree(staging, ignore_errors=True)  # left by a save that was killed
        staging.mkdir(parents=True)
    barrier("msit_checkpoint_staging")
    # returns on rank 0 only after every rank's shards are written (DCP gathers the write results, then metadata)
    dcp.save(tensors, storage_writer=dcp.FileSystemWriter(staging))
    failure: OSError | None = None
    if is_rank_zero:
        try:
            torch.save(trainer_state, staging / TRAINER_STATE_FILE)
            _fsync(staging / TRAINER_STATE_FILE)
            _write_record(staging)
            replace_dir(staging, ckpt_dir)
            _fsync(ckpt_dir.parent)
        except OSError as exc:
            failure = exc
    if not all_succeeded(failure is None):
        raise DataError(f"checkpoint {ckpt_dir}: the save failed on rank 0 ({failure or 'see rank 0'}); "
                        f"the previous checkpoint of that name is unchanged")


def recover_interrupted_swap(ckpt_dir: str | Path) -> None:
    """Move a complete `.NAME.old-*` back to NAME when a kill fell between the two renames of a swap."""
    ckpt_dir = Path(ckpt_dir)
    if ckpt_dir.exists() or not ckpt_dir.parent.is_dir():
        return
    kept = sorted(ckpt_dir.parent.glob(f".{ckpt_dir.name}{OLD_TAG}*"), key=lambda p: p.stat().st_mtime)
    complete = [p for p in kept if (p / RECORD_FILE).is_file()]
    if complete:
        complete[-1].rename(ckpt_dir)


def check_checkpoint_dir(ckpt_dir: str | Path) -> Path:
    """The checkpoint directory as a Path once it is complete and intact, else a DataError saying what is wrong."""
    ckpt_dir = Path(ckpt_dir)
    recover_interrupted_swap(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise DataError(f"checkpoint {ckpt_dir}: no such directory")
    record_path = ckpt_dir / RECORD_FILE
    if not record_path.is_file():
        raise DataError(
            f"checkpoint {ckpt_dir}: incomplete (no {RECORD_FILE}: the save was interrupted, or the directory is not "
            f"an msit-rec checkpoint)"
        )
    stamp = (str(record_path.resolve()), record_path.stat().st_mtime_ns)
    if stamp in _VERIFIED:  # a resume reads one checkpoint several times: hash it once per process
        return ckpt_dir
    try:
        files = {name: (int(entry["bytes"]), str(entry["sha256"]))
                 for name, entry in json.loads(record_path.read_text())["files"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DataError(f"checkpoint {record_path}: unreadable record ({type(exc).__name__}: {exc})") from None
    for name, (size, digest) in files.items():
        path = ckpt_dir / name
        if not path.is_file():
            raise DataError(f"checkpoint {ckpt_dir}: file {name} is missing")
        if path.stat().st_size != size or _sha256(path) != digest:
            raise DataError(f"checkpoint {ckpt_dir}: file {name} is corrupt (its size or sha256 differs from {RECORD_FILE})")
    _check_metadata(ckpt_dir)
    _VERIFIED.add(stamp)
    return ckpt_dir


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's `.metadata` knowing only the types it holds: any other global is refused, not imported."""

    def find_class(self, module: str, name: str) -> Any:
        if module in _METADATA_MODULES and name in _METADATA_MODULES[module]:
            return super().find_class(module, name)
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        if module == "torch.distributed.checkpoint.metadata":
            found = getattr(dcp_metadata, name, None)
            if (isinstance(found, type) and found.__module__ == module) or name == "_MEM_FORMAT_ENCODING":
                return found
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in checkpoint metadata")


def _check_metadata(ckpt_dir: Path) -> None:
    """DataError unless `.metadata` unpickles with DCP's types alone and holds tensors only (no pickled objects)."""
    try:
        with (ckpt_dir / ".metadata").open("rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, OSError, AttributeError, ValueError) as exc:
        raise DataError(f"checkpoint {ckpt_dir}: .metadata refused ({exc})") from None
    entries = getattr(metadata, "state_dict_metadata", None)
    if not isinstance(entries, dict) or not all(isinstance(v, TensorStorageMetadata) for v in entries.values()):
        raise DataError(f"checkpoint {ckpt_dir}: .metadata holds non-tensor entries (pickled objects); refused")


def saved_tensors(ckpt_dir: str | Path) -> dict[str, TensorStorageMetadata]:
    """DCP key → global shape and dtype of every tensor in a checkpoint (model and optimizer state)."""
    metadata = FileSystemReader(str(ckpt_dir)).read_metadata()
    return {key: value for key, value in metadata.state_dict_metadata.items() if isinstance(value, TensorStorageMetadata)}


def checkpoint_shapes(ckpt_dir: str | Path) -> dict[str, torch.Size]:
    """Global shape of every model tensor in a checkpoint, keyed like the LightningModule's state_dict."""
    return {
        key.removeprefix(MODEL_PREFIX): value.size
        for key, value in saved_tensors(ckpt_dir).items()
        if key.startswith(MODEL_PREFIX)
    }


def check_state_matches(saved: dict[str, torch.Size], expected: dict[str, torch.Size], checkpoint: Path) -> None:
    """DataError naming the missing, unexpected and mis-shaped tensors when a checkpoint does not fit a model."""
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    shapes = [
        f"{key}: checkpoint {tuple(saved[key])} vs model {tuple(shape)}"
        for key, shape in expected.items()
        if key in saved and tuple(saved[key]) != tuple(shape)
    ]
    if missing or unexpected or shapes:
        parts = [
            f"missing {missing[:5]}" if missing else "",
            f"unexpected {unexpected[:5]}" if unexpected else "",
            f"shape mismatch {shapes[:5]}" if shapes else "",
        ]
        raise DataError(
            f"checkpoint {checkpoint} does not fit the model built from dataset.json and the model config: "
            + "; ".join(p for p in parts if p)
        )


def load_sharded_into(template: dict[str, Any], ckpt_dir: str | Path) -> dict[str, Any]:
    """Load DCP tensors in place into `template` (this rank's tensors, already sharded) and return it."""
    ckpt_dir = check_checkpoint_dir(ckpt_dir)
    try:
        dcp.load(template, checkpoint_id=ckpt_dir)
    except CheckpointException as exc:  # DCP wraps the per-rank causes (a BaseException, not an Exception)
        raise unreadable(ckpt_dir, exc) from None
    return template


def unreadable(ckpt_dir: Path, exc: CheckpointException) -> DataError:
    """The DataError of a checkpoint DCP could not read, with every rank's cause."""
    causes = "; ".join(f"{type(cause).__name__}: {cause}" for cause, _ in exc.failures.values())
    return DataError(f"checkpoint {ckpt_dir}: unreadable ({causes})")


def load_trainer_state(ckpt_dir: str | Path) -> dict[str, Any]:
    """The non-tensor part of a checkpoint; loaded with weights_only=True (no code runs from the file)."""
    return read_trainer_state(check_checkpoint_dir(ckpt_dir))


def read_trainer_state(ckpt_dir: str | Path) -> dict[str, Any]:
    """`load_trainer_state` without verifying the directory: for one the caller just wrote or verified."""
    path = Path(ckpt_dir) / TRAINER_STATE_FILE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, ValueError, EOFError, pickle.UnpicklingError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"checkpoint {path}: not loadable as plain data ({first})") from None


def load_unsharded_checkpoint(ckpt_dir: str | Path) -> dict[str, Any]:
    """Every tensor of a sharded checkpoint as full (unsharded) tensors, in one process, no process group.

    Returns `{"state_dict": {...}, "optimizer_states": [...]}` nested as saved.
    """
    ckpt_dir = check_checkpoint_dir(ckpt_dir)
    with tempfile.TemporaryDirectory() as tmp:
        plain_path = Path(tmp) / "unsharded.pt"
        try:
            dcp_to_torch_save(ckpt_dir, plain_path)
        except CheckpointException as exc:
            raise unreadable(ckpt_dir, exc) from None
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
