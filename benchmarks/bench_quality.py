"""Quality of every model variant, scenario by scenario, under one training budget (issue 4).

Trains `shared`, `din`, `din_sid`, `star`, `pepnet` and `msit` with the same budget (small tower, at most 3 epochs
validated 4 times each with early stopping after 4 validations without gain, same optimisers and batch size; the
checkpoint kept is the best on the validation split) and several seeds
(`trainer.seed`: initialisation and data order; the data stay fixed) on:
- (a) `transfer`: a generated world with planted cross-scenario transfer. Every scenario is lifted by recent clicks
  from one *other* scenario (configs/generate/transfer.yaml), so what a behaviour says depends on where it happened and where the
  impression is: the signal the scenario gate of `msit` is built for. Static interest is weak.
- (b) `movielens`: ml-latest-small from ../shared/data (scenario = group of the movie's first genre, click =
  rating >= 4, time split; histories of every rated movie with its rating as feedback: configs/datasets/
  movielens.yaml). Skipped, with a message, when the folder is absent.
- (c) `movielens_shelves`: the same ratings with scenario = the movie's popularity shelf (head / torso / tail;
  configs/datasets/movielens_shelves.yaml): users cross shelves as much as genre groups, CTR differs far more.
- (d) `movielens_sessions`: the same ratings with scenario = the context of the rating in the user's activity
  (onboarding session / start of a later visit / rest of it; configs/datasets/movielens_sessions.yaml): unlike (b)
  and (c) the scenario is not a function of the movie, as in a real product, where one item shows on every surface.

Claims use the paired bootstrap of `msit-rec compare` on the test split, per seed: for every other variant and
slice, the difference to `msit` with its 95 % interval; the report counts the seeds where `msit` is ahead beyond
the interval and where it is behind beyond it. Pooled over the seeds (`compare.paired_bootstrap_over_seeds`): the
mean difference over seeds with an interval from resampling the seeds and the test rows together — the claim the
MovieLens verdict rests on (msit not behind any variant on any scenario beyond it, never below `shared`, and ahead
of the best other variant overall beyond it).

Each fit runs in this process on one device (`msit_rec.train.fit.fit`, devices=1); each seed's six runs are then
scored on the test split in-process (`msit_rec.evaluate.evaluate_runs`: exact per-scenario AUC, GAUC, logloss),
and the per-seed evaluation (metrics.json, report.md, plots) is kept under OUT/runs/DATASET/seedK/evaluation.
Outputs in OUT: quality.md (per dataset and metric: rows = scenarios + overall, columns = variants, mean ± std
over seeds, best mean bold, and the verdict: is `msit` best on every scenario of (a) and on the smallest scenario
of (b)), quality.json (every number, per seed too), quality_auc.png (mean test AUC per scenario and variant,
error bars = std over seeds).

    python benchmarks/bench_quality.py [--quick] [--out benchmarks/results/quality] [--seeds N] [--epochs N]
                                       [--datasets transfer,movielens,movielens_shelves,movielens_sessions] [--reuse]

`--reuse`: keep the finished runs already in OUT that were trained with the very same config on the same data by
the same clean git commit (an interrupted run goes on where it stopped; the evaluations and claims are always
recomputed).
`--quick`: 1 seed, 1 epoch of 60 batches, a smaller generated world: a smoke test of a few minutes on 2 cores. The expected
runtime is printed before training starts (quick mode also extrapolates the full run from its measured speed).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere: the repo's packages come first
    sys.path.insert(0, str(REPO))

from matplotlib.figure import Figure

from msit_rec.config import apply_overrides, from_dict, load_config, read_yaml
from msit_rec.data.spec import DatasetMeta
from msit_rec.fit_config import OptimConfig
from msit_rec.metrics import SliceMetrics, SplitMetrics
from msit_rec.provenance import host_facts
from msit_rec.report import OVERALL, slices

if TYPE_CHECKING:
    from msit_rec.fit_config import FitConfig
    from msit_rec.run_dir import FitResult

VARIANTS = ("shared", "din", "din_sid", "star", "pepnet", "msit")
CANDIDATE = "msit"
METRICS = ("auc", "gauc", "logloss")  # logloss: lower is better
METRIC_TITLES = {"auc": "AUC", "gauc": "GAUC", "logloss": "logloss"}
MOVIELENS_DIR = REPO.parent / "shared" / "data" / "ml-latest-small"

TRANSFER_WORLD = REPO / "configs/generate/transfer.yaml"  # each scenario lifted by clicks from another one
QUICK_WORLD = ["users=1500"]  # overrides of TRANSFER_WORLD
TRANSFER_PREPARE = ["history.max_len=20", "split.valid_fraction=0.1", "split.test_fraction=0.2"]


@dataclass(frozen=True)
class Budget:
    """What every variant gets: the same for all of them, by construction."""

    seeds: int
    epochs: int
    train_batches: int | None = None  # batches per epoch (None: all): how --quick trains on fewer rows
    batch_size: int = 512
    dense_lr: float = 0.003
    tower: tuple[int, ...] = (128, 64)
    # validations per epoch, and validations without improvement before stopping: on MovieLens every variant peaks
    # within its first epoch (small data: the embeddings overfit after one pass), so one validation per epoch kept
    # checkpoints of epoch 1 only, and the later epochs were spent on nothing
    validations_per_epoch: int = 4
    patience: int = 4

    def overrides(self, variant: str, seed: int) -> list[str]:
        return [
            f"model.variant={variant}",
            f"model.tower_hidden={list(self.tower)}",
            f"trainer.max_epochs={self.epochs}",
            f"trainer.val_check_interval={1 / self.validations_per_epoch}",
            f"trainer.early_stopping_patience={self.patience}",
            f"trainer.batch_size={self.batch_size}",
            f"trainer.limit_train_batches={self.train_batches or 1.0}",
            "trainer.eval_batch_size=8192",
            "trainer.devices=1",
            f"trainer.seed={seed}",
            f"trainer.optim.dense_lr={self.dense_lr}",
            "trainer.log_every_n_steps=50",
            "trainer.progress_bar=false",
        ]


    def rows_per_fit(self, train_rows: int) -> int:
        """Training rows one fit goes through (all epochs)."""
        per_epoch = train_rows if self.train_batches is None else min(train_rows, self.train_batches * self.batch_size)
        return per_epoch * self.epochs


FULL = Budget(seeds=5, epochs=3)
# the trainer default every variant gets; it applies to msit only (the one variant whose gate has an age profile)
RECENCY_LR_TEXT = f"msit's gate age profile: × {OptimConfig().recency_lr_scale:g}, the trainer default"
BOOTSTRAP_RESAMPLES = 1000
QUICK = Budget(seeds=1, epochs=1, train_batches=60, validations_per_epoch=1)
# Runtime model for the estimate printed before training, from --quick runs on the idle 2-core dev machine
# (≈ 21k training rows/s on `transfer` (L=20), ≈ 9.5k on MovieLens (L=50), batch 512, validation included):
# seconds per fit = FIT_OVERHEAD_S + training rows of the fit / TRAIN_ROWS_PER_S. A busy machine is slower:
# with a concurrent test run, single fits took 3-30x longer.
FIT_OVERHEAD_S = 2.0
TRAIN_ROWS_PER_S = 12_000.0


# ---- data --------------------------------------------------------------------------------------------------------


def prepare_transfer(root: Path, quick: bool) -> Path:
    from pipelines.config import DatasetConfig
    from pipelines.prepare import prepare
    from pipelines.synthetic import generate
    from pipelines.synthetic_config import GeneratorConfig

    generate(load_config(TRANSFER_WORLD, GeneratorConfig, "generate", QUICK_WORLD if quick else []),
             root / "raw", progress=False, overwrite=True)
    config = load_config(REPO / "configs/datasets/synthetic.yaml", DatasetConfig, "dataset",
                         [f"source.path={root / 'raw'}", *TRANSFER_PREPARE])
    prepare(config, root / "examples", overwrite=True)
    return root / "examples"


MOVIELENS_CONFIGS = {
    "movielens": ("configs/datasets/movielens.yaml", "MovieLens ml-latest-small, scenario = genre group"),
    "movielens_shelves": ("configs/datasets/movielens_shelves.yaml",
                          "MovieLens ml-latest-small, scenario = popularity shelf (head / torso / tail)"),
    "movielens_sessions": ("configs/datasets/movielens_sessions.yaml",
                           "MovieLens ml-latest-small, scenario = session context (onboarding / visit / binge)"),
}


def prepare_movielens(root: Path, config_file: str) -> Path:
    from pipelines.config import DatasetConfig
    from pipelines.prepare import prepare

    config = load_config(REPO / config_file, DatasetConfig, "dataset", [f"source.path={MOVIELENS_DIR}"])
    prepare(config, root / "examples", overwrite=True)
    return root / "examples"


def smallest_scenario(meta: DatasetMeta) -> str:
    """The scenario with the fewest training rows: where transfer from the others should help most."""
    train = meta.splits["train"].scenarios
    return min(train, key=lambda name: train[name].rows)


# ---- training and evaluation -----------------------------------------------------------------------------------


def fit_variant(
    data: Path, variant: str, seed: int, budget: Budget, run_dir: Path, reuse: bool = False
) -> tuple[float | None, float | None]:
    """Train one variant with the shared budget into `run_dir` (replaced); returns its best validation AUC and, when
    an earlier fit was reused instead (`reuse`: a finished run there of this config, data and code), the seconds
    that fit took (else None)."""
    from msit_rec.fit_config import FitConfig
    from msit_rec.train.fit import fit

    sections = {
        "model": read_yaml(REPO / f"configs/model/{variant}.yaml")["model"],
        "trainer": read_yaml(REPO / "configs/trainer/cpu.yaml")["trainer"],
    }
    config = from_dict(FitConfig, apply_overrides(sections, budget.overrides(variant, seed)), "fit")
    if reuse:
        earlier = finished_fit(run_dir, config, DatasetMeta.load(data).content_hash)
        if earlier is not None:
            return earlier.best_val_auc, earlier.wall_seconds or 0.0
    if run_dir.exists():
        shutil.rmtree(run_dir)
    return fit(config, data, run_dir).best_val_auc, None


def finished_fit(run_dir: Path, config: FitConfig, dataset_hash: str) -> FitResult | None:
    """The FitResult of a finished run in `run_dir` trained with `config`'s model and trainer on `dataset_hash` by
    this very code (the same clean git commit as the checkout now); None otherwise — absent, unfinished, trained
    differently, by other code, or when the code cannot be told (no git, uncommitted changes)."""
    from msit_rec.provenance import git_state
    from msit_rec.run_dir import read_fit_result, read_run

    result = read_fit_result(run_dir) if run_dir.is_dir() else None
    if result is None:
        return None
    record = read_run(run_dir).record
    same = (record.model, record.trainer, record.dataset_hash) == (config.model, config.trainer, dataset_hash)
    code = git_state()
    same_code = (code is not None and not code.dirty and result.provenance is not None
                 and result.provenance.git == code)
    return result if same and same_code else None


def evaluate_seed(data: Path, run_dirs: list[Path], out_dir: Path) -> tuple[dict[str, SplitMetrics], dict]:
    """Test-split metrics of each run (paired rows), written as a per-seed report, and the paired bootstrap of every
    variant against the first run (`msit`): {variant: {slice: AucDifference as a dict}}. Run dir name = variant."""
    from msit_rec.compare import compare
    from msit_rec.config import to_dict
    from msit_rec.evaluate import evaluate_runs, write_evaluation

    evaluation = evaluate_runs(run_dirs, "best", "test", data_dir=data, progress=False)
    write_evaluation(evaluation, out_dir / "evaluation", overwrite=True)
    comparison, _ = compare([out_dir / "evaluation"], out_dir / "comparison", resamples=BOOTSTRAP_RESAMPLES,
                            overwrite=True, progress=False)
    metrics = {name: model.metrics for name, model in evaluation.metrics.models.items()}
    return metrics, to_dict(comparison.differences)


def paired_claims(per_seed: list[dict]) -> dict[str, dict[str, dict[str, Any]]]:
    """variant → slice → mean difference to msit over seeds (variant − msit) and the seeds where msit is ahead
    (the interval lies below 0) or behind (above 0) beyond the 95 % interval."""
    claims: dict[str, dict[str, dict[str, Any]]] = {}
    for variant, by_slice in per_seed[0].items():
        claims[variant] = {}
        for slice_name in by_slice:
            cells = [seed[variant][slice_name] for seed in per_seed]
            defined = [c for c in cells if c["difference"] is not None]
            claims[variant][slice_name] = {
                "mean_difference": statistics.fmean(c["difference"] for c in defined) if defined else None,
                "msit_ahead": sum(c["ci_high"] < 0 for c in defined),
                "msit_behind": sum(c["ci_low"] > 0 for c in defined),
                "seeds": len(defined),
            }
    return claims


def claims_section(claims: dict[str, dict[str, dict[str, Any]]]) -> str:
    """Markdown: per slice and variant, mean Δ (variant − msit) and seeds with msit ahead / behind beyond 95 %."""
    variants = list(claims)
    slices_ = list(claims[variants[0]])
    title = ("### Paired bootstrap against `msit` (test split; mean Δ AUC = variant − msit over seeds; "
             "seeds with msit ahead / behind beyond the 95 % interval)")
    lines = [title, "",
             "| slice | " + " | ".join(variants) + " |", "|---|" + "---:|" * len(variants)]
    for slice_name in slices_:
        cells = []
        for v in variants:
            c = claims[v][slice_name]
            mean = "n/a" if c["mean_difference"] is None else f"{c['mean_difference']:+.4f}"
            cells.append(f"{mean} ({c['msit_ahead']}/{c['msit_behind']} of {c['seeds']})")
        lines.append(f"| {slice_name} | " + " | ".join(cells) + " |")
    return "\n".join(lines + [""])


def pooled_claims(runs: Path, seeds: int) -> dict[str, dict[str, dict[str, Any]]]:
    """variant → slice → the mean over seeds of its AUC difference to msit (variant − msit) with the interval of
    `compare.paired_bootstrap_over_seeds`: seeds and test rows resampled together, so the claim holds both noises."""
    import torch

    from msit_rec.compare import collect_models, load_paired_scores, paired_bootstrap_over_seeds
    from msit_rec.config import to_dict
    from msit_rec.errors import DataError

    scores_by_seed, rows = [], None
    for seed in range(seeds):
        evaluation = runs / f"seed{seed}" / "evaluation"
        models, files = collect_models([evaluation])
        label, scenario, scores = load_paired_scores(models, files)
        if rows is None:
            rows = (label, scenario)
        elif not (torch.equal(label, rows[0]) and torch.equal(scenario, rows[1])):
            raise DataError(f"{evaluation}: its test rows differ from seed 0's, so the seeds cannot be paired")
        scores_by_seed.append(scores)
    scenario_names = next(iter(models.values())).scenarios
    differences = paired_bootstrap_over_seeds(label, scenario, scores_by_seed, scenario_names,
                                              resamples=BOOTSTRAP_RESAMPLES)
    return to_dict(differences)


def pooled_section(claims: dict[str, dict[str, dict[str, Any]]], seeds: int) -> str:
    """Markdown: per slice and variant, mean Δ AUC (variant − msit) over seeds with its two-level interval."""
    variants = list(claims)
    title = (f"### Pooled over the {seeds} seeds against `msit` (mean Δ AUC = variant − msit [95 % interval, seeds "
             "and test rows resampled together]; ▲ msit ahead beyond it, ▼ behind beyond it)")
    lines = [title, "",
             "| slice | " + " | ".join(variants) + " |", "|---|" + "---:|" * len(variants)]
    for slice_name in claims[variants[0]]:
        cells = []
        for v in variants:
            c = claims[v][slice_name]
            if c["difference"] is None or c["ci_low"] is None:
                cells.append("n/a")
                continue
            mark = " ▲" if c["ci_high"] < 0 else " ▼" if c["ci_low"] > 0 else ""
            cells.append(f"{c['difference']:+.4f} [{c['ci_low']:+.4f}, {c['ci_high']:+.4f}]{mark}")
        lines.append(f"| {slice_name} | " + " | ".join(cells) + " |")
    return "\n".join(lines + [""])


# ---- aggregation over seeds ------------------------------------------------------------------------------------


def metric_value(metrics: SliceMetrics, metric: str) -> float | None:
    return getattr(metrics, metric)


def summarise(values: list[float | None]) -> dict[str, Any]:
    """Mean and sample std over the seeds where the metric is defined (std None below two values)."""
    defined = [v for v in values if v is not None]
    return {
        "mean": statistics.fmean(defined) if defined else None,
        "std": statistics.stdev(defined) if len(defined) > 1 else None,
        "n": len(defined),
        "values": values,
    }


def aggregate(per_seed: list[dict[str, SplitMetrics]]) -> dict[str, dict[str, dict[str, dict[str, Any]]]]:
    """variant → slice (scenarios, overall) → metric → {mean, std, n, values}."""
    result: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    for variant in per_seed[0]:
        seeds = [slices(seed[variant]) for seed in per_seed]
        result[variant] = {
            name: {metric: summarise([metric_value(s[name], metric) for s in seeds]) for metric in METRICS}
            for name in seeds[0]
        }
    return result


def best_variants(summary: dict, slice_name: str, metric: str) -> list[str]:
    """Variants with the best mean on a slice (several on an exact tie)."""
    means = {v: summary[v][slice_name][metric]["mean"] for v in summary}
    means = {v: m for v, m in means.items() if m is not None}
    if not means:
        return []
    sign = 1.0 if metric == "logloss" else -1.0
    top = min(sign * m for m in means.values())
    return [v for v, m in means.items() if sign * m == top]


def candidate_margin(summary: dict, slice_name: str) -> dict[str, Any]:
    """Mean test AUC of `msit` on a slice against the best other variant."""
    means = {v: summary[v][slice_name]["auc"]["mean"] for v in summary}
    others = {v: m for v, m in means.items() if v != CANDIDATE and m is not None}
    runner_up = max(others, key=others.get) if others else None
    mine = means.get(CANDIDATE)
    margin = mine - others[runner_up] if mine is not None and runner_up is not None else None
    return {
        "scenario": slice_name,
        "msit_auc": mine,
        "msit_std": summary[CANDIDATE][slice_name]["auc"]["std"] if CANDIDATE in summary else None,
        "best_other": runner_up,
        "best_other_auc": others.get(runner_up) if runner_up else None,
        "margin": margin,
        "msit_best": margin is not None and margin > 0,
    }


# ---- reporting -------------------------------------------------------------------------------------------------


def mean_std_text(cell: dict[str, Any]) -> str:
    if cell["mean"] is None:
        return "n/a"
    return f"{cell['mean']:.4f}" + (f" ± {cell['std']:.4f}" if cell["std"] is not None else "")


def dataset_section(name: str, result: dict[str, Any]) -> str:
    summary, counts = result["metrics"], result["test_rows"]
    variants = list(summary)
    lines = [f"## {name}: {result['description']}", ""]
    for metric in METRICS:
        header = ["scenario", "test rows", "clicks", *variants]
        lines += [f"### {METRIC_TITLES[metric]} (test split, mean ± std over {result['seeds']} seed(s))", "",
                  "| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
        for slice_name in counts:
            best = set(best_variants(summary, slice_name, metric))
            cells = [mean_std_text(summary[v][slice_name][metric]) for v in variants]
            cells = [f"**{c}**" if v in best else c for v, c in zip(variants, cells)]
            rows, clicks = counts[slice_name]
            label = f"{slice_name} (smallest)" if slice_name == result["smallest_scenario"] else slice_name
            lines.append("| " + " | ".join([label, f"{rows:,}", f"{clicks:,}", *cells]) + " |")
        lines.append("")
    lines += [claims_section(result["paired_claims"]), pooled_section(result["pooled_claims"], result["seeds"]),
              result["verdict_text"], ""]
    return "\n".join(lines)


def verdict(
    name: str, summary: dict, pooled: dict, scenarios: list[str], smallest: str
) -> tuple[dict[str, Any], str]:
    """(a) `transfer`: msit has the best mean test AUC on every scenario. (b) MovieLens: on every scenario no variant
    is ahead of msit beyond the pooled interval, and msit's mean is not below `shared`'s; overall msit is ahead of
    the best other variant (by mean) beyond the pooled interval."""
    if name == "transfer":
        checks = [candidate_margin(summary, s) for s in scenarios]
        passed = all(c["msit_best"] for c in checks)
        details = "; ".join(
            f"{c['scenario']}: msit {c['msit_auc']:.4f} vs {c['best_other']} {c['best_other_auc']:.4f} "
            f"({c['margin']:+.4f})" if c["margin"] is not None else f"{c['scenario']}: undefined"
            for c in checks
        )
        text = f"**Goal: `msit` has the best mean test AUC on every scenario — {'MET' if passed else 'NOT MET'}.** "
        return {"goal": "every scenario", "met": passed, "checks": checks}, text + details + "."
    behind = sorted({f"{s} ({v})" for v, by_slice in pooled.items() for s in scenarios
                     if by_slice[s]["ci_low"] is not None and by_slice[s]["ci_low"] > 0})
    below_shared = [s for s in scenarios
                    if (summary[CANDIDATE][s]["auc"]["mean"] or 0.0) < (summary["shared"][s]["auc"]["mean"] or 0.0)]
    overall = candidate_margin(summary, OVERALL)
    runner_up = pooled[overall["best_other"]][OVERALL] if overall["best_other"] is not None else None
    defined = runner_up is not None and runner_up["difference"] is not None and runner_up["ci_high"] is not None
    ahead = defined and runner_up["ci_high"] < 0
    passed = not behind and not below_shared and ahead
    versus = (
        f"msit {overall['msit_auc']:.4f} vs {overall['best_other']} {overall['best_other_auc']:.4f} (Δ "
        f"{-runner_up['difference']:+.4f}, interval of variant − msit [{runner_up['ci_low']:+.4f}, "
        f"{runner_up['ci_high']:+.4f}])" if defined else "undefined (an AUC or its interval is missing)"
    )
    text = (
        f"**Goal: `msit` ties or beats every variant on every scenario, is never below `shared`, and beats the best "
        f"other variant overall beyond the pooled 95 % interval — {'MET' if passed else 'NOT MET'}.** Overall: "
        f"{versus}; behind beyond the interval: {', '.join(behind) or 'nowhere'}; below shared: "
        f"{', '.join(below_shared) or 'nowhere'}."
    )
    goal = "ties every scenario, above shared, wins overall beyond the pooled interval"
    return {"goal": goal, "met": passed, "behind": behind, "below_shared": below_shared,
            "overall": overall | {"pooled": runner_up}}, text


def plot_auc(results: dict[str, dict[str, Any]], path: Path) -> Path:
    """One panel per dataset: mean test AUC per scenario (and overall), one bar per variant, error bar = std."""
    figure = Figure(figsize=(11, 4.2 * len(results)), layout="constrained")
    axes = figure.subplots(len(results), 1, squeeze=False).ravel()
    for ax, (name, result) in zip(axes, results.items()):
        summary = result["metrics"]
        rows = list(result["test_rows"])
        width = 0.8 / len(summary)
        with_spread = any(summary[v][r]["auc"]["std"] is not None for v in summary for r in rows)
        means = [summary[v][r]["auc"]["mean"] for v in summary for r in rows]
        defined = [m for m in means if m is not None]
        for k, variant in enumerate(summary):
            cells = [summary[variant][r]["auc"] for r in rows]
            xs = [i + (k - (len(summary) - 1) / 2) * width for i in range(len(rows))]
            ax.bar(xs, [c["mean"] if c["mean"] is not None else 0.0 for c in cells], width, label=variant,
                   yerr=[c["std"] or 0.0 for c in cells] if with_spread else None, capsize=2)
        ax.set_ylim(max(0.0, min(defined, default=0.5) - 0.03), min(1.0, max(defined, default=0.5) + 0.02))
        ax.set_xticks(range(len(rows)), [f"{r}\n(smallest)" if r == result["smallest_scenario"] else r for r in rows])
        ax.set_ylabel("test AUC")
        ax.set_title(f"{name}: mean test AUC per scenario ({result['seeds']} seed(s); error bars = std)")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(loc="upper left", fontsize=8, ncols=len(summary))
    figure.savefig(path, dpi=110)
    return path


# ---- the run ---------------------------------------------------------------------------------------------------


def train_rows(meta: DatasetMeta) -> int:
    return meta.splits["train"].rows


def estimate_seconds(rows: int, budget: Budget, variants: int) -> float:
    return budget.seeds * variants * (FIT_OVERHEAD_S + budget.rows_per_fit(rows) / TRAIN_ROWS_PER_S)


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def run_dataset(
    name: str, data: Path, budget: Budget, out: Path, progress: dict[str, float], reuse: bool = False
) -> dict[str, Any]:
    meta = DatasetMeta.load(data)
    per_seed: list[dict[str, SplitMetrics]] = []
    differences: list[dict] = []
    fit_seconds: dict[str, list[float]] = {v: [] for v in VARIANTS}
    val_auc: dict[str, list[float | None]] = {v: [] for v in VARIANTS}
    reused = 0
    for seed in range(budget.seeds):
        seed_dir = out / "runs" / name / f"seed{seed}"
        for variant in VARIANTS:
            start = time.perf_counter()
            best, reused_seconds = fit_variant(data, variant, seed, budget, seed_dir / variant, reuse)
            val_auc[variant].append(best)
            was_reused = reused_seconds is not None
            reused += was_reused
            elapsed = reused_seconds if was_reused else time.perf_counter() - start  # the fit's own time either way
            fit_seconds[variant].append(elapsed)
            progress["done"] += 1
            progress["fit_s"] += elapsed
            eta = progress["fit_s"] / progress["done"] * (progress["total"] - progress["done"])
            shown = val_auc[variant][-1]
            print(f"[{name}] seed {seed} {variant:<8} {'reused' if was_reused else 'fit'} {elapsed:6.1f} s, best valid AUC "
                  f"{'n/a' if shown is None else f'{shown:.4f}'}  ({progress['done']:.0f}/{progress['total']:.0f} "
                  f"fits, ETA ≈ {minutes(eta)} at this dataset's pace)", flush=True)
        start = time.perf_counter()
        ordered = [CANDIDATE, *(v for v in VARIANTS if v != CANDIDATE)]  # msit first: the comparison's reference
        metrics, compared = evaluate_seed(data, [seed_dir / v for v in ordered], seed_dir)
        per_seed.append({v: metrics[v] for v in VARIANTS})
        differences.append(compared)
        print(f"[{name}] seed {seed} evaluated on test in {time.perf_counter() - start:.1f} s "
              f"(per-seed report: {seed_dir / 'evaluation' / 'report.md'})", flush=True)
    summary = aggregate(per_seed)
    first = slices(per_seed[0][VARIANTS[0]])
    smallest = smallest_scenario(meta)
    result: dict[str, Any] = {
        "data": str(data),
        "dataset_hash": meta.content_hash,
        "seeds": budget.seeds,
        "train_rows": train_rows(meta),
        "train_rows_per_scenario": {s: st.rows for s, st in meta.splits["train"].scenarios.items()},
        "test_rows": {s: (m.count, m.clicks) for s, m in first.items()},
        "smallest_scenario": smallest,
        "metrics": summary,
        "best_valid_auc": val_auc,
        "fit_seconds": fit_seconds,
        "paired_claims": paired_claims(differences),
        "pooled_claims": pooled_claims(out / "runs" / name, budget.seeds),
        "reused_fits": reused,
    }
    result["verdict"], result["verdict_text"] = verdict(name, summary, result["pooled_claims"], meta.scenarios,
                                                        smallest)
    return result


def reused_text(results: dict[str, dict[str, Any]]) -> str:
    """What the runtime leaves out under --reuse."""
    reused = sum(r["reused_fits"] for r in results.values())
    return f", {reused} fit(s) reused from an earlier run (their training time not included)" if reused else ""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 seed, 1 epoch of 60 batches, a smaller world")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/quality", help="output directory")
    parser.add_argument("--seeds", type=int, help="seeds per variant (default: 5; --quick: 1)")
    parser.add_argument("--epochs", type=int, help="training epochs per fit (default: 3; --quick: 1)")
    known = ["transfer", *MOVIELENS_CONFIGS]
    parser.add_argument("--datasets", default=",".join(known), help=f"comma-separated: {', '.join(known)}")
    parser.add_argument("--reuse", action="store_true",
                        help="keep the finished runs already in --out that had this very config and dataset and were "
                             "trained by this clean git commit (an interrupted benchmark goes on where it stopped); "
                             "the others are trained")
    args = parser.parse_args(argv)
    unknown = set(args.datasets.split(",")) - set(known)
    if unknown:
        parser.error(f"--datasets: unknown {sorted(unknown)} (expected {', '.join(known)})")
    return args


def quiet_libraries() -> None:
    """Keep the output to this script's progress lines: no Lightning banners or per-fit warnings.

    Lightning sets its loggers' levels when it is imported, so it is imported first."""
    import lightning.pytorch  # noqa: F401

    # every fit is one process: say so, or torchrec's planner warns on the root logger once per fit
    os.environ.setdefault("LOCAL_WORLD_SIZE", "1")
    for name in ("lightning.pytorch", "lightning.fabric", "lightning", "torch", "torchrec", "pipelines", "msit_rec"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    warnings.filterwarnings("ignore", module="torch")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    base = QUICK if args.quick else FULL
    budget = replace(base, seeds=args.seeds or base.seeds, epochs=args.epochs or base.epochs)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    quiet_libraries()
    wanted = args.datasets.split(",")
    started = time.perf_counter()
    host = host_facts()
    print(f"host: {host.summary()}", flush=True)
    print(f"budget per fit: tower {list(budget.tower)}, {budget.epochs} epoch(s) validated "
          f"{budget.validations_per_epoch}× each (early stop after {budget.patience}), batch {budget.batch_size}, "
          f"dense lr {budget.dense_lr} ({RECENCY_LR_TEXT}), best-on-valid checkpoint; {budget.seeds} seed(s) × "
          f"{len(VARIANTS)} variants",
          flush=True)

    datasets: dict[str, tuple[Path, str]] = {}
    if "transfer" in wanted:
        start = time.perf_counter()
        data = prepare_transfer(out / "data" / "transfer", args.quick)
        datasets["transfer"] = (data, "generated world, each scenario lifted by clicks from another scenario")
        print(f"[transfer] generated and prepared in {time.perf_counter() - start:.1f} s: {data}", flush=True)
    for name, (config_file, description) in MOVIELENS_CONFIGS.items():
        if name not in wanted:
            continue
        if not (MOVIELENS_DIR / "ratings.csv").is_file():
            print(f"[{name}] SKIPPED: {MOVIELENS_DIR} (ratings.csv, movies.csv) is absent; "
                  "place ml-latest-small there to run it", flush=True)
            continue
        start = time.perf_counter()
        data = prepare_movielens(out / "data" / name, config_file)
        datasets[name] = (data, description + ", click = rating >= 4, rating as each behaviour's feedback")
        print(f"[{name}] prepared in {time.perf_counter() - start:.1f} s: {data}", flush=True)

    if not datasets:
        print("no dataset to run", file=sys.stderr)
        return 1
    rows = {name: train_rows(DatasetMeta.load(data)) for name, (data, _) in datasets.items()}
    estimate = sum(estimate_seconds(r, budget, len(VARIANTS)) for r in rows.values())
    print("expected training + evaluation time: " + ", ".join(
        f"{name} {r:,} train rows ≈ {minutes(estimate_seconds(r, budget, len(VARIANTS)))}" for name, r in rows.items()
    ) + f"; total ≈ {minutes(estimate)} (2 cores)", flush=True)

    results: dict[str, dict[str, Any]] = {}
    for name, (data, description) in datasets.items():
        progress = {"done": 0.0, "total": float(budget.seeds * len(VARIANTS)), "fit_s": 0.0}
        results[name] = {"description": description, **run_dataset(name, data, budget, out, progress, args.reuse)}
        print(f"[{name}] {results[name]['verdict_text']}", flush=True)

    elapsed = time.perf_counter() - started
    if args.quick:
        from pipelines.synthetic_config import GeneratorConfig

        users = {"full": load_config(TRANSFER_WORLD, GeneratorConfig, "generate").users,
                 "quick": load_config(TRANSFER_WORLD, GeneratorConfig, "generate", QUICK_WORLD).users}
        full_rows = {name: r * (users["full"] / users["quick"] if name == "transfer" else 1)
                     for name, r in rows.items()}
        pace = {  # measured seconds per training row, per-fit overhead (validation, scoring, set-up) included
            name: sum(map(sum, res["fit_seconds"].values())) / (budget.rows_per_fit(rows[name]) * budget.seeds
                                                                 * len(VARIANTS))
            for name, res in results.items()
        }
        full_estimate = sum(
            FULL.seeds * len(VARIANTS) * FULL.rows_per_fit(int(full_rows[name])) * pace[name] for name in results
        )
        print(f"full run ({FULL.seeds} seeds, {FULL.epochs} epochs, full world) extrapolated from this run's pace: "
              f"≈ {minutes(full_estimate)} (rough: the per-fit overhead is counted as if it grew with the rows)",
              flush=True)

    plot = plot_auc(results, out / "quality_auc.png")
    settings = {"budget": budget.__dict__ | {"tower": list(budget.tower)}, "variants": list(VARIANTS),
                "quick": args.quick, "transfer_world": {"config": str(TRANSFER_WORLD), "overrides": QUICK_WORLD if args.quick else []},
                "transfer_prepare": TRANSFER_PREPARE, "runtime_s": round(elapsed, 1), "machine": asdict(host)}
    record = json.dumps({"settings": settings, "datasets": results}, indent=2, default=str)  # paths as text
    (out / "quality.json").write_text(record + "\n")
    skipped = [d for d in wanted if d not in results]
    lines = [
        f"# Quality benchmark{' (--quick)' if args.quick else ''}: every variant, same budget, per scenario", "",
        (f"Budget per fit: tower {list(budget.tower)}, at most {budget.epochs} epoch(s) validated "
         f"{budget.validations_per_epoch}× each, early stop after {budget.patience} validations without gain, batch "
         f"{budget.batch_size}, dense lr {budget.dense_lr} ({RECENCY_LR_TEXT}), checkpoint = best validation AUC; "
         f"{budget.seeds} seed(s). "
         f"Bold: best mean. Runtime {minutes(elapsed)}{reused_text(results)}."), "",
        *(f"Dataset `{d}` skipped: {MOVIELENS_DIR} is absent." for d in skipped),
        *(dataset_section(name, result) for name, result in results.items()),
        f"![mean test AUC per scenario]({plot.name})", "",
    ]
    (out / "quality.md").write_text("\n".join(lines))
    print("\n".join(dataset_section(name, result) for name, result in results.items()))
    print(f"written: {out / 'quality.md'}, {out / 'quality.json'}, {plot} (runtime {minutes(elapsed)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
