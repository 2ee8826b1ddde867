"""Benchmark: generate + prepare at 1M and 10M synthetic rows (L=50), against a pandas history baseline.

For each size: wall time and peak RSS of `msit-rec generate` and `msit-rec prepare` (each in its own process,
so peak RSS is that stage's own), rows/s, and bytes on disk per example — for both data contracts: v1 (click
histories) and v2 (every impression in the history with its feedback: `events: all, feedback: label`). On the 1M log, the history building
alone is also run the way most teams write it (pandas groupby + a per-user Python loop) and compared with
msit-rec's vectorised history building on the same rows; both must give the same histories.

    python benchmarks/bench_prepare.py [--sizes 1000000 10000000] [--out benchmarks/results/bench_prepare.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import polars as pl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from msit_rec.config import load_config
from msit_rec.provenance import host_facts
from pipelines.config import CategoricalFeature, DatasetConfig
from pipelines.encode import fit_encoder
from pipelines.history import index_histories
from pipelines.source import read_source
from pipelines.validate import LABEL, ROW, TS, tag_rows

DATASET_CONFIG = ROOT / "configs" / "datasets" / "synthetic.yaml"
GENERATE_CONFIG = ROOT / "configs" / "generate" / "synthetic.yaml"
ROWS_PER_USER = 55  # the default world yields ~55 rows per user over 14 days


def run_measured(argv: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS GiB) of a child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise RuntimeError(f"{' '.join(argv)} failed with status {status}")
    return wall, usage.ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "msit_rec.cli", *args, "--quiet", "--overwrite"]


def pandas_histories(raw: pd.DataFrame, max_len: int) -> dict[int, list]:
    """The common way: sort, group by user, walk each user's rows in a Python loop keeping a deque of clicks."""
    raw = raw.sort_values(["user_id", "ts", "_row"])
    histories: dict[int, list] = {}
    for _, rows in raw.groupby("user_id", sort=False):
        clicks: deque = deque(maxlen=max_len)
        pending: list = []  # clicks at the current ts become visible only once ts moves on
        current_ts = None
        for row, ts, item, label in zip(rows["_row"], rows["ts"], rows["item_id"], rows["label"]):
            if ts != current_ts:
                clicks.extend(pending)
                pending = []
                current_ts = ts
            histories[row] = list(clicks)
            if label == 1:
                pending.append(item)
    return histories


def ours_histories(config: DatasetConfig) -> tuple[float, dict[int, list]]:
    """msit-rec's history building (index + gather) on the same rows; seconds and the lists as raw item ids.

    Reading, validating and encoding happen before the clock starts, as the pandas loop also starts from a
    loaded frame.
    """
    tagged = tag_rows(read_source(config.source), config, source=config.source.path)
    frame = tagged.frame.select("user_id", "item_id", ROW, TS, LABEL, "_scenario").collect()
    encoder = fit_encoder(CategoricalFeature(name="item", column="item_id"), frame["item_id"])  # every id kept
    frame = frame.with_columns(encoder.encode(frame["item_id"]).alias("item"))
    start = time.perf_counter()
    indexed, events = index_histories(frame, "user_id", "item", None, config.history.max_len, "clicks")
    lists = events.lists(indexed["_hist_lo"].to_numpy(), indexed["_hist_hi"].to_numpy())
    seconds = time.perf_counter() - start
    vocab = dict(encoder.vocabulary.select("index", "raw").iter_rows())
    rows = indexed[ROW].to_list()
    decoded = {row: [vocab[i] for i in items] for row, items in zip(rows, lists["hist_item"].to_pylist())}
    return seconds, decoded


CONTRACTS = {  # prepare overrides per data contract
    "v1": [],
    "v2": ["--set", "history.events=all", "--set", "history.feedback=label"],
}


def bench_size(rows: int, work: Path) -> list[dict]:
    """One generated log, prepared once per contract: a row per contract (the generate figures repeat)."""
    users = max(1000, rows // ROWS_PER_USER)
    raw = work / f"raw_{rows}"
    gen_s, gen_rss = run_measured(
        cli("generate", "--config", str(GENERATE_CONFIG), "--out", str(raw), "--set", f"users={users}")
    )
    results = []
    for contract, overrides in CONTRACTS.items():
        examples = work / f"examples_{rows}_{contract}"
        prep_s, prep_rss = run_measured(
            cli("prepare", "--config", str(DATASET_CONFIG), "--source", str(raw), "--out", str(examples), *overrides)
        )
        meta = json.loads((examples / "dataset.json").read_text())
        actual_rows = meta["rows_in"]
        shard_bytes = sum((examples / f).stat().st_size for s in meta["splits"].values() for f in s["files"])
        results.append({
            "rows": actual_rows,
            "contract": contract,
            "generate_s": gen_s,
            "generate_rows_per_s": actual_rows / gen_s,
            "generate_peak_rss_gib": gen_rss,
            "prepare_s": prep_s,
            "prepare_rows_per_s": actual_rows / prep_s,
            "prepare_peak_rss_gib": prep_rss,
            "bytes_per_example": shard_bytes / actual_rows,
            "raw": raw,
        })
    return results


def baseline(raw: Path) -> dict:
    config = load_config(DATASET_CONFIG, DatasetConfig, section="dataset", overrides=[f"source.path={raw}"])
    ours_s, ours = ours_histories(config)
    log = pl.read_parquet(raw, hive_partitioning=True).select("user_id", "item_id", "ts", "label")
    frame = log.with_row_index("_row").to_pandas()
    start = time.perf_counter()
    theirs = pandas_histories(frame, config.history.max_len)
    pandas_s = time.perf_counter() - start
    same = len(theirs) == len(ours) and all(theirs[row] == ours[row] for row in theirs)
    return {"rows": len(frame), "ours_history_s": ours_s, "pandas_history_s": pandas_s,
            "speedup": pandas_s / ours_s, "identical_histories": same}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_prepare.json")
    args = parser.parse_args()
    host = host_facts()
    print(f"host: {host.summary()}", flush=True)
    results: dict = {"machine": asdict(host), "sizes": [], "baseline": None}
    with tempfile.TemporaryDirectory(prefix="bench_prepare_") as tmp:
        for size in sorted(args.sizes):
            for result in bench_size(size, Path(tmp)):
                raw = result.pop("raw")
                results["sizes"].append(result)
            if results["baseline"] is None:
                results["baseline"] = baseline(raw)
    print(f"{'rows':>11} {'contract':>8} {'gen s':>7} {'gen rows/s':>11} {'gen GiB':>8} {'prep s':>7} "
          f"{'prep rows/s':>12} {'prep GiB':>9} {'B/example':>10}")
    for r in results["sizes"]:
        print(f"{r['rows']:>11,} {r['contract']:>8} {r['generate_s']:>7.1f} {r['generate_rows_per_s']:>11,.0f} "
              f"{r['generate_peak_rss_gib']:>8.2f} {r['prepare_s']:>7.1f} {r['prepare_rows_per_s']:>12,.0f} "
              f"{r['prepare_peak_rss_gib']:>9.2f} {r['bytes_per_example']:>10.1f}")
    b = results["baseline"]
    print(f"\nhistory building on {b['rows']:,} rows: msit-rec {b['ours_history_s']:.2f} s, "
          f"pandas groupby + Python loop {b['pandas_history_s']:.2f} s → {b['speedup']:.1f}× "
          f"(identical histories: {b['identical_histories']})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results written to {args.out}")


if __name__ == "__main__":
    main()
