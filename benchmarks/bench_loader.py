"""Throughput of the examples loader alone (Parquet → Batch), against issue 3's target of 5× what training
consumes (25k examples/s → 125k examples/s).

Writes a random examples dataset of the contract's shape (default 1M rows, 20 sparse features, three
behaviour lists of up to L=50 ids, uniform lengths in [0, L], 8 dense features, zstd, 65,536-row row
groups) into a temporary directory, then times one epoch per `num_workers` setting. Prints a table and writes
JSON (default benchmarks/results/bench_loader.json).

    python benchmarks/bench_loader.py [--rows 1000000] [--workers 0 1 2] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from msit_rec.data.arrow_kjt import ROW_INDEX_COLUMN, BatchLayout, table_to_batch
from msit_rec.data.loader import ExamplesDataset, make_loader
from msit_rec.data.spec import CONTRACT_VERSION, DatasetMeta, FeatureSpec, HistoryInfo, SplitStats
from msit_rec.provenance import host_facts

SCENARIOS = ["s0", "s1", "s2", "s3"]
ITEMS, CATEGORIES, OTHER_CARDINALITY = 1_000_000, 5_000, 100_000


def feature_specs(sparse: int, dense: int) -> list[FeatureSpec]:
    specs = [FeatureSpec("scenario", "scenario", "scenario", "scenario", len(SCENARIOS), 8, "scenario")]
    specs += [
        FeatureSpec("item", "sparse", "item", "item", ITEMS, 16),
        FeatureSpec("cat", "sparse", "cat", "cat", CATEGORIES, 16),
    ]
    specs += [FeatureSpec(f"f{i}", "sparse", f"f{i}", f"f{i}", OTHER_CARDINALITY, 16) for i in range(sparse - 2)]
    specs += [
        FeatureSpec("hist_item", "sequence", "item", "item", ITEMS, 16),
        FeatureSpec("hist_cat", "sequence", "cat", "cat", CATEGORIES, 16),
        FeatureSpec("hist_scenario", "sequence", "scenario", "scenario", len(SCENARIOS), 8, "scenario"),
    ]
    return specs + [FeatureSpec(f"d{i}", "dense", f"d{i}", encoding="numeric") for i in range(dense)]


def random_shard(rng: np.random.Generator, rows: int, specs: list[FeatureSpec], max_len: int) -> pa.Table:
    lengths = rng.integers(0, max_len + 1, rows)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    columns: dict[str, pa.Array] = {
        "label": pa.array((rng.random(rows) < 0.1).astype(np.float32)),
        "scenario": pa.array(rng.integers(0, len(SCENARIOS), rows, dtype=np.int32)),
        "user_id": pa.array(rng.integers(0, 10**7, rows)),
        "ts": pa.array(np.sort(rng.integers(0, 10**9, rows))),
        "hist_len": pa.array(lengths.astype(np.int32)),
    }
    for spec in specs:
        if spec.kind == "sparse":
            columns[spec.name] = pa.array(rng.integers(0, spec.cardinality, rows))
        elif spec.kind == "sequence":
            values = pa.array(rng.integers(0, spec.cardinality, int(lengths.sum())))
            columns[spec.name] = pa.ListArray.from_arrays(offsets, values)
        elif spec.kind == "dense":
            columns[spec.name] = pa.array(rng.standard_normal(rows, dtype=np.float32))
    return pa.table(columns)


def write_dataset(root: Path, rows: int, sparse: int, dense: int, max_len: int, rows_per_file: int) -> None:
    rng = np.random.default_rng(0)
    specs = feature_specs(sparse, dense)
    files = []
    for i, start in enumerate(range(0, rows, rows_per_file)):
        name = f"train/part-{i:05d}.parquet"
        (root / "train").mkdir(parents=True, exist_ok=True)
        table = random_shard(rng, min(rows_per_file, rows - start), specs, max_len)
        pq.write_table(table, root / name, row_group_size=65_536, compression="zstd")
        files.append(name)
    DatasetMeta(
        contract_version=CONTRACT_VERSION,
        name="bench_loader",
        features=specs,
        scenarios=SCENARIOS,
        history=HistoryInfo(max_len, "all", "log"),
        splits={"train": SplitStats(rows, 0, 0.0, files, {})},
        numeric_stats={},
        split_boundaries={},
        rows_in=rows,
        rejects={},
        rejects_file=None,
        config={},
    ).save(root / "dataset.json")


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (DataLoader workers are joined at epoch end)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def time_epoch(root: Path, batch_size: int, workers: int, shuffle_buffer: int) -> dict:
    """One shuffled training epoch. CPU seconds are reported too: on a shared machine wall time mostly
    measures the neighbours, examples per CPU-second what the loader costs."""
    dataset = ExamplesDataset(
        root, "train", batch_size, shuffle=True, drop_last=True, shuffle_buffer_rows=shuffle_buffer
    )
    load = os.getloadavg()[0]
    cpu_start = cpu_seconds()
    start = time.perf_counter()
    batches = examples = 0
    first_batch_s = None
    for batch in make_loader(dataset, num_workers=workers):
        if first_batch_s is None:
            first_batch_s = time.perf_counter() - start
        batches += 1
        examples += batch.batch_size
    seconds = time.perf_counter() - start
    cpu = cpu_seconds() - cpu_start
    return {
        "num_workers": workers,
        "batches": batches,
        "examples": examples,
        "seconds": round(seconds, 3),
        "first_batch_s": round(first_batch_s or 0.0, 3),
        "examples_per_s": round(examples / seconds),
        "cpu_seconds": round(cpu, 3),
        "examples_per_cpu_s": round(examples / cpu),
        "load_avg_1m_before": load,
    }


def time_conversion(root: Path, batch_size: int, repeats: int = 50) -> dict:
    """Arrow table → Batch alone, for the full layout and for the behaviour lists alone."""
    meta = DatasetMeta.load(root)
    layout = BatchLayout.from_meta(meta)
    table = pq.ParquetFile(root / meta.splits["train"].files[0]).read_row_group(0)
    table = table.slice(1000, batch_size)  # a sliced table, as batches are
    table = table.append_column(ROW_INDEX_COLUMN, pa.array(np.arange(batch_size, dtype=np.int64)))
    lists_only = BatchLayout(sparse=(), sequence=layout.sequence, dense=(), id_bounds={})
    results = {}
    for name, lay in (("full_layout", layout), ("list_keys_only", lists_only)):
        table_to_batch(table, lay)
        start = time.perf_counter()
        for _ in range(repeats):
            table_to_batch(table, lay)
        results[f"{name}_ms"] = round((time.perf_counter() - start) / repeats * 1e3, 3)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--sparse", type=int, default=20, help="single-valued sparse features (>= 2)")
    parser.add_argument("--dense", type=int, default=8)
    parser.add_argument("--max-len", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--rows-per-file", type=int, default=262_144)
    parser.add_argument("--shuffle-buffer", type=int, default=131_072)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_loader.json")
    args = parser.parse_args()
    host = host_facts()
    print(f"host: {host.summary()}", flush=True)

    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        write_dataset(root, args.rows, args.sparse, args.dense, args.max_len, args.rows_per_file)
        print(f"wrote {args.rows:,} rows in {time.perf_counter() - start:.1f} s "
              f"({sum(p.stat().st_size for p in root.rglob('*.parquet')) / 2**20:.0f} MiB)")
        conversion = time_conversion(root, args.batch_size)
        runs = [time_epoch(root, args.batch_size, w, args.shuffle_buffer) for w in args.workers]

    print(f"\nArrow → Batch, {args.batch_size} rows: full layout {conversion['full_layout_ms']} ms, "
          f"behaviour lists only {conversion['list_keys_only_ms']} ms")
    print(f"\n{'workers':>7} {'batches':>8} {'seconds':>8} {'first batch s':>13} {'examples/s':>11} {'vs 125k':>8} "
          f"{'examples/CPU-s':>14} {'load before':>11}")
    for run in runs:
        print(f"{run['num_workers']:>7} {run['batches']:>8} {run['seconds']:>8} {run['first_batch_s']:>13} "
              f"{run['examples_per_s']:>11,} {run['examples_per_s'] / 125_000:>7.2f}x "
              f"{run['examples_per_cpu_s']:>14,} {run['load_avg_1m_before']:>11.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "settings": {k: v if not isinstance(v, Path) else str(v) for k, v in vars(args).items()},
        "machine": {**asdict(host), "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "pyarrow": pa.__version__},
        "conversion": conversion,
        "runs": runs,
        "target_examples_per_s": 125_000,
    }, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
