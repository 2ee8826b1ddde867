"""`msit-rec prepare`: raw log → validated, encoded, leak-free, time-split examples + dataset.json.

Order of work: read and validate the log in one streaming pass (rejected rows are written out with their
reason), split by time, fit encoders and numeric statistics on the train split only (under `--vocab-from`, the
parent's vocabularies are extended and its numeric statistics kept: pipelines/vocab_from.py), build histories over
all valid rows (strictly earlier events only, so a test example may see train-period clicks but never its
own or later ones), then write each split as Parquet shards chunk by chunk.

Everything is written into a temporary sibling of the output directory that replaces it only when complete,
and the source may not overlap the output: no input, bug or interruption can cost the raw log or the
previous good output.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
from tqdm.auto import tqdm

from msit_rec.config import to_dict
from msit_rec.data.encoding import stable_hash64
from msit_rec.data.spec import (
    BEHAVIOUR_FEEDBACK,
    BEHAVIOUR_SCENARIO,
    CONTRACT_VERSION,
    OOV_INDEX,
    SPLITS,
    DatasetMeta,
    FeatureKind,
    FeatureSpec,
    HistoryInfo,
    NumericStats,
    ScenarioStats,
    SplitStats,
)
from msit_rec.errors import DataError
from msit_rec.outputs import check_no_overlap, staged_dir
from pipelines.config import FEEDBACK_FROM_LABEL, FEEDBACK_TABLE, CategoricalFeature, DatasetConfig
from pipelines.encode import INDEX, RAW, FittedEncoder, distinct_text_map, fit_encoder
from pipelines.history import HIST_HI, HIST_LO, HistoryEvents, index_histories, precomputed_lists
from pipelines.source import check_output_outside_source, read_source
from pipelines.split import SPLIT, assign_splits
from pipelines.validate import (
    LABEL,
    REASON,
    ROW,
    SCENARIO,
    TS,
    describe_rejects,
    scenario_text,
    tag_duplicates,
    tag_rows,
    ts_problem,
)
from pipelines.vocab_from import ParentVocab
from pipelines.write import ShardWriter

log = logging.getLogger("msit_rec.prepare")

USER_KEY = "_user_key"
FEEDBACK = "hist_feedback"  # the sequence feature (and its vocabulary) of each behaviour's feedback
# Top-level entries prepare writes: `--overwrite` replaces a directory holding nothing else, never other files.
OUTPUT_ENTRIES = ("dataset.json", "rejects.parquet", *SPLITS, "vocab")


def encoded(name: str) -> str:
    return f"_enc:{name}"


def normalised(name: str) -> str:
    return f"_num:{name}"


@contextmanager
def step(what: str) -> Iterator[None]:
    """Log how long a pipeline step took (row counts are logged by the step itself)."""
    start = time.perf_counter()
    yield
    log.info("%s: %.2fs", what, time.perf_counter() - start)


@dataclass
class Validated:
    """The raw log after validation: rows to use, rows rejected (with their reason) and what was counted."""

    valid: pl.DataFrame
    rejected: pl.DataFrame
    rows_in: int
    scenarios: list[str]
    duplicates: int  # valid rows equal to an earlier one (rejected as `duplicate` when the config drops them)
    ts_problems: dict[str, int]  # bad_ts kind → rows


def prepare(
    config: DatasetConfig, out_dir: str | Path, progress: bool = False, overwrite: bool = False,
    vocab_from: str | Path | None = None,
) -> DatasetMeta:
    """Run the whole pipeline; returns (and writes) the dataset metadata.

    `vocab_from`: an earlier examples directory whose vocabularies are kept and extended (pipelines/vocab_from.py),
    checked against `config` before the log is read.

    Refuses, before reading anything and whatever `overwrite` says, an output that overlaps the source. The
    output is built in a temporary sibling of `out_dir` that replaces it only when complete, so a failure
    leaves an earlier output exactly as it was.
    """
    out_dir = Path(out_dir)
    check_output_outside_source(config.source.path, out_dir)
    parent = None
    if vocab_from is not None:
        check_no_overlap(vocab_from, out_dir, source_flag="--vocab-from")
        parent = ParentVocab.load(vocab_from, config)
    with staged_dir(out_dir, overwrite, OUTPUT_ENTRIES) as staging:
        meta = _prepare_into(config, staging, progress, parent)
    if meta.rejects_file is not None:
        log.warning(
            "rejected %d rows: %s (see %s)", sum(meta.rejects.values()),
            describe_rejects(meta.rejects, meta.bad_ts, config.columns.ts), out_dir / meta.rejects_file,
        )
    return meta


def _prepare_into(config: DatasetConfig, out_dir: Path, progress: bool, parent: ParentVocab | None) -> DatasetMeta:
    """The pipeline proper, writing everything under `out_dir` (a fresh staging directory)."""
    c = config.columns
    with step("read + validate"):
        checked = _read_validated(config)
    rejects = _write_rejects(checked.rejected, out_dir)
    valid, scenarios, rows_in = checked.valid, checked.scenarios, checked.rows_in
    duplicates, ts_problems = checked.duplicates, checked.ts_problems
    del checked  # `valid` is rebuilt column by column below: no second reference may keep the first copy alive
    if parent is not None:
        parent.check_scenarios(scenarios)

    with step("split"):
        valid, boundaries = assign_splits(valid, config, c.user)
    train = valid.filter(pl.col(SPLIT) == "train")
    if len(train) == 0:
        raise DataError(f"{config.source.path}: the train split is empty (split config {to_dict(config.split)})")

    with step("encode"):
        fit = fit_encoder if parent is None else parent.encoder
        encoders = {f.name: fit(f, train[f.column]) for f in config.categorical}
        valid = valid.with_columns(
            [encoders[f.name].encode(valid[f.column]).alias(encoded(f.name)) for f in config.categorical]
        )
        feedback = _feedback_encoder(config, train, fit)
        if feedback is not None:  # encoded like a categorical feature: a vocabulary of the train values
            valid = valid.with_columns(feedback.encode(_feedback_values(config, valid)).alias(encoded(FEEDBACK)))
        if parent is None:
            numeric_stats = {f.name: _numeric_stats(f.column, train[f.column], valid[f.column]) for f in config.numeric}
        else:  # the parent's mean/std, so one raw value is the same model input every day (and as served)
            numeric_stats = {f.name: parent.numeric_stats(f, valid[f.column]) for f in config.numeric}
        valid = valid.with_columns(
            [_normalise(f.column, numeric_stats[f.name]).alias(normalised(f.name)) for f in config.numeric]
        )
        valid = valid.with_columns(_user_key(valid[c.user]).alias(USER_KEY))
        del train

    with step("histories"):
        valid, events = _histories(valid, config, encoders)

    vocab_files = _write_vocabularies({**encoders, **({FEEDBACK: feedback} if feedback else {})}, out_dir)
    features = _feature_specs(config, encoders, scenarios, vocab_files, feedback)
    with step("write shards"):
        splits = {
            split: _write_split(valid, split, config, events, scenarios, out_dir, progress) for split in SPLITS
        }
    empty_scenarios = _empty_scenarios(splits)
    rows_out = sum(s.rows for s in splits.values())
    if rows_out + sum(rejects.values()) != rows_in:  # the conservation guarantee; a bug if it ever fires
        raise RuntimeError(f"row conservation broken: in {rows_in}, out {rows_out}, rejected {sum(rejects.values())}")

    meta = DatasetMeta(
        contract_version=CONTRACT_VERSION,
        name=config.name,
        features=features,
        scenarios=scenarios,
        history=HistoryInfo(
            max_len=config.history.max_len,
            events=config.history.events,
            source="log"
            if config.history.precomputed_column is None
            else f"precomputed:{config.history.precomputed_column}",
            feedback=config.history.feedback,
        ),
        splits=splits,
        numeric_stats=numeric_stats,
        split_boundaries=boundaries,
        rows_in=rows_in,
        rejects=rejects,
        rejects_file="rejects.parquet" if sum(rejects.values()) else None,
        config=to_dict(config),
        duplicate_rows=duplicates,
        bad_ts=ts_problems,
        empty_scenarios=empty_scenarios,
        lineage=parent.lineage({**encoders, **({FEEDBACK: feedback} if feedback else {})}) if parent else None,
    )
    meta.content_hash = _content_hash(out_dir, [f for s in splits.values() for f in s.files] + list(vocab_files.values()))
    meta.save(out_dir / "dataset.json")
    return meta


def _raw_columns(config: DatasetConfig) -> list[str]:
    """The raw-log columns prepare reads: the ones two rows must agree on to be duplicates."""
    c = config.columns
    names = [c.user, c.item, c.scenario, c.ts, c.label]
    names += [f.column for f in config.categorical] + [f.column for f in config.numeric]
    if config.split.method == "column":
        names.append(config.split.column)
    if config.history.precomputed_column is not None:
        names.append(config.history.precomputed_column)
    if config.history.feedback not in (None, FEEDBACK_FROM_LABEL):
        names.append(config.history.feedback)
    return list(dict.fromkeys(names))


def _read_validated(config: DatasetConfig) -> Validated:
    """Read the log once, tag every row, and stop with the real cause when nothing usable is left."""
    tagged = tag_rows(read_source(config.source), config, source=config.source.path)
    raw_columns = _raw_columns(config)
    frame = tagged.frame.select([*raw_columns, ROW, TS, LABEL, SCENARIO, REASON]).collect(engine="streaming")
    frame, duplicates = tag_duplicates(frame, raw_columns, config.validate.drop_duplicates)
    rejected = frame.filter(pl.col(REASON).is_not_null())
    checked = Validated(
        valid=frame.filter(pl.col(REASON).is_null()).drop(REASON),
        rejected=rejected,
        rows_in=len(frame),
        scenarios=tagged.scenarios,
        duplicates=duplicates,
        ts_problems=_ts_problems(rejected),
    )
    log.info("rows in %d, valid %d, rejected %d", checked.rows_in, len(checked.valid), len(rejected))
    if duplicates:
        log.warning("%d exact duplicate rows (%s)", duplicates, "dropped" if config.validate.drop_duplicates else
                    "kept; set validate.drop_duplicates: true to drop them")
    _check_any_valid(checked, config)
    _check_scenarios_present(checked, config)
    return checked


def _reason_counts(rejected: pl.DataFrame) -> dict[str, int]:
    return {str(k): int(v) for k, v in rejected.group_by(REASON).len().sort(REASON).iter_rows()}


def _ts_problems(rejected: pl.DataFrame) -> dict[str, int]:
    """bad_ts kind (milliseconds, negative, ...) → rows: the reject reason alone would not say what to fix."""
    bad = rejected.filter(pl.col(REASON) == "bad_ts")
    counts = bad.group_by(ts_problem(pl.col(TS)).alias("kind")).len().sort("kind")
    return {str(k): int(v) for k, v in counts.iter_rows()}


def _check_any_valid(checked: Validated, config: DatasetConfig) -> None:
    """With no valid row left, name the reasons the rows were rejected for: that is what the user has to fix."""
    source = config.source.path
    if checked.rows_in == 0:
        raise DataError(f"{source}: the raw log has no rows")
    if len(checked.valid) == 0:
        why = describe_rejects(_reason_counts(checked.rejected), checked.ts_problems, config.columns.ts)
        raise DataError(f"{source}: all {checked.rows_in:,} rows were rejected: {why}")


def _check_scenarios_present(checked: Validated, config: DatasetConfig) -> None:
    """A declared scenario with no valid rows is a mapping mistake or bad rows: say which instead of training on it."""
    present = set(checked.valid[SCENARIO].unique().to_list())
    empty = [name for sid, name in enumerate(checked.scenarios) if sid not in present]
    if not empty:
        return
    theirs = checked.rejected.filter(scenario_text(config).is_in(empty))
    if len(theirs) == 0:
        cause = "no row carries them; remove them from `scenarios` or check the scenario column"
    else:
        reasons = describe_rejects(_reason_counts(theirs), _ts_problems(theirs), config.columns.ts)
        cause = f"all their rows were rejected: {reasons}"
    raise DataError(f"{config.source.path}: scenario(s) {empty} declared in the config have no valid rows ({cause})")


def _write_rejects(rejected: pl.DataFrame, out_dir: Path) -> dict[str, int]:
    """Rejected rows with their log position and reason → rejects.parquet; returns reason → rows."""
    if len(rejected):
        raw_columns = [name for name in rejected.columns if not name.startswith("_")]
        rejected.select([ROW, *raw_columns, REASON]).rename(
            {ROW: "row_in_log", REASON: "reject_reason"}
        ).write_parquet(out_dir / "rejects.parquet")
    return _reason_counts(rejected)


def _empty_scenarios(splits: dict[str, SplitStats]) -> dict[str, list[str]]:
    """split → declared scenarios without a row in it (splits with rows only): their metrics would silently be absent."""
    empty = {
        split: [name for name, sc in stats.scenarios.items() if sc.rows == 0]
        for split, stats in splits.items() if stats.rows
    }
    for split, names in empty.items():
        if names:
            log.warning("scenario(s) %s have no rows in %s", names, split)
    return {split: names for split, names in empty.items() if names}


def _numeric_stats(column: str, train_values: pl.Series, all_values: pl.Series) -> NumericStats:
    """Train mean/std of a numeric column; NaN/inf rows were rejected (bad_numeric), so the values are finite."""
    values = train_values.cast(pl.Float64)
    mean = values.mean()
    std = values.std()
    if not all(math.isfinite(v) for v in (mean, std) if v is not None):  # finite values can still overflow a sum
        raise DataError(f"column '{column}': train mean/std overflow (max |value| {values.abs().max()}); rescale it")
    return NumericStats(
        mean=float(mean) if mean is not None else 0.0,
        std=float(std) if std else 1.0,  # constant or single-row train column: leave the scale alone
        nulls=int(all_values.null_count()),
    )


def _normalise(column: str, stats: NumericStats) -> pl.Expr:
    return ((pl.col(column).cast(pl.Float64) - stats.mean) / stats.std).fill_null(0.0).cast(pl.Float32)


def _user_key(users: pl.Series) -> pl.Series:
    """The user's raw id as int64 for per-user metrics (GAUC); text ids become their stable 64-bit hash."""
    if users.dtype.is_integer():
        return users.cast(pl.Int64)
    table = distinct_text_map(users, stable_hash64)
    return users.to_frame(RAW).join(table, on=RAW, how="left", maintain_order="left")[INDEX]


def _histories(
    valid: pl.DataFrame, config: DatasetConfig, encoders: dict[str, FittedEncoder]
) -> tuple[pl.DataFrame, HistoryEvents | None]:
    """Log-built histories index every row into one event array; precomputed ones are encoded into list columns."""
    history = config.history
    item_col = encoded(history.item_feature)
    cat_col = encoded(history.category_feature) if history.category_feature else None
    if history.precomputed_column is None:
        indexed, events = index_histories(
            valid, config.columns.user, item_col, cat_col, history.max_len, history.events,
            encoded(FEEDBACK) if history.feedback is not None else None,
        )
        lengths = indexed[HIST_HI] - indexed[HIST_LO]
        log.info("history events %d, mean history length %.2f", len(events.item), float(lengths.mean() or 0))
        return indexed, events
    sequences = valid[history.precomputed_column]
    exploded = (sequences.str.split(history.precomputed_separator) if sequences.dtype == pl.String else sequences)
    item_lookup = encoders[history.item_feature].lookup(exploded.explode().drop_nulls().cast(pl.String))
    if cat_col is not None:
        item_category = (
            valid.sort(ROW).group_by(item_col, maintain_order=True).agg(pl.col(cat_col).first())
            .rename({item_col: RAW, cat_col: INDEX})
        )
    else:
        item_category = pl.DataFrame({RAW: [], INDEX: []}, schema={RAW: pl.Int64, INDEX: pl.Int64})
    lists = precomputed_lists(
        sequences, history.precomputed_separator, history.max_len, item_lookup, item_category, valid[SCENARIO]
    )
    return valid.with_columns([pl.from_arrow(array).alias(name) for name, array in lists.items()]), None


def _feedback_values(config: DatasetConfig, rows: pl.DataFrame) -> pl.Series:
    """The raw feedback of `rows` as text (a vocabulary of text keys serves ints and floats alike)."""
    column = LABEL if config.history.feedback == FEEDBACK_FROM_LABEL else config.history.feedback
    return rows[column].cast(pl.String)


def _feedback_encoder(
    config: DatasetConfig, train: pl.DataFrame, fit: Callable[[CategoricalFeature, pl.Series], FittedEncoder]
) -> FittedEncoder | None:
    """Vocabulary of the train split's feedback values (every value seen once counts; `fit` as for the categorical
    features: fresh, or the parent's extended), or None without feedback."""
    if config.history.feedback is None:
        return None
    source = LABEL if config.history.feedback == FEEDBACK_FROM_LABEL else config.history.feedback
    feature = CategoricalFeature(FEEDBACK, source, table=FEEDBACK_TABLE, embedding_dim=_item_dim(config))
    return fit(feature, _feedback_values(config, train))


def _item_dim(config: DatasetConfig) -> int:
    """The behaviour slots share one width (EmbeddingCollection needs it): hist_feedback takes the item's."""
    return next(f.embedding_dim for f in config.categorical if f.name == config.history.item_feature)


def _write_vocabularies(encoders: dict[str, FittedEncoder], out_dir: Path) -> dict[str, str]:
    """feature → vocabulary file (relative); hashed features have none (their mapping is the hash)."""
    files = {}
    for name, encoder in encoders.items():
        if encoder.vocabulary is not None:
            relative = f"vocab/{name}.parquet"
            (out_dir / "vocab").mkdir(exist_ok=True)
            encoder.vocabulary.write_parquet(out_dir / relative)
            files[name] = relative
    return files


def _feature_specs(
    config: DatasetConfig, encoders: dict[str, FittedEncoder], scenarios: list[str], vocab_files: dict[str, str],
    feedback: FittedEncoder | None,
) -> list[FeatureSpec]:
    def scenario_spec(name: str, kind: FeatureKind) -> FeatureSpec:  # the example's scenario and each behaviour's
        return FeatureSpec(
            name, kind, config.columns.scenario, "scenario", len(scenarios), config.scenario_embedding_dim, "scenario"
        )

    specs = [scenario_spec("scenario", "scenario")]
    by_name = {f.name: f for f in config.categorical}
    for feature in config.categorical:
        specs.append(
            FeatureSpec(
                name=feature.name,
                kind="sparse",
                source=feature.column,
                table=feature.table,
                cardinality=encoders[feature.name].cardinality,
                embedding_dim=feature.embedding_dim,
                encoding=feature.encoding,
                vocabulary=vocab_files.get(feature.name),
            )
        )
    item = by_name[config.history.item_feature]
    specs.append(_sequence_spec("hist_item", item.name, item.table, encoders[item.name], item.embedding_dim))
    if config.history.category_feature is not None:
        cat = by_name[config.history.category_feature]
        specs.append(_sequence_spec("hist_cat", cat.name, cat.table, encoders[cat.name], cat.embedding_dim))
    else:  # no category in this dataset: hist_cat is all OOV, on a table of its own
        specs.append(FeatureSpec("hist_cat", "sequence", "", "hist_cat", OOV_INDEX + 1, item.embedding_dim))
    specs.append(replace(scenario_spec("hist_scenario", "sequence"), role=BEHAVIOUR_SCENARIO))
    if feedback is not None:
        specs.append(FeatureSpec(
            FEEDBACK, "sequence", config.history.feedback, FEEDBACK_TABLE, feedback.cardinality,
            feedback.feature.embedding_dim, "vocab", vocab_files[FEEDBACK], role=BEHAVIOUR_FEEDBACK,
        ))
    specs += [FeatureSpec(f.name, "dense", f.column, encoding="numeric") for f in config.numeric]
    return specs


def _sequence_spec(name: str, source_feature: str, table: str | None, encoder: FittedEncoder, dim: int) -> FeatureSpec:
    return FeatureSpec(
        name=name,
        kind="sequence",
        source=source_feature,
        table=table,
        cardinality=encoder.cardinality,
        embedding_dim=dim,
        encoding=encoder.feature.encoding,
    )


def _example_columns(config: DatasetConfig) -> list[pl.Expr]:
    """The contract columns of an example, from the pipeline's working columns."""
    return [
        pl.col(LABEL).cast(pl.Float32).alias("label"),
        pl.col(SCENARIO).cast(pl.Int32).alias("scenario"),
        pl.col(USER_KEY).cast(pl.Int64).alias("user_id"),
        pl.col(TS).cast(pl.Int64).alias("ts"),
        *[pl.col(encoded(f.name)).cast(pl.Int64).alias(f.name) for f in config.categorical],
        *[pl.col(normalised(f.name)).alias(f.name) for f in config.numeric],
    ]


def _write_split(
    valid: pl.DataFrame,
    split: str,
    config: DatasetConfig,
    events: HistoryEvents | None,
    scenarios: list[str],
    out_dir: Path,
    progress: bool,
) -> SplitStats:
    rows = valid.filter(pl.col(SPLIT) == split).sort([TS, ROW])
    writer = ShardWriter(out_dir, split, config.output)
    chunk_rows = config.output.rows_per_row_group
    columns = _example_columns(config)
    history_columns = ["hist_item", "hist_cat", "hist_scenario", *([FEEDBACK] if config.history.feedback else [])]
    bar = tqdm(total=len(rows), desc=f"write {split}", unit="rows", disable=not progress, leave=False)
    for start in range(0, len(rows), chunk_rows):
        chunk = rows.slice(start, chunk_rows)
        table = chunk.select(columns).to_arrow()
        if events is not None:
            lists = events.lists(chunk[HIST_LO].to_numpy(), chunk[HIST_HI].to_numpy())
        else:  # precomputed histories (which carry no feedback)
            lists = {name: chunk[name].to_arrow() for name in history_columns}
        for name in history_columns:
            table = table.append_column(name, lists[name].cast(pa.list_(pa.int64())))
        lengths = pc.list_value_length(lists["hist_item"]).cast(pa.int32())
        table = table.append_column("hist_len", lengths)
        writer.write(table)
        bar.update(len(chunk))
    bar.close()
    files = writer.close()
    clicks = int(rows[LABEL].sum()) if len(rows) else 0
    counts = rows.group_by(SCENARIO).agg(pl.len(), pl.col(LABEL).cast(pl.Int64).sum())
    per_scenario = {sid: (n, k) for sid, n, k in counts.iter_rows()}
    log.info("%s: %d rows in %d files", split, len(rows), len(files))
    return SplitStats(
        rows=len(rows),
        clicks=clicks,
        ctr=clicks / len(rows) if len(rows) else 0.0,
        files=files,
        scenarios={
            name: _scenario_stats(*per_scenario.get(sid, (0, 0))) for sid, name in enumerate(scenarios)
        },
    )


def _scenario_stats(rows: int, clicks: int) -> ScenarioStats:
    return ScenarioStats(rows=int(rows), clicks=int(clicks), ctr=clicks / rows if rows else 0.0)


def _content_hash(root: Path, files: list[str]) -> str:
    """BLAKE2b over the written shards and vocabularies, so a model can name exactly which data it saw."""
    digest = hashlib.blake2b(digest_size=16)
    for relative in sorted(files):
        digest.update(relative.encode())
        with open(root / relative, "rb") as handle:
            while block := handle.read(1 << 22):
                digest.update(block)
    return digest.hexdigest()
