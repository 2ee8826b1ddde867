"""Taobao display-ad click log in the joined Ali-Mama layout (FuxiCTR's `train/test` CSVs) → raw-log contract.

Column mapping: `userid` → user_id, `adgroup_id` → item_id, `pid` (ad position, text) → scenario,
`clk` → label, `time_stamp` → ts. `time_stamp` is either epoch seconds (the raw Ali-Mama sample) or text in
`time_format`, read as UTC (the log does not say its zone; only the order matters). Text that does not
parse gives a null ts, which `prepare` rejects.

Side features keep their names: the ad and user-profile codes (`cate_id`, `brand`, `cms_segid`, ...) as int64,
`price` as float, `click_sequence` (the user's `^`-joined earlier clicked items, oldest first; null when
empty) as text for the dataset's `history.precomputed_column`. Any other column passes through as text.

`split` names the file each row came from. When no valid file is given, the latest `valid_fraction` of the
train file's rows (by ts, then file order) become `valid`, so split method `column` has all three splits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import polars as pl

from pipelines.adapters.csv_layout import (
    ROW_COLUMN,
    SPLIT_COLUMN,
    as_float,
    as_int,
    as_label,
    check_split_files,
    layout_dir,
    load_options,
    scan_split_files,
)
from pipelines.config import SourceConfig

REQUIRED_COLUMNS = ("clk", "time_stamp", "userid", "adgroup_id", "pid")
CODE_COLUMNS = (
    "cate_id",
    "campaign_id",
    "customer",
    "brand",
    "cms_segid",
    "cms_group_id",
    "final_gender_code",
    "age_level",
    "pvalue_level",
    "shopping_level",
    "occupation",
    "new_user_class_level",
)
NUMERIC_COLUMNS = ("price",)


def _default_files() -> dict[str, str]:
    return {"train": "train_sample.csv", "test": "test_sample.csv"}


@dataclass
class TaobaoOptions:
    files: dict[str, str] = field(default_factory=_default_files)  # split (train/valid/test) → file in source.path
    valid_fraction: float = 0.1  # share of the train file carved out as valid when `files` has no valid file
    time_format: str = "%Y-%m-%d %H:%M:%S"  # strptime format of a text time_stamp

    def __post_init__(self) -> None:
        check_split_files(self.files)
        if not 0.0 <= self.valid_fraction < 1.0:
            raise ValueError(f"valid_fraction: expected a fraction in [0, 1), got {self.valid_fraction!r}")


def read_taobao(source: SourceConfig) -> pl.LazyFrame:
    """The split files as one frame with the contract columns, the side features and `split`."""
    options = load_options(TaobaoOptions, source)
    root = layout_dir(source, f"the Taobao files {sorted(options.files.values())}")
    raw = scan_split_files(root, options.files, REQUIRED_COLUMNS, "a Taobao display-ad CSV (Ali-Mama layout)")
    columns = raw.collect_schema().names()

    timestamp = pl.col("time_stamp").str.strip_chars()
    ts = (
        pl.when(timestamp.str.contains(r"^\d+$"))
        .then(timestamp.cast(pl.Int64, strict=False))
        .otherwise(timestamp.str.to_datetime(options.time_format, time_zone="UTC", strict=False).dt.epoch("s"))
    )
    contract = [
        as_int("userid").alias("user_id"),
        as_int("adgroup_id").alias("item_id"),
        pl.col("pid").alias("scenario"),
        ts.alias("ts"),
        as_label("clk").alias("label"),
    ]
    side = [as_int(name) for name in CODE_COLUMNS if name in columns]
    side += [as_float(name) for name in NUMERIC_COLUMNS if name in columns]
    passthrough = [name for name in columns if name not in {*REQUIRED_COLUMNS, *CODE_COLUMNS, *NUMERIC_COLUMNS}]
    frame = raw.select(*contract, *side, *passthrough)
    if "valid" not in options.files and options.valid_fraction > 0:
        frame = _carve_valid(frame, options.valid_fraction)
    return frame.drop(ROW_COLUMN)


def _carve_valid(frame: pl.LazyFrame, fraction: float) -> pl.LazyFrame:
    """Relabel the latest `fraction` of the train rows (ts, then file order; at least one row) as valid."""
    is_train = pl.col(SPLIT_COLUMN) == "train"
    n_train = is_train.sum()
    n_valid = (n_train.cast(pl.Float64) * fraction).ceil().cast(pl.Int64)
    # 1-based position of each row in train time order; non-train rows get positions too but are not used
    position = pl.struct("ts", ROW_COLUMN).rank("ordinal").over(SPLIT_COLUMN).cast(pl.Int64)
    return frame.with_columns(
        pl.when(is_train & (position > n_train - n_valid)).then(pl.lit("valid")).otherwise(pl.col(SPLIT_COLUMN))
        .alias(SPLIT_COLUMN)
    )
