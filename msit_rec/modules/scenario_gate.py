"""Scenario gate over behaviours: how much a behaviour from scenario s_j tells about the served scenario s."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class ScenarioGate(nn.Module):
    """`b̃_j = σ(W_s [b_j ; e(s_j)] + c_s) ⊙ b_j`, with weights `W_s`, `c_s` of the *served* scenario `s`.

    This is where interest transfers between scenarios: the gate sees the behaviour and the scenario it happened in,
    and the served scenario picks the weights. With feedback (`feedback_values` > 0, contract v2's hist_feedback)
    the behaviour's context is the pair (scenario s_j, feedback v_j): a learned term `U_s[s_j, v_j]` joins `e(s_j)`,
    so a skip on the home feed can mean something else than a skip in search, and differently for each served
    scenario. U starts at zero: the gate starts as the feedback-blind one.

    Speed: `W_s` is stored split into a behaviour block `[S, D, D]` and a scenario block `[S, E, D]`. The scenario
    block only ever sees S distinct embeddings, so its term (with the bias) is tabulated once per call for every
    (served, own) scenario pair `[S, S, D]` and looked up per behaviour, instead of concatenating `e(s_j)` to every
    behaviour. The behaviour block is one `bmm` with each context's gathered `[D, D]` weight (less work than
    multiplying by all S weights and picking one).

    Initialisation: the bias starts at 0 and the weights like `nn.Linear` (±1/√(D+E)), so σ starts near 0.5, where
    its slope is largest and the gate can move both ways. Starting at σ ≈ 1 (a large bias) would make the gate the
    identity but saturated (σ' ≈ 0.05) and able only to shrink; the uniform factor ≈ 0.5 is absorbed by the
    attention and the tower.

    `forward` takes padded behaviours [C, L, D] (the exported serving program); `values_packed` only the real ones
    [N, D] (training, which multiplies them itself and keeps the gate for `msit-rec explain`): there the behaviour block is one matmul per served scenario over that scenario's rows, grouped
    by one sort. Shapes: the legend in msit_rec/modules/__init__.py.
    """

    def __init__(self, dim: int, scenario_dim: int, num_scenarios: int, feedback_values: int = 0) -> None:
        super().__init__()
        self.dim = dim
        self.num_scenarios = num_scenarios
        self.feedback_values = feedback_values
        bound = 1.0 / math.sqrt(dim + scenario_dim)
        self.behaviour_weight = nn.Parameter(torch.empty(num_scenarios, dim, dim).uniform_(-bound, bound))  # [S, D, D]
        self.scenario_weight = nn.Parameter(torch.empty(num_scenarios, scenario_dim, dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.zeros(num_scenarios, dim))  # [S, D]
        contexts = num_scenarios * feedback_values
        self.feedback_weight = nn.Parameter(torch.zeros(num_scenarios, contexts, dim)) if feedback_values else None
        self.output_dim = dim

    def _pair_logits(self, scenario_table: torch.Tensor) -> torch.Tensor:
        """The term of the behaviour's context and c_s for every (served, own scenario[, feedback]) triple, flattened:
        [S·S·V, D] (V = 1 without feedback)."""
        pairs = torch.einsum("te,sed->std", scenario_table, self.scenario_weight) + self.bias[:, None, :]  # [S, S, D]
        if self.feedback_weight is not None:
            shape = (self.num_scenarios, self.num_scenarios, self.feedback_values, self.dim)
            pairs = pairs[:, :, None, :] + self.feedback_weight.view(shape)  # [S, S, V, D]
        return pairs.reshape(-1, self.dim)

    def _pair(self, served: torch.Tensor, own: torch.Tensor, feedback: torch.Tensor | None) -> torch.Tensor:
        """Row of `_pair_logits` for each behaviour: (served, own scenario, feedback) flattened."""
        pair = served * self.num_scenarios + own
        if self.feedback_weight is None:
            return pair
        if feedback is None:
            raise ValueError("this gate was built with feedback_values > 0: pass each behaviour's feedback")
        return pair * self.feedback_values + feedback

    def forward(
        self,
        behaviours: torch.Tensor,  # [C, L, D]
        behaviour_scenario: torch.Tensor,  # [C, L] int, scenario of each behaviour (padding: any valid id)
        scenario: torch.Tensor,  # [C] int, served scenario
        scenario_table: torch.Tensor,  # [S, E], the scenario embeddings e(·)
        feedback: torch.Tensor | None = None,  # [C, L] int, each behaviour's encoded feedback (padding: any valid id)
    ) -> torch.Tensor:  # [C, L, D]
        pair = self._pair(scenario[:, None], behaviour_scenario, feedback)  # [C, L]
        weight = self.behaviour_weight[scenario]  # [C, D, D]
        pair_term = F.embedding(pair, self._pair_logits(scenario_table))  # [C, L, D]
        # fused: one [B, L, D] tensor for the logits, gated in place (sigmoid's backward needs only its output)
        return torch.baddbmm(pair_term, behaviours, weight).sigmoid_() * behaviours

    def values_packed(
        self,
        behaviours: torch.Tensor,  # [N, D] real behaviours only
        behaviour_scenario: torch.Tensor,  # [N] int, scenario of each behaviour
        served: torch.Tensor,  # [N] int, served scenario of the example each behaviour belongs to
        scenario_table: torch.Tensor,  # [S, E]
        feedback: torch.Tensor | None = None,  # [N] int
    ) -> torch.Tensor:  # [N, D] the gate σ(·) in (0, 1), before it multiplies the behaviour
        logits = F.embedding(self._pair(served, behaviour_scenario, feedback), self._pair_logits(scenario_table))
        # rows grouped by served scenario (one gather), one matmul per scenario on contiguous slices, then back
        order = torch.sort(served, stable=True).indices  # [N]
        counts = torch.bincount(served, minlength=self.num_scenarios).tolist()
        grouped = behaviours.index_select(0, order).split(counts)
        products = torch.cat([rows @ self.behaviour_weight[s] for s, rows in enumerate(grouped)])  # [N, D], grouped
        return logits.index_add_(0, order, products).sigmoid_()
