"""`--precision` specs: which storage precision each embedding table gets in the artifact."""

from __future__ import annotations

from typing import get_args

from msit_rec.errors import ConfigError
from msit_rec.serving.contract import Precision

PRECISIONS: tuple[str, ...] = get_args(Precision)


def parse_precision(spec: str | dict[str, str], tables: list[str]) -> dict[str, Precision]:
    """`fp32` | `fp16` | `int8` (every table) or `item=int8,user=fp16` (the rest fp32) → table → precision.

    A mapping is accepted too (the Python API). Unknown tables or precisions are a ConfigError naming them.
    """
    if isinstance(spec, str) and spec.strip() in PRECISIONS:
        return {table: spec.strip() for table in tables}
    chosen = _pairs(spec) if isinstance(spec, str) else dict(spec)
    unknown = sorted(set(chosen) - set(tables))
    if unknown:
        raise ConfigError(
            f"--precision {_show(spec)}: unknown table(s) {unknown}; the model's embedding tables are {tables}"
        )
    for table, precision in chosen.items():
        if precision not in PRECISIONS:
            raise ConfigError(
                f"--precision {_show(spec)}: table '{table}' got {precision!r}, expected one of {list(PRECISIONS)}"
            )
    return {table: chosen.get(table, "fp32") for table in tables}


def _pairs(spec: str) -> dict[str, str]:
    chosen: dict[str, str] = {}
    for item in spec.split(","):
        table, sep, precision = (part.strip() for part in item.partition("="))
        if not sep or not table or not precision:
            raise ConfigError(
                f"--precision {spec!r}: expected one of {list(PRECISIONS)} or a comma list TABLE=PRECISION "
                f"(e.g. item=int8,user=fp16), got the item {item.strip()!r}"
            )
        if table in chosen:
            raise ConfigError(f"--precision {spec!r}: table '{table}' is given twice")
        chosen[table] = precision
    return chosen


def _show(spec: str | dict[str, str]) -> str:
    return repr(spec) if isinstance(spec, str) else repr(",".join(f"{k}={v}" for k, v in spec.items()))
