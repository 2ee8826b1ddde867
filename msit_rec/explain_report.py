"""The human side of `msit-rec explain`: Markdown tables and heatmaps of what explain.json holds.

Every matrix has a row per served scenario and a column per source scenario (where the behaviours happened). The
transfer table adds an `overall` row (all rows of the split). Undefined values read "n/a"; a heatmap leaves their
cell blank. Matplotlib is used through `Figure` objects, as in msit_rec/report.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from matplotlib.figure import Figure

from msit_rec.report import NA, REPORT_FILE

if TYPE_CHECKING:
    from msit_rec.explain import Explanation, TransferCell

TRANSFER_AUC_PLOT = "transfer_auc.png"
TRANSFER_LOGIT_PLOT = "transfer_logit.png"
GATE_PLOT = "gate.png"
GATE_AGE_PLOT = "gate_by_age.png"
ATTENTION_PLOT = "attention.png"
EXPLAIN_REPORT_OUTPUTS = (
    REPORT_FILE, TRANSFER_AUC_PLOT, TRANSFER_LOGIT_PLOT, GATE_PLOT, GATE_AGE_PLOT, ATTENTION_PLOT
)

Matrix = dict[str, dict[str, float | None]]  # served → source → value


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in rows])


def _drop(cell: TransferCell) -> str:
    if cell.auc_drop is None:
        return NA
    interval = "" if cell.ci_low is None else f" [{cell.ci_low:+.4f}, {cell.ci_high:+.4f}]"
    return f"{cell.auc_drop:+.4f}{interval}{' *' if cell.excludes_zero else ''}"


def transfer_table(explanation: Explanation) -> str:
    """Markdown: served scenario (and overall) × source scenario, AUC drop with its interval."""
    transfer = explanation.transfer
    header = ["served \\ without", "rows", "AUC", *explanation.scenarios]
    rows = [
        [served, f"{transfer.rows[served]:,}", _fixed(transfer.auc[served], 4),
         *(_drop(cells[source]) for source in explanation.scenarios)]
        for served, cells in transfer.cells.items()
    ]
    legend = (
        f"AUC(original) − AUC(without the column's behaviours) on the rows served in the row's scenario, with its "
        f"{100 * transfer.level:g}% paired bootstrap interval ({transfer.resamples} resamples of the rows, drawn within "
        f"each served scenario; seed {transfer.seed}). * = the interval excludes 0. Positive: the model uses those "
        "behaviours to rank that scenario's impressions."
    )
    return "## Transfer by intervention: AUC lost\n\n" + _markdown(header, rows) + "\n\n" + legend


def logit_table(explanation: Explanation) -> str:
    """Markdown: mean |Δ logit| per served × source, with the share of rows that had a behaviour from the source."""
    header = ["served \\ without", *explanation.scenarios]
    rows = [
        [served, *(f"{_fixed(c.mean_abs_logit_change, 4)} ({_percent(c.rows_with_source)})" for c in cells.values())]
        for served, cells in explanation.transfer.cells.items()
    ]
    legend = ("Mean |logit(original) − logit(without the column's behaviours)| over every row served in the row's "
              "scenario (rows without such a behaviour count 0: their logit does not move); in brackets, the share of "
              "rows with at least one behaviour from the column's scenario.")
    return "## Transfer by intervention: mean |Δ logit|\n\n" + _markdown(header, rows) + "\n\n" + legend


def matrix_table(
    title: str, matrix: Matrix, fmt: Callable[[float | None], str], legend: str, columns: str = "source"
) -> str:
    header = [f"served \\ {columns}", *next(iter(matrix.values()))]
    rows = [[served, *(fmt(v) for v in values.values())] for served, values in matrix.items()]
    return f"## {title}\n\n" + _markdown(header, rows) + "\n\n" + legend


def top_table(explanation: Explanation) -> str:
    """Markdown: per served scenario and sequence feature, the most attended behaviour values."""
    intro = (
        f"## Most attended behaviours\n\nPer served scenario, the behaviour values with the largest mean attention "
        f"weight α over their occurrences in that scenario's histories, among those seen at least "
        f"{explanation.min_occurrences} times; sources: where those occurrences happened."
    )
    parts = [intro]
    for served, features in explanation.top.items():
        for feature, behaviours in features.items():
            rows = [
                [str(b.raw) if b.raw is not None else f"#{b.index}", f"{b.mean_attention:+.4f}", f"{b.count:,}",
                 ", ".join(f"{source} {n:,}" for source, n in b.sources.items())]
                for b in behaviours
            ]
            table = _markdown(["value", "mean α", "count", "sources"], rows) if rows else "(none seen often enough)"
            parts.append(f"### {served}: {feature}\n\n{table}")
    return "\n\n".join(parts)


def _fixed(value: float | None, digits: int) -> str:
    return NA if value is None else f"{value:.{digits}f}"


def _percent(value: float | None) -> str:
    return NA if value is None else f"{value:.0%}"


def plot_heatmap(
    matrix: Matrix, title: str, label: str, path: Path, centred: bool = False, marked: Matrix | None = None,
    fmt: str = "{:.3f}", xlabel: str = "source scenario (where the behaviours happened)",
) -> Path:
    """Served (rows) × source (columns) heatmap, each cell annotated; `centred`: a diverging scale around 0.
    `marked` cells (truthy values) get a star."""
    served = list(matrix)
    sources = list(next(iter(matrix.values())))
    values = [[math.nan if matrix[s][t] is None else matrix[s][t] for t in sources] for s in served]
    finite = [abs(v) for row in values for v in row if not math.isnan(v)]
    figure = Figure(figsize=(1.1 * len(sources) + 3, 0.8 * len(served) + 2), layout="constrained")
    ax = figure.subplots()
    if centred:
        bound = max(finite, default=1.0) or 1.0
        image = ax.imshow(values, cmap="RdBu_r", vmin=-bound, vmax=bound)
    else:
        image = ax.imshow(values, cmap="viridis")
    for i, s in enumerate(served):
        for j, t in enumerate(sources):
            if not math.isnan(values[i][j]):
                star = " *" if marked is not None and marked[s][t] else ""
                ax.text(j, i, fmt.format(values[i][j]) + star, ha="center", va="center", fontsize=8,
                        color=_text_colour(float(image.norm(values[i][j])), centred))
    ax.set_xticks(range(len(sources)), sources, rotation=30, ha="right")
    ax.set_yticks(range(len(served)), served)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("served scenario")
    ax.set_title(title)
    figure.colorbar(image, ax=ax, label=label)
    figure.savefig(path, dpi=110)
    return path


def _text_colour(level: float, centred: bool) -> str:
    """White on the dark ends of the colour map (both ends of RdBu, the low end of viridis), else black."""
    dark = abs(level - 0.5) > 0.3 if centred else level < 0.6
    return "white" if dark else "black"


def write_explain_report(explanation: Explanation, out_dir: Path) -> list[Path]:
    """report.md and the heatmaps (gate.png, gate_by_age.png and attention.png only for variants that have them);
    returns paths."""
    scenarios = explanation.scenarios
    cells = {s: explanation.transfer.cells[s] for s in scenarios}  # the heatmaps leave out the overall row
    drops = {s: {t: c.auc_drop for t, c in row.items()} for s, row in cells.items()}
    significant = {s: {t: float(c.excludes_zero) for t, c in row.items()} for s, row in cells.items()}
    changes = {s: {t: c.mean_abs_logit_change for t, c in row.items()} for s, row in cells.items()}
    plots = [
        plot_heatmap(drops, "AUC lost without the source's behaviours (* : CI excludes 0)", "AUC drop",
                     out_dir / TRANSFER_AUC_PLOT, centred=True, marked=significant, fmt="{:+.4f}"),
        plot_heatmap(changes, "mean |Δ logit| without the source's behaviours", "mean |Δ logit|",
                     out_dir / TRANSFER_LOGIT_PLOT),
    ]
    behaviours = {s: {t: float(n) for t, n in row.items()} for s, row in explanation.behaviours.items()}
    sections = [
        transfer_table(explanation), logit_table(explanation),
        matrix_table("Behaviours per served × source scenario", behaviours, lambda v: f"{v:,.0f}",
                     "Behaviours in the histories of the explained rows, by where they happened."),
    ]
    if explanation.gate is not None:
        plots.append(plot_heatmap(explanation.gate, "mean transfer weight g", "mean g", out_dir / GATE_PLOT))
        sections.append(matrix_table(
            "Scenario gate", explanation.gate, lambda v: _fixed(v, 3),
            "Mean over the behaviours from the column's scenario in rows served in the row's scenario of the "
            "transfer weight g = 2σ(w_s·b_j + a_s·e(s_j) + c_s + U_s[s_j, v_j] + r_s[age bucket]) that multiplies "
            "their attention weight (U: with behaviour feedback v_j): 1 is neutral (a fresh gate), above 1 the served "
            "scenario counts them more, below less.",
        ))
        plots.append(plot_heatmap(explanation.gate_by_age, "mean transfer weight g by behaviour age", "mean g",
                                  out_dir / GATE_AGE_PLOT, xlabel="age of the behaviour (0 = the most recent)"))
        sections.append(matrix_table(
            "Scenario gate by behaviour age", explanation.gate_by_age, lambda v: _fixed(v, 3),
            "Mean transfer weight g of the behaviours of each age (0 = the user's most recent behaviour before the "
            "impression, 1–2 the two before it, ...) in rows served in the row's scenario: how far back each "
            "scenario lets the user's interest reach.", columns="age",
        ))
    if explanation.attention is not None:
        plots.append(plot_heatmap(explanation.attention, "share of attention mass Σ|α|", "share",
                                  out_dir / ATTENTION_PLOT))
        sections.append(matrix_table(
            "Attention", explanation.attention, _percent,
            "Share of the attention mass Σ|α_j| of the rows served in the row's scenario that falls on behaviours "
            "from the column's scenario (each row sums to 100%).",
        ))
    if explanation.top is not None:
        sections.append(top_table(explanation))
    title = (f"# Explanation of {explanation.variant} ({explanation.run}) on split '{explanation.split}' "
             f"(dataset {explanation.dataset_hash[:12]}, {explanation.rows:,} rows)")
    images = [f"![{path.stem}]({path.name})" for path in plots]
    report = out_dir / REPORT_FILE
    report.write_text("\n\n".join([title, *sections, *images]) + "\n")
    return [report, *plots]
