"""What Lightning's launcher leaves in the launching process, and how tests undo it or keep it from children."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch.distributed as dist

# Environment variables Lightning's launcher writes into the launching process.
LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "GLOBAL_RANK",
              "PL_GLOBAL_SEED", "PL_SEED_WORKERS", "OMP_NUM_THREADS")


@contextmanager
def launch_env_restored() -> Iterator[None]:
    """Run the block without the launch variables, then restore the environment and destroy the world-size-1
    process group an in-process `fit` leaves initialised."""
    with pytest.MonkeyPatch.context() as mp:
        for key in LAUNCH_ENV:
            mp.delenv(key, raising=False)
        try:
            yield
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
