"""Helpers that write small raw logs and dataset configs for pipeline tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl

from msit_rec.config import from_dict
from pipelines.config import DatasetConfig


def write_log(path: Path, columns: dict[str, list[Any]], schema: dict[str, pl.DataType] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pl.DataFrame(columns, schema=schema).write_parquet(path)
    return path


def dataset_config(source: Path, **overrides: Any) -> DatasetConfig:
    """A dataset config over the standard test columns; keyword overrides replace top-level sections."""
    data: dict[str, Any] = {
        "name": "test",
        "source": {"path": str(source)},
        "categorical": [
            {"name": "user", "column": "user_id"},
            {"name": "item", "column": "item_id"},
            {"name": "category", "column": "cat"},
        ],
        "history": {"max_len": 3},
        "split": {"method": "time", "valid_fraction": 0.0, "test_fraction": 0.0},
        "output": {"rows_per_row_group": 4, "rows_per_file": 8},
    }
    data.update(overrides)
    return from_dict(DatasetConfig, data, "test-config")


def read_split(out_dir: Path, meta: Any, split: str) -> pl.DataFrame:
    files = [out_dir / f for f in meta.splits[split].files]
    return pl.concat([pl.read_parquet(f) for f in files]) if files else pl.DataFrame()
