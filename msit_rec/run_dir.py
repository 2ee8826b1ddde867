"""The run directory of `msit-rec fit`: its one owner. `fit` writes it; `evaluate`, `export` and tests read it here.

    RUN/fit_config.yaml        RunRecord: the examples (path and content hash) and the whole FitConfig
    RUN/fit_result.json        FitResult: best/last checkpoint paths (with their epoch and step), best validation
                               AUC (and the monitored metric that picked best), log directory, wall time,
                               provenance (versions, git commit, host)
    RUN/checkpoints/NAME.ckpt  sharded checkpoints (msit_rec/train/checkpoint.py); NAME is best or last
    RUN/logs/, RUN/tensorboard/

Loading a trained model needs no Lightning and no plotting: only the record, the checkpoint and the model class.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from msit_rec.config import from_dict, read_yaml, to_dict
from msit_rec.data.spec import OOV_INDEX, DatasetMeta
from msit_rec.errors import ConfigError, DataError
from msit_rec.fit_config import FitConfig, ModelConfig, TrainerConfig
from msit_rec.model import RankingModel
from msit_rec.outputs import staged_file
from msit_rec.provenance import CheckpointPosition, Provenance
from msit_rec.train.auto_precision import PrecisionChoice
from msit_rec.train.checkpoint import (
    check_checkpoint_dir,
    check_state_matches,
    load_unsharded_state_dict,
    read_trainer_state,
)
from msit_rec.train.sharding import table_parameters

FIT_CONFIG_FILE = "fit_config.yaml"
FIT_RESULT_FILE = "fit_result.json"
CHECKPOINT_DIR = "checkpoints"
NAMED_CHECKPOINTS = ("best", "last")
# What a run directory holds; anything else in --out is a user's file that fit refuses to write beside or replace.
RUN_ENTRIES = (FIT_CONFIG_FILE, FIT_RESULT_FILE, CHECKPOINT_DIR, "logs", "tensorboard")
MODULE_PREFIX = "model."  # the LightningModule holds the RankingModel as `model`


@dataclass
class RunRecord:
    """RUN/fit_config.yaml: what a run was trained on and with."""

    data: str
    dataset_hash: str
    model: ModelConfig
    trainer: TrainerConfig


@dataclass
class FitResult:
    """RUN/fit_result.json, written by rank 0 when `fit` ends. The fields after `log_dir` came later: runs fitted
    before them read back with None."""

    best_checkpoint: str
    last_checkpoint: str
    best_val_auc: float | None
    log_dir: str
    best_position: CheckpointPosition | None = None
    last_position: CheckpointPosition | None = None
    started_at: str | None = None  # ISO 8601, UTC: this `fit` invocation (a resumed run: since the resume)
    finished_at: str | None = None
    wall_seconds: float | None = None
    resumed_from: str | None = None  # the --resume checkpoint of this invocation
    init_from: str | None = None  # the --init-from checkpoint this run was warm-started from (absolute path)
    provenance: Provenance | None = None
    # the validation metric that picked best_checkpoint (trainer.monitor: val/auc, val/logloss or val/scenario_auc;
    # None in runs fitted before it could be chosen: val/auc) and its value there. best_val_auc above is the overall
    # validation AUC of best_checkpoint, whatever picked it.
    monitor: str | None = None
    best_score: float | None = None
    precision: PrecisionChoice | None = None  # what trained (trainer.precision resolved: `auto` says why)


@dataclass
class TrainedRun:
    """A run directory read back: where it is, and its record."""

    run_dir: Path
    record: RunRecord

    @property
    def data_dir(self) -> Path:
        return Path(self.record.data)

    @property
    def model(self) -> ModelConfig:
        return self.record.model


def _write_text(path: Path, text: str) -> None:
    with staged_file(path, overwrite=True) as tmp:
        tmp.write_text(text)


def write_run_record(run_dir: Path, data_dir: Path, dataset_hash: str, config: FitConfig) -> None:
    record = RunRecord(str(data_dir), dataset_hash, config.model, config.trainer)
    _write_text(run_dir / FIT_CONFIG_FILE, yaml.safe_dump(to_dict(record), sort_keys=False))


def write_fit_result(run_dir: Path, result: FitResult) -> None:
    _write_text(run_dir / FIT_RESULT_FILE, json.dumps(to_dict(result), indent=2) + "\n")


def read_fit_result(run_dir: str | Path) -> FitResult | None:
    """RUN/fit_result.json, or None while the run has not finished (or failed)."""
    path = Path(run_dir) / FIT_RESULT_FILE
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    return from_dict(FitResult, raw, str(path))


def read_run(run_dir: str | Path) -> TrainedRun:
    run_dir = Path(run_dir)
    path = run_dir / FIT_CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{run_dir}: no {FIT_CONFIG_FILE}; give the --out directory of `msit-rec fit`")
    return TrainedRun(run_dir, from_dict(RunRecord, read_yaml(path), str(path)))


def checkpoint_path(run_dir: Path, name: str) -> Path:
    return run_dir / CHECKPOINT_DIR / f"{name}.ckpt"


def checkpoint_position(ckpt_dir: str | Path) -> CheckpointPosition | None:
    """Epoch and global step `ckpt_dir` was saved at, from its small trainer_state.pt alone (read as plain data; the
    directory is not hashed again: callers pass one they just wrote or verified). None when that is not readable."""
    try:
        state = read_trainer_state(ckpt_dir)
        return CheckpointPosition(epoch=int(state["epoch"]), global_step=int(state["global_step"]))
    except (DataError, KeyError, TypeError, ValueError):
        return None


def resolve_checkpoint(run: TrainedRun, checkpoint: str) -> Path:
    """`best`/`last` → RUN/checkpoints/{best,last}.ckpt; anything else is a checkpoint directory path."""
    path = checkpoint_path(run.run_dir, checkpoint) if checkpoint in NAMED_CHECKPOINTS else Path(checkpoint)
    if not path.is_dir():
        raise DataError(f"checkpoint {path} (run {run.run_dir}, --checkpoint {checkpoint}): no such directory")
    return check_checkpoint_dir(path)


def check_dataset(run: TrainedRun, meta: DatasetMeta, data_dir: Path) -> None:
    """DataError unless `meta` is the run's examples, or examples prepared from them with `prepare --vocab-from`
    (then the run scores ids it never saw as out-of-vocabulary, as serving it would: see load_model)."""
    if not meta.descends_from(run.record.dataset_hash):
        raise DataError(
            f"{data_dir / 'dataset.json'} has content_hash {meta.content_hash!r}, but {run.run_dir / FIT_CONFIG_FILE} "
            f"was trained on dataset_hash {run.record.dataset_hash!r}: use the dataset the run was trained on"
        )


def load_model(run: TrainedRun, checkpoint: Path, meta: DatasetMeta, device: torch.device) -> RankingModel:
    """A plain (unsharded) RankingModel on `device` with the checkpoint's weights, in eval mode."""
    try:
        saved = load_unsharded_state_dict(checkpoint)
    except (RuntimeError, OSError, ValueError, EOFError, KeyError, pickle.UnpicklingError) as exc:
        raise DataError(f"checkpoint {checkpoint}: unreadable ({type(exc).__name__}: {exc})") from None
    state = {key.removeprefix(MODULE_PREFIX): value for key, value in saved.items() if key.startswith(MODULE_PREFIX)}
    model = RankingModel(meta, run.model, device=device)
    state.update(model.absent_from_older_checkpoints(set(state)))
    if meta.content_hash != run.record.dataset_hash:
        state = _oov_for_new_ids(state, model)
    check_state_matches({k: v.shape for k, v in state.items()}, {k: v.shape for k, v in model.state_dict().items()},
                        checkpoint)
    model.load_state_dict(state)
    return model.eval()


def _oov_for_new_ids(state: dict[str, torch.Tensor], model: RankingModel) -> dict[str, torch.Tensor]:
    """The run's tables grown to the model's (built from a descendant dataset): every row after the run's own is its
    out-of-vocabulary row, so ids added since the run was trained score exactly as the run would serve them."""
    expected = model.state_dict()
    grown = dict(state)
    for key in table_parameters(model):
        saved, shape = state.get(key), expected[key].shape
        if saved is not None and saved.shape[0] < shape[0] and saved.shape[1:] == shape[1:]:
            extra = saved[OOV_INDEX].expand(shape[0] - saved.shape[0], *saved.shape[1:])
            grown[key] = torch.cat([saved, extra])
    return grown
