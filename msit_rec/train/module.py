"""LightningModule and LightningDataModule for the ranking model.

The module holds the RankingModel (tables on the meta device; TorchRecStrategy shards them), a weighted BCE loss
(padding rows of keep-all evaluation batches have weight 0), exact validation metrics over all ranks, overall and per
scenario (msit_rec/train/val_metrics.py: every rank's rows are gathered, per-rank AUCs are never averaged), and the
dense optimizer with its LR schedule.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import LambdaLR

from msit_rec.data.batch import Batch
from msit_rec.data.loader import ExamplesDataset, make_loader
from msit_rec.data.spec import DatasetMeta
from msit_rec.errors import TrainingError
from msit_rec.fit_config import ModelConfig, OptimConfig
from msit_rec.model import RankingModel
from msit_rec.train.checkpoint import DATASET_HASH_KEY
from msit_rec.train.optim import dense_param_groups
from msit_rec.train.val_metrics import ValidationMetrics


def lr_factor(step: int, total_steps: int, config: OptimConfig) -> float:
    """Linear warm-up, then constant or cosine decay to 10 % of the base LR over `total_steps`."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant" or total_steps <= config.warmup_steps:
        return 1.0
    progress = min(1.0, (step - config.warmup_steps) / (total_steps - config.warmup_steps))
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


class RankingModule(pl.LightningModule):
    def __init__(self, meta: DatasetMeta, model_config: ModelConfig, optim: OptimConfig) -> None:
        super().__init__()
        self.model = RankingModel(meta, model_config)
        self.optim = optim
        self.dataset_hash = meta.content_hash
        self.val_metrics = ValidationMetrics(meta.scenarios)

    def forward(self, batch: Batch) -> torch.Tensor:  # [B] logits
        return self.model(batch)

    def _weighted_loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        losses = F.binary_cross_entropy_with_logits(logits, batch.label, reduction="none")  # [B]
        return (losses * batch.weight).sum() / batch.weight.sum().clamp(min=1.0)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        loss = self._weighted_loss(self(batch), batch)
        self._stop_on_non_finite(loss)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch.batch_size)
        return loss

    def _stop_on_non_finite(self, loss: torch.Tensor) -> None:
        """Stop before a NaN/inf loss reaches the weights (and every later checkpoint), on every rank at once."""
        bad = (~torch.isfinite(loss.detach())).float()
        if self.trainer.world_size > 1:  # one rank's bad batch stops all: a lone raise would leave the rest waiting
            bad = self.trainer.strategy.reduce(bad, reduce_op="sum")
        ranks = int(bad.item())
        if ranks > 0:
            raise TrainingError(
                f"training loss is not finite (nan/inf on {ranks} of {self.trainer.world_size} process(es)) at step "
                f"{self.trainer.global_step} "
                f"(epoch {self.current_epoch}); the weights were not updated with it. Lower trainer.optim.dense_lr "
                f"or sharding.embedding_lr, or check the examples' numeric features"
            )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[DATASET_HASH_KEY] = self.dataset_hash  # resume refuses examples the run was not trained on

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        logits = self(batch)  # [B]
        real = batch.weight > 0
        self.val_metrics.update(logits[real], batch.label[real], batch.scenario[real], batch.user_id[real])

    def on_validation_epoch_end(self) -> None:
        """Logs val/auc, val/logloss, val/gauc, val/scenario_auc and val/auc_<scenario>, val/gauc_<scenario>."""
        # compute() gathered every rank's rows, so the values are the same everywhere: syncing averages equals
        values = self.val_metrics.compute()
        self.val_metrics.reset()
        for name, value in values.items():
            self.log(f"val/{name}", value, prog_bar=name in ("auc", "logloss"), sync_dist=True)

    def configure_optimizers(self) -> Any:
        groups = dense_param_groups(self, self.model.age_profile, self.optim.dense_lr, self.optim.recency_lr_scale)
        optimizer = torch.optim.AdamW(groups, lr=self.optim.dense_lr, weight_decay=self.optim.weight_decay)
        total = int(self.trainer.estimated_stepping_batches)
        schedule = LambdaLR(optimizer, lambda step: lr_factor(step, total, self.optim))
        # msit_rec/train/monitoring.py's DenseLearningRate logs each group's rate as train/lr_<group name>
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": schedule, "interval": "step", "name": "train/lr_dense"}}


class ExamplesDataModule(pl.LightningDataModule):
    """Per-rank loaders of a prepared dataset: training drops the ragged tail so every rank runs the same number
    of batches (DMP hangs otherwise); validation keeps every row exactly once (padding rows carry weight 0)."""

    def __init__(
        self, root: str | Path, batch_size: int, eval_batch_size: int, num_workers: int, seed: int
    ) -> None:
        super().__init__()
        self.root = Path(root)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.seed = seed
        self._train: ExamplesDataset | None = None

    def _dataset(self, split: str, batch_size: int, train: bool) -> ExamplesDataset:
        return ExamplesDataset(
            self.root, split, batch_size, rank=self.trainer.global_rank, world_size=self.trainer.world_size,
            seed=self.seed, shuffle=train, drop_last=train,
        )

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        self._train = self._dataset("train", self.batch_size, train=True)
        self._train.set_epoch(self.trainer.current_epoch)
        return make_loader(self._train, num_workers=self.num_workers)

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        return make_loader(self._dataset("valid", self.eval_batch_size, train=False), num_workers=self.num_workers)

    def test_dataloader(self) -> torch.utils.data.DataLoader:
        return make_loader(self._dataset("test", self.eval_batch_size, train=False), num_workers=self.num_workers)
