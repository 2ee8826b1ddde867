"""One day of one chunk of users: requests, exposure, clicks, and the recent-click state that carries interest
across scenarios.

Everything that does not depend on earlier clicks (who shows up, when, in which scenario, which items are
shown, the static click logit, the uniform draw behind each label) is drawn for the whole chunk at once.
Only the label needs time order: requests are processed in "ticks" — tick k holds the k-th request of every
user that has one — so each label sees exactly the clicks of that user's earlier requests, in any scenario.
Memory is O(rows of the chunk) for the arrays plus the state, O(users × transfer_memory).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipelines.synthetic_world import World, zipf_rank

SECONDS_PER_HOUR = 3600
NO_CATEGORY = -1  # empty slot of the recent-click state (never equals an item category)


@dataclass
class ClickState:
    """Each user's last `transfer_memory` clicks (category, scenario, time) as a ring buffer."""

    category: np.ndarray  # [U, K] int32
    scenario: np.ndarray  # [U, K] int8
    ts: np.ndarray  # [U, K] int64
    next_slot: np.ndarray  # [U] int64

    @classmethod
    def empty(cls, users: int, memory: int) -> ClickState:
        return cls(
            category=np.full((users, memory), NO_CATEGORY, dtype=np.int32),
            scenario=np.zeros((users, memory), dtype=np.int8),
            ts=np.zeros((users, memory), dtype=np.int64),
            next_slot=np.zeros(users, dtype=np.int64),
        )

    def rows(self, lo: int, hi: int) -> ClickState:
        """A view of users lo..hi-1 (writes go through to this state)."""
        return ClickState(self.category[lo:hi], self.scenario[lo:hi], self.ts[lo:hi], self.next_slot[lo:hi])


@dataclass
class ChunkLog:
    """The simulated impressions of one chunk-day in time order (rows of a request contiguous)."""

    user: np.ndarray  # [N] int64
    item: np.ndarray  # [N] int64
    scenario: np.ndarray  # [N] int8
    ts: np.ndarray  # [N] int64
    label: np.ndarray  # [N] int8
    probability: np.ndarray  # [N] float32, the click probability the label was drawn from
    request: np.ndarray  # [N] int64, request index within the chunk, ascending (context features are per request)


def simulate_chunk(
    world: World, state: ClickState, users: np.ndarray, day_start: int, rng: np.random.Generator
) -> ChunkLog:
    """Simulate one day for `users` (global ids); `state` row j belongs to users[j] and gets their clicks."""
    cfg, pop = world.config, world.users
    page = cfg.page_size

    active = np.nonzero(rng.random(users.size) < pop.active_probability[users])[0]  # positions in `users`
    n_requests = 1 + rng.poisson(pop.extra_requests[users[active]])
    req_pos = np.repeat(active, n_requests)  # [R], grouped by user
    req_user = users[req_pos].astype(np.int64)
    n_req = req_user.size
    hour = np.searchsorted(world.hour_cdf, rng.random(n_req), side="right")
    req_ts = day_start + hour * SECONDS_PER_HOUR + rng.integers(0, SECONDS_PER_HOUR, n_req)
    req_scen = _draw_scenario(pop.scenario_cdf[req_user], rng.random(n_req))

    # tick order: by each request's rank within its user's day (time order), users ascending within a tick
    group_start = np.repeat(np.cumsum(n_requests) - n_requests, n_requests)
    by_user_time = np.lexsort((req_ts, req_pos))
    rank = np.empty(n_req, dtype=np.int64)
    rank[by_user_time] = np.arange(n_req) - group_start
    order = np.lexsort((req_pos, rank))
    req_pos, req_user, req_ts, req_scen = req_pos[order], req_user[order], req_ts[order], req_scen[order]
    tick_end = np.cumsum(np.bincount(rank))

    items = _draw_items(world, req_user, req_scen, rng)  # [R, P]
    static_logit = _static_logit(world, req_user, req_scen, items)  # [R, P]
    uniform = rng.random((n_req, page), dtype=np.float32)  # label = uniform < click probability
    if cfg.transfer_strength > 0:
        probability = _click_probability_in_time_order(
            world, state, req_pos, req_scen, req_ts, items, static_logit, uniform, tick_end
        )
    else:
        probability = _sigmoid(static_logit)
    label = uniform < probability

    by_time = np.argsort(req_ts, kind="stable")  # write requests in time order; a page's rows stay together
    return ChunkLog(
        user=np.repeat(req_user[by_time], page),
        item=items[by_time].reshape(-1).astype(np.int64),
        scenario=np.repeat(req_scen[by_time], page),
        ts=np.repeat(req_ts[by_time], page),
        label=label[by_time].reshape(-1).astype(np.int8),
        probability=probability[by_time].reshape(-1),
        request=np.repeat(np.arange(n_req, dtype=np.int64), page),
    )


def _draw_scenario(cdf: np.ndarray, uniform: np.ndarray) -> np.ndarray:
    """Inverse-CDF draw per row of `cdf` [R, S] (last column 1) → int8 scenario ids."""
    return (uniform[:, None] >= cdf).sum(axis=1).astype(np.int8)


def _draw_items(world: World, req_user: np.ndarray, req_scen: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Candidates of each request [R, P]. A slot is interest-driven with the scenario's `interest_exposure`
    chance — its category is one of the user's favourites in that scenario — and popularity-driven otherwise
    (category by catalogue share); the item inside the category follows the category's Zipf popularity."""
    cat, cfg = world.items, world.config
    n_req, page = req_user.size, cfg.page_size
    by_interest = rng.random((n_req, page), dtype=np.float32) < world.interest_exposure[req_scen][:, None]
    favourite = rng.integers(0, cfg.interest_categories, (n_req, page))
    category = np.where(
        by_interest,
        world.users.favourite_categories[req_user[:, None], req_scen[:, None], favourite],
        np.searchsorted(cat.category_cdf, rng.random((n_req, page)), side="right"),
    )  # [R, P]
    rank = zipf_rank(rng.random((n_req, page)), cat.category_size[category], cfg.popularity_exponent)
    return cat.by_category[cat.category_start[category] + rank]


def _static_logit(world: World, req_user: np.ndarray, req_scen: np.ndarray, items: np.ndarray) -> np.ndarray:
    """The part of the click logit fixed by who, where and what [R, P]: scenario bias + interest affinity
    + brand quality + the segment's price slope."""
    cat, pop = world.items, world.users
    interest = pop.interest[req_user, req_scen]  # [R, d]
    affinity = np.einsum("rd,rpd->rp", interest, cat.vector[items])  # [R, P]
    slope = pop.segment_price_slope[pop.segment[req_user]]  # [R]
    return (
        world.scenario_bias[req_scen][:, None]
        + np.float32(world.config.interest_strength) * affinity
        + cat.quality[items]
        + slope[:, None] * cat.log_price_z[items]
    )


def _click_probability_in_time_order(
    world: World,
    state: ClickState,
    req_pos: np.ndarray,
    req_scen: np.ndarray,
    req_ts: np.ndarray,
    items: np.ndarray,
    static_logit: np.ndarray,
    uniform: np.ndarray,
    tick_end: np.ndarray,
) -> np.ndarray:
    """Click probability [R, P] with the lift from each user's recent clicks on the shown item's category,
    tick by tick, recording the clicks of each tick in `state` before the next tick reads it.

    lift = transfer_strength · max over remembered clicks on the same category of
           transfer[scenario now, scenario of the click] · 2^(−age / half-life).
    """
    cfg = world.config
    strength = np.float32(cfg.transfer_strength)
    half_life_s = cfg.transfer_half_life_hours * SECONDS_PER_HOUR
    item_cat = world.items.category[items]  # [R, P]
    n_scen = world.transfer.shape[0]
    transfer = world.transfer.reshape(-1)  # 1-D lookups are much cheaper than 2-D fancy indexing
    probability = np.empty(items.shape, dtype=np.float32)
    start = 0
    for end in tick_end:
        user_rows, scen, ts = req_pos[start:end], req_scen[start:end], req_ts[start:end]
        decay = np.exp2(-(ts[:, None] - state.ts[user_rows]) / half_life_s).astype(np.float32)  # [T, K]
        pair = scen[:, None].astype(np.int64) * n_scen + state.scenario[user_rows]  # [T, K] (int8 would overflow)
        weight = transfer[pair] * decay  # [T, K]
        remembered = state.category[user_rows]  # [T, K]
        shown = item_cat[start:end]  # [T, P]
        best = np.zeros(shown.shape, dtype=np.float32)  # [T, P]
        for k in range(remembered.shape[1]):  # K passes over [T, P]: much faster than a [T, P, K] reduction
            np.maximum(best, (shown == remembered[:, k, None]) * weight[:, k, None], out=best)
        probability[start:end] = _sigmoid(static_logit[start:end] + strength * best)
        clicked = uniform[start:end] < probability[start:end]  # [T, P]
        _remember_clicks(state, user_rows, scen, ts, item_cat[start:end], clicked)
        start = end
    return probability


def _remember_clicks(
    state: ClickState,
    user_rows: np.ndarray,
    scen: np.ndarray,
    ts: np.ndarray,
    item_cat: np.ndarray,
    clicked: np.ndarray,
) -> None:
    """Push the clicks of one tick ([T, P] mask) into the ring buffers of `user_rows` (state rows; each user has
    one request per tick)."""
    req, pos = np.nonzero(clicked)  # grouped by request, in page order
    if req.size == 0:
        return
    first = np.flatnonzero(np.r_[True, req[1:] != req[:-1]])  # first click of each clicking request
    count = np.diff(np.r_[first, req.size])
    nth = np.arange(req.size) - np.repeat(first, count)  # index of each click within its request
    clicker = user_rows[req]
    slot = (state.next_slot[clicker] + nth) % state.category.shape[1]
    state.category[clicker, slot] = item_cat[req, pos]
    state.scenario[clicker, slot] = scen[req]
    state.ts[clicker, slot] = ts[req]
    who = user_rows[req[first]]
    state.next_slot[who] = (state.next_slot[who] + count) % state.category.shape[1]


def _sigmoid(logit: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-logit))).astype(np.float32, copy=False)
