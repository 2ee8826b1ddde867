"""Silent garbage made loud: non-finite numerics, timestamps in the wrong unit, duplicates, empty scenarios.

Each case is either rejected with its own reason (rows in = rows out + rejected still holds) or recorded in
`dataset.json` and the summary, and a run that rejects everything says why.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml

from msit_rec.cli import main
from msit_rec.config import to_dict
from msit_rec.data.spec import DatasetMeta
from msit_rec.errors import DataError
from pipelines.prepare import prepare
from tests.raw_logs import dataset_config, read_split, write_log

T0 = 1_700_000_000  # 2023-11-14, epoch seconds


def base_log(rows: int) -> dict[str, list]:
    return {
        "user_id": [i % 3 for i in range(rows)],
        "item_id": list(range(rows)),
        "cat": [i % 2 for i in range(rows)],
        "scenario": ["a", "b"] * (rows // 2) + ["a"] * (rows % 2),
        "ts": [T0 + 10 * i for i in range(rows)],
        "label": [i % 2 for i in range(rows)],
    }


def rows_out(meta: DatasetMeta) -> int:
    return sum(s.rows for s in meta.splits.values())


def test_non_finite_numerics_rejected_and_statistics_from_finite_values(tmp_path: Path) -> None:
    log = base_log(10)
    log["price"] = [1.0, float("nan"), 3.0, float("inf"), 5.0, None, 7.5, float("-inf"), 2.0, 4.0]
    log["clicks"] = list(range(10))  # an integer column is never bad_numeric
    path = write_log(tmp_path / "raw.parquet", log)
    numeric = [{"name": "price", "column": "price"}, {"name": "clicks", "column": "clicks"}]
    meta = prepare(dataset_config(path, numeric=numeric), tmp_path / "out")

    assert meta.rejects == {"bad_numeric": 3} and rows_out(meta) == 7
    rejects = pl.read_parquet(tmp_path / "out" / "rejects.parquet")
    assert rejects["row_in_log"].to_list() == [1, 3, 7] and set(rejects["reject_reason"]) == {"bad_numeric"}
    finite = np.array([v for v in log["price"] if v is not None and math.isfinite(v)])
    stats = meta.numeric_stats["price"]
    assert stats.mean == pytest.approx(finite.mean()) and stats.std == pytest.approx(finite.std(ddof=1))
    assert stats.nulls == 1  # a null is still imputed (0 after normalisation), not rejected
    price = read_split(tmp_path / "out", meta, "train")["price"].to_numpy()
    assert np.isfinite(price).all()
    np.testing.assert_allclose(np.sort(price), np.sort(np.append((finite - finite.mean()) / finite.std(ddof=1), 0.0)),
                               rtol=1e-5)


def test_timestamps_in_milliseconds_microseconds_or_negative_rejected_as_bad_ts(tmp_path: Path) -> None:
    log = base_log(12)
    log["ts"][1] = T0 * 1_000  # milliseconds
    log["ts"][4] = T0 * 1_000  # milliseconds
    log["ts"][6] = T0 * 1_000_000  # microseconds
    log["ts"][7] = T0 * 1_000_000_000  # nanoseconds
    log["ts"][9] = -5  # negative
    meta = prepare(dataset_config(write_log(tmp_path / "raw.parquet", log)), tmp_path / "out")

    assert meta.rejects == {"bad_ts": 5} and rows_out(meta) == 7
    assert meta.bad_ts == {"microseconds": 1, "milliseconds": 2, "nanoseconds": 1, "negative": 1}
    assert DatasetMeta.load(tmp_path / "out").bad_ts == meta.bad_ts
    assert "warning: bad_ts rows by kind (epoch seconds expected): microseconds 1, milliseconds 2" in meta.summary_table()
    rejects = pl.read_parquet(tmp_path / "out" / "rejects.parquet")
    assert rejects["row_in_log"].to_list() == [1, 4, 6, 7, 9]
    assert read_split(tmp_path / "out", meta, "train")["ts"].max() < 10**11


def test_datetime_timestamps_still_work_and_pre_1970_ones_are_bad_ts(tmp_path: Path) -> None:
    log = base_log(6)
    log["ts"] = [datetime.fromtimestamp(T0 + i, UTC) for i in range(5)] + [datetime(1969, 7, 20, tzinfo=UTC)]
    meta = prepare(dataset_config(write_log(tmp_path / "raw.parquet", log)), tmp_path / "out")
    assert meta.rejects == {"bad_ts": 1} and meta.bad_ts == {"negative": 1}
    assert sorted(read_split(tmp_path / "out", meta, "train")["ts"].to_list()) == [T0 + i for i in range(5)]


def duplicated_log() -> dict[str, list]:
    """Rows 2 and 5 repeat row 0; row 4 repeats row 3, which has a null user (rejected, so not a duplicate)."""
    log = base_log(7)
    for column in log:
        log[column][2] = log[column][5] = log[column][0]
        log[column][4] = log[column][3]
    log["user_id"][3] = log["user_id"][4] = None
    return log


def test_exact_duplicates_counted_and_kept_by_default(tmp_path: Path) -> None:
    path = write_log(tmp_path / "raw.parquet", duplicated_log())
    meta = prepare(dataset_config(path), tmp_path / "out")
    assert meta.duplicate_rows == 2 and meta.rejects == {"null_user": 2} and rows_out(meta) == 5
    assert "warning: 2 exact duplicate rows (kept)" in meta.summary_table()


def test_exact_duplicates_dropped_with_the_option(tmp_path: Path) -> None:
    path = write_log(tmp_path / "raw.parquet", duplicated_log())
    meta = prepare(dataset_config(path, validate={"drop_duplicates": True}), tmp_path / "out")
    assert meta.duplicate_rows == 2 and meta.rejects == {"duplicate": 2, "null_user": 2}
    assert rows_out(meta) + 4 == meta.rows_in == 7  # conservation holds: the dropped copies are rejects
    rejects = pl.read_parquet(tmp_path / "out" / "rejects.parquet").filter(pl.col("reject_reason") == "duplicate")
    assert rejects["row_in_log"].to_list() == [2, 5]  # the first copy is the one kept
    assert "warning: 2 exact duplicate rows (dropped as 'duplicate')" in meta.summary_table()


def test_scenario_without_rows_in_valid_is_recorded_and_warned(tmp_path: Path) -> None:
    log = base_log(20)
    log["scenario"] = ["a", "b"] * 7 + ["a"] * 6  # the last 6 rows (the valid period) are all 'a'
    split = {"method": "time", "valid_start": T0 + 140, "test_start": T0 + 10**6}
    meta = prepare(dataset_config(write_log(tmp_path / "raw.parquet", log), split=split), tmp_path / "out")
    assert meta.splits["valid"].scenarios["b"].rows == 0 and meta.splits["test"].rows == 0
    assert meta.empty_scenarios == {"valid": ["b"]}  # an empty split as a whole is not a scenario problem
    assert "warning: scenario(s) ['b'] have no rows in valid" in meta.summary_table()
    assert DatasetMeta.load(tmp_path / "out").empty_scenarios == {"valid": ["b"]}


def test_dataset_json_without_the_new_fields_still_loads(tmp_path: Path) -> None:
    meta = prepare(dataset_config(write_log(tmp_path / "raw.parquet", base_log(6))), tmp_path / "out")
    path = tmp_path / "out" / "dataset.json"
    old = {k: v for k, v in json.loads(path.read_text()).items() if k not in ("duplicate_rows", "bad_ts", "empty_scenarios")}
    path.write_text(json.dumps(old))
    loaded = DatasetMeta.load(path)
    assert (loaded.duplicate_rows, loaded.bad_ts, loaded.empty_scenarios) == (0, {}, {})
    assert loaded.splits == meta.splits


def test_all_rows_rejected_names_the_reason_not_the_scenarios(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = base_log(6)
    log["ts"] = [T0 * 1000 + i for i in range(6)]  # every timestamp in milliseconds
    path = write_log(tmp_path / "raw.parquet", log)
    config = tmp_path / "ds.yaml"
    config.write_text(yaml.safe_dump({"dataset": to_dict(dataset_config(path, scenarios=["a", "b"]))}))
    code = main(["prepare", "--config", str(config), "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "all 6 rows were rejected: bad_ts 6 (column 'ts'" in err and "6 look like milliseconds" in err
    assert not (tmp_path / "out").exists()


def test_unparsable_text_timestamps_are_named_when_everything_is_rejected(tmp_path: Path) -> None:
    log = base_log(4)
    log["ts"] = ["2024-01-01 00:00:00", "yesterday", "2024-01-01 00:00:02", "2024-13-45 00:00:00"]
    path = write_log(tmp_path / "raw.parquet", log)
    # every 'b' row has a bad time: the error says so instead of blaming the scenario column
    with pytest.raises(DataError, match=r"\['b'\] .*all their rows were rejected: bad_ts 2 .*2 unparsable"):
        prepare(dataset_config(path, scenarios=["a", "b"], ts_format="%Y-%m-%d %H:%M:%S"), tmp_path / "out")
    log["ts"] = ["soon"] * 4
    path = write_log(tmp_path / "raw.parquet", log)
    with pytest.raises(DataError, match=r"all 4 rows were rejected: bad_ts 4 .*4 unparsable"):
        prepare(dataset_config(path, ts_format="%Y-%m-%d %H:%M:%S"), tmp_path / "out")
