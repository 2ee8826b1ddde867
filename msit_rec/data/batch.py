"""The training/evaluation batch: what the loader yields and the model, trainer and evaluator consume.

Two KeyedJaggedTensors, because the model looks them up through two TorchRec modules: `sparse` (one id per
row and key) feeds an EmbeddingBagCollection, `sequence` (jagged behaviour lists) an EmbeddingCollection or
another path over the same tables. Key order follows the feature spec in `dataset.json`.

The loader writes all of a batch's tensors into one buffer. A batch built that way crosses a process
boundary (DataLoader workers) as that one buffer and moves to a device in one copy: per-tensor costs
dominate otherwise (about 1 ms per tensor to send out of a worker, measured on the 2-core dev machine).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

_KJT_FIELDS = ("sparse", "sequence")


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

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        device = torch.device(device)
        return self._map_buffer(lambda t: t.to(device=device, non_blocking=non_blocking))

    def record_stream(self, stream: torch.Stream) -> None:
        for f in fields(self):
            getattr(self, f.name).record_stream(stream)

    def pin_memory(self) -> Batch:
        return self._map_buffer(lambda t: t.pin_memory())

    def __reduce__(self) -> tuple[Callable[..., Batch], tuple[Any, ...]]:
        packed = self._packed()
        if packed is None:
            return Batch, tuple(getattr(self, f.name) for f in fields(self))
        return _unpack, packed

    def _map_buffer(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
        """Apply `fn` once to the shared buffer when there is one, else to every tensor."""
        packed = self._packed()
        if packed is not None:
            buffer, *rest = packed
            return _unpack(fn(buffer), *rest)
        return Batch(**{f.name: fn(getattr(self, f.name)) for f in fields(self)})

    def _tensors(self) -> dict[str, torch.Tensor]:
        tensors = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _KJT_FIELDS}
        for name in _KJT_FIELDS:
            kjt: KeyedJaggedTensor = getattr(self, name)
            tensors[f"{name}.values"], tensors[f"{name}.lengths"] = kjt.values(), kjt.lengths()
        return tensors

    def _packed(self) -> tuple[torch.Tensor, list, dict] | None:
        """(byte buffer, [(name, dtype, byte offset, shape)], KJT metadata) when every tensor is a contiguous
        view of one storage no larger than the tensors themselves (plus alignment); None otherwise."""
        tensors = self._tensors()
        storage = self.label.untyped_storage()
        if any(t.untyped_storage().data_ptr() != storage.data_ptr() or not t.is_contiguous() for t in tensors.values()):
            return None
        if storage.nbytes() > sum(t.numel() * t.element_size() + 8 for t in tensors.values()):
            return None
        buffer = torch.empty(0, dtype=torch.uint8, device=self.label.device).set_(storage)
        views = [(n, t.dtype, t.storage_offset() * t.element_size(), tuple(t.shape)) for n, t in tensors.items()]
        kjts = {n: _kjt_metadata(getattr(self, n)) for n in _KJT_FIELDS}
        return buffer, views, kjts


def _kjt_metadata(kjt: KeyedJaggedTensor) -> dict[str, Any]:
    return {"keys": kjt.keys(), "stride": kjt.stride(), "length_per_key": kjt.length_per_key()}


def _unpack(buffer: torch.Tensor, views: list, kjts: dict[str, dict[str, Any]]) -> Batch:
    """Rebuild a Batch whose tensors are views of `buffer` (the inverse of `Batch._packed`)."""
    tensors = {}
    for name, dtype, start, shape in views:
        size = torch.Size(shape).numel() * dtype.itemsize
        tensors[name] = buffer[start : start + size].view(dtype).view(shape)
    for name, meta in kjts.items():
        values, lengths = tensors.pop(f"{name}.values"), tensors.pop(f"{name}.lengths")
        tensors[name] = keyed_jagged(meta["keys"], values, lengths, meta["length_per_key"], meta["stride"])
    return Batch(**tensors)


def keyed_jagged(
    keys: list[str], values: torch.Tensor, lengths: torch.Tensor, length_per_key: list[int], stride: int
) -> KeyedJaggedTensor:
    """A KJT with its per-key metadata given, so that the training process need not derive it (a sync)."""
    return KeyedJaggedTensor(
        keys=keys,
        values=values,
        lengths=lengths,
        stride=stride,
        length_per_key=length_per_key,
        offset_per_key=list(itertools.accumulate(length_per_key, initial=0)),
    )
