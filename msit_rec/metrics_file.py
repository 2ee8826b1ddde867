"""What `msit-rec evaluate` saves and `msit-rec compare` reads: `metrics.json` and `scores.parquet`.

`metrics.json` (versioned) holds every model's per-scenario and overall metrics, the run and checkpoint (epoch, step)
each model is, and the provenance of the evaluation (versions, git commit, host); `scores.parquet` next to it holds
one row per test example (row_index, scenario, user_id, label) and one score column per model, so that a later
comparison can pair models on the same rows without re-scoring. Kept apart from `evaluate` so that reading
results never imports the model stack.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from msit_rec.config import load_versioned_json, to_dict
from msit_rec.errors import DataError
from msit_rec.metrics import ScoredRows, SliceMetrics, SplitMetrics
from msit_rec.provenance import CheckpointPosition, Provenance

METRICS_VERSION = 1
METRICS_FILE = "metrics.json"
SCORES_FILE = "scores.parquet"
ROW_COLUMNS = ("row_index", "scenario", "user_id", "label")


@dataclass
class ModelMetrics:
    """One model evaluated on one split."""

    checkpoint: str
    dataset_hash: str
    split: str
    scores_column: str  # the column of scores.parquet holding this model's scores
    scenarios: dict[str, SliceMetrics]
    overall: SliceMetrics
    # later additions, None in files written before them
    run_dir: str | None = None  # the run directory (absolute): how `msit-rec runs` finds a run's evaluation
    checkpoint_position: CheckpointPosition | None = None

    @property
    def metrics(self) -> SplitMetrics:
        return SplitMetrics(scenarios=self.scenarios, overall=self.overall)


@dataclass
class MetricsFile:
    version: int
    models: dict[str, ModelMetrics]
    scores_file: str | None  # relative to metrics.json; None when no scores were saved
    provenance: Provenance | None = None  # of the evaluate run (None in files written before it was recorded)


def score_column(model_name: str) -> str:
    return f"score_{model_name}"


def save_metrics(metrics: MetricsFile, out_dir: Path) -> Path:
    path = out_dir / METRICS_FILE
    path.write_text(json.dumps(to_dict(metrics), indent=2) + "\n")
    return path


def metrics_path(path: str | Path) -> Path:
    """`metrics.json` itself, or the directory holding it (an evaluate --out directory)."""
    path = Path(path)
    candidate = path / METRICS_FILE if path.is_dir() else path
    if not candidate.is_file():
        raise DataError(f"{path}: no {METRICS_FILE} here; give a metrics.json or a `msit-rec evaluate --out` directory")
    return candidate


def load_metrics(path: str | Path) -> MetricsFile:
    return load_versioned_json(metrics_path(path), MetricsFile, "version", METRICS_VERSION, "metrics")


def write_scores(rows: ScoredRows, scores: dict[str, torch.Tensor], path: Path) -> None:
    """The rows (canonical order) and one score column per model (`scores[name]` aligned with `rows`)."""
    columns = {
        "row_index": rows.row_index.cpu().numpy(),
        "scenario": rows.scenario.cpu().numpy().astype(np.int32),
        "user_id": rows.user_id.cpu().numpy(),
        "label": rows.label.cpu().numpy().astype(np.float32),
    }
    columns.update({score_column(name): score.cpu().numpy() for name, score in scores.items()})
    pq.write_table(pa.table(columns), path)


def read_scores(path: Path, columns: list[str]) -> dict[str, torch.Tensor]:
    """The row columns (row_index, scenario, user_id, label) and the given score columns, rows in row order."""
    if not path.is_file():
        raise DataError(f"{path}: scores file missing (written by `msit-rec evaluate` next to metrics.json)")
    try:
        table = pq.read_table(path, columns=[*ROW_COLUMNS, *columns])
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: cannot read the columns {[*ROW_COLUMNS, *columns]} ({exc})") from None
    data = {name: torch.from_numpy(table.column(name).to_numpy().copy()) for name in table.column_names}
    order = torch.argsort(data["row_index"])
    return {name: values[order] for name, values in data.items()}
