"""`msit-rec fit`: train a model variant on a prepared dataset, from one CPU process to many GPUs/hosts.

All checks that can fail (config keys, model/dataset compatibility, devices) run before the first step.
Outputs under `out_dir`: `checkpoints/best` (by validation AUC) and `checkpoints/last` (sharded DCP
directories), `fit_config.yaml`, CSV and TensorBoard logs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import torch
import yaml
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from msit_rec.config import to_dict
from msit_rec.data.spec import DatasetMeta
from msit_rec.errors import ConfigError
from msit_rec.host import tune_glibc_malloc
from msit_rec.model import ModelConfig, RankingModel
from msit_rec.train.module import ExamplesDataModule, OptimConfig, RankingModule
from msit_rec.train.sharding import ShardingConfig
from msit_rec.train.strategy import TorchRecStrategy, check_devices


@dataclass
class TrainerConfig:
    """Section `trainer` of configs/trainer/*.yaml."""

    accelerator: Literal["cpu", "gpu"] = "cpu"
    devices: int = 1
    num_nodes: int = 1
    max_epochs: int = 3
    max_steps: int = -1
    batch_size: int = 4096
    eval_batch_size: int = 8192
    num_workers: int = 0
    precision: Literal["32-true", "bf16-mixed", "16-mixed"] = "32-true"
    seed: int = 0
    # seeded runs repeat bit for bit: without it some CPU kernels of the model's backward differ in the last bit
    # between identical runs (measured), and the difference grows with training. False may be faster on GPU.
    deterministic: bool = True
    early_stopping_patience: int = 2
    tune_malloc: bool = True  # keep large freed blocks in glibc's heap (msit_rec/host.py): fewer page faults
    log_every_n_steps: int = 20
    limit_train_batches: int | float = 1.0
    limit_val_batches: int | float = 1.0
    progress_bar: bool = True
    optim: OptimConfig = field(default_factory=OptimConfig)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)

    def __post_init__(self) -> None:
        for name in ("devices", "num_nodes", "batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class FitConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


@dataclass
class FitResult:
    best_checkpoint: str
    last_checkpoint: str
    best_val_auc: float | None
    log_dir: str
    global_rank: int  # every process returns a result; only rank 0 should report it


def check_model_fits_dataset(meta: DatasetMeta, model: ModelConfig) -> None:
    """Build the model on the meta device once: shape or table mismatches surface here, before any process starts."""
    RankingModel(meta, model, device=torch.device("meta"))


def fit(config: FitConfig, data_dir: str | Path, out_dir: str | Path, resume: str | Path | None = None) -> FitResult:
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    meta = DatasetMeta.load(data_dir)
    check_model_fits_dataset(meta, config.model)
    t = config.trainer
    check_devices(t.accelerator, t.devices)
    if resume is not None and not Path(resume).is_dir():
        raise ConfigError(f"--resume {resume}: no checkpoint directory there")
    if t.tune_malloc:
        tune_glibc_malloc()
    pl.seed_everything(t.seed, workers=True, verbose=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "fit_config.yaml").write_text(
        yaml.safe_dump({"data": str(data_dir), "dataset_hash": meta.content_hash, **to_dict(config)}, sort_keys=False)
    )
    best = ModelCheckpoint(
        dirpath=out_dir / "checkpoints", filename="best", monitor="val/auc", mode="max", save_top_k=1,
        enable_version_counter=False,
    )
    # Lightning's save_last rewrites `last` only in epochs where the monitored metric improved: keep the latest
    # state with a checkpoint of its own (no monitor = the most recent epoch)
    last = ModelCheckpoint(
        dirpath=out_dir / "checkpoints", filename="last", save_top_k=1, every_n_epochs=1, enable_version_counter=False
    )
    trainer = pl.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=TorchRecStrategy(t.sharding),
        precision=t.precision,
        deterministic="warn" if t.deterministic else None,  # "warn": ops with no deterministic kernel still run
        max_epochs=t.max_epochs,
        max_steps=t.max_steps,
        limit_train_batches=t.limit_train_batches,
        limit_val_batches=t.limit_val_batches,
        log_every_n_steps=t.log_every_n_steps,
        reload_dataloaders_every_n_epochs=1,  # a fresh per-epoch shuffle (seed, epoch) for the train loader
        use_distributed_sampler=False,  # the loader deals row groups to ranks itself
        num_sanity_val_steps=0,
        enable_progress_bar=t.progress_bar,
        enable_model_summary=False,
        default_root_dir=out_dir,
        logger=[CSVLogger(out_dir, name="logs"), TensorBoardLogger(out_dir, name="tensorboard")],
        callbacks=[best, last, EarlyStopping(monitor="val/auc", mode="max", patience=t.early_stopping_patience)],
    )
    module = RankingModule(meta, config.model, t.optim)
    data = ExamplesDataModule(data_dir, t.batch_size, t.eval_batch_size, t.num_workers, t.seed)
    trainer.fit(module, datamodule=data, ckpt_path=str(resume) if resume is not None else None)
    best_score = best.best_model_score
    result = FitResult(
        best_checkpoint=str(best.best_model_path),
        last_checkpoint=str(last.best_model_path),
        best_val_auc=float(best_score) if best_score is not None else None,
        log_dir=str(out_dir / "logs"),
        global_rank=trainer.global_rank,
    )
    if trainer.is_global_zero:
        (out_dir / "fit_result.json").write_text(json.dumps(result.__dict__, indent=2) + "\n")
    return result
