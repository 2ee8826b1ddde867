"""The model body after the embedding lookups, shared by training (RankingModel) and serving (ServingModel)."""

from __future__ import annotations

import torch
from torch import nn

from msit_rec.fit_config import GateRecency, ModelConfig
from msit_rec.modules.scenario_gate import ScenarioGate
from msit_rec.modules.segments import pool_packed
from msit_rec.modules.target_attention import TargetAttention
from msit_rec.modules.tower import ScenarioTower


class RankingHead(nn.Module):
    """Scenario embedding e(s) → behaviour gate → target attention (or sum pooling) → scenario-aware tower → logit.

    The variant (`ModelConfig.parts`) decides which parts exist. Behaviours come in two layouts of the same function:
    packed — the N real behaviours, what training looks up (`gate_packed`, `interest_packed`) — and padded per
    context with a mask, what the exported program takes (`gate_padded`, `interest_padded`). `forward` is the tail
    both share: the tower over `[pooled, target, interest, dense, e(s)]`, whose width comes from the parts' output
    dims. Shapes: the legend in msit_rec/modules/__init__.py.
    """

    def __init__(
        self,
        config: ModelConfig,
        pooled_dim: int,
        dim: int,
        dense_dim: int,
        scenario_dim: int,
        num_scenarios: int,
        feedback_values: int = 0,  # V of the behaviours' feedback the gate conditions on; 0 = none
        recency: GateRecency = "none",  # how the gate weighs behaviours by their age (ScenarioGate)
    ) -> None:
        super().__init__()
        parts = config.parts
        self.parts = parts
        # S rows: a plain dense (replicated) table; absent when the variant never looks at the scenario
        self.scenario_embedding = nn.Embedding(num_scenarios, scenario_dim) if parts.uses_scenario else None
        self.gate = (
            ScenarioGate(dim, scenario_dim, num_scenarios, feedback_values, recency) if parts.behaviour_gate else None
        )
        self.attention = (
            TargetAttention(
                dim,
                config.attention_hidden,
                scenario_dim=scenario_dim if parts.attention_scenario else 0,
                activation=config.activation,
                pooling=config.pooling,
            )
            if parts.attention
            else None
        )
        interest_dim = self.attention.output_dim if self.attention is not None else dim  # sum pooling keeps D
        tower_in = pooled_dim + dim + interest_dim + dense_dim + (scenario_dim if parts.scenario_input else 0)
        self.tower = ScenarioTower(
            tower_in,
            scenario_dim,
            config.tower_hidden,
            activation=config.activation,
            dropout=config.dropout,
            input_gate=parts.input_gate,
            hidden_gates=parts.hidden_gates,
            num_scenarios=num_scenarios if parts.star else None,
        )
        self.output_dim = self.tower.output_dim

    def scenario_vectors(self, scenario: torch.Tensor) -> torch.Tensor | None:
        """e(s) [B, E] of each row's served scenario [B]; None for variants that never read it."""
        return self.scenario_embedding(scenario) if self.scenario_embedding is not None else None

    def _attention_scenario(self, scenario_emb: torch.Tensor | None) -> torch.Tensor | None:
        return scenario_emb if self.parts.attention_scenario else None

    def gate_packed(
        self,
        behaviours: torch.Tensor,
        own: torch.Tensor,
        served: torch.Tensor,
        feedback: torch.Tensor | None,
        age: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The transfer weight g [N] of each behaviour [N, D] for (served [N], own scenario [N], feedback [N] or
        None, age [N]: scenario_gate.age_packed); requires a gate."""
        return self.gate.values_packed(behaviours, own, served, self.scenario_embedding.weight, feedback, age)

    def gate_padded(
        self,
        behaviours: torch.Tensor,
        own: torch.Tensor,
        scenario: torch.Tensor,
        feedback: torch.Tensor | None,
        age: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """The transfer weight g [C, L] of behaviours [C, L, D] for (served scenario [C], own scenario [C, L],
        feedback [C, L] or None, age [C, L]: scenario_gate.age_padded); None without a gate."""
        if self.gate is None:
            return None
        return self.gate(behaviours, own, scenario, self.scenario_embedding.weight, feedback, age)

    def interest_packed(
        self,
        behaviours: torch.Tensor,  # [N, D]
        example: torch.Tensor,  # [N] int64, the row of each behaviour
        lengths: torch.Tensor,  # [B] behaviours per row
        target: torch.Tensor,  # [B, D]
        scenario_emb: torch.Tensor | None,  # [B, E]
        gate: torch.Tensor | None = None,  # [N] each behaviour's transfer weight g (gate_packed)
    ) -> tuple[torch.Tensor, torch.Tensor]:  # interest [B, D], each behaviour's weight α·g [N]
        """The packed twin of `interest_padded`: each row's interest and each behaviour's weight in it (α = 1 under
        sum pooling), times its gate."""
        if self.attention is not None:
            return self.attention.interest_packed(
                behaviours, example, lengths, target, self._attention_scenario(scenario_emb), gate
            )
        weights = behaviours.new_ones(behaviours.shape[0]) if gate is None else gate
        return pool_packed(weights, behaviours, example, target.shape[0]), weights

    def interest_padded(
        self,
        behaviours: torch.Tensor,  # [C, L, D], zero at padded positions
        mask: torch.Tensor,  # [C, L] bool, True on real behaviours
        target: torch.Tensor,  # [B, D]
        scenario_emb: torch.Tensor | None,  # [B, E]
        context: torch.Tensor,  # [B] int64, each row's context
        gate: torch.Tensor | None = None,  # [C, L] each behaviour's transfer weight g (gate_padded)
    ) -> tuple[torch.Tensor, torch.Tensor]:  # interest [B, D], each behaviour's weight α·g [B, L] (0 on padding)
        """The interest of each row and the weight of each of its context's behaviours in it (α = 1 under sum
        pooling), times its gate: what serving returns per candidate, as training's packed weights."""
        if self.attention is not None:
            return self.attention(behaviours, target, mask, self._attention_scenario(scenario_emb), context, gate)
        weights = mask.to(behaviours.dtype) if gate is None else gate.masked_fill(~mask, 0.0)  # [C, L]
        interest = torch.bmm(weights.unsqueeze(1), behaviours).squeeze(1)  # [C, D]: no target, once per context
        return interest.index_select(0, context), weights.index_select(0, context)

    def forward(
        self,
        pooled: torch.Tensor,  # [B, U]
        target: torch.Tensor,  # [B, D]
        interest: torch.Tensor,  # [B, D]
        dense: torch.Tensor,  # [B, Fd]
        scenario: torch.Tensor,  # [B] int64, served scenario
        scenario_emb: torch.Tensor | None,  # [B, E]
    ) -> torch.Tensor:  # [B] logits
        features = [pooled, target, interest, dense, *([scenario_emb] if self.parts.scenario_input else [])]
        return self.tower(torch.cat(features, dim=-1), scenario_emb, scenario)
