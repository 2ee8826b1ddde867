"""Open the raw log named by a dataset config as one lazy frame, whatever its layout."""

from __future__ import annotations

import fnmatch
import glob
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from msit_rec.errors import DataError
from msit_rec.outputs import check_no_overlap
from pipelines.adapters import ADAPTERS
from pipelines.config import SourceConfig

GLOB_CHARS = "*?["


def check_output_outside_source(path: str | Path, out: str | Path) -> None:
    """DataError when `out` overlaps what the source reads: the path itself, or for a glob every folder holding a
    file it matches — and any `out` whose own Parquet files the glob would match on the next run."""
    text = str(path)
    if not any(ch in text for ch in GLOB_CHARS):
        check_no_overlap(path, out, source_flag="source")
        return
    for folder in sorted({f.parent for f in parquet_files(path)}):
        check_no_overlap(folder, out, source_flag=f"source (files of {text} in)")
    probe = str(Path(out).resolve() / "train" / "part-00000.parquet")
    if fnmatch.fnmatch(probe, str(Path(text).absolute())):
        raise DataError(f"--out {out} overlaps source {text}: the glob would match the examples written there; "
                        f"choose an output the glob does not cover")


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
