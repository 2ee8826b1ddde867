"""The dense optimizer next to the tables' fused one, seen by Lightning as a single optimizer.

Sharded tables update themselves inside backward (FBGEMM fused optimizer); the LightningModule's own
optimizer (Adam/AdamW from `configure_optimizers`) handles every other parameter. Both are combined into
one TorchRec `CombinedOptimizer` so that Lightning steps, zeroes and checkpoints them together, with
optimizer state keyed by parameter name (which is what makes sharded checkpoints re-shardable).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer, KeyedOptimizerWrapper

from msit_rec.errors import ConfigError


def dense_parameters(module: nn.Module) -> Iterator[nn.Parameter]:
    """Parameters that the dense optimizer must update: all but tables owned by a fused optimizer.

    Use it in `configure_optimizers` (`torch.optim.AdamW(dense_parameters(self), ...)`); on an unsharded
    model it yields every parameter, so the same LightningModule also trains without TorchRec sharding.
    """
    for param in module.parameters():
        if not hasattr(param, "_in_backward_optimizers"):
            yield param


def dense_param_groups(
    module: nn.Module, age_profile: nn.Parameter | None, dense_lr: float, recency_lr_scale: float
) -> list[dict[str, Any]]:
    """The dense optimizer's parameter groups: "dense" (every dense parameter but the gate's age profile, at
    `dense_lr`) and, for a model whose gate has one (RankingModel.age_profile), "recency" (it alone, at
    `recency_lr_scale` × `dense_lr`: OptimConfig says why). A resumed run must have as many (fit.check_resumable)."""
    params = list(dense_parameters(module))
    groups = [{"name": "dense", "params": [p for p in params if p is not age_profile], "lr": dense_lr}]
    if age_profile is not None:
        groups.append({"name": "recency", "params": [age_profile], "lr": dense_lr * recency_lr_scale})
    return groups


class StepAllCombinedOptimizer(CombinedOptimizer):
    """CombinedOptimizer whose `step(closure)` runs the closure once, then steps every sub-optimizer.

    TorchRec's CombinedOptimizer hands the closure to each sub-optimizer: the fused one ignores it and a
    second dense optimizer would run forward/backward again. Lightning always passes a closure.
    """

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for _, optimizer in self.optimizers:
            optimizer.step()
        return loss


def keyed_dense_optimizer(optimizer: torch.optim.Optimizer, module: nn.Module) -> KeyedOptimizer:
    """View `optimizer` as a KeyedOptimizer whose state is keyed by parameter name in `module`."""
    names = {param: name for name, param in module.named_parameters()}
    keyed: dict[str, nn.Parameter] = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            name = names.get(param)
            if name is None:
                raise ConfigError("configure_optimizers: the optimizer holds a parameter that is not in the model")
            if hasattr(param, "_in_backward_optimizers"):
                raise ConfigError(
                    f"configure_optimizers: parameter {name!r} is an embedding table updated by the fused "
                    f"optimizer; build the dense optimizer over msit_rec.train.optim.dense_parameters(self)"
                )
            keyed[name] = param
    return KeyedOptimizerWrapper(keyed, lambda _params: optimizer)


def init_dense_state(optimizer: KeyedOptimizer) -> None:
    """Create lazily-built optimizer state (e.g. Adam moments) without changing any parameter.

    Loading a checkpoint copies into existing state tensors, so they must exist first. A zero-gradient
    step at learning rate 0 creates them and leaves parameters untouched (also with decoupled weight
    decay); the loaded checkpoint then overwrites the state, step counters included.
    """
    saved_lrs = [group["lr"] for group in optimizer.param_groups]
    saved_grads = {key: param.grad for key, param in optimizer.params.items()}
    try:
        for group in optimizer.param_groups:
            group["lr"] = 0.0
        optimizer.init_state()
    finally:
        for group, lr in zip(optimizer.param_groups, saved_lrs):
            group["lr"] = lr
        for key, param in optimizer.params.items():
            param.grad = saved_grads[key]
