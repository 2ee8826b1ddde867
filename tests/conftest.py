"""Fixtures shared by test modules, and the marker rules: `slow` for every test that trains or spawns processes
(itself, or through a fixture that requests `slow_setup`), `shared_data` for every test that reads ../shared/data.

Plain helpers shared by several modules live beside this file (launch.py, checkpoints.py, training_worker.py,
random_model.py, rank_requests.py, reference.py, raw_logs.py, toy_model.py); test modules never import each other."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.launch import launch_env_restored

# Real public data for adapter and quality tests lives next to the repository, never inside it.
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`../shared/data` from the repo root; tests that need it skip, saying why, when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"needs the shared real-data folder {SHARED_DATA} (../shared/data from the repo root); absent here")
    return SHARED_DATA


@pytest.fixture(scope="session")
def slow_setup() -> None:
    """Requested by every fixture that trains a model or spawns processes: the tests that use such a fixture, however
    indirectly, are marked `slow` (`make test-fast` deselects them and the fixture never runs)."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that uses `shared_data` (so `-m "not shared_data"` deselects them all), and every test that
    depends on `slow_setup` as slow."""
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        if "shared_data" in fixtures:
            item.add_marker(pytest.mark.shared_data)
        if "slow_setup" in fixtures:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="module")
def in_process_launch_env() -> Iterator[None]:
    """Undo what one-process Lightning runs leave behind (launch env vars, the world-size-1 process group). Opt-in:
    modules that fit in-process say `pytestmark = pytest.mark.usefixtures("in_process_launch_env")`."""
    with launch_env_restored():
        yield


# A small prepared dataset (configs/generate/tiny.yaml → configs/datasets/synthetic.yaml, histories of at most
# SMALL_MAX_LEN), made once per session: model and training tests read batches from it.
SMALL_MAX_LEN = 5


@pytest.fixture(scope="session")
def small_examples(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Examples directory (dataset.json + train/valid/test shards) of ~30k generated impressions."""
    from msit_rec.config import load_config
    from pipelines.config import DatasetConfig
    from pipelines.prepare import prepare
    from pipelines.synthetic import generate
    from pipelines.synthetic_config import GeneratorConfig

    repo = Path(__file__).resolve().parents[1]
    root = tmp_path_factory.mktemp("small_examples")
    generate(load_config(repo / "configs/generate/tiny.yaml", GeneratorConfig, "generate"), root / "raw", progress=False)
    dataset = load_config(
        repo / "configs/datasets/synthetic.yaml", DatasetConfig, "dataset",
        overrides=[f"source.path={root / 'raw'}", f"history.max_len={SMALL_MAX_LEN}"],
    )
    prepare(dataset, root / "examples")
    # the same log with contract v2 histories: every impression, each with its feedback (clicked or not)
    dataset.history.events, dataset.history.feedback = "all", "label"
    prepare(dataset, root / "feedback_examples")
    return root / "examples"


@pytest.fixture(scope="session")
def feedback_examples(small_examples: Path) -> Path:
    """`small_examples`' log prepared with `history: {events: all, feedback: label}` (hist_feedback)."""
    return small_examples.parent / "feedback_examples"


# configs/generate/transfer.yaml (each scenario lifted by recent clicks from ONE other scenario), prepared with
# benchmarks/bench_quality.py's split: the quality claim of tests/test_training.py and tests/test_explain.py.
TRANSFER_PREPARE = ("history.max_len=20", "split.valid_fraction=0.1", "split.test_fraction=0.2")


@pytest.fixture(scope="session")
def transfer_examples(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from msit_rec.config import load_config
    from pipelines.config import DatasetConfig
    from pipelines.prepare import prepare
    from pipelines.synthetic import generate
    from pipelines.synthetic_config import GeneratorConfig

    repo = Path(__file__).resolve().parents[1]
    root = tmp_path_factory.mktemp("transfer")
    generate(load_config(repo / "configs/generate/transfer.yaml", GeneratorConfig, "generate"), root / "raw",
             progress=False)
    config = load_config(repo / "configs/datasets/synthetic.yaml", DatasetConfig, "dataset",
                         [f"source.path={root / 'raw'}", *TRANSFER_PREPARE])
    prepare(config, root / "examples")
    return root / "examples"


# ---- serving: the prepared test split as raw requests, a tiny trained run and its fp32 artifact ------------------
# (tests/test_serving.py, tests/test_server_limits.py)


@pytest.fixture(scope="session")
def decoded(small_examples: Path) -> dict[str, Any]:
    """Raw JSON rows for every test example (inverse vocabularies; OOV → unknown or null; a few odd spellings),
    the prepared frame they came from, and rows whose histories got extra older behaviours (must be cut)."""
    import polars as pl

    from msit_rec.data.spec import OOV_INDEX, DatasetMeta
    from tests.rank_requests import UNKNOWN_ID

    meta = DatasetMeta.load(small_examples)
    frame = pl.concat([pl.read_parquet(small_examples / f) for f in meta.splits["test"].files])
    inverse = {}
    for spec in meta.features_of_kind("sparse"):
        vocab = pl.read_parquet(small_examples / spec.vocabulary)
        inverse[spec.name] = dict(zip(vocab["index"].to_list(), vocab["raw"].to_list()))
    columns = meta.config["columns"]
    required = {columns["user"], columns["item"]}

    def raw_id(feature: str, index: int, row: int) -> Any:
        spec = meta.feature(feature)
        if index == OOV_INDEX:
            return UNKNOWN_ID + row if spec.source in required or row % 2 else None
        value = inverse[feature][index]
        return str(value) if row % 3 == 0 and feature == "brand" else value  # "123" for an int vocabulary

    def behaviour(item: int, cat: int, scenario: int, row: int) -> dict[str, Any]:
        return {"item_id": raw_id("item", item, row), "item_cat": raw_id("category", cat, row),
                "scenario": meta.scenarios[scenario]}

    max_len = meta.history.max_len
    records, extended = [], []
    for row, example in enumerate(frame.iter_rows(named=True)):
        record = {meta.feature(f.name).source: raw_id(f.name, example[f.name], row) for f in meta.features_of_kind("sparse")}
        for spec in meta.features_of_kind("dense"):
            stats = meta.numeric_stats[spec.name]
            record[spec.source] = float(example[spec.name]) * stats.std + stats.mean
        record["scenario"] = meta.scenarios[example["scenario"]]
        record["history"] = [behaviour(i, c, s, row) for i, c, s in
                             zip(example["hist_item"], example["hist_cat"], example["hist_scenario"])]
        if example["hist_len"] == max_len and row % 2 == 0:  # older behaviours beyond max_len: dropped by encoding
            record["history"] = [behaviour(2, 2, 0, row), behaviour(3, 2, 1, row)] + record["history"]
            extended.append(row)
        records.append(record)
    return {"meta": meta, "frame": frame, "records": records, "extended": extended, "root": small_examples}



@pytest.fixture(scope="session")
def exported(decoded: dict, tmp_path_factory: pytest.TempPathFactory, slow_setup: None) -> dict[str, Any]:
    """A tiny trained msit run, its fp32 artifact, and the eager model's logits on every test row (file order)."""
    import numpy as np
    import torch

    from msit_rec.data.loader import ExamplesDataset, make_loader
    from msit_rec.export import export_run
    from msit_rec.run_dir import load_model, read_run, resolve_checkpoint
    from msit_rec.train.fit import fit
    from tests.training_worker import tiny_fit_config

    root = tmp_path_factory.mktemp("serving")
    with launch_env_restored():
        fit(tiny_fit_config("msit"), decoded["root"], root / "run")
    export_run(root / "run", root / "artifact", progress=False)
    run = read_run(root / "run")
    model = load_model(run, resolve_checkpoint(run, "best"), decoded["meta"], torch.device("cpu"))
    logits = np.zeros(len(decoded["frame"]), dtype=np.float32)
    with torch.no_grad():
        for batch in make_loader(ExamplesDataset(decoded["root"], "test", 4096)):
            real = batch.weight > 0
            logits[batch.row_index[real].numpy()] = model(batch)[real].numpy()
    return {"artifact": root / "artifact", "eager_logits": logits, "root": root}


@pytest.fixture(scope="session")
def artifact(exported: dict) -> Any:
    from msit_rec.serving.artifact import load_artifact

    return load_artifact(exported["artifact"], backend="export")
