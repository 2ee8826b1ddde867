"""Parity of an exported program against the trained model on the same rows: the gate `export` runs.

fp32 tables must reproduce the model's logits (max |Δ logit| bound); quantised tables change logits by design,
so there the bound is on the ranking quality: per-scenario AUC drop of the artifact's scores against the model's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from msit_rec.data.batch import Batch
from msit_rec.errors import ConfigError, DataError
from msit_rec.export.inputs import batch_to_inputs
from msit_rec.metrics import auc
from msit_rec.serving.contract import InputSchema, ParityReport, Precision, ScenarioParity

FP32_LOGIT_TOLERANCE = 1e-5
QUANTISED_AUC_DROP = 1e-3


@dataclass
class ParityBounds:
    """What must hold for the artifact to pass; None = not checked (the figure is still reported)."""

    max_logit_diff: float | None
    max_auc_drop: float | None

    @classmethod
    def for_precision(cls, precision: dict[str, Precision], compute: str = "fp32") -> ParityBounds:
        """fp32 everywhere: the logits within float rounding; any lower precision: the AUC per scenario."""
        if compute == "fp32" and all(p == "fp32" for p in precision.values()):
            return cls(FP32_LOGIT_TOLERANCE, None)
        return cls(None, QUANTISED_AUC_DROP)

    def overridden(self, max_logit_diff: float | None, max_auc_drop: float | None) -> ParityBounds:
        """These bounds with the given (non-None) ones replaced; a bound must be ≥ 0."""
        for name, value in (("max_logit_diff", max_logit_diff), ("max_auc_drop", max_auc_drop)):
            if value is not None and not value >= 0:
                raise ConfigError(f"--{name} must be ≥ 0, got {value}")
        return ParityBounds(
            max_logit_diff if max_logit_diff is not None else self.max_logit_diff,
            max_auc_drop if max_auc_drop is not None else self.max_auc_drop,
        )


@dataclass
class PairedLogits:
    """The model's and the artifact's logits on the same real rows (float64 on the host)."""

    model: torch.Tensor  # [N]
    artifact: torch.Tensor  # [N]
    label: torch.Tensor  # [N]
    scenario: torch.Tensor  # [N] int64


def paired_logits(
    model: nn.Module, program: Callable[..., tuple[torch.Tensor, ...]], batches: Iterable[Batch], schema: InputSchema,
    device: torch.device, max_rows: int | None = None, total: int | None = None, progress: bool = True,
) -> PairedLogits:
    """Feed every batch to both; keep real (weight > 0) rows, at most `max_rows` of them."""
    host = torch.device("cpu")
    parts: list[tuple[torch.Tensor, ...]] = []
    kept = 0
    with torch.no_grad():
        for batch in tqdm(batches, total=total, desc="parity", unit="batch", disable=not progress):
            if max_rows is not None and kept >= max_rows:
                break
            batch = batch.to(device)
            expected = model(batch)  # [B]
            got = program(*batch_to_inputs(batch, schema))[0]  # [B]
            real = batch.weight > 0
            columns = (expected[real], got[real], batch.label[real], batch.scenario[real])
            if max_rows is not None:
                columns = tuple(c[: max_rows - kept] for c in columns)
            kept += int(columns[0].shape[0])
            parts.append(tuple(c.to(host) for c in columns))
    if not parts or kept == 0:
        raise DataError("parity: no rows to compare (the split is empty)")
    model_logits, artifact_logits, label, scenario = (torch.cat(c) for c in zip(*parts))
    return PairedLogits(model_logits.double(), artifact_logits.double(), label.double(), scenario.long())


def parity_report(
    pairs: PairedLogits, split: str, scenarios: list[str], bounds: ParityBounds, table_bytes_fp32: int,
    table_bytes_artifact: int,
) -> ParityReport:
    diff = (pairs.model - pairs.artifact).abs()
    max_diff = float(diff.max()) if not bool(diff.isnan().any()) else math.inf  # a NaN never passes
    non_finite = [int((~torch.isfinite(logits)).sum()) for logits in (pairs.model, pairs.artifact)]
    per_scenario = {}
    for sid, name in enumerate(scenarios):
        mine = pairs.scenario == sid
        auc_model = auc(pairs.model[mine], pairs.label[mine]) if bool(mine.any()) else None
        auc_artifact = auc(pairs.artifact[mine], pairs.label[mine]) if bool(mine.any()) else None
        drop = auc_model - auc_artifact if auc_model is not None and auc_artifact is not None else None
        per_scenario[name] = ScenarioParity(int(mine.sum()), auc_model, auc_artifact, drop)
    passed = True
    if bounds.max_logit_diff is not None:
        passed &= max_diff <= bounds.max_logit_diff
    if bounds.max_auc_drop is not None:
        passed &= all(s.auc_drop <= bounds.max_auc_drop for s in per_scenario.values() if s.auc_drop is not None)
    return ParityReport(
        split=split,
        rows=int(pairs.model.shape[0]),
        max_abs_logit_diff=max_diff,
        tolerance=bounds.max_logit_diff,
        max_auc_drop=bounds.max_auc_drop,
        scenarios=per_scenario,
        table_bytes_fp32=table_bytes_fp32,
        table_bytes_artifact=table_bytes_artifact,
        passed=bool(passed) and not any(non_finite),
        non_finite_model=non_finite[0],
        non_finite_artifact=non_finite[1],
    )


def failure_cause(report: ParityReport) -> str:
    """The first thing to fix when parity fails: non-finite logits make every other figure meaningless."""
    if report.non_finite_model or report.non_finite_artifact:
        return (f"non-finite logits (NaN/inf) on {report.non_finite_model:,} rows from the trained model and "
                f"{report.non_finite_artifact:,} from the artifact, of {report.rows:,}")
    if report.tolerance is not None and not report.max_abs_logit_diff <= report.tolerance:
        return f"max |Δ logit| {report.max_abs_logit_diff:.3g} exceeds the bound {report.tolerance:g}"
    return f"a scenario's AUC drop exceeds the bound {report.max_auc_drop:g}"


def describe_parity(report: ParityReport) -> str:
    """One paragraph for the CLI summary and for error messages."""
    lines = [
        f"parity on {report.rows:,} '{report.split}' rows: max |Δ logit| {report.max_abs_logit_diff:.3g}"
        + (f" (bound {report.tolerance:g})" if report.tolerance is not None else ""),
    ]
    for name, s in report.scenarios.items():
        if s.auc_drop is not None:
            lines.append(f"  {name:<12} rows {s.rows:>9,}  AUC model {s.auc_model:.5f}  artifact {s.auc_artifact:.5f}"
                         f"  drop {s.auc_drop:+.5f}")
        else:
            lines.append(f"  {name:<12} rows {s.rows:>9,}  AUC undefined (one class)")
    if report.max_auc_drop is not None:
        lines.append(f"  per-scenario AUC drop bound {report.max_auc_drop:g}")
    saving = 1 - report.table_bytes_artifact / report.table_bytes_fp32 if report.table_bytes_fp32 else 0.0
    lines.append(f"  tables {report.table_bytes_artifact:,} bytes vs {report.table_bytes_fp32:,} fp32 "
                 f"({saving:.1%} saved); {'PASSED' if report.passed else 'FAILED'}")
    return "\n".join(lines)
