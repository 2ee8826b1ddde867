"""The exported program's inputs as one value: built by the encoder, batched by the server, fed positionally."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class ProgramInputs:
    """Tensors in `contract.INPUT_NAMES` order (see msit_rec/serving/contract.py for the meaning of each)."""

    sparse: torch.Tensor  # [B, Fs] int64
    history: torch.Tensor  # [C, H, L] int64
    hist_len: torch.Tensor  # [C] int64
    scenario: torch.Tensor  # [C] int64
    dense: torch.Tensor  # [B, Fd] float32
    context: torch.Tensor  # [B] int64, in [0, C)

    @property
    def rows(self) -> int:
        return int(self.context.shape[0])

    @property
    def contexts(self) -> int:
        return int(self.scenario.shape[0])

    def args(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, f.name) for f in fields(self))

    def to(self, device: torch.device) -> ProgramInputs:
        return ProgramInputs(*(t.to(device) for t in self.args()))

    @staticmethod
    def concat(parts: list[ProgramInputs]) -> ProgramInputs:
        """One input holding every part's rows and contexts (context indices shifted past the earlier parts')."""
        if len(parts) == 1:
            return parts[0]
        offsets = torch.tensor([0, *(p.contexts for p in parts[:-1])]).cumsum(0).tolist()
        return ProgramInputs(
            sparse=torch.cat([p.sparse for p in parts]),
            history=torch.cat([p.history for p in parts]),
            hist_len=torch.cat([p.hist_len for p in parts]),
            scenario=torch.cat([p.scenario for p in parts]),
            dense=torch.cat([p.dense for p in parts]),
            context=torch.cat([p.context + offset for p, offset in zip(parts, offsets, strict=True)]),
        )
