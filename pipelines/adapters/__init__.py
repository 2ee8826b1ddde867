"""Adapters from public dataset layouts to the raw-log contract (DESIGN.md §3).

Each adapter reads `source.path` in its layout, checks `source.options` against its own options dataclass
and returns a lazy frame with `user_id, item_id, scenario, ts, label` plus the layout's side features, so
that one `prepare` pipeline handles every dataset the same way.
"""

from __future__ import annotations

from collections.abc import Callable

import polars as pl

from pipelines.adapters.ali_ccp import read_ali_ccp
from pipelines.adapters.kuairand import read_kuairand
from pipelines.adapters.movielens import read_movielens
from pipelines.adapters.taobao import read_taobao
from pipelines.config import SourceConfig

ADAPTERS: dict[str, Callable[[SourceConfig], pl.LazyFrame]] = {
    "movielens": read_movielens,
    "taobao": read_taobao,
    "ali_ccp": read_ali_ccp,
    "kuairand": read_kuairand,
}
