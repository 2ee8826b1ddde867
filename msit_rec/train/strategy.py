"""Lightning strategy that shards a LightningModule's TorchRec tables with DistributedModelParallel.

Contract with the LightningModule:
- build every EmbeddingBagCollection / EmbeddingCollection on the meta device, anywhere in the module
  tree (e.g. `self.model.sparse.ebc`); everything else (dense layers) on the CPU as usual;
- build the dense optimizer in `configure_optimizers` over `msit_rec.train.optim.dense_parameters(self)`, in
  parameter groups or not (`dense_param_groups`; exactly one optimizer; an LR scheduler may be attached to it as usual);
- every rank must run the same number of batches (DMP runs collectives in every forward).

The strategy wraps the whole LightningModule in DMP instead of DDP: DMP replaces the TorchRec modules
in place by sharded ones (materialising only this rank's shards on the accelerator's device) and
DDP-wraps the rest. The tables' fused optimizer and the dense one become one optimizer for Lightning.
Checkpoints are directories written by all ranks with torch.distributed.checkpoint (see checkpoint.py).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torchrec.distributed.model_parallel import DataParallelWrapper, DistributedModelParallel
from torchrec.distributed.types import ShardingEnv
from torchrec.optim.keyed import KeyedOptimizer

from msit_rec.errors import ConfigError, MsitError
from msit_rec.fit_config import ShardingConfig
from msit_rec.train.checkpoint import (
    load_sharded_into,
    load_trainer_state,
    remove_checkpoint_dir,
    save_sharded,
    split_checkpoint,
)
from msit_rec.train.optim import StepAllCombinedOptimizer, init_dense_state, keyed_dense_optimizer
from msit_rec.train.sharding import make_sharders, plan_sharding, table_placements
from msit_rec.train.warm_start import warm_start

log = logging.getLogger(__name__)
_DMP_ATTR = "_msit_dmp"  # where a sharded LightningModule keeps its DMP wrapper (not a registered child)
DENSE_PARAM_GROUPS_KEY = "msit_dense_param_groups"  # trainer_state key: dense hyper-parameters (lr, ...)


def available_devices(device_type: str) -> int:
    """How many processes of `device_type` ("cpu", "cuda"/"gpu", ...) this host can run one per device.

    For the CPU that is the number of usable cores: more gloo processes than cores only oversubscribe them.
    """
    if device_type in ("cuda", "gpu"):
        return torch.cuda.device_count()
    if device_type == "cpu":
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    accelerator = getattr(torch, device_type, None)
    return accelerator.device_count() if accelerator is not None and hasattr(accelerator, "device_count") else 1


def check_devices(device_type: str, devices: int) -> None:
    """Raise MsitError when more processes are asked for than this host has devices (or CPU cores).

    Call it before building the Trainer: Lightning's own check for GPUs raises its own exception type.
    """
    available = available_devices(device_type)
    if devices > available:
        what = "CPU cores" if device_type == "cpu" else f"{device_type} devices"
        raise MsitError(f"trainer devices={devices} but this host has only {available} {what}; use devices<={available}")


def check_launch(devices: int, num_nodes: int) -> None:
    """Under torchrun: ConfigError unless trainer.devices is its processes per node (--nproc_per_node) and
    trainer.num_nodes its node count (--nnodes).

    Lightning compares only their product with WORLD_SIZE; a wrong split gives the planner a wrong topology (which
    ranks share a host) and Lightning a wrong device list.
    """
    if not dist.is_torchelastic_launched():
        return
    per_node = int(os.environ["LOCAL_WORLD_SIZE"])
    nodes = int(os.environ.get("GROUP_WORLD_SIZE", int(os.environ["WORLD_SIZE"]) // per_node))
    if (devices, num_nodes) != (per_node, nodes):
        raise ConfigError(
            f"trainer.devices={devices} and trainer.num_nodes={num_nodes}, but torchrun started {per_node} process(es) "
            f"on each of {nodes} node(s): pass --set trainer.devices={per_node} --set trainer.num_nodes={nodes} "
            f"(devices = --nproc_per_node, num_nodes = --nnodes)"
        )


class SingleProcessDense(DataParallelWrapper):
    """DMP's wrapper of the dense (unsharded) parameters for a world of one process: none. DDP there has no gradient
    to average, yet still copied every gradient into its buckets and ran a one-rank all-reduce each step (~3 % of a
    bench_train step, and ~285 MiB more peak RSS there); its parameter names are DMP's either way, so checkpoints load
    across world sizes as before."""

    def wrap(self, dmp: DistributedModelParallel, env: ShardingEnv, device: torch.device) -> None:
        return None


class TorchRecStrategy(DDPStrategy):
    """DDPStrategy that shards TorchRec tables with DMP and checkpoints with DCP (see module docstring)."""

    strategy_name = "torchrec"

    def __init__(
        self, sharding: ShardingConfig | None = None, init_from: str | Path | None = None, **ddp_kwargs: Any
    ) -> None:
        super().__init__(**ddp_kwargs)
        self.sharding = sharding if sharding is not None else ShardingConfig()
        self.init_from = Path(init_from) if init_from is not None else None  # warm start of a fit (warm_start.py)

    # --- launch -------------------------------------------------------------------------------------
    def _configure_launcher(self) -> None:
        # Runs while the Trainer is built, before any process starts: fail early and clearly.
        check_devices(self.root_device_type, self.num_processes)
        super()._configure_launcher()

    @property
    def root_device_type(self) -> str:
        assert self.parallel_devices, "parallel_devices are set by Lightning's accelerator connector"
        return self.parallel_devices[0].type

    # --- model --------------------------------------------------------------------------------------
    def model_to_device(self) -> None:
        """Move dense tensors to the device; tables stay on meta until DMP materialises their shards."""
        assert self.model is not None
        device = self.root_device
        for module in self.model.modules():
            own = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
            if own and not any(t.is_meta for t in own):
                module._apply(lambda t: t.to(device), recurse=False)

    def setup(self, trainer: Trainer) -> None:
        assert self.accelerator is not None and self.model is not None
        self.accelerator.setup(trainer)
        self.precision_plugin.convert_module(self.model)
        self.model = self._shard(self.lightning_module)
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
            self.optimizers = [self._combine_optimizers(self.optimizers)]
            if self.init_from is not None:  # shards and optimizer state exist now: fill them from the parent run
                init_dense_state(self._dense_optimizer)
                report = warm_start(self.lightning_module, self.optimizers[0], self.init_from)
                if self.is_global_zero:
                    log.info(report.summary(self.init_from))
                    if report.fresh_state:
                        log.warning("--init-from %s: no parent state for %s (fresh)", self.init_from,
                                    report.fresh_state[:5])
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING:
            _optimizers_to_device(self.optimizers, self.root_device)

    def _shard(self, module: LightningModule) -> DistributedModelParallel:
        """Wrap in DMP once; a module sharded by an earlier fit/validate keeps its shards and wrapper."""
        existing = getattr(module, _DMP_ATTR, None)
        if existing is not None:
            return existing
        self.model_to_device()
        device = self.root_device
        sharders = make_sharders(self.sharding, device)
        process_group = dist.GroupMember.WORLD
        assert process_group is not None, "the process group is created in setup_environment"
        plan = plan_sharding(module, self.sharding, sharders, device, self.num_processes, process_group)
        alone = dist.get_world_size(process_group) == 1
        dmp = DistributedModelParallel(module, device=device, plan=plan, sharders=sharders,
                                       data_parallel_wrapper=SingleProcessDense() if alone else None)
        object.__setattr__(module, _DMP_ATTR, dmp)  # plain attribute: DMP must not become a submodule
        return dmp

    @property
    def dmp(self) -> DistributedModelParallel:
        """The DMP wrapper of the LightningModule (from setup() on; still there after teardown)."""
        dmp = getattr(self.lightning_module, _DMP_ATTR, None)
        assert isinstance(dmp, DistributedModelParallel), "the model is sharded in setup()"
        return dmp

    @property
    def table_placements(self) -> dict[str, str]:
        """Table name → sharding type the plan chose (after setup)."""
        return table_placements(self.dmp.plan)

    def _combine_optimizers(self, optimizers: list[torch.optim.Optimizer]) -> StepAllCombinedOptimizer:
        if len(optimizers) != 1:
            raise ConfigError(
                f"configure_optimizers: expected exactly one (dense) optimizer, got {len(optimizers)}; "
                f"embedding tables get their optimizer from ShardingConfig.embedding_optimizer"
            )
        dense = keyed_dense_optimizer(optimizers[0], self.lightning_module)
        combined = StepAllCombinedOptimizer([("dense", dense), ("embeddings", self.dmp.fused_optimizer)])
        # Param groups are not stored with DCP: fused groups differ per rank. Dense hyper-parameters are
        # stored in trainer_state instead (see save_checkpoint); fused ones come from ShardingConfig.
        combined.save_param_groups(False)
        return combined

    @property
    def _dense_optimizer(self) -> KeyedOptimizer:
        (combined,) = self.optimizers
        assert isinstance(combined, StepAllCombinedOptimizer)
        return dict(combined.optimizers)["dense"]

    # --- checkpoints --------------------------------------------------------------------------------
    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True  # shards and optimizer state must exist before loading into them

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: str | Path, storage_options: Any = None) -> None:
        """Collective: every rank writes its shards into the directory `filepath`."""
        tensors, rest = split_checkpoint(checkpoint)
        if self.optimizers:
            rest[DENSE_PARAM_GROUPS_KEY] = [
                {k: v for k, v in group.items() if k != "params"} for group in self._dense_optimizer.param_groups
            ]
        save_sharded(tensors, rest, filepath, is_rank_zero=self.is_global_zero, barrier=self.barrier,
                     all_succeeded=self._all_succeeded)

    def _all_succeeded(self, ok: bool) -> bool:
        """Collective AND of `ok` over the ranks (a sum of failures, on the device the process group uses)."""
        failed = torch.tensor(0.0 if ok else 1.0, device=self.root_device)
        return float(self.reduce(failed, reduce_op="sum")) == 0.0

    def load_checkpoint(self, checkpoint_path: str | Path, weights_only: bool | None = None) -> dict[str, Any]:
        """Collective: load this rank's shards (any saving world size) into the already sharded model.

        `weights_only` is accepted for Lightning's signature; trainer_state.pt is always read with weights_only=True.
        """
        checkpoint = load_trainer_state(checkpoint_path)
        template: dict[str, Any] = {"state_dict": self.lightning_module.state_dict()}
        if self.optimizers:
            init_dense_state(self._dense_optimizer)
            template["optimizer_states"] = [self.optimizer_state(opt) for opt in self.optimizers]
        checkpoint.update(load_sharded_into(template, checkpoint_path))
        return checkpoint

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        super().load_optimizer_state_dict(checkpoint)
        saved_groups = checkpoint.get(DENSE_PARAM_GROUPS_KEY)
        if saved_groups is not None:
            for group, saved in zip(self._dense_optimizer.param_groups, saved_groups, strict=True):
                group.update(saved)

    def remove_checkpoint(self, filepath: str | Path) -> None:
        if self.is_global_zero:
            remove_checkpoint_dir(filepath)

    # --- teardown -----------------------------------------------------------------------------------
    def teardown(self) -> None:
        """Unwrap to the LightningModule but keep its shards where they are (no move to CPU)."""
        if self.lightning_module is not None:
            self.model = self.lightning_module
        self.precision_plugin.teardown()
        assert self.accelerator is not None
        self.accelerator.teardown()
        self.checkpoint_io.teardown()

