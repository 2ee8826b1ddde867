"""Watching a fit train: per-scenario validation metrics at every validation, learning rate and examples/s in the CSV
log; `trainer.monitor` picking best.ckpt; `trainer.val_check_interval`; logging in epochs shorter than the logging
interval; the config errors of these keys.

Oracles: scikit-learn's AUC, logloss and a per-user loop for GAUC on the predictions of a plain model loaded from
the checkpoint; the CSV log itself for which validation best.ckpt came from; a scripted module whose AUC and
logloss disagree on the best validation.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from msit_rec.config import from_dict
from msit_rec.data.spec import DatasetMeta
from msit_rec.errors import ConfigError
from msit_rec.fit_config import FitConfig, OptimConfig
from msit_rec.run_dir import read_fit_result
from msit_rec.train.fit import fit
from msit_rec.train.monitoring import BestCheckpoint
from tests.logged_metrics import logged_rows, sklearn_validation_metrics, valid_predictions, validations
from tests.training_worker import tiny_fit_config

pytestmark = pytest.mark.usefixtures("in_process_launch_env")

EPOCHS, STEPS_PER_EPOCH = 2, 12  # tiny_fit_config's limit_train_batches
LOG_EVERY = 50  # more than the steps of an epoch


def watched_config(**trainer: Any) -> FitConfig:
    config = tiny_fit_config("msit")
    assert config.trainer.limit_train_batches == STEPS_PER_EPOCH
    return dataclasses.replace(config, trainer=dataclasses.replace(config.trainer, **trainer))


@pytest.fixture(scope="module")
def watched_run(small_examples: Path, tmp_path_factory: pytest.TempPathFactory, slow_setup: None) -> dict[str, Any]:
    """2 epochs of 12 steps, validated twice per epoch on the whole valid split, best.ckpt by logloss, logging every
    50 steps configured."""
    out = tmp_path_factory.mktemp("watched") / "run"
    config = watched_config(max_epochs=EPOCHS, monitor="logloss", val_check_interval=0.5, log_every_n_steps=LOG_EVERY)
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("msit_rec.train.fit")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        result = fit(config, small_examples, out)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return {"out": out, "result": result, "log": records, "scenarios": DatasetMeta.load(small_examples).scenarios}


def assert_metrics_equal(logged: dict[str, float], expected: dict[str, float], tol: float) -> None:
    for name, value in expected.items():
        assert logged[name] == pytest.approx(value, abs=tol), name


def test_every_validation_logs_per_scenario_metrics_equal_to_sklearn(watched_run: dict[str, Any]) -> None:
    """The last validation ran on the final weights (last.ckpt): its logged AUC, GAUC and logloss, overall and per
    scenario, are scikit-learn's on that checkpoint's predictions."""
    scenarios = watched_run["scenarios"]
    assert len(scenarios) >= 2
    rows = validations(watched_run["out"])
    expected = sklearn_validation_metrics(valid_predictions(watched_run["out"], "last"), scenarios)
    assert len(expected) == 4 + 2 * len(scenarios)
    for row in rows:  # every validation logs every metric
        assert set(expected) <= set(row)
    assert_metrics_equal(rows[-1], expected, tol=1e-6)


def test_monitor_logloss_picks_the_lowest_validation_logloss(watched_run: dict[str, Any]) -> None:
    rows = validations(watched_run["out"])
    lowest = min(rows, key=lambda row: row["val/logloss"])
    result = watched_run["result"]
    assert result.monitor == "val/logloss"
    assert result.best_score == pytest.approx(lowest["val/logloss"], abs=1e-12)
    assert result.best_val_auc == pytest.approx(lowest["val/auc"], abs=1e-12)  # the AUC of that same validation
    saved = json.loads((watched_run["out"] / "fit_result.json").read_text())
    assert saved["monitor"] == "val/logloss" and saved["best_score"] == result.best_score
    # best.ckpt holds the weights of that validation: its logloss on the valid split is the lowest logged
    best = sklearn_validation_metrics(valid_predictions(watched_run["out"], "best"), watched_run["scenarios"])
    assert_metrics_equal(lowest, best, tol=1e-6)


def test_val_check_interval_half_validates_twice_per_epoch(watched_run: dict[str, Any]) -> None:
    rows = validations(watched_run["out"])
    assert [int(row["epoch"]) for row in rows] == [0, 0, 1, 1]
    assert [int(row["step"]) for row in rows] == [5, 11, 17, 23]  # after steps 6, 12, 18 and 24 (0-based logging)


def test_epochs_shorter_than_the_logging_interval_still_log_training(watched_run: dict[str, Any]) -> None:
    """log_every_n_steps=50 over epochs of 12 steps: Lightning alone would log no training step in the first epoch
    (and warn); fit logs every 12 steps instead, says so once, and logs loss, examples/s and learning rate."""
    rows = logged_rows(watched_run["out"])
    train = [row for row in rows if "train/loss" in row]
    assert [int(row["step"]) for row in train] == [11, 23]
    assert all(row["train/examples_per_sec"] > 0 and math.isfinite(row["train/loss"]) for row in train)
    rates = [row for row in rows if "train/lr_dense" in row]
    assert len(rates) == EPOCHS and rates[0]["train/lr_dense"] > rates[1]["train/lr_dense"] > 0  # cosine decay
    ratios = [row["train/lr_recency"] / row["train/lr_dense"] for row in rates]  # msit: the age profile's own group
    assert ratios == pytest.approx([OptimConfig().recency_lr_scale] * EPOCHS, rel=1e-9)
    assert not [name for row in rows for name in row if "StepAllCombinedOptimizer" in name]
    shortened = [line for line in watched_run["log"] if "log_every_n_steps" in line]
    assert shortened == [(f"an epoch has {STEPS_PER_EPOCH} training step(s), fewer than trainer.log_every_n_steps="
                         f"{LOG_EVERY}: logging every {STEPS_PER_EPOCH} step(s)")]


# ---- which validation best.ckpt comes from, when AUC and logloss disagree -------------------------------------------

SCRIPT = [{"val/auc": 0.60, "val/logloss": 0.50, "val/scenario_auc": 0.50},
          {"val/auc": 0.55, "val/logloss": 0.30, "val/scenario_auc": 0.52},
          {"val/auc": 0.70, "val/logloss": 0.40, "val/scenario_auc": 0.58},
          {"val/auc": 0.65, "val/logloss": 0.45, "val/scenario_auc": 0.61}]


class ScriptedModule(pl.LightningModule):
    """Trains a scalar; its validations log the values of SCRIPT in turn."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.validation = 0

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return (self.weight - 1).pow(2).sum()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        pass

    def on_validation_epoch_end(self) -> None:
        self.log_dict(SCRIPT[self.validation], sync_dist=True)
        self.validation += 1

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize(("monitor", "best"), [("logloss", 1), ("auc", 2), ("scenario_auc", 3)])
def test_best_checkpoint_follows_the_monitor(monitor: str, best: int, tmp_path: Path) -> None:
    loader = torch.utils.data.DataLoader(torch.zeros(2, 1), batch_size=1)
    checkpoint = BestCheckpoint(tmp_path, monitor)  # type: ignore[arg-type]
    trainer = pl.Trainer(max_epochs=len(SCRIPT), callbacks=[checkpoint], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, accelerator="cpu", devices=1)
    trainer.fit(ScriptedModule(), loader, loader)
    assert checkpoint.best_val_metrics == pytest.approx(SCRIPT[best])
    assert float(checkpoint.best_model_score) == pytest.approx(SCRIPT[best][f"val/{monitor}"])
    saved = torch.load(tmp_path / "best.ckpt", weights_only=False)
    assert saved["epoch"] == best
    (state,) = (value for key, value in saved["callbacks"].items() if key.startswith("ModelCheckpoint"))
    assert state["best_val_metrics"] == pytest.approx(SCRIPT[best])


# ---- config errors: before anything is written -----------------------------------------------------------------------


@pytest.mark.parametrize(("override", "message"), [
    ({"monitor": "accuracy"},
     "fit.trainer.monitor: expected one of ['auc', 'logloss', 'scenario_auc'], got 'accuracy'"),
    ({"val_check_interval": 1.5}, ("fit.trainer: val_check_interval: expected a fraction of an epoch in (0, 1] or a "
                                  "number of training batches >= 1, got 1.5")),
    ({"val_check_interval": 0}, "val_check_interval: expected a fraction"),
])
def test_bad_monitor_or_interval_is_a_config_error(override: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        from_dict(FitConfig, {"trainer": override}, "fit")
    assert message in str(error.value)


def test_val_check_interval_beyond_an_epoch_fails_before_anything_is_written(
    small_examples: Path, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=r"trainer.val_check_interval=13: more than the 12 training batches"):
        fit(watched_config(val_check_interval=13), small_examples, tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.usefixtures("slow_setup")
def test_last_checkpoint_holds_the_batches_after_the_last_validation(small_examples: Path, tmp_path: Path) -> None:
    """Validation every 5 of an epoch's 12 batches: the last two come after the last validation, and last.ckpt
    must still hold them (an unmonitored checkpoint saves at validation by default)."""
    result = fit(watched_config(max_epochs=1, val_check_interval=5), small_examples, tmp_path / "run")
    assert [int(row["step"]) for row in validations(tmp_path / "run")] == [4, 9]  # the CSV's step is 0-based
    assert read_fit_result(tmp_path / "run").last_position.global_step == STEPS_PER_EPOCH
    assert result.last_checkpoint.endswith("last.ckpt")
