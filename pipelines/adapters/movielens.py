"""MovieLens (`ratings.csv` + `movies.csv`, the ml-latest / ml-20m+ layout) → raw-log contract.

MovieLens has no scenarios and no impressions, so both are derived:
- `label` = 1 when the rating is at least `rating_threshold` (a rating the user would have "clicked");
- `scenario`, a stand-in for "which shelf of the product showed the movie", by `scenario_by`:
  - `genre`: the group of the movie's *first* listed genre (`genre_groups`, everything else → `other_scenario`).
    A rating of a movie missing from movies.csv gets a null scenario, which `prepare` rejects;
  - `popularity`: the movie's popularity tier — `head`, `torso`, `tail`: the most rated movies that make up the
    first third of the ratings, the next third, the rest — counted over the earliest `popularity_period` of the
    ratings by time (0.8: the train period of the shipped 80/10/10 split), so the scenario of a later row says
    nothing the train period did not know; a movie first rated later is `tail`. Users cross these shelves as much as the genre groups (a user's
    main shelf holds 56 % of their ratings on average; 600 of 610 users rate on several), and the click rate
    differs far more between shelves (0.59 / 0.47 / 0.38) than between genre groups.

Output side features: `genre` (first genre, text), `decade` (release decade from the title's trailing `(YYYY)`,
int64, null when the title has none) and `rating` (float: the graded feedback `history.feedback: rating` puts in
each behaviour).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import polars as pl

from pipelines.adapters.csv_layout import as_float, as_int, layout_dir, load_options, scan_text_csv
from pipelines.config import SourceConfig

RATINGS_FILE = "ratings.csv"
MOVIES_FILE = "movies.csv"
RATING_COLUMNS = ("userId", "movieId", "rating", "timestamp")
MOVIE_COLUMNS = ("movieId", "title", "genres")
TITLE_YEAR = r"\((\d{4})\)\s*$"


def _default_genre_groups() -> dict[str, list[str]]:
    return {
        "action": ["Action", "Adventure", "Sci-Fi", "Thriller", "War", "Western", "Crime"],
        "light": ["Comedy", "Animation", "Children", "Musical", "Fantasy", "Romance"],
    }


@dataclass
class MovieLensOptions:
    rating_threshold: float = 4.0  # rating >= this is a click
    genre_groups: dict[str, list[str]] = field(default_factory=_default_genre_groups)  # scenario → first genres
    other_scenario: str = "drama_other"  # scenario of every first genre not listed in genre_groups
    scenario_by: Literal["genre", "popularity", "session"] = "genre"
    popularity_period: float = 0.8  # share of the ratings (earliest first) the popularity tiers are counted on
    session_gap_s: int = 3600  # `session`: a pause longer than this starts a new session of the user
    binge_after: int = 10  # `session`: ratings of a later session from this position on are `binge`

    def __post_init__(self) -> None:
        seen: dict[str, str] = {}
        for scenario, genres in self.genre_groups.items():
            for genre in genres:
                if genre in seen:
                    raise ValueError(f"genre_groups: genre '{genre}' is in both '{seen[genre]}' and '{scenario}'")
                seen[genre] = scenario

    def genre_to_scenario(self) -> dict[str, str]:
        return {genre: scenario for scenario, genres in self.genre_groups.items() for genre in genres}


def read_movielens(source: SourceConfig) -> pl.LazyFrame:
    """Ratings joined with their movie's first genre, as `user_id, item_id, scenario, ts, label, genre, decade`."""
    options = load_options(MovieLensOptions, source)
    root = layout_dir(source, f"MovieLens {RATINGS_FILE} and {MOVIES_FILE}")
    ratings = scan_text_csv(root / RATINGS_FILE, RATING_COLUMNS, "MovieLens ratings")
    movies = scan_text_csv(root / MOVIES_FILE, MOVIE_COLUMNS, "MovieLens movies")

    movie_features = movies.select(
        as_int("movieId").alias("item_id"),
        pl.col("genres").str.split("|").list.first().alias("genre"),
        (pl.col("title").str.extract(TITLE_YEAR, 1).cast(pl.Int64) // 10 * 10).alias("decade"),
    )
    rated = ratings.select(
        as_int("userId").alias("user_id"),
        as_int("movieId").alias("item_id"),
        as_int("timestamp").alias("ts"),
        (as_float("rating") >= options.rating_threshold).cast(pl.Int8).alias("label"),
        as_float("rating").alias("rating"),
    ).join(movie_features, on="item_id", how="left", maintain_order="left")
    if options.scenario_by == "popularity":
        with_scenario = _with_popularity_tier(rated, options.popularity_period)
    elif options.scenario_by == "session":
        with_scenario = _with_session_context(rated, options.session_gap_s, options.binge_after)
    else:
        with_scenario = rated.with_columns(_genre_group(options).alias("scenario"))
    return with_scenario.select("user_id", "item_id", "scenario", "ts", "label", "genre", "decade", "rating")


def _genre_group(options: MovieLensOptions) -> pl.Expr:
    return pl.when(pl.col("genre").is_not_null()).then(
        pl.col("genre").replace_strict(options.genre_to_scenario(), default=options.other_scenario)
    )


def _with_popularity_tier(rated: pl.LazyFrame, period: float) -> pl.LazyFrame:
    """`scenario` = head / torso / tail: the movie's place in the cumulative share of the ratings of the earliest
    `period` of the log, most rated first (ties by item id), cut at one and two thirds; movies unseen then: tail."""
    share = pl.col("n").cum_sum() / pl.col("n").sum()
    early = rated.filter(pl.col("ts") <= pl.col("ts").quantile(period, interpolation="lower"))
    tiers = (
        early.group_by("item_id").agg(pl.len().alias("n"))
        .sort(["n", "item_id"], descending=[True, False])
        .select("item_id", pl.when(share <= 1 / 3).then(pl.lit("head"))
                .when(share <= 2 / 3).then(pl.lit("torso")).otherwise(pl.lit("tail")).alias("scenario"))
    )
    joined = rated.join(tiers, on="item_id", how="left", maintain_order="left")
    return joined.with_columns(pl.col("scenario").fill_null(pl.lit("tail")))


def _with_session_context(rated: pl.LazyFrame, gap_s: int, binge_after: int) -> pl.LazyFrame:
    """`scenario` = where in the user's activity the rating happened, known when it happened (no future row read):
    `onboarding` (the user's first session), `visit` (the first `binge_after` ratings of a later session), `binge`
    (the rest of a later session). A session ends at a pause longer than `gap_s`. Rows keep the file's order."""
    by_user = rated.with_row_index("_row").sort(["user_id", "ts", "item_id"])
    session = (pl.col("ts").diff().over("user_id").fill_null(gap_s + 1) > gap_s).cum_sum().over("user_id")
    with_session = by_user.with_columns(session.alias("_session"))
    position = pl.int_range(pl.len()).over(["user_id", "_session"])
    scenario = (pl.when(pl.col("_session") == 1).then(pl.lit("onboarding"))
                .when(position < binge_after).then(pl.lit("visit")).otherwise(pl.lit("binge")))
    return with_session.with_columns(scenario.alias("scenario")).sort("_row").drop("_row", "_session")
