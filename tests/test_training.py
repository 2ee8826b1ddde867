"""`msit_rec.train.fit.fit` end to end on generated data with the real model: 2 gloo processes, sharded checkpoints
across world sizes, resume, determinism, and msit against the baselines on the smallest scenario.

Oracles: the ranks against each other, a plain unsharded RankingModel loaded from the checkpoint, an uninterrupted
run for resume, a second run for determinism, and for quality a paired bootstrap over test rows (validation only
picks the checkpoint).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

import msit_rec.train.fit as fit_module
from msit_rec.data.spec import DatasetMeta
from msit_rec.fit_config import FitConfig
from msit_rec.model import RankingModel
from msit_rec.train.checkpoint import load_unsharded_checkpoint, load_unsharded_state_dict
from msit_rec.train.fit import fit
from tests.checkpoints import flat_tensors
from tests.launch import LAUNCH_ENV
from tests.training_worker import (
    SAME_BUDGET,
    SMALL_RUN,
    RecordingModule,
    fit_config,
    load_for_inference,
    probe_batch,
    probe_logits,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("in_process_launch_env")]

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "training_worker.py"
EPOCHS = 2
STEPS_PER_EPOCH = 8  # trainer.limit_train_batches in SMALL_RUN
assert f"trainer.limit_train_batches={STEPS_PER_EPOCH}" in SMALL_RUN and f"trainer.max_epochs={EPOCHS}" in SMALL_RUN


def recorded_fit(
    config: FitConfig, data_dir: Path, out: Path, stop_after_epochs: int | None = None, resume: Path | None = None
) -> dict[str, Any]:
    """Run `fit` in this process with a RecordingModule; return its record (losses, dense weights, probe logits)."""
    recording = type("Recording", (RecordingModule,), {
        "record_dir": out / "record", "data_dir": data_dir, "stop_after_epochs": stop_after_epochs,
    })
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fit_module, "RankingModule", recording)
        fit(config, data_dir, out, resume=resume)
    return torch.load(out / "record" / "rank0.pt")


def plain_model(config: FitConfig, data_dir: Path, ckpt: Path) -> RankingModel:
    """Unsharded reference: a RankingModel on the CPU with the checkpoint's full tables."""
    model = RankingModel(DatasetMeta.load(data_dir), config.model, device=torch.device("cpu"))
    model.load_state_dict({k.removeprefix("model."): v for k, v in load_unsharded_state_dict(ckpt).items()})
    return model.eval()


def plain_logits(config: FitConfig, data_dir: Path, ckpt: Path) -> torch.Tensor:
    with torch.no_grad():
        return plain_model(config, data_dir, ckpt)(probe_batch(data_dir))


# ---- one process: determinism and resume ------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_process_runs(small_examples: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two identical uninterrupted runs, and one stopped after epoch 1 then resumed with `resume=last.ckpt`."""
    root = tmp_path_factory.mktemp("one_process")
    config = fit_config()
    runs: dict[str, Any] = {"config": config, "root": root}
    runs["full"] = recorded_fit(config, small_examples, root / "full")
    runs["again"] = recorded_fit(config, small_examples, root / "again")
    runs["stopped"] = recorded_fit(config, small_examples, root / "stopped", stop_after_epochs=1)
    runs["stop_ckpt"] = flat_tensors(load_unsharded_checkpoint(root / "stopped" / "checkpoints" / "last.ckpt"))
    runs["resumed"] = recorded_fit(
        config, small_examples, root / "stopped", resume=root / "stopped" / "checkpoints" / "last.ckpt"
    )
    return runs


def last_checkpoint(runs: dict[str, Any], name: str) -> Path:
    return runs["root"] / name / "checkpoints" / "last.ckpt"


def test_one_process_training_is_deterministic(one_process_runs: dict[str, Any]) -> None:
    full, again = one_process_runs["full"], one_process_runs["again"]
    assert len(full["losses"]) == EPOCHS * STEPS_PER_EPOCH
    assert full["losses"] == again["losses"]  # bit-identical, step by step
    first = flat_tensors(load_unsharded_checkpoint(last_checkpoint(one_process_runs, "full")))
    second = flat_tensors(load_unsharded_checkpoint(last_checkpoint(one_process_runs, "again")))
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_resume_after_a_stop_equals_the_uninterrupted_run(one_process_runs: dict[str, Any]) -> None:
    full, stopped, resumed = (one_process_runs[k] for k in ("full", "stopped", "resumed"))
    assert len(stopped["losses"]) == STEPS_PER_EPOCH  # it really stopped after one epoch
    assert stopped["losses"] + resumed["losses"] == full["losses"]
    uninterrupted = flat_tensors(load_unsharded_checkpoint(last_checkpoint(one_process_runs, "full")))
    continued = flat_tensors(load_unsharded_checkpoint(last_checkpoint(one_process_runs, "stopped")))
    assert uninterrupted.keys() == continued.keys()
    assert any("momentum1" in k for k in continued) and any("exp_avg_sq" in k for k in continued)
    moved = [k for k in continued if not torch.equal(continued[k], one_process_runs["stop_ckpt"][k])]
    assert any("tower" in k for k in moved) and any("embedding_bags.item" in k for k in moved)  # the resume trained
    for key in uninterrupted:
        assert torch.equal(uninterrupted[key], continued[key]), key


# ---- two processes ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_process_run(small_examples: Path, one_process_runs, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run tests/training_worker.py, which Lightning launches as 2 gloo processes."""
    out = tmp_path_factory.mktemp("two_process")
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    env["PYTHONPATH"] = str(REPO)
    one_process_ckpt = last_checkpoint(one_process_runs, "full")
    result = subprocess.run(
        [sys.executable, str(WORKER), str(small_examples), str(out), str(one_process_ckpt)],
        cwd=out, env=env, check=False, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return out


def test_two_processes_learn_and_keep_dense_weights_identical(two_process_run: Path) -> None:
    records = [torch.load(two_process_run / "record" / f"rank{rank}.pt") for rank in (0, 1)]
    for record in records:
        losses = torch.tensor(record["losses"])
        assert len(losses) == EPOCHS * STEPS_PER_EPOCH
        # it learns: 16 steps of the tiny msit model take the loss down by a quarter (0.73 → 0.53 with the
        # zero-initialised transfer gate; a model that does not learn stays near its start)
        assert losses[-4:].mean() < 0.75 * losses[:4].mean(), losses
    assert records[0]["losses"] != records[1]["losses"]  # the ranks trained on different rows
    dense = [record["dense"] for record in records]
    assert dense[0].keys() == dense[1].keys() and any(k.startswith("head.gate.") for k in dense[0])
    for key in dense[0]:
        assert torch.equal(dense[0][key], dense[1][key]), key
    torch.testing.assert_close(records[0]["logits"], records[1]["logits"], rtol=0, atol=0)


def test_two_process_checkpoint_loads_into_one_process_and_a_plain_model(
    two_process_run: Path, small_examples: Path, one_process_runs, tmp_path: Path
) -> None:
    trained = torch.load(two_process_run / "record" / "rank0.pt")["logits"]
    ckpt = two_process_run / "record" / "final.ckpt"
    config = one_process_runs["config"]  # the planner's own placement in one process: resharded on load
    module, _ = load_for_inference(small_examples, ckpt, config, devices=1, root=tmp_path)
    torch.testing.assert_close(probe_logits(module, small_examples), trained, rtol=0, atol=1e-6)
    torch.testing.assert_close(plain_logits(config, small_examples, ckpt), trained, rtol=0, atol=1e-6)


def test_two_process_last_checkpoint_is_the_final_state(two_process_run: Path) -> None:
    last = two_process_run / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(last / "trainer_state.pt", weights_only=False)["global_step"] == EPOCHS * STEPS_PER_EPOCH
    final = load_unsharded_state_dict(two_process_run / "record" / "final.ckpt")
    saved = load_unsharded_state_dict(last)
    for key in final:
        assert torch.equal(final[key], saved[key]), key


def test_one_process_checkpoint_loads_into_two_processes(two_process_run: Path, small_examples: Path, one_process_runs):
    from_one = torch.load(two_process_run / "from_one_process.pt")
    config = one_process_runs["config"]
    expected = plain_logits(config, small_examples, last_checkpoint(one_process_runs, "full"))
    torch.testing.assert_close(one_process_runs["full"]["logits"], expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(from_one, expected, rtol=0, atol=1e-6)
    trained_in_two = torch.load(two_process_run / "record" / "rank0.pt")["logits"]
    assert not torch.allclose(from_one, trained_in_two, atol=1e-3)  # two different models were compared


# ---- msit against the baselines where interest transfers between scenarios ------------------------------------

# configs/generate/transfer.yaml (`transfer_examples`, tests/conftest.py): each scenario is lifted by recent clicks
# from ONE *other* scenario, so a model blind to the behaviours' scenarios (din, shared) can only learn the average of
# these rules. The budget is the one of benchmarks/bench_quality.py (SAME_BUDGET: tower 128-64, 3 epochs, batch 512,
# checkpoint best on validation), where msit was best on every scenario over 3 seeds (smallest scenario `new`: test
# AUC 0.748 ± 0.002 vs din 0.729, shared 0.683).
BOOTSTRAP_RESAMPLES = 1000


def predictions(model: RankingModel, data_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(probability, label, scenario) of every row of `split`, in split order."""
    from msit_rec.data.loader import ExamplesDataset, make_loader

    probs, labels, scenarios = [], [], []
    with torch.no_grad():
        for batch in make_loader(ExamplesDataset(data_dir, split, 4096)):
            real = batch.weight > 0
            probs.append(torch.sigmoid(model(batch))[real])
            labels.append(batch.label[real])
            scenarios.append(batch.scenario[real])
    return tuple(torch.cat(t).numpy() for t in (probs, labels, scenarios))  # type: ignore[return-value]


def paired_bootstrap_lower_bound(labels: np.ndarray, better: np.ndarray, worse: np.ndarray, seed: int = 0) -> float:
    """5th percentile of AUC(better) - AUC(worse) over resampled rows: > 0 means better wins at 95 % (one-sided)."""
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(BOOTSTRAP_RESAMPLES):
        rows = rng.integers(0, len(labels), len(labels))
        if labels[rows].min() == labels[rows].max():
            continue
        diffs.append(roc_auc_score(labels[rows], better[rows]) - roc_auc_score(labels[rows], worse[rows]))
    return float(np.percentile(diffs, 5))


def test_msit_beats_shared_and_din_on_the_smallest_scenario(transfer_examples: Path, tmp_path: Path) -> None:
    """Test AUC on `new`: msit above both, and the one-sided 95 % paired-bootstrap bound of the margin (resampling
    test rows, both models scored on the same resample) above zero: seed noise alone cannot explain it. Validation
    only picks each run's best checkpoint; the claim is made on rows that played no part in that choice."""
    meta = DatasetMeta.load(transfer_examples)
    train_rows = {name: stats.rows for name, stats in meta.splits["train"].scenarios.items()}
    smallest = min(train_rows, key=train_rows.get)
    assert smallest == "new" and train_rows[smallest] < 0.1 * sum(train_rows.values())
    aucs, probs = {}, {}
    for variant in ("msit", "din", "shared"):
        config = fit_config(variant, SAME_BUDGET)
        result = fit(config, transfer_examples, tmp_path / variant)
        prob, labels, scenarios = predictions(
            plain_model(config, transfer_examples, Path(result.best_checkpoint)), transfer_examples, "test"
        )
        rows = scenarios == meta.scenarios.index(smallest)
        probs[variant], small_labels = prob[rows], labels[rows]
        aucs[variant] = roc_auc_score(small_labels, probs[variant])
    margins = {v: paired_bootstrap_lower_bound(small_labels, probs["msit"], probs[v]) for v in ("din", "shared")}
    print(f"test AUC on {smallest} ({len(small_labels)} rows): {aucs}; "
          f"paired-bootstrap 5th percentile of msit's margin: {margins}")
    assert aucs["msit"] > aucs["din"] and aucs["msit"] > aucs["shared"], aucs
    assert min(margins.values()) > 0, margins
