"""Raw id → encoded index through one vocabulary file, with the cast rules `prepare` applies.

`prepare` joins raw values onto the vocabulary after a non-strict cast to the vocabulary's raw dtype (Polars):
for an int64 vocabulary the text "123" (or "+123", "0123") is 123 and any other text is unknown; for a string
vocabulary the int 123 is "123". Unknown and null values are OOV. This module reproduces that without Polars.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from msit_rec.data.spec import OOV_INDEX
from msit_rec.errors import DataError

_INT_TEXT = re.compile(r"[+-]?[0-9]+")  # what Polars' non-strict str → int64 cast accepts (no spaces, no "_")
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def text_as_int(text: str) -> int | None:
    """The int64 a text cast gives, or None where Polars' non-strict cast would give null."""
    if _INT_TEXT.fullmatch(text) is None:
        return None
    value = int(text)
    return value if _INT64_MIN <= value <= _INT64_MAX else None


class Vocabulary:
    """One feature's raw → index table: sorted int64 keys (searched in numpy) or a dict of text keys."""

    def __init__(self, raw: pa.Array, index: np.ndarray, source: str) -> None:
        self.source = source
        self.integer = pa.types.is_integer(raw.type)
        if self.integer:
            keys = raw.to_numpy(zero_copy_only=False).astype(np.int64)
            order = np.argsort(keys, kind="stable")
            self._keys = keys[order]  # [V] sorted raw ids
            self._values = index[order]  # [V] their encoded indices
        else:
            self._text = dict(zip(raw.to_pylist(), index.tolist()))

    @classmethod
    def read(cls, path: Path) -> Vocabulary:
        try:
            table = pq.read_table(path, columns=["raw", "index"])
        except (OSError, pa.ArrowInvalid, KeyError) as exc:
            raise DataError(f"vocabulary {path}: unreadable ({exc}); expected columns raw, index, count") from None
        raw = table.column("raw").combine_chunks()
        if not (pa.types.is_integer(raw.type) or pa.types.is_string(raw.type) or pa.types.is_large_string(raw.type)):
            raise DataError(f"vocabulary {path}: column 'raw' has type {raw.type}; expected int64 or string")
        index = table.column("index").to_numpy().astype(np.int64)
        return cls(raw, index, str(path))

    def __len__(self) -> int:
        return len(self._keys) if self.integer else len(self._text)

    def encode(self, values: Sequence[int | str | None] | np.ndarray) -> np.ndarray:
        """Encoded int64 ids [N] of raw values (a list, or an int64 array without nulls); unknown/null → OOV."""
        if self.integer:
            keys, known = _as_int64(values)
            return self._search(keys, known)
        lookup = self._text.get
        return np.fromiter(
            (OOV_INDEX if v is None else lookup(v if isinstance(v, str) else str(v), OOV_INDEX) for v in values),
            dtype=np.int64,
            count=len(values),
        )

    def _search(self, keys: np.ndarray, known: np.ndarray) -> np.ndarray:
        if len(self._keys) == 0:
            return np.full(len(keys), OOV_INDEX, dtype=np.int64)
        slot = np.minimum(np.searchsorted(self._keys, keys), len(self._keys) - 1)
        found = known & (self._keys[slot] == keys)
        return np.where(found, self._values[slot], OOV_INDEX)


def _as_int64(values: Sequence[int | str | None] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int64 keys [N], mask of values that have one) under the int cast rules; no mask work for int arrays."""
    if isinstance(values, np.ndarray) and values.dtype.kind in "iu":
        return values.astype(np.int64, copy=False), np.ones(len(values), dtype=bool)
    if set(map(type, values)) == {int}:  # plain JSON ints (the common case): one C-level conversion
        try:
            return np.array(values, dtype=np.int64), np.ones(len(values), dtype=bool)
        except OverflowError:  # beyond int64: no vocabulary holds it; the general path marks it unknown
            pass
    cast = [v if type(v) is int else (text_as_int(v) if isinstance(v, str) else None) for v in values]
    known = np.fromiter((v is not None and _INT64_MIN <= v <= _INT64_MAX for v in cast), dtype=bool, count=len(cast))
    keys = np.fromiter((v if ok else 0 for v, ok in zip(cast, known)), dtype=np.int64, count=len(cast))
    return keys, known
