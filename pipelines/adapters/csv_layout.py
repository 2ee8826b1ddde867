"""What every CSV layout adapter shares: strict options, named input files, text scans and typed casts.

CSV files are scanned with every column as text and cast explicitly by the adapter, so that the column
types never depend on what polars happens to infer from the first rows of each file (Ali-CCP's test file,
for one, writes `0` where the train file writes `0.0`). Casts are lenient: a value that does not parse
becomes null, which `prepare` rejects (contract fields, by reason) or maps to OOV (side features), so one
bad line in a large log costs one row instead of the whole run.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

import polars as pl

from msit_rec.config import from_dict
from msit_rec.data.spec import SPLITS
from msit_rec.errors import DataError, SchemaError
from pipelines.config import SourceConfig

T = TypeVar("T")

SPLIT_COLUMN = "split"
ROW_COLUMN = "_input_row"  # position in the concatenated input, for row-order time and stable tie-breaks


def load_options(cls: type[T], source: SourceConfig) -> T:
    """The adapter's options dataclass; an unknown key or a wrong type is a ConfigError naming it."""
    return from_dict(cls, source.options, "source.options")


def layout_dir(source: SourceConfig, expected: str) -> Path:
    """`source.path`, which for a CSV layout is the folder holding the layout's files."""
    root = Path(source.path)
    if not root.is_dir():
        raise DataError(f"source.path {root} is not a folder (expected the folder holding {expected})")
    return root


def check_split_files(files: dict[str, str]) -> None:
    """Options naming one file per split: only train/valid/test, and train is needed."""
    unknown = sorted(set(files) - set(SPLITS))
    if unknown:
        raise ValueError(f"files: unknown split(s) {unknown}; expected keys among {list(SPLITS)}")
    if "train" not in files:
        raise ValueError("files: a 'train' file is required")


def scan_text_csv(path: Path, required: Sequence[str], expected: str) -> pl.LazyFrame:
    """Lazy scan of one CSV with all columns as text, after checking the file and its required columns."""
    if not path.is_file():
        raise DataError(f"{path}: file not found (expected {expected})")
    frame = pl.scan_csv(path, infer_schema=False)
    try:
        columns = frame.collect_schema().names()  # reads the header only
    except pl.exceptions.PolarsError as exc:
        raise DataError(f"{path}: not a readable CSV file ({exc})") from None
    missing = [name for name in required if name not in columns]
    if missing:
        raise SchemaError(f"{path}: missing column(s) {missing} (expected {expected} with columns {list(required)})")
    return frame


def scan_split_files(root: Path, files: dict[str, str], required: Sequence[str], expected: str) -> pl.LazyFrame:
    """One text frame of all split files in train, valid, test order, with `split` and a global row number.

    The files must share their columns, so that a concatenation never invents nulls for a column that
    one file lacks.
    """
    frames = []
    first_columns: list[str] | None = None
    for split in SPLITS:
        if split not in files:
            continue
        path = root / files[split]
        frame = scan_text_csv(path, required, expected)
        columns = frame.collect_schema().names()
        if first_columns is None:
            first_columns = columns
        elif set(columns) != set(first_columns):
            missing, extra = sorted(set(first_columns) - set(columns)), sorted(set(columns) - set(first_columns))
            raise SchemaError(f"{path}: columns differ from {files['train']} (missing {missing}, extra {extra})")
        frames.append(frame.select(first_columns).with_columns(pl.lit(split).alias(SPLIT_COLUMN)))
    return with_row_number(pl.concat(frames, how="vertical"))


def with_row_number(frame: pl.LazyFrame) -> pl.LazyFrame:
    """Add the int64 input position `ROW_COLUMN` (0-based)."""
    return frame.with_row_index(ROW_COLUMN).with_columns(pl.col(ROW_COLUMN).cast(pl.Int64))


def as_int(column: str, dtype: type[pl.DataType] = pl.Int64) -> pl.Expr:
    """Text → integer; an unparseable value becomes null."""
    return pl.col(column).str.strip_chars().cast(dtype, strict=False)


def as_float(column: str) -> pl.Expr:
    """Text → float64; an unparseable value becomes null."""
    return pl.col(column).str.strip_chars().cast(pl.Float64, strict=False)


def as_label(column: str) -> pl.Expr:
    """Text 0/1 flag → int8 label (values other than 0/1 are left for `prepare` to reject)."""
    return as_int(column, pl.Int8)


def as_code(column: str) -> pl.Expr:
    """Categorical text with float-written codes (`1.0`) folded onto their integer spelling (`1`).

    Layouts exported through pandas write integer codes of a column with missing values as floats; kept
    as text, `1.0` and `1` would otherwise be two categories, and string-valued categories stay intact.
    """
    return pl.col(column).str.strip_chars().str.replace(r"^(-?\d+)\.0*$", "${1}")


def require_option_column(columns: Sequence[str], name: str, option: str, path: Path) -> None:
    """A column named by an option must exist in the file."""
    if name not in columns:
        raise SchemaError(f"{path}: no column '{name}' (named by source.options.{option}); columns are {list(columns)}")

