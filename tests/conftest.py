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
