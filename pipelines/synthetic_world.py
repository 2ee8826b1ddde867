"""The static part of the synthetic world: users, items, their latent interests and side features.

Built once from the config and a seeded generator; the day-by-day simulation (synthetic_simulate.py) only
reads it. Memory is O(users × scenarios × (latent_dim + interest_categories) + items × latent_dim): the
per-user arrays dominate, 4·S·d + 2·S·k + 4·S + 16 bytes per user (≈ 250 bytes with the defaults).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipelines.synthetic_config import GeneratorConfig

# Share of a day's requests per hour (UTC): quiet nights, a lunch bump, an evening peak.
DIURNAL_PROFILE = np.array(
    [1.0, 0.6, 0.4, 0.3, 0.3, 0.4, 0.8, 1.5, 2.2, 2.5, 2.6, 2.8]  # 00-11 h
    + [3.2, 3.0, 2.7, 2.6, 2.7, 3.0, 3.4, 3.9, 4.3, 4.2, 3.3, 2.0]  # 12-23 h
)
CATEGORY_SIZE_EXPONENT = 0.6  # category sizes are mildly Zipf-like
LOG_PRICE_MEAN, LOG_PRICE_CATEGORY_STD, LOG_PRICE_ITEM_STD = 3.0, 0.8, 0.4


@dataclass
class Catalogue:
    """Items: side features, latent vectors and the exposure distribution.

    Exposure is two-level so that drawing an item costs O(1): a category by its share of the catalogue, then a
    rank inside it from a continuous Zipf law (`zipf_rank`); `by_category` lists each category's items from most
    to least exposed (item ids are a random permutation, so an id says nothing about popularity).
    """

    category: np.ndarray  # [I] int32
    brand: np.ndarray  # [I] int32
    price: np.ndarray  # [I] float32
    price_bucket: np.ndarray  # [I] int32
    log_price_z: np.ndarray  # [I] float32, standardised log-price
    quality: np.ndarray  # [I] float32, logit offset (brand effect)
    vector: np.ndarray  # [I, d] float32
    category_vector: np.ndarray  # [C, d] float32, the centre of each category's items
    category_cdf: np.ndarray  # [C] float64, cumulative exposure share of the categories (∝ their size)
    by_category: np.ndarray  # [I] int32, item ids grouped by category, each group in popularity order
    category_start: np.ndarray  # [C] int64, first position of each category in `by_category`
    category_size: np.ndarray  # [C] int64


@dataclass
class Population:
    """Users: side features, activity, scenario habits and per-scenario interest vectors."""

    segment: np.ndarray  # [U] int32
    activity: np.ndarray  # [U] float32, mean 1 (lognormal)
    active_probability: np.ndarray  # [U] float32, chance to show up on a day
    extra_requests: np.ndarray  # [U] float32, Poisson mean of requests beyond the first on an active day
    scenario_cdf: np.ndarray  # [U, S] float32, cumulative scenario mix (last column exactly 1)
    interest: np.ndarray  # [U, S, d] float32, shared interest blended with a scenario-specific deviation
    favourite_categories: np.ndarray  # [U, S, k] int16/int32, where interest-driven exposure draws from
    segment_price_slope: np.ndarray  # [G] float32


@dataclass
class World:
    config: GeneratorConfig
    items: Catalogue
    users: Population
    scenario_bias: np.ndarray  # [S] float32 logit offsets (set by calibration to hit scenario_ctr)
    interest_exposure: np.ndarray  # [S] float32
    transfer: np.ndarray  # [S, S] float32, transfer[s, t]: lift in scenario s from a click in scenario t
    hour_cdf: np.ndarray  # [24] float64


def build_world(config: GeneratorConfig, rng: np.random.Generator) -> World:
    """Draw the static world; scenario biases start at logit(scenario_ctr) until calibrated."""
    items = _build_catalogue(config, rng)
    users = _build_population(config, items.category_vector, rng)
    ctr = np.asarray(config.scenario_ctr, dtype=np.float64)
    transfer = np.ones((len(config.scenarios),) * 2) if config.transfer_matrix is None else config.transfer_matrix
    return World(
        config=config,
        items=items,
        users=users,
        scenario_bias=np.log(ctr / (1 - ctr)).astype(np.float32),
        interest_exposure=np.asarray(config.interest_exposure, dtype=np.float32),
        transfer=np.asarray(transfer, dtype=np.float32),
        hour_cdf=np.cumsum(DIURNAL_PROFILE) / DIURNAL_PROFILE.sum(),
    )


def _build_catalogue(config: GeneratorConfig, rng: np.random.Generator) -> Catalogue:
    n_items, n_cats, d = config.items, config.categories, config.latent_dim
    cat_weight = 1.0 / np.arange(1, n_cats + 1) ** CATEGORY_SIZE_EXPONENT
    # every category gets one item, the rest follow the size distribution
    category_size = 1 + rng.multinomial(n_items - n_cats, cat_weight / cat_weight.sum())
    by_category = rng.permutation(n_items).astype(np.int32)
    category = np.empty(n_items, dtype=np.int32)
    category[by_category] = np.repeat(np.arange(n_cats, dtype=np.int32), category_size)

    brands_per_category = max(1, config.brands // n_cats)
    brand = (category.astype(np.int64) * config.brands) // n_cats + rng.integers(0, brands_per_category, n_items)
    brand = (brand % config.brands).astype(np.int32)
    quality = rng.normal(0.0, config.brand_effect_std, config.brands).astype(np.float32)[brand]

    category_log_price = rng.normal(LOG_PRICE_MEAN, LOG_PRICE_CATEGORY_STD, n_cats)
    log_price = category_log_price[category] + rng.normal(0.0, LOG_PRICE_ITEM_STD, n_items)
    edges = np.quantile(log_price, np.linspace(0, 1, config.price_buckets + 1)[1:-1])
    price_bucket = np.searchsorted(edges, log_price, side="right").astype(np.int32)
    log_price_z = ((log_price - log_price.mean()) / max(log_price.std(), 1e-9)).astype(np.float32)

    # unit-variance latent space: an item is its category's centre plus item_noise of its own
    scale = 1.0 / np.sqrt(1.0 + config.item_noise**2)
    category_vector = rng.standard_normal((n_cats, d)) * scale
    vector = category_vector[category] + rng.standard_normal((n_items, d)) * (config.item_noise * scale)

    category_cdf = np.cumsum(category_size) / n_items
    category_cdf[-1] = 1.0
    return Catalogue(
        category=category,
        brand=brand,
        price=np.exp(log_price).astype(np.float32),
        price_bucket=price_bucket,
        log_price_z=log_price_z,
        quality=quality,
        vector=vector.astype(np.float32),
        category_vector=category_vector.astype(np.float32),
        category_cdf=category_cdf,
        by_category=by_category,
        category_start=np.cumsum(category_size) - category_size,
        category_size=category_size,
    )


def zipf_rank(uniform: np.ndarray, size: np.ndarray, exponent: float) -> np.ndarray:
    """Ranks in [0, size) with P(rank ≥ r) following a continuous Zipf law x^-exponent on [1, size+1)
    (inverse CDF, so one draw costs O(1) whatever the catalogue size)."""
    top = size + 1.0
    if abs(exponent - 1.0) < 1e-9:
        x = top**uniform
    else:
        e = 1.0 - exponent
        x = (1.0 + uniform * (top**e - 1.0)) ** (1.0 / e)
    return np.minimum(x.astype(np.int64) - 1, size - 1)


def _favourite_categories(
    interest: np.ndarray, category_vector: np.ndarray, k: int, block: int = 16_384
) -> np.ndarray:
    """The k categories closest to each user's interest in each scenario [U, S, k], closest first.

    What an interest-aware recommender would retrieve. Computed in blocks of users to bound memory, by k rounds
    of argmax (much faster than argpartition over short rows)."""
    n_users, n_scen, _ = interest.shape
    n_cats = category_vector.shape[0]
    out = np.empty((n_users, n_scen, k), dtype=np.int16 if n_cats <= np.iinfo(np.int16).max else np.int32)
    for lo in range(0, n_users, block):
        score = interest[lo : lo + block] @ category_vector.T  # [b, S, C]
        for j in range(k):
            best = score.argmax(axis=2)  # [b, S]
            out[lo : lo + block, :, j] = best
            np.put_along_axis(score, best[..., None], -np.inf, axis=2)
    return out


def _build_population(config: GeneratorConfig, category_vector: np.ndarray, rng: np.random.Generator) -> Population:
    n_users, n_scen, d = config.users, len(config.scenarios), config.latent_dim
    segment = rng.integers(0, config.user_segments, n_users).astype(np.int32)

    sigma = config.activity_sigma
    activity = np.exp(rng.normal(-0.5 * sigma**2, sigma, n_users))  # mean 1
    presence = np.sqrt(activity) / np.sqrt(activity).mean()  # heavy users show up more often and stay longer
    active_probability = np.clip(config.daily_active_fraction * presence, 0.0, 1.0)
    extra_requests = (config.impressions_per_user_day / config.page_size - 1.0) * presence

    alpha = config.user_scenario_concentration * np.asarray(config.scenario_shares, dtype=np.float64)
    scenario_cdf = np.cumsum(rng.dirichlet(alpha, size=n_users), axis=1)
    scenario_cdf[:, -1] = 1.0

    # interest = segment part + personal part (shared across scenarios), then blended with a per-scenario deviation;
    # every stage keeps unit variance per dimension, and the 1/sqrt(d) makes user·item affinities unit-variance
    segment_centre = rng.standard_normal((config.user_segments, d))
    personal = rng.standard_normal((n_users, d))
    by_segment = config.segment_interest
    shared = np.sqrt(by_segment) * segment_centre[segment] + np.sqrt(1.0 - by_segment) * personal  # [U, d]
    rho = config.interest_sharing
    interest = rng.standard_normal((n_users, n_scen, d), dtype=np.float32)  # the scenario-specific deviation
    interest *= np.float32(np.sqrt(1.0 - rho))
    interest += np.float32(np.sqrt(rho)) * shared[:, None, :].astype(np.float32)
    interest *= np.float32(1.0 / np.sqrt(d))  # [U, S, d]

    slope = -config.price_sensitivity * rng.normal(1.0, 1.0, config.user_segments)
    return Population(
        segment=segment,
        activity=activity.astype(np.float32),
        active_probability=active_probability.astype(np.float32),
        extra_requests=extra_requests.astype(np.float32),
        scenario_cdf=scenario_cdf.astype(np.float32),
        interest=interest,
        favourite_categories=_favourite_categories(interest, category_vector, config.interest_categories),
        segment_price_slope=slope.astype(np.float32),
    )
