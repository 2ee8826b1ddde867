"""Where each embedding table lives and how it learns: sharding config → TorchRec plan and sharders.

TorchRec's planner chooses table placement from the topology (world size, compute device); config may
force one sharding type per table. Tables always learn with a *fused* optimizer applied inside the
backward pass (FBGEMM), configured here through the sharders' `fused_params`, so an update touches only
the rows a batch used.

CPU rules measured on this stack (notes/torchrec-on-cpu.md): the `dense` kernel of EmbeddingCollection is
broken on CPU, so sequence tables use the `fused` kernel and are never data-parallel; row-wise sharding of
EmbeddingBagCollection is exact on CPU although TorchRec's sharder only offers it on CUDA, so it is
allowed here on every device; fused Adam exists only on GPU.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch import nn
from torchrec.distributed.embedding import EmbeddingCollectionSharder, ShardedEmbeddingCollection
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder, ShardedEmbeddingBagCollection
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints
from torchrec.distributed.planner.types import KernelConfig, TopologyFactory, TrainerConfig
from torchrec.distributed.types import ModuleSharder, ShardingPlan, ShardingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

from msit_rec.errors import ConfigError
from msit_rec.fit_config import ShardingConfig

_FUSED_OPTIMIZERS: dict[str, EmbOptimType] = {
    "rowwise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD,
    "adagrad": EmbOptimType.EXACT_ADAGRAD,
    "sgd": EmbOptimType.EXACT_SGD,
    "adam": EmbOptimType.ADAM,
}
_GPU_ONLY_OPTIMIZERS = {"adam"}
# Sharding types the planner may pick for a table nobody forced: every model-parallel type known exact
# on CPU. Data-parallel is left out because it needs the `dense` kernel, which would put the table under
# the dense optimizer instead of the configured fused one.
_DEFAULT_SHARDING_TYPES = [
    ShardingType.TABLE_WISE.value,
    ShardingType.ROW_WISE.value,
    ShardingType.COLUMN_WISE.value,
    ShardingType.TABLE_ROW_WISE.value,
    ShardingType.TABLE_COLUMN_WISE.value,
]
_SEQUENCE_SHARDING_TYPES = [ShardingType.TABLE_WISE.value, ShardingType.ROW_WISE.value, ShardingType.COLUMN_WISE.value]


class _AnyDeviceRowWiseEBCSharder(EmbeddingBagCollectionSharder):
    """EBC sharder that also offers row-wise placements on CPU (exact there; TorchRec lists them for CUDA only)."""

    def sharding_types(self, compute_device_type: str) -> list[str]:
        types = list(super().sharding_types(compute_device_type))
        for extra in (ShardingType.ROW_WISE.value, ShardingType.TABLE_ROW_WISE.value):
            if extra not in types:
                types.append(extra)
        return types


def fused_params(config: ShardingConfig, device: torch.device) -> dict[str, Any]:
    """FBGEMM fused-optimizer parameters for every table; rejects GPU-only optimizers on other devices."""
    if config.embedding_optimizer in _GPU_ONLY_OPTIMIZERS and device.type != "cuda":
        raise ConfigError(
            f"embedding_optimizer: {config.embedding_optimizer!r} runs only on GPU (compute device is "
            f"{device.type}); choose one of {sorted(set(_FUSED_OPTIMIZERS) - _GPU_ONLY_OPTIMIZERS)}"
        )
    params: dict[str, Any] = {
        "optimizer": _FUSED_OPTIMIZERS[config.embedding_optimizer],
        "learning_rate": config.embedding_lr,
    }
    if config.embedding_optimizer != "sgd":
        params["eps"] = config.embedding_eps
    return params


def make_sharders(config: ShardingConfig, device: torch.device) -> list[ModuleSharder[nn.Module]]:
    """Sharders for EmbeddingBagCollection and EmbeddingCollection, both carrying the fused optimizer."""
    params = fused_params(config, device)
    return [_AnyDeviceRowWiseEBCSharder(fused_params=params), EmbeddingCollectionSharder(fused_params=params)]


def embedding_tables(module: nn.Module) -> dict[str, type[nn.Module]]:
    """Table name → the TorchRec collection type holding it, for every EBC/EC inside `module`."""
    tables: dict[str, type[nn.Module]] = {}
    for child in module.modules():
        if isinstance(child, EmbeddingBagCollection):
            configs = child.embedding_bag_configs()
        elif isinstance(child, EmbeddingCollection):
            configs = child.embedding_configs()
        else:
            continue
        for table in configs:
            tables[table.name] = type(child)
    return tables


_COLLECTIONS = (EmbeddingBagCollection, EmbeddingCollection, ShardedEmbeddingBagCollection, ShardedEmbeddingCollection)


def table_parameters(module: nn.Module) -> dict[str, str]:
    """State-dict key of every embedding table's weight (inside `module`, sharded or not) → the table name."""
    tables: dict[str, str] = {}
    for name, child in module.named_modules():
        if isinstance(child, _COLLECTIONS):
            for key in child.state_dict():  # `embedding_bags.<table>.weight` / `embeddings.<table>.weight`
                tables[f"{name}.{key}" if name else key] = key.split(".")[-2]
    return tables


def build_constraints(config: ShardingConfig, module: nn.Module, world_size: int) -> dict[str, ParameterConstraints]:
    """Planner constraints: forced sharding types from config, fused kernels, no data-parallel sequence tables.

    In one process every table not forced otherwise is table-wise: splitting rows or columns across one rank only adds
    bucketisation and permutes to every step (measured ≈ 4 % of a step at the reference size).
    """
    tables = embedding_tables(module)
    unknown = sorted(set(config.table_sharding) - set(tables))
    if unknown:
        raise ConfigError(
            f"table_sharding: unknown table(s) {unknown}; the model's embedding tables are {sorted(tables)}"
        )
    constraints: dict[str, ParameterConstraints] = {}
    for name, collection in tables.items():
        is_sequence = collection is EmbeddingCollection
        forced = config.table_sharding.get(name)
        if forced == "data_parallel":
            if is_sequence:
                raise ConfigError(
                    f"table_sharding.{name}: sequence (EmbeddingCollection) tables cannot be data_parallel "
                    f"(their dense kernel is broken in FBGEMM on CPU); use table_wise, row_wise or column_wise"
                )
            constraints[name] = ParameterConstraints(
                sharding_types=[ShardingType.DATA_PARALLEL.value],
                compute_kernels=[EmbeddingComputeKernel.DENSE.value],
            )
            continue
        if forced is not None:
            sharding_types = [forced]
        elif world_size == 1:
            sharding_types = [ShardingType.TABLE_WISE.value]
        else:
            sharding_types = _SEQUENCE_SHARDING_TYPES if is_sequence else _DEFAULT_SHARDING_TYPES
        constraints[name] = ParameterConstraints(
            sharding_types=sharding_types, compute_kernels=[EmbeddingComputeKernel.FUSED.value]
        )
    return constraints


def plan_sharding(
    module: nn.Module,
    config: ShardingConfig,
    sharders: list[ModuleSharder[nn.Module]],
    device: torch.device,
    local_world_size: int,
    process_group: dist.ProcessGroup,
) -> ShardingPlan:
    """Plan on rank 0 with TorchRec's planner and broadcast, so every rank shards the same way."""
    world_size = dist.get_world_size(process_group)
    planner = EmbeddingShardingPlanner(
        topology=TopologyFactory.create_topology(
            trainer_config=TrainerConfig(world_size=world_size, local_world_size=local_world_size),
            kernel_config=KernelConfig(compute_device=device.type),
        ),
        constraints=build_constraints(config, module, world_size),
        debug=False,
    )
    return planner.collective_plan(module, sharders, process_group)


def table_placements(plan: ShardingPlan) -> dict[str, str]:
    """Table name → chosen sharding type, e.g. for logging what the planner decided."""
    return {
        table: parameter_sharding.sharding_type
        for module_plan in plan.plan.values()
        for table, parameter_sharding in module_plan.items()  # type: ignore[attr-defined]
    }
