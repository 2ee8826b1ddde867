"""Incremental training: `prepare --vocab-from` keeps every known id's index and appends new ones; `fit --init-from`
warm-starts on the grown tables (1 and 2 processes, any placement); `evaluate` scores yesterday's and today's runs on
today's test split; resuming on re-prepared examples is refused in one line.

Two "days" of one generated log: day 1 = its first five days, day 2 = all seven. Oracles: the two vocabulary files
and counts recomputed from the raw log; at step 0 the day-1 model's own scores of day-1 test rows (a plain unsharded
model from its checkpoint), and its checkpoint's tensors (a prefix of the warm-started ones); for yesterday's run on
today's rows, the day-1 model fed day-2 rows whose new ids were set to out-of-vocabulary by hand.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import msit_rec.train.fit as fit_module
from msit_rec.cli import main
from msit_rec.config import load_config
from msit_rec.data.batch import Batch
from msit_rec.data.loader import ExamplesDataset, make_loader
from msit_rec.data.spec import FIRST_VOCAB_INDEX, OOV_INDEX, DatasetMeta
from msit_rec.errors import DataError
from msit_rec.modules.scenario_gate import RECENCY_KEY
from msit_rec.run_dir import load_model, read_fit_result, read_run, resolve_checkpoint
from msit_rec.train.checkpoint import load_trainer_state, load_unsharded_checkpoint, save_sharded
from pipelines.config import DatasetConfig
from pipelines.prepare import prepare
from pipelines.synthetic import generate
from pipelines.synthetic_config import GeneratorConfig
from tests.checkpoints import flat_tensors
from tests.incremental_worker import START_CHECKPOINT, START_LOGITS, TINY_RUN, recorder
from tests.launch import LAUNCH_ENV, launch_env_restored

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "incremental_worker.py"
DAY1_DAYS = 5  # of configs/generate/tiny.yaml's 7
PREPARE = ("history.max_len=5",)
TINY = [arg for override in TINY_RUN for arg in ("--set", override)]


def dataset_config(raw: Path, *overrides: str) -> DatasetConfig:
    return load_config(REPO / "configs/datasets/synthetic.yaml", DatasetConfig, "dataset",
                       overrides=[f"source.path={raw}", *PREPARE, *overrides])


@pytest.fixture(scope="module")
def days(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Raw logs of both days, day 1's examples and day 2's prepared from them (`--vocab-from`, through the CLI)."""
    root = tmp_path_factory.mktemp("incremental")
    generate(load_config(REPO / "configs/generate/tiny.yaml", GeneratorConfig, "generate"), root / "raw", progress=False)
    for part in sorted((root / "raw").iterdir())[:DAY1_DAYS]:
        shutil.copytree(part, root / "raw1" / part.name)
    prepare(dataset_config(root / "raw1"), root / "ex1")
    args = ["prepare", "--config", str(REPO / "configs/datasets/synthetic.yaml"), "--source", str(root / "raw"),
            "--out", str(root / "ex2"), "--vocab-from", str(root / "ex1"), "--quiet",
            *[arg for override in PREPARE for arg in ("--set", override)]]
    assert main(args) == 0
    return {"root": root, "raw": root / "raw", "ex1": root / "ex1", "ex2": root / "ex2"}


def vocab(examples: Path, feature: str) -> pl.DataFrame:
    return pl.read_parquet(examples / DatasetMeta.load(examples).feature(feature).vocabulary)


def vocab_features(meta: DatasetMeta) -> list[str]:
    return [f.name for f in meta.features_of_kind("sparse") if f.encoding == "vocab"]


# ---- prepare --vocab-from ----------------------------------------------------------------------------------


def test_known_ids_keep_their_index_and_new_ones_are_appended(days: dict[str, Path]) -> None:
    meta1, meta2 = DatasetMeta.load(days["ex1"]), DatasetMeta.load(days["ex2"])
    train = pl.read_parquet(days["raw"]).filter(pl.col("ts") < meta2.split_boundaries["valid_start"])
    columns = {f["name"]: f for f in meta2.config["categorical"]}
    grew = 0
    for name in vocab_features(meta2):
        old, new = vocab(days["ex1"], name), vocab(days["ex2"], name)
        card1, card2 = meta1.feature(name).cardinality, meta2.feature(name).cardinality
        assert new["index"].to_list() == list(range(FIRST_VOCAB_INDEX, card2)), name  # every row once, in order
        kept = old.join(new, on="raw", how="left", suffix="_new")
        assert kept["index_new"].to_list() == kept["index"].to_list(), name  # every day-1 id, same index
        added = new.filter(pl.col("index") >= card1)
        assert added["raw"].is_in(old["raw"].implode()).sum() == 0
        # the oracle: day-2 train counts from the raw log; new ids are those passing min_count, most frequent first
        column, min_count = columns[name]["column"], columns[name]["min_count"]
        counts = train.group_by(column).len().rename({column: "raw", "len": "count"})
        expected = (counts.filter(~pl.col("raw").is_in(old["raw"].implode()) & (pl.col("count") >= min_count))
                    .sort(["count", "raw"], descending=[True, False]))
        assert added["raw"].to_list() == expected["raw"].to_list(), name
        assert added["count"].to_list() == expected["count"].to_list(), name
        assert meta2.lineage.added[meta2.feature(name).table] == card2 - card1 == len(added)
        grew += len(added)
    assert grew > 0  # the two days differ: the test would prove nothing otherwise


def test_examples_use_the_kept_indices(days: dict[str, Path]) -> None:
    """Day-2 examples index a day-1 user as day 1 did (examples keep the raw user id: the oracle)."""
    meta2 = DatasetMeta.load(days["ex2"])
    rows = pl.concat([pl.read_parquet(days["ex2"] / f) for split in meta2.splits.values() for f in split.files])
    old, new = vocab(days["ex1"], "user"), vocab(days["ex2"], "user")
    known = rows.join(old, left_on="user_id", right_on="raw")
    assert len(known) > 0 and known["user"].to_list() == known["index"].to_list()
    added = rows.join(new.filter(pl.col("index") >= DatasetMeta.load(days["ex1"]).feature("user").cardinality),
                      left_on="user_id", right_on="raw")
    assert len(added) > 0 and added["user"].to_list() == added["index"].to_list()


def standardised_by_raw_id(examples: Path, feature: str, id_feature: str) -> pl.DataFrame:
    """(raw id, standardised `feature`) of every example holding a known id: the raw user id as kept in the examples,
    or the raw item id through the examples' own vocabulary."""
    meta = DatasetMeta.load(examples)
    rows = pl.concat([pl.read_parquet(examples / f, columns=["user_id", "item", feature])
                      for split in meta.splits.values() for f in split.files])
    if id_feature == "user":
        return rows.select(pl.col("user_id").alias("raw"), feature)
    return rows.join(vocab(examples, "item").select("raw", "index"), left_on="item", right_on="index").select("raw", feature)


@pytest.mark.parametrize(("feature", "id_feature", "raw_id"), [
    ("user_activity", "user", "user_id"),  # one activity per user in the generated log
    ("price", "item", "item_id"),  # one price per item
])
def test_numeric_features_keep_the_parents_standardisation(days, feature: str, id_feature: str, raw_id: str) -> None:
    """A raw value on both days is the same model input on both: day 2 standardises with day 1's mean/std."""
    meta1, meta2 = DatasetMeta.load(days["ex1"]), DatasetMeta.load(days["ex2"])
    raw = pl.read_parquet(days["raw"])
    # the oracle: the parent's mean/std, read from its dataset.json (not from the dataclass under test)
    parent = json.loads((days["ex1"] / "dataset.json").read_text())["numeric_stats"][feature]
    mean, std = parent["mean"], parent["std"]
    train1 = raw.filter(pl.col("ts") < meta1.split_boundaries["valid_start"])[feature].cast(pl.Float64)
    assert mean == pytest.approx(train1.mean()) and std == pytest.approx(train1.std())  # day 1's own train split
    train2 = raw.filter(pl.col("ts") < meta2.split_boundaries["valid_start"])[feature].cast(pl.Float64)
    assert abs(train2.mean() - mean) > 1e-6 * std  # today's statistics differ: re-fitting them would shift inputs
    values = raw.group_by(raw_id).agg(pl.col(feature).unique())
    assert values[feature].list.len().max() == 1  # one raw value per id: the id names the raw value
    values = values.select(pl.col(raw_id).alias("raw"), pl.col(feature).list.first().alias("value"))
    days_seen = []
    for examples in (days["ex1"], days["ex2"]):
        rows = standardised_by_raw_id(examples, feature, id_feature).join(values, on="raw")
        assert len(rows) > 0
        expected = [(float(v) - mean) / std for v in rows["value"].to_list()]  # by hand, in float64
        torch.testing.assert_close(torch.tensor(rows[feature].to_list(), dtype=torch.float64),
                                   torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=1e-6)
        days_seen.append(rows.unique("raw").select("raw", "value", feature))
    both = days_seen[0].join(days_seen[1], on="raw", suffix="_day2")
    assert len(both) > 0 and both["value"].equals(both["value_day2"])
    assert both[feature].equals(both[f"{feature}_day2"])  # bit for bit the same input on both days
    assert (meta2.numeric_stats[feature].mean, meta2.numeric_stats[feature].std) == (mean, std)  # and recorded


def test_lineage_is_recorded_and_plain_datasets_do_not_carry_it(days: dict[str, Path], tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    meta1, meta2 = DatasetMeta.load(days["ex1"]), DatasetMeta.load(days["ex2"])
    assert "lineage" not in json.loads((days["ex1"] / "dataset.json").read_text())  # older readers still load it
    lineage = meta2.lineage
    assert lineage is not None and lineage.parent == str(days["ex1"].resolve())
    assert lineage.parent_hash == meta1.content_hash
    assert lineage.numeric_stats_from == meta1.content_hash and "numeric_stats_from" in json.loads(
        (days["ex2"] / "dataset.json").read_text())["lineage"]
    assert lineage.ancestors == [meta1.content_hash]
    assert lineage.parent_rows == {table: rows for table, (rows, _) in meta1.tables().items() if table in lineage.added}
    assert meta2.descends_from(meta1.content_hash) and not meta1.descends_from(meta2.content_hash)
    # day 3 sees only the last two days: day-2 ids absent today keep their rows, tables never shrink
    day3 = tmp_path / "raw3"
    for part in sorted(days["raw"].iterdir())[-2:]:
        shutil.copytree(part, day3 / part.name)
    monkeypatch.chdir(days["root"])  # a relative --vocab-from is recorded as an absolute path
    meta3 = prepare(dataset_config(day3), tmp_path / "ex3", vocab_from=Path("ex2"))
    assert meta3.lineage.ancestors == [meta2.content_hash, meta1.content_hash]
    assert meta3.lineage.parent == str(days["ex2"].resolve()) and Path(meta3.lineage.parent).is_absolute()
    assert meta3.lineage.numeric_stats_from == meta2.content_hash
    assert meta3.numeric_stats == meta2.numeric_stats == meta1.numeric_stats  # day 1's carry down (no nulls here)
    absent = 0
    for name in vocab_features(meta3):
        two, three = vocab(days["ex2"], name), vocab(tmp_path / "ex3", name)
        assert three.head(len(two)).select("raw", "index").equals(two.select("raw", "index")), name
        assert meta3.feature(name).cardinality >= meta2.feature(name).cardinality
        absent += int((three.head(len(two))["count"] == 0).sum())
    assert absent > 0  # some day-2 ids were not seen in day 3's train split and kept their row


def wider_brand(config: DatasetConfig) -> None:
    next(f for f in config.categorical if f.name == "brand").embedding_dim = 8


def hashed_category(config: DatasetConfig) -> None:
    category = next(f for f in config.categorical if f.name == "category")
    category.encoding, category.buckets = "hash", 50


def reordered_scenarios(config: DatasetConfig) -> None:
    config.scenarios = ["search", "home", "detail", "channel", "new"]


@pytest.mark.parametrize(("change", "named"), [
    (wider_brand, "feature 'brand' has embedding_dim 8 here but 16"),
    (hashed_category, "feature 'category' has encoding 'hash' here but 'vocab'"),
    (reordered_scenarios, "scenarios ['search', 'home'"),
])
def test_an_incompatible_parent_is_refused_naming_what_differs(days, tmp_path, change, named: str) -> None:
    config = dataset_config(days["raw"])
    change(config)
    with pytest.raises(DataError, match="--vocab-from") as error:
        prepare(config, tmp_path / "out", vocab_from=days["ex1"])
    assert named in str(error.value)
    assert not (tmp_path / "out").exists()


def test_a_dataset_json_file_as_parent_is_refused_before_the_log_is_read(days, tmp_path, monkeypatch, capsys) -> None:
    def no_read(*_: object) -> None:
        raise AssertionError("the log was read")
    monkeypatch.setattr("pipelines.prepare._read_validated", no_read)
    args = ["prepare", "--config", str(REPO / "configs/datasets/synthetic.yaml"), "--source", str(days["raw"]),
            "--out", str(tmp_path / "out"), "--vocab-from", str(days["ex1"] / "dataset.json"), "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("msit-rec prepare: error: --vocab-from "), err
    assert "dataset.json: is a file" in err[0] and "examples directory" in err[0]
    with pytest.raises(DataError, match="--vocab-from .*: does not exist"):
        prepare(dataset_config(days["raw"]), tmp_path / "out", vocab_from=tmp_path / "missing")
    assert not (tmp_path / "out").exists()


# ---- fit --init-from, evaluate, and the refusals (train) ---------------------------------------------------


def fit_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["fit", "--data", str(data), "--out", str(out), "--quiet", *TINY, *extra]


@pytest.fixture(scope="module")
def runs(days: dict[str, Path], slow_setup: None) -> dict[str, Path]:
    """The recipe: day 1 fit → day 2 fit --init-from day 1 (recording step 0) → evaluate both on day 2's test."""
    root = days["root"]
    with launch_env_restored():
        assert main(fit_args(days["ex1"], root / "run1")) == 0
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(fit_module, "RankingModule", recorder(root / "record1", days["ex1"]))
            assert main(fit_args(days["ex2"], root / "run2", "--init-from", str(root / "run1"))) == 0
    assert main(["evaluate", "--run", str(root / "run1"), "--run", str(root / "run2"), "--data", str(days["ex2"]),
                 "--out", str(root / "eval"), "--quiet"]) == 0
    return {"run1": root / "run1", "run2": root / "run2", "record": root / "record1", "eval": root / "eval"}


def day1_logits(days: dict[str, Path], run: Path, rows: torch.Tensor) -> torch.Tensor:
    """The day-1 model's own logits on day-1 test rows (a plain unsharded model from its `best` checkpoint)."""
    trained = read_run(run)
    model = load_model(trained, resolve_checkpoint(trained, "best"), DatasetMeta.load(days["ex1"]), torch.device("cpu"))
    by_row = {}
    with torch.no_grad():
        for batch in make_loader(ExamplesDataset(days["ex1"], "test", 4096)):
            real = batch.weight > 0
            by_row.update(zip(batch.row_index[real].tolist(), model(batch)[real]))
    return torch.stack([by_row[r] for r in rows.tolist()])


def assert_warm_started(parent_ckpt: Path, start_ckpt: Path, meta1: DatasetMeta, meta2: DatasetMeta) -> None:
    """Every parent tensor is in the warm-started state: whole, or as the known rows of a grown table (weights and
    per-row optimizer state, one block per column shard); new rows are freshly initialised, with zero state."""
    parent, start = flat_tensors(load_unsharded_checkpoint(parent_ckpt)), flat_tensors(load_unsharded_checkpoint(start_ckpt))
    assert set(parent) == set(start)
    grown = {t for t, (rows, _) in meta2.tables().items() if rows > meta1.tables()[t][0]}
    assert grown >= {"user", "item"}
    checked_grown = 0
    for key, old in parent.items():
        new = start[key]
        table = next((t for t in meta2.tables() if f".{t}.weight" in key), None)
        if table is None or table not in grown:
            if new.shape == old.shape:
                assert torch.equal(new, old), key
            else:  # row-wise state of a table split by columns: one copy per column shard
                assert torch.equal(new.view(-1, old.numel()), old.expand(new.numel() // old.numel(), -1)), key
            continue
        rows1, rows2 = meta1.tables()[table][0], meta2.tables()[table][0]
        if key.startswith("/state_dict/"):
            assert new.shape == (rows2, old.shape[1]) and torch.equal(new[:rows1], old), key
            assert float(new[rows1:].std()) > 0, key  # fresh initialisation, not zeros or copies
        else:  # the fused row-wise Adagrad momentum: [rows × column shards]
            blocks = new.view(-1, rows2)
            assert torch.equal(blocks[:, :rows1], old.view(1, rows1).expand(len(blocks), -1)), key
            assert not blocks[:, rows1:].any(), key
        checked_grown += 1
    assert checked_grown == 2 * len(grown)  # each grown table's weight and momentum


@pytest.mark.slow
def test_warm_start_scores_yesterdays_rows_as_yesterdays_model(days, runs) -> None:
    record = torch.load(runs["record"] / START_LOGITS)
    expected = day1_logits(days, runs["run1"], record["row_index"])
    assert len(expected) == DatasetMeta.load(days["ex1"]).splits["test"].rows
    torch.testing.assert_close(record["logits"], expected, rtol=0, atol=1e-6)
    meta1, meta2 = DatasetMeta.load(days["ex1"]), DatasetMeta.load(days["ex2"])
    assert_warm_started(runs["run1"] / "checkpoints/best.ckpt", runs["record"] / START_CHECKPOINT, meta1, meta2)
    recorded = read_fit_result(runs["run2"]).init_from  # the run says where it started from
    assert recorded == str((runs["run1"] / "checkpoints/best.ckpt").resolve())


@pytest.mark.slow
def test_warm_start_on_two_processes_with_rows_and_columns_split(days, runs, tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    env["PYTHONPATH"] = str(REPO)
    result = subprocess.run(
        [sys.executable, str(WORKER), str(days["ex2"]), str(days["ex1"]), str(runs["run1"]), str(tmp_path)],
        cwd=tmp_path, env=env, check=False, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    record = torch.load(tmp_path / "record" / START_LOGITS)
    torch.testing.assert_close(record["logits"], day1_logits(days, runs["run1"], record["row_index"]), rtol=0, atol=1e-6)
    meta1, meta2 = DatasetMeta.load(days["ex1"]), DatasetMeta.load(days["ex2"])
    assert_warm_started(runs["run1"] / "checkpoints/best.ckpt", tmp_path / "record" / START_CHECKPOINT, meta1, meta2)


def as_day1(batch: Batch, meta1: DatasetMeta) -> Batch:
    """A day-2 batch as the day-1 model's prepare would have encoded it: ids added since are out-of-vocabulary."""
    def clipped(kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
        keys = kjt.keys()
        limits = torch.tensor([meta1.feature(key).cardinality for key in keys])
        limit = torch.repeat_interleave(limits, torch.tensor(kjt.length_per_key()))  # per value
        values = torch.where(kjt.values() >= limit, OOV_INDEX, kjt.values())
        return KeyedJaggedTensor(keys=kjt.keys(), values=values, lengths=kjt.lengths())
    return dataclasses.replace(batch, sparse=clipped(batch.sparse), sequence=clipped(batch.sequence))


@pytest.mark.slow
def test_both_days_are_evaluated_on_todays_test(days, runs) -> None:
    metrics = json.loads((runs["eval"] / "metrics.json").read_text())
    meta1, meta2 = DatasetMeta.load(days["ex1"]), DatasetMeta.load(days["ex2"])
    assert set(metrics["models"]) == {"run1", "run2"}
    assert all(model["dataset_hash"] == meta2.content_hash for model in metrics["models"].values())
    scores = pl.read_parquet(runs["eval"] / "scores.parquet")
    assert len(scores) == meta2.splits["test"].rows
    # yesterday's model on today's rows: its own checkpoint and dataset, fed today's rows with new ids as OOV
    trained = read_run(runs["run1"])
    model = load_model(trained, resolve_checkpoint(trained, "best"), meta1, torch.device("cpu"))
    by_row, clipped_rows = {}, 0
    with torch.no_grad():
        for batch in make_loader(ExamplesDataset(days["ex2"], "test", 4096)):
            real = batch.weight > 0
            day1 = as_day1(batch, meta1)
            clipped_rows += int((day1.sparse.values() != batch.sparse.values()).sum())
            by_row.update(zip(batch.row_index[real].tolist(), torch.sigmoid(model(day1)[real].double()).tolist()))
    assert clipped_rows > 0  # some test rows carry ids added on day 2
    expected = torch.tensor([by_row[r] for r in range(len(scores))], dtype=torch.float64)
    torch.testing.assert_close(torch.tensor(scores[metrics["models"]["run1"]["scores_column"]].to_numpy()), expected,
                               rtol=0, atol=1e-6)


def refused(capsys: pytest.CaptureFixture[str], args: list[str]) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("msit-rec fit: error: "), err
    return err[0]


@pytest.mark.slow
def test_resuming_on_re_prepared_examples_says_to_warm_start(days, runs, tmp_path, capsys) -> None:
    line = refused(capsys, fit_args(days["ex2"], tmp_path / "run", "--resume", str(runs["run1"] / "checkpoints/last.ckpt")))
    assert "--init-from" in line and "--vocab-from" in line


@pytest.mark.slow
def test_warm_start_needs_examples_prepared_from_the_parents(days, runs, tmp_path, capsys) -> None:
    prepare(dataset_config(days["raw"]), tmp_path / "fresh")  # the same log, vocabularies built from scratch
    line = refused(capsys, fit_args(tmp_path / "fresh", tmp_path / "run", "--init-from", str(runs["run1"])))
    assert "--vocab-from" in line and "was not prepared from them" in line
    line = refused(capsys, fit_args(days["ex2"], tmp_path / "run", "--init-from", str(runs["run1"]),
                                    "--set", "model.tower_hidden=[8]"))
    assert "shape" in line and "tower" in line
    line = refused(capsys, fit_args(days["ex2"], tmp_path / "run", "--init-from", str(runs["run1"]), "--resume",
                                    str(runs["run1"] / "checkpoints/last.ckpt")))
    assert "pass one of them" in line


def test_row_wise_state_follows_the_column_shards() -> None:
    """Row-wise optimizer state is [rows × column shards] (TorchRec's layout): kept per shard when the count is the
    same, each row's mean over the parent's shards otherwise; new rows start at zero."""
    from msit_rec.train.warm_start import _grown

    parent = torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0, 30.0])  # 2 column shards × 3 rows
    full, known = _grown(parent, (8,), 3, 4)  # 2 shards × 4 rows
    assert full.tolist() == [1, 2, 3, 0, 10, 20, 30, 0] and known.tolist() == [True] * 3 + [False] + [True] * 3 + [False]
    full, known = _grown(parent, (4,), 3, 4)  # one shard: the mean of the two
    assert full.tolist() == [5.5, 11, 16.5, 0] and known.tolist() == [True, True, True, False]
    weights = torch.arange(6.0).view(3, 2)
    full, known = _grown(weights, (5, 2), 3, 5)
    assert torch.equal(full[:3], weights) and known.tolist() == [True, True, True, False, False]
    assert _grown(weights, (5, 3), 3, 5) is None  # another embedding dim: no mapping


def without_recency(tree: Any) -> Any:
    """A checkpoint tree as written before the gate's recency term: every entry named after it removed."""
    if isinstance(tree, dict):
        return {k: without_recency(v) for k, v in tree.items() if RECENCY_KEY not in str(k)}
    if isinstance(tree, list):
        return [without_recency(v) for v in tree]
    return tree


@pytest.mark.slow
def test_a_parent_from_before_the_recency_term_scores_and_warm_starts_with_r_zero(days, runs, tmp_path) -> None:
    """A checkpoint without the gate's recency weights (as every run before it was) is evaluated as the model it
    was, r = 0, and `--init-from` it starts there: every other tensor copied, r fresh at 0."""
    parent = runs["run1"] / "checkpoints/best.ckpt"
    older = tmp_path / "older.ckpt"
    tree = load_unsharded_checkpoint(parent)
    save_sharded(without_recency(tree), load_trainer_state(parent), older, True, lambda _: None, lambda ok: ok)
    assert not any(RECENCY_KEY in key for key in flat_tensors(load_unsharded_checkpoint(older)))

    trained = read_run(runs["run1"])
    meta1 = DatasetMeta.load(days["ex1"])
    as_older = load_model(trained, older, meta1, torch.device("cpu"))
    reference = load_model(trained, parent, meta1, torch.device("cpu"))
    with torch.no_grad():
        reference.head.gate.recency_weight.zero_()  # what a gate without the term computed
        batch = next(iter(make_loader(ExamplesDataset(days["ex1"], "test", 4096))))
        assert torch.equal(as_older(batch), reference(batch))

    record = tmp_path / "record"
    with launch_env_restored(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(fit_module, "RankingModule", recorder(record, days["ex1"]))
        assert main(fit_args(days["ex2"], tmp_path / "run", "--init-from", str(older))) == 0
    start = flat_tensors(load_unsharded_checkpoint(record / START_CHECKPOINT))
    parent_tensors = flat_tensors(tree)
    gate = "/state_dict/model.head.gate."
    assert not start[gate + RECENCY_KEY].any()
    assert torch.equal(start[gate + "behaviour_weight"], parent_tensors[gate + "behaviour_weight"])
    assert torch.equal(start[gate + "bias"], parent_tensors[gate + "bias"])
