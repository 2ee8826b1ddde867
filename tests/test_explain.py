"""`msit-rec explain`: the history filter and the per-cell sums against hand-computed batches, untouched rows keeping
their logit exactly, and on logs with a planted transfer_matrix, the intervention matrix finding the planted pairs.

Oracles: hand-built batches and sums; the original pass for rows that lose no behaviour; the generator's
transfer_matrix (configs/generate/transfer.yaml) for the trained models.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from msit_rec.cli import main
from msit_rec.config import load_config
from msit_rec.data.batch import Batch, keyed_jagged
from msit_rec.data.loader import ExamplesDataset, make_loader
from msit_rec.data.spec import DatasetMeta
from msit_rec.explain import (
    EXPLAIN_FILE,
    BehaviourTotals,
    Explanation,
    attention_shares,
    explain,
    gate_by_age,
    gate_means,
    score_interventions,
    select_rows,
    top_behaviours,
    without_source,
)
from msit_rec.explain_report import ATTENTION_PLOT, GATE_AGE_PLOT, GATE_PLOT
from msit_rec.train.fit import fit
from tests.random_model import random_model
from tests.training_worker import SAME_BUDGET, fit_config

pytestmark = pytest.mark.usefixtures("in_process_launch_env")  # fit leaves launch env behind

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
SEQUENCE_KEYS = ["hist_item", "hist_cat", "hist_scenario"]


def hand_batch() -> Batch:
    """3 rows served in scenarios (1, 0, 1); histories as (item, category, scenario), oldest first:
    row 0: (10, 1, 0) (11, 2, 1) (12, 3, 0);  row 1: empty;  row 2: (13, 4, 1)."""
    history = [[(10, 1, 0), (11, 2, 1), (12, 3, 0)], [], [(13, 4, 1)]]
    lengths = torch.tensor([len(h) for h in history], dtype=torch.int32)
    values = torch.tensor([b[k] for k in range(3) for h in history for b in h], dtype=torch.int64)
    n = int(lengths.sum())
    return Batch(
        sparse=keyed_jagged(["user", "item"], torch.tensor([7, 8, 9, 20, 21, 22]), torch.ones(6, dtype=torch.int32),
                            [3, 3], 3),
        sequence=keyed_jagged(SEQUENCE_KEYS, values, lengths.repeat(3), [n] * 3, 3),
        dense=torch.tensor([[0.5], [1.5], [2.5]]),
        scenario=torch.tensor([1, 0, 1]),
        label=torch.tensor([1.0, 0.0, 1.0]),
        user_id=torch.tensor([70, 80, 90]),
        hist_len=lengths,
        weight=torch.ones(3),
        row_index=torch.tensor([0, 1, 2]),
    )


def histories(batch: Batch) -> dict[str, list[list[int]]]:
    return {key: [row.tolist() for row in batch.sequence[key].to_dense()] for key in batch.sequence.keys()}  # noqa: SIM118 (a KJT is no dict)


def test_without_source_removes_the_source_from_every_sequence_feature() -> None:
    batch = hand_batch()
    without_home = without_source(batch, "hist_scenario", 0)
    assert histories(without_home) == {"hist_item": [[11], [], [13]], "hist_cat": [[2], [], [4]],
                                       "hist_scenario": [[1], [], [1]]}
    assert without_home.hist_len.tolist() == [1, 0, 1] and without_home.hist_len.dtype == torch.int32
    assert without_home.sequence.length_per_key() == [2, 2, 2] and without_home.sequence.stride() == 3
    without_search = without_source(batch, "hist_scenario", 1)
    assert histories(without_search) == {"hist_item": [[10, 12], [], []], "hist_cat": [[1, 3], [], []],
                                         "hist_scenario": [[0, 0], [], []]}
    assert without_search.hist_len.tolist() == [2, 0, 0]
    assert without_search.sparse is batch.sparse and without_search.label is batch.label  # rows untouched
    absent = without_source(batch, "hist_scenario", 4)  # no behaviour from scenario 4: nothing removed
    assert histories(absent) == histories(batch) and torch.equal(absent.hist_len, batch.hist_len)


def test_select_rows_keeps_the_rows_with_their_histories() -> None:
    kept = select_rows(hand_batch(), torch.tensor([True, False, True]))
    assert histories(kept) == {"hist_item": [[10, 11, 12], [13]], "hist_cat": [[1, 2, 3], [4]],
                               "hist_scenario": [[0, 1, 0], [1]]}
    assert kept.sparse["user"].values().tolist() == [7, 9] and kept.sparse["item"].values().tolist() == [20, 22]
    assert kept.hist_len.tolist() == [3, 1] and kept.row_index.tolist() == [0, 2]
    assert kept.dense[:, 0].tolist() == [0.5, 2.5] and kept.scenario.tolist() == [1, 1]


def test_behaviour_totals_give_gate_means_attention_shares_and_top_values() -> None:
    """Two scenarios a, b; cells (served, source): (a, a), (a, b), (a, b), (b, b)."""
    scenarios = ["a", "b"]
    totals = BehaviourTotals(2, {"hist_item": 10})
    cell = torch.tensor([0, 1, 1, 3])
    age_cell = torch.tensor([0, 1, 1, 8])  # served a: ages 0, 1, 2 (buckets 0, 1, 1); served b: age 0
    totals.add(cell, age_cell, torch.tensor([0.25, 0.25, 0.75, 1.0]), torch.tensor([1.0, -2.0, 2.0, 0.5]),
               {"hist_item": torch.tensor([5, 6, 6, 7])})
    totals.add(cell[:1], age_cell[:1], torch.tensor([0.75]), torch.tensor([3.0]),
               {"hist_item": torch.tensor([5])})  # a second batch
    assert totals.count.tolist() == [2, 2, 0, 1]
    assert gate_means(totals, scenarios) == {"a": {"a": 0.5, "b": 0.5}, "b": {"a": None, "b": 1.0}}
    assert gate_by_age(totals, scenarios, max_len=7) == {"a": {"0": 0.5, "1–2": 0.5, "3–6": None},
                                                         "b": {"0": 1.0, "1–2": None, "3–6": None}}
    assert list(gate_by_age(totals, scenarios, max_len=200)["a"]) == [
        "0", "1–2", "3–6", "7–14", "15–30", "31–62", "63–126", "127–199"]
    assert list(gate_by_age(totals, scenarios, max_len=50)["a"])[-1] == "31–49"  # the oldest age a history has
    assert attention_shares(totals, scenarios) == {"a": {"a": 0.5, "b": 0.5}, "b": {"a": 0.0, "b": 1.0}}  # Σ|α|
    top = top_behaviours(totals, scenarios, top=5, min_occurrences=2)
    assert [(b.index, b.count, b.mean_attention, b.sources) for b in top["a"]["hist_item"]] == [
        (5, 2, 2.0, {"a": 2}), (6, 2, 0.0, {"b": 2})]
    assert top["b"]["hist_item"] == []  # item 7 was seen once only


def test_gate_by_age_is_the_mean_gate_of_the_behaviours_of_each_age(small_examples: Path) -> None:
    """explain's age table against the gate of every behaviour, with its age counted by hand from the histories."""
    meta = DatasetMeta.load(small_examples)
    net = random_model(meta, "msit").eval()
    batch = next(iter(make_loader(ExamplesDataset(small_examples, "valid", 300))))
    totals = BehaviourTotals(len(meta.scenarios), {})
    score_interventions(net, [batch], meta, CPU, totals, progress=False)
    with torch.no_grad():
        gate = net.details(batch).gate
    sums: dict[tuple[int, int], list[float]] = {}
    position = 0
    for row, length in enumerate(batch.hist_len.tolist()):
        for j in range(length):  # oldest first: the last one has age 0
            bucket = min((length - 1 - j + 1).bit_length() - 1, 7)
            sums.setdefault((int(batch.scenario[row]), bucket), []).append(float(gate[position]))
            position += 1
    table = gate_by_age(totals, meta.scenarios, meta.history.max_len)
    for (served, bucket), values in sums.items():
        age = list(table[meta.scenarios[served]])[bucket]
        assert table[meta.scenarios[served]][age] == pytest.approx(sum(values) / len(values), rel=1e-6)
    assert len({b for _, b in sums}) > 2  # several ages were seen


@pytest.mark.parametrize("variant", ["msit", "shared"])
def test_rows_that_lose_no_behaviour_keep_their_logit_exactly(small_examples: Path, variant: str) -> None:
    """Untouched rows: the original logit bit for bit. Touched rows: what scoring the whole filtered batch gives (to
    float rounding: a matmul over fewer rows may round differently)."""
    meta = DatasetMeta.load(small_examples)
    net = random_model(meta, variant).eval()
    batches = list(make_loader(ExamplesDataset(small_examples, "valid", 300)))[:2]
    scores = score_interventions(net, batches, meta, CPU, BehaviourTotals(len(meta.scenarios), {}), progress=False)
    assert scores.label.shape[0] == 600
    for source in range(len(meta.scenarios)):
        with torch.no_grad():
            whole = torch.cat([net(without_source(batch, "hist_scenario", source)) for batch in batches]).double()
        touched = scores.has_source[source]
        assert touched.any() and (~touched).any()
        assert torch.equal(scores.without[source][~touched], scores.original[~touched])
        torch.testing.assert_close(scores.without[source][touched], whole[touched], rtol=0, atol=1e-6)
        assert (scores.without[source][touched] != scores.original[touched]).any()  # the intervention moved them
        torch.testing.assert_close(whole[~touched], scores.original[~touched], rtol=0, atol=1e-6)


# ---- planted transfer: configs/generate/transfer.yaml ------------------------------------------------------------

VARIANTS = ("msit", "din", "shared")
BUDGET = (*SAME_BUDGET, "trainer.max_epochs=2")  # test_training's budget, one epoch less: the result holds (timed)
RESAMPLES = 1000  # enough for the tails of the family-wise intervals below


def planted_matrix() -> np.ndarray:
    from pipelines.synthetic_config import GeneratorConfig

    config = load_config(REPO / "configs/generate/transfer.yaml", GeneratorConfig, "generate")
    return np.asarray(config.transfer_matrix, dtype=np.float64)  # [S, S]: lift of served s by clicks in source t


def matrix(explanation: Explanation, value: str) -> np.ndarray:
    return np.array([[getattr(explanation.transfer.cells[s][t], value) for t in explanation.scenarios]
                     for s in explanation.scenarios], dtype=np.float64)


@pytest.mark.slow
def test_intervention_matrix_finds_the_planted_transfer(transfer_examples: Path, tmp_path: Path) -> None:
    """msit: the 5 planted (served, source) pairs lose the most AUC, each with an interval above 0; no unplanted pair
    has an interval above 0, and none moves the AUC by a tenth of the smallest planted loss either way.

    Spearman over the 20 off-diagonal cells is printed for msit, din and shared: against a 0/1 planted matrix with 5
    ones it is at most 0.751 (every planted pair above every other), the value of a perfect ranking. The intervals are
    family-wise over the 15 unplanted pairs (level 1 − 0.05 / 15 each): at 95 % each, a model with no transfer there
    at all would show a "significant" unplanted cell about one run in two."""
    planted = planted_matrix()
    off_diagonal = ~np.eye(len(planted), dtype=bool)
    is_planted = (planted > 0) & off_diagonal
    unplanted = (planted == 0) & off_diagonal
    level = 1 - 0.05 / int(unplanted.sum())
    ordered = np.sort(planted[off_diagonal])
    best = spearmanr(np.arange(ordered.size), ordered).statistic  # what a perfect ranking of the cells reaches
    found = {}
    for variant in VARIANTS:
        start = time.perf_counter()
        run = tmp_path / variant
        fit(fit_config(variant, BUDGET), transfer_examples, run)
        trained = time.perf_counter()
        explanation, written = explain(run, tmp_path / f"explain-{variant}", resamples=RESAMPLES, level=level,
                                       progress=False)
        drop, low, high = (matrix(explanation, v) for v in ("auc_drop", "ci_low", "ci_high"))
        found[variant] = drop, low, high
        rho = spearmanr(drop[off_diagonal], planted[off_diagonal]).statistic
        excluding = int(((low > 0) | (high < 0))[unplanted].sum())
        largest = np.abs(drop[unplanted]).max() / drop[is_planted].min()
        print(f"\n{variant}: Spearman {rho:.3f} (perfect ranking: {best:.3f}); unplanted intervals excluding 0: "
              f"{excluding} / {int(unplanted.sum())}, above 0: {int((low > 0)[unplanted].sum())}; largest unplanted "
              f"|drop| / smallest planted drop: {largest:.3f}; fit {trained - start:.0f} s, explain "
              f"{time.perf_counter() - trained:.0f} s (! = planted)")
        for i, served in enumerate(explanation.scenarios):
            cells = "  ".join(f"{t}{'!' if is_planted[i, j] else ' '} {drop[i, j]:+.4f} [{low[i, j]:+.4f}, "
                              f"{high[i, j]:+.4f}]" for j, t in enumerate(explanation.scenarios))
            print(f"  {served:>8} <- {cells}")
        names = {path.name for path in written}
        assert (GATE_PLOT in names) == (GATE_AGE_PLOT in names) == (variant == "msit")
        assert (ATTENTION_PLOT in names) == (variant != "shared")
    drop, low, high = found["msit"]
    assert drop[is_planted].min() > drop[unplanted].max(), "a planted pair ranks below an unplanted one"
    assert (low[is_planted] > 0).all(), "a planted pair's interval reaches 0"
    assert (low[unplanted] <= 0).all(), "an unplanted pair shows transfer (interval above 0)"
    assert np.abs(drop[unplanted]).max() < 0.1 * drop[is_planted].min(), "an unplanted pair moves the AUC"


@pytest.mark.slow
def test_cli_explains_a_sample_of_rows(transfer_examples: Path, tmp_path: Path, capsys) -> None:
    """`msit-rec explain` end to end on a small run: the files, the version, the sample size, one-line errors."""
    run = tmp_path / "run"
    fit(fit_config("msit", ("trainer.max_epochs=1", "trainer.limit_train_batches=20")), transfer_examples, run)
    out = tmp_path / "explain"
    args = ["explain", "--run", str(run), "--out", str(out), "--max_rows", "3000", "--resamples", "20", "--quiet"]
    assert main(args) == 0
    assert "AUC lost" in capsys.readouterr().out
    saved = json.loads((out / EXPLAIN_FILE).read_text())
    assert saved["version"] == 1 and saved["rows"] == 3000 and saved["variant"] == "msit"
    assert {p.name for p in out.iterdir()} == {EXPLAIN_FILE, "report.md", "transfer_auc.png", "transfer_logit.png",
                                               GATE_PLOT, GATE_AGE_PLOT, ATTENTION_PLOT}
    assert set(saved["gate_by_age"]["home"]) >= {"0", "1–2", "3–6"}
    items = saved["top"]["home"]["hist_item"]
    assert items and all(isinstance(b["raw"], int) and b["count"] >= 20 for b in items)  # raw item ids
    assert main(args) == 2 and "pass --overwrite" in capsys.readouterr().err
    assert main([*args[:4], str(tmp_path / "other"), "--split", "nope"]) == 2
    assert "split 'nope' is not in dataset.json" in capsys.readouterr().err
