"""`msit-rec evaluate` / `compare` end to end on two tiny trained runs, the 2-process gather path, the report, and
the errors a user gets for a mismatched or corrupt checkpoint/dataset pair.

Oracles: the validation AUC that training computed with torchmetrics on the sharded model; sklearn on the saved
scores; one process against two gloo processes (bit-identical); files and messages for the errors.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import torch
import yaml
from sklearn.metrics import roc_auc_score

from msit_rec.cli import main
from msit_rec.compare import compare
from msit_rec.config import to_dict
from msit_rec.data.spec import DatasetMeta
from msit_rec.errors import ConfigError, DataError
from msit_rec.evaluate import evaluate_runs, write_evaluation
from msit_rec.metrics import ScoredRows, compute_metrics
from msit_rec.metrics_file import load_metrics
from msit_rec.report import write_report
from msit_rec.train.fit import fit
from tests.evaluate_worker import SYNTHETIC_SCENARIOS, synthetic_share
from tests.launch import LAUNCH_ENV
from tests.training_worker import tiny_fit_config

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("in_process_launch_env")]

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "evaluate_worker.py"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(small_examples: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval_runs")
    result = {"data": small_examples}
    for variant in ("msit", "shared"):
        outcome = fit(tiny_fit_config(variant), small_examples, root / variant)
        result[variant] = root / variant
        result[f"{variant}_val_auc"] = outcome.best_val_auc
    return result


@pytest.fixture(scope="module")
def evaluated(runs: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("evaluated")
    code = main(["evaluate", "--run", str(runs["msit"]), "--run", str(runs["shared"]), "--out", str(out), "--quiet"])
    assert code == 0
    return out


def test_evaluate_on_valid_reproduces_the_training_validation_auc(runs: dict) -> None:
    evaluation = evaluate_runs([runs["msit"], runs["shared"]], split="valid", progress=False)
    for variant in ("msit", "shared"):
        assert evaluation.metrics.models[variant].overall.auc == pytest.approx(runs[f"{variant}_val_auc"], abs=2e-6)
    assert evaluation.metrics.models["msit"].overall.auc != evaluation.metrics.models["shared"].overall.auc


def test_evaluate_writes_metrics_scores_report_and_plots(runs: dict, evaluated: Path, capsys) -> None:
    meta = DatasetMeta.load(runs["data"])
    saved = load_metrics(evaluated)
    assert saved.version == 1 and list(saved.models) == ["msit", "shared"]
    raw = json.loads((evaluated / "metrics.json").read_text())
    assert set(raw["models"]["msit"]) >= {"checkpoint", "dataset_hash", "split", "scenarios", "overall"}
    scores = pl.read_parquet(evaluated / "scores.parquet")
    assert scores.height == meta.splits["test"].rows
    assert sorted(scores["row_index"].to_list()) == list(range(scores.height))  # every test row exactly once
    for model in saved.models.values():
        assert model.dataset_hash == meta.content_hash and model.split == "test"
        assert list(model.scenarios) == meta.scenarios
        label, score = scores["label"].to_numpy(), scores[model.scores_column].to_numpy()
        assert model.overall.auc == pytest.approx(roc_auc_score(label, score), abs=1e-12)
        for sid, scenario in enumerate(meta.scenarios):
            mine = scores["scenario"].to_numpy() == sid
            assert model.scenarios[scenario].count == meta.splits["test"].scenarios[scenario].rows
            assert model.scenarios[scenario].auc == pytest.approx(roc_auc_score(label[mine], score[mine]), abs=1e-12)
    report = (evaluated / "report.md").read_text()
    for scenario in [*meta.scenarios, "overall"]:
        assert f"| {scenario} |" in report
    assert "AUC (msit)" in report and "AUC (shared)" in report and "**" in report  # one group per model, best bold
    for plot in ("auc_gauc.png", "reliability.png"):
        content = (evaluated / plot).read_bytes()
        assert content.startswith(PNG_SIGNATURE) and len(content) > 10_000


def test_compare_reports_paired_auc_differences(runs: dict, evaluated: Path, tmp_path: Path, capsys) -> None:
    capsys.readouterr()
    assert main(["compare", str(evaluated / "metrics.json"), "--out", str(tmp_path), "--resamples", "1000",
                 "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "ΔAUC shared − msit" in printed
    comparison = json.loads((tmp_path / "comparison.json").read_text())
    saved = load_metrics(evaluated)
    assert comparison["reference"] == "msit" and comparison["resamples"] == 1000
    for scenario, d in comparison["differences"]["shared"].items():
        part = saved.models["msit"].overall if scenario == "overall" else saved.models["msit"].scenarios[scenario]
        other = saved.models["shared"].overall if scenario == "overall" else saved.models["shared"].scenarios[scenario]
        assert d["difference"] == pytest.approx(other.auc - part.auc, abs=1e-12)
        assert d["ci_low"] <= d["difference"] <= d["ci_high"]
    report = (tmp_path / "report.md").read_text()
    assert "AUC difference to the reference" in report and "| overall |" in report
    assert (tmp_path / "auc_gauc.png").stat().st_size > 10_000


def test_compare_pairs_separate_evaluations(runs: dict, tmp_path: Path) -> None:
    for variant in ("msit", "shared"):
        write_evaluation(evaluate_runs([runs[variant]], progress=False), tmp_path / variant)
    comparison, written = compare([tmp_path / "shared", tmp_path / "msit"], tmp_path / "cmp", resamples=200,
                                  progress=False)
    assert comparison.reference == "shared" and list(comparison.differences) == ["msit"]
    assert all(path.stat().st_size > 0 for path in written)
    with pytest.raises(DataError, match="holds an earlier output; pass --overwrite"):
        compare([tmp_path / "shared", tmp_path / "msit"], tmp_path / "cmp", resamples=200, progress=False)


def test_undefined_auc_is_reported_as_na_never_as_a_number(tmp_path: Path) -> None:
    rows = ScoredRows.concat([synthetic_share(0), synthetic_share(1)])
    metrics = compute_metrics(rows, SYNTHETIC_SCENARIOS)
    assert metrics.scenarios["d"].auc is None and metrics.scenarios["e"].count == 0
    written = write_report({"one": metrics, "two": metrics}, tmp_path, "undefined scenarios")
    report = (tmp_path / "report.md").read_text()
    line = next(row for row in report.splitlines() if row.startswith("| d |"))
    assert line.count("n/a") >= 4 and "0.5000" not in line
    assert all(path.read_bytes().startswith(PNG_SIGNATURE) for path in written[1:])


# ---- two processes -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_process_results(runs: dict, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("two_process_eval")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    env.update(PYTHONPATH=str(REPO), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    ranks = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(rank), "2", str(runs["msit"]), str(runs["data"]), str(out)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank in (0, 1)
    ]
    logs = [rank.communicate(timeout=240)[0] for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0], "\n".join(log[-4000:] for log in logs)
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]


def test_two_process_gather_with_uneven_ranks_equals_one_process_exactly(two_process_results: list[dict]) -> None:
    single = ScoredRows.concat([synthetic_share(1), synthetic_share(0)])  # other order: canonical order decides
    expected = to_dict(compute_metrics(single, SYNTHETIC_SCENARIOS))
    for result in two_process_results:
        assert result["synthetic"] == expected
        assert torch.equal(result["synthetic_rows"].row_index, torch.arange(1000))


def test_two_process_scoring_equals_one_process_exactly(runs: dict, two_process_results: list[dict]) -> None:
    evaluation = evaluate_runs([runs["msit"]], progress=False)
    expected = to_dict(evaluation.metrics.models["msit"])
    expected_rows = evaluation.rows
    for result in two_process_results:
        rows = result["model_rows"]
        assert torch.equal(rows.row_index, expected_rows.row_index)
        assert torch.equal(rows.score, evaluation.scores["msit"])
        assert result["model"] == {key: expected[key] for key in ("scenarios", "overall")}
    local = [result["local_rows"] for result in two_process_results]
    assert sum(local) == len(expected_rows) and min(local) > 0


# ---- a mismatched or corrupt checkpoint/dataset pair ---------------------------------------------------------


def copy_run(run: Path, to: Path, edit_model: dict | None = None, dataset_hash: str | None = None) -> Path:
    shutil.copytree(run, to, ignore=shutil.ignore_patterns("logs", "tensorboard"))
    config = yaml.safe_load((to / "fit_config.yaml").read_text())
    config["model"].update(edit_model or {})
    if dataset_hash is not None:
        config["dataset_hash"] = dataset_hash
    (to / "fit_config.yaml").write_text(yaml.safe_dump(config))
    return to


def test_dataset_hash_mismatch_names_both_files(runs: dict, tmp_path: Path, capsys) -> None:
    run = copy_run(runs["msit"], tmp_path / "run", dataset_hash="0123456789abcdef")
    code = main(["evaluate", "--run", str(run), "--out", str(tmp_path / "out"), "--quiet"])
    error = capsys.readouterr().err
    assert code == 2
    assert "dataset.json" in error and "fit_config.yaml" in error and "0123456789abcdef" in error


def test_missing_checkpoint_directory_is_named(runs: dict, tmp_path: Path) -> None:
    run = copy_run(runs["msit"], tmp_path / "run")
    shutil.rmtree(run / "checkpoints" / "last.ckpt")
    with pytest.raises(DataError, match=r"last\.ckpt.*no such directory"):
        evaluate_runs([run], checkpoint="last", progress=False)
    with pytest.raises(DataError, match="incomplete"):
        evaluate_runs([run], checkpoint=str(tmp_path), progress=False)


def test_checkpoint_that_does_not_fit_the_model_lists_the_differences(runs: dict, tmp_path: Path) -> None:
    run = copy_run(runs["msit"], tmp_path / "run", edit_model={"tower_hidden": [24]})
    with pytest.raises(DataError, match=r"best\.ckpt does not fit.*shape mismatch.*tower") as caught:
        evaluate_runs([run], progress=False)
    assert "(16, " in str(caught.value) and "(24, " in str(caught.value)
    run = copy_run(runs["shared"], tmp_path / "variant", edit_model={"variant": "msit"})
    with pytest.raises(DataError, match=r"missing \[.*gate"):
        evaluate_runs([run], progress=False)


def test_corrupt_checkpoint_is_named(runs: dict, tmp_path: Path) -> None:
    run = copy_run(runs["msit"], tmp_path / "run")
    shard = next((run / "checkpoints" / "best.ckpt").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(DataError, match=rf"checkpoint .*best\.ckpt: file {shard.name} is corrupt"):
        evaluate_runs([run], progress=False)


def test_bad_arguments_are_config_errors(runs: dict, evaluated: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="split 'nope'"):
        evaluate_runs([runs["msit"]], split="nope", progress=False)
    with pytest.raises(ConfigError, match="needs exactly one --run"):
        evaluate_runs([runs["msit"], runs["shared"]], checkpoint=str(runs["msit"]), progress=False)
    with pytest.raises(ConfigError, match="no fit_config.yaml"):
        evaluate_runs([tmp_path], progress=False)
    single = tmp_path / "single"
    write_evaluation(evaluate_runs([runs["msit"]], progress=False), single)
    with pytest.raises(ConfigError, match="at least two models"):
        compare([single], tmp_path / "cmp", progress=False)


def test_compare_refuses_results_it_cannot_pair(evaluated: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    raw = json.loads((evaluated / "metrics.json").read_text())
    raw["models"]["msit"]["split"] = "valid"
    (other / "metrics.json").write_text(json.dumps(raw))
    with pytest.raises(DataError, match="different data"):
        compare([evaluated, other], tmp_path / "cmp", progress=False)
    raw["version"] = 2
    (other / "metrics.json").write_text(json.dumps(raw))
    with pytest.raises(DataError, match="metrics version 2"):
        compare([evaluated, other], tmp_path / "cmp", progress=False)
    shutil.copy(evaluated / "metrics.json", other / "metrics.json")
    scores = pl.read_parquet(evaluated / "scores.parquet")
    scores.with_columns(pl.col("label").reverse()).write_parquet(other / "scores.parquet")
    with pytest.raises(DataError, match="differ from the first model"):
        compare([evaluated, other], tmp_path / "cmp", progress=False)


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_failed_write_keeps_the_previous_evaluation_and_comparison(runs, evaluated, tmp_path, monkeypatch) -> None:
    import msit_rec.compare as compare_module
    import msit_rec.evaluate as evaluate_module

    out, cmp = tmp_path / "evaluation", tmp_path / "comparison"
    shutil.copytree(evaluated, out)
    compare([out], cmp, resamples=50, progress=False)
    before = {"evaluation": tree_bytes(out), "comparison": tree_bytes(cmp)}

    def crash(*args, **kwargs):
        raise OSError("disk full")  # after metrics.json / comparison.json were written

    monkeypatch.setattr(evaluate_module, "write_report", crash)
    monkeypatch.setattr(compare_module, "write_report", crash)
    with pytest.raises(OSError, match="disk full"):
        write_evaluation(evaluate_runs([runs["msit"]], progress=False), out, overwrite=True)
    with pytest.raises(OSError, match="disk full"):
        compare([out], cmp, resamples=50, overwrite=True, progress=False)
    assert {"evaluation": tree_bytes(out), "comparison": tree_bytes(cmp)} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["comparison", "evaluation"]  # no staging left


def test_outputs_overlapping_inputs_or_holding_other_files_are_refused(runs, evaluated, tmp_path, capsys) -> None:
    code = main(["evaluate", "--run", str(runs["msit"]), "--out", str(runs["msit"] / "eval"), "--quiet"])
    assert code == 2 and "overlaps input" in capsys.readouterr().err
    assert not (runs["msit"] / "eval").exists()
    code = main(["compare", str(evaluated), "--out", str(evaluated), "--overwrite", "--quiet"])
    assert code == 2 and "overlaps input" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("mine")
    code = main(["evaluate", "--run", str(runs["msit"]), "--out", str(tmp_path), "--overwrite", "--quiet"])
    assert code == 2 and "notes.txt" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
