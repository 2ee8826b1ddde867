"""2-process part of tests/test_strategy.py, run as a script so Lightning can re-launch it per rank.

Usage: PYTHONPATH=<repo root> python tests/strategy_worker.py OUT_DIR ONE_PROCESS_CKPT
Trains the toy model on 2 gloo processes with forced mixed sharding, writes per-rank losses and dense
weights, a final sharded checkpoint (OUT_DIR/ckpt2) and logits on a fixed batch; then loads the checkpoint
written by one process into 2 processes and writes its logits on the same batch.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from msit_rec.fit_config import ShardingConfig
from msit_rec.train.strategy import TorchRecStrategy
from tests.toy_model import ToyRecModule, batch_loader, make_batch

EVAL_BATCH = 999
# Every placement kind at once: the planner must honour each forced type (hist is left to the planner).
TWO_PROCESS_SHARDING = {"user": "table_wise", "item": "row_wise", "cat": "data_parallel"}


class LossRecorder(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def trainer(out: Path, **kwargs) -> Trainer:
    return Trainer(
        accelerator="cpu",
        devices=2,
        strategy=TorchRecStrategy(ShardingConfig(table_sharding=dict(TWO_PROCESS_SHARDING), embedding_lr=0.05)),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
        **kwargs,
    )


def logits_on_eval_batch(module: ToyRecModule) -> torch.Tensor:
    """Collective: both ranks run the same batch through the sharded model."""
    module.eval()
    with torch.no_grad():
        return module(make_batch(EVAL_BATCH)).clone()


def main(out: Path, one_process_ckpt: Path) -> None:
    seed_everything(0)
    module = ToyRecModule(dense_lr=0.02)
    recorder = LossRecorder()
    fit = trainer(
        out,
        max_epochs=4,
        num_sanity_val_steps=0,
        callbacks=[recorder, ModelCheckpoint(dirpath=out / "ckpts", monitor="val_loss", save_top_k=1, save_last=True)],
    )
    fit.fit(module, batch_loader(8), batch_loader(2, seed=1))
    rank = fit.global_rank
    torch.save(fit.strategy.table_placements, out / f"placements_rank{rank}.pt")
    torch.save(recorder.losses, out / f"losses_rank{rank}.pt")
    torch.save({k: v.detach().clone() for k, v in module.mlp.state_dict().items()}, out / f"dense_rank{rank}.pt")
    fit.save_checkpoint(out / "ckpt2")
    logits = logits_on_eval_batch(module)

    reloaded = ToyRecModule()
    trainer(out).predict(reloaded, batch_loader(2), ckpt_path=one_process_ckpt)
    reloaded_logits = logits_on_eval_batch(reloaded)
    if rank == 0:
        torch.save({"trained": logits, "from_one_process": reloaded_logits}, out / "logits.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
