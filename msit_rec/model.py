"""The ranking model: embedding lookups → RankingHead (scenario gate → target attention → scenario-aware tower).

Every variant (`shared`, `din`, `din_sid`, `star`, `pepnet`, `msit`) is this one class with parts switched on or
off by `ModelConfig` (msit_rec/fit_config.py), so ablations compare like with like (DESIGN.md §1). The head after the
lookups is the module the serving model runs too; only the layout of the behaviours differs (packed here).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from msit_rec.data.batch import Batch
from msit_rec.data.spec import DatasetMeta
from msit_rec.embeddings import META, BatchEmbeddings
from msit_rec.errors import ConfigError
from msit_rec.fit_config import ModelConfig
from msit_rec.modules import RankingHead
from msit_rec.modules.scenario_gate import RECENCY_KEY, age_packed


@dataclass
class BehaviourDetails:
    """What the model did with each real behaviour of a batch (packed, [N]): what `msit-rec explain` reports."""

    logits: torch.Tensor  # [B]
    example: torch.Tensor  # [N] int64, the row each behaviour belongs to
    gate: torch.Tensor | None  # [N] g_j, each behaviour's transfer weight in (0, 2); None for variants without a gate
    attention: torch.Tensor  # [N] α_j·g_j, each behaviour's weight in its row's interest (α = 1 under sum pooling)


def added_since_older_checkpoints(key: str) -> bool:
    """Whether a state key (of the model, with any prefix) names a tensor that older checkpoints lack, and whose zero
    value gives the function they were trained as (the gate's recency term)."""
    return key.endswith("." + RECENCY_KEY)


class RankingModel(nn.Module):
    """CTR logit [B] of every example of a batch, for the scenario it is served in (shapes: msit_rec/modules)."""

    def __init__(self, meta: DatasetMeta, config: ModelConfig, device: torch.device = META) -> None:
        super().__init__()
        self.embeddings = BatchEmbeddings(meta, config.sequence_path, device)
        own = meta.behaviour_scenario
        if config.parts.behaviour_gate and own is None:  # fail now, not in step one
            raise ConfigError(f"model variant {config.variant!r} gates behaviours by their scenario, but dataset "
                              f"'{meta.name}' has no behaviour-scenario sequence (role behaviour_scenario)")
        self.behaviour_scenario = own.name if own is not None else None
        feedback = meta.behaviour_feedback  # in the behaviours' slots for every variant; the gate also reads its id
        self.behaviour_feedback = feedback.name if feedback is not None else None
        self.head = RankingHead(
            config,
            pooled_dim=self.embeddings.pooled_dim,
            dim=self.embeddings.layout.sequence_dim,
            dense_dim=len(meta.features_of_kind("dense")),
            scenario_dim=meta.feature("scenario").embedding_dim,
            num_scenarios=len(meta.scenarios),
            feedback_values=feedback.cardinality if feedback is not None else 0,
            recency=config.gate_recency,
        )

    @property
    def age_profile(self) -> nn.Parameter | None:
        """The gate's recency weights r (None without a gate, or with `gate_recency: none`): the dense optimizer
        gives them a rate of their own (msit_rec/train/optim.py: dense_param_groups)."""
        return self.head.gate.recency_weight if self.head.gate is not None else None

    def absent_from_older_checkpoints(self, saved: set[str]) -> dict[str, torch.Tensor]:
        """The tensors of this model that `saved` (a checkpoint's keys) lacks because they were added since, at the
        value under which the model computes what it computed before them: the gate's recency term r = 0."""
        return {key: torch.zeros_like(value) for key, value in self.state_dict().items()
                if added_since_older_checkpoints(key) and key not in saved}

    def forward(self, batch: Batch) -> torch.Tensor:  # [B] logits
        return self.details(batch, keep=False).logits

    def details(self, batch: Batch, keep: bool = True) -> BehaviourDetails:
        """Logits, and with `keep` the gate and attention of every behaviour (training keeps nothing extra)."""
        pooled, target, behaviours = self.embeddings(batch.sparse, batch.sequence, batch.hist_len)  # behaviours [N, D]
        example = torch.repeat_interleave(  # [N] the row of each behaviour
            torch.arange(batch.batch_size, device=target.device), batch.hist_len.long(), output_size=behaviours.shape[0]
        )
        scenario_emb = self.head.scenario_vectors(batch.scenario)  # [B, E]
        gate = None
        if self.head.gate is not None:
            own = batch.sequence[self.behaviour_scenario].values()  # [N]
            feedback = batch.sequence[self.behaviour_feedback].values() if self.behaviour_feedback else None  # [N]
            age = age_packed(batch.hist_len, example)  # [N]
            gate = self.head.gate_packed(behaviours, own, batch.scenario.index_select(0, example), feedback, age)
        interest, weights = self.head.interest_packed(  # [B, D], [N]
            behaviours, example, batch.hist_len, target, scenario_emb, gate
        )
        logits = self.head(pooled, target, interest, batch.dense, batch.scenario, scenario_emb)
        return BehaviourDetails(logits, example, gate if keep else None, weights)
