"""The synthetic generator: reproducible, on contract, and its ground truth is really in the data.

Every property is measured from the written Parquet files with Polars (the way a user would see them), never
from generator internals.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from msit_rec.config import from_dict, load_config, to_dict
from msit_rec.errors import ConfigError, MsitError
from pipelines.synthetic import SCENARIO_NAMES, GenerateSummary, GeneratorConfig, generate

TINY_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "generate" / "tiny.yaml"

RAW_SCHEMA = {
    "user_id": pa.int64(),
    "item_id": pa.int64(),
    "scenario": pa.string(),
    "ts": pa.int64(),
    "label": pa.int8(),
    "user_segment": pa.int64(),
    "item_cat": pa.int64(),
    "brand": pa.int64(),
    "price_bucket": pa.int64(),
    "hour": pa.int64(),
    "price": pa.float32(),
    "user_activity": pa.float32(),
}

# A denser world than tiny (few categories, many impressions per user) so that scenario shares, CTRs and
# the transfer effect can be measured with little noise: ~140k rows, well under a second to generate.
MEASURE_WORLD = {
    "users": 3000,
    "items": 600,
    "categories": 10,
    "brands": 40,
    "days": 6,
    "daily_active_fraction": 0.6,
    "impressions_per_user_day": 12.0,
    "page_size": 3,
    "interest_categories": 3,
    "user_scenario_concentration": 50.0,
    "scenario_ctr": [0.03, 0.09, 0.06, 0.045, 0.12],
    "calibration_users": 1000,
    "seed": 11,
}
DAY = 86_400


def tiny_config(**overrides) -> GeneratorConfig:
    base = to_dict(load_config(TINY_CONFIG, GeneratorConfig, section="generate"))
    return from_dict(GeneratorConfig, {**base, **overrides})


def measure_config(**overrides) -> GeneratorConfig:
    return from_dict(GeneratorConfig, {**MEASURE_WORLD, **overrides})


def read_log(out_dir: Path) -> pl.DataFrame:
    return pl.scan_parquet(out_dir / "**" / "*.parquet").collect()


def run(config: GeneratorConfig, out_dir: Path) -> tuple[GenerateSummary, pl.DataFrame]:
    summary = generate(config, out_dir, progress=False)
    return summary, read_log(out_dir)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[GeneratorConfig, Path, GenerateSummary]:
    config = tiny_config()
    out = tmp_path_factory.mktemp("tiny")
    return config, out, generate(config, out, progress=False)


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> tuple[GenerateSummary, pl.DataFrame]:
    return run(measure_config(), tmp_path_factory.mktemp("measured"))


# --- reproducibility -----------------------------------------------------------------------------------


def test_same_seed_gives_identical_files_and_another_seed_does_not(tiny, tmp_path):
    config, out, summary = tiny
    again = generate(config, tmp_path / "again", progress=False)
    assert [f.relative_to(out) for f in summary.files] == [f.relative_to(tmp_path / "again") for f in again.files]
    for first, second in zip(summary.files, again.files, strict=True):
        assert first.read_bytes() == second.read_bytes()

    _, reseeded = run(tiny_config(seed=config.seed + 1), tmp_path / "other")
    original = read_log(out)
    assert not reseeded.equals(original)
    # a different draw of the same world, not a different world
    assert abs(reseeded.height - original.height) < 0.05 * original.height


def test_later_days_do_not_change_earlier_ones(tiny, tmp_path):
    """Nothing in a day depends on later days: a shorter run is a byte-identical prefix of a longer one
    (the CTR calibration looks at the first 4 days, so both runs must have at least 4)."""
    config, out, _ = tiny
    assert config.days > 4
    shorter = generate(tiny_config(days=4), tmp_path / "short", progress=False)
    for path in shorter.files:
        assert path.read_bytes() == (out / path.relative_to(tmp_path / "short")).read_bytes()


# --- the raw-log contract ------------------------------------------------------------------------------


def test_every_file_has_exactly_the_contract_schema(tiny):
    config, _, summary = tiny
    expected = dict(RAW_SCHEMA) | {f"ctx_{j:02d}": pa.int64() for j in range(config.extra_sparse_features)}
    assert config.extra_sparse_features > 0
    for path in summary.files:
        schema = pq.read_schema(path)
        assert dict(zip(schema.names, schema.types, strict=True)) == expected, path


def test_files_are_hive_partitioned_by_day_with_timestamps_inside_their_day(tiny):
    config, out, summary = tiny
    start = dt.date.fromisoformat(config.start_date)
    days = [(start + dt.timedelta(days=d)).isoformat() for d in range(config.days)]
    assert sorted(p.name for p in out.iterdir()) == [f"day={d}" for d in days]
    assert sorted(summary.files) == [out / f"day={d}" / "part-00000.parquet" for d in days]

    log = pl.scan_parquet(out, hive_partitioning=True).collect()
    day_start = log["day"].cast(pl.Date).cast(pl.Datetime("ms")).dt.epoch("s")
    offset = log["ts"] - day_start
    assert offset.min() >= 0 and offset.max() < DAY
    assert (log["hour"] == offset // 3600).all()


def test_values_are_in_range_and_summary_matches_the_files(tiny):
    config, out, summary = tiny
    log = read_log(out)
    assert summary.rows == log.height and summary.clicks == log["label"].sum()
    assert set(log["label"].unique()) == {0, 1}
    assert set(log["scenario"].unique()) == set(config.scenarios) == set(SCENARIO_NAMES)
    for column, upper in [
        ("user_id", config.users),
        ("item_id", config.items),
        ("item_cat", config.categories),
        ("brand", config.brands),
        ("user_segment", config.user_segments),
        ("price_bucket", config.price_buckets),
    ] + [(f"ctx_{j:02d}", config.extra_sparse_cardinality) for j in range(config.extra_sparse_features)]:
        assert 0 <= log[column].min() and log[column].max() < upper, column
    assert (log["price"] > 0).all() and (log["user_activity"] > 0).all()
    # side features are attributes of the item / user, not of the impression
    for key, attributes in [("item_id", ["item_cat", "brand", "price_bucket", "price"]), ("user_id", ["user_segment"])]:
        assert log.group_by(key).agg(pl.col(attributes).n_unique()).select(pl.col(attributes).max()).row(0) == (
            1,
        ) * len(attributes)

    per_scenario = log.group_by("scenario").agg(rows=pl.len(), clicks=pl.col("label").sum())
    for name, rows, clicks in per_scenario.iter_rows():
        assert (summary.scenarios[name].rows, summary.scenarios[name].clicks) == (rows, clicks)
    table = summary.table()
    assert all(name in table for name in config.scenarios) and f"{summary.rows:,}" in table


def test_large_user_counts_are_split_into_several_parts_per_day(tmp_path):
    config = tiny_config(users_per_chunk=600, days=2)
    summary, log = run(config, tmp_path / "out")
    day_dir = summary.files[0].parent
    assert sorted(p.name for p in day_dir.iterdir()) == [f"part-{i:05d}.parquet" for i in range(4)]
    # a user lives in exactly one part of a day
    parts = pl.concat(
        [pl.read_parquet(f, columns=["user_id"]).unique().with_columns(part=pl.lit(str(f))) for f in summary.files]
    )
    assert parts.group_by("user_id").agg(pl.col("part").n_unique())["part"].max() == config.days
    assert log.height == summary.rows


# --- the world: traffic, CTR, exposure, interest ---------------------------------------------------------


def test_traffic_shares_follow_the_config(measured):
    _, log = measured
    config = measure_config()
    shares = dict(log.group_by("scenario").agg(pl.len() / log.height).iter_rows())
    for name, target in zip(config.scenarios, config.scenario_shares, strict=True):
        assert shares[name] == pytest.approx(target, abs=0.015), name


def test_ctr_differs_by_scenario_as_configured(measured):
    _, log = measured
    config = measure_config()
    ctr = dict(log.group_by("scenario").agg(pl.col("label").mean()).iter_rows())
    for name, target in zip(config.scenarios, config.scenario_ctr, strict=True):
        assert ctr[name] == pytest.approx(target, rel=0.2), name
    by_target = [n for _, n in sorted(zip(config.scenario_ctr, config.scenarios, strict=True))]
    assert sorted(config.scenarios, key=ctr.__getitem__) == by_target


def test_exposure_is_long_tailed_and_partly_interest_driven(tmp_path):
    def exposure(interest_exposure: float) -> tuple[float, float]:
        _, log = run(tiny_config(interest_exposure=[interest_exposure] * 5), tmp_path / str(interest_exposure))
        per_item = log.group_by("item_id").len()["len"].sort(descending=True)
        top_decile_share = per_item.head(per_item.len() // 10).sum() / log.height
        per_user = (
            log.group_by("user_id", "item_cat")
            .len()
            .group_by("user_id")
            .agg(top=pl.col("len").max() / pl.col("len").sum(), n=pl.col("len").sum())
            .filter(pl.col("n") >= 10)
        )
        return top_decile_share, per_user["top"].mean()

    popular_tail, popular_focus = exposure(0.0)
    interest_tail, interest_focus = exposure(1.0)
    assert popular_tail > 0.4 and interest_tail > 0.4  # a tenth of the items gets >40% of impressions (Zipf)
    assert interest_focus > popular_focus + 0.05  # interest-driven slots concentrate a user's categories


def test_interest_sharing_makes_clicked_categories_agree_across_scenarios(tmp_path):
    def agreement(sharing: float) -> float:
        """Share of a user's non-home clicks on a category they also clicked in home."""
        _, log = run(measure_config(interest_sharing=sharing, transfer_strength=0.0), tmp_path / str(sharing))
        clicks = log.filter(pl.col("label") == 1)
        home = clicks.filter(pl.col("scenario") == "home").select("user_id", "item_cat").unique()
        other = clicks.filter((pl.col("scenario") != "home") & pl.col("user_id").is_in(home["user_id"].implode()))
        return other.join(home.with_columns(also_home=pl.lit(True)), on=["user_id", "item_cat"], how="left")[
            "also_home"
        ].fill_null(False).mean()

    assert agreement(1.0) > agreement(0.0) + 0.15


# --- the interest-transfer signal ----------------------------------------------------------------------


def cross_scenario_lift(log: pl.DataFrame, window_s: int = DAY) -> tuple[float, int]:
    """CTR gap between impressions whose category the user clicked in *another* scenario within `window_s`
    before, and the other impressions of the same (user, category, scenario).

    Comparing inside (user, category, scenario) strata removes the user's standing interest in the category
    (which alone would make clicked categories look "hotter"): a Mantel-Haenszel risk difference, zero in
    expectation when earlier clicks do not change later ones. Returns (gap, flagged impressions)."""
    log = log.with_row_index("row")
    clicks = log.filter(pl.col("label") == 1).select(
        "user_id", "item_cat", click_scenario=pl.col("scenario"), click_ts=pl.col("ts")
    )
    flagged = (
        log.select("row", "user_id", "item_cat", "scenario", "ts")
        .join(clicks, on=["user_id", "item_cat"])
        .filter(
            (pl.col("click_ts") < pl.col("ts"))
            & (pl.col("ts") - pl.col("click_ts") <= window_s)
            & (pl.col("click_scenario") != pl.col("scenario"))
        )["row"]
        .unique()
    )
    log = log.with_columns(flag=pl.col("row").is_in(flagged.implode()))
    strata = (
        log.group_by("user_id", "item_cat", "scenario")
        .agg(
            n_f=pl.col("flag").sum(),
            n_u=(~pl.col("flag")).sum(),
            c_f=pl.col("label").filter(pl.col("flag")).sum(),
            c_u=pl.col("label").filter(~pl.col("flag")).sum(),
        )
        .filter((pl.col("n_f") > 0) & (pl.col("n_u") > 0))
        .with_columns(w=pl.col("n_f") * pl.col("n_u") / (pl.col("n_f") + pl.col("n_u")))
    )
    gap = strata.select(
        ((pl.col("c_f") / pl.col("n_f") - pl.col("c_u") / pl.col("n_u")) * pl.col("w")).sum() / pl.col("w").sum()
    ).item()
    return gap, flagged.len()


def test_a_recent_click_in_another_scenario_lifts_that_category(tmp_path):
    with_transfer, flagged = cross_scenario_lift(run(measure_config(transfer_strength=1.5), tmp_path / "on")[1])
    without, _ = cross_scenario_lift(run(measure_config(transfer_strength=0.0), tmp_path / "off")[1])
    assert flagged > 5000  # enough impressions for the gap to be measured
    assert with_transfer > 0.04
    assert abs(without) < 0.015


def test_transfer_matrix_controls_which_scenarios_transfer(tmp_path):
    same_scenario_only = [[1.0 if s == t else 0.0 for t in range(5)] for s in range(5)]
    gap, _ = cross_scenario_lift(
        run(measure_config(transfer_strength=1.5, transfer_matrix=same_scenario_only), tmp_path / "out")[1]
    )
    assert abs(gap) < 0.015


# --- bad input -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("users", -5),
        ("users", "many"),
        ("scenario_shares", [0.5, 0.5, 0.5, 0.5, 0.5]),
        ("scenario_shares", [0.5, 0.5]),
        ("scenario_ctr", [0.05, 0.05, 0.05, 0.05, 1.5]),
        ("interest_sharing", 1.2),
        ("transfer_strength", -1.0),
        ("transfer_matrix", [[1.0, 0.5], [0.5, 1.0]]),
        ("start_date", "yesterday"),
        ("page_size", 0),
        ("userz", 10),
    ],
)
def test_bad_config_values_raise_config_error_naming_the_key(tmp_path, key, value):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"generate": {"users": 100, "items": 50, "categories": 5, key: value}}))
    with pytest.raises(ConfigError, match=key):
        load_config(path, GeneratorConfig, section="generate")


def test_refuses_a_non_empty_output_directory_unless_overwriting_a_previous_output(tmp_path):
    out = tmp_path / "out"
    generate(tiny_config(days=3), out, progress=False)
    with pytest.raises(MsitError, match="holds an earlier output; pass --overwrite"):
        generate(tiny_config(days=2), out, progress=False)

    summary = generate(tiny_config(days=2), out, progress=False, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["day=2024-01-01", "day=2024-01-02"]
    assert read_log(out).height == summary.rows

    precious = out / "notes.txt"
    precious.write_text("keep me")
    with pytest.raises(MsitError, match="notes.txt"):
        generate(tiny_config(days=2), out, progress=False, overwrite=True)
    assert precious.read_text() == "keep me"
