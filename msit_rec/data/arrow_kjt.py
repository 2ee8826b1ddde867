"""Arrow tables of examples → `Batch`, without per-row Python work.

Primitive columns are viewed as tensors through DLPack; a list column's lengths come from its offsets and its
values from the child buffer re-sliced by the first/last offset (a sliced list array still points at its
parent's full child). The only copies are the concatenations that KJT's key-major layout requires.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from msit_rec.data.batch import Batch
from msit_rec.data.spec import DatasetMeta
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
                # hist_scenario holds scenario ids [0, S) whatever its table's size
                bounds[f.name] = scenarios if f.name == "hist_scenario" else f.cardinality
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
        if not any(actual.equals(t) for t in accepted):
            expected = " or ".join(str(t) for t in accepted)
            raise SchemaError(f"{where}: column '{name}' has type {actual}, expected {expected}")


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


def _tensor(array: pa.Array) -> torch.Tensor:
    """Zero-copy tensor view of a null-free primitive Arrow array (sliced arrays included)."""
    return torch.from_dlpack(array)


def _single(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    """The column as one contiguous array (copies only when it spans several chunks)."""
    if isinstance(column, pa.ChunkedArray):
        return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    return column


def list_lengths_values(array: pa.ListArray | pa.LargeListArray) -> tuple[torch.Tensor, torch.Tensor]:
    """(lengths [n] int32, values [sum(lengths)] int64) of a null-free list array, as views where possible.

    `array.offsets` is already relative to the slice, but indexes the parent's full child array, so the values
    are cut out by the first and last offset."""
    offsets = _tensor(array.offsets)  # [n + 1], int32 or int64
    first, last = int(offsets[0]), int(offsets[-1])
    values = _tensor(array.values)
    lengths = torch.diff(offsets).to(torch.int32)
    return lengths, values


def _kjt(keys: tuple[str, ...], values: list[torch.Tensor], lengths: torch.Tensor, stride: int) -> KeyedJaggedTensor:
    length_per_key = [int(v.shape[0]) for v in values]
    offset_per_key = np.concatenate([[0], np.cumsum(length_per_key, dtype=np.int64)]).tolist()
    return KeyedJaggedTensor(
        keys=list(keys),
        values=torch.cat(values) if values else torch.empty(0, dtype=torch.int64),
        lengths=lengths,
        stride=stride,
        length_per_key=length_per_key,
        offset_per_key=offset_per_key,
    )


def sparse_kjt(table: pa.Table, keys: tuple[str, ...]) -> KeyedJaggedTensor:
    """KJT of single-valued id columns: every row holds exactly one id per key."""
    rows = table.num_rows
    values = [_tensor(_single(table.column(k))) for k in keys]  # each [B]
    return _kjt(keys, values, torch.ones(rows * len(keys), dtype=torch.int32), rows)


def sequence_kjt(table: pa.Table, keys: tuple[str, ...]) -> KeyedJaggedTensor:
    """KJT of list columns: per key, the rows' lists back to back (empty lists have length 0)."""
    parts = [list_lengths_values(_single(table.column(k))) for k in keys]
    lengths = torch.cat([p[0] for p in parts]) if parts else torch.empty(0, dtype=torch.int32)
    return _kjt(keys, [p[1] for p in parts], lengths, table.num_rows)


def table_to_batch(table: pa.Table, layout: BatchLayout) -> Batch:
    """Convert a table holding the layout's columns and ROW_INDEX_COLUMN into a Batch of `table.num_rows` rows."""
    rows = table.num_rows

    def column(name: str) -> torch.Tensor:
        return _tensor(_single(table.column(name)))

    if layout.dense:
        dense = torch.stack([column(name) for name in layout.dense], dim=1)  # [B, Fd]
    else:
        dense = torch.zeros(rows, 0, dtype=torch.float32)
    row_index = column(ROW_INDEX_COLUMN)
    return Batch(
        sparse=sparse_kjt(table, layout.sparse),
        sequence=sequence_kjt(table, layout.sequence),
        dense=dense,
        scenario=column("scenario").to(torch.int64),
        label=column("label"),
        user_id=column("user_id"),
        hist_len=column("hist_len"),
        weight=(row_index >= 0).to(torch.float32),
        row_index=row_index,
    )
