"""`msit-rec fit`: train a model variant on a prepared dataset, from one CPU process to many GPUs/hosts.

All checks that can fail (config keys, model/dataset compatibility, devices, the output directory, the checkpoint
to resume from) run before any process starts or anything is written. Outputs under `out_dir`:
`checkpoints/best.ckpt` (by `trainer.monitor`: validation AUC unless chosen otherwise) and `checkpoints/last.ckpt`
(sharded DCP directories, each swapped into place only when complete), `fit_config.yaml`, `fit_result.json` (with
the epoch and step of both checkpoints, the wall time and the provenance: versions, git commit, host), CSV and
TensorBoard logs (msit_rec/train/monitoring.py).

An existing run is never retrained silently: `resume` continues it from a checkpoint (which must be complete,
intact, and trained on the same examples), `overwrite` replaces it — the old run is set aside as a hidden
sibling until the new fit has finished, and put back if the new one fails before its first checkpoint (after that,
the failed run stays resumable and the old one moves to a visible `OUT.replaced-TIME` sibling).
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from msit_rec.config import to_dict
from msit_rec.data.loader import batches_per_rank
from msit_rec.data.spec import DatasetMeta
from msit_rec.errors import ConfigError, DataError
from msit_rec.fit_config import FitConfig, ModelConfig, TrainerConfig
from msit_rec.host import is_launching_process, tune_glibc_malloc
from msit_rec.model import RankingModel
from msit_rec.outputs import OLD_TAG, check_replaceable_dir, replace_dir, sibling
from msit_rec.provenance import collect, utc_now
from msit_rec.run_dir import (
    CHECKPOINT_DIR,
    RUN_ENTRIES,
    FitResult,
    checkpoint_path,
    checkpoint_position,
    write_fit_result,
    write_run_record,
)
from msit_rec.train.auto_precision import check_precision, choose_precision
from msit_rec.train.checkpoint import (
    DATASET_HASH_KEY,
    check_checkpoint_dir,
    check_state_matches,
    checkpoint_shapes,
    load_trainer_state,
)
from msit_rec.train.module import ExamplesDataModule, RankingModule
from msit_rec.train.monitoring import (
    MONITORED,
    BestCheckpoint,
    DenseLearningRate,
    ExamplesPerSecond,
    log_interval,
    train_steps_per_epoch,
)
from msit_rec.train.optim import dense_param_groups
from msit_rec.train.progress import StderrProgressBar
from msit_rec.train.strategy import DENSE_PARAM_GROUPS_KEY, TorchRecStrategy, check_devices, check_launch
from msit_rec.train.warm_start import check_init_from_flags, check_warm_startable, resolve_init_from

log = logging.getLogger(__name__)


def check_model_fits_dataset(meta: DatasetMeta, model: ModelConfig) -> RankingModel:
    """Build the model on the meta device once: shape or table mismatches surface here, before any process starts."""
    return RankingModel(meta, model, device=torch.device("meta"))


def check_resumable(ckpt_dir: Path, meta: DatasetMeta, model: RankingModel) -> None:
    """DataError unless `ckpt_dir` is a complete, intact checkpoint of this model trained on these examples."""
    check_checkpoint_dir(ckpt_dir)
    trainer_state = load_trainer_state(ckpt_dir)
    saved_hash = trainer_state.get(DATASET_HASH_KEY)
    if saved_hash != meta.content_hash:
        raise DataError(
            f"--resume {ckpt_dir}: trained on examples with content_hash {saved_hash!r}, but --data has "
            f"{meta.content_hash!r} (re-prepared?); resume needs the same examples — to train on new examples start a "
            f"new run with --init-from {ckpt_dir} (prepare them with --vocab-from <the run's examples>)"
        )
    expected = {f"model.{key}": value.shape for key, value in model.state_dict().items()}
    check_state_matches(checkpoint_shapes(ckpt_dir), expected, ckpt_dir)
    saved_groups = trainer_state.get(DENSE_PARAM_GROUPS_KEY)
    groups = dense_param_groups(model, model.age_profile, 1.0, 1.0)
    if saved_groups is not None and len(saved_groups) != len(groups):  # its schedule could not be restored
        raise DataError(
            f"--resume {ckpt_dir}: its dense optimizer has {len(saved_groups)} parameter group(s), this model trains "
            f"{len(groups)} ({', '.join(group['name'] for group in groups)}) — msit runs written before the gate's age "
            f"profile got its own learning rate (trainer.optim.recency_lr_scale) have one; continue it as a new run "
            f"with --init-from {ckpt_dir} instead"
        )


def steps_per_epoch(meta: DatasetMeta, t: TrainerConfig) -> int:
    """Training batches per epoch on every rank: the train loader's length (ExamplesDataModule) under
    `limit_train_batches`."""
    batches = batches_per_rank(meta.splits["train"].rows, t.devices * t.num_nodes, t.batch_size, drop_last=True)
    return train_steps_per_epoch(batches, t.limit_train_batches)


def check_val_check_interval(meta: DatasetMeta, t: TrainerConfig) -> None:
    """ConfigError for a batch count `val_check_interval` beyond an epoch (Lightning's own error, but raised before
    any process starts)."""
    steps = steps_per_epoch(meta, t)
    if isinstance(t.val_check_interval, int) and t.val_check_interval > steps:
        raise ConfigError(
            f"trainer.val_check_interval={t.val_check_interval}: more than the {steps} training batches of an epoch; "
            f"give at most {steps}, or a fraction of an epoch such as 0.5"
        )


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
    init_from: str | Path | None = None,
) -> FitResult:
    """`init_from`: a run directory or checkpoint to warm-start from (msit_rec/train/warm_start.py)."""
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    resume = Path(resume) if resume is not None else None
    init_from = resolve_init_from(init_from) if init_from is not None else None
    meta = DatasetMeta.load(data_dir)
    model = check_model_fits_dataset(meta, config.model)
    t = config.trainer
    check_devices(t.accelerator, t.devices)
    check_precision(t.precision, t.accelerator)
    check_launch(t.devices, t.num_nodes)  # under torchrun: its --nproc_per_node and --nnodes
    check_val_check_interval(meta, t)
    if not is_launching_process():  # a rank started by the launcher: the first process has checked and set up
        return _train(config, meta, data_dir, out_dir, resume, init_from)
    check_init_from_flags(init_from, resume, out_dir)
    _check_out_dir(out_dir, resume, overwrite)
    if resume is not None:
        check_resumable(resume, meta, model)
    if init_from is not None:
        check_warm_startable(init_from, meta, data_dir, model)
    set_aside = None
    if overwrite and out_dir.is_dir() and any(out_dir.iterdir()):
        set_aside = sibling(out_dir, OLD_TAG)
        out_dir.rename(set_aside)
    created = not out_dir.exists()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_run_record(out_dir, data_dir, meta.content_hash, config)
        result = _train(config, meta, data_dir, out_dir, resume, init_from)
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


def _train(
    config: FitConfig, meta: DatasetMeta, data_dir: Path, out_dir: Path, resume: Path | None, init_from: Path | None
) -> FitResult:
    t = config.trainer
    started_at, start = utc_now(), time.perf_counter()
    provenance = collect()  # now: the code this process runs, not what the checkout holds when training ends
    if t.tune_malloc:
        tune_glibc_malloc()
    pl.seed_everything(t.seed, workers=True, verbose=False)
    monitored, mode = MONITORED[t.monitor]
    precision = choose_precision(t.precision, t.accelerator)
    log.info("precision %s (%s)", precision.precision, precision.reason)
    best = BestCheckpoint(out_dir / CHECKPOINT_DIR, t.monitor)
    # Lightning's save_last rewrites `last` only in epochs where the monitored metric improved: keep the latest
    # state with a checkpoint of its own (no monitor = the most recent epoch)
    last = ModelCheckpoint(  # at the end of every training epoch: with val_check_interval < 1 the last batches of
        # an epoch come after its last validation, and an unmonitored checkpoint would otherwise save at validation
        dirpath=out_dir / CHECKPOINT_DIR, filename="last", save_top_k=1, every_n_epochs=1, enable_version_counter=False,
        save_on_train_epoch_end=True,
    )
    trainer = pl.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=TorchRecStrategy(t.sharding, init_from=init_from),
        precision=precision.precision,
        deterministic="warn" if t.deterministic else None,  # "warn": ops with no deterministic kernel still run
        max_epochs=t.max_epochs,
        max_steps=t.max_steps,
        limit_train_batches=t.limit_train_batches,
        limit_val_batches=t.limit_val_batches,
        log_every_n_steps=_log_interval(meta, t),
        val_check_interval=t.val_check_interval,
        reload_dataloaders_every_n_epochs=1,  # a fresh per-epoch shuffle (seed, epoch) for the train loader
        use_distributed_sampler=False,  # the loader deals row groups to ranks itself
        num_sanity_val_steps=0,
        enable_progress_bar=t.progress_bar,
        enable_model_summary=False,
        default_root_dir=out_dir,
        logger=[CSVLogger(out_dir, name="logs"), TensorBoardLogger(out_dir, name="tensorboard")],
        callbacks=[best, last, EarlyStopping(monitor=monitored, mode=mode, patience=t.early_stopping_patience),
                   DenseLearningRate(), ExamplesPerSecond(),
                   *([StderrProgressBar()] if t.progress_bar else [])],  # bars on stderr, results on stdout
    )
    hyperparameters = {**to_dict(config), "data": {"dir": str(data_dir), "content_hash": meta.content_hash},
                       **({"init_from": str(init_from)} if init_from is not None else {})}
    for logger in trainer.loggers:  # hparams.yaml and TensorBoard's HPARAMS tab: what a run is, next to its curves
        logger.log_hyperparams(hyperparameters)
    module = RankingModule(meta, config.model, t.optim)
    data = ExamplesDataModule(data_dir, t.batch_size, t.eval_batch_size, t.num_workers, t.seed)
    trainer.fit(module, datamodule=data, ckpt_path=str(resume) if resume is not None else None)
    best_score = best.best_model_score
    result = FitResult(
        best_checkpoint=str(best.best_model_path),
        last_checkpoint=str(last.best_model_path),
        best_val_auc=_finite(best.best_val_metrics.get("val/auc")),
        log_dir=str(out_dir / "logs"),
        resumed_from=str(resume) if resume is not None else None,
        init_from=str(init_from.resolve()) if init_from is not None else None,
        monitor=monitored,
        best_score=_finite(best_score),
        precision=precision,
    )
    if trainer.is_global_zero:
        result.best_position = checkpoint_position(best.best_model_path) if best.best_model_path else None
        result.last_position = checkpoint_position(last.best_model_path) if last.best_model_path else None
        result.started_at, result.finished_at = started_at, utc_now()
        result.wall_seconds = round(time.perf_counter() - start, 3)
        result.provenance = provenance
        write_fit_result(out_dir, result)
    return result


def _log_interval(meta: DatasetMeta, t: TrainerConfig) -> int:
    """`trainer.log_every_n_steps`, lowered to the steps of an epoch when an epoch has fewer (said once)."""
    steps = steps_per_epoch(meta, t)
    interval = log_interval(t.log_every_n_steps, steps)
    if interval != t.log_every_n_steps:
        log.info("an epoch has %d training step(s), fewer than trainer.log_every_n_steps=%d: logging every %d step(s)",
                 steps, t.log_every_n_steps, interval)
    return interval


def _finite(value: float | torch.Tensor | None) -> float | None:
    """A number for fit_result.json: None for none, NaN or inf (an undefined AUC; no finite monitored value)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None
