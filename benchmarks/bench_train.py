"""Training throughput of `msit` at the reference size of issue 3, through the real path and against a plain twin.

Reference size: batch 4096, 19 single-valued sparse features of dim 16 (configs/datasets/synthetic_wide.yaml),
item and category histories of L=50, attention MLP 64-32, tower 512-256. Measured, each in its own process so that
peak RSS is per configuration:
- `train_1p`: 1 process through the real path: examples loader → Lightning → TorchRecStrategy (DMP) → fused
  row-wise Adagrad for tables + AdamW for dense parameters, once per sequence path (`pooled_bags`,
  `embedding_collection`: the second shows FBGEMM's slow unpooled CPU backward, notes/torchrec-on-cpu.md);
- `train_1p ... bf16-mixed`: the same under Lightning's bf16 autocast (what `trainer.precision: auto` picks where
  bf16 products are native), against the bf16 matmul floor;
- `train_2p`: the same on 2 processes (gloo), one thread each; examples/s counts both ranks;
- `plain_twin`: the same architecture in plain PyTorch — `nn.Embedding` tables (sparse gradients, Adagrad) and the
  same dense modules (`RankingModel` with its embeddings swapped), AdamW, one process, the same loader;
- `peer_rechub_din`: torch-rechub's DIN (the named peer; an optional extra, `pip install --no-deps torch-rechub`,
  skipped with the reason when absent) at the same size: the same single-valued sparse features and item/category
  histories (dim 16, L=50), attention MLP 64-32, tower 512-256, Adam, one process; its padded input dicts are built
  from the same batches before timing (the numeric features are left out: rechub's DIN takes sparse ones only);
- `loader`: the examples loader alone (Parquet → Batch, one whole shuffled epoch), to see whether input or compute
  bounds training.
- `floor`: the matmul floor of one step (benchmarks/matmul_floor.py): the twin's matrix products (forward and
  backward; the same dense modules as msit, so the same products), each timed alone, and the examples/s that time
  alone would allow — the ceiling for any work on everything else; in fp32, and in bf16 when a bf16 row ran. The
  yardstick takes the attention's products whole (one per layer over all N behaviours: the model's products, however
  an implementation tiles them); a second floor times the cache-sized blocks that the blocked unit runs
  (msit_rec/modules/blocked_attention.py), each alone with its operands hot in cache — lower, because a tiled product
  alone runs faster than the whole one, which is the point of tiling.

Data: a synthetic log with long click histories (generator knobs below; the mean hist_len is reported, since
the attention cost grows with it), prepared with synthetic_wide.yaml into a temporary directory (or `--data DIR`,
an already prepared one). Throughput is steady state: `--warmup` steps are run first, then `--steps` are timed;
examples/s = examples of the timed steps / their wall time (loader included, as in training). The machine may
be shared: the load average is recorded, and each configuration is measured `--repeats` times (best kept).

glibc returns large freed blocks to the kernel by default (blocks ≥ 32 MiB are always mmap-ed): every
[B, L, 64] activation then costs fresh page faults each step, which are expensive in a VM.
`msit_rec.host.tune_glibc_malloc` (which `msit-rec fit` applies too) keeps them in the heap; it is on by
default (`--no-malloc-tune` measures without it) and applies to every configuration.

    python benchmarks/bench_train.py [--quick] [--output benchmarks/results/bench_train.json] [--data DIR] [--profile]

`--profile`: the 1-process training rows also report the self CPU time per op class of their timed steps (matmul,
FBGEMM lookups and fused optimizer, gather/scatter, copies and casts, element-wise, ...): where a step goes beyond
its matmul floor. The profiler slows those rows: take their examples/s from a run without it.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BATCH = 4096
GENERATOR_SETTINGS = {  # few users with many impressions and clicks: histories reach L=50 (mean ≈ 36)
    "users": 4000,
    "days": 30,
    "daily_active_fraction": 0.6,
    "impressions_per_user_day": 20,
    "scenario_ctr": [0.25, 0.3, 0.28, 0.25, 0.3],
}
QUICK_GENERATOR_SETTINGS = {**GENERATOR_SETTINGS, "users": 1500}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ---- data ------------------------------------------------------------------------------------------------------


def prepare_data(root: Path, quick: bool) -> Path:
    settings = QUICK_GENERATOR_SETTINGS if quick else GENERATOR_SETTINGS
    cli = [sys.executable, "-m", "msit_rec.cli"]
    overrides = [arg for key, value in settings.items() for arg in ("--set", f"{key}={json.dumps(value)}")]
    subprocess.run([*cli, "generate", "--quiet", "--overwrite", "--config", str(REPO / "configs/generate/synthetic.yaml"),
                    "--out", str(root / "raw"), *overrides], check=True)
    subprocess.run(
        [*cli, "prepare", "--quiet", "--overwrite", "--config", str(REPO / "configs/datasets/synthetic_wide.yaml"),
         "--source", str(root / "raw"), "--out", str(root / "examples")],
        check=True,
    )
    return root / "examples"


def describe_data(data: Path) -> dict[str, Any]:
    import pyarrow.parquet as pq

    from msit_rec.data.spec import DatasetMeta

    meta = DatasetMeta.load(data)
    files = [data / name for name in meta.splits["train"].files]
    hist_len = pq.read_table(files, columns=["hist_len"]).column("hist_len").to_numpy()
    return {
        "train_rows": int(hist_len.size),
        "train_batches": int(hist_len.size // BATCH),
        "sparse_features": len(meta.features_of_kind("sparse")),
        "max_len": meta.history.max_len,
        "mean_hist_len": round(float(hist_len.mean()), 2),
        "share_at_max_len": round(float((hist_len == meta.history.max_len).mean()), 3),
    }


# ---- workers (each runs in its own process) -------------------------------------------------------------------


def window_stats(marks: list[tuple[float, float]], warmup: int, examples_per_step: int) -> dict[str, Any]:
    """Throughput over the steps after `warmup`, from (wall, cpu) marks taken at the end of each step."""
    timed = marks[warmup - 1 :]
    walls = sorted(b[0] - a[0] for a, b in itertools.pairwise(timed))
    wall = timed[-1][0] - timed[0][0]
    cpu = timed[-1][1] - timed[0][1]
    steps = len(timed) - 1
    return {
        "steps": steps,
        "examples_per_s": round(examples_per_step * steps / wall),
        "median_step_ms": round(1e3 * walls[len(walls) // 2], 1),
        "best_step_ms": round(1e3 * walls[0], 1),
        "cpu_s_per_step": round(cpu / steps, 3),
    }


def run_lightning(params: dict[str, Any]) -> dict[str, Any]:
    import lightning.pytorch as pl
    import torch

    from msit_rec.data.spec import DatasetMeta
    from msit_rec.fit_config import ModelConfig, OptimConfig, SequencePath, ShardingConfig
    from msit_rec.train.module import ExamplesDataModule, RankingModule
    from msit_rec.train.strategy import TorchRecStrategy

    class StepMarks(pl.Callback):
        def __init__(self) -> None:
            self.marks: list[tuple[float, float]] = []

        def on_train_batch_end(self, *args: Any) -> None:
            self.marks.append((time.perf_counter(), time.process_time()))

    class StepProfile(pl.Callback):
        """torch.profiler over the timed steps (after warm-up): self CPU time per op class."""

        def __init__(self, first: int, last: int) -> None:
            self.first, self.last = first, last
            self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self.classes: dict[str, float] = {}
            self.top: dict[str, float] = {}

        def on_train_batch_start(self, trainer: Any, *args: Any) -> None:
            if trainer.global_step == self.first:
                self.profiler.__enter__()

        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            if trainer.global_step == self.last:
                self.profiler.__exit__(None, None, None)
                self.classes = op_class_seconds(self.profiler, self.last - self.first)
                self.top = top_op_seconds(self.profiler, self.last - self.first)

    devices = params["devices"]
    torch.set_num_threads(max(1, params["threads"] // devices))
    pl.seed_everything(0, verbose=False)
    marks = StepMarks()
    profiled = StepProfile(params["warmup"], params["warmup"] + params["steps"]) if params.get("profile") else None
    trainer = pl.Trainer(
        accelerator="cpu", devices=devices, precision=params.get("precision", "32-true"), strategy=TorchRecStrategy(ShardingConfig(embedding_lr=0.05)),
        max_steps=params["warmup"] + params["steps"], limit_val_batches=0, num_sanity_val_steps=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        use_distributed_sampler=False, default_root_dir=params["scratch"],
        callbacks=[marks, *([profiled] if profiled else [])],
    )
    meta = DatasetMeta.load(params["data"])
    module = RankingModule(meta, ModelConfig(sequence_path=SequencePath(params["path"])), OptimConfig())
    trainer.fit(module, datamodule=ExamplesDataModule(params["data"], BATCH, BATCH, 0, 0))
    result = window_stats(marks.marks, params["warmup"], BATCH * devices)
    if profiled is not None:
        result["op_class_ms_per_step"] = {name: round(s * 1e3, 1) for name, s in profiled.classes.items()}
        result["top_op_ms_per_step"] = {name: round(s * 1e3, 1) for name, s in profiled.top.items()}
    return {**result, "rank": trainer.global_rank, "threads": torch.get_num_threads(), "peak_rss_mib": peak_rss_mib()}


# op classes of the profile, by the first pattern an op's name contains (aten/fbgemm names; checked in order)
OP_CLASSES = (
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::linear", "aten::matmul")),
    ("embedding lookups + fused optimizer (FBGEMM)", ("fbgemm",)),
    ("dense optimizer", ("adam", "_foreach", "optimizer")),
    ("gather / scatter / index", ("index", "gather", "scatter", "embedding", "repeat_interleave", "segment", "take")),
    ("copy / cast / cat", ("copy_", "aten::to", "_to_copy", "aten::cat", "clone", "contiguous", "pad")),
    ("reductions", ("aten::sum", "aten::mean", "aten::norm", "aten::max", "aten::min", "cumsum")),
    ("element-wise", ("add", "mul", "sub", "div", "relu", "threshold", "sigmoid", "where", "fill_", "zero_", "neg",
                      "exp", "log", "masked", "clamp", "silu", "gelu", "pow", "sqrt", "rsqrt")),
)


TOP_OPS = 15  # ops listed by name in a profile


def op_class_seconds(profiler: Any, steps: int) -> dict[str, float]:
    """Self CPU seconds per step of each op class (self time: nothing counted twice), largest first; the rest is
    `other`."""
    totals: dict[str, float] = {}
    for event in profiler.key_averages():
        name = event.key.lower()
        kind = next((k for k, patterns in OP_CLASSES if any(p in name for p in patterns)), "other")
        totals[kind] = totals.get(kind, 0.0) + event.self_cpu_time_total / 1e6 / steps
    return dict(sorted(totals.items(), key=lambda item: -item[1]))


def top_op_seconds(profiler: Any, steps: int, count: int = TOP_OPS) -> dict[str, float]:
    """Self CPU seconds per step of the `count` most expensive ops: which ops of a class to work on."""
    seconds = {event.key: event.self_cpu_time_total / 1e6 / steps for event in profiler.key_averages()}
    return dict(sorted(seconds.items(), key=lambda item: -item[1])[:count])


def build_twin(params: dict[str, Any]) -> tuple[Any, list[Any], Any]:
    """(model, optimizers, loader) of the plain-PyTorch twin."""
    import torch
    from torch import nn

    from msit_rec.data.loader import ExamplesDataset, make_loader
    from msit_rec.data.spec import DatasetMeta
    from msit_rec.embeddings import EmbeddingLayout
    from msit_rec.fit_config import ModelConfig
    from msit_rec.model import RankingModel

    class PlainEmbeddings(nn.Module):
        """`BatchEmbeddings` in plain PyTorch: one `nn.Embedding` per table, behaviours packed [N, D] as it returns them."""

        def __init__(self, meta: DatasetMeta) -> None:
            super().__init__()
            self.layout = EmbeddingLayout.from_meta(meta)
            self.sparse_keys = [f.name for f in meta.features_of_kind("sparse")]
            self.tables = nn.ModuleDict()
            for spec in [*meta.features_of_kind("sparse"), *meta.features_of_kind("sequence")]:
                table = spec.table or spec.name
                if table not in self.tables and spec.name != "hist_scenario":
                    self.tables[table] = nn.Embedding(spec.cardinality, spec.embedding_dim, padding_idx=0, sparse=True)
            self.table_of = {s.name: s.table or s.name for s in meta.features}

        def forward(self, sparse, sequence, hist_len):
            batch = hist_len.shape[0]
            ids = sparse.values().view(len(self.sparse_keys), batch)  # [F, B]: one id per row and key
            column = {key: ids[i] for i, key in enumerate(self.sparse_keys)}
            pooled = torch.cat([self.tables[self.table_of[f]](column[f]) for f in self.layout.bag_features], -1)
            lists = dict(zip(sequence.keys(), sequence.values().split(sequence.length_per_key())))
            targets, behaviours = [], []
            for slot in self.layout.slots:
                behaviours.append(self.tables[slot.table](lists[slot.sequence]))  # [N, d]: the real behaviours
                targets.append(self.tables[slot.table](column[slot.target]))  # [B, d]
            return pooled, torch.cat(targets, -1), torch.cat(behaviours, -1)

    torch.set_num_threads(params["threads"])
    torch.manual_seed(0)
    meta = DatasetMeta.load(params["data"])
    model = RankingModel(meta, ModelConfig(), device=torch.device("cpu"))
    model.embeddings = PlainEmbeddings(meta)
    tables = list(model.embeddings.parameters())
    table_ids = {id(p) for p in tables}
    optimizers = [
        torch.optim.Adagrad(tables, lr=0.05),
        torch.optim.AdamW([p for p in model.parameters() if id(p) not in table_ids], lr=1e-3),
    ]
    loader = make_loader(ExamplesDataset(params["data"], "train", BATCH, shuffle=True, drop_last=True))
    return model, optimizers, loader


def twin_step(model: Any, optimizers: list[Any], batch: Any) -> None:
    import torch.nn.functional as F

    for optimizer in optimizers:
        optimizer.zero_grad()
    F.binary_cross_entropy_with_logits(model(batch), batch.label).backward()
    for optimizer in optimizers:
        optimizer.step()


def run_twin(params: dict[str, Any]) -> dict[str, Any]:
    model, optimizers, loader = build_twin(params)
    marks = []
    for i, batch in enumerate(loader):
        if i == params["warmup"] + params["steps"]:
            break
        twin_step(model, optimizers, batch)
        marks.append((time.perf_counter(), time.process_time()))
    return {**window_stats(marks, params["warmup"], BATCH), "threads": params["threads"], "peak_rss_mib": peak_rss_mib()}


def run_peer(params: dict[str, Any]) -> dict[str, Any]:
    """torch-rechub's DIN at msit's reference size, on the same batches (converted to its padded dicts untimed)."""
    import torch
    import torch.nn.functional as F
    from torch_rechub.basic.features import SequenceFeature, SparseFeature
    from torch_rechub.models.ranking import DIN

    from msit_rec.data.loader import ExamplesDataset, make_loader
    from msit_rec.data.spec import DatasetMeta
    from msit_rec.embeddings import EmbeddingLayout

    torch.set_num_threads(params["threads"])
    torch.manual_seed(0)
    meta = DatasetMeta.load(params["data"])
    layout = EmbeddingLayout.from_meta(meta)
    slots = [slot for slot in layout.slots if slot.target is not None]  # hist_item → item, hist_cat → category
    sparse = {f.name: SparseFeature(f.name, f.cardinality, f.embedding_dim) for f in meta.features_of_kind("sparse")}
    targets = [sparse[slot.target] for slot in slots]
    history = [SequenceFeature(slot.sequence, slot.cardinality, slot.dim, pooling="concat", shared_with=slot.target)
               for slot in slots]
    others = [feature for name, feature in sparse.items() if name not in {slot.target for slot in slots}]
    model = DIN(others, history, targets, mlp_params={"dims": [512, 256]}, attention_mlp_params={"dims": [64, 32]})
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = make_loader(ExamplesDataset(params["data"], "train", BATCH, shuffle=True, drop_last=True))
    inputs = []
    for batch in itertools.islice(loader, params["warmup"] + params["steps"]):
        columns = batch.sparse.values().view(len(batch.sparse.keys()), -1)  # [F, B]
        x = {key: columns[i] for i, key in enumerate(batch.sparse.keys())}
        for slot in slots:
            jagged = batch.sequence[slot.sequence]
            x[slot.sequence] = torch.nn.utils.rnn.pad_sequence(  # [B, L], 0-padded (rechub masks id 0)
                list(jagged.values().split(jagged.lengths().tolist())), batch_first=True)
        inputs.append((x, batch.label))
    marks = []
    for x, label in inputs:
        optimizer.zero_grad()
        F.binary_cross_entropy(model(x), label).backward()
        optimizer.step()
        marks.append((time.perf_counter(), time.process_time()))
    return {**window_stats(marks, params["warmup"], BATCH), "threads": params["threads"], "peak_rss_mib": peak_rss_mib()}


def run_floor(params: dict[str, Any]) -> dict[str, Any]:
    """The matmul floor of one training step: the twin's (the same dense modules as msit, so the same products), with
    the products in params["dtype"] (bf16: the floor of bf16-mixed training) and the attention's products tiled as
    params["tiling"] says: "whole" — one product per layer over all N behaviours, the model's products as such (the
    yardstick); "blocked" — the cache-sized row blocks the blocked unit really runs, each timed alone with its
    operands hot in cache, so faster per FLOP than the same product over N rows."""
    import torch
    from matmul_floor import matmul_floor  # benchmarks/ is the script's directory

    from msit_rec.modules import TargetAttention

    model, optimizers, loader = build_twin(params)
    for module in model.modules():
        if isinstance(module, TargetAttention):
            module.blocked = module.blocked and params["tiling"] == "blocked"
    batch = next(iter(loader))
    for _ in range(2):
        twin_step(model, optimizers, batch)
    floor = matmul_floor(lambda: twin_step(model, optimizers, batch), dtype=getattr(torch, params["dtype"]))
    floor["max_examples_per_s"] = round(BATCH / (floor["floor_ms"] / 1e3))
    return {**floor, "tiling": params["tiling"], "peak_rss_mib": peak_rss_mib()}


def run_loader(params: dict[str, Any]) -> dict[str, Any]:
    import torch

    from msit_rec.data.loader import ExamplesDataset, make_loader

    torch.set_num_threads(params["threads"])
    dataset = ExamplesDataset(params["data"], "train", BATCH, shuffle=True, drop_last=True)
    marks = [(time.perf_counter(), time.process_time())]
    for _ in make_loader(dataset):  # a whole epoch: batches cut from a buffer are cheap, row-group reads are not
        marks.append((time.perf_counter(), time.process_time()))
    return {**window_stats(marks, params["warmup"], BATCH), "peak_rss_mib": peak_rss_mib()}


WORKERS = {"lightning": run_lightning, "twin": run_twin, "peer": run_peer, "loader": run_loader, "floor": run_floor}


def worker_main(kind: str, params_json: str) -> None:
    from msit_rec.host import tune_glibc_malloc

    params = json.loads(params_json)
    if params["malloc_tune"]:
        tune_glibc_malloc()
    result = WORKERS[kind](params)
    rank = result.get("rank", 0)
    Path(f"{params['result']}.rank{rank}").write_text(json.dumps(result))


def measure(kind: str, params: dict[str, Any], scratch: Path, name: str) -> dict[str, Any]:
    """Run one configuration in fresh processes (Lightning launches the other ranks itself)."""
    result_file = scratch / f"{name}.json"
    params = {**params, "result": str(result_file), "scratch": str(scratch / name)}
    load = os.getloadavg()[0]
    subprocess.run(
        [sys.executable, __file__, "--worker", kind, json.dumps(params)], check=True, cwd=REPO,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL if not params.get("verbose") else None,
    )
    ranks = [json.loads(p.read_text()) for p in sorted(scratch.glob(f"{name}.json.rank*"))]
    for p in scratch.glob(f"{name}.json.rank*"):
        p.unlink()
    first = ranks[0]
    first["peak_rss_mib_per_process"] = [round(r["peak_rss_mib"]) for r in ranks]
    first.pop("peak_rss_mib")
    first["load_avg_1m_before"] = round(load, 2)
    return first


# ---- main -----------------------------------------------------------------------------------------------------


CONFIGS = [  # name, worker, extra params
    ("loader", "loader", {}),
    ("plain_twin", "twin", {}),
    ("peer_rechub_din", "peer", {}),
    ("train_1p pooled_bags", "lightning", {"devices": 1, "path": "pooled_bags"}),
    ("train_1p pooled_bags bf16-mixed", "lightning", {"devices": 1, "path": "pooled_bags", "precision": "bf16-mixed"}),
    ("train_2p pooled_bags", "lightning", {"devices": 2, "path": "pooled_bags"}),
    ("train_1p embedding_collection", "lightning", {"devices": 1, "path": "embedding_collection"}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks/results/bench_train.json")
    parser.add_argument("--data", type=Path, help="an already prepared examples directory (else one is generated)")
    parser.add_argument("--quick", action="store_true", help="smaller data, fewer steps, one repeat")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--only", nargs="+", help="measure only these configurations (names as in the table)")
    parser.add_argument("--no-malloc-tune", dest="malloc_tune", action="store_false")
    parser.add_argument("--verbose", action="store_true", help="show the workers' stderr")
    parser.add_argument("--profile", action="store_true",
                        help="1-process training rows: also the self CPU time per op class of the timed steps")
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "PARAMS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker_main(*args.worker)
        return
    warmup = args.warmup if args.warmup is not None else (3 if args.quick else 5)
    steps = args.steps if args.steps is not None else (8 if args.quick else 25)
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 2)
    from msit_rec.provenance import host_facts

    host = host_facts()
    print(f"host: {host.summary()}", flush=True)

    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        scratch = Path(tmp)
        started = time.perf_counter()
        data = args.data if args.data is not None else prepare_data(scratch, args.quick)
        data_info = describe_data(data)
        data_info["prepare_s"] = None if args.data is not None else round(time.perf_counter() - started, 1)
        print(f"data: {data} {data_info}")
        base = {"data": str(data), "threads": args.threads, "warmup": warmup, "malloc_tune": args.malloc_tune,
                "verbose": args.verbose}
        rows, skipped = [], {}
        for name, kind, extra in CONFIGS:
            if args.only and name not in args.only:
                continue
            if kind == "peer" and importlib.util.find_spec("torch_rechub") is None:
                skipped[name] = "torch-rechub is not installed (pip install --no-deps torch-rechub)"
                print(f"  {name:<32} skipped: {skipped[name]}", flush=True)
                continue
            params = {**base, **extra, "profile": args.profile and extra.get("devices") == 1}
            if kind == "lightning" and extra["path"] == "embedding_collection":
                params["steps"] = max(4, steps // 3)  # ~10× slower: fewer steps
            else:
                params["steps"] = steps
            runs = [measure(kind, params, scratch, f"{name.replace(' ', '_')}_{r}") for r in range(repeats)]
            best = max(runs, key=lambda r: r["examples_per_s"])
            row = {"name": name, **best, "all_examples_per_s": [r["examples_per_s"] for r in runs]}
            rows.append(row)
            print(f"  {name:<32} {row['examples_per_s']:>8} ex/s  (runs {row['all_examples_per_s']}, "
                  f"load {row['load_avg_1m_before']})", flush=True)
        floors = {}  # the matmul floor in each precision a training row ran in
        if not args.only or "floor" in args.only:
            dtypes = {"fp32": "float32", **({"bf16": "bfloat16"} if any(r["name"].endswith("bf16-mixed")
                                                                           for r in rows) else {})}
            for (precision, dtype), tiling in itertools.product(dtypes.items(), ("whole", "blocked")):
                key = precision if tiling == "whole" else f"{precision} blocked"
                floors[key] = measure("floor", {**base, "dtype": dtype, "tiling": tiling}, scratch,
                                      f"floor_{precision}_{tiling}")
        floor = floors.get("fp32")

    by_name = {r["name"]: r for r in rows}
    twin = by_name.get("plain_twin", {}).get("examples_per_s")
    train = by_name.get("train_1p pooled_bags", {}).get("examples_per_s")
    train_bf16 = by_name.get("train_1p pooled_bags bf16-mixed", {}).get("examples_per_s")
    bf16_floor = floors.get("bf16")
    for row in rows:
        row["ratio_vs_plain_twin"] = round(row["examples_per_s"] / twin, 2) if twin else None
    loader = by_name.get("loader", {}).get("examples_per_s")
    peer = by_name.get("peer_rechub_din", {}).get("examples_per_s")
    summary = {
        "msit_1p_examples_per_s": train,
        "msit_share_of_matmul_floor": round(train / floor["max_examples_per_s"], 3) if train and floor else None,
        "msit_share_of_blocked_matmul_floor": (
            round(train / floors["fp32 blocked"]["max_examples_per_s"], 3) if train and floor else None),
        "msit_over_peer": round(train / peer, 2) if train and peer else None,
        "msit_bf16_over_fp32": round(train_bf16 / train, 2) if train and train_bf16 else None,
        "msit_bf16_share_of_bf16_matmul_floor": (
            round(train_bf16 / bf16_floor["max_examples_per_s"], 3) if train_bf16 and bf16_floor else None),
        "skipped": skipped,
        "target_1p_examples_per_s": 25_000,
        "loader_over_training": round(loader / train, 2) if loader and train else None,
        "target_loader_over_training": 5.0,
        "matmul_floor": floor,
        "matmul_floor_bf16": bf16_floor,
        "matmul_floor_blocked": floors.get("fp32 blocked"),
        "matmul_floor_bf16_blocked": floors.get("bf16 blocked"),
    }
    print(f"\nmsit, B={BATCH}, {data_info['sparse_features']} sparse features, L={data_info['max_len']} "
          f"(mean hist_len {data_info['mean_hist_len']}), threads={args.threads}, malloc_tune={args.malloc_tune}, "
          f"load avg now {os.getloadavg()[0]:.2f}")
    print(f"{'configuration':<32}{'ex/s':>9}{'vs twin':>9}{'median ms':>11}{'cpu s/step':>11}{'peak RSS MiB':>16}")
    for r in rows:
        ratio = f"{r['ratio_vs_plain_twin']:.2f}" if r["ratio_vs_plain_twin"] is not None else "-"
        rss = "/".join(str(x) for x in r["peak_rss_mib_per_process"])
        print(f"{r['name']:<32}{r['examples_per_s']:>9}{ratio:>9}{r['median_step_ms']:>11}{r['cpu_s_per_step']:>11}"
              f"{rss:>16}")
    for r in rows:
        if "op_class_ms_per_step" in r:  # what the step spends its time on, beside the floor of its products
            total = sum(r["op_class_ms_per_step"].values())
            shares = ", ".join(f"{k} {v:.0f} ms ({v / total:.0%})" for k, v in r["op_class_ms_per_step"].items())
            print(f"profile of {r['name']} (self CPU ms per step, {total:.0f} in all): {shares}")
            top = ", ".join(f"{k} {v:.1f}" for k, v in r["top_op_ms_per_step"].items())
            print(f"  its {len(r['top_op_ms_per_step'])} costliest ops (ms per step): {top}")
    for each in floors.values():
        print(f"{each['dtype']} matmul floor of one step, attention products {each['tiling']} "
              f"({each['matmuls']} products, {each['gflop']} GFLOP, alone, "
              f"best of 5): {each['floor_ms']} ms at {each['matmul_gflops']} GFLOP/s (large-GEMM peak "
              f"{each['peak_gflops']}) → at most {each['max_examples_per_s']} ex/s from the matmuls alone")
    print(f"summary: {summary}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "settings": {"batch": BATCH, "threads": args.threads, "warmup": warmup, "steps": steps, "repeats": repeats,
                     "malloc_tune": args.malloc_tune, "quick": args.quick, "generator": (
                         QUICK_GENERATOR_SETTINGS if args.quick else GENERATOR_SETTINGS) if args.data is None else None,
                     "model": "msit, attention 64-32, tower 512-256"},
        "data": data_info,
        "machine": {**asdict(host), "load_avg": os.getloadavg()},
        "rows": rows,
        "summary": summary,
    }
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
