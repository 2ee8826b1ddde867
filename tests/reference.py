"""DIN's target attention as the formula is written: the oracle of the fast TargetAttention in tests/test_modules.py
and the naive speed baseline of benchmarks/bench_attention.py.

`α_j = MLP([b_j, t, b_j ⊙ t, b_j − t, e(s)])` on the materialised [B, L, 4D+E] concatenation, with the module's own
layers (`first` over the concatenation, `first_activation`, `rest`), so the same weights give the same function. None
of TargetAttention's tricks (block-wise first layer, shared contexts, packed behaviours) appear here.
"""

from __future__ import annotations

import torch

from msit_rec.modules import TargetAttention


def din_scores(
    att: TargetAttention,
    behaviours: torch.Tensor,  # [B, L, D], padded
    target: torch.Tensor,  # [B, D]
    scenario_emb: torch.Tensor | None = None,  # [B, E], None when att.scenario_dim == 0
) -> torch.Tensor:  # [B, L] raw scores, padding not masked
    """The attention MLP on the concatenation `[b_j, t, b_j ⊙ t, b_j − t, e]` of every position (vectorised: the
    benchmark times it with autograd)."""
    batch, length, dim = behaviours.shape
    tt = target[:, None, :].expand(batch, length, dim)
    parts = [behaviours, tt, behaviours * tt, behaviours - tt]
    if scenario_emb is not None:
        parts.append(scenario_emb[:, None, :].expand(batch, length, scenario_emb.shape[-1]))
    hidden = att.first_activation(att.first(torch.cat(parts, dim=-1)).reshape(batch * length, -1))
    return att.rest(hidden).reshape(batch, length)


def din_interest(
    att: TargetAttention,
    behaviours: torch.Tensor,  # [B, L, D], padded
    target: torch.Tensor,  # [B, D]
    mask: torch.Tensor,  # [B, L] bool, True on real behaviours
    scenario_emb: torch.Tensor | None = None,  # [B, E]
) -> torch.Tensor:  # [B, D]
    """`interest = Σ_j α_j b_j` over each example's real positions, one example at a time: raw scores as weights
    ("sum" pooling) or their softmax over the real positions; zero for an empty history. Run it in float64 when it is
    an oracle."""
    scores = din_scores(att, behaviours, target, scenario_emb)
    out = torch.zeros(target.shape[0], behaviours.shape[-1], dtype=behaviours.dtype)
    for i in range(target.shape[0]):
        real = mask[i].nonzero().squeeze(1)
        weights = scores[i, real].softmax(0) if att.pooling == "softmax" else scores[i, real]
        out[i] = (weights[:, None] * behaviours[i, real]).sum(0)
    return out
