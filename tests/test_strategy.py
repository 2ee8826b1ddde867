"""TorchRecStrategy: sharded training under Lightning, fused optimizers, sharded checkpoints, resume, export.

Oracles: an unsharded plain-PyTorch copy of the same model (weights from the checkpoint), hand-written
optimizer updates, an uninterrupted run for resume, and the ranks against each other.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from msit_rec.config import from_dict
from msit_rec.errors import ConfigError, MsitError
from msit_rec.fit_config import ShardingConfig
from msit_rec.train.checkpoint import load_unsharded_checkpoint, load_unsharded_state_dict
from msit_rec.train.sharding import build_constraints, fused_params
from msit_rec.train.strategy import TorchRecStrategy, available_devices
from tests.checkpoints import flat_tensors
from tests.launch import LAUNCH_ENV
from tests.strategy_worker import TWO_PROCESS_SHARDING
from tests.toy_model import BAG_TABLES, SEQ_TABLE, TABLE_NAMES, ToyRecModule, batch_loader, make_batch

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("in_process_launch_env")]

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "strategy_worker.py"
EVAL_BATCH = 999


def one_process_trainer(root: Path, sharding: ShardingConfig | None = None, **kwargs: Any) -> Trainer:
    return Trainer(
        accelerator="cpu",
        devices=1,
        strategy=TorchRecStrategy(sharding or ShardingConfig(embedding_lr=0.05)),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        # Lightning would wrap the loaders in a shuffling DistributedSampler, and on resume it builds the first
        # epoch's iterator before `set_epoch`, replaying epoch 0's order (a Lightning quirk, not ours).
        use_distributed_sampler=False,
        default_root_dir=root,
        **kwargs,
    )


def plain_model(state_dict: dict[str, torch.Tensor]) -> ToyRecModule:
    """Unsharded reference: tables as ordinary CPU tensors, weights from `state_dict`."""
    model = ToyRecModule(table_device="cpu")
    model.load_state_dict(state_dict)
    return model.eval()


def logits(model: ToyRecModule, index: int = EVAL_BATCH) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(make_batch(index))


class SaveAtTrainStart(Callback):
    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_start(self, trainer: Trainer, pl_module: Any) -> None:
        trainer.save_checkpoint(self.path)


def best_and_last(dirpath: Path) -> ModelCheckpoint:
    return ModelCheckpoint(dirpath=dirpath, monitor="val_loss", mode="min", save_top_k=1, save_last=True)


# ---- config errors ---------------------------------------------------------------------------------


def test_unknown_table_in_forced_sharding_is_a_config_error() -> None:
    config = ShardingConfig(table_sharding={"user": "row_wise", "no_such_table": "table_wise"})
    with pytest.raises(ConfigError, match=r"no_such_table.*\['cat', 'hist', 'item', 'user'\]"):
        build_constraints(config, ToyRecModule(), world_size=2)


def test_bad_sharding_values_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="table_sharding.user"):
        from_dict(ShardingConfig, {"table_sharding": {"user": "diagonal"}}, "trainer.sharding")
    with pytest.raises(ConfigError, match="hist.*data_parallel"):
        build_constraints(ShardingConfig(table_sharding={"hist": "data_parallel"}), ToyRecModule(), world_size=2)
    with pytest.raises(ConfigError, match="adam.*GPU"):
        fused_params(ShardingConfig(embedding_optimizer="adam"), torch.device("cpu"))


def test_forced_sharding_becomes_planner_constraints() -> None:
    constraints = build_constraints(
        ShardingConfig(table_sharding={"user": "column_wise", "cat": "data_parallel"}), ToyRecModule(), world_size=2
    )
    assert set(constraints) == set(TABLE_NAMES)
    assert constraints["user"].sharding_types == ["column_wise"] and constraints["user"].compute_kernels == ["fused"]
    assert constraints["cat"].sharding_types == ["data_parallel"] and constraints["cat"].compute_kernels == ["dense"]
    assert "data_parallel" not in constraints["hist"].sharding_types  # sequence table: never DP on CPU
    assert constraints["hist"].compute_kernels == ["fused"]


def test_one_process_keeps_unforced_tables_whole() -> None:
    constraints = build_constraints(ShardingConfig(table_sharding={"user": "row_wise"}), ToyRecModule(), world_size=1)
    assert constraints["user"].sharding_types == ["row_wise"]  # forced: as asked
    assert all(constraints[t].sharding_types == ["table_wise"] for t in TABLE_NAMES if t != "user")
    spread = build_constraints(ShardingConfig(), ToyRecModule(), world_size=2)
    assert all("row_wise" in c.sharding_types for c in spread.values())


def test_more_devices_than_available_fails_before_training() -> None:
    too_many = available_devices("cpu") + 1
    with pytest.raises(MsitError, match=f"devices={too_many}.*only {too_many - 1} CPU cores"):
        Trainer(accelerator="cpu", devices=too_many, strategy=TorchRecStrategy(), logger=False)


# ---- exact optimizer steps ---------------------------------------------------------------------------


def rowwise_adagrad_update(weight: torch.Tensor, grad: torch.Tensor, lr: float, eps: float):
    """FBGEMM exact row-wise Adagrad from zero state: one accumulator per row = mean of squared grads."""
    momentum = grad.pow(2).mean(dim=1)  # [rows]
    return weight - lr * grad / (momentum.sqrt() + eps).unsqueeze(1), momentum


@pytest.mark.parametrize(
    ("embedding_optimizer", "table_sharding"),
    [("sgd", {}), ("rowwise_adagrad", {}), ("rowwise_adagrad", {"cat": "data_parallel"})],
)
def test_one_step_matches_plain_reference(tmp_path: Path, embedding_optimizer: str, table_sharding: dict) -> None:
    """Fused table updates and the dense SGD step equal hand-computed updates on an unsharded copy.

    A data-parallel table uses the dense kernel, so the dense optimizer (SGD here) updates it.
    """
    seed_everything(0)
    lr, dense_lr, eps = 0.3, 0.1, 1e-8
    sharding = ShardingConfig(
        table_sharding=table_sharding, embedding_optimizer=embedding_optimizer, embedding_lr=lr, embedding_eps=eps
    )
    module = ToyRecModule(dense_optimizer="sgd", dense_lr=dense_lr)
    trainer = one_process_trainer(tmp_path, sharding, max_steps=1, callbacks=[SaveAtTrainStart(tmp_path / "init")])
    trainer.fit(module, batch_loader(1))
    trainer.save_checkpoint(tmp_path / "after")
    after = load_unsharded_checkpoint(tmp_path / "after")

    reference = plain_model(load_unsharded_state_dict(tmp_path / "init")).train()
    torch.nn.functional.binary_cross_entropy_with_logits(reference(make_batch(0)), make_batch(0)["label"]).backward()
    data_parallel = {f"ebc.embedding_bags.{t}.weight" for t in table_sharding} | {
        name for name, _ in reference.named_parameters() if name.startswith("mlp.")
    }
    checked_momenta = 0
    with torch.no_grad():
        for name, param in reference.named_parameters():
            assert (param.grad != 0).any(), f"{name} got no gradient: the check would be vacuous"
            if name in data_parallel:
                expected = param - dense_lr * param.grad
            elif embedding_optimizer == "sgd":
                expected = param - lr * param.grad
            else:
                table = name.split(".")[-2]
                expected, momentum = rowwise_adagrad_update(param, param.grad, lr, eps)
                saved_momentum = after["optimizer_states"][0]["state"][f"embeddings.{name}"][f"{table}.momentum1"]
                torch.testing.assert_close(saved_momentum, momentum, rtol=1e-5, atol=1e-12)
                checked_momenta += 1
            torch.testing.assert_close(after["state_dict"][name], expected, rtol=1e-5, atol=1e-6, msg=name)
            assert not torch.equal(expected, param), f"{name} did not move: the check would be vacuous"
    fused_tables = len(TABLE_NAMES) - len(table_sharding)
    assert checked_momenta == (0 if embedding_optimizer == "sgd" else fused_tables)


# ---- resume (1 process) and 1 ↔ 2 process checkpoints ---------------------------------------------------


@pytest.fixture(scope="module")
def one_process_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Uninterrupted 2-epoch run vs 1 epoch + resume to 2 epochs (with best/last ModelCheckpoint)."""
    root = tmp_path_factory.mktemp("one_process")
    train, val = batch_loader(4), batch_loader(2, seed=1)

    seed_everything(0)
    full = ToyRecModule(lr_decay=0.8)
    one_process_trainer(root / "full", max_epochs=2, enable_checkpointing=False).fit(full, train, val)
    full_trainer = full.trainer
    full_trainer.save_checkpoint(root / "full.ckpt")
    # A second Trainer on the already sharded module (fit, then validate) reuses its shards.
    (full_val,) = one_process_trainer(root / "validate").validate(full, val, verbose=False)

    ckpts = root / "ckpts"
    seed_everything(0)
    one_process_trainer(root / "first", max_epochs=1, callbacks=[best_and_last(ckpts)]).fit(
        ToyRecModule(lr_decay=0.8), train, val
    )
    seed_everything(0)  # the seed also seeds Lightning's distributed sampler: same config, same data order
    resumed = ToyRecModule(lr_decay=0.8)
    resumed_trainer = one_process_trainer(root / "second", max_epochs=2, callbacks=[best_and_last(ckpts)])
    resumed_trainer.fit(resumed, train, val, ckpt_path=ckpts / "last.ckpt")
    resumed_trainer.save_checkpoint(root / "resumed.ckpt")
    return {"full": root / "full.ckpt", "resumed": root / "resumed.ckpt", "ckpts": ckpts, "full_val": full_val,
            "lrs": (full_trainer.optimizers[0].param_groups[0]["lr"], resumed_trainer.optimizers[0].param_groups[0]["lr"]),
            "dense_wrapper": type(full_trainer.strategy.dmp._dmp_wrapped_module)}


def test_resume_continues_with_identical_state(one_process_runs: dict[str, Path]) -> None:
    full = flat_tensors(load_unsharded_checkpoint(one_process_runs["full"]))
    resumed = flat_tensors(load_unsharded_checkpoint(one_process_runs["resumed"]))
    assert full.keys() == resumed.keys()
    assert any("momentum1" in k for k in full) and any("exp_avg_sq" in k for k in full) and any("step" in k for k in full)
    for key in full:
        assert torch.equal(full[key], resumed[key]), key
    full_lr, resumed_lr = one_process_runs["lrs"]
    assert full_lr == resumed_lr == pytest.approx(0.01 * 0.8**8)  # LR schedule continued, not restarted


def test_one_process_leaves_the_dense_parameters_unwrapped(one_process_runs: dict[str, Any]) -> None:
    """One process has no gradient to average: DMP keeps the module itself, no DDP around it (two processes keep
    DDP: test_two_processes_learn_and_keep_dense_weights_identical would see the ranks' dense weights drift)."""
    assert one_process_runs["dense_wrapper"] is ToyRecModule


def test_validate_after_fit_reuses_the_sharded_module(one_process_runs: dict[str, Any]) -> None:
    reference = plain_model(load_unsharded_state_dict(one_process_runs["full"]))
    with torch.no_grad():
        losses = [reference._loss(make_batch(i, seed=1)) for i in range(2)]
    assert one_process_runs["full_val"]["val_loss"] == pytest.approx(float(torch.stack(losses).mean()), rel=1e-5)


def test_model_checkpoint_keeps_best_and_last_directories(one_process_runs: dict[str, Path]) -> None:
    names = sorted(p.name for p in one_process_runs["ckpts"].iterdir())
    assert len(names) == 2 and "last.ckpt" in names, names  # the worse epoch's checkpoint was removed
    best = one_process_runs["ckpts"] / next(n for n in names if n != "last.ckpt")
    assert best.is_dir() and (best / ".metadata").is_file()


@pytest.fixture(scope="module")
def two_process_run(one_process_runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run tests/strategy_worker.py, which Lightning launches as 2 gloo processes."""
    out = tmp_path_factory.mktemp("two_process")
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    env["PYTHONPATH"] = str(REPO)
    result = subprocess.run(
        [sys.executable, str(WORKER), str(out), str(one_process_runs["full"])],
        cwd=out, env=env, check=False, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return out


def test_two_processes_learn_and_keep_dense_weights_identical(two_process_run: Path) -> None:
    for rank in (0, 1):
        losses = torch.tensor(torch.load(two_process_run / f"losses_rank{rank}.pt"))
        assert len(losses) == 16  # 4 epochs x (8 batches / 2 ranks)
        assert losses[-4:].mean() < 0.8 * losses[:4].mean(), losses
    dense = [torch.load(two_process_run / f"dense_rank{rank}.pt") for rank in (0, 1)]
    assert dense[0].keys() == dense[1].keys()
    for key in dense[0]:
        assert torch.equal(dense[0][key], dense[1][key]), key
    names = sorted(p.name for p in (two_process_run / "ckpts").iterdir())
    assert len(names) == 2 and "last.ckpt" in names, names


def test_two_process_plan_honours_forced_sharding(two_process_run: Path) -> None:
    placements = [torch.load(two_process_run / f"placements_rank{rank}.pt") for rank in (0, 1)]
    assert placements[0] == placements[1]
    forced = TWO_PROCESS_SHARDING
    assert {table: placements[0][table] for table in forced} == forced
    assert placements[0]["hist"] in {"table_wise", "row_wise", "column_wise"}  # planner's choice, never DP


def test_two_process_checkpoint_matches_plain_model_and_one_process(two_process_run: Path, tmp_path: Path) -> None:
    saved = torch.load(two_process_run / "logits.pt")
    ckpt2 = two_process_run / "ckpt2"
    reference = logits(plain_model(load_unsharded_state_dict(ckpt2)))
    torch.testing.assert_close(saved["trained"], reference)

    one_process = ToyRecModule()
    one_process_trainer(tmp_path).predict(one_process, batch_loader(1), ckpt_path=ckpt2)
    torch.testing.assert_close(logits(one_process), reference)


def test_two_process_training_state_resumes_in_one_process(two_process_run: Path, tmp_path: Path) -> None:
    """Tables, fused and dense optimizer state written by 2 processes reshard exactly into 1 process."""
    ckpt2 = two_process_run / "ckpt2"
    same_placement = ShardingConfig(table_sharding=dict(TWO_PROCESS_SHARDING), embedding_lr=0.05)
    trainer = one_process_trainer(
        tmp_path, same_placement, max_epochs=5, callbacks=[SaveAtTrainStart(tmp_path / "restored")]
    )
    trainer.fit(ToyRecModule(dense_lr=0.02), batch_loader(1), ckpt_path=ckpt2)
    saved = flat_tensors(load_unsharded_checkpoint(ckpt2))
    restored = flat_tensors(load_unsharded_checkpoint(tmp_path / "restored"))
    assert saved.keys() == restored.keys()
    assert any("momentum1" in k for k in saved) and any("exp_avg" in k for k in saved)
    for key in saved:
        assert torch.equal(saved[key], restored[key]), key


def test_one_process_checkpoint_loads_into_two_processes(two_process_run: Path, one_process_runs) -> None:
    saved = torch.load(two_process_run / "logits.pt")
    reference = logits(plain_model(load_unsharded_state_dict(one_process_runs["full"])))
    torch.testing.assert_close(saved["from_one_process"], reference)
    assert not torch.allclose(saved["from_one_process"], saved["trained"])  # two different models were compared


def test_unsharded_state_dict_has_full_tables(one_process_runs: dict[str, Path]) -> None:
    state = load_unsharded_state_dict(one_process_runs["full"])
    for name, (_, rows) in BAG_TABLES.items():
        assert state[f"ebc.embedding_bags.{name}.weight"].shape == (rows, 8)
    assert state[f"ec.embeddings.{SEQ_TABLE[0]}.weight"].shape == (SEQ_TABLE[2], 8)
