"""What a fit logged (RUN/logs/version_0/metrics.csv) and the same validation metrics recomputed from a checkpoint
with scikit-learn: the oracle of tests/test_fit_monitoring.py and tests/test_terminal.py."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import log_loss, roc_auc_score

from msit_rec.data.loader import ExamplesDataset, make_loader
from msit_rec.data.spec import DatasetMeta
from msit_rec.run_dir import load_model, read_run, resolve_checkpoint


def logged_rows(run_dir: Path) -> list[dict[str, float]]:
    """The rows of the run's CSV log, each with only the columns it has a value in (floats)."""
    (path,) = sorted((run_dir / "logs").glob("version_*/metrics.csv"))
    with path.open(newline="") as f:
        return [{key: float(value) for key, value in row.items() if value != ""} for row in csv.DictReader(f)]


def validations(run_dir: Path) -> list[dict[str, float]]:
    """One row per validation, in order."""
    return [row for row in logged_rows(run_dir) if "val/auc" in row]


def valid_predictions(run_dir: Path, checkpoint: str) -> dict[str, np.ndarray]:
    """prob, label, scenario and user of every valid row, scored by a plain model loaded from `checkpoint`."""
    run = read_run(run_dir)
    meta = DatasetMeta.load(run.data_dir)
    model = load_model(run, resolve_checkpoint(run, checkpoint), meta, torch.device("cpu"))
    parts: dict[str, list[torch.Tensor]] = {"prob": [], "label": [], "scenario": [], "user": []}
    with torch.no_grad():
        for batch in make_loader(ExamplesDataset(run.data_dir, "valid", 4096)):
            real = batch.weight > 0
            parts["prob"].append(torch.sigmoid(model(batch))[real])
            parts["label"].append(batch.label[real])
            parts["scenario"].append(batch.scenario[real])
            parts["user"].append(batch.user_id[real])
    return {key: torch.cat(values).numpy() for key, values in parts.items()}


def _gauc(prob: np.ndarray, label: np.ndarray, user: np.ndarray) -> float:
    """Per-user AUC weighted by the user's rows, over the users with both classes."""
    total = weighted = 0.0
    for u in np.unique(user):
        rows = user == u
        if 0 < label[rows].sum() < rows.sum():
            weighted += rows.sum() * roc_auc_score(label[rows], prob[rows])
            total += rows.sum()
    return weighted / total if total else float("nan")


def sklearn_validation_metrics(rows: dict[str, np.ndarray], scenarios: list[str]) -> dict[str, float]:
    """The val/* metrics fit logs, from scikit-learn: AUC and GAUC overall and per scenario, logloss, mean scenario
    AUC."""
    prob, label = rows["prob"].astype(np.float64), rows["label"]
    scenario, user = rows["scenario"], rows["user"]
    expected = {"val/auc": roc_auc_score(label, prob), "val/logloss": log_loss(label, prob),
                "val/gauc": _gauc(prob, label, user)}
    aucs = []
    for s, name in enumerate(scenarios):
        here = scenario == s
        expected[f"val/auc_{name}"] = roc_auc_score(label[here], prob[here])
        expected[f"val/gauc_{name}"] = _gauc(prob[here], label[here], user[here])
        aucs.append(expected[f"val/auc_{name}"])
    expected["val/scenario_auc"] = float(np.mean(aucs))
    return expected
