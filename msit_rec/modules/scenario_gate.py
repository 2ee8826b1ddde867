"""Scenario gate over behaviours: how much a behaviour from scenario s_j tells about the served scenario s."""

from __future__ import annotations

import torch
from torch import nn

from msit_rec.fit_config import GateRecency

RECENCY_KEY = "recency_weight"  # the parameter r_s; absent from checkpoints written before it
RECENCY_BUCKETS = 8  # ages 0 | 1–2 | 3–6 | 7–14 | 15–30 | 31–62 | 63–126 | ≥ 127, whatever the history length


def age_bucket(age: torch.Tensor) -> torch.Tensor:
    """min(⌊log2(age + 1)⌋, 7) of each behaviour's age (0 = most recent): recent behaviours get buckets of their own,
    old ones share wide ones. Exact: frexp writes age + 1 = m·2^e with m in [0.5, 1), so ⌊log2(age + 1)⌋ = e − 1
    (one pass over [N]; counting thresholds took 13× longer on a training batch)."""
    return (torch.frexp((age + 1).float()).exponent - 1).clamp(max=RECENCY_BUCKETS - 1)


def age_padded(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """Age [C, L] of each position of histories padded after their `lengths` [C] real behaviours (oldest first):
    0 for the most recent; padding gets 0 too (it is masked out anyway)."""
    return (lengths[:, None] - 1 - torch.arange(max_len, device=lengths.device)).clamp(min=0)


def age_packed(lengths: torch.Tensor, example: torch.Tensor) -> torch.Tensor:
    """Age [N] of each packed behaviour (histories oldest first, example by example; `example` [N] its row)."""
    lengths = lengths.long()
    starts = torch.cumsum(lengths, 0) - lengths  # [B] first packed index of each row
    position = torch.arange(example.shape[0], device=example.device) - starts.index_select(0, example)
    return lengths.index_select(0, example) - 1 - position


class ScenarioGate(nn.Module):
    """Transfer weight `g_j = 2σ(w_s·b_j + a_s·e(s_j) + c_s [+ U_s[s_j, v_j]] [+ r_s[k(age_j)]]) ∈ (0, 2)` of each
    behaviour, with the weights `w_s`, `a_s`, `c_s` (`U_s`, `r_s`) of the *served* scenario `s`.

    This is where interest transfers between scenarios: the served scenario decides, from the behaviour, the scenario
    it happened in and (with contract v2's hist_feedback, `feedback_values` > 0) its feedback v_j, how much the
    behaviour counts: g_j multiplies its attention weight, so the interest is `Σ_j α_j g_j b_j`. A skip on the home
    feed can count differently from a skip in search, and differently for each served scenario. The target attention
    keeps seeing the behaviours as they are: which behaviour matches the item is its job, which scenarios transfer
    the gate's.

    Recency (`recency="scenario"`; "shared": one `r[k]` for every served scenario; "none": no term): `r_s[k]` per
    served scenario and age bucket `k = min(⌊log2(age_j + 1)⌋, 7)` (age 0 = the
    most recent behaviour). How far back a user's interest still holds depends on where they are served — the last few
    behaviours decide a binge, the whole history a first visit — and target attention, which sees only what each
    behaviour *is*, cannot tell. Measured on MovieLens (benchmarks/bench_quality.py, 5 seeds), with r learning at
    `trainer.optim.recency_lr_scale` × the dense rate (at the dense rate it barely moves within a small budget):
    the term is what lifts msit above every other variant there (+0.011 to +0.013 test AUC over the best of them
    under each of three scenario definitions; without it msit ties them). One age profile for every served scenario,
    r_k (`model.gate_recency: shared`), did as well on those data — the ages matter there more than their dependence
    on the scenario — though the learnt profiles differ: a binge keeps its last 3–6 behaviours near full weight,
    onboarding and visit only their last 2.

    Initialisation: every weight starts at zero, so g = 1 — the model starts as its attention alone, with σ at its
    steepest, and the gate moves both ways from there. (An earlier gate scaled each of the D dimensions of b_j,
    `σ(W_s [b_j ; e(s_j)] + c_s) ⊙ b_j` with `[S, D, D]` weights, before the attention: on MovieLens it lost to the
    attention model alone — benchmarks/bench_quality.py.)

    `forward` takes padded behaviours [C, L, D] (the exported serving program), `values_packed` the real ones [N, D]
    (training). The terms of the behaviour's context (served, own scenario[, feedback][, age]) are tabulated once
    per call for every tuple and looked up per behaviour. Shapes: the legend in msit_rec/modules/__init__.py.
    """

    def __init__(
        self,
        dim: int,
        scenario_dim: int,
        num_scenarios: int,
        feedback_values: int = 0,
        recency: GateRecency = "none",
    ) -> None:
        super().__init__()
        self.dim = dim
        self.num_scenarios = num_scenarios
        self.feedback_values = feedback_values
        self.behaviour_weight = nn.Parameter(torch.zeros(num_scenarios, dim))  # [S, D] w_s
        self.scenario_weight = nn.Parameter(torch.zeros(num_scenarios, scenario_dim))  # [S, E] a_s
        self.bias = nn.Parameter(torch.zeros(num_scenarios))  # [S] c_s
        contexts = num_scenarios * feedback_values
        self.feedback_weight = nn.Parameter(torch.zeros(num_scenarios, contexts)) if feedback_values else None
        self.recency_weight = (  # [S, K] r_s, or [1, K] one profile for all ("shared"); named RECENCY_KEY
            nn.Parameter(torch.zeros(num_scenarios if recency == "scenario" else 1, RECENCY_BUCKETS))
            if recency != "none" else None
        )

    def _context_logits(self, scenario_table: torch.Tensor) -> torch.Tensor:
        """Every term but the content one, `c_s + a_s·e(s_j) [+ U_s[s_j, v]] [+ r_s[k]]`, for every (served, own
        scenario[, feedback][, age bucket]) tuple, flattened: [S·S·V·K] (V = 1 without feedback, K = 1 without
        recency) — a few thousand entries, so each behaviour needs one lookup, and backward one scatter."""
        terms = self.scenario_weight @ scenario_table.t() + self.bias[:, None]  # [S served, S own]
        if self.feedback_weight is not None:
            shape = (self.num_scenarios, self.num_scenarios, self.feedback_values)
            terms = terms[:, :, None] + self.feedback_weight.view(shape)  # [S, S, V]
        if self.recency_weight is not None:  # [S or 1, K]: one age profile per served scenario, or one for all
            terms = terms.reshape(self.num_scenarios, -1, 1) + self.recency_weight[:, None, :]  # [S, S·V, K]
        return terms.reshape(-1)

    def _context(
        self, served: torch.Tensor, own: torch.Tensor, feedback: torch.Tensor | None, age: torch.Tensor | None
    ) -> torch.Tensor:
        """Entry of `_context_logits` for each behaviour: (served, own scenario, feedback, age bucket) flattened."""
        index = served * self.num_scenarios + own
        if self.feedback_weight is not None:
            if feedback is None:
                raise ValueError("this gate was built with feedback_values > 0: pass each behaviour's feedback")
            index = index * self.feedback_values + feedback
        if self.recency_weight is not None:
            if age is None:
                raise ValueError("this gate was built with recency: pass each behaviour's age")
            index = index * RECENCY_BUCKETS + age_bucket(age)
        return index

    def forward(
        self,
        behaviours: torch.Tensor,  # [C, L, D]
        behaviour_scenario: torch.Tensor,  # [C, L] int, scenario of each behaviour (padding: any valid id)
        scenario: torch.Tensor,  # [C] int, served scenario
        scenario_table: torch.Tensor,  # [S, E], the scenario embeddings e(·)
        feedback: torch.Tensor | None = None,  # [C, L] int, each behaviour's encoded feedback (padding: any valid id)
        age: torch.Tensor | None = None,  # [C, L] int, each behaviour's age (age_padded)
    ) -> torch.Tensor:  # [C, L] g_j in (0, 2)
        context = self._context(scenario[:, None].expand_as(behaviour_scenario), behaviour_scenario, feedback, age)
        content = torch.bmm(behaviours, self.behaviour_weight.index_select(0, scenario)[:, :, None]).squeeze(2)
        terms = self._context_logits(scenario_table).index_select(0, context.reshape(-1)).view_as(content)  # [C, L]
        return 2.0 * torch.sigmoid(terms + content)

    def values_packed(
        self,
        behaviours: torch.Tensor,  # [N, D] real behaviours only
        behaviour_scenario: torch.Tensor,  # [N] int, scenario of each behaviour
        served: torch.Tensor,  # [N] int64, served scenario of the example each behaviour belongs to
        scenario_table: torch.Tensor,  # [S, E]
        feedback: torch.Tensor | None = None,  # [N] int
        age: torch.Tensor | None = None,  # [N] int, each behaviour's age (age_packed)
    ) -> torch.Tensor:  # [N] g_j in (0, 2)
        # training under bf16-mixed too: g as the fp32 formula (a few cheap products; bf16 moved g by up to 0.02)
        with torch.autocast(behaviours.device.type, enabled=False):
            # w_s·b_j for every s as one [N, D] × [D, S] product, then the served one: no [N, D] gather of w_s, and
            # its backward no scatter of [N, D] rows into S rows
            scores = torch.mm(behaviours.to(self.behaviour_weight.dtype), self.behaviour_weight.t())  # [N, S]
            content = scores.gather(1, served[:, None]).squeeze(1)  # [N]
            context = self._context(served, behaviour_scenario, feedback, age)
            terms = self._context_logits(scenario_table.to(self.scenario_weight.dtype)).index_select(0, context)
            return 2.0 * torch.sigmoid(terms + content)
