"""Leak-free behaviour histories: each example's most recent L qualifying events strictly before its time.

How: sort the rows by (user, ts, row). The qualifying events, in that order, form one global event array;
for every row, the number of events before it in that order is a running count. An example's history is
the slice [lo, hi) of the event array, where hi = the running count at the *first* row of its (user, ts)
group (so events at the same ts — ties — are excluded) and lo = max(hi − L, the user's first event).
Everything is a sort, a cumulative sum and a forward fill (numpy); the lists themselves are materialised
chunk by chunk with one numpy gather, straight into Arrow list arrays (no per-row Python work, and memory
per chunk is chunk_rows × L, not rows × L).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow as pa

from pipelines.validate import LABEL, ROW, SCENARIO, TS

HIST_LO = "_hist_lo"
HIST_HI = "_hist_hi"


@dataclass
class HistoryEvents:
    """The qualifying events in (user, ts, row) order; histories are slices of these arrays."""

    item: np.ndarray  # [E] int64 encoded item ids
    category: np.ndarray  # [E] int64 encoded category ids (OOV when the dataset has no category feature)
    scenario: np.ndarray  # [E] int64 scenario ids
    feedback: np.ndarray | None = None  # [E] int64 encoded feedback of each event (None: no hist_feedback)

    def columns(self) -> dict[str, np.ndarray]:
        named = {"hist_item": self.item, "hist_cat": self.category, "hist_scenario": self.scenario}
        return named if self.feedback is None else {**named, "hist_feedback": self.feedback}

    def lists(self, lo: np.ndarray, hi: np.ndarray) -> dict[str, pa.ListArray]:
        """hist_item / hist_cat / hist_scenario (/ hist_feedback) lists for examples whose histories are events[lo:hi]."""
        lengths = hi - lo
        offsets = np.zeros(len(lo) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        # positions of every list element in the event arrays: lo of its row + its index within the row
        positions = np.repeat(lo - offsets[:-1], lengths) + np.arange(offsets[-1], dtype=np.int64)
        arrow_offsets = pa.array(offsets.astype(np.int32) if offsets[-1] < 2**31 else offsets)
        list_type = pa.ListArray if arrow_offsets.type == pa.int32() else pa.LargeListArray
        return {
            name: list_type.from_arrays(arrow_offsets, pa.array(values[positions]))
            for name, values in self.columns().items()
        }


def _user_codes(users: pl.Series) -> np.ndarray:
    """Integer user keys for sorting: the ids themselves, or exact dense codes for text ids."""
    if users.dtype.is_integer():
        return users.cast(pl.Int64).to_numpy()
    return users.cast(pl.String).cast(pl.Categorical).to_physical().cast(pl.Int64).to_numpy()


def _forward_fill_index(starts: np.ndarray) -> np.ndarray:
    """For each position, the index of the latest position at or before it where `starts` is True."""
    return np.maximum.accumulate(np.where(starts, np.arange(len(starts)), 0))


def index_histories(
    rows: pl.DataFrame, user: str, item: str, category: str | None, max_len: int, events: str,
    feedback: str | None = None,
) -> tuple[pl.DataFrame, HistoryEvents]:
    """`rows` with HIST_LO/HIST_HI added (row order unchanged), and the event arrays they point into.

    `rows` holds valid examples with the user key column, TS, ROW, LABEL, SCENARIO and the encoded
    item (and category, and feedback) columns. The work is one numpy lexsort (≈5× a multi-key Polars sort here) and
    linear passes over the sorted keys.
    """
    user_codes = _user_codes(rows[user])
    # [N] sorted position → row; lexsort is stable, so rows already in log order need no third key
    row_key = () if rows[ROW].is_sorted() else (rows[ROW].to_numpy(),)
    order = np.lexsort((*row_key, rows[TS].to_numpy(), user_codes))
    users = user_codes[order]
    ts = rows[TS].to_numpy()[order]
    is_event = rows[LABEL].to_numpy()[order] == 1 if events == "clicks" else np.ones(len(order), dtype=bool)
    before = np.cumsum(is_event) - is_event  # [N] events strictly before this position (all users)
    new_user = np.ones(len(order), dtype=bool)
    new_user[1:] = users[1:] != users[:-1]
    new_moment = new_user.copy()
    new_moment[1:] |= ts[1:] != ts[:-1]
    user_first_event = before[_forward_fill_index(new_user)]
    hi_sorted = before[_forward_fill_index(new_moment)]  # ties at the same ts see only what precedes them all
    lo_sorted = np.maximum(hi_sorted - max_len, user_first_event)
    lo, hi = np.empty_like(lo_sorted), np.empty_like(hi_sorted)
    lo[order], hi[order] = lo_sorted, hi_sorted
    event_rows = order[is_event]  # rows of the events, in (user, ts, row) order
    categories = rows[category].to_numpy()[event_rows] if category is not None else np.ones(len(event_rows))
    history = HistoryEvents(
        item=np.ascontiguousarray(rows[item].to_numpy()[event_rows], dtype=np.int64),
        category=np.ascontiguousarray(categories, dtype=np.int64),
        scenario=np.ascontiguousarray(rows[SCENARIO].to_numpy()[event_rows], dtype=np.int64),
        feedback=np.ascontiguousarray(rows[feedback].to_numpy()[event_rows], dtype=np.int64) if feedback else None,
    )
    return rows.with_columns(pl.Series(HIST_LO, lo), pl.Series(HIST_HI, hi)), history


def precomputed_lists(
    sequences: pl.Series,
    separator: str,
    max_len: int,
    encode_items: pl.DataFrame,
    item_category: pl.DataFrame,
    scenario: pl.Series,
) -> dict[str, pa.Array]:
    """Histories from a column that already holds them (oldest first), kept to the most recent `max_len`.

    `encode_items` maps raw item → index (RAW, INDEX); `item_category` maps item index → category index
    (RAW, INDEX). Such events carry no scenario, so each takes the example's own scenario.
    """
    if sequences.dtype == pl.String:
        sequences = sequences.str.split(separator)
    raw_items = sequences.list.eval(pl.element().cast(pl.String).filter(pl.element() != "")).list.tail(max_len)
    raw_items = raw_items.fill_null([])
    raw_dtype = encode_items["raw"].dtype
    items = raw_items.list.eval(
        pl.element()
        .cast(raw_dtype, strict=False)
        .replace_strict(encode_items["raw"], encode_items["index"], default=1, return_dtype=pl.Int64)
    )
    categories = items.list.eval(
        pl.element().replace_strict(item_category["raw"], item_category["index"], default=1, return_dtype=pl.Int64)
    )
    scenarios = (
        pl.DataFrame({"s": scenario.cast(pl.Int64), "n": items.list.len()})
        .select(pl.col("s").repeat_by(pl.col("n")))
        .to_series()
    )
    return {
        "hist_item": items.to_arrow(),
        "hist_cat": categories.to_arrow(),
        "hist_scenario": scenarios.to_arrow(),
    }
