"""Dataset adapters: public layouts → raw-log contract, checked against independent reads of the files.

Oracles are the csv module over the same files and values read off the files by hand; tests that need
`../shared/data` take the `shared_data` fixture (skipped with a reason when the folder is absent), and the
bad-input tests write their own tiny CSVs.
"""

from __future__ import annotations

import csv
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from msit_rec.config import load_config
from msit_rec.errors import ConfigError, DataError, SchemaError
from pipelines.adapters import ADAPTERS
from pipelines.adapters.ali_ccp import read_ali_ccp
from pipelines.adapters.kuairand import read_kuairand
from pipelines.adapters.movielens import read_movielens
from pipelines.adapters.taobao import read_taobao
from pipelines.config import DatasetConfig, SourceConfig
from pipelines.source import read_source

REPO = Path(__file__).resolve().parents[1]
CONTRACT = ("user_id", "item_id", "scenario", "ts", "label")
TAOBAO_DIR = "fixtures/fuxictr_taobao_tiny"
ALI_CCP_DIR = "fixtures/swr_ali_ccp"
KUAIRAND_DIR = "fixtures/swr_kuairand"
MAY_6_2017_UTC = 1494028800  # 2017-05-06 00:00:00 UTC: 17292 days × 86400 s since 1970-01-01


def csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def source(path: Path, adapter: str, **options: Any) -> SourceConfig:
    return SourceConfig(path=str(path), adapter=adapter, options=options)


def check_contract(frame: pl.DataFrame, scenario_dtype: pl.DataType) -> None:
    schema = frame.schema
    assert list(frame.columns[:5]) == list(CONTRACT)
    assert schema["user_id"] == pl.Int64 and schema["item_id"] == pl.Int64
    assert schema["scenario"] == scenario_dtype
    assert schema["ts"] == pl.Int64
    assert schema["label"].is_integer() and set(frame["label"].unique().to_list()) <= {0, 1}


def test_registry_names_every_layout_and_source_dispatches(shared_data: Path) -> None:
    assert ADAPTERS == {
        "movielens": read_movielens,
        "taobao": read_taobao,
        "ali_ccp": read_ali_ccp,
        "kuairand": read_kuairand,
    }
    via_source = read_source(source(shared_data / ALI_CCP_DIR, "ali_ccp")).collect()
    assert via_source.equals(read_ali_ccp(source(shared_data / ALI_CCP_DIR, "ali_ccp")).collect())


# ---------------------------------------------------------------- MovieLens


@pytest.fixture(scope="module")
def movielens(shared_data: Path) -> pl.DataFrame:
    return read_movielens(source(shared_data / "ml-latest-small", "movielens")).collect()


def test_movielens_popularity_shelves_come_from_the_early_period_only(shared_data: Path) -> None:
    """head / torso / tail from rating counts of the earliest 80 % (by time), recomputed by hand: a movie's shelf
    never depends on ratings after that period, and the rating column is passed through for feedback."""
    config = source(shared_data / "ml-latest-small", "movielens")
    config.options = {"scenario_by": "popularity"}
    shelves = read_movielens(config).collect()
    ratings = pl.read_csv(shared_data / "ml-latest-small" / "ratings.csv")
    cutoff = ratings["timestamp"].quantile(0.8, interpolation="lower")
    counts = (ratings.filter(pl.col("timestamp") <= cutoff).group_by("movieId").len()
              .sort(["len", "movieId"], descending=[True, False]))
    share = (counts["len"].cum_sum() / counts["len"].sum()).to_list()
    expected = {m: "head" if s <= 1 / 3 else "torso" if s <= 2 / 3 else "tail" for m, s in zip(counts["movieId"], share)}
    got = dict(zip(shelves["item_id"].to_list(), shelves["scenario"].to_list()))
    assert all(got[m] == expected.get(m, "tail") for m in got)
    assert shelves["rating"].to_list() == ratings["rating"].to_list()


def test_movielens_session_context_is_known_when_the_rating_happens(tmp_path: Path) -> None:
    """scenario_by: session, by hand: the user's first session is onboarding; a later session's first `binge_after`
    ratings are visits, the rest binge; a pause over `session_gap_s` starts a session; rows keep the file's order."""
    root = tmp_path / "ml"
    write_csv(root / "movies.csv", ["movieId", "title", "genres"], [[m, f"M{m} (1999)", "Drama"] for m in (1, 2, 3, 4, 5)])
    rows = [  # user, movie, rating, ts, expected scenario (file order shuffled on purpose)
        (1, 3, 4.0, 10_000, "visit"),  # 9,900 s after the last onboarding rating: session 2, position 0
        (1, 1, 5.0, 0, "onboarding"),
        (2, 1, 2.0, 50_000, "onboarding"),  # user 2's only session
        (1, 2, 3.0, 100, "onboarding"),  # 100 s later: still the first session
        (1, 5, 1.0, 10_200, "binge"),  # position 2 of session 2, binge_after = 2
        (1, 4, 4.5, 10_100, "visit"),
        (1, 1, 4.0, 20_000, "visit"),  # 9,800 s pause: session 3, position 0
    ]
    write_csv(root / "ratings.csv", ["userId", "movieId", "rating", "timestamp"], [list(r[:4]) for r in rows])
    frame = read_movielens(source(root, "movielens", scenario_by="session", session_gap_s=3600, binge_after=2)).collect()
    assert frame["scenario"].to_list() == [r[4] for r in rows]
    assert frame["ts"].to_list() == [r[3] for r in rows]


def test_movielens_contract_and_row_count(movielens: pl.DataFrame, shared_data: Path) -> None:
    check_contract(movielens, pl.String)
    ratings = csv_rows(shared_data / "ml-latest-small" / "ratings.csv")
    assert len(movielens) == len(ratings) == 100_836
    assert movielens.schema["genre"] == pl.String and movielens.schema["decade"] == pl.Int64
    # same rows in file order, and label = rating >= 4 on every row
    assert movielens["user_id"].to_list() == [int(r["userId"]) for r in ratings]
    assert movielens["item_id"].to_list() == [int(r["movieId"]) for r in ratings]
    assert movielens["ts"].to_list() == [int(r["timestamp"]) for r in ratings]
    assert movielens["label"].to_list() == [int(float(r["rating"]) >= 4.0) for r in ratings]


def test_movielens_scenario_genre_and_decade_of_hand_checked_movies(movielens: pl.DataFrame) -> None:
    by_movie = movielens.unique("item_id").select("item_id", "scenario", "genre", "decade")
    got = {row[0]: row[1:] for row in by_movie.iter_rows()}
    assert got[1] == ("action", "Adventure", 1990)  # Toy Story (1995), Adventure|Animation|...
    assert got[3] == ("light", "Comedy", 1990)  # Grumpier Old Men (1995), Comedy|Romance
    assert got[47] == ("drama_other", "Mystery", 1990)  # Seven (1995), Mystery|Thriller: first genre decides
    assert got[260] == ("action", "Action", 1970)  # Star Wars IV (1977)
    assert got[1091] == ("light", "Comedy", 1980)  # Weekend at Bernie's (1989)
    assert got[122888] == ("drama_other", "(no genres listed)", 2010)  # Ben-hur (2016)
    assert set(movielens["scenario"].unique().to_list()) == {"action", "light", "drama_other"}


def test_movielens_labels_of_hand_checked_ratings(movielens: pl.DataFrame) -> None:
    user1 = movielens.filter(pl.col("user_id") == 1).select("item_id", "label", "ts")
    got = {item: (label, ts) for item, label, ts in user1.iter_rows()}
    assert got[1] == (1, 964982703)  # rating 4.0
    assert got[47] == (1, 964983815)  # rating 5.0
    assert got[70] == (0, 964982400)  # rating 3.0


def test_movielens_options_regroup_scenarios_and_threshold(shared_data: Path) -> None:
    frame = read_movielens(
        source(
            shared_data / "ml-latest-small",
            "movielens",
            rating_threshold=5.0,
            genre_groups={"mystery": ["Mystery"], "comedy": ["Comedy"]},
            other_scenario="rest",
        )
    ).collect()
    by_movie = dict(frame.unique("item_id").select("item_id", "scenario").iter_rows())
    assert (by_movie[47], by_movie[3], by_movie[1]) == ("mystery", "comedy", "rest")
    got = dict(frame.filter(pl.col("user_id") == 1).select("item_id", "label").iter_rows())
    assert (got[1], got[47]) == (0, 1)  # 4.0 is no longer a click, 5.0 still is


def write_movielens(root: Path, ratings: list[list[Any]], movies: list[list[Any]]) -> Path:
    write_csv(root / "ratings.csv", ["userId", "movieId", "rating", "timestamp"], ratings)
    write_csv(root / "movies.csv", ["movieId", "title", "genres"], movies)
    return root


def test_movielens_unknown_movie_gets_null_scenario_and_untitled_year_null_decade(tmp_path: Path) -> None:
    root = write_movielens(
        tmp_path, [[1, 10, 4.5, 100], [1, 99, 2.0, 200]], [[10, "Babylon 5", "Sci-Fi|Drama"]]
    )
    frame = read_movielens(source(root, "movielens")).collect()
    rows = frame.select("item_id", "scenario", "label", "decade").rows()
    assert rows == [(10, "action", 1, None), (99, None, 0, None)]


def test_movielens_bad_options_and_inputs(tmp_path: Path) -> None:
    root = write_movielens(tmp_path / "ok", [[1, 10, 4.5, 100]], [[10, "X (2001)", "Drama"]])
    with pytest.raises(ConfigError, match="rating_treshold"):
        read_movielens(source(root, "movielens", rating_treshold=4.0))
    with pytest.raises(ConfigError, match="genre_groups.*Drama"):
        read_movielens(source(root, "movielens", genre_groups={"a": ["Drama"], "b": ["Drama"]}))
    with pytest.raises(ConfigError, match="rating_threshold"):
        read_movielens(source(root, "movielens", rating_threshold="high"))
    (tmp_path / "no_movies").mkdir()
    (tmp_path / "no_movies" / "ratings.csv").write_bytes((root / "ratings.csv").read_bytes())
    with pytest.raises(DataError, match="movies.csv"):
        read_movielens(source(tmp_path / "no_movies", "movielens"))
    with pytest.raises(DataError, match="not a folder"):
        read_movielens(source(tmp_path / "absent", "movielens"))
    write_csv(tmp_path / "bad" / "ratings.csv", ["userId", "movieId", "timestamp"], [[1, 10, 100]])
    write_csv(tmp_path / "bad" / "movies.csv", ["movieId", "title", "genres"], [[10, "X", "Drama"]])
    with pytest.raises(SchemaError, match=r"ratings\.csv.*'rating'"):
        read_movielens(source(tmp_path / "bad", "movielens"))


# ---------------------------------------------------------------- Taobao


@pytest.fixture(scope="module")
def taobao(shared_data: Path) -> pl.DataFrame:
    return read_taobao(source(shared_data / TAOBAO_DIR, "taobao")).collect()


def test_taobao_contract_rows_and_columns(taobao: pl.DataFrame, shared_data: Path) -> None:
    check_contract(taobao, pl.String)
    train = csv_rows(shared_data / TAOBAO_DIR / "train_sample.csv")
    test = csv_rows(shared_data / TAOBAO_DIR / "test_sample.csv")
    everything = train + test
    assert len(taobao) == len(everything) == 200
    assert taobao["user_id"].to_list() == [int(r["userid"]) for r in everything]
    assert taobao["item_id"].to_list() == [int(r["adgroup_id"]) for r in everything]
    assert taobao["scenario"].to_list() == [r["pid"] for r in everything]
    assert set(taobao["scenario"].unique().to_list()) == {"430548_1007", "430539_1007"}
    assert taobao["label"].to_list() == [int(r["clk"]) for r in everything]
    assert taobao["brand"].to_list() == [int(r["brand"]) if r["brand"] else None for r in everything]
    assert taobao.schema["cate_id"] == pl.Int64 and taobao.schema["price"] == pl.Float64
    assert taobao["price"][0] == 3.9
    assert "clk" not in taobao.columns and "time_stamp" not in taobao.columns


def test_taobao_time_parse_by_hand(taobao: pl.DataFrame) -> None:
    # train file: rows 1-28 at 00:00:00, 29-61 at 00:00:01, 62-100 at 00:00:02 on 2017-05-06
    assert taobao["ts"][0] == MAY_6_2017_UTC
    assert taobao["ts"][28] == MAY_6_2017_UTC + 1
    assert taobao["ts"][99] == MAY_6_2017_UTC + 2
    assert taobao["ts"].min() == MAY_6_2017_UTC and taobao["ts"].max() == MAY_6_2017_UTC + 2


def test_taobao_click_sequence_kept_as_text(taobao: pl.DataFrame) -> None:
    assert taobao.schema["click_sequence"] == pl.String
    sequences = taobao["click_sequence"]
    assert sequences[0] == "170301^573514"
    assert sequences[1] == "680144"  # a one-item sequence stays text, not a number
    assert sequences[2] == "170301^573514^158525^633154^383937^431258"
    assert sequences[5] is None  # empty in the file


def test_taobao_split_carves_latest_train_rows_as_valid(taobao: pl.DataFrame) -> None:
    split = taobao["split"].to_list()
    # the train file is in time order, so its latest 10% (ceil(0.1 * 100)) are its last 10 rows
    assert split == ["train"] * 90 + ["valid"] * 10 + ["test"] * 100


def test_taobao_options(tmp_path: Path, shared_data: Path) -> None:
    root = shared_data / TAOBAO_DIR
    only_train = read_taobao(source(root, "taobao", files={"train": "train_sample.csv"}, valid_fraction=0.0)).collect()
    assert len(only_train) == 100 and set(only_train["split"].to_list()) == {"train"}
    explicit_valid = read_taobao(
        source(root, "taobao", files={"train": "train_sample.csv", "valid": "test_sample.csv"})
    ).collect()
    assert explicit_valid["split"].to_list() == ["train"] * 100 + ["valid"] * 100
    with pytest.raises(ConfigError, match="valid_fraction"):
        read_taobao(source(root, "taobao", valid_fraction=1.5))
    with pytest.raises(ConfigError, match="dev"):
        read_taobao(source(root, "taobao", files={"train": "train_sample.csv", "dev": "test_sample.csv"}))
    with pytest.raises(ConfigError, match="train"):
        read_taobao(source(root, "taobao", files={"test": "test_sample.csv"}))
    with pytest.raises(ConfigError, match="time_fmt"):
        read_taobao(source(root, "taobao", time_fmt="%s"))
    with pytest.raises(DataError, match="nope.csv"):
        read_taobao(source(root, "taobao", files={"train": "nope.csv"}))


def test_taobao_epoch_and_bad_times_and_mismatched_files(tmp_path: Path) -> None:
    header = ["clk", "time_stamp", "userid", "adgroup_id", "pid", "click_sequence"]
    write_csv(tmp_path / "train.csv", header, [[1, "1494028801", 7, 8, "p1", "8"], [0, "yesterday", 7, 9, "p1", ""]])
    frame = read_taobao(source(tmp_path, "taobao", files={"train": "train.csv"}, valid_fraction=0.0)).collect()
    assert frame["ts"].to_list() == [1494028801, None]  # epoch text taken as is; unparseable → null (rejected)
    write_csv(tmp_path / "test.csv", header[:-1], [[1, "1494028801", 7, 8, "p1"]])
    with pytest.raises(SchemaError, match=r"test\.csv.*click_sequence"):
        read_taobao(source(tmp_path, "taobao", files={"train": "train.csv", "test": "test.csv"}))
    write_csv(tmp_path / "nopid.csv", header[:4], [[1, "1494028801", 7, 8]])
    with pytest.raises(SchemaError, match=r"nopid\.csv.*'pid'"):
        read_taobao(source(tmp_path, "taobao", files={"train": "nopid.csv"}))


# ---------------------------------------------------------------- Ali-CCP


@pytest.fixture(scope="module")
def ali_ccp(shared_data: Path) -> pl.DataFrame:
    return read_ali_ccp(source(shared_data / ALI_CCP_DIR, "ali_ccp")).collect()


def ali_ccp_csv(shared_data: Path) -> list[dict[str, str]]:
    root = shared_data / ALI_CCP_DIR
    return [row for name in ("train", "val", "test") for row in csv_rows(root / f"ali_ccp_{name}.csv")]


def test_ali_ccp_contract_rows_split_and_row_order_time(ali_ccp: pl.DataFrame, shared_data: Path) -> None:
    check_contract(ali_ccp, pl.Int64)
    rows = ali_ccp_csv(shared_data)
    assert len(ali_ccp) == len(rows) == 200
    assert ali_ccp["split"].to_list() == ["train"] * 100 + ["valid"] * 50 + ["test"] * 50
    assert ali_ccp["ts"].to_list() == list(range(200))
    assert ali_ccp["user_id"].to_list() == [int(r["101"]) for r in rows]
    assert ali_ccp["item_id"].to_list() == [int(r["205"]) for r in rows]
    assert ali_ccp["scenario"].to_list() == [int(r["301"]) for r in rows]
    assert set(ali_ccp["scenario"].unique().to_list()) == {1, 2, 3}
    assert ali_ccp["label"].to_list() == [int(r["click"]) for r in rows]


def test_ali_ccp_fields_renamed_and_typed(ali_ccp: pl.DataFrame, shared_data: Path) -> None:
    rows = ali_ccp_csv(shared_data)
    assert not [name for name in ali_ccp.columns if name[0].isdigit()]
    assert "purchase" not in ali_ccp.columns and "click" not in ali_ccp.columns  # outcomes never become features
    assert ali_ccp["f206"].to_list() == [int(r["206"]) for r in rows]  # item category
    assert ali_ccp["f216"].to_list() == [int(r["216"]) for r in rows]  # brand
    assert ali_ccp["f109_14"].dtype == pl.Int64
    assert ali_ccp["D509"].dtype == pl.Float64  # "0" in the test file, "0.0" in train: one float column
    assert ali_ccp["D508"].to_list() == [float(r["D508"]) for r in rows]


def test_ali_ccp_purchase_label_and_bad_inputs(tmp_path: Path, shared_data: Path) -> None:
    root = shared_data / ALI_CCP_DIR
    purchase = read_ali_ccp(source(root, "ali_ccp", label="purchase")).collect()
    assert purchase["label"].to_list() == [int(r["purchase"]) for r in ali_ccp_csv(shared_data)]
    with pytest.raises(ConfigError, match="label"):
        read_ali_ccp(source(root, "ali_ccp", label="conversion"))
    with pytest.raises(ConfigError, match="lable"):
        read_ali_ccp(source(root, "ali_ccp", lable="click"))
    with pytest.raises(DataError, match="ali_ccp_dev.csv"):
        read_ali_ccp(source(root, "ali_ccp", files={"train": "ali_ccp_dev.csv"}))
    write_csv(tmp_path / "train.csv", ["click", "purchase", "101", "205"], [[0, 0, 1, 2]])
    with pytest.raises(SchemaError, match=r"train\.csv.*'301'"):
        read_ali_ccp(source(tmp_path, "ali_ccp", files={"train": "train.csv"}))


# ---------------------------------------------------------------- KuaiRand


@pytest.fixture(scope="module")
def kuairand(shared_data: Path) -> pl.DataFrame:
    return read_kuairand(source(shared_data / KUAIRAND_DIR, "kuairand")).collect()


def test_kuairand_contract_rows_and_row_order_time(kuairand: pl.DataFrame, shared_data: Path) -> None:
    check_contract(kuairand, pl.Int64)
    rows = csv_rows(shared_data / KUAIRAND_DIR / "kuairand_sample.csv")
    assert len(kuairand) == len(rows) == 200
    assert kuairand["user_id"].to_list() == [int(r["user_id"]) for r in rows]
    assert kuairand["item_id"].to_list() == [int(r["video_id"]) for r in rows]
    assert kuairand["scenario"].to_list() == [int(r["tab"]) for r in rows]
    assert kuairand["label"].to_list() == [int(r["is_click"]) for r in rows]
    assert kuairand["ts"].to_list() == list(range(200))  # no time column in the sample


def test_kuairand_side_features(kuairand: pl.DataFrame, shared_data: Path) -> None:
    rows = csv_rows(shared_data / KUAIRAND_DIR / "kuairand_sample.csv")
    for leaky in ("is_click", "play_time_ms", "profile_stay_time", "comment_stay_time", "video_id", "tab"):
        assert leaky not in kuairand.columns
    assert kuairand["onehot_feat4"].to_list() == [str(int(float(r["onehot_feat4"]))) for r in rows]  # "1.0" → "1"
    assert kuairand["user_active_degree"].to_list() == [r["user_active_degree"] for r in rows]
    assert kuairand["is_live_streamer"][1] == "-124"
    assert kuairand.schema["duration_ms"] == pl.Float64
    assert kuairand["follow_user_num"].to_list() == [float(r["follow_user_num"]) for r in rows]


def test_kuairand_time_columns_label_option_and_bad_inputs(tmp_path: Path) -> None:
    header = ["user_id", "video_id", "tab", "date", "hourmin", "is_click", "long_view", "user_active_degree"]
    rows = [[1, 2, 0, 20220408, 1930, 0, 1, "high_active"], [1, 3, 4, 20220409, 5, 1, 0, ""]]
    write_csv(tmp_path / "log.csv", header, rows)
    frame = read_kuairand(source(tmp_path, "kuairand", file="log.csv", label="long_view")).collect()
    expected_ts = [
        int(datetime(2022, 4, 8, 19, 30, tzinfo=UTC).timestamp()),
        int(datetime(2022, 4, 9, 0, 5, tzinfo=UTC).timestamp()),
    ]
    assert frame["ts"].to_list() == expected_ts
    assert frame["label"].to_list() == [1, 0]
    assert frame["user_active_degree"].to_list() == ["high_active", None]
    assert "is_click" not in frame.columns and "long_view" not in frame.columns

    write_csv(tmp_path / "ms.csv", ["user_id", "video_id", "tab", "time_ms", "is_click"], [[1, 2, 0, 1649446200123, 1]])
    assert read_kuairand(source(tmp_path, "kuairand", file="ms.csv")).collect()["ts"].to_list() == [1649446200]

    with pytest.raises(SchemaError, match="is_like"):
        read_kuairand(source(tmp_path, "kuairand", file="log.csv", label="is_like"))
    with pytest.raises(ConfigError, match="filename"):
        read_kuairand(source(tmp_path, "kuairand", filename="log.csv"))
    with pytest.raises(DataError, match="kuairand_sample.csv"):
        read_kuairand(source(tmp_path, "kuairand"))
    write_csv(tmp_path / "notab.csv", ["user_id", "video_id", "is_click"], [[1, 2, 0]])
    with pytest.raises(SchemaError, match=r"notab\.csv.*'tab'"):
        read_kuairand(source(tmp_path, "kuairand", file="notab.csv"))


# ---------------------------------------------------------------- end to end through `prepare`


def prepared(name: str, shared_dir: Path, out_dir: Path) -> tuple[Any, DatasetConfig]:
    from pipelines.prepare import prepare

    config = load_config(REPO / "configs" / "datasets" / f"{name}.yaml", DatasetConfig, section="dataset")
    config.source.path = str(shared_dir)
    return prepare(config, out_dir), config


def read_examples(out_dir: Path, meta: Any) -> pl.DataFrame:
    return pl.concat([pl.read_parquet(out_dir / f) for split in meta.splits.values() for f in split.files])


def check_conservation(out_dir: Path, expected_rows: int) -> dict[str, Any]:
    saved = json.loads((out_dir / "dataset.json").read_text())
    rows_out = sum(split["rows"] for split in saved["splits"].values())
    assert saved["rows_in"] == expected_rows
    assert rows_out + sum(saved["rejects"].values()) == expected_rows
    return saved


def test_prepare_movielens(shared_data: Path, tmp_path: Path) -> None:
    meta, _ = prepared("movielens", shared_data / "ml-latest-small", tmp_path)
    saved = check_conservation(tmp_path, 100_836)
    assert saved["scenarios"] == ["action", "light", "drama_other"]
    assert saved["rejects"] == {}
    examples = read_examples(tmp_path, meta)
    assert examples["hist_len"].max() == 50 and (examples["hist_len"] > 0).mean() > 0.9


def test_prepare_taobao_encodes_click_sequence(shared_data: Path, tmp_path: Path) -> None:
    meta, _ = prepared("taobao", shared_data / TAOBAO_DIR, tmp_path)
    saved = check_conservation(tmp_path, 200)
    assert saved["scenarios"] == ["430548_1007", "430539_1007"]
    assert {name: split["rows"] for name, split in saved["splits"].items()} == {"train": 90, "valid": 10, "test": 100}
    vocab = dict(pl.read_parquet(tmp_path / "vocab" / "item.parquet").select("raw", "index").iter_rows())
    users = dict(pl.read_parquet(tmp_path / "vocab" / "user.parquet").select("raw", "index").iter_rows())
    train = pl.concat([pl.read_parquet(tmp_path / f) for f in meta.splits["train"].files])
    # train file line 4: user 626053, ad 513129, pid 430539_1007, 6-item click_sequence
    row = train.filter((pl.col("user") == users[626053]) & (pl.col("item") == vocab[513129]))
    assert len(row) == 1 and row["hist_len"][0] == 6
    sequence = [170301, 573514, 158525, 633154, 383937, 431258]
    assert row["hist_item"][0].to_list() == [vocab.get(item, 1) for item in sequence]
    assert row["hist_scenario"][0].to_list() == [1] * 6  # precomputed events take the example's scenario
    empty = train.filter((pl.col("user") == users[626053]) & (pl.col("item") == vocab[722867]))
    assert empty["hist_len"].to_list() == [0]  # train file line 11: empty click_sequence


def test_prepare_ali_ccp(shared_data: Path, tmp_path: Path) -> None:
    meta, _ = prepared("ali_ccp", shared_data / ALI_CCP_DIR, tmp_path)
    saved = check_conservation(tmp_path, 200)
    assert saved["scenarios"] == ["1", "2", "3"]
    assert {name: split["rows"] for name, split in saved["splits"].items()} == {"train": 100, "valid": 50, "test": 50}
    # every fixture row has user 1, so from the second click on every later row has a history
    assert read_examples(tmp_path, meta)["hist_len"].max() > 0


def test_prepare_kuairand(shared_data: Path, tmp_path: Path) -> None:
    meta, _ = prepared("kuairand", shared_data / KUAIRAND_DIR, tmp_path)
    saved = check_conservation(tmp_path, 200)
    assert saved["scenarios"] == ["1"]  # the sample holds one tab
    assert "onehot_feat4" in {f["name"] for f in saved["features"]}
    assert read_examples(tmp_path, meta)["hist_len"].sum() > 0
