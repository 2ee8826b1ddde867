"""KuaiRand, joined with its user and video features (Scenario-Wise-Rec's `kuairand_sample.csv`) → raw-log contract.

Column mapping: `user_id` → user_id, `video_id` → item_id, `tab` (the app page, int) → scenario,
`label` option (default `is_click`) → label. The other feedback columns (`is_like`, `long_view`,
`play_time_ms`, ...) are dropped: they are known only after the impression and would leak the label.

Time, from the first the file has: `time_ms` (epoch milliseconds → seconds); `date` (YYYYMMDD) plus
`hourmin` (HHMM) when present, read as UTC; otherwise the row's 0-based position in the file (the public
sample has no time column, so "earlier row" stands for "earlier event").

Side features keep their names: the coded user/video fields (`user_active_degree`, `*_range`,
`onehot_feat*`, `video_type`, ...) as text with float-written codes folded (`1.0` → `1`), the counts and
sizes (`follow_user_num`, `duration_ms`, `server_width`, ...) as float. Any other column passes through as
text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import polars as pl

from pipelines.adapters.csv_layout import (
    ROW_COLUMN,
    as_code,
    as_float,
    as_int,
    as_label,
    layout_dir,
    load_options,
    require_option_column,
    scan_text_csv,
    with_row_number,
)
from pipelines.config import SourceConfig

REQUIRED_COLUMNS = ("user_id", "video_id", "tab")
FEEDBACK_COLUMNS = (
    "is_click",
    "is_like",
    "is_follow",
    "is_comment",
    "is_forward",
    "is_hate",
    "long_view",
    "is_profile_enter",
    "play_time_ms",
    "profile_stay_time",
    "comment_stay_time",
)
TIME_COLUMNS = ("time_ms", "date", "hourmin")
NUMERIC_COLUMNS = (
    "duration_ms",
    "follow_user_num",
    "fans_user_num",
    "friend_user_num",
    "register_days",
    "server_width",
    "server_height",
)
CODE_COLUMN_PATTERN = re.compile(
    r"user_active_degree|is_.*|.*_range|onehot_feat\d+|video_type|visible_status|upload_type|music_type"
)


@dataclass
class KuaiRandOptions:
    file: str = "kuairand_sample.csv"  # the joined log in source.path
    label: str = "is_click"  # 0/1 feedback column used as the label


def read_kuairand(source: SourceConfig) -> pl.LazyFrame:
    """The joined log with the contract columns and the user/video side features."""
    options = load_options(KuaiRandOptions, source)
    root = layout_dir(source, f"the KuaiRand file {options.file}")
    path = root / options.file
    raw = scan_text_csv(path, REQUIRED_COLUMNS, "a KuaiRand log joined with user and video features")
    columns = raw.collect_schema().names()
    require_option_column(columns, options.label, "label", path)

    consumed = {*REQUIRED_COLUMNS, *FEEDBACK_COLUMNS, *TIME_COLUMNS, options.label}
    side = []
    for name in columns:
        if name in consumed:
            continue
        if name in NUMERIC_COLUMNS:
            side.append(as_float(name))
        elif CODE_COLUMN_PATTERN.fullmatch(name):
            side.append(as_code(name))
        else:
            side.append(pl.col(name))
    return with_row_number(raw).select(
        as_int("user_id").alias("user_id"),
        as_int("video_id").alias("item_id"),
        as_int("tab").alias("scenario"),
        _event_time(columns).alias("ts"),
        as_label(options.label).alias("label"),
        *side,
    )


def _event_time(columns: list[str]) -> pl.Expr:
    if "time_ms" in columns:
        return as_int("time_ms") // 1000
    if "date" in columns:
        day = pl.col("date").str.strip_chars().str.to_datetime("%Y%m%d", time_zone="UTC", strict=False).dt.epoch("s")
        if "hourmin" not in columns:
            return day
        hourmin = as_int("hourmin")
        return day + hourmin // 100 * 3600 + hourmin % 100 * 60
    return pl.col(ROW_COLUMN)
