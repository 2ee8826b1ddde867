"""Which of a user's behaviours each candidate was scored on: the k largest attention weights per row.

The program returns each behaviour's weight [B, L] in the row's interest (α, times msit's transfer weight g) over
the behaviours it kept (the most recent `max_len`, oldest first); callers want them as indices into the history
they sent, largest |weight| first: under sum pooling a weight can be negative, and a large negative one moves the
interest as much as a large positive one. Ties go to the more recent behaviour.
"""

from __future__ import annotations

import torch


def top_behaviours(
    attention: torch.Tensor,  # [B, L] weight of each row's behaviours, positions ≥ kept are padding
    kept: torch.Tensor,  # [B] int64 behaviours the program kept per row (its context's hist_len)
    sent: torch.Tensor,  # [B] int64 behaviours each row's history had as sent (≥ kept: the oldest were dropped)
    k: int,
) -> list[list[tuple[int, float]]]:
    """Per row: up to k (index into the history as sent, weight) pairs, largest |weight| first."""
    length = attention.shape[1]
    take = min(k, length)
    real = torch.arange(length) < kept[:, None]  # [B, L]
    recent_first = attention.abs().masked_fill(~real, -1.0).flip(1)  # a stable sort then prefers recent ties
    order = torch.sort(recent_first, dim=1, descending=True, stable=True).indices[:, :take]  # [B, take]
    position = length - 1 - order  # [B, take] in the program's layout
    weights = attention.gather(1, position)
    index = position + (sent - kept)[:, None]  # positions in the sent history
    counts = kept.clamp(max=take).tolist()
    return [list(zip(index[row, :n].tolist(), weights[row, :n].tolist())) for row, n in enumerate(counts)]
