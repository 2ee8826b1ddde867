"""`ServingModel`: the trained RankingModel over the artifact's plain tensors, exportable with `torch.export`.

The model body after the lookups is the trained `RankingHead` itself (copied), so training and serving run one
body; only the lookups and the layout of the behaviours differ here. The TorchRec tables become `ServingTable`s
(fp32/fp16/int8 buffers). Jagged inputs are what most often breaks export, so behaviours arrive padded `[C, K, L]`
with their lengths, one history per context (a /rank request's candidates share one): positions past `hist_len`
are zeroed by mask (whatever the table's row 0 or the request holds there) and masked out of the attention, so only
the real behaviours count, as in RankingModel, which never looks padding up. The lookups and the gate run once per
context, the attention per row on its context's behaviours, each weight times the behaviour's gate. Shapes: the
legend in msit_rec/modules.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from msit_rec.data.spec import DatasetMeta
from msit_rec.embeddings import BatchEmbeddings, EmbeddingLayout
from msit_rec.export.inputs import input_schema
from msit_rec.export.tables import ServingTable
from msit_rec.fit_config import SequencePath
from msit_rec.model import RankingModel
from msit_rec.modules.scenario_gate import age_padded
from msit_rec.modules.target_attention import lengths_to_mask
from msit_rec.serving.contract import Precision

COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # export --compute


class Fp32Output(nn.Module):
    """The tower's output layer in fp32 on a lower-precision input: the logit keeps fp32's resolution. A bf16 logit
    has 8 bits of mantissa, so near-equal candidates of one request would tie (measured: 139 distinct logits in
    3,000 rows) and the per-scenario AUC would drop with the ties, not with the model."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer.float()

    def forward(self, x: torch.Tensor, *scenario: torch.Tensor) -> torch.Tensor:
        return self.layer(x.float(), *scenario)


@dataclass(frozen=True)
class ServingSlot:
    """One behaviour sequence: its table, its row in `history` and the target's column in `sparse` (or None)."""

    table: str
    history_row: int
    target_column: int | None
    dim: int


def embedding_table_names(meta: DatasetMeta) -> list[str]:
    """The TorchRec tables a model of `meta` has (what `--precision` may name); the scenario table is not one."""
    layout = EmbeddingLayout.from_meta(meta)
    names = [meta.feature(name).table or name for name in layout.bag_features] + [slot.table for slot in layout.slots]
    return list(dict.fromkeys(names))


def table_weights(embeddings: BatchEmbeddings) -> dict[str, torch.Tensor]:
    """table name → full fp32 weight [R, D] of every TorchRec table of the (unsharded) model."""
    modules = []
    if embeddings.bags is not None:
        modules.append(embeddings.bags.embedding_bags)
    if embeddings.path is SequencePath.EMBEDDING_COLLECTION:
        modules.append(embeddings.sequences.embeddings)
    else:
        modules.append(embeddings.sequences.embedding_bags)
    return {name: table.weight.detach() for tables in modules for name, table in tables.items()}


def bag_feature_order(embeddings: BatchEmbeddings) -> list[str]:
    """Features in the order the EmbeddingBagCollection concatenates them: grouped by table, tables in order."""
    if embeddings.bags is None:
        return []
    return [name for config in embeddings.bags.embedding_bag_configs() for name in config.feature_names]


class ServingModel(nn.Module):
    """(logits [B], attention [B, L]) of B rows over C contexts: (sparse [B, Fs], history [C, K, L], hist_len [C],
    scenario [C], dense [B, Fd], context [B]) — see msit_rec/serving/contract.py."""

    def __init__(
        self, model: RankingModel, meta: DatasetMeta, precision: dict[str, Precision], compute: str = "fp32"
    ) -> None:
        super().__init__()
        schema = input_schema(meta)
        layout = model.embeddings.layout
        weights = table_weights(model.embeddings)
        self.tables = nn.ModuleDict(
            {name: ServingTable(name, weight, precision.get(name, "fp32")) for name, weight in weights.items()}
        )
        self.bag_columns = [  # (table, column of sparse) in the trained model's pooled order
            (meta.feature(name).table or name, schema.sparse.index(name)) for name in bag_feature_order(model.embeddings)
        ]
        self.slots = [
            ServingSlot(
                slot.table,
                schema.sequence.index(slot.sequence),
                schema.sparse.index(slot.target) if slot.target else None,
                slot.dim,
            )
            for slot in layout.slots
        ]
        self.max_len = layout.max_len
        gated, feedback = model.head.gate is not None, meta.behaviour_feedback
        self.own_scenario_row = schema.sequence.index(meta.behaviour_scenario.name) if gated else None
        self.feedback_row = schema.sequence.index(feedback.name) if gated and feedback is not None else None
        # the dense part (gate, attention, tower, scenario embedding) in the compute dtype: with bf16 its products
        # run on the CPU's bf16 units; lookups, masks, the tower's output layer and the outputs stay fp32
        self.compute_dtype = COMPUTE_DTYPES[compute]
        self.head = copy.deepcopy(model.head).to(self.compute_dtype)
        if compute != "fp32":
            self.head.tower.mlp.out = Fp32Output(self.head.tower.mlp.out)
        self.requires_grad_(False)
        self.eval()

    def forward(
        self,
        sparse: torch.Tensor,  # [B, Fs] int64
        history: torch.Tensor,  # [C, K, L] int64
        hist_len: torch.Tensor,  # [C] int64
        scenario: torch.Tensor,  # [C] int64
        dense: torch.Tensor,  # [B, Fd] float32
        context: torch.Tensor,  # [B] int64, the context of each row
    ) -> tuple[torch.Tensor, torch.Tensor]:  # logits [B], each behaviour's weight α (·g) [B, L]
        batch = sparse.shape[0]
        pooled = (
            torch.cat([self.tables[table](sparse[:, column]) for table, column in self.bag_columns], dim=-1)
            if self.bag_columns else dense.new_zeros((batch, 0))
        )  # [B, U]
        # once per context: the behaviours and their gate
        mask = lengths_to_mask(hist_len, self.max_len)  # [C, L]
        targets, sequences = [], []
        for slot in self.slots:
            table = self.tables[slot.table]
            rows = table(history[:, slot.history_row])  # [C, L, d]
            sequences.append(torch.where(mask[..., None], rows, 0.0))
            targets.append(
                table(sparse[:, slot.target_column]) if slot.target_column is not None else rows.new_zeros(batch, slot.dim)
            )
        target = torch.cat(targets, dim=-1).to(self.compute_dtype)  # [B, D]
        behaviours = torch.cat(sequences, dim=-1).to(self.compute_dtype)  # [C, L, D]
        pooled, dense = pooled.to(self.compute_dtype), dense.to(self.compute_dtype)
        gate = None
        if self.own_scenario_row is not None:
            own = torch.where(mask, history[:, self.own_scenario_row], 0)  # [C, L]
            feedback = torch.where(mask, history[:, self.feedback_row], 0) if self.feedback_row is not None else None
            age = age_padded(hist_len, self.max_len)  # [C, L]
            gate = self.head.gate_padded(behaviours, own, scenario, feedback, age)  # [C, L]
        # per row: its context's scenario and behaviours
        scenario = scenario.index_select(0, context)  # [B]
        scenario_emb = self.head.scenario_vectors(scenario)  # [B, E]
        interest, weights = self.head.interest_padded(behaviours, mask, target, scenario_emb, context, gate)
        logits = self.head(pooled, target, interest, dense, scenario, scenario_emb)
        return logits.float(), weights.float()
