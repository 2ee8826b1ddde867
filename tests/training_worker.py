"""Fit configs and a recording module shared by the tests that train, and tests/test_training.py's 2-process part
run as a script (Lightning re-launches it per rank).

Usage: PYTHONPATH=<repo root> python tests/training_worker.py DATA_DIR OUT_DIR ONE_PROCESS_CKPT
Trains `msit` with `msit_rec.train.fit.fit` on 2 gloo processes (forced mixed table placements), recording each
rank's losses, dense weights and logits on the probe batch (OUT_DIR/record/rank{r}.pt; the sharded checkpoints are
in OUT_DIR/run/checkpoints); then loads the checkpoint written by one process into 2 processes and writes its logits
on the probe batch (OUT_DIR/from_one_process.pt).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer

import msit_rec.train.fit as fit_module
from msit_rec.config import apply_overrides, from_dict, read_yaml
from msit_rec.data.batch import Batch
from msit_rec.data.loader import ExamplesDataset, make_loader
from msit_rec.data.spec import DatasetMeta
from msit_rec.fit_config import FitConfig
from msit_rec.train.fit import fit
from msit_rec.train.module import RankingModule
from msit_rec.train.strategy import TorchRecStrategy

REPO = Path(__file__).resolve().parents[1]
PROBE_ROWS = 256
# A few short epochs of a small model: what the CLI's `--set` would give (configs/trainer/cpu.yaml otherwise).
SMALL_RUN = (
    "model.tower_hidden=[64, 32]",
    "trainer.batch_size=256",
    "trainer.eval_batch_size=1024",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=8",
    "trainer.limit_val_batches=1",
    "trainer.log_every_n_steps=1",
    "trainer.progress_bar=false",
    "trainer.optim.warmup_steps=2",
)
# Every model-parallel placement kind at once on 2 processes (the planner places the other tables).
TWO_PROCESS_SHARDING = {"item": "row_wise", "category": "column_wise", "user": "table_wise"}
# configs/generate/transfer.yaml's budget (test_training's quality claim, test_explain): every variant 3 full epochs,
# same seed, same optimisers, no early stop; the one of benchmarks/bench_quality.py.
SAME_BUDGET = (
    "model.tower_hidden=[128, 64]", "trainer.batch_size=512", "trainer.max_epochs=3",
    "trainer.early_stopping_patience=3", "trainer.limit_train_batches=1.0", "trainer.limit_val_batches=1.0",
    "trainer.optim.dense_lr=0.003", "trainer.seed=0",
)


def fit_config(variant: str = "msit", overrides: tuple[str, ...] = ()) -> FitConfig:
    """The config `msit-rec fit --model configs/model/VARIANT.yaml --trainer configs/trainer/cpu.yaml --set ...`."""
    data = {
        "model": read_yaml(REPO / f"configs/model/{variant}.yaml")["model"],
        "trainer": read_yaml(REPO / "configs/trainer/cpu.yaml")["trainer"],
    }
    return from_dict(FitConfig, apply_overrides(data, [*SMALL_RUN, *overrides]), "fit")


def tiny_fit_config(variant: str) -> FitConfig:
    """A few steps of a tiny tower; validation on the whole valid split, so its AUC is an oracle for `evaluate`."""
    return from_dict(FitConfig, {
        "model": {"variant": variant, "attention_hidden": [8], "tower_hidden": [16]},
        "trainer": {"batch_size": 256, "eval_batch_size": 8192, "max_epochs": 1, "limit_train_batches": 12,
                    "limit_val_batches": 1.0, "progress_bar": False},
    }, "fit")


def probe_batch(data_dir: Path) -> Batch:
    """The first PROBE_ROWS validation rows, the same batch on every rank."""
    return next(iter(make_loader(ExamplesDataset(data_dir, "valid", PROBE_ROWS))))


def probe_logits(module: RankingModule, data_dir: Path) -> torch.Tensor:
    """Collective when sharded: every rank must call it."""
    was_training = module.training
    module.eval()
    with torch.no_grad():
        logits = module(probe_batch(data_dir)).clone()
    module.train(was_training)
    return logits


class RecordingModule(RankingModule):
    """RankingModule that keeps its training losses and, at the end of training, writes what a test compares.

    Class attributes configure it because `fit` builds the module itself: `record_dir` (None: write nothing),
    `data_dir` (for the probe batch), `stop_after_epochs` (None: never; else stop cleanly after that many epochs).
    """

    record_dir: Path | None = None
    data_dir: Path | None = None
    stop_after_epochs: int | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.losses: list[float] = []

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        self.losses.append(float(loss.detach()))
        return loss

    def on_train_epoch_end(self) -> None:
        if self.stop_after_epochs is not None and self.current_epoch + 1 >= self.stop_after_epochs:
            self.trainer.should_stop = True

    def on_train_end(self) -> None:
        if self.record_dir is None:
            return
        assert self.data_dir is not None
        dense = {k: v.detach().clone() for k, v in self.model.state_dict().items() if not k.startswith("embeddings.")}
        record = {"losses": self.losses, "dense": dense, "logits": probe_logits(self, self.data_dir)}
        self.record_dir.mkdir(parents=True, exist_ok=True)
        torch.save(record, self.record_dir / f"rank{self.global_rank}.pt")
        self.trainer.save_checkpoint(self.record_dir / "final.ckpt")  # collective: every rank writes its shards


def load_for_inference(
    data_dir: Path, ckpt: Path, config: FitConfig, devices: int, root: Path
) -> tuple[RankingModule, Trainer]:
    """A RankingModule sharded over `devices` processes with the weights of the sharded checkpoint `ckpt`."""
    module = RankingModule(DatasetMeta.load(data_dir), config.model, config.trainer.optim)
    trainer = Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=TorchRecStrategy(config.trainer.sharding),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        limit_predict_batches=1,
        default_root_dir=root,
    )
    loader = make_loader(ExamplesDataset(data_dir, "valid", PROBE_ROWS))  # the same batch on every rank
    trainer.predict(module, loader, ckpt_path=ckpt, return_predictions=False)
    return module, trainer


def main(data_dir: Path, out: Path, one_process_ckpt: Path) -> None:
    RecordingModule.record_dir, RecordingModule.data_dir = out / "record", data_dir
    fit_module.RankingModule = RecordingModule  # fit() builds the module by this name
    table_sharding = ",".join(f"{table}: {kind}" for table, kind in TWO_PROCESS_SHARDING.items())
    config = fit_config(overrides=("trainer.devices=2", f"trainer.sharding.table_sharding={{{table_sharding}}}"))
    fit(config, data_dir, out / "run")

    same_tables = fit_config(overrides=("trainer.devices=2",))  # the checkpoint's placement does not matter
    module, trainer = load_for_inference(data_dir, one_process_ckpt, same_tables, devices=2, root=out)
    logits = probe_logits(module, data_dir)
    if trainer.is_global_zero:
        torch.save(logits, out / "from_one_process.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
