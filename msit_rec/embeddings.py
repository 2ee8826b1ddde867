"""Embedding lookups of a batch, declared from `dataset.json`: pooled features and behaviour sequences.

Two TorchRec modules, built on the meta device so that DistributedModelParallel materialises only local shards:
- `bags`: an EmbeddingBagCollection over the single-valued features whose tables no sequence uses (user, brand...);
- the sequence group: the tables the behaviour lists use (item, category). The target item and the behaviour items
  share one table (likewise category). Two interchangeable paths read it (`SequencePath`):
  - `embedding_collection`: TorchRec's EmbeddingCollection (unpooled lookups). Shards well on GPU, but its CPU
    backward in FBGEMM is far slower than the pooled one (notes/torchrec-on-cpu.md, benchmarks/bench_train.py);
  - `pooled_bags`: an EmbeddingBagCollection where every behaviour position (and the target) is its own bag of
    zero or one id — a pooled lookup that returns per-position rows, with the fast pooled backward.
  Both return the same tensors for the same weights (tests check it), so the choice is per backend.
The scenario table is tiny (S rows) and is a plain dense embedding in the model, not a TorchRec table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingCollection, JaggedTensor, KeyedJaggedTensor
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig, PoolingType

from msit_rec.data.spec import BEHAVIOUR_SCENARIO, DatasetMeta
from msit_rec.errors import ConfigError
from msit_rec.fit_config import SequencePath

META = torch.device("meta")


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
            if spec.role == BEHAVIOUR_SCENARIO:  # read by the gate, not looked up in a table
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
    """Looks up a batch: pooled features [B, U], target [B, D] and behaviours [N, D] (legend: msit_rec/modules)."""

    def __init__(self, meta: DatasetMeta, path: SequencePath, device: torch.device = META) -> None:
        super().__init__()
        self.layout = EmbeddingLayout.from_meta(meta)
        self.path = path
        self.pooled_dim = sum(meta.feature(n).embedding_dim for n in self.layout.bag_features)  # U
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
        """(pooled [B, U], target [B, D], behaviours [N, D]): only the N real behaviours, example by example and
        oldest first within an example (the order of the jagged history values)."""
        batch = hist_len.shape[0]
        sparse_by_key = sparse.to_dict()
        sequence_by_key = sequence.to_dict()
        if self.bags is not None:
            bag_input = KeyedJaggedTensor.concat([_one_key(sparse_by_key[n], n) for n in self.layout.bag_features])
            looked = self.bags(bag_input)
            if tuple(looked.keys()) == self.layout.bag_features:
                pooled = looked.values()  # [B, U]
            else:  # sharded tables on several ranks come back grouped by rank: back to the layout's order
                by_key = looked.to_dict()
                pooled = torch.cat([by_key[name] for name in self.layout.bag_features], dim=1)  # [B, U]
        else:
            pooled = hist_len.new_zeros((batch, 0), dtype=torch.float32)
        if self.path is SequencePath.EMBEDDING_COLLECTION:
            target, behaviours = self._collection(sparse_by_key, sequence_by_key, batch)
        else:
            target, behaviours = self._pooled_positions(sparse_by_key, sequence_by_key, batch)
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
            rows = looked_up[slot.sequence].values()  # [N, d]
            behaviours.append(rows)
            targets.append(looked_up[slot.target].values() if slot.target else rows.new_zeros((batch, slot.dim)))
        return torch.cat(targets, dim=-1), torch.cat(behaviours, dim=-1)

    def _pooled_positions(
        self, sparse_by_key: dict[str, JaggedTensor], sequence_by_key: dict[str, JaggedTensor], batch: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Bags of one id each: the B targets, then the N real behaviours, then empty bags up to a fixed B·(L+1).

        The bag count stays B·(L+1) whatever N is, so every rank of a sharded table sees the same batch size; the
        empty bags at the end cost a zero row each and no backward work.
        """
        bag_count = batch * (self.layout.max_len + 1)
        first = sequence_by_key[self.layout.slots[0].sequence].values()
        bag = torch.arange(bag_count, device=first.device)  # [B·(L+1)]
        real_end = batch + first.numel()  # every history list has the same N behaviours
        parts = []
        for slot in self.layout.slots:
            history = sequence_by_key[slot.sequence].values()  # [N]
            if slot.target is None:  # no target feature on this table: its target bags stay empty (zero rows)
                values, bag_lengths = history, (bag >= batch) & (bag < real_end)
            else:
                values, bag_lengths = torch.cat([sparse_by_key[slot.target].values(), history]), bag < real_end
            parts.append(KeyedJaggedTensor(
                keys=[f"{slot.sequence}@position"], values=values, lengths=bag_lengths.to(torch.int32),
                stride=bag_count,
            ))
        rows = self.sequences(KeyedJaggedTensor.concat(parts)).values()  # [B·(L+1), D]
        return rows[:batch], rows[batch:real_end]


def _one_key(tensor: JaggedTensor, key: str) -> KeyedJaggedTensor:
    return KeyedJaggedTensor(keys=[key], values=tensor.values(), lengths=tensor.lengths())
