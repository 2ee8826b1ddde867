"""Open the raw log named by a dataset config as one lazy frame, whatever its layout."""

from __future__ import annotations

import glob
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from msit_rec.errors import DataError
from pipelines.adapters import ADAPTERS
from pipelines.config import SourceConfig

GLOB_CHARS = "*?["


def source_root(path: str | Path) -> Path:
    """The concrete path a source names: the path itself, or for a glob the folder above its first wildcard.

    Everything the source can read lies under it, so an output that does not overlap it cannot touch the input.
    """
    parts = Path(path).parts
    for i, part in enumerate(parts):
        if any(ch in part for ch in GLOB_CHARS):
            return Path(*parts[:i]) if i else Path(".")
    return Path(path)


def parquet_files(path: str | Path) -> list[Path]:
    """The Parquet files behind a file, a directory (searched recursively, hive partitions too) or a glob."""
    text = str(path)
    if any(ch in text for ch in GLOB_CHARS):
        files = sorted(Path(p) for p in glob.glob(text, recursive=True))
    elif Path(text).is_dir():
        files = sorted(Path(text).rglob("*.parquet"))
    elif Path(text).is_file():
        files = [Path(text)]
    else:
        raise DataError(f"raw log {text} does not exist (expected a Parquet file, a directory of them or a glob)")
    if not files:
        raise DataError(f"raw log {text}: no .parquet files found")
    return files


def check_parquet_readable(files: list[Path]) -> None:
    """Read every footer up front, so a corrupt file is named before any work starts."""
    for file in files:
        try:
            pq.read_metadata(file)
        except (pa.ArrowException, OSError) as exc:  # ArrowInvalid for truncated/garbage files, OSError if unreadable
            raise DataError(f"{file}: not a readable Parquet file ({exc})") from None


def read_source(source: SourceConfig) -> pl.LazyFrame:
    """Raw log as a LazyFrame with the layout's columns (the adapters map public layouts onto the contract)."""
    if source.adapter != "parquet":
        return ADAPTERS[source.adapter](source)
    if source.options:
        raise DataError(f"source.options {sorted(source.options)}: the parquet source takes no options")
    files = parquet_files(source.path)
    check_parquet_readable(files)
    root = Path(source.path)
    hive = root.is_dir() and any("=" in part for f in files for part in f.relative_to(root).parts[:-1])
    return pl.scan_parquet([str(f) for f in files], hive_partitioning=hive)
