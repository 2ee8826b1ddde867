"""STAR-style linear layer: one weight per scenario, factored as shared ⊙ scenario-specific."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class StarLinear(nn.Module):
    """`y = x (W_shared ⊙ W_s)ᵀ + (b_shared + b_s)` for the scenario `s` of each row (STAR, Sheng et al. 2021).

    The shared factor carries what all scenarios have in common; the scenario factor starts at ones (and its bias at
    zeros) so that every scenario begins as the same plain Linear and diverges only as its data demands.

    Mixed-scenario batches are served by looping over the (few, fixed) scenarios and multiplying only the rows of
    each: the same FLOPs as one Linear. Gathering a weight per row would need [N, in, out] memory (3.6 GB for a
    4096 × 428 × 512 layer) and multiplying every row by every scenario costs S× the FLOPs. The loop has no Python
    branch on tensor values (`nonzero` only gives a data-dependent row count), so it runs under `torch.export`.
    Scenario ids must lie in [0, num_scenarios); rows with other ids are dropped, which fails downstream on shape.
    """

    def __init__(self, in_dim: int, out_dim: int, num_scenarios: int) -> None:
        super().__init__()
        self.num_scenarios = num_scenarios
        self.shared = nn.Linear(in_dim, out_dim)
        self.scenario_weight = nn.Parameter(torch.ones(num_scenarios, out_dim, in_dim))  # [S, out, in]
        self.scenario_bias = nn.Parameter(torch.zeros(num_scenarios, out_dim))  # [S, out]

    def forward(self, x: torch.Tensor, scenario: torch.Tensor) -> torch.Tensor:
        """x [N, in], scenario [N] int → [N, out]."""
        weight = self.shared.weight * self.scenario_weight  # [S, out, in]
        bias = self.shared.bias + self.scenario_bias  # [S, out]
        outputs, rows = [], []
        for k in range(self.num_scenarios):
            idx = (scenario == k).nonzero().squeeze(1)  # rows served in scenario k
            outputs.append(F.linear(x.index_select(0, idx), weight[k], bias[k]))
            rows.append(idx)
        return torch.cat(outputs).index_select(0, torch.argsort(torch.cat(rows)))  # back to the input row order
