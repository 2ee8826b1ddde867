"""Linear → activation stacks: the one MLP every dense part of the model is built from."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn

from msit_rec.errors import ConfigError
from msit_rec.modules.star import StarLinear

ACTIVATIONS = ("relu", "prelu", "gelu", "silu")  # model.activation (msit_rec/fit_config.py)


def make_activation(name: str, dim: int) -> nn.Module:
    """Activation by config name; PReLU gets one slope per channel (`dim`), as in DIN.

    ReLU works in place: every caller applies it to the fresh output of a Linear (whose backward does not need it),
    and the out-of-place kernel would allocate and write a second full-size activation.
    """
    if name == "relu":
        return nn.ReLU(inplace=True)
    if name == "prelu":
        return nn.PReLU(dim)
    if name == "gelu":
        return nn.GELU()
    if name == "silu":
        return nn.SiLU()
    raise ConfigError(f"activation: got {name!r}, expected one of {', '.join(ACTIVATIONS)}")


class MLP(nn.Module):
    """`[Linear → activation → (Dropout)] × len(hidden_dims)`, then an optional plain output Linear.

    Two options serve the multi-scenario variants without a second MLP class:
    - `num_scenarios`: every Linear becomes a `StarLinear` (STAR: shared ⊙ scenario-specific weights); `forward`
      then needs the scenario ids.
    - `hidden_scales` in `forward`: one multiplier per hidden layer, applied after its activation (PPNet gates).
    Works on any `[..., in_dim]`.
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dims: Sequence[int],
        *,
        out_dim: int | None = None,
        activation: str = "relu",
        dropout: float = 0.0,
        num_scenarios: int | None = None,
    ) -> None:
        super().__init__()
        dims = [in_dim, *hidden_dims]
        self.star = num_scenarios is not None
        self.linears = nn.ModuleList(self._linear(i, o, num_scenarios) for i, o in itertools.pairwise(dims))
        self.post = nn.ModuleList(
            nn.Sequential(
                make_activation(activation, o),
                *([nn.Dropout(dropout)] if dropout > 0 else []),
            )
            for o in dims[1:]
        )
        self.out = self._linear(dims[-1], out_dim, num_scenarios) if out_dim is not None else None
        self.out_dim = out_dim if out_dim is not None else dims[-1]

    @staticmethod
    def _linear(in_dim: int, out_dim: int, num_scenarios: int | None) -> nn.Module:
        return nn.Linear(in_dim, out_dim) if num_scenarios is None else StarLinear(in_dim, out_dim, num_scenarios)

    def _apply_linear(self, layer: nn.Module, x: torch.Tensor, scenario: torch.Tensor | None) -> torch.Tensor:
        return layer(x, scenario) if self.star else layer(x)

    def forward(
        self,
        x: torch.Tensor,  # [N, in_dim]
        scenario: torch.Tensor | None = None,  # [N] int, needed with num_scenarios
        hidden_scales: Sequence[torch.Tensor] | None = None,  # one [N, hidden_dims[i]] per hidden layer
    ) -> torch.Tensor:  # [N, out_dim]
        for i, (linear, post) in enumerate(zip(self.linears, self.post)):
            x = post(self._apply_linear(linear, x, scenario))
            if hidden_scales is not None:
                x = x * hidden_scales[i]
        if self.out is not None:
            x = self._apply_linear(self.out, x, scenario)
        return x
