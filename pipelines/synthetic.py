"""`msit-rec generate`: a synthetic multi-scenario impression log with known ground truth.

The world (synthetic_world.py) gives every user a shared interest plus a per-scenario deviation
(`interest_sharing`), long-tailed item exposure, per-scenario CTR, and — the signal a cross-scenario model
should exploit — a decaying memory of recent clicks that lifts the same category in every scenario
(`transfer_strength`, `transfer_matrix`). The log is written day by day as hive partitions
`out_dir/day=YYYY-MM-DD/part-NNNNN.parquet` (one part per chunk of `users_per_chunk` users), so memory stays
bounded and does not grow with days or total rows: peak ≈ 360 bytes × users (world + click state) + ~200 bytes ×
rows of two chunk-days (one simulated while the previous one is written). Measured: 22M rows with 400k users
peaked at 560 MiB RSS.

Reproducible bit for bit: the world, the CTR calibration and every (day, chunk) draw from their own
SeedSequence children of `seed`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from msit_rec.errors import DataError
from msit_rec.outputs import staged_dir
from pipelines.synthetic_config import SCENARIO_NAMES, GeneratorConfig
from pipelines.synthetic_simulate import ChunkLog, ClickState, simulate_chunk
from pipelines.synthetic_world import World, build_world

__all__ = ["SCENARIO_NAMES", "GenerateSummary", "GeneratorConfig", "ScenarioSummary", "generate", "simulate_world"]

SECONDS_PER_DAY = 86_400
CALIBRATION_ROUNDS = 3
CALIBRATION_DAYS = 4  # the click state saturates within a few half-lives; more pilot days change little
CONTEXT_SKEW = 3.0  # per-request context values: floor(cardinality · u^3), a few values dominate
PARTITION_PREFIX = "day="
# high-cardinality columns: Parquet dictionary encoding costs more time than it saves bytes on these
DENSE_VALUED_COLUMNS = ("user_id", "item_id", "ts", "price", "user_activity")


@dataclass
class ScenarioSummary:
    rows: int
    clicks: int
    ctr: float


@dataclass
class GenerateSummary:
    """What `generate` wrote: counts overall and per scenario, the files and the time it took."""

    rows: int
    clicks: int
    scenarios: dict[str, ScenarioSummary]
    files: list[Path] = field(default_factory=list)
    seconds: float = 0.0
    scenario_bias: dict[str, float] = field(default_factory=dict)  # calibrated logit offsets (ground truth)

    @property
    def ctr(self) -> float:
        return self.clicks / self.rows if self.rows else 0.0

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    def table(self) -> str:
        """Per-scenario rows, traffic share, clicks and CTR as an aligned text table."""
        width = max([len("scenario"), len("total"), *(len(n) for n in self.scenarios)])
        lines = [f"{'scenario':<{width}} {'rows':>12} {'share %':>8} {'clicks':>10} {'CTR %':>7}"]
        for name, s in [*self.scenarios.items(), ("total", ScenarioSummary(self.rows, self.clicks, self.ctr))]:
            share = 100.0 * s.rows / self.rows if self.rows else 0.0
            lines.append(f"{name:<{width}} {s.rows:>12,} {share:>8.2f} {s.clicks:>10,} {100.0 * s.ctr:>7.3f}")
        lines.append(f"{len(self.files)} files, {self.seconds:.1f} s, {self.rows_per_second:,.0f} rows/s")
        return "\n".join(lines)


def generate(config: GeneratorConfig, out_dir: Path, progress: bool = True, overwrite: bool = False) -> GenerateSummary:
    """Write the synthetic log under `out_dir` (created if missing).

    A non-empty `out_dir` is refused unless `overwrite=True`, and even then only when it holds nothing but a
    previous output (`day=...` partitions of part files), so nothing else is ever deleted. The log is built in a
    temporary sibling that replaces `out_dir` only when complete: a failed run leaves the previous log intact.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    _check_partitions_only(out_dir)
    with staged_dir(out_dir, overwrite, [f"{PARTITION_PREFIX}*"]) as staging:
        summary = _generate_into(config, staging, progress)
    summary.files = [out_dir / path.relative_to(staging) for path in summary.files]
    summary.seconds = time.perf_counter() - started
    return summary


def _generate_into(config: GeneratorConfig, out_dir: Path, progress: bool) -> GenerateSummary:
    """Simulate every day and write its partitions under `out_dir` (a fresh staging directory)."""
    world_seq, calibration_seq, days_seq = np.random.SeedSequence(config.seed).spawn(3)
    world = build_world(config, np.random.default_rng(world_seq))
    calibrate_scenario_bias(world, calibration_seq)

    names = config.scenarios
    rows, clicks = np.zeros(len(names), dtype=np.int64), np.zeros(len(names), dtype=np.int64)
    files: list[Path] = []
    bar = tqdm(total=config.days, unit="day", desc="generate", disable=not progress)
    # one writer thread: building and encoding the table of chunk k overlaps the simulation of chunk k+1 (NumPy
    # and Parquet release the GIL for most of their work); at most one chunk waits, so memory stays at ~2 chunks
    with ThreadPoolExecutor(max_workers=1) as writer:
        pending: Future[None] | None = None
        for day, log, rng in simulate_world(world, days_seq):
            files.append(_part_path(out_dir, config.start_epoch + day * SECONDS_PER_DAY, files))
            if pending is not None:
                pending.result()
            pending = writer.submit(_write_part, world, log, rng, files[-1])
            rows += np.bincount(log.scenario, minlength=len(names))
            clicks += np.bincount(log.scenario, weights=log.label, minlength=len(names)).astype(np.int64)
            bar.update(day + 1 - bar.n)
            bar.set_postfix(rows=f"{int(rows.sum()):,}")
        if pending is not None:
            pending.result()
    bar.update(config.days - bar.n)
    bar.close()
    return GenerateSummary(
        rows=int(rows.sum()),
        clicks=int(clicks.sum()),
        scenarios={
            n: ScenarioSummary(int(r), int(c), float(c / r) if r else 0.0)
            for n, r, c in zip(names, rows, clicks, strict=True)
        },
        files=files,
        scenario_bias={n: float(b) for n, b in zip(names, world.scenario_bias, strict=True)},
    )


def simulate_world(
    world: World, days_seq: np.random.SeedSequence
) -> Iterator[tuple[int, ChunkLog, np.random.Generator]]:
    """Yield (day index, ChunkLog, the chunk's generator) in day order, chunks of users in id order.

    The generator is handed on so that per-request context features come from the same stream."""
    cfg = world.config
    state = ClickState.empty(cfg.users, cfg.transfer_memory)
    chunk_starts = range(0, cfg.users, cfg.users_per_chunk)
    for day, day_seq in enumerate(days_seq.spawn(cfg.days)):
        day_start = cfg.start_epoch + day * SECONDS_PER_DAY
        for lo, chunk_seq in zip(chunk_starts, day_seq.spawn(len(chunk_starts)), strict=True):
            hi = min(lo + cfg.users_per_chunk, cfg.users)
            rng = np.random.default_rng(chunk_seq)
            log = simulate_chunk(world, state.rows(lo, hi), np.arange(lo, hi), day_start, rng)
            if log.user.size:
                yield day, log, rng


def calibrate_scenario_bias(world: World, seq: np.random.SeedSequence) -> None:
    """Shift each scenario's logit bias so a pilot run on a user sample hits `scenario_ctr`.

    The interest, brand, price and transfer terms all move the mean CTR; a few fixed-point rounds on the
    mean click probability (common random numbers each round) absorb them."""
    cfg = world.config
    n_scen = len(cfg.scenarios)
    target = np.asarray(cfg.scenario_ctr, dtype=np.float64)
    sample = min(cfg.calibration_users, cfg.users)
    for _ in range(CALIBRATION_ROUNDS):
        rng = np.random.default_rng(seq)
        users = np.sort(rng.choice(cfg.users, size=sample, replace=False))
        state = ClickState.empty(sample, cfg.transfer_memory)
        prob_sum, count = np.zeros(n_scen), np.zeros(n_scen)
        for day in range(min(cfg.days, CALIBRATION_DAYS)):
            log = simulate_chunk(world, state, users, cfg.start_epoch + day * SECONDS_PER_DAY, rng)
            prob_sum += np.bincount(log.scenario, weights=log.probability, minlength=n_scen)
            count += np.bincount(log.scenario, minlength=n_scen)
        seen = count > 0
        realized = np.clip(prob_sum[seen] / count[seen], 1e-6, 1 - 1e-6)
        world.scenario_bias[seen] += (_logit(target[seen]) - _logit(realized)).astype(np.float32)


def _logit(p: np.ndarray) -> np.ndarray:
    return np.log(p / (1.0 - p))


def _to_arrow(world: World, log: ChunkLog, rng: np.random.Generator) -> pa.Table:
    """The raw-log contract columns of one chunk-day."""
    cfg, items, users = world.config, world.items, world.users
    user, item, ts = log.user, log.item, log.ts
    columns: dict[str, pa.Array | np.ndarray] = {
        "user_id": user,
        "item_id": item,
        "scenario": _string_array(log.scenario, cfg.scenarios),
        "ts": ts,
        "label": log.label,
        "user_segment": users.segment[user].astype(np.int64),
        "item_cat": items.category[item].astype(np.int64),
        "brand": items.brand[item].astype(np.int64),
        "price_bucket": items.price_bucket[item].astype(np.int64),
        "hour": (ts % SECONDS_PER_DAY) // 3600,
        "price": items.price[item],
        "user_activity": users.activity[user],
    }
    n_requests = int(log.request[-1]) + 1
    for j in range(cfg.extra_sparse_features):
        columns[f"ctx_{j:02d}"] = _context_feature(j, user, log.request, n_requests, cfg.extra_sparse_cardinality, rng)
    arrays = [v if isinstance(v, pa.Array) else _numeric_array(v) for v in columns.values()]
    return pa.Table.from_arrays(arrays, names=list(columns))


# pa.array()/pa.table() on NumPy input import pandas to inspect it (seconds per process); building the arrays from
# buffers does not, and is zero-copy for the numeric columns.
def _numeric_array(values: np.ndarray) -> pa.Array:
    values = np.ascontiguousarray(values)
    return pa.Array.from_buffers(pa.from_numpy_dtype(values.dtype), values.size, [None, pa.py_buffer(values)])


def _string_array(codes: np.ndarray, names: list[str]) -> pa.Array:
    """A string column holding names[codes[i]] in row i."""
    encoded = [n.encode() for n in names]
    lengths = np.array([len(b) for b in encoded], dtype=np.int32)[codes]
    offsets = np.zeros(codes.size + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    width = max(len(b) for b in encoded)
    padded = np.array([list(b.ljust(width, b"\0")) for b in encoded], dtype=np.uint8)  # [S, width]
    data = padded[codes][np.arange(width) < lengths[:, None]]  # row-major: each row's bytes in order
    return pa.Array.from_buffers(pa.string(), codes.size, [None, pa.py_buffer(offsets), pa.py_buffer(data)])


def _context_feature(
    j: int, user: np.ndarray, request: np.ndarray, n_requests: int, cardinality: int, rng: np.random.Generator
) -> np.ndarray:
    """Context feature j: even j a fixed per-user value (a device), odd j a skewed per-request draw (a network)."""
    if j % 2 == 0:
        salt = np.uint64((j * 0xBF58476D1CE4E5B9) % 2**64)
        mixed = user.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + salt  # wraps around: a cheap hash
        # top 32 bits scaled to [0, cardinality) by multiply-shift (no division)
        return (((mixed >> np.uint64(32)) * np.uint64(cardinality)) >> np.uint64(32)).astype(np.int64)
    per_request = (cardinality * rng.random(n_requests) ** CONTEXT_SKEW).astype(np.int64)
    return per_request[request]


def _part_path(out_dir: Path, day_start: int, earlier: list[Path]) -> Path:
    """The next `day=YYYY-MM-DD/part-NNNNN.parquet` of that day (its folder created)."""
    folder = out_dir / f"{PARTITION_PREFIX}{time.strftime('%Y-%m-%d', time.gmtime(day_start))}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"part-{sum(p.parent == folder for p in earlier):05d}.parquet"


def _write_part(world: World, log: ChunkLog, rng: np.random.Generator, path: Path) -> None:
    table = _to_arrow(world, log, rng)
    dictionary = [c for c in table.column_names if c not in DENSE_VALUED_COLUMNS]
    pq.write_table(table, path, compression=world.config.compression, use_dictionary=dictionary)


def _check_partitions_only(out_dir: Path) -> None:
    """staged_dir vets the top level of `out_dir`; inside a `day=` entry only part files may be replaced either."""
    if not out_dir.is_dir():
        return
    for entry in sorted(out_dir.glob(f"{PARTITION_PREFIX}*")):
        foreign = [f for f in entry.iterdir() if not _is_part_file(f)] if entry.is_dir() else [entry]
        if foreign:
            raise DataError(
                f"output directory {out_dir} holds {foreign[0]}, which is not a generated partition; "
                "refusing to replace it (expected only day=YYYY-MM-DD/part-NNNNN.parquet)"
            )


def _is_part_file(path: Path) -> bool:
    return path.is_file() and path.name.startswith("part-") and path.suffix == ".parquet"
