"""Scenario-aware prediction tower: input gate (EPNet), optional per-layer gates (PPNet) or STAR layers, → logit."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from msit_rec.modules.mlp import MLP


class ScenarioScale(nn.Module):
    """`γ·σ(W e(s) + c)`: per-feature multipliers in (0, γ) computed from the scenario embedding (EPNet/PPNet gate).

    With γ = 2 (as in EPNet/PPNet) and W, c initialised to zero the gate is exactly 1 at the start: the network begins
    as the ungated one, at the point of σ's largest slope, and learns per scenario to amplify (up to ×2) or damp
    each feature. Zero weights do not stall learning: W's gradient is σ'·γ·(upstream ⊙ x)·e(s), not through W.
    """

    def __init__(self, scenario_dim: int, dim: int) -> None:
        super().__init__()
        self.scale = 2.0
        self.linear = nn.Linear(scenario_dim, dim)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, scenario_emb: torch.Tensor) -> torch.Tensor:
        """scenario_emb [B, E] → multipliers [B, dim]."""
        return self.scale * torch.sigmoid(self.linear(scenario_emb))


class ScenarioTower(nn.Module):
    """`x` [B, F] (RankingHead: `[pooled, target, interest, dense, e(s)]`) → (EPNet input gate) → MLP (PPNet hidden
    gates | STAR layers) → logit.

    Options map onto the model variants: `input_gate` (EPNet, `msit` and `pepnet`), `hidden_gates` (PPNet,
    `pepnet`), `num_scenarios` (STAR layers, `star`); all off is the plain tower of `shared`/`din`.
    """

    def __init__(
        self,
        in_dim: int,
        scenario_dim: int,
        hidden_dims: Sequence[int] = (512, 256),
        *,
        activation: str = "relu",
        dropout: float = 0.0,
        input_gate: bool = True,
        hidden_gates: bool = False,
        num_scenarios: int | None = None,
    ) -> None:
        super().__init__()
        self.input_gate = ScenarioScale(scenario_dim, in_dim) if input_gate else None
        self.hidden_gates = nn.ModuleList(ScenarioScale(scenario_dim, h) for h in hidden_dims) if hidden_gates else None
        self.mlp = MLP(in_dim, hidden_dims, out_dim=1, activation=activation, dropout=dropout, num_scenarios=num_scenarios)
        self.output_dim = 1

    def forward(
        self,
        x: torch.Tensor,  # [B, F]
        scenario_emb: torch.Tensor,  # [B, E]
        scenario: torch.Tensor | None = None,  # [B] int, needed with STAR layers
    ) -> torch.Tensor:  # [B] logits
        if self.input_gate is not None:
            x = self.input_gate(scenario_emb) * x
        scales = None if self.hidden_gates is None else [gate(scenario_emb) for gate in self.hidden_gates]
        return self.mlp(x, scenario, scales).squeeze(-1)
