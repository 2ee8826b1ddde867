"""Operations over packed behaviours, whose rows are grouped by the example (segment) they belong to."""

from __future__ import annotations

import torch


def pool_packed(weights: torch.Tensor, behaviours: torch.Tensor, example: torch.Tensor, batch: int) -> torch.Tensor:
    """Interest [B, D]: Σ_j α_j b_j over each row's packed behaviours (weights [N], behaviours [N, D], example [N]);
    zero for a row without behaviours. Sum pooling is this with α_j = 1."""
    return behaviours.new_zeros(batch, behaviours.shape[1]).index_add_(0, example, weights[:, None] * behaviours)


def segment_softmax(scores: torch.Tensor, segment: torch.Tensor, segments: int) -> torch.Tensor:
    """Softmax of `scores` [N] within each segment (`segment` [N] in [0, segments)); empty segments are simply absent."""
    peak = scores.new_full((segments,), float("-inf")).scatter_reduce_(0, segment, scores.detach(), "amax")  # [S]
    exp = (scores - peak.index_select(0, segment)).exp()  # the shift cancels out: no gradient needed through it
    total = exp.new_zeros(segments).index_add_(0, segment, exp)  # [S]
    return exp / total.index_select(0, segment)
