"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

# Real public data for adapter and quality tests lives next to the repository, never inside it.
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`../shared/data` from the repo root; tests that need it skip, saying why, when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"needs the shared real-data folder {SHARED_DATA} (../shared/data from the repo root); absent here")
    return SHARED_DATA


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that uses `shared_data`, so `-m "not shared_data"` deselects them all."""
    for item in items:
        if "shared_data" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.shared_data)


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
