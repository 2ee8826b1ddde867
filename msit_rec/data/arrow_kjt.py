"""Arrow tables of examples → `Batch`, without per-row Python work.

Columns are read as zero-copy NumPy views of the Arrow buffers; a list column's lengths come from its offsets
and its values from the child buffer re-sliced by the first/last offset (a sliced list array still points at
its parent's full child). Each value is then copied once, into the batch's single buffer, in the key-major
order a KeyedJaggedTensor needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from msit_rec.data.batch import Batch, keyed_jagged
from msit_rec.data.spec import BEHAVIOUR_SCENARIO, DatasetMeta
from msit_rec.errors import DataError, SchemaError

ROW_INDEX_COLUMN = "__row_index"  # added by the loader: position of the row in its split, -1 = padding

_LIST_TYPES = (pa.list_(pa.int64()), pa.large_list(pa.int64()))  # Polars writes large_list, pyarrow list


@dataclass(frozen=True)
class BatchLayout:
    """Which example columns fill which part of a `Batch`, and the id range each may hold."""

    sparse: tuple[str, ...]  # single-valued id columns → Batch.sparse keys, in this order
    sequence: tuple[str, ...]  # list<int64> columns → Batch.sequence keys, in this order
    dense: tuple[str, ...]  # float32 columns → Batch.dense columns, in this order
    id_bounds: dict[str, int]  # id column → exclusive upper bound (table cardinality, or S for scenarios)

    @classmethod
    def from_meta(cls, meta: DatasetMeta) -> BatchLayout:
        scenarios = len(meta.scenarios)
        bounds = {"scenario": scenarios}
        for f in meta.features:
            if f.kind in ("sparse", "sequence"):
                # the behaviours' scenarios are ids in [0, S) whatever their table's size
                bounds[f.name] = scenarios if f.role == BEHAVIOUR_SCENARIO else f.cardinality
        return cls(
            sparse=tuple(f.name for f in meta.features_of_kind("sparse")),
            sequence=tuple(f.name for f in meta.features_of_kind("sequence")),
            dense=tuple(f.name for f in meta.features_of_kind("dense")),
            id_bounds=bounds,
        )

    def expected_types(self) -> dict[str, tuple[pa.DataType, ...]]:
        """Column → accepted Arrow types; the loader reads exactly these columns."""
        types: dict[str, tuple[pa.DataType, ...]] = {
            "label": (pa.float32(),),
            "scenario": (pa.int32(),),
            "user_id": (pa.int64(),),
            "hist_len": (pa.int32(),),
        }
        types.update({name: (pa.int64(),) for name in self.sparse})
        types.update({name: _LIST_TYPES for name in self.sequence})
        types.update({name: (pa.float32(),) for name in self.dense})
        return types


def check_schema(schema: pa.Schema, layout: BatchLayout, where: str) -> None:
    """Raise SchemaError naming `where` and the column when a shard lacks a column or has another type."""
    for name, accepted in layout.expected_types().items():
        index = schema.get_field_index(name)
        if index < 0:
            raise SchemaError(f"{where}: missing column '{name}' (dataset.json expects {accepted[0]})")
        actual = schema.field(index).type
        if not any(_same_type(actual, t) for t in accepted):
            expected = " or ".join(str(t) for t in accepted)
            raise SchemaError(f"{where}: column '{name}' has type {actual}, expected {expected}")


def _same_type(actual: pa.DataType, expected: pa.DataType) -> bool:
    """Type equality that ignores whether a list's elements are declared nullable (writers differ)."""
    if isinstance(actual, (pa.ListType, pa.LargeListType)) and isinstance(expected, (pa.ListType, pa.LargeListType)):
        return type(actual) is type(expected) and actual.value_type.equals(expected.value_type)
    return actual.equals(expected)


def check_content(table: pa.Table, layout: BatchLayout, where: str) -> None:
    """Raise DataError on what the contract forbids and the model would crash on: nulls, ids out of range,
    history lists whose lengths disagree with each other or with `hist_len`."""
    for name in layout.expected_types():
        column = table.column(name)
        if column.null_count or (name in layout.sequence and pc.list_flatten(column).null_count):
            raise DataError(f"{where}: column '{name}' holds nulls; the examples contract is null-free")
    for name, bound in layout.id_bounds.items():
        values = table.column(name)
        if name in layout.sequence:
            values = pc.list_flatten(values)
        if len(values) == 0:
            continue
        lo_hi = pc.min_max(values)
        lo, hi = lo_hi["min"].as_py(), lo_hi["max"].as_py()
        if lo < 0 or hi >= bound:
            raise DataError(f"{where}: column '{name}' holds ids in [{lo}, {hi}], expected [0, {bound})")
    hist_len = table.column("hist_len").cast(pa.int64())
    for name in layout.sequence:
        if not pc.all(pc.equal(pc.list_value_length(table.column(name)), hist_len)).as_py():
            raise DataError(f"{where}: the lengths of list column '{name}' differ from 'hist_len'")


def _view(array: pa.Array) -> np.ndarray:
    """Zero-copy, read-only NumPy view of a null-free primitive Arrow array (sliced arrays included)."""
    return array.to_numpy(zero_copy_only=True)


def _single(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    """The column as one contiguous array (copies only when it spans several chunks)."""
    if isinstance(column, pa.ChunkedArray):
        return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    return column


def list_lengths_values(array: pa.ListArray | pa.LargeListArray) -> tuple[np.ndarray, np.ndarray]:
    """(lengths [n] int32, values [sum(lengths)] int64 view) of a null-free list array.

    `array.offsets` is already relative to the slice, but indexes the parent's full child array, so the values
    are cut out by the first and last offset."""
    offsets = _view(array.offsets)  # [n + 1], int32 or int64
    first, last = int(offsets[0]), int(offsets[-1])
    values = _view(array.values.slice(first, last - first))
    return np.diff(offsets).astype(np.int32, copy=False), values


_TORCH_DTYPES = {np.int32: torch.int32, np.int64: torch.int64, np.float32: torch.float32}


def pack_arrays(parts: dict[str, tuple[type, tuple[int, ...], list[np.ndarray]]]) -> dict[str, torch.Tensor]:
    """Write each part (dtype, shape, source arrays) into one shared buffer and return tensor views of it.

    1-D parts are the concatenation of their sources, 2-D parts stack them as columns. One buffer per batch
    means one shared-memory transfer out of a DataLoader worker and one host-to-device copy (see `Batch`);
    NumPy does the copies because it stays single-threaded, whereas small torch ops open OpenMP regions that
    stall when the training threads hold the cores."""
    starts, total = {}, 0
    for name, (dtype, shape, _) in parts.items():
        starts[name] = total
        total += -(-int(np.prod(shape)) * np.dtype(dtype).itemsize // 8) * 8  # 8-byte aligned segments
    arena = np.empty(total, dtype=np.uint8)
    buffer = torch.from_numpy(arena)
    views = {}
    for name, (dtype, shape, sources) in parts.items():
        size = int(np.prod(shape)) * np.dtype(dtype).itemsize
        out = arena[starts[name] : starts[name] + size].view(dtype).reshape(shape)
        if sources and len(shape) == 2:
            np.stack(sources, axis=1, out=out, casting="same_kind")
        elif sources:
            np.concatenate(sources, out=out, casting="same_kind")
        views[name] = buffer[starts[name] : starts[name] + size].view(_TORCH_DTYPES[dtype]).view(shape)
    return views


def table_to_batch(table: pa.Table, layout: BatchLayout) -> Batch:
    """Convert a table holding the layout's columns and ROW_INDEX_COLUMN into a Batch of `table.num_rows` rows.

    KJT values are key-major: all rows of the first key, then all rows of the next."""
    rows = table.num_rows

    def column(name: str) -> np.ndarray:
        return _view(_single(table.column(name)))

    lists = [list_lengths_values(_single(table.column(k))) for k in layout.sequence]
    sequence_per_key = [int(values.shape[0]) for _, values in lists]
    sparse_ids = rows * len(layout.sparse)
    row_index = column(ROW_INDEX_COLUMN)
    t = pack_arrays({
        "sparse_values": (np.int64, (sparse_ids,), [column(k) for k in layout.sparse]),
        "sparse_lengths": (np.int32, (sparse_ids,), [np.broadcast_to(np.int32(1), (sparse_ids,))]),
        "sequence_values": (np.int64, (sum(sequence_per_key),), [values for _, values in lists]),
        "sequence_lengths": (np.int32, (rows * len(lists),), [lengths for lengths, _ in lists]),
        "dense": (np.float32, (rows, len(layout.dense)), [column(k) for k in layout.dense]),
        "scenario": (np.int64, (rows,), [column("scenario")]),
        "label": (np.float32, (rows,), [column("label")]),
        "user_id": (np.int64, (rows,), [column("user_id")]),
        "hist_len": (np.int32, (rows,), [column("hist_len")]),
        "weight": (np.float32, (rows,), [row_index >= 0]),
        "row_index": (np.int64, (rows,), [row_index]),
    })
    sparse_per_key = [rows] * len(layout.sparse)
    sequence_keys = list(layout.sequence)
    return Batch(
        sparse=keyed_jagged(list(layout.sparse), t["sparse_values"], t["sparse_lengths"], sparse_per_key, rows),
        sequence=keyed_jagged(sequence_keys, t["sequence_values"], t["sequence_lengths"], sequence_per_key, rows),
        dense=t["dense"],  # [B, Fd]
        scenario=t["scenario"],
        label=t["label"],
        user_id=t["user_id"],
        hist_len=t["hist_len"],
        weight=t["weight"],
        row_index=t["row_index"],
    )
