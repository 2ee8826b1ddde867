"""Assign every valid example to train / valid / test."""

from __future__ import annotations

from datetime import UTC, datetime

import polars as pl

from msit_rec.errors import ConfigError
from pipelines.config import DatasetConfig
from pipelines.validate import ROW, TS

SPLIT = "_split"


def cutoff_seconds(value: int | str, key: str) -> int:
    """A cutoff given as epoch seconds or an ISO date/datetime (UTC unless it says otherwise)."""
    if isinstance(value, int):
        return value
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise ConfigError(f"{key}: expected epoch seconds or an ISO date/datetime, got {value!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp())


def time_cutoffs(rows: pl.DataFrame, config: DatasetConfig) -> tuple[int, int]:
    """(valid_start, test_start): from config, or at the time quantiles that leave the configured fractions."""
    split = config.split
    if split.valid_start is not None and split.test_start is not None:
        valid_start = cutoff_seconds(split.valid_start, "split.valid_start")
        test_start = cutoff_seconds(split.test_start, "split.test_start")
    elif split.valid_start is None and split.test_start is None:
        if not (split.valid_fraction >= 0 and split.test_fraction >= 0 and split.valid_fraction + split.test_fraction < 1):
            raise ConfigError("split: valid_fraction + test_fraction must be in [0, 1)")
        ts = rows[TS]
        test_start = int(ts.quantile(1 - split.test_fraction, "higher")) if split.test_fraction > 0 else 2**62
        valid_q = 1 - split.test_fraction - split.valid_fraction
        valid_start = int(ts.quantile(valid_q, "higher")) if split.valid_fraction > 0 else test_start
    else:
        raise ConfigError("split: give both valid_start and test_start, or neither (then fractions are used)")
    if valid_start > test_start:
        raise ConfigError(f"split: valid_start ({valid_start}) is after test_start ({test_start})")
    return valid_start, test_start


def assign_splits(rows: pl.DataFrame, config: DatasetConfig, user: str) -> tuple[pl.DataFrame, dict[str, int]]:
    """`rows` with a SPLIT column (train/valid/test), and the cutoffs used (for dataset.json)."""
    split = config.split
    if split.method == "column":
        return rows.with_columns(pl.col(split.column).cast(pl.String).alias(SPLIT)), {}
    if split.method == "time":
        valid_start, test_start = time_cutoffs(rows, config)
        label = (
            pl.when(pl.col(TS) >= test_start)
            .then(pl.lit("test"))
            .when(pl.col(TS) >= valid_start)
            .then(pl.lit("valid"))
            .otherwise(pl.lit("train"))
        )
        return rows.with_columns(label.alias(SPLIT)), {"valid_start": valid_start, "test_start": test_start}
    # user_last_n: rank each user's examples from the newest (0) back
    from_newest = pl.int_range(pl.len()).reverse().over(user, order_by=[TS, ROW])
    label = (
        pl.when(from_newest < split.n_test)
        .then(pl.lit("test"))
        .when(from_newest < split.n_test + split.n_valid)
        .then(pl.lit("valid"))
        .otherwise(pl.lit("train"))
    )
    return rows.with_columns(label.alias(SPLIT)), {"n_valid": split.n_valid, "n_test": split.n_test}
