"""Knobs of the synthetic multi-scenario world (`msit-rec generate`), validated on load.

Every number that shapes the ground truth lives here, so a test or benchmark can state what a model should
find in the data (how much interest is shared across scenarios, how strongly a click in one scenario lifts
the same category in another) by reading the config alone.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field

SCENARIO_NAMES: tuple[str, ...] = ("home", "search", "detail", "channel", "new")
DEFAULT_SHARES: tuple[float, ...] = (0.50, 0.25, 0.13, 0.08, 0.04)
DEFAULT_CTR: tuple[float, ...] = (0.04, 0.07, 0.06, 0.05, 0.08)
DEFAULT_INTEREST_EXPOSURE: tuple[float, ...] = (0.25, 0.6, 0.45, 0.3, 0.15)
MAX_SCENARIOS = 127  # the recent-click state keeps scenario ids as int8
SHARE_SUM_TOLERANCE = 1e-3


@dataclass
class GeneratorConfig:
    """The synthetic world. Section `generate` of a YAML file (see configs/generate/synthetic.yaml)."""

    seed: int = 0
    # --- population and catalogue
    users: int = 100_000
    items: int = 50_000
    categories: int = 100
    brands: int = 2_000
    user_segments: int = 8
    price_buckets: int = 10
    # --- scenarios: names, traffic share of impressions, target CTR, share of interest-driven candidates
    scenarios: list[str] = field(default_factory=lambda: list(SCENARIO_NAMES))
    scenario_shares: list[float] = field(default_factory=lambda: list(DEFAULT_SHARES))
    scenario_ctr: list[float] = field(default_factory=lambda: list(DEFAULT_CTR))
    interest_exposure: list[float] = field(default_factory=lambda: list(DEFAULT_INTEREST_EXPOSURE))
    user_scenario_concentration: float = 4.0  # Dirichlet concentration of each user's scenario mix (∞ = all alike)
    # --- time and traffic
    days: int = 14
    start_date: str = "2024-01-01"  # UTC, ISO date
    daily_active_fraction: float = 0.5  # mean chance a user shows up on a given day
    impressions_per_user_day: float = 12.0  # mean over active users
    page_size: int = 4  # impressions per request; a page shares its timestamp
    activity_sigma: float = 0.8  # lognormal spread of user activity (drives both presence and volume)
    # --- exposure and interest
    popularity_exponent: float = 1.1  # Zipf exponent of item exposure
    latent_dim: int = 8
    interest_sharing: float = 0.7  # 1 = one interest for all scenarios, 0 = independent interest per scenario
    interest_strength: float = 1.5  # logit weight of user-interest × item affinity
    segment_interest: float = 0.5  # fraction of interest variance explained by the user segment
    item_noise: float = 0.6  # spread of an item's latent vector around its category's
    interest_categories: int = 5  # interest-driven slots show one of the user's top-k categories in the scenario
    brand_effect_std: float = 0.3
    price_sensitivity: float = 0.3  # per-segment logit slope on standardised log-price (sign varies by segment)
    # --- interest transfer: recent clicks lift the same category, in every scenario
    transfer_strength: float = 1.0  # logit lift of a just-clicked category (fully transferring scenario pair)
    transfer_half_life_hours: float = 24.0
    transfer_memory: int = 8  # recent clicks remembered per user
    # transfer_matrix[s][t]: how much a click in scenario t lifts scenario s (None = 1 everywhere)
    transfer_matrix: list[list[float]] | None = None
    # --- extra context features ctx_00.. (even: per user, odd: per request), to reach a realistic feature count
    extra_sparse_features: int = 0
    extra_sparse_cardinality: int = 1_000
    # --- output
    users_per_chunk: int = 250_000  # users simulated at once: peak memory ∝ users_per_chunk × rows per user-day
    compression: str = "zstd"
    calibration_users: int = 4_000  # users in the pilot run that sets per-scenario biases to hit scenario_ctr

    def __post_init__(self) -> None:
        positive_ints = (
            "users", "items", "categories", "brands", "user_segments", "price_buckets", "days", "page_size",
            "latent_dim", "interest_categories", "transfer_memory", "extra_sparse_cardinality", "users_per_chunk",
            "calibration_users",
        )
        for name in positive_ints:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.extra_sparse_features < 0:
            raise ValueError(f"extra_sparse_features must be >= 0, got {self.extra_sparse_features}")
        if self.categories > self.items:
            raise ValueError(f"categories ({self.categories}) must not exceed items ({self.items})")
        if self.interest_categories > self.categories:
            raise ValueError(
                f"interest_categories ({self.interest_categories}) must not exceed categories ({self.categories})"
            )
        self._check_scenarios()
        for name in ("interest_sharing", "segment_interest"):
            _check_range(name, getattr(self, name), 0.0, 1.0)
        _check_range("daily_active_fraction", self.daily_active_fraction, 0.0, 1.0, low_open=True)
        positive_floats = (
            "impressions_per_user_day", "user_scenario_concentration", "transfer_half_life_hours",
            "popularity_exponent",
        )
        for name in positive_floats:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        non_negative = (
            "activity_sigma", "interest_strength", "item_noise", "brand_effect_std",
            "price_sensitivity", "transfer_strength",
        )
        for name in non_negative:
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.impressions_per_user_day < self.page_size:
            raise ValueError(
                f"impressions_per_user_day ({self.impressions_per_user_day}) must be >= page_size ({self.page_size})"
            )
        try:
            dt.date.fromisoformat(self.start_date)
        except ValueError:
            raise ValueError(f"start_date must be an ISO date like 2024-01-01, got {self.start_date!r}") from None
        if self.compression not in ("zstd", "snappy", "lz4", "none"):
            raise ValueError(f"compression must be one of zstd, snappy, lz4, none; got {self.compression!r}")

    def _check_scenarios(self) -> None:
        n = len(self.scenarios)
        if not 1 <= n <= MAX_SCENARIOS:
            raise ValueError(f"scenarios must list 1..{MAX_SCENARIOS} names, got {n}")
        if len(set(self.scenarios)) != n or not all(self.scenarios):
            raise ValueError(f"scenarios must be distinct non-empty names, got {self.scenarios}")
        for name in ("scenario_shares", "scenario_ctr", "interest_exposure"):
            values = getattr(self, name)
            if len(values) != n:
                raise ValueError(f"{name} needs one value per scenario ({n}), got {len(values)}")
        if any(not v > 0 for v in self.scenario_shares):
            raise ValueError(f"scenario_shares must all be > 0, got {self.scenario_shares}")
        if abs(math.fsum(self.scenario_shares) - 1.0) > SHARE_SUM_TOLERANCE:
            raise ValueError(f"scenario_shares must sum to 1, got {math.fsum(self.scenario_shares):.6g}")
        for ctr in self.scenario_ctr:
            _check_range("scenario_ctr", ctr, 0.0, 1.0, low_open=True, high_open=True)
        for share in self.interest_exposure:
            _check_range("interest_exposure", share, 0.0, 1.0)
        if self.transfer_matrix is not None:
            rows = self.transfer_matrix
            if len(rows) != n or any(len(r) != n for r in rows):
                raise ValueError(f"transfer_matrix must be {n}x{n} (one row and column per scenario)")
            if any(not v >= 0 for r in rows for v in r):
                raise ValueError("transfer_matrix entries must be >= 0")

    @property
    def start_epoch(self) -> int:
        """Epoch seconds of `start_date` 00:00 UTC."""
        day = dt.date.fromisoformat(self.start_date)
        return int(dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC).timestamp())


def _check_range(
    name: str, value: float, low: float, high: float, low_open: bool = False, high_open: bool = False
) -> None:
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if not (above and below):
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {value}")
