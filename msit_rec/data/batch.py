"""The training/evaluation batch: what the loader yields and the model, trainer and evaluator consume.

Two KeyedJaggedTensors, because the model looks them up through two TorchRec modules: `sparse` (one id per
row and key) feeds an EmbeddingBagCollection, `sequence` (jagged behaviour lists) an EmbeddingCollection or
another path over the same tables. Key order follows the feature spec in `dataset.json`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable


@dataclass
class Batch(Pipelineable):
    """One batch of B examples (B = `label.shape[0]`); padding rows (weight 0) exist only in keep-all mode."""

    sparse: KeyedJaggedTensor  # keys = "sparse" features in spec order; length 1 per row and key; stride B
    sequence: KeyedJaggedTensor  # keys = "sequence" features (hist_item, hist_cat, hist_scenario); jagged, oldest first
    dense: torch.Tensor  # [B, Fd] float32, columns = "dense" features in spec order (Fd may be 0)
    scenario: torch.Tensor  # [B] int64 in [0, S)
    label: torch.Tensor  # [B] float32 in {0, 1}
    user_id: torch.Tensor  # [B] int64, raw user key (for GAUC; not an embedding index)
    hist_len: torch.Tensor  # [B] int32, behaviours per row (= sequence lengths of every sequence key)
    weight: torch.Tensor  # [B] float32: 1 for a real row, 0 for a padding row
    row_index: torch.Tensor  # [B] int64, position of the row in its split (files in dataset.json order); -1 = padding

    @property
    def batch_size(self) -> int:
        return int(self.label.shape[0])

    def _map(self, fn: Callable[[Any], Any]) -> Batch:
        return Batch(**{f.name: fn(getattr(self, f.name)) for f in fields(self)})

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return self._map(lambda t: t.to(device=torch.device(device), non_blocking=non_blocking))

    def record_stream(self, stream: torch.Stream) -> None:
        for f in fields(self):
            getattr(self, f.name).record_stream(stream)

    def pin_memory(self) -> Batch:
        return self._map(lambda t: t.pin_memory())
