"""Bad input fails early with an error naming the column / file / key and what was expected."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from msit_rec.config import load_config
from msit_rec.errors import ConfigError, DataError, SchemaError
from pipelines.config import DatasetConfig
from pipelines.prepare import prepare
from tests.raw_logs import dataset_config, write_log

GOOD = {
    "user_id": [1, 1, 2],
    "item_id": [1, 2, 3],
    "cat": [1, 1, 2],
    "scenario": ["a", "b", "a"],
    "ts": [1, 2, 3],
    "label": [1, 0, 1],
}


def test_missing_column_named(tmp_path: Path) -> None:
    log = write_log(tmp_path / "raw.parquet", {k: v for k, v in GOOD.items() if k != "label"})
    with pytest.raises(SchemaError, match=r"missing column 'label' \(label; expected integer, float or boolean"):
        prepare(dataset_config(log), tmp_path / "out")


def test_missing_feature_column_named(tmp_path: Path) -> None:
    log = write_log(tmp_path / "raw.parquet", {k: v for k, v in GOOD.items() if k != "cat"})
    with pytest.raises(SchemaError, match=r"missing column 'cat' \(categorical feature 'category'"):
        prepare(dataset_config(log), tmp_path / "out")


@pytest.mark.parametrize(
    ("column", "values", "message"),
    [
        ("label", ["yes", "no", "yes"], r"column 'label' \(label\) has type String; expected integer, float or boolean"),
        ("ts", [1.5, 2.5, 3.5], r"column 'ts' \(timestamp\) has type Float64; expected integer epoch seconds"),
        ("user_id", [1.0, 2.0, 3.0], r"column 'user_id' \(user id\) has type Float64; expected integer or string"),
    ],
)
def test_mistyped_column_named(tmp_path: Path, column: str, values: list, message: str) -> None:
    log = write_log(tmp_path / "raw.parquet", {**GOOD, column: values})
    with pytest.raises(SchemaError, match=message):
        prepare(dataset_config(log), tmp_path / "out")


def test_corrupt_parquet_file_named(tmp_path: Path) -> None:
    write_log(tmp_path / "logs" / "day=1" / "part-0.parquet", GOOD)
    bad = tmp_path / "logs" / "day=2" / "part-0.parquet"
    bad.parent.mkdir()
    bad.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match=r"day=2/part-0.parquet: not a readable Parquet file"):
        prepare(dataset_config(tmp_path / "logs"), tmp_path / "out")


def test_missing_source_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"raw log .*nowhere does not exist"):
        prepare(dataset_config(tmp_path / "nowhere"), tmp_path / "out")


def test_earlier_output_needs_overwrite_and_foreign_files_are_never_replaced(tmp_path: Path) -> None:
    log = write_log(tmp_path / "raw.parquet", GOOD)
    prepare(dataset_config(log), tmp_path / "out")
    with pytest.raises(DataError, match="holds an earlier output; pass --overwrite"):
        prepare(dataset_config(log), tmp_path / "out")
    prepare(dataset_config(log), tmp_path / "out", overwrite=True)
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(DataError, match=r"holds \['keep.txt'\], which this command did not write"):
        prepare(dataset_config(log), tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "keep.txt").read_text() == "x"


def test_empty_train_split_is_an_error(tmp_path: Path) -> None:
    log = write_log(tmp_path / "raw.parquet", GOOD)
    config = dataset_config(log, split={"method": "time", "valid_start": 0, "test_start": 0})
    with pytest.raises(DataError, match="train split is empty"):
        prepare(config, tmp_path / "out")


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("dataset:\n  name: x\n  source: {path: p}\n  categorical: [{name: item, column: i}]\n  histroy: {}\n",
         r"dataset: unknown key\(s\) \['histroy'\]"),
        ("dataset:\n  name: x\n  source: {path: p}\n  categorical: [{name: item, column: i, min_count: two}]\n",
         r"dataset.categorical\[0\].min_count: expected an integer, got str 'two'"),
        ("dataset:\n  name: x\n  source: {path: p, adapter: csv}\n",
         r"dataset.source.adapter: expected one of \['parquet', 'movielens'"),
        ("dataset:\n  name: x\n  source: {path: p}\n  categorical: [{name: category, column: c}]\n",
         r"history.item_feature 'item' is not a categorical feature"),
        ("dataset:\n  source: {path: p}\n", r"missing required key 'name'"),
        ("dataset:\n  name: x\n  source: {path: p}\n  categorical: [{name: label, column: c}]\n",
         r"feature name\(s\) \['label'\] clash"),
    ],
)
def test_bad_dataset_config_names_the_key(tmp_path: Path, yaml_text: str, message: str) -> None:
    path = tmp_path / "ds.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError, match=message):
        load_config(path, DatasetConfig, section="dataset")


@pytest.mark.slow  # a CLI subprocess
def test_cli_reports_errors_without_traceback(tmp_path: Path) -> None:
    path = tmp_path / "ds.yaml"
    path.write_text("dataset:\n  name: x\n  source: {path: p}\n  colums: {}\n")
    result = subprocess.run(
        [sys.executable, "-m", "msit_rec.cli", "prepare", "--config", str(path), "--out", str(tmp_path / "o")],
        check=False, capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "msit-rec prepare: error:" in result.stderr and "unknown key(s) ['colums']" in result.stderr
    assert "Traceback" not in result.stderr


def test_dataset_json_of_another_contract_version_named(tmp_path: Path) -> None:
    from msit_rec.data.spec import DatasetMeta

    (tmp_path / "dataset.json").write_text('{"contract_version": 7}')
    with pytest.raises(DataError, match=r"dataset.json: data contract version 7 \('contract_version'\), this msit-rec"):
        DatasetMeta.load(tmp_path)
