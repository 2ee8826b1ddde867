"""`msit-rec compare`: the evaluation report of several models from saved results, plus paired bootstrap CIs of
their per-scenario AUC differences, so that noise can be told from a real gain.

The first model is the reference; every other model's AUC difference to it is resampled on the same test rows
(paired): each resample draws, within every scenario, as many rows as the scenario has, with replacement, and
both models' AUCs are computed on that same resample (the overall AUC on the union of the per-scenario draws).
Every resample is a weight vector over the rows, so AUCs come from one sort per model (`metrics.ranked_auc`);
resamples run in chunks of about `chunk_elements` row weights, which bounds memory (≈ 10 × 8 bytes ×
chunk_elements, ≈ 0.3 GB by default). Time grows as resamples × rows: two models, 1000 resamples of 100k rows
take ≈ 14 s on 2 CPU cores.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from msit_rec import option_defaults as defaults
from msit_rec.config import to_dict
from msit_rec.errors import ConfigError, DataError
from msit_rec.metrics import RankedRows, optional_float, rank_rows, ranked_auc
from msit_rec.metrics_file import ModelMetrics, load_metrics, metrics_path, read_scores
from msit_rec.outputs import check_no_overlap, check_replaceable_dir, staged_dir
from msit_rec.report import OVERALL, REPORT_OUTPUTS, write_report

COMPARISON_FILE = "comparison.json"
COMPARISON_VERSION = 1
OUTPUT_FILES = (COMPARISON_FILE, *REPORT_OUTPUTS)  # what a comparison directory holds


@dataclass
class AucDifference:
    """AUC of a model minus the reference's on one slice, with its paired bootstrap interval."""

    reference_auc: float | None
    model_auc: float | None
    difference: float | None  # None where either AUC is undefined
    ci_low: float | None
    ci_high: float | None
    valid_resamples: int  # resamples where both AUCs are defined (a tiny scenario may miss a class)

    @property
    def excludes_zero(self) -> bool:
        return self.ci_low is not None and self.ci_high is not None and (self.ci_low > 0 or self.ci_high < 0)


@dataclass
class Comparison:
    version: int
    reference: str
    resamples: int
    level: float
    seed: int
    differences: dict[str, dict[str, AucDifference]]  # model → slice (scenarios, overall) → difference


class _Rankings:
    """One model's sorts, reused by every resample: by (scenario, score) and by score."""

    def __init__(self, score: torch.Tensor, label: torch.Tensor, scenario: torch.Tensor, num_scenarios: int) -> None:
        self.per_scenario: RankedRows = rank_rows(score, label, scenario)
        self.overall: RankedRows = rank_rows(score, label)
        self.slot = scenario.index_select(0, self.per_scenario.group_first_row)  # [G] scenario of each group
        self.num_scenarios = num_scenarios

    def aucs(self, weights: torch.Tensor | None = None) -> torch.Tensor:
        """[R, S + 1] AUC per scenario then overall (NaN: undefined), for weights [R, N] (None: every row once)."""
        per_group = ranked_auc(self.per_scenario, weights).reshape(-1, self.per_scenario.num_groups)  # [R, G]
        result = torch.full(
            (per_group.shape[0], self.num_scenarios + 1), torch.nan, dtype=torch.float64, device=per_group.device
        )
        result[:, self.slot] = per_group
        result[:, -1] = ranked_auc(self.overall, weights).reshape(-1)
        return result


class StratifiedResampler:
    """Bootstrap resamples as row counts: each resample draws, within every stratum (scenario), as many rows as the
    stratum has, uniformly with replacement."""

    def __init__(self, strata: torch.Tensor, num_strata: int, seed: int) -> None:
        device = strata.device
        self.grouped = torch.argsort(strata, stable=True)  # [N] rows, strata blocks in id order
        stratum = strata.index_select(0, self.grouped)  # [N] stratum of each grouped position
        sizes = torch.bincount(strata, minlength=num_strata)  # [S]
        self.block_start = (torch.cumsum(sizes, 0) - sizes).index_select(0, stratum)  # [N]
        self.block_size = sizes.index_select(0, stratum).to(torch.float64)  # [N]
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def draw(self, resamples: int) -> torch.Tensor:
        """[resamples, N] int64 counts: how often each row is in each resample. Draw k of a stratum lands on a
        uniform position of the stratum's block (float64 uniforms: unbiased for blocks far beyond 2^24 rows)."""
        n = self.grouped.shape[0]
        device = self.grouped.device
        uniform = torch.rand(resamples, n, dtype=torch.float64, generator=self.generator, device=device)
        offset = torch.minimum(torch.floor(uniform * self.block_size), self.block_size - 1).to(torch.int64)  # [r, N]
        picked = self.grouped[self.block_start + offset]  # [r, N] rows drawn, one resample per line
        line = torch.arange(resamples, device=device).unsqueeze(1) * n  # [r, 1]
        return torch.bincount((picked + line).reshape(-1), minlength=resamples * n).reshape(resamples, n)


def paired_bootstrap(
    label: torch.Tensor,
    scenario: torch.Tensor,
    scores: dict[str, torch.Tensor],
    scenario_names: list[str],
    resamples: int = defaults.COMPARE_RESAMPLES,
    level: float = defaults.CONFIDENCE_LEVEL,
    seed: int = defaults.BOOTSTRAP_SEED,
    chunk_elements: int = 1 << 22,
    progress: bool = False,
) -> dict[str, dict[str, AucDifference]]:
    """AUC differences of every model in `scores` to the first one, per scenario and overall, with CIs.

    All tensors are [N] over the same rows; `scenario` in [0, len(scenario_names)).
    """
    return paired_bootstrap_over_seeds(label, scenario, [scores], scenario_names, resamples, level, seed,
                                       chunk_elements, progress)


def with_intervals(
    reference: torch.Tensor,  # [S + 1] the reference's AUC per scenario then overall
    models: dict[str, torch.Tensor],  # model → [S + 1] its AUCs
    resampled: dict[str, torch.Tensor],  # model → [R, S + 1] resampled differences to the reference (NaN: undefined)
    scenario_names: list[str],
    level: float,
) -> dict[str, dict[str, AucDifference]]:
    """Each model's difference to the reference per slice, with the central `level` interval of its resamples."""
    low_q, high_q = (1 - level) / 2, 1 - (1 - level) / 2
    quantiles = torch.tensor([low_q, high_q], dtype=torch.float64, device=reference.device)
    slices = [*scenario_names, OVERALL]
    result: dict[str, dict[str, AucDifference]] = {}
    for name, mine_all in models.items():
        valid = (~torch.isnan(resampled[name])).sum(0)  # [S + 1]
        bounds = torch.nanquantile(resampled[name], quantiles, dim=0)
        result[name] = {}
        for k, slice_name in enumerate(slices):
            ref, mine = optional_float(reference[k]), optional_float(mine_all[k])
            defined = ref is not None and mine is not None and int(valid[k]) > 0
            result[name][slice_name] = AucDifference(
                reference_auc=ref,
                model_auc=mine,
                difference=mine - ref if ref is not None and mine is not None else None,
                ci_low=optional_float(bounds[0, k]) if defined else None,
                ci_high=optional_float(bounds[1, k]) if defined else None,
                valid_resamples=int(valid[k]),
            )
    return result


def _seed_counts(resamples: int, seeds: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """[resamples, K] float64: how often each of K seeds is drawn (with replacement) in each resample; all ones for a
    single seed, without drawing (the row draws of a one-seed bootstrap stay those of `paired_bootstrap`)."""
    if seeds == 1:
        return torch.ones(resamples, 1, dtype=torch.float64, device=device)
    drawn = torch.randint(0, seeds, (resamples, seeds), generator=generator, device=device)
    ones = torch.ones(resamples, seeds, dtype=torch.float64, device=device)
    return torch.zeros(resamples, seeds, dtype=torch.float64, device=device).scatter_add_(1, drawn, ones)


def paired_bootstrap_over_seeds(
    label: torch.Tensor,
    scenario: torch.Tensor,
    scores_by_seed: list[dict[str, torch.Tensor]],
    scenario_names: list[str],
    resamples: int = defaults.COMPARE_RESAMPLES,
    level: float = defaults.CONFIDENCE_LEVEL,
    seed: int = defaults.BOOTSTRAP_SEED,
    chunk_elements: int = 1 << 22,
    progress: bool = False,
) -> dict[str, dict[str, AucDifference]]:
    """The mean over training seeds of every model's AUC difference to the first, with an interval that holds both
    sources of noise: each resample draws the seeds with replacement and, as `paired_bootstrap` does, the test rows
    (within every scenario; the same rows for every seed and model). A per-seed interval misses the seed-to-seed
    spread of small data (±0.005 AUC); the seed mean alone misses the test rows' sampling. With few seeds the
    interval is somewhat narrow: resampling K seeds shrinks their spread by (K − 1)/K.

    `scores_by_seed[k]` maps model → scores [N] of seed k's runs, over the same rows (`label`, `scenario`) for all.
    With one seed this is `paired_bootstrap`.
    """
    if resamples < 1:
        raise ConfigError(f"resamples must be >= 1, got {resamples}")
    if not 0 < level < 1:
        raise ConfigError(f"level must be in (0, 1), got {level}")
    if not scores_by_seed:
        raise ConfigError("paired_bootstrap_over_seeds needs the scores of at least one seed")
    names = list(scores_by_seed[0])
    if any(list(scores) != names for scores in scores_by_seed):
        raise ConfigError(f"paired_bootstrap_over_seeds: every seed needs the same models {names}, got "
                          f"{[list(scores) for scores in scores_by_seed]}")
    num, n, seeds = len(scenario_names), label.shape[0], len(scores_by_seed)
    strata = scenario.to(torch.int64)
    rankings = [{name: _Rankings(scores[name], label, strata, num) for name in names} for scores in scores_by_seed]
    points = {name: torch.stack([r[name].aucs()[0] for r in rankings]).mean(0) for name in names}  # [S + 1]
    resampler = StratifiedResampler(strata, num, seed)
    chunk = max(1, chunk_elements // max(n, 1))
    differences: dict[str, list[torch.Tensor]] = {name: [] for name in names[1:]}
    with tqdm(total=resamples, desc="bootstrap", unit="resample", disable=not progress) as bar:
        for first in range(0, resamples, chunk):
            r = min(chunk, resamples - first)
            weights = resampler.draw(r)  # [r, N]
            counts = _seed_counts(r, seeds, resampler.generator, label.device)  # [r, K] times each seed is drawn
            reference = [ranks[names[0]].aucs(weights) for ranks in rankings]  # K × [r, S + 1]
            for name in names[1:]:
                per_seed = torch.stack([ranks[name].aucs(weights) - ref for ranks, ref in zip(rankings, reference)], 1)
                differences[name].append((per_seed * counts[:, :, None]).sum(1) / seeds)  # [r, S + 1]; NaN stays
            bar.update(r)
    return with_intervals(
        points[names[0]], {name: points[name] for name in names[1:]},
        {name: torch.cat(differences[name]) for name in names[1:]}, scenario_names, level,
    )


def collect_models(inputs: list[str | Path]) -> tuple[dict[str, ModelMetrics], dict[str, Path | None]]:
    """Every model of the given metrics files, names made unique (`name`, `name-2`, ...), and each one's scores file."""
    models: dict[str, ModelMetrics] = {}
    score_files: dict[str, Path | None] = {}
    for item in inputs:
        path = metrics_path(item)
        saved = load_metrics(path)
        for name, model in saved.models.items():
            unique, k = name, 1
            while unique in models:
                k += 1
                unique = f"{name}-{k}"
            models[unique] = model
            score_files[unique] = path.parent / saved.scores_file if saved.scores_file else None
    if len(models) < 2:
        raise ConfigError(f"compare needs at least two models; {[str(i) for i in inputs]} hold {list(models)}")
    pairs = {(m.dataset_hash, m.split) for m in models.values()}
    if len(pairs) > 1:
        found = {name: f"dataset {m.dataset_hash}, split {m.split}" for name, m in models.items()}
        raise DataError(f"compare: the models were evaluated on different data, so rows cannot be paired: {found}")
    return models, score_files


def load_paired_scores(
    models: dict[str, ModelMetrics], score_files: dict[str, Path | None]
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(label, scenario, {model: scores}) on the same rows, checking that every file holds the same rows."""
    label = scenario = row_index = None
    scores: dict[str, torch.Tensor] = {}
    for name, model in models.items():
        path = score_files[name]
        if path is None:
            raise DataError(f"model {name}: its metrics.json names no scores file, so it cannot be paired")
        data = read_scores(path, [model.scores_column])
        if row_index is None:
            row_index, label, scenario = data["row_index"], data["label"], data["scenario"]
        elif not (
            torch.equal(data["row_index"], row_index) and torch.equal(data["label"], label)
            and torch.equal(data["scenario"], scenario)
        ):
            raise DataError(f"{path}: its rows (row_index, label, scenario) differ from the first model's")
        scores[name] = data[model.scores_column]
    return label, scenario, scores


def difference_table(comparison: Comparison) -> str:
    """Markdown: rows = scenarios + overall; a column of the reference AUC, then ΔAUC [CI] per model."""
    names = list(comparison.differences)
    header = ["scenario", f"AUC ({comparison.reference})"] + [f"ΔAUC {name} − {comparison.reference}" for name in names]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    slices = list(comparison.differences[names[0]])
    for slice_name in slices:
        first = comparison.differences[names[0]][slice_name]
        cells = [slice_name, "n/a" if first.reference_auc is None else f"{first.reference_auc:.4f}"]
        for name in names:
            d = comparison.differences[name][slice_name]
            if d.difference is None:
                cells.append("n/a")
                continue
            interval = "" if d.ci_low is None else f" [{d.ci_low:+.4f}, {d.ci_high:+.4f}]"
            cells.append(f"{d.difference:+.4f}{interval}{' *' if d.excludes_zero else ''}")
        lines.append("| " + " | ".join(cells) + " |")
    legend = (
        f"{comparison.level:.0%} paired bootstrap intervals over {comparison.resamples} resamples of the test rows "
        f"(drawn within each scenario; seed {comparison.seed}). * = the interval excludes 0: the difference is "
        "unlikely to be resampling noise."
    )
    return "## AUC difference to the reference\n\n" + "\n".join(lines) + "\n\n" + legend


def compare(
    inputs: list[str | Path],
    out_dir: str | Path,
    resamples: int = defaults.COMPARE_RESAMPLES,
    level: float = defaults.CONFIDENCE_LEVEL,
    seed: int = defaults.BOOTSTRAP_SEED,
    overwrite: bool = False,
    progress: bool = True,
) -> tuple[Comparison, list[Path]]:
    """Report (table, plots) of every model in `inputs` and, from their scores, the AUC differences to the first."""
    out_dir = Path(out_dir)
    for path in inputs:
        check_no_overlap(path, out_dir, "input")
    check_replaceable_dir(out_dir, overwrite, OUTPUT_FILES)
    models, score_files = collect_models(inputs)
    label, scenario, scores = load_paired_scores(models, score_files)
    reference = next(iter(models.values()))
    scenario_names = list(reference.scenarios)
    differences = paired_bootstrap(label, scenario, scores, scenario_names, resamples, level, seed, progress=progress)
    comparison = Comparison(COMPARISON_VERSION, next(iter(models)), resamples, level, seed, differences)
    title = f"Comparison on split '{reference.split}' (dataset {reference.dataset_hash[:12]})"
    with staged_dir(out_dir, overwrite, OUTPUT_FILES) as staging:
        (staging / COMPARISON_FILE).write_text(json.dumps(to_dict(comparison), indent=2) + "\n")
        written = [staging / COMPARISON_FILE]
        written += write_report(
            {name: m.metrics for name, m in models.items()}, staging, title, sections=[difference_table(comparison)]
        )
    return comparison, [out_dir / path.name for path in written]
