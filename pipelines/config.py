"""Dataset config: how a raw log maps onto the contract and how `prepare` turns it into examples."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

# Columns every examples file has besides the features; feature names must not take them.
FEEDBACK_TABLE = "feedback"  # the embedding table of hist_feedback
FEEDBACK_FROM_LABEL = "label"  # history.feedback: each behaviour's own label (clicked or not)
RESERVED_COLUMNS = frozenset(
    {"label", "scenario", "user_id", "ts", "hist_item", "hist_cat", "hist_scenario", "hist_feedback", "hist_len"}
)


@dataclass
class SourceConfig:
    """Where the raw log is and which layout it has (`parquet` = the raw-log contract already)."""

    path: str
    adapter: Literal["parquet", "movielens", "taobao", "ali_ccp", "kuairand"] = "parquet"
    options: dict[str, Any] = field(default_factory=dict)  # adapter-specific, checked by the adapter


@dataclass
class ColumnsConfig:
    """Raw-log column names of the five contract fields."""

    user: str = "user_id"
    item: str = "item_id"
    scenario: str = "scenario"
    ts: str = "ts"
    label: str = "label"


@dataclass
class CategoricalFeature:
    """A categorical raw column encoded to int64 ids (0 = padding, 1 = OOV/rare/null)."""

    name: str
    column: str
    table: str | None = None  # defaults to `name`; features naming one table share it
    encoding: Literal["vocab", "hash"] = "vocab"
    min_count: int = 1  # vocab: train-split count below this → OOV
    buckets: int = 0  # hash: number of buckets (ids 2 .. buckets+1)
    embedding_dim: int = 16

    def __post_init__(self) -> None:
        if self.table is None:
            self.table = self.name
        if self.encoding == "hash" and self.buckets < 1:
            raise ValueError(f"feature '{self.name}': encoding 'hash' needs buckets >= 1")
        if self.min_count < 1:
            raise ValueError(f"feature '{self.name}': min_count must be >= 1")


@dataclass
class NumericFeature:
    """A numeric raw column, written as float32 normalised with train-split mean/std."""

    name: str
    column: str


@dataclass
class HistoryConfig:
    """Which events form the behaviour history and how long it is."""

    max_len: int = 50
    events: Literal["clicks", "all"] = "clicks"
    item_feature: str = "item"  # categorical feature whose ids fill hist_item (shares its table)
    category_feature: str | None = "category"  # categorical feature whose ids fill hist_cat
    # Layouts that ship a ready history (Taobao's click_sequence): a column of separator-joined raw item ids,
    # oldest first. It is taken as given: its events carry no time, so no leak check is possible.
    precomputed_column: str | None = None
    precomputed_separator: str = "^"
    # Each behaviour's feedback as the sequence feature hist_feedback (contract v2): "label" (clicked or not: use
    # with events: all, so skips are in the history), or a raw column with a graded value (a rating, a dwell
    # bucket), encoded by a vocabulary of its train values. None: no hist_feedback.
    feedback: str | None = None

    def __post_init__(self) -> None:
        if self.max_len < 1:
            raise ValueError("history.max_len must be >= 1")
        if self.feedback is not None and self.precomputed_column is not None:
            raise ValueError("history.feedback needs histories built from the log; precomputed ones carry no feedback")


@dataclass
class SplitConfig:
    """Train/valid/test assignment.

    `time`: global cutoffs — `valid_start`/`test_start` as epoch seconds or ISO datetimes, or, when absent,
    at the time quantiles that leave `valid_fraction`/`test_fraction` of the rows after them.
    `user_last_n`: each user's last `n_test` examples go to test and the `n_valid` before to valid.
    `column`: the raw log carries the split name (train/valid/test) in `column`.
    """

    method: Literal["time", "user_last_n", "column"] = "time"
    valid_start: int | str | None = None
    test_start: int | str | None = None
    valid_fraction: float = 0.1
    test_fraction: float = 0.1
    n_valid: int = 1
    n_test: int = 1
    column: str = "split"


@dataclass
class ValidateConfig:
    """Row checks beyond the per-row reject reasons.

    Exact duplicate rows (every column `prepare` reads equal) are always counted; they are often a logging
    bug (a retried upload), sometimes real (two identical impressions in one second), so dropping them is a
    choice: `drop_duplicates` rejects every copy after the first with reason `duplicate`.
    """

    drop_duplicates: bool = False


@dataclass
class OutputConfig:
    rows_per_row_group: int = 65_536
    rows_per_file: int = 1_048_576
    compression: Literal["zstd", "snappy", "lz4", "none"] = "zstd"


@dataclass
class DatasetConfig:
    name: str
    source: SourceConfig
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)
    scenarios: list[str] | None = None  # declared scenario names (raw values as text); others are rejected
    ts_format: str | None = None  # strptime format when ts is text; None = epoch seconds or a datetime
    scenario_embedding_dim: int = 8
    categorical: list[CategoricalFeature] = field(default_factory=list)
    numeric: list[NumericFeature] = field(default_factory=list)
    history: HistoryConfig = field(default_factory=HistoryConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    seed: int = 0

    def __post_init__(self) -> None:
        names = [f.name for f in self.categorical] + [f.name for f in self.numeric]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"feature name(s) {dupes} declared more than once")
        reserved = sorted(set(names) & RESERVED_COLUMNS)
        if reserved:
            raise ValueError(f"feature name(s) {reserved} clash with example columns {sorted(RESERVED_COLUMNS)}")
        if any(f.table == "scenario" for f in self.categorical):
            raise ValueError("table name 'scenario' is reserved for the scenario embedding")
        if self.history.feedback is not None and any(f.table == FEEDBACK_TABLE for f in self.categorical):
            raise ValueError(f"table name '{FEEDBACK_TABLE}' is reserved for hist_feedback when history.feedback is set")
        tables = [f.table for f in self.categorical]
        shared = sorted({t for t in tables if tables.count(t) > 1})
        if shared:
            # each feature builds its own vocabulary, so two features cannot index one table consistently
            raise ValueError(f"table(s) {shared} named by more than one categorical feature")
        categorical = {f.name for f in self.categorical}
        if self.history.item_feature not in categorical:
            raise ValueError(f"history.item_feature '{self.history.item_feature}' is not a categorical feature")
        if self.history.category_feature is not None and self.history.category_feature not in categorical:
            raise ValueError(
                f"history.category_feature '{self.history.category_feature}' is not a categorical feature"
            )
