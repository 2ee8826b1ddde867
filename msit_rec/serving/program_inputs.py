"""The exported program's inputs as one value: built by the encoder, batched by the server, fed positionally."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class ProgramInputs:
    """Tensors in `contract.INPUT_NAMES` order (see msit_rec/serving/contract.py for the meaning of each)."""

    sparse: torch.Tensor  # [B, Fs] int64
    history: torch.Tensor  # [B, H, L] int64
    hist_len: torch.Tensor  # [B] int64
    scenario: torch.Tensor  # [B] int64
    dense: torch.Tensor  # [B, Fd] float32

    @property
    def rows(self) -> int:
        return int(self.scenario.shape[0])

    def args(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, f.name) for f in fields(self))

    def to(self, device: torch.device) -> ProgramInputs:
        return ProgramInputs(*(t.to(device) for t in self.args()))

    def slice(self, start: int, stop: int) -> ProgramInputs:
        return ProgramInputs(*(t[start:stop] for t in self.args()))

    @staticmethod
    def concat(parts: list[ProgramInputs]) -> ProgramInputs:
        if len(parts) == 1:
            return parts[0]
        return ProgramInputs(*(torch.cat(tensors) for tensors in zip(*(p.args() for p in parts))))
