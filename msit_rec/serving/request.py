"""Raw requests (JSON objects or Arrow tables) → validated `RawRows`, with errors that name the field path.

Request schema (field names are the raw-log column names, i.e. the `source` of each feature in dataset.json):

- every sparse feature's source column (e.g. `user_id`, `item_id`, `item_cat`, `brand`, `hour`): int or string;
  `null` is allowed (→ OOV) except for the user and item id columns of the dataset config, which are required;
- every dense feature's source column (e.g. `price`): a finite number or `null` (→ 0 after normalisation);
- the scenario column (e.g. `scenario`): one of dataset.json's scenario names, or the raw int whose text is one;
- `history`: the user's recent behaviours, oldest first (`null` or `[]` = none), each an object with the item id
  column, the category column (when the dataset has one) and the scenario column. Only the most recent
  `max_len` are used. In Parquet: a `history` column of `list<struct<item_id, item_cat, scenario>>`.
  With feedback-aware histories (contract v2) each behaviour also carries its feedback field (the label column,
  or the graded one the dataset config names, e.g. `rating`): an int, a finite number or a string, `null` or
  absent = unknown (→ OOV).

A missing field, a wrong type, an unknown scenario or a null user/item id raises `RequestError` naming the
field path, e.g. `candidates[3].item_id: expected int or string, got list`. Unknown ids are not errors: they
encode to OOV and are counted. Fields a request carries beyond these are ignored.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from msit_rec.data.spec import BEHAVIOUR_FEEDBACK, BEHAVIOUR_SCENARIO, DatasetMeta
from msit_rec.errors import DataError
from msit_rec.serving.contract import InputSchema

HISTORY = "history"
TOP_BEHAVIOURS = "top_behaviours"  # /rank option: per candidate, the k behaviours with the largest attention weight
Column = list | np.ndarray  # one raw field: values per row (None = null), or an int64/float64 array
_MISSING = object()
_ID_TYPES = frozenset({int, str})  # bool is not an id: type(True) is bool, not int
_NULLABLE_ID_TYPES = _ID_TYPES | {type(None)}
_NUMBER_TYPES = frozenset({int, float, type(None)})
_JSON_TYPE = {list: "list", dict: "object", bool: "bool", float: "float", int: "int", str: "string",
              type(None): "null"}


class RequestError(DataError):
    """A request breaks the request schema; the message starts with the offending field path."""


@dataclass(frozen=True)
class RequestSchema:
    """The raw fields a request row and a behaviour carry, derived from dataset.json and the program's inputs."""

    scenario_field: str
    scenarios: tuple[str, ...]  # index = scenario id
    id_fields: dict[str, bool]  # raw id field → required (null not allowed)
    numeric_fields: tuple[str, ...]
    behaviour_fields: dict[str, bool]  # raw id field of a behaviour (scenario aside) → required
    item_field: str
    feedback_field: str | None = None  # the behaviours' feedback field (a number or text); None without feedback

    @classmethod
    def from_meta(cls, meta: DatasetMeta, inputs: InputSchema) -> RequestSchema:
        columns = meta.config.get("columns", {}) if isinstance(meta.config, dict) else {}
        user, item = columns.get("user", "user_id"), columns.get("item", "item_id")
        scenario = meta.features_of_kind("scenario")[0]
        ids: dict[str, bool] = {}
        for name in inputs.sparse:
            source = meta.feature(name).source
            ids[source] = ids.get(source, False) or source in (user, item)
        behaviours: dict[str, bool] = {}
        feedback = None
        for name in inputs.sequence:
            spec = meta.feature(name)
            if spec.role == BEHAVIOUR_SCENARIO or spec.source == "":  # the behaviour's scenario field; no field
                continue
            # feedback: its raw field (label, or the graded column) itself, optional (null = unknown)
            source = spec.source if spec.role == BEHAVIOUR_FEEDBACK else meta.feature(spec.source).source
            feedback = source if spec.role == BEHAVIOUR_FEEDBACK else feedback
            behaviours[source] = behaviours.get(source, False) or source == item
        return cls(
            scenario_field=scenario.source,
            scenarios=tuple(inputs.scenarios),
            id_fields=ids,
            numeric_fields=tuple(dict.fromkeys(meta.feature(name).source for name in inputs.dense)),
            behaviour_fields=behaviours,
            item_field=item,
            feedback_field=feedback,
        )


@dataclass
class RawRows:
    """Validated raw rows before encoding. A column of length 1 (with `size` > 1) is shared by every row, and
    so is the history when `history_offsets` has 2 entries: /rank requests encode their user context once."""

    size: int
    scenario: np.ndarray  # [size] or [1] int64 scenario ids
    columns: dict[str, Column]  # raw id field → [size] or [1]; raw numeric field → float64 [size] or [1], NaN = null
    behaviours: dict[str, Column]  # raw behaviour id field → [E] values, every row's history concatenated
    behaviour_scenario: np.ndarray  # [E] int64 scenario ids of the behaviours
    history_offsets: np.ndarray  # [R + 1] int64 row boundaries into the behaviours, R = size or 1


# ---- JSON ------------------------------------------------------------------------------------------------------


def rank_request_rows(body: Any, schema: RequestSchema) -> RawRows:
    """A /rank body `{"scenario", "context", "history", "candidates"}` → one row per candidate.

    Candidate fields override context fields; a field no candidate carries is encoded once, from the context.
    """
    body = _object(body, "request body")
    unknown = sorted(set(body) - {"scenario", "context", HISTORY, "candidates", TOP_BEHAVIOURS})
    if unknown:
        raise RequestError(f"{unknown[0]}: unknown field; a request has scenario, context, history, candidates "
                           f"(and optionally {TOP_BEHAVIOURS})")
    scenario = _scenario_ids([_field(body, "scenario", "")], schema, lambda i: "scenario")
    context = _object(body.get("context", {}), "context")
    candidates = body.get("candidates", _MISSING)
    if candidates is _MISSING:
        raise RequestError("candidates: missing; expected a list of item objects")
    if not isinstance(candidates, list) or not candidates:
        raise RequestError(f"candidates: expected a non-empty list of objects, got {_describe(candidates)}")
    for i, candidate in enumerate(candidates):
        _object(candidate, f"candidates[{i}]")
    columns: dict[str, Column] = {}
    for name, required in schema.id_fields.items():
        columns[name] = _merged_column(candidates, context, name, lambda v, p, r=required: _check_id(v, p, r),
                                       _ID_TYPES if required else _NULLABLE_ID_TYPES)
    for name in schema.numeric_fields:
        columns[name] = _as_float(_merged_column(candidates, context, name, _check_number, _NUMBER_TYPES))
    history = _history_list(body.get(HISTORY, _MISSING), HISTORY)
    behaviours, behaviour_scenario = _behaviours(history, schema, HISTORY)
    return RawRows(
        size=len(candidates),
        scenario=scenario,
        columns=columns,
        behaviours=behaviours,
        behaviour_scenario=behaviour_scenario,
        history_offsets=np.array([0, len(history)], dtype=np.int64),
    )


def record_rows(records: Sequence[Any], schema: RequestSchema, first_row: int = 0) -> RawRows:
    """Self-contained rows (JSON lines): every field and the history on each row; paths are `rows[i]...`."""
    where = [f"rows[{first_row + i}]" for i in range(len(records))]
    for i, record in enumerate(records):
        _object(record, where[i])
    columns: dict[str, Column] = {}
    for name, required in schema.id_fields.items():
        columns[name] = [_check_id(_field(r, name, where[i]), f"{where[i]}.{name}", required)
                         for i, r in enumerate(records)]
    for name in schema.numeric_fields:
        columns[name] = _as_float([_check_number(_field(r, name, where[i]), f"{where[i]}.{name}")
                                   for i, r in enumerate(records)])
    scenario = _scenario_ids([_field(r, schema.scenario_field, where[i]) for i, r in enumerate(records)], schema,
                             lambda i: f"{where[i]}.{schema.scenario_field}")
    histories = [_history_list(_field(r, HISTORY, where[i]), f"{where[i]}.{HISTORY}") for i, r in enumerate(records)]
    flat = [b for h in histories for b in h]
    row_of = np.repeat(np.arange(len(records)), [len(h) for h in histories])
    starts = np.cumsum([0] + [len(h) for h in histories])
    behaviours, behaviour_scenario = _behaviours(
        flat, schema, "", lambda j: f"{where[row_of[j]]}.{HISTORY}[{j - starts[row_of[j]]}]"
    )
    return RawRows(len(records), scenario, columns, behaviours, behaviour_scenario, starts.astype(np.int64))


def _object(value: Any, path: str) -> dict:
    if not isinstance(value, dict):
        raise RequestError(f"{path}: expected an object, got {_describe(value)}")
    return value


def _field(record: dict, name: str, path: str) -> Any:
    value = record.get(name, _MISSING)
    if value is _MISSING:
        raise RequestError(f"{path + '.' if path else ''}{name}: missing")
    return value


def _describe(value: Any) -> str:
    return _JSON_TYPE.get(type(value), type(value).__name__)


def _check_id(value: Any, path: str, required: bool) -> int | str | None:
    kind = type(value)
    if kind is int or kind is str:
        return value
    if value is None:
        if required:
            raise RequestError(f"{path}: null; this id is required")
        return None
    raise RequestError(f"{path}: expected int or string, got {_describe(value)}")


def _check_feedback(value: Any, path: str) -> int | float | str | None:
    """A behaviour's feedback: an id-like value, or a graded number (a rating) as the log holds it."""
    kind = type(value)
    if kind is float and math.isfinite(value) or kind is int or kind is str or value is None:
        return value
    shown = value if kind is float else _describe(value)
    raise RequestError(f"{path}: expected a finite number, an int, a string or null, got {shown}")


def _check_number(value: Any, path: str) -> float | None:
    kind = type(value)
    if value is None:
        return None
    if (kind is int or kind is float) and math.isfinite(value):
        return float(value)
    expected = "a finite number" if kind is float else "a number or null"
    raise RequestError(f"{path}: expected {expected}, got {_describe(value) if kind is not float else value}")


def _merged_column(
    candidates: list[dict], context: dict, name: str, check: Callable[[Any, str], Any], valid_types: frozenset[type]
) -> list:
    """Candidate values with the context value as fallback; one shared value when no candidate has the field.

    Fast path for the common case (every value already of a valid type: one C-level pass over the types); anything
    else goes value by value through `check`, which names the first bad field.
    """
    fallback = context.get(name, _MISSING)
    values = [c.get(name, fallback) for c in candidates]
    if all(value is fallback for value in values):  # no candidate has the field: the context's, once
        if fallback is _MISSING:
            raise RequestError(f"candidates[0].{name}: missing (in the candidate and in context)")
        return [check(fallback, f"context.{name}")]
    if set(map(type, values)) <= valid_types and (float not in valid_types or all(map(_finite, values))):
        return values
    checked = []
    for i, (candidate, value) in enumerate(zip(candidates, values, strict=True)):
        if value is _MISSING:
            raise RequestError(f"candidates[{i}].{name}: missing (in the candidate and in context)")
        checked.append(check(value, f"candidates[{i}].{name}" if name in candidate else f"context.{name}"))
    return checked


def _finite(value: Any) -> bool:
    return value is None or math.isfinite(value)


def _as_float(values: list[float | None]) -> np.ndarray:
    return np.array([math.nan if v is None else v for v in values], dtype=np.float64)


def _scenario_ids(values: list[Any], schema: RequestSchema, path: Callable[[int], str]) -> np.ndarray:
    ids = {name: sid for sid, name in enumerate(schema.scenarios)}
    out = np.empty(len(values), dtype=np.int64)
    for i, value in enumerate(values):
        if type(value) is not int and type(value) is not str:
            raise RequestError(f"{path(i)}: expected a scenario name (string or int), got {_describe(value)}")
        sid = ids.get(str(value))
        if sid is None:
            raise RequestError(f"{path(i)}: unknown scenario {value!r}; expected one of {list(schema.scenarios)}")
        out[i] = sid
    return out


def _history_list(value: Any, path: str) -> list:
    if value is _MISSING:
        raise RequestError(f"{path}: missing; give the user's recent behaviours, oldest first ([] for none)")
    if value is None:
        return []
    if not isinstance(value, list):
        raise RequestError(f"{path}: expected a list of behaviour objects, got {_describe(value)}")
    return value


def _behaviours(
    history: list, schema: RequestSchema, prefix: str, path: Callable[[int], str] | None = None
) -> tuple[dict[str, list], np.ndarray]:
    where = path if path is not None else (lambda j: f"{prefix}[{j}]")
    for j, behaviour in enumerate(history):
        _object(behaviour, where(j))
    columns = {
        name: [_check_id(_field(b, name, where(j)), f"{where(j)}.{name}", required) for j, b in enumerate(history)]
        for name, required in schema.behaviour_fields.items() if name != schema.feedback_field
    }
    if schema.feedback_field is not None:  # optional: absent = unknown
        name = schema.feedback_field
        columns[name] = [_check_feedback(b.get(name), f"{where(j)}.{name}") for j, b in enumerate(history)]
    scenario = _scenario_ids([_field(b, schema.scenario_field, where(j)) for j, b in enumerate(history)], schema,
                             lambda j: f"{where(j)}.{schema.scenario_field}")
    return columns, scenario


# ---- Arrow -----------------------------------------------------------------------------------------------------


def arrow_rows(table: pa.Table | pa.RecordBatch, schema: RequestSchema, first_row: int = 0) -> RawRows:
    """Rows of an Arrow table (Parquet input), column-wise: type checks per column, nulls located by row."""
    columns: dict[str, Column] = {}
    for name, required in schema.id_fields.items():
        columns[name] = _arrow_ids(_column(table, name), f"rows[{{}}].{name}", first_row, required)
    for name in schema.numeric_fields:
        columns[name] = _arrow_numbers(_column(table, name), f"rows[{{}}].{name}", first_row)
    scenario = _arrow_scenarios(_column(table, schema.scenario_field), schema,
                                f"rows[{{}}].{schema.scenario_field}", first_row)
    history = _column(table, HISTORY)
    if not (pa.types.is_list(history.type) or pa.types.is_large_list(history.type)) or not pa.types.is_struct(
        history.type.value_type
    ):
        raise RequestError(f"column '{HISTORY}': expected list<struct<...>> of behaviours, got {history.type}")
    lengths = pc.fill_null(pc.list_value_length(history), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    flat = pc.list_flatten(history)  # [E] struct: nulls lists contribute nothing
    row_of = np.repeat(np.arange(len(lengths)), lengths)

    def behaviour_path(field: str) -> Callable[[int], str]:
        return lambda j: f"rows[{first_row + row_of[j]}].{HISTORY}[{j - offsets[row_of[j]]}].{field}"

    behaviours = {
        name: _arrow_ids(_struct_field(flat, name), behaviour_path(name), 0, required)
        for name, required in schema.behaviour_fields.items() if name != schema.feedback_field
    }
    if schema.feedback_field is not None:
        feedback = _struct_field(flat, schema.feedback_field)
        behaviours[schema.feedback_field] = (
            _float_texts(_arrow_numbers(feedback, behaviour_path(schema.feedback_field), 0, nulls=None),
                         single=pa.types.is_float32(feedback.type) or pa.types.is_float16(feedback.type))
            if pa.types.is_floating(feedback.type)
            else _arrow_ids(feedback, behaviour_path(schema.feedback_field), 0, required=False)
        )
    behaviour_scenario = _arrow_scenarios(_struct_field(flat, schema.scenario_field), schema,
                                          behaviour_path(schema.scenario_field), 0)
    return RawRows(len(lengths), scenario, columns, behaviours, behaviour_scenario, offsets)


def _column(table: pa.Table | pa.RecordBatch, name: str) -> pa.Array:
    if name not in table.schema.names:
        raise RequestError(f"column '{name}': missing; input columns are {table.schema.names}")
    column = table.column(name)
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return column.dictionary_decode() if pa.types.is_dictionary(column.type) else column


def _struct_field(flat: pa.Array, name: str) -> pa.Array:
    if flat.type.get_field_index(name) < 0:
        raise RequestError(f"column '{HISTORY}': behaviours lack field '{name}'; they have {[f.name for f in flat.type]}")
    field = pc.struct_field(flat, name)
    return field.dictionary_decode() if pa.types.is_dictionary(field.type) else field


def _located(path: str | Callable[[int], str], index: int) -> str:
    return path(index) if callable(path) else path.format(index)


def _first_null(array: pa.Array, path: str | Callable[[int], str], first_row: int, what: str) -> None:
    if array.null_count:
        index = int(np.flatnonzero(array.is_null().to_numpy(zero_copy_only=False))[0])
        raise RequestError(f"{_located(path, first_row + index)}: null; {what}")


def _arrow_ids(array: pa.Array, path: str | Callable[[int], str], first_row: int, required: bool) -> Column:
    kind = array.type
    if not (pa.types.is_integer(kind) or pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or pa.types.is_null(kind)):
        raise RequestError(f"{_located(path, first_row)}: expected int or string, got {kind} (the whole column)")
    if required:
        _first_null(array, path, first_row, "this id is required")
    if pa.types.is_integer(kind) and array.null_count == 0:
        return array.to_numpy().astype(np.int64, copy=False)
    return array.to_pylist()


def _float_texts(values: list, single: bool) -> list:
    """Floats of a float32/16 column as the shortest decimal of their own precision (3.7, not 3.700000047683716 as
    float64 prints it): the text Polars writes for them, hence the vocabulary's key."""
    if not single:
        return values
    return [None if v is None else float(str(np.float32(v))) for v in values]


def _arrow_numbers(array: pa.Array, path: str | Callable[[int], str], first_row: int, nulls: float | None = math.nan
                   ) -> np.ndarray | list:
    """float64 values with nulls as NaN; with `nulls=None` a list with None for nulls (feedback: null = unknown)."""
    kind = array.type
    if not (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_null(kind)):
        raise RequestError(f"{_located(path, first_row)}: expected a number, got {kind} (the whole column)")
    values = pc.cast(array, pa.float64()).to_numpy(zero_copy_only=False)  # nulls → NaN
    null = array.is_null().to_numpy(zero_copy_only=False)
    bad = ~np.isfinite(values) & ~null
    if bad.any():
        index = int(np.flatnonzero(bad)[0])
        raise RequestError(f"{_located(path, first_row + index)}: expected a finite number, got {values[index]}")
    if nulls is None:
        return [None if missing else value for value, missing in zip(values.tolist(), null.tolist())]
    return values


def _arrow_scenarios(array: pa.Array, schema: RequestSchema, path: str | Callable[[int], str],
                     first_row: int) -> np.ndarray:
    kind = array.type
    if not (pa.types.is_integer(kind) or pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise RequestError(f"{_located(path, first_row)}: expected a scenario name (string or int), got {kind}")
    _first_null(array, path, first_row, "a scenario is required")
    ids = pc.index_in(pc.cast(array, pa.string()), value_set=pa.array(schema.scenarios, pa.string()))
    if ids.null_count:
        index = int(np.flatnonzero(ids.is_null().to_numpy(zero_copy_only=False))[0])
        raise RequestError(f"{_located(path, first_row + index)}: unknown scenario {array[index].as_py()!r}; "
                           f"expected one of {list(schema.scenarios)}")
    return ids.to_numpy(zero_copy_only=False).astype(np.int64)
