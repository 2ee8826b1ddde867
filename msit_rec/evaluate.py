"""`msit-rec evaluate`: score trained checkpoints on a split and write metrics.json, scores.parquet and the report.

Evaluation runs in one process on the default device: the sharded checkpoint is loaded unsharded into a plain
RankingModel, so every row is scored by one process and the metrics are exact by construction. Under N processes
(e.g. at the end of a distributed job), each rank scores its keep-all share with `score_rows` and
`msit_rec.metrics.gather_scored_rows` collects the rows before the metrics: the numbers are identical.

Before anything is scored, the run is checked against the data: the dataset's content hash must be the one the
run was trained on, and the checkpoint's tensors must match (names and shapes) the model `dataset.json` builds.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from msit_rec import option_defaults as defaults
from msit_rec.data.batch import Batch
from msit_rec.data.loader import ExamplesDataset, make_loader
from msit_rec.data.spec import DatasetMeta
from msit_rec.errors import ConfigError, DataError
from msit_rec.metrics import ScoredRows, compute_metrics
from msit_rec.metrics_file import (
    METRICS_FILE,
    METRICS_VERSION,
    SCORES_FILE,
    MetricsFile,
    ModelMetrics,
    save_metrics,
    score_column,
    write_scores,
)
from msit_rec.outputs import check_no_overlap, check_replaceable_dir, staged_dir
from msit_rec.provenance import collect
from msit_rec.report import REPORT_OUTPUTS, write_report
from msit_rec.run_dir import (
    NAMED_CHECKPOINTS,
    check_dataset,
    checkpoint_position,
    load_model,
    read_run,
    resolve_checkpoint,
)

# Scored rows live in host memory whatever device scores them: the metrics need ~200 bytes per row (more than an
# accelerator holds for tens of millions of rows) and CPU sums are deterministic (CUDA scatter-adds are not).
HOST = torch.device("cpu")


def score_rows(
    model: nn.Module, batches: Iterable[Batch], device: torch.device, total: int | None = None, desc: str = "score",
    progress: bool = True,
) -> ScoredRows:
    """Predicted click probabilities of the real rows of `batches` (padding rows dropped), in host memory."""
    parts = []
    with torch.no_grad():
        for batch in tqdm(batches, total=total, desc=desc, unit="batch", disable=not progress):
            batch = batch.to(device)
            logits = model(batch)  # [B]
            rows = ScoredRows(
                row_index=batch.row_index,
                score=torch.sigmoid(logits.to(torch.float64)),
                label=batch.label,
                scenario=batch.scenario.to(torch.int32),
                user_id=batch.user_id,
            )
            parts.append(rows.select(batch.weight > 0).to(HOST))
    if not parts:
        raise DataError("no batches to score: the split is empty")
    return ScoredRows.concat(parts)


def default_device() -> torch.device:
    """The host's accelerator when it has one (CUDA, ...), else the CPU."""
    accelerator = torch.accelerator.current_accelerator(check_available=True)
    return accelerator if accelerator is not None else HOST


@dataclass
class Evaluation:
    metrics: MetricsFile
    rows: ScoredRows  # canonical order; the score of the first model
    scores: dict[str, torch.Tensor]  # model name → scores aligned with `rows`


def evaluate_runs(
    runs: list[str | Path],
    checkpoint: str = defaults.CHECKPOINT,
    split: str = defaults.SPLIT,
    data_dir: str | Path | None = None,
    batch_size: int = defaults.SCORING_BATCH_ROWS,
    device: torch.device | None = None,
    progress: bool = True,
) -> Evaluation:
    """Score every run's checkpoint on the same split of the same dataset (rows paired across models).

    `checkpoint`: `best`, `last`, or a checkpoint directory (then only one run). `data_dir`: the examples to
    evaluate on (default: the first run's training data); every run must have been trained on that dataset.
    """
    if not runs:
        raise ConfigError("evaluate: give at least one run directory")
    if checkpoint not in NAMED_CHECKPOINTS and len(runs) > 1:
        raise ConfigError(f"--checkpoint {checkpoint}: a checkpoint path needs exactly one --run (got {len(runs)})")
    device = device if device is not None else default_device()
    trained = [read_run(run) for run in runs]
    data_dir = Path(data_dir) if data_dir is not None else trained[0].data_dir
    meta = DatasetMeta.load(data_dir)
    checkpoints = []
    for run in trained:
        check_dataset(run, meta, data_dir)
        checkpoints.append(resolve_checkpoint(run, checkpoint))
    dataset = ExamplesDataset(data_dir, split, batch_size)
    names = model_names([run.run_dir for run in trained])
    models: dict[str, ModelMetrics] = {}
    scores: dict[str, torch.Tensor] = {}
    rows = None
    for name, run, ckpt in zip(names, trained, checkpoints):
        model = load_model(run, ckpt, meta, device)
        scored = score_rows(model, make_loader(dataset), device, len(dataset), f"score {name}", progress).canonical()
        del model
        rows = scored if rows is None else rows
        split_metrics = compute_metrics(scored, meta.scenarios)
        models[name] = ModelMetrics(
            checkpoint=str(ckpt),
            dataset_hash=meta.content_hash,
            split=split,
            scores_column=score_column(name),
            scenarios=split_metrics.scenarios,
            overall=split_metrics.overall,
            run_dir=str(run.run_dir.resolve()),
            checkpoint_position=checkpoint_position(ckpt),
        )
        scores[name] = scored.score
    metrics = MetricsFile(version=METRICS_VERSION, models=models, scores_file=SCORES_FILE, provenance=collect())
    return Evaluation(metrics=metrics, rows=rows, scores=scores)


def model_names(run_dirs: list[Path]) -> list[str]:
    """Run directory names, made unique with a numeric suffix (runs/a/msit and runs/b/msit → msit, msit-2)."""
    names: list[str] = []
    for run_dir in run_dirs:
        base = run_dir.resolve().name
        name, k = base, 1
        while name in names:
            k += 1
            name = f"{base}-{k}"
        names.append(name)
    return names


OUTPUT_FILES = (METRICS_FILE, SCORES_FILE, *REPORT_OUTPUTS)


def check_output_dir(out_dir: Path, overwrite: bool, inputs: Iterable[Path] = ()) -> None:
    """Refuse, before any scoring, an `out_dir` that overlaps an input or holds results without `overwrite`."""
    for path in inputs:
        check_no_overlap(path, out_dir, "input")
    check_replaceable_dir(out_dir, overwrite, OUTPUT_FILES)


def write_evaluation(evaluation: Evaluation, out_dir: str | Path, overwrite: bool = False) -> list[Path]:
    """metrics.json, scores.parquet, report.md and the plots, swapped in together; returns the paths written."""
    out_dir = Path(out_dir)
    with staged_dir(out_dir, overwrite, OUTPUT_FILES) as staging:
        written = [save_metrics(evaluation.metrics, staging)]
        write_scores(evaluation.rows, evaluation.scores, staging / SCORES_FILE)
        written.append(staging / SCORES_FILE)
        split_metrics = {name: model.metrics for name, model in evaluation.metrics.models.items()}
        written += write_report(split_metrics, staging, title=_title(evaluation.metrics))
    return [out_dir / path.name for path in written]


def _title(metrics: MetricsFile) -> str:
    first = next(iter(metrics.models.values()))
    return f"Evaluation on split '{first.split}' (dataset {first.dataset_hash[:12]})"
