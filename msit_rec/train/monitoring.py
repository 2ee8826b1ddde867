"""Watching a fit train: the monitored metric that picks `best.ckpt`, the logged training speed, the logging interval.

- `MONITORED`: `trainer.monitor` → (the logged validation metric, which way is better), for `best.ckpt` and early
  stopping alike.
- `BestCheckpoint`: Lightning's ModelCheckpoint for `best.ckpt` that also keeps every validation metric of the
  validation it saved at (so fit_result.json holds the best checkpoint's validation AUC whatever picked it).
- `ExamplesPerSecond`: `train/examples_per_sec` at every logging step.
- `DenseLearningRate`: `train/lr_dense`, the dense AdamW's scheduled learning rate, at every logging step (and
  `train/lr_recency`, the group of msit's gate age profile: OptimConfig.recency_lr_scale × the dense one). The fused
  embedding optimizer's rate is constant: `trainer.sharding.embedding_lr` in the logged hyper-parameters.
- `log_interval`: `trainer.log_every_n_steps`, lowered to the steps of an epoch when an epoch is shorter (Lightning
  would otherwise log no training step in such an epoch).
"""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint

from msit_rec.fit_config import Monitor

MONITORED: dict[Monitor, tuple[str, str]] = {
    "auc": ("val/auc", "max"),
    "logloss": ("val/logloss", "min"),
    "scenario_auc": ("val/scenario_auc", "max"),
}
_BEST_METRICS = "best_val_metrics"  # BestCheckpoint's entry in its checkpointed state


class BestCheckpoint(ModelCheckpoint):
    """`best.ckpt` by `monitor`; `best_val_metrics` holds the val/* metrics of the validation it was saved at."""

    def __init__(self, dirpath: Any, monitor: Monitor) -> None:
        key, mode = MONITORED[monitor]
        super().__init__(dirpath=dirpath, filename="best", monitor=key, mode=mode, save_top_k=1,
                         enable_version_counter=False)
        self.best_val_metrics: dict[str, float] = {}

    @property
    def state_key(self) -> str:
        # ModelCheckpoint's key: runs checkpointed before this subclass existed resume with their best score
        return "ModelCheckpoint" + super().state_key.removeprefix(type(self).__qualname__)

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        # before saving: the checkpoint's own copy of this callback's state names the metrics it was saved with
        self.best_val_metrics = {
            name: float(value) for name, value in trainer.callback_metrics.items() if name.startswith("val/")
        }
        super()._save_checkpoint(trainer, filepath)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), _BEST_METRICS: dict(self.best_val_metrics)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if state_dict.get("dirpath", self.dirpath) == self.dirpath:  # as ModelCheckpoint restores its best score
            self.best_val_metrics = dict(state_dict.get(_BEST_METRICS, {}))


class ExamplesPerSecond(Callback):
    """Logs `train/examples_per_sec` at every logging step: the examples trained since the previous logging step
    over the time since then, validation time left out. Each rank measures its own rate; the logged value (rank 0's,
    loggers write on rank 0 only) is that rate × the world size — the ranks step in lockstep (every step's
    collectives wait for the slowest rank) on equal batch counts."""

    def __init__(self) -> None:
        self._start = 0.0
        self._examples = 0
        self._validation_start: float | None = None

    def _restart(self) -> None:
        self._start, self._examples = time.perf_counter(), 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restart()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._examples += batch.batch_size
        # the step metrics go to the loggers right after this hook when this is true (as in Lightning's own
        # ThroughputMonitor, which needs a full window of steps and logs validation batches as steps)
        if not trainer._logger_connector.should_update_logs:
            return
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()  # the steps' kernels are part of their time
        elapsed = time.perf_counter() - self._start
        if elapsed > 0:
            pl_module.log("train/examples_per_sec", self._examples * trainer.world_size / elapsed, on_step=True,
                          on_epoch=False)
        self._restart()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._validation_start = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._validation_start is not None:
            self._start += time.perf_counter() - self._validation_start
            self._validation_start = None


class DenseLearningRate(LearningRateMonitor):
    """Lightning's LearningRateMonitor, per logging step, of the scheduled optimizer only (the dense AdamW: one rate
    per parameter group, `train/lr_dense` and for msit `train/lr_recency`). Left to itself
    it would also log TorchRecStrategy's combined optimizer: the dense rate again and the fused embedding optimizer's
    constant one, as lr-StepAllCombinedOptimizer/pg1..pgN."""

    def __init__(self) -> None:
        super().__init__(logging_interval="step")

    def _find_names_from_optimizers(self, optimizers: list[Any], seen_optimizers: list[Any],
                                    seen_optimizer_types: Any) -> tuple[list[list[str]], list[Any]]:
        return [], []  # no optimizer without a schedule is logged

    def _add_suffix(self, name: str, param_groups: list[dict], param_group_index: int, use_names: bool = True) -> str:
        """`train/lr_<group>` for named groups (msit_rec/train/optim.py: dense_param_groups): `train/lr_dense`
        whether or not the recency group is there too, where Lightning would log `train/lr_dense/dense`."""
        group = param_groups[param_group_index].get("name")
        if group is None:
            return super()._add_suffix(name, param_groups, param_group_index, use_names)
        return f"train/lr_{group}"


def train_steps_per_epoch(batches: int, limit_train_batches: float) -> int:
    """The training batches of an epoch under `trainer.limit_train_batches` (an int: a count; a float: a fraction),
    as Lightning counts them."""
    if isinstance(limit_train_batches, int):
        return min(batches, limit_train_batches)
    return int(batches * limit_train_batches)


def log_interval(configured: int, steps_per_epoch: int) -> int:
    """`log_every_n_steps`, at most the steps of an epoch (and at least 1): Lightning logs training steps every
    `configured` steps counted over the whole run, so an epoch shorter than that may log none of its steps."""
    if configured <= 0:  # Lightning's "never log steps"
        return configured
    return max(1, min(configured, steps_per_epoch))
