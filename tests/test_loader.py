"""The examples loader: Batch content against the Parquet rows read back one by one (the oracle), rank dealing,
determinism, workers, bad input, and Batch.to."""

from __future__ import annotations

import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from msit_rec.data.arrow_kjt import list_lengths_values
from msit_rec.data.batch import Batch
from msit_rec.data.loader import ExamplesDataset, batches_per_rank, make_loader
from msit_rec.data.spec import CONTRACT_VERSION, DatasetMeta, FeatureSpec, HistoryInfo, ScenarioStats, SplitStats
from msit_rec.errors import DataError, SchemaError

SCENARIOS = ["home", "search", "video"]
CARD = {"item": 40, "cat": 9, "city": 6}
MAX_LEN = 5
SPARSE = ["item", "cat", "city"]
SEQUENCE = ["hist_item", "hist_cat", "hist_scenario"]
DENSE = ["price", "age"]
# (rows, row group size, list flavour): several files and row groups, odd sizes, both list flavours
# (the large_list shard is written by Polars, like `prepare` does)
SHARDS = [(23, 10, pa.list_(pa.int64())), (17, 6, pa.large_list(pa.int64())), (9, 9, pa.list_(pa.int64()))]
N_ROWS = sum(rows for rows, _, _ in SHARDS)


def features() -> list[FeatureSpec]:
    spec = [FeatureSpec("scenario", "scenario", "scenario", "scenario", len(SCENARIOS), 4, "scenario")]
    spec += [FeatureSpec(name, "sparse", name, name, CARD[name], 4) for name in SPARSE]
    spec += [
        FeatureSpec("hist_item", "sequence", "item", "item", CARD["item"], 4),
        FeatureSpec("hist_cat", "sequence", "cat", "cat", CARD["cat"], 4),
        FeatureSpec("hist_scenario", "sequence", "scenario", "scenario", len(SCENARIOS), 4, "scenario"),
    ]
    return spec + [FeatureSpec(name, "dense", name, encoding="numeric") for name in DENSE]


def shard_table(rng: np.random.Generator, rows: int, first_user: int, list_type: pa.DataType) -> pa.Table:
    lengths = rng.integers(0, MAX_LEN + 1, rows)
    lengths[::4] = 0  # plenty of empty histories
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    offsets_type = pa.int64() if pa.types.is_large_list(list_type) else pa.int32()
    list_class = pa.LargeListArray if pa.types.is_large_list(list_type) else pa.ListArray

    def history(high: int) -> pa.Array:
        values = pa.array(rng.integers(0, high, offsets[-1]), pa.int64())
        return list_class.from_arrays(pa.array(offsets, offsets_type), values, type=list_type)

    columns = {
        "label": pa.array(rng.integers(0, 2, rows).astype(np.float32)),
        "scenario": pa.array(rng.integers(0, len(SCENARIOS), rows).astype(np.int32)),
        "user_id": pa.array(np.arange(first_user, first_user + rows, dtype=np.int64)),
        "ts": pa.array(rng.integers(0, 10**9, rows)),
        **{name: pa.array(rng.integers(0, CARD[name], rows)) for name in SPARSE},
        "hist_item": history(CARD["item"]),
        "hist_cat": history(CARD["cat"]),
        "hist_scenario": history(len(SCENARIOS)),
        "hist_len": pa.array(lengths.astype(np.int32)),
        **{name: pa.array(rng.normal(size=rows).astype(np.float32)) for name in DENSE},
    }
    return pa.table(columns)


def write_meta(root: Path, files: list[str], rows: int) -> None:
    stats = {name: ScenarioStats(0, 0, 0.0) for name in SCENARIOS}
    DatasetMeta(
        contract_version=CONTRACT_VERSION,
        name="tiny",
        features=features(),
        scenarios=SCENARIOS,
        history=HistoryInfo(MAX_LEN, "all", "log"),
        splits={"train": SplitStats(rows, 0, 0.0, files, stats)},
        numeric_stats={},
        split_boundaries={},
        rows_in=rows,
        rejects={},
        rejects_file=None,
        config={},
    ).save(root / "dataset.json")


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("examples")
    rng = np.random.default_rng(7)
    files, first_user = [], 0
    for i, (rows, group_size, list_type) in enumerate(SHARDS):
        name = f"train/part-{i}.parquet"
        (root / "train").mkdir(exist_ok=True)
        table = shard_table(rng, rows, first_user, list_type)
        if pa.types.is_large_list(list_type):  # as `prepare` writes them: Polars, large_list
            pl.from_arrow(table).write_parquet(root / name, row_group_size=group_size)
        else:
            pq.write_table(table, root / name, row_group_size=group_size)
        files.append(name)
        first_user += rows
    write_meta(root, files, N_ROWS)
    return root


@pytest.fixture(scope="module")
def oracle_rows(dataset_dir: Path) -> list[dict]:
    """Every row of the split as a Python dict, in file order."""
    meta = DatasetMeta.load(dataset_dir)
    rows: list[dict] = []
    for name in meta.splits["train"].files:
        rows += pq.read_table(dataset_dir / name).to_pylist()
    return rows


def collect(dataset: ExamplesDataset, num_workers: int = 0) -> list[Batch]:
    if num_workers:
        return list(make_loader(dataset, num_workers=num_workers))
    return list(dataset)


def row_indices(batches: list[Batch]) -> list[int]:
    return [i for b in batches for i in b.row_index.tolist() if i >= 0]


def assert_batch_matches_rows(batch: Batch, rows: list[dict]) -> None:
    """Per row, every Batch field equals the Parquet row; padding rows are empty."""
    sparse, sequence = batch.sparse.to_dict(), batch.sequence.to_dict()
    assert batch.sparse.keys() == SPARSE and batch.sequence.keys() == SEQUENCE
    for b, index in enumerate(batch.row_index.tolist()):
        if index < 0:
            assert batch.weight[b] == 0 and batch.hist_len[b] == 0 and batch.label[b] == 0
            assert all(sparse[k].to_dense()[b].tolist() == [0] for k in SPARSE)
            assert all(sequence[k].to_dense()[b].numel() == 0 for k in SEQUENCE)
            continue
        row = rows[index]
        assert batch.weight[b] == 1
        assert {k: sparse[k].to_dense()[b].tolist() for k in SPARSE} == {k: [row[k]] for k in SPARSE}
        assert {k: sequence[k].to_dense()[b].tolist() for k in SEQUENCE} == {k: row[k] for k in SEQUENCE}
        assert batch.dense[b].tolist() == pytest.approx([row[k] for k in DENSE])
        assert (batch.label[b].item(), batch.scenario[b].item()) == (row["label"], row["scenario"])
        assert (batch.user_id[b].item(), batch.hist_len[b].item()) == (row["user_id"], row["hist_len"])


def assert_kjt_metadata_consistent(kjt: KeyedJaggedTensor) -> None:
    """The precomputed per-key lengths/offsets agree with what TorchRec derives from the lengths alone."""
    fresh = KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values(), lengths=kjt.lengths(), stride=kjt.stride())
    assert kjt.length_per_key() == fresh.length_per_key()
    assert kjt.offset_per_key() == fresh.offset_per_key()
    assert torch.equal(kjt.offsets(), fresh.offsets())


@pytest.mark.parametrize("batch_size", [1, 7, 64])
def test_batches_equal_parquet_rows(dataset_dir: Path, oracle_rows: list[dict], batch_size: int) -> None:
    batches = collect(ExamplesDataset(dataset_dir, "train", batch_size))
    assert row_indices(batches) == list(range(N_ROWS))  # file order, every row once
    for batch in batches:
        assert batch.batch_size == batch_size and batch.dense.shape == (batch_size, len(DENSE))
        assert batch.sparse.stride() == batch.sequence.stride() == batch_size
        assert_kjt_metadata_consistent(batch.sparse)
        assert_kjt_metadata_consistent(batch.sequence)
        assert_batch_matches_rows(batch, oracle_rows)


@pytest.mark.parametrize("list_type", [pa.list_(pa.int64()), pa.large_list(pa.int64())])
def test_list_lengths_values_on_sliced_arrays(list_type: pa.DataType) -> None:
    lists = [[5, 6], [], [7], [], [8, 9, 10], [11], []]
    array = pa.array(lists, list_type)
    for start, stop in [(0, 7), (1, 4), (2, 5), (3, 4), (4, 7), (6, 7), (5, 5)]:
        lengths, values = list_lengths_values(array.slice(start, stop - start))
        expected = lists[start:stop]
        assert lengths.dtype == np.int32 and lengths.tolist() == [len(x) for x in expected]
        assert values.tolist() == [v for x in expected for v in x]


@pytest.mark.parametrize("world_size,batch_size", [(2, 4), (2, 25), (3, 5), (4, 16), (5, 64)])
def test_keep_all_every_row_exactly_once_over_ranks(dataset_dir: Path, world_size: int, batch_size: int) -> None:
    datasets = [ExamplesDataset(dataset_dir, "train", batch_size, rank=r, world_size=world_size) for r in range(world_size)]
    per_rank = [collect(d) for d in datasets]
    expected = -(-N_ROWS // world_size) // batch_size + (-(-N_ROWS // world_size) % batch_size > 0)
    assert [len(b) for b in per_rank] == [len(d) for d in datasets] == [expected] * world_size
    assert all(b.batch_size == batch_size for batches in per_rank for b in batches)
    rows = [i for batches in per_rank for i in row_indices(batches)]
    assert sorted(rows) == list(range(N_ROWS))
    weights = sum(float(b.weight.sum()) for batches in per_rank for b in batches)
    assert weights == N_ROWS


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("world_size,batch_size", [(2, 4), (2, 7), (3, 5)])
def test_drop_last_same_full_batch_count_on_every_rank(
    dataset_dir: Path, world_size: int, batch_size: int, shuffle: bool
) -> None:
    per_rank = [
        collect(
            ExamplesDataset(
                dataset_dir, "train", batch_size, rank=r, world_size=world_size, shuffle=shuffle, drop_last=True,
                shuffle_buffer_rows=8, seed=3,
            )
        )
        for r in range(world_size)
    ]
    expected = (N_ROWS // world_size) // batch_size
    assert [len(b) for b in per_rank] == [expected] * world_size
    assert all(bool((b.weight == 1).all()) for batches in per_rank for b in batches)
    rows = [i for batches in per_rank for i in row_indices(batches)]
    assert len(rows) == len(set(rows)) == expected * batch_size * world_size
    assert N_ROWS - len(rows) < world_size * (batch_size + 1)  # the documented bound on dropped rows


def shuffled_order(dataset_dir: Path, epoch: int, seed: int = 11, num_workers: int = 0) -> list[int]:
    dataset = ExamplesDataset(dataset_dir, "train", 4, shuffle=True, drop_last=True, seed=seed, shuffle_buffer_rows=12)
    dataset.set_epoch(epoch)
    return row_indices(collect(dataset, num_workers))


def test_shuffle_is_deterministic_per_seed_and_epoch(dataset_dir: Path, oracle_rows: list[dict]) -> None:
    first = shuffled_order(dataset_dir, epoch=0)
    assert first == shuffled_order(dataset_dir, epoch=0)
    assert first != shuffled_order(dataset_dir, epoch=1)
    assert first != shuffled_order(dataset_dir, epoch=0, seed=12)
    assert first != sorted(first)
    dataset = ExamplesDataset(dataset_dir, "train", 4, shuffle=True, drop_last=True, shuffle_buffer_rows=12)
    for batch in dataset:  # the content still follows the row after the buffer shuffle
        assert_batch_matches_rows(batch, oracle_rows)


@pytest.mark.slow  # DataLoader worker processes
@pytest.mark.parametrize("drop_last", [False, True])
def test_two_workers_give_the_same_rows_and_batch_count(
    dataset_dir: Path, oracle_rows: list[dict], drop_last: bool
) -> None:
    def run(workers: int) -> list[Batch]:
        dataset = ExamplesDataset(
            dataset_dir, "train", 6, rank=1, world_size=2, shuffle=True, drop_last=drop_last, seed=5,
            shuffle_buffer_rows=10,
        )
        return collect(dataset, workers)

    single, double = run(0), run(2)
    expected = batches_per_rank(N_ROWS, world_size=2, batch_size=6, drop_last=drop_last)
    assert len(single) == len(double) == expected
    assert Counter(row_indices(single)) == Counter(row_indices(double))
    assert row_indices(run(2)) == row_indices(double)  # deterministic with workers too
    for batch in double:  # batches rebuilt from the one shared buffer after crossing the process boundary
        assert_batch_matches_rows(batch, oracle_rows)


def rewrite_shard(root: Path, table: pa.Table, name: str = "train/part-1.parquet") -> None:
    pq.write_table(table, root / name)


@pytest.fixture
def broken_dir(dataset_dir: Path, tmp_path: Path) -> Path:
    """A writable copy of the dataset to damage."""
    for path in dataset_dir.rglob("*"):
        if path.is_file():
            target = tmp_path / path.relative_to(dataset_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    return tmp_path


def test_missing_column_names_file_and_column(broken_dir: Path) -> None:
    table = pq.read_table(broken_dir / "train/part-1.parquet").drop_columns(["hist_cat"])
    rewrite_shard(broken_dir, table)
    with pytest.raises(SchemaError, match=r"part-1\.parquet.*'hist_cat'"):
        ExamplesDataset(broken_dir, "train", 4)


def test_wrong_dtype_names_file_column_and_expected_type(broken_dir: Path) -> None:
    table = pq.read_table(broken_dir / "train/part-1.parquet")
    table = table.set_column(table.schema.get_field_index("scenario"), "scenario", table["scenario"].cast(pa.int64()))
    rewrite_shard(broken_dir, table)
    with pytest.raises(SchemaError, match=r"part-1\.parquet.*'scenario'.*int64.*expected int32"):
        ExamplesDataset(broken_dir, "train", 4)


def test_corrupt_shard_names_file(broken_dir: Path) -> None:
    (broken_dir / "train/part-2.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match=r"part-2\.parquet"):
        ExamplesDataset(broken_dir, "train", 4)


def test_corrupt_data_pages_name_file_when_read(broken_dir: Path) -> None:
    path = broken_dir / "train/part-0.parquet"
    raw = bytearray(path.read_bytes())
    raw[4:400] = b"\xff" * 396  # data pages of the first row group; the footer stays intact
    path.write_bytes(bytes(raw))
    dataset = ExamplesDataset(broken_dir, "train", 4)
    with pytest.raises(DataError, match=r"part-0\.parquet"):
        list(dataset)


def test_id_out_of_range_names_file_and_column(broken_dir: Path) -> None:
    table = pq.read_table(broken_dir / "train/part-1.parquet")
    bad = pa.array(np.full(table.num_rows, CARD["city"], dtype=np.int64))
    rewrite_shard(broken_dir, table.set_column(table.schema.get_field_index("city"), "city", bad))
    dataset = ExamplesDataset(broken_dir, "train", 4)
    with pytest.raises(DataError, match=r"part-1\.parquet.*'city'.*expected \[0, 6\)"):
        list(dataset)


def test_nulls_and_inconsistent_history_name_file_and_column(broken_dir: Path) -> None:
    table = pq.read_table(broken_dir / "train/part-1.parquet")
    with_null = pa.array([None] + table["cat"].to_pylist()[1:], pa.int64())
    rewrite_shard(broken_dir, table.set_column(table.schema.get_field_index("cat"), "cat", with_null))
    with pytest.raises(DataError, match=r"part-1\.parquet.*'cat' holds nulls"):
        list(ExamplesDataset(broken_dir, "train", 4))
    wrong_len = pa.array(table["hist_len"].to_numpy() + 1, pa.int32())
    rewrite_shard(broken_dir, table.set_column(table.schema.get_field_index("hist_len"), "hist_len", wrong_len))
    with pytest.raises(DataError, match=r"part-1\.parquet.*'hist_item' differ from 'hist_len'"):
        list(ExamplesDataset(broken_dir, "train", 4))


def test_row_count_disagreeing_with_dataset_json(broken_dir: Path) -> None:
    table = pq.read_table(broken_dir / "train/part-1.parquet")
    rewrite_shard(broken_dir, table.slice(0, 5))
    with pytest.raises(DataError, match="dataset.json says"):
        ExamplesDataset(broken_dir, "train", 4)


def test_batch_to_moves_every_field(dataset_dir: Path) -> None:
    batch = next(iter(ExamplesDataset(dataset_dir, "train", 8)))
    moved = batch.to(torch.device("meta"))
    for name, value in vars(moved).items():
        original = getattr(batch, name)
        if isinstance(value, KeyedJaggedTensor):
            assert value.device().type == "meta" and value.keys() == original.keys()
            assert value.length_per_key() == original.length_per_key()
        else:
            assert value.device.type == "meta" and value.shape == original.shape and value.dtype == original.dtype
    if torch.accelerator.is_available():
        device = torch.accelerator.current_accelerator()
        back = batch.pin_memory().to(device, non_blocking=True).to(torch.device("cpu"))
        assert torch.equal(back.sequence.values(), batch.sequence.values())
        assert torch.equal(back.dense, batch.dense) and torch.equal(back.row_index, batch.row_index)


def tensors_of(batch: Batch) -> dict[str, torch.Tensor]:
    out = {}
    for name, value in vars(batch).items():
        if isinstance(value, KeyedJaggedTensor):
            out[f"{name}.values"], out[f"{name}.lengths"] = value.values(), value.lengths()
        else:
            out[name] = value
    return out


def assert_batches_equal(a: Batch, b: Batch) -> None:
    assert a.sparse.keys() == b.sparse.keys() and a.sequence.keys() == b.sequence.keys()
    assert a.sequence.length_per_key() == b.sequence.length_per_key()
    assert a.sequence.offset_per_key() == b.sequence.offset_per_key()
    ta, tb = tensors_of(a), tensors_of(b)
    assert ta.keys() == tb.keys()
    for name in ta:
        assert ta[name].dtype == tb[name].dtype and torch.equal(ta[name], tb[name]), name


def test_loader_batch_is_one_buffer_and_pickles(dataset_dir: Path) -> None:
    batch = next(iter(ExamplesDataset(dataset_dir, "train", 8)))
    assert len({t.untyped_storage().data_ptr() for t in tensors_of(batch).values()}) == 1
    assert_batches_equal(pickle.loads(pickle.dumps(batch)), batch)


def test_batch_of_separate_tensors_pickles_and_moves(dataset_dir: Path) -> None:
    loaded = next(iter(ExamplesDataset(dataset_dir, "train", 8)))
    separate = Batch(**{k: (v if isinstance(v, KeyedJaggedTensor) else v.clone()) for k, v in vars(loaded).items()})
    assert_batches_equal(pickle.loads(pickle.dumps(separate)), loaded)
    assert separate.to(torch.device("meta")).dense.device.type == "meta"
