"""Provenance (versions, git commit, host) in fit_result.json, metrics.json and the artifact manifest, and the
`msit-rec runs` table over runs.

Oracles: the libraries' own `__version__`, `git rev-parse HEAD` in a throwaway repository, a hand-written cpuinfo;
the tiny fit's config (1 epoch of 12 batches: the checkpoints are at epoch 0, step 12), each run's fit_result.json
and the evaluation's metrics.json for the table's values.
"""

from __future__ import annotations

import csv
import json
import shutil
import socket
import subprocess
from pathlib import Path

import fbgemm_gpu
import lightning
import polars
import pyarrow
import pytest
import torch
import torchrec

import msit_rec
from msit_rec.cli import main
from msit_rec.config import from_dict, to_dict
from msit_rec.errors import DataError
from msit_rec.evaluate import evaluate_runs, write_evaluation
from msit_rec.export import export_run
from msit_rec.provenance import CPU_FLAGS, Provenance, collect, cpu_info, git_state, host_facts
from msit_rec.run_dir import read_fit_result
from msit_rec.runs import TEST_LEGEND, collect_runs, evaluations_by_run, find_runs
from msit_rec.serving.contract import Manifest
from msit_rec.train.fit import fit
from tests.launch import launch_env_restored
from tests.training_worker import tiny_fit_config

REPO = Path(__file__).resolve().parents[1]
TINY_STEPS = 12  # tiny_fit_config: max_epochs 1, limit_train_batches 12
LR_KEY = "trainer.optim.dense_lr"


# ---- provenance ---------------------------------------------------------------------------------------------


def test_versions_are_the_imported_libraries() -> None:
    versions = collect().versions
    fbgemm = [name for name in ("fbgemm-gpu", "fbgemm-gpu-cpu") if name in versions]
    assert len(fbgemm) == 1 and versions[fbgemm[0]] == fbgemm_gpu.__version__
    assert versions["torch"] == torch.__version__ and versions["torchrec"] == torchrec.__version__
    assert versions["lightning"] == lightning.__version__ and versions["polars"] == polars.__version__
    assert versions["pyarrow"] == pyarrow.__version__ and versions["msit-rec"] == msit_rec.__version__


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_git_commit_of_a_checkout_and_null_elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    assert git_state(repo) is None  # not a checkout
    _git(repo, "init", "-q")
    assert git_state(repo) is None  # a checkout without a commit
    (repo / "a.txt").write_text("one\n")
    _git(repo, "add", "a.txt")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one")
    _git(repo, "tag", "v1")  # a tag never replaces the hash
    state = git_state(repo)
    assert state is not None and state.commit == _git(repo, "rev-parse", "HEAD") and not state.dirty
    (repo / "untracked.txt").write_text("x\n")
    assert not git_state(repo).dirty
    (repo / "a.txt").write_text("two\n")
    assert git_state(repo).dirty
    (repo / "sub").mkdir()
    assert git_state(repo / "sub") is None  # code inside someone else's repository (site-packages) is not its commit
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))
    assert git_state(repo) is None  # no git: null, never an error


def test_cpu_model_and_only_the_relevant_flags(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\n"
        "flags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512_bf16 amx_bf16 amx_tile amx_int8 ht\n\n"
        "processor\t: 1\nmodel name\t: other\nflags\t\t: fpu\n"
    )
    model, flags = cpu_info(cpuinfo)
    assert model == "Intel(R) Xeon(R) Platinum 8480+"
    assert flags == ["sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16"]
    assert set(flags) <= set(CPU_FLAGS)
    assert cpu_info(tmp_path / "missing")[1] == []


def test_host_facts_of_this_machine() -> None:
    host = host_facts()
    assert host.hostname == socket.gethostname()
    assert host.cpu_capability == torch.backends.cpu.get_cpu_capability()
    cuda = torch.cuda.is_available()
    assert host.gpus == ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [])
    proc = Path("/proc/cpuinfo")
    if proc.is_file():
        flags = next(line for line in proc.read_text().splitlines() if line.startswith("flags")).split(":")[1].split()
        assert host.cpu_flags == [flag for flag in CPU_FLAGS if flag in flags]


def test_provenance_round_trips_as_plain_json() -> None:
    provenance = collect()
    raw = json.loads(json.dumps(to_dict(provenance)))
    assert from_dict(Provenance, raw) == provenance


# ---- fit, evaluate, export record it; `runs` tabulates ----------------------------------------------------------


@pytest.fixture(scope="module")
def fitted(small_examples: Path, tmp_path_factory: pytest.TempPathFactory, slow_setup: None) -> dict:
    """Two tiny runs that differ in the dense learning rate only, evaluated together on the test split."""
    root = tmp_path_factory.mktemp("runs")
    for name, lr in (("a", 1e-3), ("b", 3e-3)):
        config = tiny_fit_config("msit")
        config.trainer.optim.dense_lr = lr
        with launch_env_restored():
            fit(config, small_examples, root / "runs" / name)
    runs = [root / "runs" / "a", root / "runs" / "b"]
    write_evaluation(evaluate_runs(runs, progress=False), root / "evaluation")
    return {"root": root, "runs": runs, "evaluation": root / "evaluation", "data": small_examples}


def _expected_git() -> dict | None:
    if not (REPO / ".git").exists() or shutil.which("git") is None:
        return None
    return {"commit": _git(REPO, "rev-parse", "HEAD")}


def _check_provenance(raw: dict) -> None:
    assert raw["versions"]["torch"] == torch.__version__ and raw["versions"]["lightning"] == lightning.__version__
    assert raw["host"]["hostname"] == socket.gethostname()
    expected = _expected_git()
    assert (raw["git"] is None) == (expected is None)
    if expected is not None:
        assert raw["git"]["commit"] == expected["commit"] and isinstance(raw["git"]["dirty"], bool)


def test_fit_result_records_checkpoint_positions_wall_time_and_provenance(fitted: dict) -> None:
    for run in fitted["runs"]:
        raw = json.loads((run / "fit_result.json").read_text())
        at_end = {"epoch": 0, "global_step": TINY_STEPS}
        assert raw["best_position"] == at_end and raw["last_position"] == at_end
        assert 0 < raw["wall_seconds"] < 600 and raw["started_at"] <= raw["finished_at"]
        assert raw["resumed_from"] is None
        _check_provenance(raw["provenance"])


def test_metrics_json_records_the_scored_run_checkpoint_and_provenance(fitted: dict) -> None:
    raw = json.loads((fitted["evaluation"] / "metrics.json").read_text())
    _check_provenance(raw["provenance"])
    for run in fitted["runs"]:
        model = raw["models"][run.name]
        assert model["run_dir"] == str(run.resolve())
        assert model["checkpoint_position"] == {"epoch": 0, "global_step": TINY_STEPS}


def test_manifest_records_the_checkpoint_position_and_provenance(fitted: dict, tmp_path: Path) -> None:
    export_run(fitted["runs"][0], tmp_path / "artifact", parity_rows=64, progress=False)
    raw = json.loads((tmp_path / "artifact" / "manifest.json").read_text())
    assert raw["checkpoint_position"] == {"epoch": 0, "global_step": TINY_STEPS}
    _check_provenance(raw["provenance"])
    del raw["checkpoint_position"], raw["provenance"]  # an artifact exported before they were recorded still loads
    (tmp_path / "artifact" / "manifest.json").write_text(json.dumps(raw))
    manifest = Manifest.load(tmp_path / "artifact")
    assert manifest.provenance is None and manifest.checkpoint_position is None


def _table(out: Path) -> list[dict[str, str]]:
    with (out / "runs.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def test_runs_shows_exactly_the_differing_key_and_each_runs_results(fitted: dict, tmp_path: Path, capsys) -> None:
    a, b = fitted["runs"]
    capsys.readouterr()
    assert main(["runs", str(a), str(b), "--evaluation", str(fitted["evaluation"]), "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    rows = _table(tmp_path)
    assert list(rows[0]) == ["run", "variant", LR_KEY, "best_val_auc", "best_epoch", "best_step", "wall_seconds",
                             "test_checkpoint", "test_auc", "test_logloss"]
    metrics = json.loads((fitted["evaluation"] / "metrics.json").read_text())["models"]
    for row, run, lr in zip(rows, (a, b), ("0.001", "0.003")):
        result = json.loads((run / "fit_result.json").read_text())
        assert row["run"] == str(run) and row["variant"] == "msit" and row[LR_KEY] == lr
        assert float(row["best_val_auc"]) == result["best_val_auc"]
        assert (int(row["best_epoch"]), int(row["best_step"])) == (0, TINY_STEPS)
        assert float(row["wall_seconds"]) == result["wall_seconds"]
        assert float(row["test_auc"]) == metrics[run.name]["overall"]["auc"]
        assert float(row["test_logloss"]) == metrics[run.name]["overall"]["logloss"]
        line = next(text for text in printed.splitlines() if text.startswith(f"| {run} "))
        assert f"{result['best_val_auc']:.5f}" in line and f" {lr} " in line
    header = printed.splitlines()[0]
    assert LR_KEY in header and "model." not in header and "trainer." not in header.replace(LR_KEY, "")
    markdown = (tmp_path / "runs.md").read_text()
    assert printed.splitlines()[0] in markdown
    widths = {len(text) for text in printed.splitlines()[:4]}
    assert len(widths) == 1  # aligned: header, rule and both rows as wide


def test_runs_finds_runs_one_level_down_and_reads_old_run_directories(fitted: dict, tmp_path: Path) -> None:
    assert find_runs([fitted["root"] / "runs"]) == fitted["runs"]
    old = tmp_path / "old"
    shutil.copytree(fitted["runs"][0], old, ignore=shutil.ignore_patterns("logs", "tensorboard"))
    raw = json.loads((old / "fit_result.json").read_text())
    before = {key: raw[key] for key in ("best_checkpoint", "last_checkpoint", "best_val_auc", "log_dir")}
    (old / "fit_result.json").write_text(json.dumps(before))  # fit_result.json as fitted before provenance
    result = read_fit_result(old)
    assert result.best_val_auc == raw["best_val_auc"] and result.provenance is None and result.best_position is None
    assert main(["runs", str(old), str(fitted["runs"][1]), "--out", str(tmp_path / "table")]) == 0
    rows = _table(tmp_path / "table")
    assert rows[0]["best_epoch"] == "" and rows[0]["wall_seconds"] == "" and "test_auc" not in rows[0]
    assert "host" not in rows[0]  # an unknown host is no difference


def test_runs_matches_old_evaluations_by_checkpoint_and_refuses_two_checkpoints(fitted: dict, tmp_path: Path) -> None:
    raw = json.loads((fitted["evaluation"] / "metrics.json").read_text())
    for model in raw["models"].values():
        del model["run_dir"], model["checkpoint_position"]  # metrics.json written before they were recorded
    del raw["provenance"]
    (tmp_path / "old.json").write_text(json.dumps(raw))
    rows = collect_runs(fitted["runs"])
    matched = evaluations_by_run([tmp_path / "old.json"], rows)
    assert set(matched) == {run.resolve() for run in fitted["runs"]}
    last = raw["models"]["a"]["checkpoint"].replace("best.ckpt", "last.ckpt")
    raw["models"]["a"]["checkpoint"] = last
    (tmp_path / "last.json").write_text(json.dumps(raw))
    with pytest.raises(DataError, match="test evaluations of two checkpoints"):
        evaluations_by_run([tmp_path / "old.json", tmp_path / "last.json"], rows)


def test_runs_errors_name_the_directory(fitted: dict, tmp_path: Path, capsys) -> None:
    capsys.readouterr()
    assert main(["runs", str(tmp_path / "missing")]) == 2
    assert "missing: no such directory" in capsys.readouterr().err
    assert main(["runs", str(fitted["data"])]) == 2
    assert "not a run directory (no fit_config.yaml)" in capsys.readouterr().err
    run = fitted["runs"][0]
    assert main(["runs", str(run), "--out", str(run / "table")]) == 2
    error = capsys.readouterr().err
    assert "overlaps" in error and len(error.strip().splitlines()) == 1
    assert not (run / "table").exists()


# ---- which evaluation joins which run: stale ones, two datasets, none at all -----------------------------------


def _copy_run(run: Path, to: Path, **result: object) -> Path:
    """A copy of `run`'s record and fit_result.json (no checkpoints: the table reads neither), `result` changed."""
    shutil.copytree(run, to, ignore=shutil.ignore_patterns("logs", "tensorboard", "checkpoints"))
    raw = json.loads((to / "fit_result.json").read_text())
    (to / "fit_result.json").write_text(json.dumps({**raw, **result}))
    return to


def _evaluation_of(fitted: dict, run: Path, path: Path, **model: object) -> Path:
    """The fixture's metrics.json holding only run a's model, made an evaluation of `run`, `model` fields changed."""
    raw = json.loads((fitted["evaluation"] / "metrics.json").read_text())
    scored = raw["models"]["a"]
    scored.update(run_dir=str(run.resolve()), checkpoint=str(run.resolve() / "checkpoints" / "best.ckpt"), **model)
    raw["models"] = {"a": scored}
    path.write_text(json.dumps(raw))
    return path


def _runs(capsys, *args: Path | str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["runs", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _line_of(printed: str, run: Path) -> str:
    return next(text for text in printed.splitlines() if text.startswith(f"| {run} "))


def test_runs_skips_an_evaluation_of_a_checkpoint_the_run_no_longer_holds(fitted: dict, tmp_path: Path, capsys) -> None:
    a = fitted["runs"][0]
    moved = _copy_run(a, tmp_path / "moved", best_position={"epoch": 1, "global_step": 2 * TINY_STEPS})
    stale = _evaluation_of(fitted, moved, tmp_path / "moved.json")  # scored best.ckpt at epoch 0, step 12
    code, printed, err = _runs(capsys, moved, "--evaluation", stale)
    assert code == 0 and "test AUC" not in printed and TEST_LEGEND not in printed
    assert len(err.strip().splitlines()) == 1 and str(stale) in err and "not shown" in err
    assert f"epoch 0, step {TINY_STEPS}" in err and f"epoch 1, step {2 * TINY_STEPS}" in err
    # fitted again with --overwrite into the same directory, to the same epoch/step: the evaluation predates the fit
    raw = json.loads(stale.read_text())
    refit = _copy_run(a, tmp_path / "refit", started_at="2999-01-01T00:00:00+00:00")
    outdated = _evaluation_of(fitted, refit, tmp_path / "refit.json")
    code, printed, err = _runs(capsys, refit, "--evaluation", outdated)
    assert code == 0 and "test AUC" not in printed
    assert str(outdated) in err and "fitted again since" in err and raw["provenance"]["created_at"] in err
    # a resumed fit keeps the checkpoint it did not improve on: the same epoch/step still joins
    resumed = _copy_run(a, tmp_path / "resumed", started_at="2999-01-01T00:00:00+00:00",
                        resumed_from=str(a / "checkpoints" / "last.ckpt"))
    code, printed, err = _runs(capsys, resumed, "--evaluation", _evaluation_of(fitted, resumed, tmp_path / "r.json"))
    assert code == 0 and "test AUC" in printed and err == ""
    assert f"{raw['models']['a']['overall']['auc']:.4f}" in _line_of(printed, resumed)


def test_runs_shows_the_test_score_on_the_runs_own_data_and_says_which_data(fitted: dict, tmp_path: Path,
                                                                            capsys) -> None:
    a = fitted["runs"][0]
    own = json.loads((fitted["evaluation"] / "metrics.json").read_text())["models"]["a"]
    other_hash, third_hash = "f" * 64, "e" * 64
    other = _evaluation_of(fitted, a, tmp_path / "other.json", dataset_hash=other_hash,
                           overall={**own["overall"], "auc": 0.123456})
    for order in ([fitted["evaluation"], other], [other, fitted["evaluation"]]):  # the order given is no matter
        code, printed, err = _runs(capsys, a, *[arg for path in order for arg in ("--evaluation", path)])
        assert code == 0 and err == ""
        assert f"{own['overall']['auc']:.4f}" in _line_of(printed, a) and "0.1235" not in printed
        assert "test data" not in printed  # the shown score is on the run's training data
    code, printed, err = _runs(capsys, a, "--evaluation", other, "--out", tmp_path / "table")
    assert code == 0 and "0.1235" in _line_of(printed, a) and f"| {other_hash[:12]} " in _line_of(printed, a)
    assert "test data" in printed.splitlines()[0] and "test data:" in (tmp_path / "table" / "runs.md").read_text()
    assert _table(tmp_path / "table")[0]["test_dataset_hash"] == other_hash
    third = _evaluation_of(fitted, a, tmp_path / "third.json", dataset_hash=third_hash)
    code, printed, err = _runs(capsys, a, "--evaluation", other, "--evaluation", third)
    assert code == 2 and printed == "" and len(err.strip().splitlines()) == 1
    assert "two datasets" in err and str(other) in err and str(third) in err and "give one --evaluation" in err


def test_runs_warns_about_an_evaluation_that_joins_no_run(fitted: dict, tmp_path: Path, capsys) -> None:
    a, b = fitted["runs"]
    of_a = _evaluation_of(fitted, a, tmp_path / "a.json")
    code, printed, err = _runs(capsys, b, "--evaluation", of_a, "--out", tmp_path / "table")
    assert code == 0 and "test AUC" not in printed and "test_auc" not in _table(tmp_path / "table")[0]
    assert len(err.strip().splitlines()) == 1 and str(of_a) in err and str(a.resolve()) in err
    assert TEST_LEGEND not in printed and TEST_LEGEND not in (tmp_path / "table" / "runs.md").read_text()
    validation = _evaluation_of(fitted, a, tmp_path / "validation.json", split="validation")
    code, printed, err = _runs(capsys, a, b, "--evaluation", validation, "--evaluation", fitted["evaluation"])
    assert code == 0 and "test AUC" in printed
    assert len(err.strip().splitlines()) == 1 and str(validation) in err and "test split" in err


def test_runs_refuses_a_json_that_is_not_a_metrics_json(fitted: dict, tmp_path: Path, capsys) -> None:
    a = fitted["runs"][0]
    (tmp_path / "empty.json").write_text("{}")
    for given in (tmp_path / "empty.json", a / "fit_result.json", fitted["data"] / "dataset.json"):
        code, printed, err = _runs(capsys, a, "--evaluation", given)
        assert code == 2 and printed == "" and len(err.strip().splitlines()) == 1
        assert f"{given}: not a metrics.json of `msit-rec evaluate`" in err and "version" not in err
    raw = json.loads((fitted["evaluation"] / "metrics.json").read_text())
    (tmp_path / "future.json").write_text(json.dumps({**raw, "version": 99}))  # a metrics.json of another version
    code, _, err = _runs(capsys, a, "--evaluation", tmp_path / "future.json")
    assert code == 2 and "metrics version 99" in err
