"""Ali-CCP in the ESMM field layout (Scenario-Wise-Rec's `ali_ccp_{train,val,test}.csv`) → raw-log contract.

Column mapping (fields are named by their Ali-CCP field id):
- `101` (user id) → `user_id`, `205` (item id) → `item_id`, `301` (scenario, 1..3) → `scenario`, all int64;
- `label` = `click` (or `purchase` with `label: purchase`); the other outcome column is dropped, since it
  is only known after the impression and would leak the label;
- every other field `NNN` or `NNN_MM` → `fNNN` / `fNNN_MM` (int64 codes; e.g. `206` item category →
  `f206`, `216` brand → `f216`), because names that start with a digit are awkward in configs and code;
- `D*` fields (numeric) keep their names, as float64.

Ali-CCP has no timestamp. `ts` is the row's position in the files read in train, valid, test order
(0-based and global), so "earlier row" stands for "earlier event" in history building; `split` names the
file each row came from, for split method `column`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

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

OUTCOME_COLUMNS = ("click", "purchase")
CONTRACT_FIELDS = {"101": "user_id", "205": "item_id", "301": "scenario"}
REQUIRED_COLUMNS = (*OUTCOME_COLUMNS, *CONTRACT_FIELDS)


def _default_files() -> dict[str, str]:
    return {"train": "ali_ccp_train.csv", "valid": "ali_ccp_val.csv", "test": "ali_ccp_test.csv"}


@dataclass
class AliCcpOptions:
    files: dict[str, str] = field(default_factory=_default_files)  # split (train/valid/test) → file in source.path
    label: Literal["click", "purchase"] = "click"

    def __post_init__(self) -> None:
        check_split_files(self.files)


def field_column(name: str) -> str:
    """Output name of an Ali-CCP field: `D*` numeric fields as they are, field ids prefixed with `f`."""
    return name if name.startswith("D") else f"f{name}"


def read_ali_ccp(source: SourceConfig) -> pl.LazyFrame:
    """The split files as one frame: contract columns, `f*` codes, `D*` numerics and `split`."""
    options = load_options(AliCcpOptions, source)
    root = layout_dir(source, f"the Ali-CCP files {sorted(options.files.values())}")
    raw = scan_split_files(root, options.files, REQUIRED_COLUMNS, "an Ali-CCP CSV (ESMM field layout)")
    fields = [
        name
        for name in raw.collect_schema().names()
        if name not in {*OUTCOME_COLUMNS, *CONTRACT_FIELDS, SPLIT_COLUMN, ROW_COLUMN}
    ]
    return raw.select(
        *(as_int(raw_name).alias(name) for raw_name, name in CONTRACT_FIELDS.items()),
        pl.col(ROW_COLUMN).alias("ts"),
        as_label(options.label).alias("label"),
        *((as_float(name) if name.startswith("D") else as_int(name)).alias(field_column(name)) for name in fields),
        SPLIT_COLUMN,
    )
