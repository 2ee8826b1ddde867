"""`msit-rec fit`: train a model variant on a prepared dataset, from one CPU process to many GPUs/hosts.

All checks that can fail (config keys, model/dataset compatibility, devices, the output directory, the checkpoint
to resume from) run before any process starts or anything is written. Outputs under `out_dir`:
`checkpoints/best.ckpt` (by validation AUC) and `checkpoints/last.ckpt` (sharded DCP directories, each swapped
into place only when complete), `fit_config.yaml`, `fit_result.json`, CSV and TensorBoard logs.

An existing run is never retrained silently: `resume` continues it from a checkpoint (which must be complete,
intact, and trained on the same examples), `overwrite` replaces it — the old run is set aside as a hidden
sibling until the new fit has finished, and put back if the new one fails before its first checkpoint (after that,
the failed run stays resumable and the old one moves to a visible `OUT.replaced-TIME` sibling).
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from msit_rec.config import to_dict
from msit_rec.data.spec import DatasetMeta
from msit_rec.errors import ConfigError, DataError
from msit_rec.fit_config import FitConfig, ModelConfig
from msit_rec.host import is_launching_process, tune_glibc_malloc
from msit_rec.model import RankingModel
from msit_rec.outputs import OLD_TAG, check_replaceable_dir, replace_dir, sibling
from msit_rec.run_dir import (
    CHECKPOINT_DIR,
    RUN_ENTRIES,
    FitResult,
    checkpoint_path,
    write_fit_result,
    write_run_record,
)
from msit_rec.train.checkpoint import (
    DATASET_HASH_KEY,
    check_checkpoint_dir,
    check_state_matches,
    checkpoint_shapes,
    load_trainer_state,
)
from msit_rec.train.module import ExamplesDataModule, RankingModule
from msit_rec.train.progress import StderrProgressBar
from msit_rec.train.strategy import TorchRecStrategy, check_devices

log = logging.getLogger(__name__)


def check_model_fits_dataset(meta: DatasetMeta, model: ModelConfig) -> RankingModel:
    """Build the model on the meta device once: shape or table mismatches surface here, before any process starts."""
    return RankingModel(meta, model, device=torch.device("meta"))


def check_resumable(ckpt_dir: Path, meta: DatasetMeta, model: RankingModel) -> None:
    """DataError unless `ckpt_dir` is a complete, intact checkpoint of this model trained on these examples."""
    check_checkpoint_dir(ckpt_dir)
    saved_hash = load_trainer_state(ckpt_dir).get(DATASET_HASH_KEY)
    if saved_hash != meta.content_hash:
        raise DataError(
            f"--resume {ckpt_dir}: trained on examples with content_hash {saved_hash!r}, but --data has "
            f"{meta.content_hash!r} (re-prepared?); resume needs the same examples — start a new run instead"
        )
    expected = {f"model.{key}": value.shape for key, value in model.state_dict().items()}
    check_state_matches(checkpoint_shapes(ckpt_dir), expected, ckpt_dir)


def _check_out_dir(out_dir: Path, resume: Path | None, overwrite: bool) -> None:
    if resume is not None and overwrite:
        raise ConfigError("--resume continues a run and --overwrite replaces it: pass one of them")
    if resume is not None and out_dir.resolve() in resume.resolve().parents:
        return  # continues its own run in place: files beside the run are not at risk
    check_replaceable_dir(out_dir, overwrite=True, entries=RUN_ENTRIES)  # only a user's own files are refused here
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ConfigError(
            f"--out {out_dir}: holds a run already; pass --resume {checkpoint_path(out_dir, 'last')} to "
            f"continue it, or --overwrite to replace it (a --resume from another run's checkpoint needs a new "
            f"or empty --out)"
        )


def fit(
    config: FitConfig,
    data_dir: str | Path,
    out_dir: str | Path,
    resume: str | Path | None = None,
    overwrite: bool = False,
) -> FitResult:
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    resume = Path(resume) if resume is not None else None
    meta = DatasetMeta.load(data_dir)
    model = check_model_fits_dataset(meta, config.model)
    t = config.trainer
    check_devices(t.accelerator, t.devices)
    if not is_launching_process():  # a rank started by the launcher: the first process has checked and set up
        return _train(config, meta, data_dir, out_dir, resume)
    _check_out_dir(out_dir, resume, overwrite)
    if resume is not None:
        check_resumable(resume, meta, model)
    set_aside = None
    if overwrite and out_dir.is_dir() and any(out_dir.iterdir()):
        set_aside = sibling(out_dir, OLD_TAG)
        out_dir.rename(set_aside)
    created = not out_dir.exists()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_run_record(out_dir, data_dir, meta.content_hash, config)
        result = _train(config, meta, data_dir, out_dir, resume)
    except BaseException:
        _after_failure(out_dir, set_aside, created)
        raise
    if set_aside is not None:
        shutil.rmtree(set_aside, ignore_errors=True)
    return result


def _after_failure(out_dir: Path, set_aside: Path | None, created: bool) -> None:
    """Keep whatever can be resumed: a failed run with a checkpoint stays (the run it replaced moves to a visible
    sibling, named in the log); one without goes, and the replaced run comes back."""
    if any((out_dir / CHECKPOINT_DIR).glob("*.ckpt")):
        if set_aside is not None:
            kept = out_dir.with_name(f"{out_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
            set_aside.rename(kept)
            log.warning("the run --overwrite replaced is kept in %s; the failed run's checkpoints are in %s",
                        kept, out_dir)
    elif set_aside is not None:
        replace_dir(set_aside, out_dir)
    elif created:
        shutil.rmtree(out_dir, ignore_errors=True)  # nothing worth keeping: leave no half-made run behind


def _train(config: FitConfig, meta: DatasetMeta, data_dir: Path, out_dir: Path, resume: Path | None) -> FitResult:
    t = config.trainer
    if t.tune_malloc:
        tune_glibc_malloc()
    pl.seed_everything(t.seed, workers=True, verbose=False)
    best = ModelCheckpoint(
        dirpath=out_dir / CHECKPOINT_DIR, filename="best", monitor="val/auc", mode="max", save_top_k=1,
        enable_version_counter=False,
    )
    # Lightning's save_last rewrites `last` only in epochs where the monitored metric improved: keep the latest
    # state with a checkpoint of its own (no monitor = the most recent epoch)
    last = ModelCheckpoint(
        dirpath=out_dir / CHECKPOINT_DIR, filename="last", save_top_k=1, every_n_epochs=1, enable_version_counter=False
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
        callbacks=[best, last, EarlyStopping(monitor="val/auc", mode="max", patience=t.early_stopping_patience),
                   *([StderrProgressBar()] if t.progress_bar else [])],  # bars on stderr, results on stdout
    )
    hyperparameters = {**to_dict(config), "data": {"dir": str(data_dir), "content_hash": meta.content_hash}}
    for logger in trainer.loggers:  # hparams.yaml and TensorBoard's HPARAMS tab: what a run is, next to its curves
        logger.log_hyperparams(hyperparameters)
    module = RankingModule(meta, config.model, t.optim)
    data = ExamplesDataModule(data_dir, t.batch_size, t.eval_batch_size, t.num_workers, t.seed)
    trainer.fit(module, datamodule=data, ckpt_path=str(resume) if resume is not None else None)
    best_score = best.best_model_score
    result = FitResult(
        best_checkpoint=str(best.best_model_path),
        last_checkpoint=str(last.best_model_path),
        best_val_auc=float(best_score) if best_score is not None else None,
        log_dir=str(out_dir / "logs"),
    )
    if trainer.is_global_zero:
        write_fit_result(out_dir, result)
    return result
