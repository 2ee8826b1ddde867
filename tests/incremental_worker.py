"""Helpers of tests/test_incremental.py, and its 2-process warm start run as a script (Lightning re-launches it per
rank).

Usage: PYTHONPATH=<repo root> python tests/incremental_worker.py DAY2_EXAMPLES DAY1_EXAMPLES DAY1_RUN OUT_DIR
Fits `msit` on DAY2_EXAMPLES with --init-from DAY1_RUN on 2 gloo processes (TWO_PROCESS_SHARDING: grown tables
row-wise and column-wise), recording at step 0 the logits on DAY1_EXAMPLES' test rows and a checkpoint
(OUT_DIR/record/, see WarmStartRecorder).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import msit_rec.train.fit as fit_module
from msit_rec.config import apply_overrides, from_dict
from msit_rec.data.loader import ExamplesDataset, make_loader
from msit_rec.fit_config import FitConfig
from msit_rec.train.fit import fit
from msit_rec.train.module import RankingModule

# A few steps of a tiny model: what `fit --set ...` gives in tests/test_incremental.py.
TINY_RUN = (
    "model.tower_hidden=[16]",
    "model.attention_hidden=[8]",
    "trainer.batch_size=256",
    "trainer.eval_batch_size=4096",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=1",
    "trainer.progress_bar=false",
    "trainer.optim.warmup_steps=1",
)
# Grown tables split by rows and by columns (one column shard at this width), tables kept whole on either rank.
TWO_PROCESS_SHARDING = {"user": "row_wise", "item": "column_wise", "category": "table_wise", "brand": "table_wise",
                        "hour": "table_wise"}
START_LOGITS = "start_logits.pt"
START_CHECKPOINT = "start.ckpt"


def tiny_config(*overrides: str) -> FitConfig:
    """The config `msit-rec fit --set ...` gives for TINY_RUN and `overrides` (defaults otherwise)."""
    return from_dict(FitConfig, apply_overrides({"model": {}, "trainer": {}}, [*TINY_RUN, *overrides]), "fit")


class WarmStartRecorder(RankingModule):
    """RankingModule that, before its first training step (after the warm start), scores `probe_dir`'s test rows
    and saves a checkpoint of weights and optimizer state into `record_dir`. Class attributes configure it because
    `fit` builds the module itself."""

    record_dir: Path | None = None
    probe_dir: Path | None = None

    def on_train_start(self) -> None:
        if self.record_dir is None:
            return
        assert self.probe_dir is not None
        self.eval()
        logits, rows = [], []
        with torch.no_grad():  # every rank scores the same batches (a sharded forward is collective)
            for batch in make_loader(ExamplesDataset(self.probe_dir, "test", 4096)):
                real = batch.weight > 0
                logits.append(self(batch)[real].clone())
                rows.append(batch.row_index[real])
        self.train()
        self.record_dir.mkdir(parents=True, exist_ok=True)
        if self.global_rank == 0:
            torch.save({"logits": torch.cat(logits), "row_index": torch.cat(rows)}, self.record_dir / START_LOGITS)
        self.trainer.save_checkpoint(self.record_dir / START_CHECKPOINT)  # collective: every rank writes its shards


def recorder(record_dir: Path, probe_dir: Path) -> type[WarmStartRecorder]:
    return type("Recorder", (WarmStartRecorder,), {"record_dir": record_dir, "probe_dir": probe_dir})


def main(day2: Path, day1: Path, day1_run: Path, out: Path) -> None:
    fit_module.RankingModule = recorder(out / "record", day1)  # fit() builds the module by this name
    sharding = ", ".join(f"{table}: {kind}" for table, kind in TWO_PROCESS_SHARDING.items())
    config = tiny_config("trainer.devices=2", f"trainer.sharding.table_sharding={{{sharding}}}")
    fit(config, day2, out / "run", init_from=day1_run)


if __name__ == "__main__":
    main(*(Path(arg) for arg in sys.argv[1:5]))
