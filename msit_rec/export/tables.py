"""Plain-tensor embedding tables for the serving program: fp32, fp16 or int8 row-wise storage.

TorchRec's quantised modules do not go through `torch.export` (fbgemm script objects have no fake
implementation; notes/torchrec-on-cpu.md), so the artifact stores each table as ordinary buffers and
dequantises after the lookup: only the looked-up rows are ever converted to fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from msit_rec.serving.contract import Precision, TableInfo

INT8_LEVELS = 255  # uint8 codes 0..255


def quantize_rowwise(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 [R, D] → (codes uint8 [R, D], scale fp32 [R], bias fp32 [R]) with `row ≈ codes · scale + bias`.

    Asymmetric per-row min/max: each row uses all 256 levels of its own range, so the rounding error is at most
    scale/2 per element. A constant row (an all-zero padding row among them) has scale 0 and dequantises exactly.
    """
    weight = weight.detach().float()
    low = weight.amin(dim=1)  # [R]
    scale = (weight.amax(dim=1) - low) / INT8_LEVELS  # [R]
    step = torch.where(scale > 0, scale, torch.ones_like(scale))  # constant rows: codes 0, any divisor
    codes = torch.round((weight - low[:, None]) / step[:, None]).clamp_(0, INT8_LEVELS).to(torch.uint8)
    return codes, scale, low


def dequantize_rowwise(codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Inverse of `quantize_rowwise` for any leading shape: codes [..., D], scale/bias [...] → fp32 [..., D]."""
    return codes.float() * scale[..., None] + bias[..., None]


class ServingTable(nn.Module):
    """One embedding table as buffers; `forward(ids)` gives fp32 rows `[*ids.shape, D]` whatever the storage."""

    def __init__(self, name: str, weight: torch.Tensor, precision: Precision) -> None:
        super().__init__()
        self.name = name
        self.precision = precision
        self.rows, self.dim = weight.shape
        weight = weight.detach()
        if precision == "int8":
            codes, scale, bias = quantize_rowwise(weight)
            self.register_buffer("weight", codes)
            self.register_buffer("scale_bias", torch.stack([scale, bias], dim=1))  # [R, 2]: one gather for both
        elif precision == "fp16":
            self.register_buffer("weight", weight.to(torch.float16))
        elif precision == "fp32":
            self.register_buffer("weight", weight.float().clone())
        else:
            raise ValueError(f"table '{name}': unknown precision {precision!r}")

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.weight)
        if self.precision != "int8":
            return rows.float()
        scale_bias = F.embedding(ids, self.scale_bias)  # [..., 2]
        return dequantize_rowwise(rows, scale_bias[..., 0], scale_bias[..., 1])

    def info(self) -> TableInfo:
        stored = sum(t.numel() * t.element_size() for t in self.buffers())
        return TableInfo(self.name, self.rows, self.dim, self.precision, stored, self.rows * self.dim * 4)
