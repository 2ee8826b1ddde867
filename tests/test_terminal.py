"""What the commands print: `--quiet` only results and errors, the default each message once, launched ranks only
errors, progress bars on stderr, known third-party noise never (msit_rec/terminal.py)."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml

from msit_rec.terminal import command_output
from tests.launch import LAUNCH_ENV

REPO = Path(__file__).resolve().parents[1]
TIMESTAMP = re.compile(r"^\d\d:\d\d:\d\d ")
NOISE = ("litlogger", "FutureWarning", "is_fx_tracing", "SplitTableBatchedEmbeddingBagsCodegen", "Successfully loaded",
         "TORCHREC_RESOLVED_POD_SIZE", "LOCAL_WORLD_SIZE", "[Connection]", "HeuristicalStorageReservation",
         "known issue with TorchRec", "LeafSpec", "GreedyPerfPartitioner", "Planner Statistics", "[rank1]")


def warn_from(module: str, message: str, category: type[Warning] = FutureWarning) -> None:
    warnings.warn_explicit(message, category, module.replace(".", "/") + ".py", 1, module=module, registry={})


def warnings_shown(quiet: bool, launched: bool, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Sends a mix of our own and third-party warnings and log records; returns the warnings shown."""
    if launched:
        monkeypatch.setenv("LOCAL_RANK", "1")
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        with command_output(quiet=quiet):
            warn_from("torchrec.distributed.planner.planners", "HeuristicalStorageReservation is known to cause issues")
            warn_from("torch.distributed.c10d_logger", "`torch.distributed.all_gather_into_tensor` is deprecated.")
            warn_from("msit_rec.data.loader", "our own data warning", UserWarning)
            logging.getLogger("msit_rec.prepare").info("our own step")
            logging.getLogger("msit_rec.prepare").warning("our own data warning")
            logging.getLogger().info("Successfully loaded: 'fbgemm_gpu_py.so'")
            logging.getLogger().warning("Could not determine LOCAL_WORLD_SIZE from environment")
            logging.getLogger("torchrec.distributed.planner.stats").info("# Planner Statistics #")
            logging.getLogger("torchrec.distributed.comm").warning("[Connection] intra_group: [0] -> [[0, 1]]")
            logging.getLogger("torchrec.distributed.sharding").warning("a third-party warning")
            logging.getLogger("torchrec.distributed.sharding").error("a third-party error")
    return [str(w.message) for w in shown]


@pytest.mark.parametrize(("quiet", "launched"), [(False, False), (True, False), (False, True)])
def test_levels_and_noise_by_mode(quiet: bool, launched: bool, monkeypatch, capsys) -> None:
    shown = warnings_shown(quiet, launched, monkeypatch)
    lines = [TIMESTAMP.sub("", line) for line in capsys.readouterr().err.splitlines()]
    if launched:  # a rank the launcher started: errors only
        assert shown == [] and lines == ["torchrec.distributed.sharding: a third-party error"]
        return
    assert shown == ["our own data warning"]  # known noise goes, our own warning stays, even with --quiet
    expected = ["msit_rec.prepare: our own data warning", "torchrec.distributed.sharding: a third-party error"]
    if not quiet:
        expected = ["msit_rec.prepare: our own step", *expected[:1], "torchrec.distributed.sharding: a third-party warning",
                    *expected[1:]]
    assert lines == expected


def test_lightning_lines_print_once_and_everything_is_restored(capsys) -> None:
    import lightning  # noqa: F401  (adds Lightning's own handler, as an import inside a command does)

    lightning_logger = logging.getLogger("lightning")
    before = (list(warnings.filters), list(logging.getLogger().handlers), logging.getLogger().level,
              list(lightning_logger.handlers), lightning_logger.propagate, logging.getLogger("msit_rec").level,
              os.environ.get("TORCH_CPP_LOG_LEVEL"))
    for quiet in (False, True):
        with command_output(quiet=quiet, lightning=True):
            logging.getLogger("lightning.pytorch.utilities.rank_zero").info("GPU available: False, used: False")
            logging.getLogger("lightning.pytorch.utilities.rank_zero").info("💡 Tip: try installing litlogger")
        err = capsys.readouterr().err
        assert err.count("GPU available") == (0 if quiet else 1) and "litlogger" not in err, err
    after = (list(warnings.filters), list(logging.getLogger().handlers), logging.getLogger().level,
             list(lightning_logger.handlers), lightning_logger.propagate, logging.getLogger("msit_rec").level,
             os.environ.get("TORCH_CPP_LOG_LEVEL"))
    assert after == before


# ---- the commands themselves, as a user runs them ------------------------------------------------------------------

FIT_SETTINGS = ("model.attention_hidden=[8]", "model.tower_hidden=[16]", "trainer.devices=2", "trainer.batch_size=256",
                "trainer.max_epochs=1", "trainer.limit_train_batches=8", "trainer.limit_val_batches=1")


def msit_rec(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in (*LAUNCH_ENV, "RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE")}
    env["PYTHONPATH"] = str(REPO)
    result = subprocess.run([sys.executable, "-m", "msit_rec.cli", *args], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def fit(data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return msit_rec("fit", "--data", str(data), "--out", str(out), *extra,
                    *(arg for item in FIT_SETTINGS for arg in ("--set", item)))


def check_default_output(result: subprocess.CompletedProcess[str], result_lines: int) -> None:
    """Results alone on stdout; on stderr bars and log lines, each log line once, no known noise."""
    assert len(result.stdout.splitlines()) == result_lines, result.stdout
    lines = [line for piece in result.stderr.split("\r") for line in piece.splitlines()]
    logged = [line for line in lines if TIMESTAMP.match(line)]
    messages = [TIMESTAMP.sub("", line) for line in logged]
    assert len(messages) == len(set(messages)), result.stderr
    assert not [line for line in lines if any(noise in line for noise in NOISE)], result.stderr


@pytest.fixture(scope="module")
def quiet_fit(small_examples: Path, tmp_path_factory: pytest.TempPathFactory,
              slow_setup: None) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("terminal") / "run"
    return out, fit(small_examples, out, "--quiet")


@pytest.mark.slow
def test_quiet_two_process_fit_prints_only_its_result(quiet_fit) -> None:
    _, result = quiet_fit
    assert result.stderr == ""
    assert [line.split()[0] for line in result.stdout.splitlines()] == ["best", "checkpoints:"], result.stdout


@pytest.mark.slow
def test_fit_logs_its_hyperparameters(quiet_fit, small_examples: Path) -> None:
    """hparams.yaml (CSV logs, written once by rank 0) holds the run's config and data, as fit_config.yaml does."""
    from msit_rec.data.spec import DatasetMeta

    run, _ = quiet_fit
    files = sorted((run / "logs").glob("version_*/hparams.yaml"))
    assert len(files) == 1
    logged = yaml.safe_load(files[0].read_text())
    assert logged["model"] == yaml.safe_load((run / "fit_config.yaml").read_text())["model"]
    assert logged["trainer"]["devices"] == 2 and logged["data"]["content_hash"] == DatasetMeta.load(small_examples).content_hash


@pytest.mark.slow
def test_two_process_fit_logs_validation_metrics_of_all_ranks(quiet_fit, small_examples: Path) -> None:
    """Each rank validates its half of the valid split (one batch of eval_batch_size 8192 holds all of it); the
    logged AUC, GAUC and logloss, overall and per scenario, are scikit-learn's over all rows — not rank 0's half, not
    an average of the ranks' values."""
    from msit_rec.data.spec import DatasetMeta
    from tests.logged_metrics import sklearn_validation_metrics, valid_predictions, validations

    run, _ = quiet_fit
    (logged,) = validations(run)  # one epoch, one validation: best.ckpt holds the weights it validated
    scenarios = DatasetMeta.load(small_examples).scenarios
    expected = sklearn_validation_metrics(valid_predictions(run, "best"), scenarios)
    assert len(scenarios) >= 2 and len(expected) == 4 + 2 * len(scenarios)
    for name, value in expected.items():
        assert logged[name] == pytest.approx(value, abs=1e-6), name


@pytest.mark.slow
def test_two_process_fit_prints_each_line_once_and_bars_on_stderr(small_examples: Path, tmp_path: Path) -> None:
    result = fit(small_examples, tmp_path / "run")
    check_default_output(result, result_lines=2)
    assert "Epoch 0" in result.stderr and "GPU available" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("command", ["evaluate", "export"])
def test_evaluate_and_export_print_results_and_no_noise(quiet_fit, command: str, tmp_path: Path) -> None:
    run, _ = quiet_fit
    extra = ("--split", "valid") if command == "evaluate" else ("--parity_rows", "1000")
    quiet = msit_rec(command, "--run", str(run), "--out", str(tmp_path / "quiet"), "--quiet", *extra)
    assert quiet.stderr == "" and quiet.stdout, quiet.stderr
    default = msit_rec(command, "--run", str(run), "--out", str(tmp_path / "default"), *extra)
    check_default_output(default, result_lines=len(quiet.stdout.splitlines()))
