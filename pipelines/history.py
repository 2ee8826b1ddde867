"""Leak-free behaviour histories: each example's most recent L qualifying events strictly before its time.

How: sort the rows by (user, ts, row). The qualifying events, in that order, form one global event array;
for every row, the number of events before it in that order is a running count. An example's history is
the slice [lo, hi) of the event array, where hi = the running count at the *first* row of its (user, ts)
group (so events at the same ts — ties — are excluded) and lo = max(hi − L, the user's first event).
Everything is a sort, a cumulative sum and a forward fill in Polars; the lists themselves are materialised
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
_EVENT = "_is_event"
_BEFORE = "_events_before"
_USER_START = "_user_first_event"


@dataclass
class HistoryEvents:
    """The qualifying events in (user, ts, row) order; histories are slices of these arrays."""

    item: np.ndarray  # [E] int64 encoded item ids
    category: np.ndarray  # [E] int64 encoded category ids (OOV when the dataset has no category feature)
    scenario: np.ndarray  # [E] int64 scenario ids

    def lists(self, lo: np.ndarray, hi: np.ndarray) -> dict[str, pa.ListArray]:
        """hist_item / hist_cat / hist_scenario list arrays for examples whose histories are events[lo:hi]."""
        lengths = hi - lo
        offsets = np.zeros(len(lo) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        # positions of every list element in the event arrays: lo of its row + its index within the row
        positions = np.repeat(lo - offsets[:-1], lengths) + np.arange(offsets[-1], dtype=np.int64)
        arrow_offsets = pa.array(offsets.astype(np.int32) if offsets[-1] < 2**31 else offsets)
        list_type = pa.ListArray if arrow_offsets.type == pa.int32() else pa.LargeListArray
        return {
            name: list_type.from_arrays(arrow_offsets, pa.array(values[positions]))
            for name, values in (("hist_item", self.item), ("hist_cat", self.category), ("hist_scenario", self.scenario))
        }


def index_histories(
    rows: pl.DataFrame, user: str, item: str, category: str | None, max_len: int, events: str
) -> tuple[pl.DataFrame, HistoryEvents]:
    """`rows` with HIST_LO/HIST_HI added (row order unchanged), and the event arrays they point into.

    `rows` holds valid examples with the user key column, TS, ROW, LABEL, SCENARIO and the encoded
    item (and category) columns. Only those few columns are sorted; the bounds are scattered back.
    """
    is_event = (pl.col(LABEL) == 1) if events == "clicks" else pl.lit(True)
    new_user = (pl.col(user) != pl.col(user).shift(1)).fill_null(True)
    new_moment = new_user | (pl.col(TS) != pl.col(TS).shift(1)).fill_null(True)
    keep = [user, TS, LABEL, SCENARIO, item] + ([category] if category is not None else [])
    # [N] sorted position → row; rows usually arrive in log order, where a stable 2-key sort is the same and 2× faster
    in_log_order = rows[ROW].is_sorted()
    keys = [user, TS] if in_log_order else [user, TS, ROW]
    order = rows.select(pl.arg_sort_by(keys, maintain_order=in_log_order)).to_series().to_numpy()
    ordered = (
        rows.select(keep)[order]
        .with_columns(is_event.cast(pl.Int64).alias(_EVENT))
        .with_columns((pl.col(_EVENT).cum_sum() - pl.col(_EVENT)).alias(_BEFORE))
        .with_columns(
            pl.when(new_user).then(pl.col(_BEFORE)).forward_fill().alias(_USER_START),
            pl.when(new_moment).then(pl.col(_BEFORE)).forward_fill().alias(HIST_HI),
        )
        .with_columns(pl.max_horizontal(pl.col(HIST_HI) - max_len, pl.col(_USER_START)).alias(HIST_LO))
    )
    bounds = {}
    for name in (HIST_LO, HIST_HI):
        values = np.empty(len(order), dtype=np.int64)
        values[order] = ordered[name].to_numpy()
        bounds[name] = values
    event_rows = ordered.filter(pl.col(_EVENT) == 1)
    category_ids = (
        event_rows[category].to_numpy() if category is not None else np.ones(len(event_rows), dtype=np.int64)
    )
    history = HistoryEvents(
        item=np.ascontiguousarray(event_rows[item].to_numpy(), dtype=np.int64),
        category=np.ascontiguousarray(category_ids, dtype=np.int64),
        scenario=np.ascontiguousarray(event_rows[SCENARIO].to_numpy(), dtype=np.int64),
    )
    return rows.with_columns(pl.Series(HIST_LO, bounds[HIST_LO]), pl.Series(HIST_HI, bounds[HIST_HI])), history


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
