"""Embedding lookups of a batch, declared from `dataset.json`: pooled features and behaviour sequences.

Two TorchRec modules, built on the meta device so that DistributedModelParallel materialises only local shards:
- `bags`: an EmbeddingBagCollection over the single-valued features whose tables no sequence uses (user, brand...);
- the sequence group: the tables the behaviour lists use (item, category). The target item and the behaviour items
  share one table (likewise category). Two interchangeable paths read it (`SequencePath`):
  - `embedding_collection`: TorchRec's EmbeddingCollection (unpooled lookups). Shards well on GPU, but its CPU
    backward in FBGEMM is 40-85× slower than the pooled one (notes/torchrec-on-cpu.md);
  - `pooled_bags`: an EmbeddingBagCollection where every behaviour position (and the target) is its own bag of
    zero or one id — a pooled lookup that returns per-position rows, with the fast pooled backward.
  Both return the same tensors for the same weights (tests check it), so the choice is per backend.
The scenario table is tiny (S rows) and is a plain dense embedding in the model, not a TorchRec table.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingCollection, JaggedTensor, KeyedJaggedTensor
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig, PoolingType

from msit_rec.data.spec import DatasetMeta
from msit_rec.errors import ConfigError

META = torch.device("meta")


class SequencePath(enum.Enum):
    EMBEDDING_COLLECTION = "embedding_collection"
    POOLED_BAGS = "pooled_bags"


@dataclass(frozen=True)
class SequenceSlot:
    """One behaviour list (hist_item) with the table it reads and the single-valued target feature on it (item)."""

    sequence: str
    table: str
    target: str | None  # None when no single-valued feature uses the table (target part is then zeros)
    cardinality: int
    dim: int


@dataclass(frozen=True)
class EmbeddingLayout:
    """Which features go through which lookup, derived once from the dataset's feature spec."""

    bag_features: tuple[str, ...]  # single-valued features on tables no sequence uses
    slots: tuple[SequenceSlot, ...]  # hist_item, hist_cat
    max_len: int

    @classmethod
    def from_meta(cls, meta: DatasetMeta) -> EmbeddingLayout:
        sparse = meta.features_of_kind("sparse")
        slots = []
        for spec in meta.features_of_kind("sequence"):
            if spec.name == "hist_scenario":
                continue
            targets = [f.name for f in sparse if f.table == spec.table]
            slots.append(SequenceSlot(spec.name, spec.table or spec.name, targets[0] if targets else None,
                                      spec.cardinality, spec.embedding_dim))
        sequence_tables = {slot.table for slot in slots}
        for slot in slots:
            target = next((f for f in sparse if f.name == slot.target), None)
            if target is not None and (target.embedding_dim, target.cardinality) != (slot.dim, slot.cardinality):
                raise ConfigError(
                    f"dataset.json: '{target.name}' and '{slot.sequence}' share table '{slot.table}' but declare "
                    f"dim/cardinality {target.embedding_dim}/{target.cardinality} vs {slot.dim}/{slot.cardinality}"
                )
        return cls(
            bag_features=tuple(f.name for f in sparse if f.table not in sequence_tables),
            slots=tuple(slots),
            max_len=meta.history.max_len,
        )

    @property
    def sequence_dim(self) -> int:
        """D of a behaviour (and of the target): the concatenated dims of the sequence tables."""
        return sum(slot.dim for slot in self.slots)


def _bag_tables(meta: DatasetMeta, features: tuple[str, ...]) -> list[EmbeddingBagConfig]:
    tables: dict[str, EmbeddingBagConfig] = {}
    for name in features:
        spec = meta.feature(name)
        table = spec.table or name
        if table in tables:
            tables[table].feature_names.append(name)
        else:
            tables[table] = EmbeddingBagConfig(
                name=table, embedding_dim=spec.embedding_dim, num_embeddings=spec.cardinality,
                feature_names=[name], pooling=PoolingType.SUM,
            )
    return list(tables.values())


class BatchEmbeddings(nn.Module):
    """Looks up a batch: pooled features [B, Fu], target [B, D] and behaviours [B, L, D]."""

    def __init__(self, meta: DatasetMeta, path: SequencePath, device: torch.device = META) -> None:
        super().__init__()
        self.layout = EmbeddingLayout.from_meta(meta)
        self.path = path
        self.bag_dim = sum(meta.feature(n).embedding_dim for n in self.layout.bag_features)
        self.bags = (
            EmbeddingBagCollection(tables=_bag_tables(meta, self.layout.bag_features), device=device)
            if self.layout.bag_features else None
        )
        slots = self.layout.slots
        if path is SequencePath.EMBEDDING_COLLECTION:
            dims = {slot.dim for slot in slots}
            if len(dims) > 1:
                raise ConfigError(
                    f"sequence_path 'embedding_collection' needs one embedding dim for {[s.table for s in slots]}, "
                    f"got {sorted(dims)}; use 'pooled_bags' or equal dims"
                )
            self.sequences: nn.Module = EmbeddingCollection(
                tables=[
                    EmbeddingConfig(name=s.table, embedding_dim=s.dim, num_embeddings=s.cardinality,
                                    feature_names=[*([s.target] if s.target else []), s.sequence])
                    for s in slots
                ],
                device=device,
            )
        else:
            self.sequences = EmbeddingBagCollection(
                tables=[
                    EmbeddingBagConfig(name=s.table, embedding_dim=s.dim, num_embeddings=s.cardinality,
                                       feature_names=[f"{s.sequence}@position"], pooling=PoolingType.SUM)
                    for s in slots
                ],
                device=device,
            )

    def forward(
        self, sparse: KeyedJaggedTensor, sequence: KeyedJaggedTensor, hist_len: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(pooled [B, Fu], target [B, D], behaviours [B, L, D]); padded behaviour positions are zeros."""
        batch = hist_len.shape[0]
        sparse_by_key = sparse.to_dict()
        sequence_by_key = sequence.to_dict()
        if self.bags is not None:
            bag_input = KeyedJaggedTensor.concat([_one_key(sparse_by_key[n], n) for n in self.layout.bag_features])
            pooled = self.bags(bag_input).values()  # [B, Fu]
        else:
            pooled = hist_len.new_zeros((batch, 0), dtype=torch.float32)
        if self.path is SequencePath.EMBEDDING_COLLECTION:
            target, behaviours = self._collection(sparse_by_key, sequence_by_key, batch)
        else:
            target, behaviours = self._pooled_positions(sparse_by_key, sequence_by_key, hist_len)
        return pooled, target, behaviours

    def _collection(
        self, sparse_by_key: dict[str, JaggedTensor], sequence_by_key: dict[str, JaggedTensor], batch: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        parts = []
        for slot in self.layout.slots:
            if slot.target:
                parts.append(_one_key(sparse_by_key[slot.target], slot.target))
            parts.append(_one_key(sequence_by_key[slot.sequence], slot.sequence))
        looked_up = self.sequences(KeyedJaggedTensor.concat(parts))
        targets, behaviours = [], []
        for slot in self.layout.slots:
            rows = looked_up[slot.sequence]
            behaviours.append(rows.to_padded_dense(self.layout.max_len))  # [B, L, d]
            if slot.target:
                targets.append(looked_up[slot.target].values())  # [B, d]
            else:
                targets.append(behaviours[-1].new_zeros((batch, slot.dim)))
        return torch.cat(targets, dim=-1), torch.cat(behaviours, dim=-1)

    def _pooled_positions(
        self, sparse_by_key: dict[str, JaggedTensor], sequence_by_key: dict[str, JaggedTensor], hist_len: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every example becomes L+1 bags — [target, b_1..b_L] — of one id (or none: padding → zero row)."""
        batch, length = hist_len.shape[0], self.layout.max_len
        lengths = hist_len.long()  # [B]
        positions = torch.arange(length + 1, device=lengths.device)  # [L+1]
        example_start = torch.cumsum(lengths + 1, 0) - (lengths + 1)  # [B] first value of each example
        element_example = torch.repeat_interleave(torch.arange(batch, device=lengths.device), lengths)  # [N]
        element_rank = torch.arange(element_example.numel(), device=lengths.device) - (
            torch.cumsum(lengths, 0) - lengths
        )[element_example]
        history_slot = example_start[element_example] + 1 + element_rank  # [N] where each behaviour id goes
        bags = positions[None, :] <= lengths[:, None]  # [B, L+1] non-empty bags: the target and real behaviours
        parts = []
        for slot in self.layout.slots:
            history = sequence_by_key[slot.sequence].values()  # [N]
            if slot.target is None:  # no target feature on this table: its target bag stays empty (a zero row)
                values, bag_lengths = history, bags & (positions[None, :] > 0)
            else:
                values = history.new_empty(batch + history.numel())
                values[example_start] = sparse_by_key[slot.target].values()
                values[history_slot] = history
                bag_lengths = bags
            parts.append(KeyedJaggedTensor(
                keys=[f"{slot.sequence}@position"], values=values, lengths=bag_lengths.to(torch.int32).reshape(-1),
                stride=batch * (length + 1),
            ))
        rows = self.sequences(KeyedJaggedTensor.concat(parts)).values().reshape(batch, length + 1, -1)
        return rows[:, 0], rows[:, 1:]


def _one_key(tensor: JaggedTensor, key: str) -> KeyedJaggedTensor:
    return KeyedJaggedTensor(keys=[key], values=tensor.values(), lengths=tensor.lengths())
