"""`prepare` invariants: conservation, stable encoding, OOV for unseen ids, splits, normalisation, metadata."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from msit_rec.data.encoding import hash_bucket
from msit_rec.data.spec import OOV_INDEX, DatasetMeta
from pipelines.prepare import prepare
from tests.raw_logs import dataset_config, read_split, write_log

SCENARIOS = ["home", "search", "new"]


def random_log(rows: int, seed: int = 0) -> dict[str, list]:
    rng = np.random.default_rng(seed)
    return {
        "user_id": rng.integers(0, 40, rows).tolist(),
        "item_id": rng.zipf(1.5, rows).clip(max=500).tolist(),
        "cat": rng.integers(0, 6, rows).tolist(),
        "scenario": rng.choice(SCENARIOS, rows, p=[0.6, 0.3, 0.1]).tolist(),
        "ts": np.sort(rng.integers(0, 10_000, rows)).tolist(),
        "label": rng.integers(0, 2, rows).tolist(),
        "price": rng.normal(50, 10, rows).tolist(),
    }


@pytest.fixture()
def prepared(tmp_path: Path):
    log = random_log(600)
    write_log(tmp_path / "raw.parquet", log)
    config = dataset_config(
        tmp_path / "raw.parquet",
        scenarios=SCENARIOS,
        categorical=[
            {"name": "user", "column": "user_id"},
            {"name": "item", "column": "item_id", "min_count": 2},
            # the same raw ids hashed with many buckets: an independent way to recover the raw id of each row
            {"name": "item_hash", "column": "item_id", "encoding": "hash", "buckets": 1_000_003},
            {"name": "category", "column": "cat"},
        ],
        numeric=[{"name": "price", "column": "price"}],
        split={"method": "time", "valid_fraction": 0.2, "test_fraction": 0.2},
        output={"rows_per_row_group": 50, "rows_per_file": 120},
    )
    meta = prepare(config, tmp_path / "out")
    return tmp_path / "out", meta, pl.DataFrame(log), config


def test_rows_conserved_and_split_by_time(prepared) -> None:
    out, meta, log, _ = prepared
    splits = {s: read_split(out, meta, s) for s in ("train", "valid", "test")}
    assert sum(len(df) for df in splits.values()) == len(log) == meta.rows_in
    assert meta.rejects == {}
    valid_start, test_start = meta.split_boundaries["valid_start"], meta.split_boundaries["test_start"]
    assert splits["train"]["ts"].max() < valid_start <= splits["valid"]["ts"].min()
    assert splits["valid"]["ts"].max() < test_start <= splits["test"]["ts"].min()
    # roughly the configured fractions
    assert abs(len(splits["test"]) / len(log) - 0.2) < 0.05
    # shards: files of at most 120 rows, row groups of at most 50, rows in time order
    for split, df in splits.items():
        assert df["ts"].is_sorted()
        for file in meta.splits[split].files:
            metadata = pq.read_metadata(out / file)
            assert metadata.num_rows <= 120
            assert all(metadata.row_group(i).num_rows <= 50 for i in range(metadata.num_row_groups))


def test_same_raw_id_same_index_and_unseen_ids_are_oov(prepared) -> None:
    out, meta, log, _ = prepared
    vocab = dict(pl.read_parquet(out / "vocab" / "item.parquet").select("raw", "index").iter_rows())
    train_counts = log.filter(pl.col("ts") < meta.split_boundaries["valid_start"])["item_id"].value_counts()
    frequent = set(train_counts.filter(pl.col("count") >= 2)["item_id"])
    assert set(vocab) == frequent  # vocabulary from the train split only, min_count respected
    raw_of_bucket = {hash_bucket(str(raw), 1_000_003): raw for raw in log["item_id"].unique()}
    assert len(raw_of_bucket) == log["item_id"].n_unique()  # no collisions: the oracle is unambiguous
    for split in ("train", "valid", "test"):
        df = read_split(out, meta, split)
        for encoded, hashed in zip(df["item"], df["item_hash"]):
            raw = raw_of_bucket[hashed]
            assert encoded == vocab.get(raw, OOV_INDEX)
    assert (read_split(out, meta, "test")["item"] == OOV_INDEX).any()


def test_metadata_counts_and_normalisation(prepared) -> None:
    out, meta, log, _ = prepared
    reloaded = DatasetMeta.load(out)
    assert reloaded == meta
    assert meta.scenarios == SCENARIOS
    for split in ("train", "valid", "test"):
        df = read_split(out, meta, split)
        for sid, name in enumerate(SCENARIOS):
            part = df.filter(pl.col("scenario") == sid)
            stats = meta.splits[split].scenarios[name]
            assert stats.rows == len(part) and stats.clicks == int(part["label"].sum())
    train_raw = log.filter(pl.col("ts") < meta.split_boundaries["valid_start"])["price"]
    assert meta.numeric_stats["price"].mean == pytest.approx(train_raw.mean())
    test = read_split(out, meta, "test").sort("ts")
    expected = (log.filter(pl.col("ts") >= meta.split_boundaries["test_start"])["price"] - train_raw.mean()) / train_raw.std()
    np.testing.assert_allclose(np.sort(test["price"].to_numpy()), np.sort(expected.to_numpy()), rtol=1e-5)
    assert meta.feature("item").cardinality == meta.feature("hist_item").cardinality
    assert meta.feature("hist_item").table == meta.feature("item").table == "item"
    assert meta.feature("hist_cat").table == "category"
    assert meta.feature("hist_scenario").cardinality == 3
    # column dtypes follow the contract
    schema = read_split(out, meta, "train").schema
    assert schema["label"] == pl.Float32 and schema["scenario"] == pl.Int32 and schema["user_id"] == pl.Int64
    assert schema["hist_item"] == pl.List(pl.Int64) and schema["hist_len"] == pl.Int32
    assert schema["price"] == pl.Float32


def test_reruns_are_identical(prepared, tmp_path: Path) -> None:
    out, meta, _, config = prepared
    again = prepare(config, tmp_path / "again")
    assert again.content_hash == meta.content_hash
    for file in meta.splits["train"].files:
        assert (out / file).read_bytes() == (tmp_path / "again" / file).read_bytes()


def test_rejects_counted_by_reason(tmp_path: Path) -> None:
    log = write_log(
        tmp_path / "raw.parquet",
        {
            "user_id": [1, None, 1, 1, 2, 2, 3],
            "item_id": [1, 2, None, 4, 5, 6, 7],
            "cat": [1, 1, 1, 1, 1, 1, 1],
            "scenario": ["home", "home", "home", "mars", "home", "search", "home"],
            "ts": ["2024-01-01 00:00:00", "2024-01-01 00:00:01", "2024-01-01 00:00:02", "2024-01-01 00:00:03",
                   "not a time", "2024-01-01 00:00:05", "2024-01-01 00:00:06"],
            "label": [1, 0, 1, 0, 1, 2, 0],
        },
    )
    config = dataset_config(log, scenarios=["home", "search"], ts_format="%Y-%m-%d %H:%M:%S")
    with pytest.raises(Exception, match="search"):  # every row of 'search' is rejected → empty scenario
        prepare(config, tmp_path / "out")
    config = dataset_config(log, scenarios=["home"], ts_format="%Y-%m-%d %H:%M:%S")
    meta = prepare(config, tmp_path / "out2")
    # one reason per row, the first failing check in REJECT_REASONS order (label 2 in 'search' → bad_label)
    assert meta.rejects == {"null_user": 1, "null_item": 1, "unknown_scenario": 1, "bad_ts": 1, "bad_label": 1}
    assert meta.rows_in == 7 and meta.splits["train"].rows == 2
    rejects = pl.read_parquet(tmp_path / "out2" / "rejects.parquet")
    assert rejects["row_in_log"].to_list() == [1, 2, 3, 4, 5]
    assert rejects["reject_reason"].to_list() == ["null_user", "null_item", "unknown_scenario", "bad_ts",
                                                  "bad_label"]
    assert meta.splits["train"].files and read_split(tmp_path / "out2", meta, "train")["ts"].to_list() == [
        1704067200, 1704067206]


def test_bad_label_rejected(tmp_path: Path) -> None:
    log = write_log(
        tmp_path / "raw.parquet",
        {"user_id": [1, 1, 1], "item_id": [1, 2, 3], "cat": [1, 1, 1], "scenario": ["a", "a", "a"],
         "ts": [1, 2, 3], "label": [1.0, 0.5, 0.0]},
    )
    meta = prepare(dataset_config(log), tmp_path / "out")
    assert meta.rejects == {"bad_label": 1}


def test_user_last_n_split(tmp_path: Path) -> None:
    log = write_log(
        tmp_path / "raw.parquet",
        {"user_id": [1, 1, 1, 1, 2, 2, 2], "item_id": [1, 2, 3, 4, 5, 6, 7], "cat": [1] * 7,
         "scenario": ["a"] * 7, "ts": [4, 3, 2, 1, 10, 20, 30], "label": [1, 0, 1, 0, 1, 0, 1]},
    )
    meta = prepare(dataset_config(log, split={"method": "user_last_n", "n_valid": 1, "n_test": 1}), tmp_path / "o")
    test = read_split(tmp_path / "o", meta, "test").sort("user_id")
    valid = read_split(tmp_path / "o", meta, "valid").sort("user_id")
    assert test["ts"].to_list() == [4, 30] and valid["ts"].to_list() == [3, 20]
    assert meta.splits["train"].rows == 3


def test_split_column_and_bad_split_values(tmp_path: Path) -> None:
    log = write_log(
        tmp_path / "raw.parquet",
        {"user_id": [1, 1, 1, 1], "item_id": [1, 2, 3, 4], "cat": [1] * 4, "scenario": ["a"] * 4,
         "ts": [1, 2, 3, 4], "label": [1, 0, 1, 0], "split": ["train", "valid", "test", "holdout"]},
    )
    meta = prepare(dataset_config(log, split={"method": "column", "column": "split"}), tmp_path / "o")
    assert [meta.splits[s].rows for s in ("train", "valid", "test")] == [1, 1, 1]
    assert meta.rejects == {"bad_split": 1}
