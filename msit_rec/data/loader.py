"""Examples (Parquet shards of one split) → `Batch`es for one rank, with every rank running the same batch count.

Why the same count: DMP runs collectives in every forward, so a rank with one batch more than the others
hangs the job. Each epoch, the split's row groups are put in one order (shuffled by `(seed, epoch)` or kept
in file order) and the resulting row stream is cut into `world_size` contiguous ranges that differ by at
most one row; a rank reads only the row groups overlapping its range. Then:

- `drop_last=True` (training): every rank yields `(N // W) // B` full batches and skips the rest of its
  range — fewer than `B + 1` rows per rank and epoch, different rows each epoch when shuffling.
- `drop_last=False` (keep-all, for validation/test): every rank yields `ceil(ceil(N / W) / B)` batches of
  exactly B rows; the last ones are filled with padding rows (`weight` 0, `row_index` -1, ids 0, empty
  histories). Every real row appears exactly once over all ranks, and `row_index` says which row it is.

Within a rank, DataLoader workers take contiguous blocks of the rank's batches, so `num_workers` changes
batch order but not the rows a rank sees. Rows are shuffled within a buffer of `shuffle_buffer_rows` rows.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from msit_rec.data.arrow_kjt import ROW_INDEX_COLUMN, BatchLayout, check_content, check_schema, table_to_batch
from msit_rec.data.batch import Batch
from msit_rec.data.spec import DatasetMeta
from msit_rec.errors import ConfigError, DataError


@dataclass(frozen=True)
class RowGroup:
    file: int  # index into SplitIndex.files
    index: int  # row group within the file
    rows: int
    first_row: int  # split-wide index of its first row (files in dataset.json order)


@dataclass(frozen=True)
class RowSpan:
    """Rows [start, stop) of one row group."""

    group: RowGroup
    start: int
    stop: int


class SplitIndex:
    """The shards and row groups of one split, each shard's schema checked against dataset.json up front."""

    def __init__(self, root: str | Path, split: str, meta: DatasetMeta, layout: BatchLayout) -> None:
        root = Path(root)
        if split not in meta.splits:
            raise ConfigError(f"{root}: split '{split}' is not in dataset.json (has {sorted(meta.splits)})")
        self.files: list[Path] = [root / name for name in meta.splits[split].files]
        self.groups: list[RowGroup] = []
        first_row = 0
        for file_index, path in enumerate(self.files):
            shard = open_parquet(path)
            check_schema(shard.schema_arrow, layout, str(path))
            metadata = shard.metadata
            for group in range(metadata.num_row_groups):
                rows = metadata.row_group(group).num_rows
                self.groups.append(RowGroup(file_index, group, rows, first_row))
                first_row += rows
        self.num_rows = first_row
        if self.num_rows != meta.splits[split].rows:
            raise DataError(
                f"{root}: the '{split}' shards hold {self.num_rows} rows, dataset.json says "
                f"{meta.splits[split].rows}; the dataset directory is stale or incomplete"
            )


def open_parquet(path: Path) -> pq.ParquetFile:
    """Open a shard, turning a missing or corrupt file into a DataError that names it."""
    if not path.is_file():
        raise DataError(f"{path}: shard listed in dataset.json does not exist")
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None


def rank_rows(num_rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """[begin, end) of `rank`'s part of the epoch's row stream; parts differ by at most one row."""
    return rank * num_rows // world_size, (rank + 1) * num_rows // world_size


def batches_per_rank(num_rows: int, world_size: int, batch_size: int, drop_last: bool) -> int:
    """The batch count every rank yields (the same on all ranks, whatever the rank's own row count)."""
    if drop_last:
        return (num_rows // world_size) // batch_size
    largest = -(-num_rows // world_size)
    return -(-largest // batch_size)


def plan_spans(groups: list[RowGroup], begin: int, end: int) -> list[RowSpan]:
    """The row spans covering rows [begin, end) of the stream made of `groups` in the given order."""
    spans: list[RowSpan] = []
    position = 0
    for group in groups:
        lo, hi = max(begin, position), min(end, position + group.rows)
        if lo < hi:
            spans.append(RowSpan(group, lo - position, hi - position))
        position += group.rows
        if position >= end:
            break
    return spans


def padding_table(schema: pa.Schema, rows: int) -> pa.Table:
    """`rows` padding rows: ids 0 (PADDING_INDEX), empty histories, zero numbers, row index -1."""
    columns = []
    for field in schema:
        if pa.types.is_list(field.type) or pa.types.is_large_list(field.type):
            offsets_type = pa.int32() if pa.types.is_list(field.type) else pa.int64()
            offsets = pa.array(np.zeros(rows + 1, dtype=offsets_type.to_pandas_dtype()))
            empty = pa.array([], type=field.type.value_type)
            columns.append(type(pa.array([], type=field.type)).from_arrays(offsets, empty, type=field.type))
        else:
            fill = -1 if field.name == ROW_INDEX_COLUMN else 0
            columns.append(pa.array(np.full(rows, fill, dtype=field.type.to_pandas_dtype())))
    return pa.Table.from_arrays(columns, schema=schema)


class ExamplesDataset(IterableDataset):
    """Batches of one split for one rank; use with `make_loader` (DataLoader with `batch_size=None`).

    Call `set_epoch(e)` before each epoch (workers are re-created per epoch, so they see it)."""

    def __init__(
        self,
        root: str | Path,
        split: str,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = False,
        drop_last: bool = False,
        shuffle_buffer_rows: int = 131_072,
        check_rows: bool = True,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.meta = DatasetMeta.load(root)
        self.layout = BatchLayout.from_meta(self.meta)
        self.index = SplitIndex(root, split, self.meta, self.layout)
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.shuffle_buffer_rows = shuffle_buffer_rows
        self.check_rows = check_rows  # per row group: nulls, id ranges, history lengths (a few ms per 65k rows)
        self.epoch = 0
        self._columns = [*self.layout.expected_types()]
        self._files: dict[int, pq.ParquetFile] = {}  # opened lazily, per worker process
        self._schema: pa.Schema | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return batches_per_rank(self.index.num_rows, self.world_size, self.batch_size, self.drop_last)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_files": {}, "_schema": None}  # file handles do not travel to worker processes

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        batches = len(self)
        first_batch, end_batch = worker * batches // workers, (worker + 1) * batches // workers
        begin, end = rank_rows(self.index.num_rows, self.rank, self.world_size)
        real_rows = batches * self.batch_size if self.drop_last else end - begin
        lo = begin + min(first_batch * self.batch_size, real_rows)
        hi = begin + min(end_batch * self.batch_size, real_rows)
        order = list(self.index.groups)
        if self.shuffle:
            permutation = np.random.default_rng([self.seed, self.epoch]).permutation(len(order))
            order = [order[i] for i in permutation]
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker])
        tables = (self._read(span) for span in plan_spans(order, lo, hi))
        yield from self._batches(tables, (end_batch - first_batch) * self.batch_size, rng)

    def _batches(self, tables: Iterator[pa.Table], total_rows: int, rng: np.random.Generator) -> Iterator[Batch]:
        """Cut the tables into batches of B rows (shuffled within the buffer), padding up to `total_rows`."""
        size = self.batch_size
        fill = max(self.shuffle_buffer_rows, size) if self.shuffle else size
        pending: list[pa.Table] = []
        pending_rows = emitted = 0
        for table in tables:
            pending.append(table)
            pending_rows += table.num_rows
            if pending_rows < fill:
                continue
            block = self._mix(pending, rng)
            full = block.num_rows // size * size
            for start in range(0, full, size):
                yield table_to_batch(block.slice(start, size), self.layout)
            emitted += full
            pending, pending_rows = [block.slice(full)], block.num_rows - full
        if emitted == total_rows:
            return
        tail = self._mix(pending, rng) if pending else None
        schema = self._table_schema()
        missing = total_rows - emitted - pending_rows
        block = pa.concat_tables([t for t in (tail, padding_table(schema, missing)) if t is not None])
        for start in range(0, block.num_rows, size):
            yield table_to_batch(block.slice(start, size), self.layout)

    def _mix(self, tables: list[pa.Table], rng: np.random.Generator) -> pa.Table:
        table = pa.concat_tables(tables)
        return table.take(rng.permutation(table.num_rows)) if self.shuffle else table

    def _file(self, index: int) -> pq.ParquetFile:
        if index not in self._files:
            self._files[index] = open_parquet(self.index.files[index])
        return self._files[index]

    def _table_schema(self) -> pa.Schema:
        """Schema of every table `_read` returns: the first shard's column types plus the row index. Shards may
        differ in list flavour (Polars writes large_list, pyarrow list) and batches span shards, so all are
        cast to one schema."""
        if self._schema is None:
            first = self._file(0).schema_arrow
            fields = [first.field(name) for name in self._columns]
            self._schema = pa.schema([*fields, pa.field(ROW_INDEX_COLUMN, pa.int64())])
        return self._schema

    def _read(self, span: RowSpan) -> pa.Table:
        group = span.group
        path = self.index.files[group.file]
        try:
            table = self._file(group.file).read_row_group(group.index, columns=self._columns)
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"{path}: row group {group.index} is unreadable ({exc})") from None
        table = table.select(self._columns).replace_schema_metadata(None)
        if self.check_rows:
            check_content(table, self.layout, f"{path} (row group {group.index})")
        table = table.slice(span.start, span.stop - span.start)
        first = group.first_row + span.start
        rows = pa.array(np.arange(first, first + table.num_rows, dtype=np.int64))
        table = table.append_column(ROW_INDEX_COLUMN, rows)
        schema = self._table_schema()
        return table if table.schema.equals(schema) else table.cast(schema)


def make_loader(dataset: ExamplesDataset, num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """A DataLoader over ready-made batches; workers are not persistent so that `set_epoch` reaches them."""
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        prefetch_factor=2 if num_workers > 0 else None,
        persistent_workers=False,
    )
