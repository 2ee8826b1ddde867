"""The human side of an evaluation: a per-scenario Markdown table and PNG plots, from metrics alone.

Rows are the scenarios plus `overall`; the data columns (rows, clicks, observed CTR) come once, then one column
group per model. With several models the best value of each row is bold. Plots: AUC and GAUC bars per scenario
for every model, and a reliability (calibration) curve per scenario. Undefined values read "n/a", never 0.5.
Matplotlib is used through `Figure` objects (no pyplot state, no display needed).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from matplotlib.figure import Figure

from msit_rec.metrics import SliceMetrics, SplitMetrics

REPORT_FILE = "report.md"
AUC_PLOT = "auc_gauc.png"
RELIABILITY_PLOT = "reliability.png"
REPORT_OUTPUTS = (REPORT_FILE, AUC_PLOT, RELIABILITY_PLOT)
OVERALL = "overall"
NA = "n/a"


def _percent(value: float | None) -> str:
    return NA if value is None else f"{value:.2%}"


def _fixed(digits: int) -> Callable[[float | None], str]:
    return lambda value: NA if value is None else f"{value:.{digits}f}"


def _calibration_error(value: float | None) -> float | None:
    return None if value is None or value <= 0 else abs(math.log(value))


# (header, value of a slice, its format, key to minimise for "best", or None: not ranked)
MODEL_COLUMNS: list[tuple[str, Callable[[SliceMetrics], float | None], Callable, Callable | None]] = [
    ("AUC", lambda m: m.auc, _fixed(4), lambda v: -v),
    ("GAUC", lambda m: m.gauc, _fixed(4), lambda v: -v),
    ("logloss", lambda m: m.logloss, _fixed(4), lambda v: v),
    ("pred CTR", lambda m: m.predicted_ctr, _percent, None),
    ("calibration", lambda m: m.calibration, _fixed(3), _calibration_error),
]
LEGEND = (
    "calibration = predicted CTR / observed CTR (1 is perfect). GAUC = per-user AUC averaged with impression "
    "weights over users with both clicks and non-clicks. n/a = undefined (no clicks or no non-clicks in the slice)."
)


def slices(metrics: SplitMetrics) -> dict[str, SliceMetrics]:
    """Scenarios in id order, then overall."""
    return {**metrics.scenarios, OVERALL: metrics.overall}


def metrics_table(models: dict[str, SplitMetrics]) -> str:
    """Markdown table: rows = scenarios + overall; columns = data columns, then one group per model."""
    names = list(models)
    reference = slices(next(iter(models.values())))
    several = len(names) > 1
    header = ["scenario", "rows", "clicks", "CTR"]
    for name in names:
        header += [f"{title} ({name})" if several else title for title, *_ in MODEL_COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    per_model = {name: slices(metrics) for name, metrics in models.items()}
    for row, data in reference.items():
        cells = [row, f"{data.count:,}", f"{data.clicks:,}", _percent(data.observed_ctr)]
        model_cells: dict[str, list[str]] = {name: [] for name in names}
        for _, value_of, fmt, best_key in MODEL_COLUMNS:
            values = {name: value_of(per_model[name][row]) for name in names}
            best = _best(values, best_key) if several and best_key is not None else set()
            for name in names:
                text = fmt(values[name])
                model_cells[name].append(f"**{text}**" if name in best else text)
        for name in names:
            cells += model_cells[name]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _best(values: dict[str, float | None], key: Callable[[float], float | None]) -> set[str]:
    """Models whose value is best (ties: all of them); none when fewer than two models have a value."""
    keyed = {name: key(v) for name, v in values.items() if v is not None}
    keyed = {name: k for name, k in keyed.items() if k is not None}
    if len(keyed) < 2:
        return set()
    top = min(keyed.values())
    return {name for name, k in keyed.items() if k == top}


def plot_auc_bars(models: dict[str, SplitMetrics], path: Path) -> Path:
    """AUC and GAUC per scenario (and overall), one bar per model; undefined values are marked n/a."""
    rows = list(slices(next(iter(models.values()))))
    figure = Figure(figsize=(max(6.0, 1.2 * len(rows) * max(1, len(models)) / 2 + 3), 7), layout="constrained")
    axes = figure.subplots(2, 1, sharex=True)
    width = 0.8 / len(models)
    for ax, (title, value_of) in zip(axes, (("AUC", lambda m: m.auc), ("GAUC", lambda m: m.gauc))):
        defined = [value_of(s) for m in models.values() for s in slices(m).values() if value_of(s) is not None]
        low = max(0.0, min(defined, default=0.5) - 0.05)
        high = min(1.0, max(defined, default=0.5) + 0.03)
        for k, (name, metrics) in enumerate(models.items()):
            values = [value_of(s) for s in slices(metrics).values()]
            xs = [i + (k - (len(models) - 1) / 2) * width for i in range(len(rows))]
            bars = ax.bar(xs, [v if v is not None else 0.0 for v in values], width, label=name)
            for x, v, bar in zip(xs, values, bars):
                text = NA if v is None else f"{v:.3f}"
                ax.text(x, (v if v is not None else low) + 0.002, text, ha="center", va="bottom", fontsize=7,
                        rotation=90 if len(models) > 2 else 0)
        ax.set_ylim(low, high + 0.02)
        ax.set_ylabel(title)
        ax.set_title(f"{title} per scenario")
        ax.grid(axis="y", alpha=0.3)
    axes[-1].set_xticks(range(len(rows)), rows)
    axes[0].legend(loc="upper left", fontsize=8)
    figure.savefig(path, dpi=110)
    return path


def plot_reliability(models: dict[str, SplitMetrics], path: Path) -> Path:
    """Observed vs predicted CTR per score quantile, one panel per scenario (and overall); diagonal = calibrated."""
    rows = list(slices(next(iter(models.values()))))
    columns = min(3, len(rows))
    lines = -(-len(rows) // columns)
    figure = Figure(figsize=(4.2 * columns, 3.8 * lines), layout="constrained")
    axes = figure.subplots(lines, columns, squeeze=False).ravel()
    for ax, row in zip(axes, rows):
        top = 0.0
        for name, metrics in models.items():
            bins = slices(metrics)[row].reliability
            if bins:
                predicted, observed = [b.predicted for b in bins], [b.observed for b in bins]
                ax.plot(predicted, observed, marker="o", markersize=3, label=name)
                top = max(top, *predicted, *observed)
        if top == 0.0:
            ax.text(0.5, 0.5, "no rows" if not slices(next(iter(models.values())))[row].count else "all zero",
                    ha="center", va="center", transform=ax.transAxes)
            top = 1.0
        ax.plot([0, top * 1.05], [0, top * 1.05], color="grey", linestyle="--", linewidth=0.8)
        ax.set_xlim(0, top * 1.05)
        ax.set_ylim(0, top * 1.05)
        ax.set_title(row)
        ax.set_xlabel("mean predicted CTR")
        ax.set_ylabel("observed CTR")
        ax.grid(alpha=0.3)
    for ax in axes[len(rows):]:
        ax.set_visible(False)
    axes[0].legend(fontsize=8)
    figure.suptitle("Reliability per scenario (equal-count score bins)")
    figure.savefig(path, dpi=110)
    return path


def write_report(
    models: dict[str, SplitMetrics], out_dir: Path, title: str, sections: list[str] | None = None
) -> list[Path]:
    """report.md (title, table, legend, extra `sections`, plots) and the two PNGs; returns their paths."""
    auc_plot = plot_auc_bars(models, out_dir / AUC_PLOT)
    reliability_plot = plot_reliability(models, out_dir / RELIABILITY_PLOT)
    parts = [f"# {title}", metrics_table(models), LEGEND]
    if len(models) > 1:
        parts.append("Bold: the row's best model (AUC, GAUC: highest; logloss: lowest; calibration: closest to 1).")
    parts += list(sections or [])
    parts += [f"![AUC and GAUC per scenario]({AUC_PLOT})", f"![Reliability per scenario]({RELIABILITY_PLOT})"]
    report = out_dir / REPORT_FILE
    report.write_text("\n\n".join(parts) + "\n")
    return [report, auc_plot, reliability_plot]
