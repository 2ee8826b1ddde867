"""Exact metrics (msit_rec.metrics) and the paired bootstrap (msit_rec.compare) against independent oracles:
scikit-learn (AUC, logloss, weighted AUC), torchmetrics (AUC), a per-user loop over sklearn (GAUC), numpy
(counts, CTRs, calibration, reliability bins), and a bootstrap written with numpy + scipy ranks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import rankdata
from sklearn.metrics import log_loss, roc_auc_score
from torchmetrics.functional.classification import binary_auroc

from msit_rec.compare import StratifiedResampler, paired_bootstrap, paired_bootstrap_over_seeds
from msit_rec.config import to_dict
from msit_rec.errors import ConfigError, DataError
from msit_rec.metrics import ScoredRows, auc, compute_metrics, gauc, rank_rows, ranked_auc

SCENARIOS = ["home", "search", "detail", "tiny", "empty"]  # "empty" gets no rows


def random_rows(seed: int, n: int = 3000, decimals: int = 2, users: int = 150) -> ScoredRows:
    """Scores rounded to `decimals` (many exact ties), clicks more likely at high scores, 4 scenarios used of 5;
    scenario 3 ("tiny") has no clicks. Rows arrive shuffled (row_index is a permutation)."""
    rng = np.random.default_rng(seed)
    score = np.round(rng.random(n), decimals)
    label = (rng.random(n) < 0.1 + 0.5 * score).astype(np.float32)
    scenario = rng.choice(4, size=n, p=[0.5, 0.3, 0.15, 0.05]).astype(np.int32)
    label[scenario == 3] = 0
    return ScoredRows(
        row_index=torch.from_numpy(rng.permutation(n)),
        score=torch.from_numpy(score),
        label=torch.from_numpy(label),
        scenario=torch.from_numpy(scenario),
        user_id=torch.from_numpy(rng.integers(0, users, n) * 7919 + 10**12),  # sparse raw keys
    )


def sklearn_gauc(score: np.ndarray, label: np.ndarray, user: np.ndarray) -> tuple[float | None, int]:
    """The definition, user by user: impression-weighted mean AUC over users with both classes."""
    total = weighted = 0.0
    users = 0
    for u in np.unique(user):
        mine = user == u
        if 0 < label[mine].sum() < mine.sum():
            weighted += roc_auc_score(label[mine], score[mine]) * mine.sum()
            total += mine.sum()
            users += 1
    return (weighted / total if total else None), users


@pytest.mark.parametrize("seed,decimals", [(0, 1), (1, 2), (2, 6)])
def test_auc_equals_sklearn_and_torchmetrics_with_ties(seed: int, decimals: int) -> None:
    rows = random_rows(seed, decimals=decimals)
    expected = roc_auc_score(rows.label.numpy(), rows.score.numpy())
    assert auc(rows.score, rows.label) == pytest.approx(expected, abs=1e-12)
    reference = binary_auroc(rows.score, rows.label.long(), thresholds=None)  # float32 result
    assert auc(rows.score, rows.label) == pytest.approx(float(reference), abs=1e-6)


def test_auc_of_constant_scores_is_one_half_and_single_class_is_undefined() -> None:
    label = torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0])
    assert auc(torch.full((5,), 0.3, dtype=torch.float64), label) == 0.5
    assert auc(torch.rand(5, dtype=torch.float64), torch.zeros(5)) is None
    assert auc(torch.rand(5, dtype=torch.float64), torch.ones(5)) is None


@pytest.mark.parametrize("seed", [3, 4])
def test_gauc_equals_per_user_sklearn(seed: int) -> None:
    rows = random_rows(seed, n=1200, users=400)
    value, users = gauc(rows.score, rows.label, rows.user_id)
    expected, expected_users = sklearn_gauc(rows.score.numpy(), rows.label.numpy(), rows.user_id.numpy())
    assert float(value[0]) == pytest.approx(expected, abs=1e-12)
    assert int(users[0]) == expected_users
    assert 50 < expected_users < 400  # users lacking a class are left out


def test_weighted_auc_equals_sklearn_sample_weight_and_repeated_rows() -> None:
    """What the bootstrap relies on: integer weights count rows that many times (weight 0 = row absent)."""
    rows = random_rows(5, n=500)
    rng = np.random.default_rng(0)
    weights = rng.integers(0, 4, size=(3, 500)).astype(np.float64)  # [R, N]
    ranked = rank_rows(rows.score, rows.label)
    result = ranked_auc(ranked, torch.from_numpy(weights))  # [R, 1]
    for r in range(3):
        expected = roc_auc_score(rows.label.numpy(), rows.score.numpy(), sample_weight=weights[r])
        repeated = np.repeat(np.arange(500), weights[r].astype(int))
        on_copies = roc_auc_score(rows.label.numpy()[repeated], rows.score.numpy()[repeated])
        assert float(result[r, 0]) == pytest.approx(expected, abs=1e-12)
        assert float(result[r, 0]) == pytest.approx(on_copies, abs=1e-12)


def test_per_scenario_metrics_equal_independent_computations() -> None:
    rows = random_rows(6)
    metrics = compute_metrics(rows, SCENARIOS)
    score, label = rows.score.numpy(), rows.label.numpy().astype(np.float64)
    scenario, user = rows.scenario.numpy(), rows.user_id.numpy()
    for sid, name in enumerate(SCENARIOS):
        mine, got = scenario == sid, metrics.scenarios[name]
        assert got.count == mine.sum() and got.clicks == label[mine].sum()
        if name == "empty":
            assert (got.auc, got.gauc, got.logloss, got.observed_ctr, got.calibration) == (None,) * 5
            assert got.reliability == []
            continue
        assert got.logloss == pytest.approx(log_loss(label[mine], score[mine], labels=[0, 1]), abs=1e-12)
        assert got.observed_ctr == pytest.approx(label[mine].mean(), abs=1e-15)
        assert got.predicted_ctr == pytest.approx(score[mine].mean(), abs=1e-12)
        expected_gauc, expected_users = sklearn_gauc(score[mine], label[mine], user[mine])
        assert got.gauc_users == expected_users
        if name == "tiny":  # no clicks: AUC, GAUC and calibration undefined, never 0.5 or 0
            assert (got.auc, got.gauc, got.calibration, got.clicks) == (None, None, None, 0)
            continue
        assert got.auc == pytest.approx(roc_auc_score(label[mine], score[mine]), abs=1e-12)
        assert got.gauc == pytest.approx(expected_gauc, abs=1e-12)
        assert got.calibration == pytest.approx(score[mine].mean() / label[mine].mean(), rel=1e-12)
    overall = metrics.overall
    assert overall.count == len(score)
    assert overall.auc == pytest.approx(roc_auc_score(label, score), abs=1e-12)
    assert overall.gauc == pytest.approx(sklearn_gauc(score, label, user)[0], abs=1e-12)
    assert overall.logloss == pytest.approx(log_loss(label, score), abs=1e-12)


def test_logloss_clips_certain_wrong_predictions_like_sklearn() -> None:
    score = torch.tensor([0.0, 1.0, 0.5, 1.0], dtype=torch.float64)
    label = torch.tensor([1.0, 0.0, 1.0, 1.0])
    rows = ScoredRows(torch.arange(4), score, label, torch.zeros(4, dtype=torch.int32), torch.arange(4))
    got = compute_metrics(rows, ["only"]).overall.logloss
    assert got == pytest.approx(log_loss(label.numpy(), score.numpy()), rel=1e-12)
    assert np.isfinite(got)


def test_reliability_bins_are_equal_count_score_quantiles() -> None:
    rows = random_rows(7, n=1003, decimals=6)
    metrics = compute_metrics(rows, SCENARIOS, bins=10)
    home = rows.scenario.numpy() == 0
    order = np.argsort(rows.score.numpy()[home], kind="stable")
    score, label = rows.score.numpy()[home][order], rows.label.numpy()[home][order]
    chunks = np.array_split(np.arange(len(score)), 10)  # equal-count bins, sizes differing by at most one
    bins = metrics.scenarios["home"].reliability
    assert sorted(b.count for b in bins) == sorted(len(c) for c in chunks)
    assert sum(b.count for b in bins) == home.sum()
    position = 0
    for b in bins:
        part = slice(position, position + b.count)
        assert b.predicted == pytest.approx(score[part].mean(), abs=1e-12)
        assert b.observed == pytest.approx(label[part].mean(), abs=1e-12)
        position += b.count


def test_metrics_do_not_depend_on_row_order_and_drop_padding() -> None:
    rows = random_rows(8)
    expected = to_dict(compute_metrics(rows, SCENARIOS))
    shuffled = rows.select(torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)))
    padding = ScoredRows(
        torch.full((5,), -1), torch.ones(5, dtype=torch.float64), torch.ones(5), torch.zeros(5, dtype=torch.int32),
        torch.zeros(5, dtype=torch.int64),
    )
    assert to_dict(compute_metrics(ScoredRows.concat([padding, shuffled]), SCENARIOS)) == expected  # bit-identical


def test_a_row_scored_twice_is_an_error() -> None:
    rows = random_rows(9, n=50)
    with pytest.raises(DataError, match="more than once"):
        compute_metrics(ScoredRows.concat([rows, rows.select(torch.tensor([3]))]), SCENARIOS)


def test_scenario_ids_outside_the_dataset_are_an_error() -> None:
    with pytest.raises(DataError, match="scenario ids outside"):
        compute_metrics(random_rows(10, n=50), ["home", "search"])


# ---- paired bootstrap --------------------------------------------------------------------------------------


def two_models(n: int = 600, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """`weak` is noise plus a little signal; `strong` has clearly more signal on the same rows."""
    rng = np.random.default_rng(seed)
    label = (rng.random(n) < 0.3).astype(np.float32)
    scenario = rng.choice(2, size=n, p=[0.7, 0.3]).astype(np.int32)
    weak = np.round(rng.random(n) + 0.2 * label, 2)
    strong = np.round(rng.random(n) + 1.0 * label, 2)
    scores = {"weak": torch.from_numpy(weak), "strong": torch.from_numpy(strong)}
    return torch.from_numpy(label), torch.from_numpy(scenario), scores


def test_resamples_keep_every_scenario_size_and_draw_rows_uniformly() -> None:
    strata = torch.tensor([2, 0, 2, 2, 1, 0, 2, 2, 0, 2])  # sizes 3, 1, 6; rows of a stratum are not adjacent
    counts = StratifiedResampler(strata, 4, seed=0).draw(20_000).double()  # [R, N]
    for s, size in enumerate([3, 1, 6, 0]):
        assert torch.all(counts[:, strata == s].sum(1) == size)
    assert torch.allclose(counts.mean(0), torch.ones(10, dtype=torch.float64), atol=0.03)  # each row drawn once per resample on average
    assert torch.all(counts[:, 4] == 1)  # a stratum of one row always keeps it


def test_bootstrap_of_a_model_against_itself_is_exactly_zero() -> None:
    label, scenario, scores = two_models()
    result = paired_bootstrap(label, scenario, {"a": scores["weak"], "b": scores["weak"].clone()}, ["x", "y"], 200)
    for d in result["b"].values():
        assert (d.difference, d.ci_low, d.ci_high, d.valid_resamples) == (0.0, 0.0, 0.0, 200)


def test_bootstrap_separates_a_real_gain_and_is_reproducible() -> None:
    label, scenario, scores = two_models()
    result = paired_bootstrap(label, scenario, scores, ["x", "y"], resamples=1000, seed=1)
    for name, d in result["strong"].items():
        mine = slice(None) if name == "overall" else (scenario.numpy() == ["x", "y"].index(name))
        lab = label.numpy()[mine]
        assert d.difference == pytest.approx(
            roc_auc_score(lab, scores["strong"].numpy()[mine]) - roc_auc_score(lab, scores["weak"].numpy()[mine]),
            abs=1e-12,
        )
        assert d.ci_low < d.difference < d.ci_high
        assert d.excludes_zero and d.ci_low > 0
    again = paired_bootstrap(label, scenario, scores, ["x", "y"], resamples=1000, seed=1)
    assert to_dict(again) == to_dict(result)


def test_bootstrap_distribution_matches_an_independent_bootstrap() -> None:
    """The same resampling scheme written independently (numpy draws per scenario, AUC from scipy's average ranks,
    other random draws): the 95% intervals agree to within Monte-Carlo error."""
    label, scenario, scores = two_models(n=400, seed=2)
    fast = paired_bootstrap(label, scenario, scores, ["x", "y"], resamples=2000, seed=0)["strong"]
    rng = np.random.default_rng(123)
    blocks = [np.flatnonzero(scenario.numpy() == s) for s in (0, 1)]
    draws = [rng.choice(block, size=(2000, len(block)), replace=True) for block in blocks]  # [R, n_s] each
    for name, rows in (("x", draws[0]), ("overall", np.concatenate(draws, axis=1))):
        lab = label.numpy()[rows]
        diffs = rank_auc(scores["strong"].numpy()[rows], lab) - rank_auc(scores["weak"].numpy()[rows], lab)
        low, high = np.quantile(diffs, [0.025, 0.975])
        width = high - low
        assert fast[name].ci_low == pytest.approx(low, abs=0.08 * width)
        assert fast[name].ci_high == pytest.approx(high, abs=0.08 * width)


def rank_auc(score: np.ndarray, label: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUC of each row of [R, n] arrays from average ranks."""
    ranks = rankdata(score, method="average", axis=1)
    positives = label.sum(axis=1)
    negatives = label.shape[1] - positives
    return ((ranks * label).sum(axis=1) - positives * (positives + 1) / 2) / (positives * negatives)


def seeded_models(seeds: int, n: int = 400) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, torch.Tensor]]]:
    """Per seed, a reference `a` and a model `b` whose edge over it changes sign from seed to seed (as small data
    does), on the same rows."""
    label, scenario, _ = two_models(n=n, seed=3)
    rng = np.random.default_rng(4)
    per_seed = []
    edges = [0.5, -0.4, 0.3, -0.5, 0.1]
    for k in range(seeds):
        a = rng.random(n) + 0.6 * label.numpy()
        b = rng.random(n) + (0.6 + edges[k]) * label.numpy()
        per_seed.append({"a": torch.from_numpy(np.round(a, 3)), "b": torch.from_numpy(np.round(b, 3))})
    return label, scenario, per_seed


def test_seed_pooled_bootstrap_is_the_seed_mean_with_both_noises_in_its_interval() -> None:
    """Against an independent two-level bootstrap (numpy: seeds with replacement, then rows within each scenario):
    the point is the mean over seeds of scikit-learn's differences, and the intervals agree to Monte-Carlo error.
    The seeds with the largest edges exclude 0 each on their own, both ways; pooled, the interval holds 0."""
    label, scenario, per_seed = seeded_models(5)
    pooled = paired_bootstrap_over_seeds(label, scenario, per_seed, ["x", "y"], resamples=2000, seed=0)["b"]
    lab = label.numpy()
    sk = [roc_auc_score(lab, s["b"].numpy()) - roc_auc_score(lab, s["a"].numpy()) for s in per_seed]
    assert pooled["overall"].difference == pytest.approx(np.mean(sk), abs=1e-12)
    for scores in (per_seed[0], per_seed[3]):
        assert paired_bootstrap(label, scenario, scores, ["x", "y"], resamples=500)["b"]["overall"].excludes_zero
    assert pooled["overall"].ci_low < 0 < pooled["overall"].ci_high
    rng = np.random.default_rng(7)
    blocks = [np.flatnonzero(scenario.numpy() == s) for s in (0, 1)]
    rows = np.concatenate([rng.choice(block, size=(2000, len(block)), replace=True) for block in blocks], axis=1)
    seeds = rng.integers(0, len(per_seed), size=(2000, len(per_seed)))
    diffs = np.stack([rank_auc(s["b"].numpy()[rows], lab[rows]) - rank_auc(s["a"].numpy()[rows], lab[rows])
                      for s in per_seed], axis=1)  # [R, K]
    means = np.take_along_axis(diffs, seeds, axis=1).mean(axis=1)
    low, high = np.quantile(means, [0.025, 0.975])
    width = high - low
    assert pooled["overall"].ci_low == pytest.approx(low, abs=0.1 * width)
    assert pooled["overall"].ci_high == pytest.approx(high, abs=0.1 * width)


def test_seed_pooled_bootstrap_of_a_consistent_gain_excludes_zero() -> None:
    label, scenario, scores = two_models()
    per_seed = [scores, {name: s + 1.0 for name, s in scores.items()}]  # the same ranking each seed
    pooled = paired_bootstrap_over_seeds(label, scenario, [{"w": s["weak"], "s": s["strong"]} for s in per_seed],
                                         ["x", "y"], resamples=500)["s"]
    single = paired_bootstrap(label, scenario, {"w": scores["weak"], "s": scores["strong"]}, ["x", "y"], 500)["s"]
    assert all(pooled[k].excludes_zero and pooled[k].ci_low > 0 for k in pooled)
    assert pooled["overall"].difference == pytest.approx(single["overall"].difference, abs=1e-12)


def test_bootstrap_leaves_single_class_scenarios_undefined() -> None:
    label, scenario, scores = two_models()
    label[scenario == 1] = 0.0
    result = paired_bootstrap(label, scenario, scores, ["x", "y"], resamples=100)
    y = result["strong"]["y"]
    assert (y.reference_auc, y.difference, y.ci_low, y.ci_high, y.valid_resamples) == (None, None, None, None, 0)
    assert result["strong"]["x"].valid_resamples == 100


def test_seed_pooled_bootstrap_refuses_seeds_with_other_models() -> None:
    label, scenario, scores = two_models()
    with pytest.raises(ConfigError, match=r"every seed needs the same models \['weak', 'strong'\], got "
                                          r"\[\['weak', 'strong'\], \['weak'\]\]"):
        paired_bootstrap_over_seeds(label, scenario, [scores, {"weak": scores["weak"]}], ["x", "y"], resamples=10)
    with pytest.raises(ConfigError, match="needs the scores of at least one seed"):
        paired_bootstrap_over_seeds(label, scenario, [], ["x", "y"], resamples=10)
