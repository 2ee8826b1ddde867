"""Validated raw rows → the program's input tensors, encoding every value exactly as `prepare` did.

Per feature of dataset.json: `vocab` through the artifact's vocabulary file, `hash` through
`msit_rec.data.encoding.hash_bucket` of the value's text, the scenario through the scenario names, dense values as
`(x − mean) / std` with the train statistics (null → 0). Histories keep the most recent `max_len` behaviours,
oldest first, left-aligned and padded with 0. Every id that maps to OOV is counted per feature.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from msit_rec.data.encoding import hash_bucket
from msit_rec.data.spec import (
    BEHAVIOUR_FEEDBACK,
    BEHAVIOUR_SCENARIO,
    FIRST_VOCAB_INDEX,
    OOV_INDEX,
    PADDING_INDEX,
    DatasetMeta,
    FeatureSpec,
)
from msit_rec.errors import DataError
from msit_rec.serving.contract import InputSchema
from msit_rec.serving.program_inputs import ProgramInputs
from msit_rec.serving.request import Column, RawRows, RequestSchema
from msit_rec.serving.vocabulary import Vocabulary


@dataclass
class Encoded:
    inputs: ProgramInputs
    oov: Counter  # feature name → ids encoded to OOV (a shared context value counts once)


class IdEncoder:
    """One categorical feature's raw → index mapping (vocabulary or hash)."""

    def __init__(self, spec: FeatureSpec, vocabulary: Vocabulary | None) -> None:
        self.spec = spec
        self.vocabulary = vocabulary
        self.buckets = spec.cardinality - FIRST_VOCAB_INDEX

    def encode(self, values: Column) -> np.ndarray:
        """[N] int64 ids of N raw values; unknown and null → OOV."""
        if self.vocabulary is not None:
            return self.vocabulary.encode(values)
        distinct = {v: OOV_INDEX if v is None else hash_bucket(str(v), self.buckets) for v in _hashable(values)}
        return np.fromiter((distinct[v] for v in _hashable(values)), dtype=np.int64, count=len(values))


class FeedbackEncoder(IdEncoder):
    """Behaviour feedback: the vocabulary holds the log column's values as Polars writes them as text ("1" for an
    int label, "4.0"/"4.5" for a float rating). A number in a request is looked up as that text (the vocabulary
    writes a number as Python does): first as sent (`4` → "4", `4.5` → "4.5"), then in the column's other numeric
    form (`4` → "4.0", `4.0` → "4"), since a JSON writer may drop the ".0" of a float (JavaScript does) or add one."""

    def encode(self, values: Column) -> np.ndarray:
        values = _hashable(values)
        ids = super().encode(values)
        missed = np.flatnonzero(ids == OOV_INDEX)
        if len(missed):  # one lookup for every value not found as sent
            ids[missed] = super().encode([_other_numeric_text(values[i]) for i in missed.tolist()])
        return ids


def _other_numeric_text(value: Any) -> str | None:
    """The text of the same number in the other numeric type (int ↔ float), or None."""
    if type(value) is int:
        return repr(float(value))
    if type(value) is float and value.is_integer():
        return str(int(value))
    return None


def _hashable(values: Column) -> Sequence:
    """Python ints for an int array (numpy scalars hash and print the same, but this keeps dict keys uniform)."""
    return values.tolist() if isinstance(values, np.ndarray) else values


class RequestEncoder:
    """Encodes `RawRows` for one artifact (its dataset.json, input schema and vocabularies)."""

    def __init__(self, meta: DatasetMeta, inputs: InputSchema, root: Path) -> None:
        self.meta = meta
        self.inputs = inputs
        self.schema = RequestSchema.from_meta(meta, inputs)
        vocabularies: dict[str, Vocabulary] = {}

        def id_encoder(spec: FeatureSpec) -> IdEncoder:
            if spec.encoding == "vocab":
                if spec.vocabulary is None:
                    raise DataError(f"{root / 'dataset.json'}: feature '{spec.name}' has encoding vocab but no vocabulary")
                if spec.vocabulary not in vocabularies:
                    vocabularies[spec.vocabulary] = Vocabulary.read(root / spec.vocabulary)
                return IdEncoder(spec, vocabularies[spec.vocabulary])
            if spec.encoding == "hash":
                return IdEncoder(spec, None)
            raise DataError(f"{root / 'dataset.json'}: feature '{spec.name}' has encoding {spec.encoding!r}; "
                            "serving encodes sparse features by vocab or hash")

        self.sparse = [(meta.feature(name).source, id_encoder(meta.feature(name))) for name in inputs.sparse]
        # per sequence feature: the behaviour field and its encoder; None = the behaviour's scenario; "" = all OOV
        self.sequence: list[tuple[str | None, IdEncoder | None]] = []
        for name in inputs.sequence:
            spec = meta.feature(name)
            if spec.role == BEHAVIOUR_SCENARIO:
                self.sequence.append((None, None))
            elif spec.source == "":
                self.sequence.append(("", None))
            elif spec.role == BEHAVIOUR_FEEDBACK:  # its own vocabulary of the log's values as text ("1", "4.5")
                self.sequence.append((spec.source, FeedbackEncoder(spec, id_encoder(spec).vocabulary)))
            else:  # a behaviour id encoded like the single-valued feature it shares a table with
                shared = meta.feature(spec.source)
                self.sequence.append((shared.source, id_encoder(shared)))
        self.dense = []
        for name in inputs.dense:
            stats = meta.numeric_stats.get(name)
            if stats is None:
                raise DataError(f"{root / 'dataset.json'}: dense feature '{name}' has no numeric_stats")
            self.dense.append((meta.feature(name).source, stats.mean, stats.std))

    def encode(self, rows: RawRows) -> Encoded:
        oov: Counter = Counter()
        size = rows.size
        sparse = np.empty((size, len(self.sparse)), dtype=np.int64)  # [B, Fs]
        for column, (field, encoder) in enumerate(self.sparse):
            ids = encoder.encode(rows.columns[field])  # [B] or [1] (shared)
            oov[encoder.spec.name] += int(np.count_nonzero(ids == OOV_INDEX))
            sparse[:, column] = ids
        dense = np.empty((size, len(self.dense)), dtype=np.float32)  # [B, Fd]
        for column, (field, mean, std) in enumerate(self.dense):
            values = rows.columns[field]
            dense[:, column] = np.where(np.isnan(values), 0.0, (values - mean) / std)
        history, hist_len = self._history(rows, oov)  # [R, H, L], [R]: R = 1 (shared context) or B
        scenario = rows.scenario
        if history.shape[0] != scenario.shape[0]:  # one history served in several scenarios: a context per row
            history, hist_len, scenario = _rows(history, size), _rows(hist_len, size), _rows(scenario, size)
        inputs = ProgramInputs(
            sparse=torch.from_numpy(sparse),
            history=torch.from_numpy(history),
            hist_len=torch.from_numpy(hist_len),
            scenario=torch.from_numpy(scenario),
            dense=torch.from_numpy(dense),
            context=torch.zeros(size, dtype=torch.int64) if scenario.shape[0] == 1 else torch.arange(size),
        )
        return Encoded(inputs, oov)

    def _history(self, rows: RawRows, oov: Counter) -> tuple[np.ndarray, np.ndarray]:
        """([R, H, L] ids, [R] lengths) of the most recent L behaviours per history, oldest first, 0-padded."""
        max_len = self.inputs.max_len
        offsets = rows.history_offsets
        count = len(offsets) - 1
        keep = np.minimum(np.diff(offsets), max_len)  # [R]
        slot_start = np.cumsum(keep) - keep
        total = int(keep.sum())
        row = np.repeat(np.arange(count), keep)  # [K] history each kept behaviour belongs to
        slot = np.arange(total) - np.repeat(slot_start, keep)  # [K] its position, 0 = oldest kept
        source = np.repeat(offsets[1:] - keep, keep) + slot  # [K] index into the concatenated behaviours
        history = np.full((count, len(self.sequence), max_len), PADDING_INDEX, dtype=np.int64)
        for h, (field, encoder) in enumerate(self.sequence):
            if field is None:
                ids = rows.behaviour_scenario[source]
            elif encoder is None:
                ids = np.full(total, OOV_INDEX, dtype=np.int64)
            else:
                ids = encoder.encode(_take(rows.behaviours[field], source))
                oov[self.inputs.sequence[h]] += int(np.count_nonzero(ids == OOV_INDEX))
            history[row, h, slot] = ids
        return history, keep.astype(np.int64)


def _rows(values: np.ndarray, size: int) -> np.ndarray:
    """`values` with `size` rows: a shared single row (a /rank request's user context) repeated."""
    return np.repeat(values, size, axis=0) if values.shape[0] != size else values


def _take(values: Column, positions: np.ndarray) -> Column:
    if isinstance(values, np.ndarray):
        return values[positions]
    return [values[i] for i in positions.tolist()]
