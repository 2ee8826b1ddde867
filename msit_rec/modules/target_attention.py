"""DIN-style target attention over the behaviour sequence, optionally conditioned on the served scenario."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from msit_rec.errors import ConfigError
from msit_rec.modules.blocked_attention import AttentionUnit, blocked_interest
from msit_rec.modules.mlp import MLP, make_activation
from msit_rec.modules.segments import pool_packed, segment_softmax

Pooling = Literal["sum", "softmax"]


def lengths_to_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """lengths [B] → bool mask [B, max_len], True on the first `lengths[b]` (real) positions."""
    return torch.arange(max_len, device=lengths.device) < lengths[:, None]


class TargetAttention(nn.Module):
    """`α_j = MLP([b_j, t, b_j ⊙ t, b_j − t, e(s)])`, `interest = Σ_j α_j b_j` over the real (unmasked) positions.

    Pooling: "sum" uses the raw scores as weights, as DIN does, so the interest keeps the *intensity* of the
    user's interest (how many matching behaviours), which a softmax would normalise away; "softmax" normalises the
    scores over the real positions. An empty history gives a zero interest in both.

    Speed: the first layer is linear in its input, so `W1` is applied block-wise instead of to the concatenation:
    `W1·[b, t, b⊙t, b−t, e] = (W_b + W_d)·b + W_p·(t⊙b) + (W_t − W_d)·t + W_e·e`. The last two terms are per
    example ([B, H], broadcast over L), so the per-behaviour work is D×H for `t⊙b` (plus D×H for `b` once per
    sequence) instead of (4D+E)×H, and no [B, L, 4D+E] tensor is built. `first.weight` keeps the layout of the
    concatenated formula (blocks b, t, b⊙t, b−t, e), so the result equals the naive formula with the same weights.

    Two layouts of the same function:
    - `forward`: padded behaviours [C, L, D] with a mask — static shapes, what the exported serving program uses;
      it returns the interest and each behaviour's weight (times an optional per-behaviour `scale`, the gate).
      Rows may share a sequence (`context`: all candidates of a /rank request read one history). With one context
      for every row, `(t⊙b_l)·W_p = t·(b_l ⊙ W_p)` makes the per-behaviour term one `[B, D] × [D, L·H]` product
      and the pooling one `[B, L] × [L, D]` product: the behaviours are never copied per row. With several shared
      contexts, the `(W_b + W_d)·b` term runs once per sequence and only `(t⊙b)·W_p` per row, as one
      `[B·L, D] × [D, H]` matmul; with a sequence per row (batch scoring) one batched matmul with a per-row `[D, H]`
      weight does less work. `torch.cond`s on C = 1 and C < B pick the branch, in the exported program too.
      `weights_of` (masking, softmax, gate) is the part every branch and the naive baseline share.
    - `interest_packed`: only the real behaviours [N, D] with the example of each — what training uses; the weights
      α_j are what `msit-rec explain` reports. It skips the padded positions entirely (a quarter to a half of the
      work at usual history lengths). With ReLU (the default activation) it runs the cache-blocked fused unit
      (msit_rec/modules/blocked_attention.py); other activations compose `weights_packed` and `pool_packed`, which
      run the first layer as two `[N, D] × [D, H]` products over b and b⊙t.
    Tests check every layout against the naive concatenation formula, and the blocked unit against the composed one.

    `scenario_dim=0` drops the e(s) input (the `din` variant).
    """

    def __init__(
        self,
        dim: int,
        hidden_dims: Sequence[int] = (64, 32),
        *,
        scenario_dim: int = 0,
        activation: str = "relu",
        pooling: Pooling = "sum",
    ) -> None:
        super().__init__()
        if pooling not in ("sum", "softmax"):
            raise ConfigError(f"attention pooling: got {pooling!r}, expected 'sum' or 'softmax'")
        if not hidden_dims:
            raise ConfigError("attention hidden_dims: expected at least one layer, got none")
        self.dim = dim
        self.output_dim = dim  # the interest is a weighted sum of behaviours
        self.scenario_dim = scenario_dim
        self.pooling = pooling
        self.first = nn.Linear(4 * dim + scenario_dim, hidden_dims[0])  # over [b, t, b⊙t, b−t, e]
        self.first_activation = make_activation(activation, hidden_dims[0])
        self.rest = MLP(hidden_dims[0], hidden_dims[1:], out_dim=1, activation=activation)
        self.blocked = activation == "relu"  # the fused unit's backward knows ReLU only

    def _blocks(self, dim: int) -> tuple[torch.Tensor, ...]:
        """`first.weight` split into its input blocks b, t, b⊙t, b−t, e: five [H, ·] views."""
        return self.first.weight.split([dim, dim, dim, dim, self.scenario_dim], dim=1)

    def _per_example(self, target: torch.Tensor, scenario_emb: torch.Tensor | None) -> torch.Tensor:
        """The first layer's terms that do not depend on the behaviour: `(W_t − W_d)·t + W_e·e + bias`, [B, H]."""
        if (scenario_emb is None) != (self.scenario_dim == 0):
            raise ValueError(f"scenario_emb must be given exactly when scenario_dim > 0 (it is {self.scenario_dim})")
        _, w_t, _, w_d, w_e = self._blocks(target.shape[-1])
        per_example = F.linear(target, w_t - w_d, self.first.bias)  # [B, H]
        if scenario_emb is not None:
            per_example = per_example + F.linear(scenario_emb, w_e)
        return per_example

    def _scores(self, hidden: torch.Tensor) -> torch.Tensor:  # [B, L] from the first layer's output [B, L, H]
        batch, length, width = hidden.shape
        return self.rest(self.first_activation(hidden.reshape(batch * length, width))).reshape(batch, length)

    def weights_of(
        self,
        scores: torch.Tensor,  # [B, L] raw attention scores
        mask: torch.Tensor,  # [B, L] bool, True on real behaviours
        scale: torch.Tensor | None,  # [B, L] a factor of each behaviour's weight, or None
    ) -> torch.Tensor:  # [B, L] α (· scale), 0 on padding
        if self.pooling == "softmax":
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min).softmax(dim=-1)
        weights = scores.masked_fill(~mask, 0.0)  # also zeroes the uniform softmax of an empty history
        return weights if scale is None else weights * scale

    def _first_per_row(self, rows: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """`(W_b + W_d)·b + W_p·(t⊙b)` [B, L, H] as one batched matmul with a per-row weight `[B, D, H]`: D×H per
        behaviour."""
        w_b, _, w_p, w_d, _ = self._blocks(target.shape[-1])
        return torch.bmm(rows, (w_b + w_d).t() + target[:, :, None] * w_p.t())

    def _attend_one_context(
        self,
        behaviours: torch.Tensor,  # [1, L, D]
        target: torch.Tensor,
        per_example: torch.Tensor,  # [B, 1, H]
        mask: torch.Tensor,  # [B, L]
        scale: torch.Tensor,  # [B, L]
        context: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every row reads the one context (a /rank request): `(t⊙b_l)·W_p = t·(b_l ⊙ W_p)`, so one
        `[B, D] × [D, L·H]` product over the L scaled copies of W_p gives the first layer of every row's every
        behaviour, and the pooling is one `[B, L] × [L, D]` product — the behaviours are never copied per row and
        no b⊙t pass runs over such a copy; `(W_b + W_d)·b` runs once ([L, H])."""
        w_b, _, w_p, w_d, _ = self._blocks(target.shape[-1])
        sequence = behaviours[0]  # [L, D]
        scaled = (sequence[:, :, None] * w_p.t()).transpose(0, 1).reshape(sequence.shape[1], -1)  # [D, L·H]
        hidden = per_example + torch.matmul(sequence, (w_b + w_d).t())  # [B, L, H]: the terms without t⊙b
        hidden.view(target.shape[0], -1).addmm_(target, scaled)
        weights = self.weights_of(self._scores(hidden), mask, scale)
        return torch.mm(weights.to(sequence.dtype), sequence), weights

    def _attend_of_contexts(
        self,
        behaviours: torch.Tensor,  # [C, L, D]
        target: torch.Tensor,
        per_example: torch.Tensor,
        mask: torch.Tensor,
        scale: torch.Tensor,
        context: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Several contexts: each row's sequence gathered once ([B, L, D]), for the first layer and the pooling."""
        rows = behaviours.index_select(0, context)
        hidden = torch.cond(
            behaviours.shape[0] < target.shape[0],
            self._first_shared,
            self._first_per_row_of,
            (behaviours, rows, target, per_example, context),
        )
        weights = self.weights_of(self._scores(hidden), mask, scale)
        return torch.bmm(weights.unsqueeze(1).to(rows.dtype), rows).squeeze(1), weights

    def _first_per_row_of(
        self,
        behaviours: torch.Tensor,
        rows: torch.Tensor,
        target: torch.Tensor,
        per_example: torch.Tensor,
        context: torch.Tensor,
    ) -> torch.Tensor:
        return self._first_per_row(rows, target).add_(per_example)

    def _first_shared(
        self,
        behaviours: torch.Tensor,
        rows: torch.Tensor,
        target: torch.Tensor,
        per_example: torch.Tensor,
        context: torch.Tensor,
    ) -> torch.Tensor:
        """The first layer [B, L, H] when rows share contexts: `(W_b + W_d)·b` once per context, then `(t⊙b)·W_p` per
        row as one `[B·L, D] × [D, H]` matmul — one large product instead of B small ones (faster in bench_serve), but
        D×H more per behaviour when every row has its own context."""
        w_b, _, w_p, w_d, _ = self._blocks(target.shape[-1])
        shared = torch.matmul(behaviours, (w_b + w_d).t()).index_select(0, context)  # [B, L, H]
        return torch.matmul(rows * target[:, None, :], w_p.t()).add_(shared).add_(per_example)

    def forward(
        self,
        behaviours: torch.Tensor,  # [C, L, D]
        target: torch.Tensor,  # [B, D]
        mask: torch.Tensor,  # [C, L] bool, True on real behaviours
        scenario_emb: torch.Tensor | None = None,  # [B, E]
        context: torch.Tensor | None = None,  # [B] int64 in [0, C); None: C = B, row b has context b
        scale: torch.Tensor | None = None,  # [C, L] a factor of each behaviour's weight (the scenario gate)
    ) -> tuple[torch.Tensor, torch.Tensor]:  # interest [B, D], weights α (· scale) [B, L] (0 on padding)
        per_example = self._per_example(target, scenario_emb)[:, None, :]  # [B, 1, H]
        if context is None:
            hidden = self._first_per_row(behaviours, target).add_(per_example)  # fresh: in place is safe
            weights = self.weights_of(self._scores(hidden), mask, scale)
            return torch.bmm(weights.unsqueeze(1).to(behaviours.dtype), behaviours).squeeze(1), weights
        mask = mask.index_select(0, context)  # [B, L]
        # the branches take tensors only: no gate scales by one (exact)
        scale = torch.ones_like(mask, dtype=target.dtype) if scale is None else scale.index_select(0, context)
        return torch.cond(  # in the exported program too: one context for every row, or several
            behaviours.shape[0] == 1,
            self._attend_one_context,
            self._attend_of_contexts,
            (behaviours, target, per_example, mask, scale, context),
        )

    def weights_packed(
        self,
        behaviours: torch.Tensor,  # [N, D] the real behaviours of the batch, example by example
        example: torch.Tensor,  # [N] int64, row of the batch each behaviour belongs to
        target: torch.Tensor,  # [B, D]
        scenario_emb: torch.Tensor | None = None,  # [B, E]
    ) -> torch.Tensor:  # [N] α_j: each behaviour's weight in its example's interest
        batch, dim = target.shape
        per_example = self._per_example(target, scenario_emb)  # [B, H]
        w_b, _, w_p, w_d, _ = self._blocks(dim)
        # two products into one [N, H]: addmm starts from each behaviour's per-example term, the second adds in place
        # (no [N, 2D] concatenation of [b, b⊙t], no separate pass to add the per-example term)
        hidden = torch.addmm(per_example.index_select(0, example), behaviours, (w_b + w_d).t())  # [N, H]
        paired = (behaviours * target.index_select(0, example)).to(hidden.dtype)  # [N, D] b⊙t; autocast: bf16 as hidden
        hidden = hidden.addmm_(paired, w_p.t().to(hidden.dtype))  # fresh: in place is safe
        hidden = self.first_activation(hidden)
        scores = self.rest(hidden).squeeze(1).to(behaviours.dtype)  # [N]
        return segment_softmax(scores, example, batch) if self.pooling == "softmax" else scores

    def interest_packed(
        self,
        behaviours: torch.Tensor,  # [N, D] the real behaviours of the batch, example by example
        example: torch.Tensor,  # [N] int64, row of the batch each behaviour belongs to
        lengths: torch.Tensor,  # [B] behaviours of each row
        target: torch.Tensor,  # [B, D]
        scenario_emb: torch.Tensor | None = None,  # [B, E]
        gate: torch.Tensor | None = None,  # [N] a factor of each behaviour's weight (the scenario gate)
    ) -> tuple[torch.Tensor, torch.Tensor]:  # interest [B, D], weights α·g [N]
        """Each row's interest `Σ_j α_j g_j b_j` and each behaviour's weight α_j·g_j in it (g = 1 without a gate)."""
        if not self.blocked:
            weights = self.weights_packed(behaviours, example, target, scenario_emb)
            weights = weights if gate is None else weights * gate
            return pool_packed(weights, behaviours, example, target.shape[0]), weights
        per_example = self._per_example(target, scenario_emb)  # [B, H]
        w_b, _, w_p, w_d, _ = self._blocks(target.shape[-1])
        unit = AttentionUnit(
            first_b=(w_b + w_d).t(),
            first_p=w_p.t(),
            hidden=tuple((linear.weight, linear.bias) for linear in self.rest.linears),
            out_weight=self.rest.out.weight,
            out_bias=self.rest.out.bias,
        )
        return blocked_interest(
            behaviours, example, lengths, target, per_example, unit, gate, softmax=self.pooling == "softmax"
        )
