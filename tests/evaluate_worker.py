"""One rank of the 2-process evaluation test (tests/test_evaluate.py launches two of these with gloo).

Usage: PYTHONPATH=<repo root> MASTER_ADDR=... MASTER_PORT=... python tests/evaluate_worker.py RANK WORLD RUN DATA OUT
Each rank (1) gathers its part of a synthetic score set whose ranks hold different row counts and scenario mixes
(plus padding rows), and (2) scores its keep-all share of the test split with the run's best checkpoint, gathers,
and computes the metrics. It writes OUT/rank{RANK}.pt; the test compares them with one process.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from msit_rec.config import to_dict
from msit_rec.metrics import ScoredRows, compute_metrics, gather_scored_rows

SYNTHETIC_SCENARIOS = ["a", "b", "c", "d", "e"]  # "e" never occurs: an empty scenario
SCORING_BATCH = 512


def synthetic_share(rank: int) -> ScoredRows:
    """Rank 0: 700 rows of scenarios {0, 1}; rank 1: 300 rows of scenarios {1, 2, 3} then 13 padding rows.
    Scores are rounded to 2 decimals (many ties); scenario 3 has no clicks (AUC undefined)."""
    generator = torch.Generator().manual_seed(100 + rank)
    count, scenarios = (700, [0, 1]) if rank == 0 else (300, [1, 2, 3])
    first_row = 0 if rank == 0 else 700
    scenario = torch.tensor(scenarios, dtype=torch.int32)[torch.randint(len(scenarios), (count,), generator=generator)]
    score = torch.round(torch.rand(count, generator=generator, dtype=torch.float64), decimals=2)
    label = (torch.rand(count, generator=generator, dtype=torch.float64) < score).to(torch.float32)
    label[scenario == 3] = 0.0
    rows = ScoredRows(
        row_index=torch.arange(first_row, first_row + count),
        score=score,
        label=label,
        scenario=scenario,
        user_id=torch.randint(40, (count,), generator=generator) * 1_000_003,  # raw keys, not indices
    )
    if rank == 1:
        padding = ScoredRows(
            row_index=torch.full((13,), -1),
            score=torch.zeros(13, dtype=torch.float64),
            label=torch.zeros(13),
            scenario=torch.zeros(13, dtype=torch.int32),
            user_id=torch.zeros(13, dtype=torch.int64),
        )
        rows = ScoredRows.concat([rows, padding])
    return rows


def main(rank: int, world: int, run_dir: Path, data_dir: Path, out_dir: Path) -> None:
    from msit_rec.data.loader import ExamplesDataset, make_loader
    from msit_rec.data.spec import DatasetMeta
    from msit_rec.evaluate import score_rows
    from msit_rec.run_dir import load_model, read_run, resolve_checkpoint

    dist.init_process_group("gloo", rank=rank, world_size=world)
    synthetic = gather_scored_rows(synthetic_share(rank))
    run = read_run(run_dir)
    meta = DatasetMeta.load(data_dir)
    device = torch.device("cpu")
    model = load_model(run, resolve_checkpoint(run, "best"), meta, device)
    dataset = ExamplesDataset(data_dir, "test", SCORING_BATCH, rank=rank, world_size=world)
    local = score_rows(model, make_loader(dataset), device, progress=False)
    scored = gather_scored_rows(local)
    torch.save(
        {
            "synthetic_rows": synthetic,
            "synthetic": to_dict(compute_metrics(synthetic, SYNTHETIC_SCENARIOS)),
            "local_rows": len(local),
            "local_scenarios": torch.bincount(local.scenario.long(), minlength=len(meta.scenarios)),
            "model_rows": scored,
            "model": to_dict(compute_metrics(scored, meta.scenarios)),
        },
        out_dir / f"rank{rank}.pt",
    )
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    rank_arg, world_arg, run_arg, data_arg, out_arg = sys.argv[1:6]
    main(int(rank_arg), int(world_arg), Path(run_arg), Path(data_arg), Path(out_arg))
