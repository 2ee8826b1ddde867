"""Scenario gate over behaviours: how much a behaviour from scenario s_j tells about the served scenario s."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class ScenarioGate(nn.Module):
    """`b̃_j = σ(W_s [b_j ; e(s_j)] + c_s) ⊙ b_j`, with weights `W_s`, `c_s` of the *served* scenario `s`.

    This is where interest transfers between scenarios: the gate sees the behaviour and the scenario it happened in,
    and the served scenario picks the weights.

    Speed: `W_s` is stored split into a behaviour block `[S, D, D]` and a scenario block `[S, E, D]`. The scenario
    block only ever sees S distinct embeddings, so its term (with the bias) is tabulated once per call for every
    (served, own) scenario pair `[S, S, D]` and looked up per behaviour, instead of concatenating `e(s_j)` to every
    behaviour. The behaviour block is one `bmm` with each example's gathered `[D, D]` weight (measured faster than
    multiplying by all S weights and picking one).

    Initialisation: the bias starts at 0 and the weights like `nn.Linear` (±1/√(D+E)), so σ starts near 0.5, where
    its slope is largest and the gate can move both ways. Starting at σ ≈ 1 (a large bias) would make the gate the
    identity but saturated (σ' ≈ 0.05) and able only to shrink; the uniform factor ≈ 0.5 is absorbed by the
    attention and the tower.

    `forward` takes padded behaviours [B, L, D] (the exported serving program); `forward_packed` only the real ones
    [N, D] (training): there the behaviour block is one matmul per served scenario over that scenario's rows, grouped
    by one sort.

    `per_scenario=False` keeps one weight set for all served scenarios (the gate still sees `e(s_j)`): an ablation
    between no gate and the full gate. The `din`/`shared` variants simply do not use this module.
    """

    def __init__(self, dim: int, scenario_dim: int, num_scenarios: int, *, per_scenario: bool = True) -> None:
        super().__init__()
        self.dim = dim
        self.num_scenarios = num_scenarios
        self.per_scenario = per_scenario
        sets = num_scenarios if per_scenario else 1
        bound = 1.0 / math.sqrt(dim + scenario_dim)
        self.behaviour_weight = nn.Parameter(torch.empty(sets, dim, dim).uniform_(-bound, bound))  # [S, D, D]
        self.scenario_weight = nn.Parameter(torch.empty(sets, scenario_dim, dim).uniform_(-bound, bound))  # [S, E, D]
        self.bias = nn.Parameter(torch.zeros(sets, dim))  # [S, D]

    def _pair_logits(self, scenario_table: torch.Tensor) -> torch.Tensor:
        """The term of e(s_j) and c_s for every (served, own) scenario pair: [sets, S, D]."""
        return torch.einsum("te,sed->std", scenario_table, self.scenario_weight) + self.bias[:, None, :]

    def forward(
        self,
        behaviours: torch.Tensor,  # [B, L, D]
        behaviour_scenario: torch.Tensor,  # [B, L] int, scenario of each behaviour (padding: any valid id)
        scenario: torch.Tensor,  # [B] int, served scenario
        scenario_table: torch.Tensor,  # [S, E], the scenario embeddings e(·)
    ) -> torch.Tensor:  # [B, L, D]
        pair_logits = self._pair_logits(scenario_table)  # [sets, S, D]
        if self.per_scenario:
            pair = scenario[:, None] * self.num_scenarios + behaviour_scenario  # [B, L]
            weight = self.behaviour_weight[scenario]  # [B, D, D]
        else:
            pair = behaviour_scenario
            weight = self.behaviour_weight[0].expand(behaviours.shape[0], -1, -1)  # [B, D, D], a view
        pair_term = F.embedding(pair, pair_logits.reshape(-1, self.dim))  # [B, L, D]
        # fused: one [B, L, D] tensor for the logits, gated in place (sigmoid's backward needs only its output)
        return torch.baddbmm(pair_term, behaviours, weight).sigmoid_() * behaviours

    def forward_packed(
        self,
        behaviours: torch.Tensor,  # [N, D] real behaviours only
        behaviour_scenario: torch.Tensor,  # [N] int, scenario of each behaviour
        served: torch.Tensor,  # [N] int, served scenario of the example each behaviour belongs to
        scenario_table: torch.Tensor,  # [S, E]
    ) -> torch.Tensor:  # [N, D]
        pair_logits = self._pair_logits(scenario_table).reshape(-1, self.dim)  # [sets*S, D]
        if not self.per_scenario:
            logits = torch.addmm(F.embedding(behaviour_scenario, pair_logits), behaviours, self.behaviour_weight[0])
            return logits.sigmoid_() * behaviours
        logits = F.embedding(served * self.num_scenarios + behaviour_scenario, pair_logits)  # [N, D]
        # rows grouped by served scenario (one gather), one matmul per scenario on contiguous slices, then back
        order = torch.sort(served, stable=True).indices  # [N]
        counts = torch.bincount(served, minlength=self.num_scenarios).tolist()
        grouped = behaviours.index_select(0, order).split(counts)
        products = torch.cat([rows @ self.behaviour_weight[s] for s, rows in enumerate(grouped)])  # [N, D], grouped
        return logits.index_add_(0, order, products).sigmoid_() * behaviours
