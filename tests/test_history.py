"""Behaviour histories: exact against hand-computed and brute-force oracles, and never leaking the future."""

from __future__ import annotations

from pathlib import Path

import polars as pl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipelines.prepare import prepare
from tests.raw_logs import dataset_config, read_split, write_log

SCENARIOS = ["home", "search", "new"]


def test_hand_computed_histories(tmp_path: Path) -> None:
    # user 1: clicks at ts 10 (item 100, home), 20 (item 101, search) and 20 (item 102, home: a tie),
    #         a non-click at 25, then clicks at 30 and 40 (new); user 2 has no earlier clicks.
    log = write_log(
        tmp_path / "raw.parquet",
        {
            "user_id": [1, 1, 1, 1, 1, 1, 2, 2],
            "item_id": [100, 101, 102, 103, 104, 105, 100, 106],
            "cat": [7, 8, 7, 9, 8, 9, 7, 8],
            "scenario": ["home", "search", "home", "home", "new", "new", "search", "home"],
            "ts": [10, 20, 20, 25, 30, 40, 5, 50],
            "label": [1, 1, 1, 0, 1, 1, 0, 1],
        },
    )
    meta = prepare(dataset_config(log, scenarios=SCENARIOS), tmp_path / "out")
    rows = read_split(tmp_path / "out", meta, "train").sort("ts", "user_id", "item")
    # vocab by count desc then raw id: item 100 (2 rows) → 2, then 101..106 → 3..8; cat 7 → 2, 8 → 3, 9 → 4
    got = {(r["user_id"], r["ts"], r["item"]): (r["hist_item"], r["hist_cat"], r["hist_scenario"], r["hist_len"])
           for r in rows.iter_rows(named=True)}
    assert got[(2, 5, 2)] == ([], [], [], 0)  # no history at all
    assert got[(1, 10, 2)] == ([], [], [], 0)  # first event of the user
    # both ts-20 examples see only the ts-10 click: the tie at ts 20 is excluded for each of them
    assert got[(1, 20, 3)] == ([2], [2], [0], 1)
    assert got[(1, 20, 4)] == ([2], [2], [0], 1)
    # non-click at 25 sees all three earlier clicks, oldest first, ties in log order, cross-scenario
    assert got[(1, 25, 5)] == ([2, 3, 4], [2, 3, 2], [0, 1, 0], 3)
    # ts 30 sees the same three clicks (the ts-25 impression was not a click)
    assert got[(1, 30, 6)] == ([2, 3, 4], [2, 3, 2], [0, 1, 0], 3)
    # ts 40: four earlier clicks, truncated to the most recent max_len = 3
    assert got[(1, 40, 7)] == ([3, 4, 6], [3, 2, 3], [1, 0, 2], 3)
    # user 2's history never contains user 1's events
    assert got[(2, 50, 8)] == ([], [], [], 0)


def test_all_events_mode_counts_non_clicks(tmp_path: Path) -> None:
    log = write_log(
        tmp_path / "raw.parquet",
        {"user_id": [1, 1, 1], "item_id": [10, 11, 12], "cat": [1, 1, 1], "scenario": ["a", "a", "a"],
         "ts": [1, 2, 3], "label": [0, 0, 1]},
    )
    config = dataset_config(log, history={"max_len": 5, "events": "all"})
    meta = prepare(config, tmp_path / "out")
    rows = read_split(tmp_path / "out", meta, "train").sort("ts")
    assert rows["hist_len"].to_list() == [0, 1, 2]


def test_feedback_follows_each_behaviour(tmp_path: Path) -> None:
    """hist_feedback holds each history event's own feedback, aligned with hist_item: the label (skips included
    with events: all) or a graded column through a vocabulary of its train values."""
    log = write_log(
        tmp_path / "raw.parquet",
        {"user_id": [1, 1, 1, 1, 2], "item_id": [10, 11, 12, 13, 10], "cat": [1, 1, 2, 2, 1],
         "scenario": ["a", "b", "a", "b", "a"], "ts": [1, 2, 3, 4, 5], "label": [0, 1, 0, 1, 1],
         "rating": [2.5, 4.0, 1.0, 4.5, 4.0]},
    )
    by_label = prepare(dataset_config(log, history={"max_len": 5, "events": "all", "feedback": "label"}),
                       tmp_path / "label")
    rows = read_split(tmp_path / "label", by_label, "train").sort("ts")
    # label vocabulary by count desc: "1" (3 rows) → 2, "0" (2 rows) → 3
    assert rows["hist_feedback"].to_list() == [[], [3], [3, 2], [3, 2, 3], []]
    assert rows["hist_len"].to_list() == [len(f) for f in rows["hist_feedback"].to_list()]
    spec = by_label.behaviour_feedback
    assert spec is not None and spec.table == "feedback" and spec.cardinality == 4 and by_label.contract_version == 2

    graded = prepare(dataset_config(log, history={"max_len": 2, "events": "all", "feedback": "rating"}),
                     tmp_path / "rating")
    rows = read_split(tmp_path / "rating", graded, "train").sort("ts")
    # "4.0" (2 rows) → 2, then by text: "1.0" → 3, "2.5" → 4, "4.5" → 5; the last max_len = 2 events
    assert rows["hist_feedback"].to_list() == [[], [4], [4, 2], [2, 3], []]
    vocab = pl.read_parquet(tmp_path / "rating" / graded.behaviour_feedback.vocabulary)
    assert dict(zip(vocab["raw"], vocab["index"])) == {"4.0": 2, "1.0": 3, "2.5": 4, "4.5": 5}


def test_contract_v1_examples_still_load(tmp_path: Path) -> None:
    import json

    from msit_rec.data.spec import BEHAVIOUR_SCENARIO, DatasetMeta

    log = write_log(tmp_path / "raw.parquet", {"user_id": [1, 1], "item_id": [10, 11], "cat": [1, 1],
                                               "scenario": ["a", "a"], "ts": [1, 2], "label": [1, 1]})
    prepare(dataset_config(log), tmp_path / "out")
    raw = json.loads((tmp_path / "out" / "dataset.json").read_text())
    raw["contract_version"] = 1  # what a version-1 prepare wrote: no roles, no history.feedback
    for feature in raw["features"]:
        feature.pop("role")
    raw["history"].pop("feedback")
    (tmp_path / "out" / "dataset.json").write_text(json.dumps(raw))
    meta = DatasetMeta.load(tmp_path / "out")
    assert meta.behaviour_scenario is not None and meta.behaviour_scenario.role == BEHAVIOUR_SCENARIO
    assert meta.behaviour_feedback is None and meta.history.feedback is None


def brute_force_histories(log: pl.DataFrame, max_len: int) -> dict[int, list[int]]:
    """Per row: raw item ids of the user's clicks strictly before the row's ts, oldest first, last max_len."""
    rows = log.with_row_index("row").to_dicts()
    result = {}
    for row in rows:
        earlier = [e for e in rows if e["user_id"] == row["user_id"] and e["label"] == 1 and e["ts"] < row["ts"]]
        earlier.sort(key=lambda e: (e["ts"], e["row"]))
        result[row["item_id"]] = [e["item_id"] for e in earlier][-max_len:]
    return result


events = st.lists(
    st.tuples(st.integers(1, 4), st.integers(0, 12), st.integers(0, 1), st.sampled_from(SCENARIOS)),
    min_size=1,
    max_size=40,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=events, max_len=st.integers(1, 4))
def test_histories_match_brute_force_and_never_leak(tmp_path_factory, rows, max_len) -> None:
    tmp = tmp_path_factory.mktemp("prop")
    # every row gets its own item id, so a history element names exactly one event (and its ts)
    log = pl.DataFrame(
        {
            "user_id": [r[0] for r in rows],
            "item_id": list(range(1000, 1000 + len(rows))),
            "cat": [r[0] * 10 for r in rows],
            "scenario": [r[3] for r in rows],
            "ts": [r[1] for r in rows],
            "label": [r[2] for r in rows],
        }
    )
    write_log(tmp / "raw.parquet", log.to_dict(as_series=False))
    config = dataset_config(tmp / "raw.parquet", scenarios=None, history={"max_len": max_len})
    meta = prepare(config, tmp / "out")
    vocab = dict(pl.read_parquet(tmp / "out" / "vocab" / "item.parquet").select("index", "raw").iter_rows())
    ts_of = dict(zip(log["item_id"], log["ts"]))
    expected = brute_force_histories(log, max_len)
    out = read_split(tmp / "out", meta, "train")
    assert len(out) == len(log)
    for row in out.iter_rows(named=True):
        item = vocab[row["item"]]
        history = [vocab[i] for i in row["hist_item"]]
        assert history == expected[item]
        assert all(ts_of[h] < row["ts"] for h in history)  # strictly earlier: no leak, ties excluded
        assert row["hist_len"] == len(history) == len(row["hist_cat"]) == len(row["hist_scenario"])


def test_index_does_not_depend_on_row_order() -> None:
    from pipelines.history import HIST_HI, HIST_LO, index_histories

    frame = pl.DataFrame(
        {"user": [1, 2, 1, 1, 2, 1], "_ts": [5, 1, 5, 7, 3, 9], "_row": [0, 1, 2, 3, 4, 5],
         "_label": [1, 1, 1, 0, 1, 1], "_scenario": [0, 1, 0, 1, 0, 1], "item": [10, 11, 12, 13, 14, 15]}
    )
    in_order, events = index_histories(frame, "user", "item", None, 2, "clicks")
    shuffled, _ = index_histories(frame.reverse(), "user", "item", None, 2, "clicks")

    def lists(indexed: pl.DataFrame) -> dict[int, list[int]]:
        arrays = events.lists(indexed[HIST_LO].to_numpy(), indexed[HIST_HI].to_numpy())
        return dict(zip(indexed["_row"].to_list(), arrays["hist_item"].to_pylist()))

    assert lists(in_order) == lists(shuffled) == {0: [], 1: [], 2: [], 3: [10, 12], 4: [11], 5: [10, 12]}
