"""Check a raw log against the dataset config before any work, then tag every row valid or rejected.

Schema problems (a missing column, a column of the wrong type) stop the run with an error naming the column.
Row problems (null ids, labels outside {0,1}, unparsable or out-of-range times, unknown scenarios, NaN or
infinite numerics) never stop it and never drop rows silently: each row gets at most one reject reason and
goes to the rejects report. Exact duplicate rows are counted, and rejected only when the config says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from msit_rec.errors import DataError, SchemaError
from pipelines.config import FEEDBACK_FROM_LABEL, DatasetConfig

# Derived columns the pipeline adds to the raw log; the leading underscore keeps them apart from raw names.
ROW = "_row"  # position in the raw log: the deterministic tie-breaker for equal timestamps
TS = "_ts"  # epoch seconds, int64
LABEL = "_label"  # int8 in {0, 1}
SCENARIO = "_scenario"  # int32 scenario id
REASON = "_reject_reason"  # null for valid rows

REJECT_REASONS = (
    "null_user",
    "null_item",
    "null_scenario",
    "null_ts",
    "null_label",
    "bad_ts",
    "bad_label",
    "unknown_scenario",
    "bad_numeric",
    "bad_split",
    "duplicate",  # only with validate.drop_duplicates; tagged after the row checks (see tag_duplicates)
)
SPLIT_NAMES = ("train", "valid", "test")

_ID_TYPES = "integer or string"

# Epoch seconds at or above this are year 5138 or later: such a value is really milliseconds (~1.7e12 today),
# microseconds (~1.7e15) or nanoseconds (~1.7e18) in a seconds column, and would wreck time splits and histories.
MAX_TS_SECONDS = 10**11
# bad_ts kind → how a person reads it; `ts_problem` assigns the kind
TS_PROBLEMS = {
    "unparsable": "unparsable",
    "negative": "negative (before 1970)",
    "milliseconds": "look like milliseconds",
    "microseconds": "look like microseconds",
    "nanoseconds": "look like nanoseconds",
}


def _is_id_type(dtype: pl.DataType) -> bool:
    return dtype.is_integer() or dtype in (pl.String, pl.Categorical) or isinstance(dtype, pl.Enum)


def _is_ts_type(dtype: pl.DataType) -> bool:
    return dtype.is_integer() or dtype == pl.String or isinstance(dtype, (pl.Datetime, pl.Date))


def _is_label_type(dtype: pl.DataType) -> bool:
    return dtype.is_integer() or dtype.is_float() or dtype == pl.Boolean


def _is_numeric_type(dtype: pl.DataType) -> bool:
    return dtype.is_integer() or dtype.is_float() or dtype == pl.Boolean


def _is_text_type(dtype: pl.DataType) -> bool:
    return dtype in (pl.String, pl.Categorical)


def _is_history_type(dtype: pl.DataType) -> bool:
    return dtype == pl.String or isinstance(dtype, pl.List)


def _is_feedback_type(dtype: pl.DataType) -> bool:
    return _is_id_type(dtype) or dtype.is_float()


def expected_columns(config: DatasetConfig) -> dict[str, tuple[str, str, object]]:
    """column → (role, expected type in words, type check) for every column the config reads."""
    c = config.columns
    checks: dict[str, tuple[str, str, object]] = {
        c.user: ("user id", _ID_TYPES, _is_id_type),
        c.item: ("item id", _ID_TYPES, _is_id_type),
        c.scenario: ("scenario", _ID_TYPES, _is_id_type),
        c.ts: ("timestamp", "integer epoch seconds, datetime, date or string", _is_ts_type),
        c.label: ("label", "integer, float or boolean with values 0/1", _is_label_type),
    }
    for feature in config.categorical:
        checks.setdefault(feature.column, (f"categorical feature '{feature.name}'", _ID_TYPES, _is_id_type))
    for feature in config.numeric:
        checks.setdefault(feature.column, (f"numeric feature '{feature.name}'", "integer or float", _is_numeric_type))
    if config.split.method == "column":
        checks[config.split.column] = ("split", "string train/valid/test", _is_text_type)
    if config.history.feedback not in (None, FEEDBACK_FROM_LABEL):
        checks.setdefault(config.history.feedback, ("history feedback", f"{_ID_TYPES} or float", _is_feedback_type))
    if config.history.precomputed_column is not None:
        checks[config.history.precomputed_column] = (
            "precomputed history",
            f"string of '{config.history.precomputed_separator}'-joined item ids, or a list",
            _is_history_type,
        )
    return checks


def check_schema(schema: pl.Schema, config: DatasetConfig, source: str) -> None:
    """Fail before any work when a column the config names is missing or mistyped."""
    present = list(schema.names())
    for column, (role, expected, ok) in expected_columns(config).items():
        if column not in schema:
            raise SchemaError(
                f"{source}: missing column '{column}' ({role}; expected {expected}); columns present: {present}"
            )
        dtype = schema[column]
        if not ok(dtype):  # type: ignore[operator]
            raise SchemaError(f"{source}: column '{column}' ({role}) has type {dtype}; expected {expected}")


def _ts_seconds(config: DatasetConfig, dtype: pl.DataType) -> pl.Expr:
    col = pl.col(config.columns.ts)
    if dtype.is_integer():
        return col.cast(pl.Int64, strict=False)  # a UInt64 beyond int64 becomes null: bad_ts, not a crash
    if isinstance(dtype, (pl.Datetime, pl.Date)):
        return col.dt.epoch("s")
    parsed = col.str.to_datetime(format=config.ts_format, strict=False, time_unit="us")
    return parsed.dt.epoch("s")


def ts_problem(ts: pl.Expr) -> pl.Expr:
    """The kind (a key of TS_PROBLEMS) of a `bad_ts` row's epoch seconds: the unit they look like, or what else is wrong."""
    return (
        pl.when(ts.is_null()).then(pl.lit("unparsable"))
        .when(ts < 0).then(pl.lit("negative"))
        .when(ts < MAX_TS_SECONDS * 10**3).then(pl.lit("milliseconds"))  # seconds below the bound once / 1000
        .when(ts < MAX_TS_SECONDS * 10**6).then(pl.lit("microseconds"))
        .otherwise(pl.lit("nanoseconds"))
    )


def _bad_ts(ts: pl.Expr) -> pl.Expr:
    return ts.is_null() | (ts < 0) | (ts >= MAX_TS_SECONDS)


def _non_finite(config: DatasetConfig, schema: pl.Schema) -> pl.Expr:
    """True where a float numeric feature is NaN or ±inf: one such value would make the train mean/std NaN."""
    columns = [f.column for f in config.numeric if schema[f.column].is_float()]
    return pl.any_horizontal([~pl.col(c).is_finite().fill_null(True) for c in columns] or [pl.lit(False)])


def _label_int(config: DatasetConfig, dtype: pl.DataType) -> pl.Expr:
    col = pl.col(config.columns.label)
    if dtype == pl.Boolean:
        return col.cast(pl.Int8)
    good = (col == 0) | (col == 1)
    return pl.when(good).then(col.cast(pl.Int8)).otherwise(None)


def scenario_text(config: DatasetConfig) -> pl.Expr:
    """Scenario raw values as text: the key the declared scenario names are matched against."""
    return pl.col(config.columns.scenario).cast(pl.String)


@dataclass
class TaggedLog:
    """The raw log with derived columns; `REASON` is null for valid rows."""

    frame: pl.LazyFrame
    scenarios: list[str]


def discover_scenarios(lf: pl.LazyFrame, config: DatasetConfig) -> list[str]:
    """Scenario names in a stable order: as declared, else sorted (numerically when the raw values are numbers)."""
    if config.scenarios is not None:
        return list(config.scenarios)
    values = lf.select(pl.col(config.columns.scenario).drop_nulls().unique().sort()).collect(engine="streaming")
    return [str(v) for v in values.to_series().to_list()]


def tag_rows(lf: pl.LazyFrame, config: DatasetConfig, source: str) -> TaggedLog:
    """Add derived columns and one reject reason per bad row (first failing check wins, in REJECT_REASONS order)."""
    schema = lf.collect_schema()
    check_schema(schema, config, source)
    c = config.columns
    scenarios = discover_scenarios(lf, config)
    if not scenarios:
        raise DataError(f"{source}: column '{c.scenario}' has no non-null scenario values")
    ts = _ts_seconds(config, schema[c.ts])
    label = _label_int(config, schema[c.label])
    scenario_id = scenario_text(config).replace_strict(
        scenarios, list(range(len(scenarios))), default=None, return_dtype=pl.Int32
    )
    checks = [
        ("null_user", pl.col(c.user).is_null()),
        ("null_item", pl.col(c.item).is_null()),
        ("null_scenario", pl.col(c.scenario).is_null()),
        ("null_ts", pl.col(c.ts).is_null()),
        ("null_label", pl.col(c.label).is_null()),
        ("bad_ts", _bad_ts(pl.col(TS))),
        ("bad_label", pl.col(LABEL).is_null()),
        ("unknown_scenario", pl.col(SCENARIO).is_null()),
        ("bad_numeric", _non_finite(config, schema)),
    ]
    if config.split.method == "column":
        checks.append(("bad_split", ~pl.col(config.split.column).cast(pl.String).is_in(SPLIT_NAMES).fill_null(False)))
    reason = pl.when(checks[0][1]).then(pl.lit(checks[0][0]))
    for name, failed in checks[1:]:
        reason = reason.when(failed).then(pl.lit(name))
    tagged = (
        lf.with_row_index(ROW)
        .with_columns(ts.alias(TS), label.alias(LABEL), scenario_id.alias(SCENARIO))
        .with_columns(reason.otherwise(pl.lit(None, dtype=pl.String)).alias(REASON))
    )
    return TaggedLog(frame=tagged, scenarios=scenarios)


def tag_duplicates(frame: pl.DataFrame, columns: list[str], drop: bool) -> tuple[pl.DataFrame, int]:
    """Count valid rows equal to an earlier row on every one of `columns`; with `drop`, reject them as `duplicate`.

    `frame` is in log order, so the first copy is the one kept. Reject reasons depend only on these columns,
    so the copies of a rejected row are rejected already and are not counted.
    """
    repeat = pl.col(REASON).is_null() & ~pl.struct(columns).is_first_distinct()
    count = int(frame.select(repeat.sum()).item())
    if drop and count:
        frame = frame.with_columns(pl.when(repeat).then(pl.lit("duplicate")).otherwise(pl.col(REASON)).alias(REASON))
    return frame, count


def describe_rejects(counts: dict[str, int], ts_problems: dict[str, int], ts_column: str) -> str:
    """Reject counts, most frequent reason first, with what the bad timestamps look like: for error messages and logs."""
    parts = []
    for reason, n in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        detail = ""
        if reason == "bad_ts" and ts_problems:
            kinds = ", ".join(f"{k:,} {TS_PROBLEMS[kind]}" for kind, k in sorted(ts_problems.items()))
            detail = f" (column '{ts_column}' should hold epoch seconds: {kinds})"
        parts.append(f"{reason} {n:,}{detail}")
    return ", ".join(parts)
