"""The ranking model: embeddings → scenario gate → target attention → scenario-aware tower → logit.

Every variant (`shared`, `din`, `din_sid`, `star`, `pepnet`, `msit`) is this one class with parts switched on or
off by `ModelConfig`, so ablations compare like with like (DESIGN.md §1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from msit_rec.data.batch import Batch
from msit_rec.data.spec import DatasetMeta
from msit_rec.embeddings import META, BatchEmbeddings, SequencePath
from msit_rec.modules import ScenarioGate, ScenarioTower, TargetAttention

Variant = Literal["shared", "din", "din_sid", "star", "pepnet", "msit"]


@dataclass(frozen=True)
class VariantParts:
    """What a variant switches on. `scenario_input`: e(s) joins the tower input."""

    attention: bool
    attention_scenario: bool
    behaviour_gate: bool
    scenario_input: bool
    input_gate: bool
    hidden_gates: bool
    star: bool


VARIANTS: dict[str, VariantParts] = {
    # no scenario input at all; history sum-pooled (no target attention)
    "shared": VariantParts(False, False, False, False, False, False, False),
    # DIN: target attention, no scenario conditioning
    "din": VariantParts(True, False, False, False, False, False, False),
    # DIN + the scenario id embedding as one more tower feature
    "din_sid": VariantParts(True, False, False, True, False, False, False),
    # STAR: shared ⊙ scenario-specific tower weights
    "star": VariantParts(True, False, False, True, False, False, True),
    # PEPNet: EPNet input gate + PPNet hidden-layer gates, both from e(s)
    "pepnet": VariantParts(True, False, False, True, True, True, False),
    # MSIT: scenario gate over behaviours + scenario-conditioned attention + gated scenario-aware tower
    "msit": VariantParts(True, True, True, True, True, False, False),
}


@dataclass
class ModelConfig:
    """Section `model` of configs/model/*.yaml."""

    variant: Variant = "msit"
    attention_hidden: list[int] = field(default_factory=lambda: [64, 32])
    pooling: Literal["sum", "softmax"] = "sum"
    tower_hidden: list[int] = field(default_factory=lambda: [512, 256])
    activation: Literal["relu", "prelu"] = "relu"
    dropout: float = 0.0
    # how behaviour sequences are looked up (see msit_rec/embeddings.py): pooled_bags is fastest on CPU
    sequence_path: SequencePath = SequencePath.POOLED_BAGS

    def __post_init__(self) -> None:
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def parts(self) -> VariantParts:
        return VARIANTS[self.variant]


class RankingModel(nn.Module):
    """CTR logit of every example of a batch, for the scenario it is served in."""

    def __init__(self, meta: DatasetMeta, config: ModelConfig, device: torch.device = META) -> None:
        super().__init__()
        parts = config.parts
        self.parts = parts
        self.embeddings = BatchEmbeddings(meta, config.sequence_path, device)
        dim = self.embeddings.layout.sequence_dim
        num_scenarios = len(meta.scenarios)
        scenario_dim = meta.feature("scenario").embedding_dim
        uses_scenario = any(
            (parts.behaviour_gate, parts.attention_scenario, parts.scenario_input, parts.input_gate, parts.star)
        )
        # S rows: a plain dense (replicated) table; absent when the variant never looks at the scenario
        self.scenario_embedding = nn.Embedding(num_scenarios, scenario_dim) if uses_scenario else None
        if parts.behaviour_gate:
            meta.feature("hist_scenario")  # the gate reads each behaviour's scenario: fail now, not in step one
        self.gate = ScenarioGate(dim, scenario_dim, num_scenarios) if parts.behaviour_gate else None
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
        dense_dim = len(meta.features_of_kind("dense"))
        tower_in = self.embeddings.bag_dim + 2 * dim + dense_dim + (scenario_dim if parts.scenario_input else 0)
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

    def forward(self, batch: Batch) -> torch.Tensor:  # [B] logits
        pooled, target, behaviours = self.embeddings(batch.sparse, batch.sequence, batch.hist_len)  # [N, D] behaviours
        size = batch.hist_len.shape[0]
        example = torch.repeat_interleave(  # [N] the row of each behaviour
            torch.arange(size, device=target.device), batch.hist_len.long(), output_size=behaviours.shape[0]
        )
        scenario = batch.scenario
        scenario_emb = self.scenario_embedding(scenario) if self.scenario_embedding is not None else None  # [B, E]
        if self.gate is not None:
            own = batch.sequence["hist_scenario"].values()  # [N]
            served = scenario.index_select(0, example)  # [N]
            behaviours = self.gate.forward_packed(behaviours, own, served, self.scenario_embedding.weight)
        if self.attention is not None:
            attention_scenario = scenario_emb if self.parts.attention_scenario else None
            interest = self.attention.forward_packed(behaviours, example, target, attention_scenario)  # [B, D]
        else:
            interest = behaviours.new_zeros(target.shape).index_add_(0, example, behaviours)  # sum pooling
        features = [pooled, target, interest, batch.dense]
        if self.parts.scenario_input:
            features.append(scenario_emb)
        return self.tower(torch.cat(features, dim=-1), scenario_emb, scenario)
