"""`msit-rec explain`: what each scenario's behaviours contribute to each other scenario, and what the gate and the
attention of a trained model do with them.

Transfer by intervention: the split is scored S + 1 times, batch by batch — as it is, and once per source scenario t
with every behaviour that happened in t removed from the histories (all sequence features filtered jointly, hist_len
updated). For a served scenario s, AUC(original) − AUC(without t) on the rows served in s is what t's behaviours are
worth to s; its interval is msit_rec.compare's paired bootstrap (each resample draws s's rows once, and both scores are
ranked on that same draw). This is exact re-scoring, not a gradient or an attention weight, so it holds for every
variant (`shared` sums its behaviours) and measures what the model *uses*. Only the rows that lose a behaviour are
scored again: a row without a behaviour from t keeps its logit exactly (tested), and mean |Δ logit| over s's rows
counts it as 0. The behaviours that stay move up in recency when newer ones from t are removed (msit's gate weighs
them by age): the drop is what the row scores with the shorter history, as serving it would.

Gate and attention, from the original pass (variants that have them): per (s, t), the mean gate value (transfer weight
g) of the behaviours from t in rows served in s, and their share of those rows' attention mass Σ|α|; per s and age
bucket of the behaviour (0 = most recent, 1–2, 3–6, ...), the mean g (`gate_by_age`: how far back each served
scenario lets interest reach). Per served scenario and
sequence feature (items, categories...), the behaviours with the largest mean α among those seen at least
MIN_OCCURRENCES times, decoded to raw ids through the dataset's vocabularies.

Shapes: the legend of msit_rec/modules, plus R = rows of the split that are explained. Cost: per batch, one forward pass
and one per source over the rows that lose a behaviour; (S + 1) float64 logits per row in host memory; a bootstrap of resamples × R × (S + 1) AUC terms, in chunks.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from tqdm.auto import tqdm

from msit_rec import option_defaults as defaults
from msit_rec.compare import paired_bootstrap
from msit_rec.config import to_dict
from msit_rec.data.batch import Batch, keyed_jagged
from msit_rec.data.loader import ExamplesDataset, make_loader
from msit_rec.data.spec import DatasetMeta, FeatureSpec
from msit_rec.errors import ConfigError, DataError
from msit_rec.evaluate import HOST, default_device
from msit_rec.explain_report import EXPLAIN_REPORT_OUTPUTS, write_explain_report
from msit_rec.metrics import optional_float
from msit_rec.modules.scenario_gate import RECENCY_BUCKETS, age_bucket, age_packed
from msit_rec.outputs import check_no_overlap, check_replaceable_dir, staged_dir
from msit_rec.report import OVERALL
from msit_rec.run_dir import check_dataset, load_model, read_run, resolve_checkpoint

EXPLAIN_FILE = "explain.json"
EXPLAIN_VERSION = 1
OUTPUT_FILES = (EXPLAIN_FILE, *EXPLAIN_REPORT_OUTPUTS)  # what an explain directory holds
MIN_OCCURRENCES = 20  # a behaviour ranks among the top ones only when seen this often in the served scenario
SAMPLE_SEED = 0  # --max_rows draws the same rows every time
ORIGINAL = "original"


@dataclass
class TransferCell:
    """What removing the source scenario's behaviours does to the rows served in one scenario (or all rows)."""

    auc_drop: float | None  # AUC(original) − AUC(without the source); None where an AUC is undefined
    ci_low: float | None  # paired bootstrap interval of auc_drop
    ci_high: float | None
    valid_resamples: int  # resamples where both AUCs are defined
    mean_abs_logit_change: float | None  # over every row of the slice (unaffected rows count 0); None: no rows
    rows_with_source: float | None  # share of the slice's rows with at least one behaviour from the source

    @property
    def excludes_zero(self) -> bool:
        return self.ci_low is not None and self.ci_high is not None and (self.ci_low > 0 or self.ci_high < 0)


@dataclass
class Transfer:
    resamples: int
    level: float
    seed: int
    rows: dict[str, int]  # served scenario (and overall) → rows
    auc: dict[str, float | None]  # served scenario (and overall) → AUC of the original scores
    cells: dict[str, dict[str, TransferCell]]  # served scenario (and overall) → source scenario → cell


@dataclass
class TopBehaviour:
    """One behaviour value (an item, a category...) among the most attended ones of a served scenario."""

    index: int  # encoded id
    raw: int | str | None  # raw id from the vocabulary; None for OOV or hash-encoded features
    count: int  # occurrences in the histories of rows served in the scenario
    mean_attention: float  # mean α over those occurrences
    sources: dict[str, int]  # source scenario → occurrences


@dataclass
class Explanation:
    """explain.json. Matrices are nested dicts: served scenario → source scenario → value."""

    version: int
    run: str
    checkpoint: str
    split: str
    dataset_hash: str
    variant: str
    rows: int  # rows explained (all of the split, or --max_rows of them)
    scenarios: list[str]
    transfer: Transfer
    behaviours: dict[str, dict[str, int]]  # behaviours from the source in rows served in the scenario
    gate: dict[str, dict[str, float | None]] | None  # mean transfer weight g; None: the variant has no gate
    gate_by_age: dict[str, dict[str, float | None]] | None  # served → behaviour age (bucket) → mean g; None: no gate
    attention: dict[str, dict[str, float | None]] | None  # share of Σ|α|; None: sum pooling (every α is 1)
    min_occurrences: int
    top: dict[str, dict[str, list[TopBehaviour]]] | None  # served → sequence feature → top; None without attention


# ---- the intervention: the same rows with fewer behaviours, or fewer rows ------------------------------------------


def _rebuild(kjt: KeyedJaggedTensor, keep: torch.Tensor, lengths: torch.Tensor) -> KeyedJaggedTensor:
    """`kjt` with, in every key, the values where `keep` (one mask for every key's values) is True, and row lengths
    `lengths` [B']: valid for KJTs whose keys share their row lengths (the sequence features: hist_len; the sparse
    ones: one id per row and key)."""
    keys = kjt.keys()
    values = torch.cat([kjt[key].values()[keep] for key in keys])
    lengths = lengths.to(torch.int32)
    per_key = int(lengths.sum())
    return keyed_jagged(keys, values, lengths.repeat(len(keys)), [per_key] * len(keys), int(lengths.shape[0]))


def behaviour_rows(batch: Batch) -> torch.Tensor:
    """[N] the row of each behaviour, in the packed order of the jagged history values."""
    rows = torch.arange(batch.batch_size, device=batch.hist_len.device)
    return torch.repeat_interleave(rows, batch.hist_len.long())


def without_source(batch: Batch, behaviour_key: str, source: int) -> Batch:
    """The batch with every behaviour that happened in scenario `source` removed from all its sequence features."""
    keep = batch.sequence[behaviour_key].values() != source  # [N]
    hist_len = torch.zeros_like(batch.hist_len).index_add_(0, behaviour_rows(batch), keep.to(batch.hist_len.dtype))
    return dataclasses.replace(batch, sequence=_rebuild(batch.sequence, keep, hist_len), hist_len=hist_len)


_JAGGED = ("sparse", "sequence")  # the Batch fields that are KeyedJaggedTensors


def select_rows(batch: Batch, keep: torch.Tensor) -> Batch:
    """The rows of `batch` where `keep` [B] is True, histories included."""
    rows = keep.nonzero().squeeze(1)
    return Batch(
        sparse=_rebuild(batch.sparse, keep, torch.ones_like(rows)),
        sequence=_rebuild(batch.sequence, keep.index_select(0, behaviour_rows(batch)), batch.hist_len[rows]),
        **{f.name: getattr(batch, f.name)[rows] for f in dataclasses.fields(Batch) if f.name not in _JAGGED},
    )


def sample_rows(num_rows: int, max_rows: int | None) -> torch.Tensor | None:
    """Sorted row indices of a uniform sample of `max_rows` rows (the same every run); None: every row."""
    if max_rows is None or max_rows >= num_rows:
        return None
    picked = np.random.default_rng(SAMPLE_SEED).choice(num_rows, size=max_rows, replace=False)
    return torch.from_numpy(np.sort(picked))


# ---- scoring ---------------------------------------------------------------------------------------------------


@dataclass
class InterventionScores:
    """Every explained row, scored as it is and without each source scenario's behaviours (host memory)."""

    label: torch.Tensor  # [R] float32
    scenario: torch.Tensor  # [R] int64, served scenario
    original: torch.Tensor  # [R] float64 logits
    without: torch.Tensor  # [S, R] float64 logits without the behaviours from source t
    has_source: torch.Tensor  # [S, R] bool: the row's history holds a behaviour from source t


class BehaviourTotals:
    """Sums over the behaviours of the original pass: per (served s, source t) cell, and per (cell, value) of each
    tracked sequence feature (sparse: a vocabulary of millions of items must not cost a dense [S, S, V] tensor)."""

    def __init__(self, num_scenarios: int, tracked: dict[str, int]) -> None:
        cells = num_scenarios * num_scenarios
        self.count = torch.zeros(cells, dtype=torch.int64)  # [S·S] behaviours, cell = s·S + t
        self.gate = torch.zeros(cells, dtype=torch.float64)  # [S·S] Σ transfer weight g
        self.attention = torch.zeros(cells, dtype=torch.float64)  # [S·S] Σ |α|
        self.age_count = torch.zeros(num_scenarios * RECENCY_BUCKETS, dtype=torch.int64)  # [S·8] at s·8 + age bucket
        self.age_gate = torch.zeros(num_scenarios * RECENCY_BUCKETS, dtype=torch.float64)  # [S·8] Σ g
        self.cardinality = tracked  # feature → table rows
        empty_key, empty_pairs = torch.zeros(0, dtype=torch.int64), torch.zeros(0, 2, dtype=torch.float64)
        self.by_value = {  # feature → sparse [S·S·V, 2] (occurrences, Σ α) at cell·V + value
            name: _sparse(empty_key, empty_pairs, cells * rows) for name, rows in tracked.items()
        }

    def add(self, cell: torch.Tensor, age_cell: torch.Tensor, gate: torch.Tensor | None, attention: torch.Tensor,
            values: dict[str, torch.Tensor]) -> None:
        """Behaviours' cells [N], (served, age bucket) cells [N], gates [N] (None: no gate), α [N] and tracked
        feature values {name: [N]}."""
        self.count += torch.bincount(cell, minlength=self.count.shape[0])
        self.age_count += torch.bincount(age_cell, minlength=self.age_count.shape[0])
        if gate is not None:
            self.gate.index_add_(0, cell, gate.to(torch.float64))
            self.age_gate.index_add_(0, age_cell, gate.to(torch.float64))
        self.attention.index_add_(0, cell, attention.to(torch.float64).abs())
        pairs = torch.stack([torch.ones_like(attention, dtype=torch.float64), attention.to(torch.float64)], dim=1)
        for name, value in values.items():
            key = cell * self.cardinality[name] + value  # [N]
            self.by_value[name] = (self.by_value[name] + _sparse(key, pairs, self.by_value[name].shape[0])).coalesce()


def _sparse(key: torch.Tensor, pairs: torch.Tensor, size: int) -> torch.Tensor:
    """A sparse [size, 2] tensor with rows `pairs` [M, 2] at `key` [M] (repeated keys add up on coalesce). Keys are
    in range by construction, so torch's invariant checks are opted out of explicitly (it warns otherwise)."""
    return torch.sparse_coo_tensor(key[None], pairs, (size, 2), check_invariants=False).coalesce()


def score_interventions(
    model: nn.Module, batches: Iterable[Batch], meta: DatasetMeta, device: torch.device, totals: BehaviourTotals,
    sample: torch.Tensor | None = None, total: int | None = None, progress: bool = True,
) -> InterventionScores:
    """Score every real (sampled) row as it is and without each source scenario's behaviours; fill `totals`.
    The progress bar counts scoring passes: S + 1 per batch of the `total`."""
    key = behaviour_key(meta)
    num = len(meta.scenarios)
    parts: list[InterventionScores] = []
    bar_total = None if total is None else total * (num + 1)
    with torch.no_grad(), tqdm(total=bar_total, desc="explain", unit="pass", disable=not progress) as bar:
        for batch in batches:
            batch = _explained_rows(batch, sample)
            if batch.batch_size == 0:
                bar.update(num + 1)
                continue
            batch = batch.to(device)
            details = model.details(batch)
            bar.update(1)
            has_source = source_presence(batch, key, num)  # [S, B]
            without = []
            for source in range(num):
                without.append(_rescore(model, batch, key, source, has_source[source], details.logits))
                bar.update(1)
            parts.append(InterventionScores(
                label=batch.label.to(HOST), scenario=batch.scenario.to(HOST, torch.int64),
                original=details.logits.to(HOST, torch.float64), without=torch.stack(without).to(HOST, torch.float64),
                has_source=has_source.to(HOST),
            ))
            served = batch.scenario.index_select(0, details.example).to(HOST)  # [N]
            own = batch.sequence[key].values().to(HOST)  # [N]
            age = age_bucket(age_packed(batch.hist_len, details.example)).to(HOST)  # [N]
            gate = details.gate.to(HOST) if details.gate is not None else None
            values = {name: batch.sequence[name].values().to(HOST) for name in totals.cardinality}
            totals.add(served * num + own, served * RECENCY_BUCKETS + age, gate, details.attention.to(HOST), values)
    if not parts:
        raise DataError("no rows to explain: the split is empty")
    return InterventionScores(*(torch.cat([getattr(p, f.name) for p in parts], dim=-1)
                                for f in dataclasses.fields(InterventionScores)))


def _explained_rows(batch: Batch, sample: torch.Tensor | None) -> Batch:
    """The batch's real rows (loader padding dropped), only the sampled ones when there is a sample."""
    keep = batch.weight > 0
    if sample is not None:
        keep &= torch.isin(batch.row_index, sample)
    return batch if bool(keep.all()) else select_rows(batch, keep)


def source_presence(batch: Batch, key: str, num: int) -> torch.Tensor:
    """[S, B] bool: whether each row's history holds a behaviour from each scenario."""
    own = batch.sequence[key].values()  # [N]
    counts = torch.zeros(batch.batch_size * num, dtype=torch.int64, device=own.device)
    counts.index_add_(0, behaviour_rows(batch) * num + own, torch.ones_like(own))
    return counts.reshape(batch.batch_size, num).T > 0


def _rescore(
    model: nn.Module, batch: Batch, key: str, source: int, touched: torch.Tensor, original: torch.Tensor
) -> torch.Tensor:
    """[B] logits without the source's behaviours. Only the `touched` [B] rows lose any, so only they are scored
    again; the others keep their original logit bit for bit (scored in a batch of another size, their inputs unchanged,
    they would differ in the last bits: CPU matmuls round differently with the row count)."""
    logits = original.clone()
    if bool(touched.any()):
        logits[touched] = model(without_source(select_rows(batch, touched), key, source))
    return logits


def behaviour_key(meta: DatasetMeta) -> str:
    spec = meta.behaviour_scenario
    if spec is None:
        raise DataError(f"dataset '{meta.name}' has no behaviour-scenario sequence (role behaviour_scenario): the "
                        "behaviours' scenarios are unknown, so there is nothing to remove by scenario")
    return spec.name


# ---- from scores and totals to the explanation ---------------------------------------------------------------


def transfer_cells(
    scores: InterventionScores, scenarios: list[str], resamples: int, level: float, seed: int, progress: bool
) -> Transfer:
    """AUC drops with paired bootstrap intervals, |Δ logit| and coverage, per served slice and source scenario."""
    num = len(scenarios)
    names = [f"without {source}" for source in scenarios]
    logits = {ORIGINAL: scores.original, **dict(zip(names, scores.without))}
    differences = paired_bootstrap(scores.label, scores.scenario, logits, scenarios, resamples, level, seed,
                                   progress=progress)
    change = _slice_means((scores.without - scores.original).abs(), scores.scenario, num)  # [S, S + 1]
    covered = _slice_means(scores.has_source.to(torch.float64), scores.scenario, num)  # [S, S + 1]
    rows = torch.bincount(scores.scenario, minlength=num).tolist() + [int(scores.scenario.shape[0])]
    slices = [*scenarios, OVERALL]
    cells: dict[str, dict[str, TransferCell]] = {}
    for k, served in enumerate(slices):
        cells[served] = {}
        for t, source in enumerate(scenarios):
            d = differences[names[t]][served]  # AUC(without) − AUC(original)
            cells[served][source] = TransferCell(
                auc_drop=_negated(d.difference), ci_low=_negated(d.ci_high), ci_high=_negated(d.ci_low),
                valid_resamples=d.valid_resamples,
                mean_abs_logit_change=optional_float(change[t, k]),
                rows_with_source=optional_float(covered[t, k]),
            )
    auc = {served: differences[names[0]][served].reference_auc for served in slices}
    return Transfer(resamples, level, seed, dict(zip(slices, rows)), auc, cells)


def _negated(value: float | None) -> float | None:
    return None if value is None else 0.0 - value  # 0.0 - 0.0 is 0.0, where -(0.0) would print as -0.0


def _slice_means(values: torch.Tensor, scenario: torch.Tensor, num: int) -> torch.Tensor:
    """[S', S + 1] means of `values` [S', R] over the rows of each served scenario (0/0 = NaN: no rows), then over
    all R > 0 rows."""
    sums = torch.zeros(values.shape[0], num, dtype=torch.float64).index_add_(1, scenario, values)
    counts = torch.bincount(scenario, minlength=num)
    return torch.cat([sums / counts, values.mean(dim=1, keepdim=True)], dim=1)


def _matrix(values: torch.Tensor, scenarios: list[str]) -> dict[str, dict[str, float | None]]:
    """[S·S] (cell = served·S + source) → served → source → value (NaN → None)."""
    square = values.reshape(len(scenarios), len(scenarios))
    return {s: {t: optional_float(square[i, j]) for j, t in enumerate(scenarios)} for i, s in enumerate(scenarios)}


def gate_means(totals: BehaviourTotals, scenarios: list[str]) -> dict[str, dict[str, float | None]]:
    """Mean transfer weight g of the behaviours from t in rows served in s (0/0 = NaN → None: no such behaviour)."""
    return _matrix(totals.gate / totals.count, scenarios)


def age_label(bucket: int, max_len: int) -> str:
    """The ages (0 = the most recent behaviour) that scenario_gate.age_bucket puts in `bucket`, of those a history of
    at most `max_len` behaviours has."""
    low = 2**bucket - 1
    high = max_len - 1 if bucket == RECENCY_BUCKETS - 1 else min(2 ** (bucket + 1) - 2, max_len - 1)
    return str(low) if low == high else f"{low}–{high}"


def gate_by_age(totals: BehaviourTotals, scenarios: list[str], max_len: int) -> dict[str, dict[str, float | None]]:
    """Mean transfer weight g of the behaviours of each age bucket (those a history of `max_len` reaches) in rows
    served in s: how far back each served scenario lets the user's interest reach (None: no such behaviour)."""
    buckets = int(age_bucket(torch.tensor(max(max_len, 1) - 1))) + 1
    means = (totals.age_gate / totals.age_count).reshape(len(scenarios), RECENCY_BUCKETS)
    return {s: {age_label(k, max_len): optional_float(means[i, k]) for k in range(buckets)}
            for i, s in enumerate(scenarios)}


def attention_shares(totals: BehaviourTotals, scenarios: list[str]) -> dict[str, dict[str, float | None]]:
    """Σ|α| of the behaviours from t in rows served in s over Σ|α| of all behaviours of those rows."""
    square = totals.attention.reshape(len(scenarios), len(scenarios))  # [S, S]
    return _matrix((square / square.sum(dim=1, keepdim=True)).reshape(-1), scenarios)  # 0/0 → None


def top_behaviours(
    totals: BehaviourTotals, scenarios: list[str], top: int, min_occurrences: int
) -> dict[str, dict[str, list[TopBehaviour]]]:
    """Per served scenario and tracked feature, the `top` values of largest mean α seen ≥ `min_occurrences` times
    (raw ids not yet filled: `decode_top`)."""
    num = len(scenarios)
    result: dict[str, dict[str, list[TopBehaviour]]] = {s: {} for s in scenarios}
    for name, sums in totals.by_value.items():
        cardinality = totals.cardinality[name]
        key, pairs = sums.indices()[0], sums.values()  # [M], [M, 2]
        cell, value = key // cardinality, key % cardinality
        for s, served in enumerate(scenarios):
            mine = cell // num == s
            result[served][name] = _top_of_scenario(value[mine], cell[mine] % num, pairs[mine], scenarios, top,
                                                    min_occurrences)
    return result


def _top_of_scenario(
    value: torch.Tensor, source: torch.Tensor, pairs: torch.Tensor, scenarios: list[str], top: int,
    min_occurrences: int,
) -> list[TopBehaviour]:
    """From the (value [M], source [M]) entries of one served scenario with (occurrences, Σ α) [M, 2]."""
    distinct, slot = torch.unique(value, return_inverse=True)  # [V'], [M]
    summed = torch.zeros(distinct.shape[0], 2, dtype=torch.float64).index_add_(0, slot, pairs)  # [V', 2]
    eligible = (summed[:, 0] >= min_occurrences).nonzero().squeeze(1)
    mean = summed[eligible, 1] / summed[eligible, 0]
    best = eligible[torch.argsort(mean, descending=True, stable=True)[:top]]  # [k] slots into distinct
    by_source = torch.zeros(distinct.shape[0], len(scenarios), dtype=torch.float64)
    by_source.index_put_((slot, source), pairs[:, 0], accumulate=True)  # [V', S] occurrences
    return [
        TopBehaviour(
            index=int(distinct[b]), raw=None, count=int(summed[b, 0]), mean_attention=float(summed[b, 1] / summed[b, 0]),
            sources={t: int(by_source[b, j]) for j, t in enumerate(scenarios) if by_source[b, j] > 0},
        )
        for b in best.tolist()
    ]


def decode_top(top: dict[str, dict[str, list[TopBehaviour]]], meta: DatasetMeta, data_dir: Path) -> None:
    """Fill the raw ids of the top behaviours from each feature's vocabulary (the one of its table); OOV ids and
    hash-encoded features keep None."""
    for name in {feature for per_feature in top.values() for feature in per_feature}:
        path = vocabulary_path(meta, meta.feature(name), data_dir)
        raw = raw_ids(path) if path is not None else {}
        for per_feature in top.values():
            for behaviour in per_feature[name]:
                behaviour.raw = raw.get(behaviour.index)  # OOV (1) and padding (0) are in no vocabulary


def vocabulary_path(meta: DatasetMeta, spec: FeatureSpec, data_dir: Path) -> Path | None:
    """The vocabulary file of a feature: its own, else that of a feature sharing its table (a sequence feature
    shares the table, so the ids, of the target feature); None for hash-encoded features."""
    if spec.vocabulary is not None:
        return data_dir / spec.vocabulary
    shared = next((f for f in meta.features if f.table == spec.table and f.vocabulary is not None), None)
    return data_dir / shared.vocabulary if shared is not None else None


def raw_ids(path: Path) -> dict[int, int | str]:
    """encoded index → raw id of one vocabulary Parquet file."""
    try:
        table = pq.read_table(path, columns=["raw", "index"])
    except (OSError, pa.ArrowInvalid, KeyError) as exc:
        raise DataError(f"vocabulary {path}: unreadable ({exc}); expected columns raw, index") from None
    return dict(zip(table.column("index").to_pylist(), table.column("raw").to_pylist()))


# ---- the command ---------------------------------------------------------------------------------------------------


def check_arguments(resamples: int, top: int, max_rows: int | None, level: float) -> None:
    """Refuse bad numbers before any model is loaded or row scored."""
    if resamples < 1:
        raise ConfigError(f"--resamples: expected at least 1, got {resamples}")
    if top < 1:
        raise ConfigError(f"--top: expected at least 1, got {top}")
    if max_rows is not None and max_rows < 1:
        raise ConfigError(f"--max_rows: expected at least 1, got {max_rows}")
    if not 0 < level < 1:
        raise ConfigError(f"level must be in (0, 1), got {level}")


def explain(
    run: str | Path,
    out_dir: str | Path,
    checkpoint: str = defaults.CHECKPOINT,
    split: str = defaults.SPLIT,
    data_dir: str | Path | None = None,
    resamples: int = defaults.EXPLAIN_RESAMPLES,
    top: int = defaults.EXPLAIN_TOP,
    batch_size: int = defaults.SCORING_BATCH_ROWS,
    max_rows: int | None = None,
    level: float = defaults.CONFIDENCE_LEVEL,
    seed: int = defaults.BOOTSTRAP_SEED,
    overwrite: bool = False,
    progress: bool = True,
    device: torch.device | None = None,
) -> tuple[Explanation, list[Path]]:
    """Explain one run's checkpoint on a split; write explain.json, report.md and the heatmaps into `out_dir`."""
    out_dir = Path(out_dir)
    check_arguments(resamples, top, max_rows, level)
    trained = read_run(run)
    data_dir = Path(data_dir) if data_dir is not None else trained.data_dir
    for source in (trained.run_dir, data_dir):
        check_no_overlap(source, out_dir, "input")
    check_replaceable_dir(out_dir, overwrite, OUTPUT_FILES)
    meta = DatasetMeta.load(data_dir)
    check_dataset(trained, meta, data_dir)
    key = behaviour_key(meta)
    ckpt = resolve_checkpoint(trained, checkpoint)
    dataset = ExamplesDataset(data_dir, split, batch_size)
    device = device if device is not None else default_device()
    model = load_model(trained, ckpt, meta, device)
    parts = trained.model.parts
    tracked = {f.name: f.cardinality for f in meta.features_of_kind("sequence") if f.name != key}
    totals = BehaviourTotals(len(meta.scenarios), tracked if parts.attention else {})
    sample = sample_rows(dataset.index.num_rows, max_rows)
    scores = score_interventions(model, make_loader(dataset), meta, device, totals, sample, len(dataset), progress)
    del model
    scenarios = meta.scenarios
    explanation = Explanation(
        version=EXPLAIN_VERSION, run=str(trained.run_dir), checkpoint=str(ckpt), split=split,
        dataset_hash=meta.content_hash, variant=trained.model.variant, rows=int(scores.label.shape[0]),
        scenarios=scenarios, transfer=transfer_cells(scores, scenarios, resamples, level, seed, progress),
        behaviours={s: {t: int(n) for t, n in zip(scenarios, row)}
                    for s, row in zip(scenarios, totals.count.reshape(len(scenarios), -1).tolist())},
        gate=gate_means(totals, scenarios) if parts.behaviour_gate else None,
        gate_by_age=gate_by_age(totals, scenarios, meta.history.max_len) if parts.behaviour_gate else None,
        attention=attention_shares(totals, scenarios) if parts.attention else None,
        min_occurrences=MIN_OCCURRENCES,
        top=top_behaviours(totals, scenarios, top, MIN_OCCURRENCES) if parts.attention else None,
    )
    if explanation.top is not None:
        decode_top(explanation.top, meta, data_dir)
    return explanation, write_explanation(explanation, out_dir, overwrite)


def write_explanation(explanation: Explanation, out_dir: Path, overwrite: bool = False) -> list[Path]:
    """explain.json, report.md and the heatmaps, swapped in together; returns the paths written."""
    with staged_dir(out_dir, overwrite, OUTPUT_FILES) as staging:
        (staging / EXPLAIN_FILE).write_text(json.dumps(to_dict(explanation), indent=2) + "\n")
        written = [staging / EXPLAIN_FILE, *write_explain_report(explanation, staging)]
    return [out_dir / path.name for path in written]
