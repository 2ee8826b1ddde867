"""Many hosts: `torchrun` with c10d rendezvous, two "nodes" of one process each on this machine (loopback), trains to
the same weights as two local processes started by Lightning (`trainer.devices=2`).

Oracle: the local 2-process run of the same config and seed — every tensor of both checkpoints (tables, dense
parameters, optimizer state) bit for bit, the best validation AUC and the checkpoints' positions.

Both runs force the same table placement (row-wise). Left to the planner the two would differ for a reason, not by
accident: it sees another topology (2 hosts × 1 process instead of 1 host × 2) and, as it should across hosts, picks
table-row-wise placements; a table's initial rows are drawn per shard, so another placement starts from other
weights. Same placement, same ranks, same data → the same numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from torch.distributed.run import get_args_parser

from msit_rec.cli import main
from msit_rec.data.spec import DatasetMeta
from msit_rec.errors import ConfigError
from msit_rec.fit_config import ModelConfig
from msit_rec.host import is_launching_process
from msit_rec.train.checkpoint import load_unsharded_checkpoint
from msit_rec.train.fit import check_model_fits_dataset
from msit_rec.train.sharding import embedding_tables
from msit_rec.train.strategy import check_launch
from tests.checkpoints import flat_tensors
from tests.launch import LAUNCH_ENV

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 180
RUN = ("model.attention_hidden=[8]", "model.tower_hidden=[16]", "trainer.batch_size=256",
       "trainer.eval_batch_size=1024", "trainer.max_epochs=2", "trainer.limit_train_batches=4",
       "trainer.limit_val_batches=2", "trainer.progress_bar=false", "trainer.seed=11")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_env() -> dict[str, str]:
    """This process's environment without launch variables; one thread per process (both runs share the cores)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV and not k.startswith(("TORCHELASTIC_", "PET_"))}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return env


def fit_args(data: Path, out: Path, *overrides: str) -> list[str]:
    meta = DatasetMeta.load(data)
    tables = embedding_tables(check_model_fits_dataset(meta, ModelConfig()))
    row_wise = ", ".join(f"{name}: row_wise" for name in sorted(tables))
    sets = [*RUN, f"trainer.sharding.table_sharding={{{row_wise}}}", *overrides]
    return ["fit", "--data", str(data), "--model", str(REPO / "configs/model/msit.yaml"), "--out", str(out), "--quiet",
            *(arg for override in sets for arg in ("--set", override))]


def run_all(commands: dict[str, list[str]], logs: Path) -> None:
    """Start every command at once (own session, output in logs/NAME.log); fail with every log unless all exit 0
    within TIMEOUT_S."""
    logs.mkdir(parents=True, exist_ok=True)
    processes = {}
    for name, command in commands.items():
        with open(logs / f"{name}.log", "wb") as out:
            processes[name] = subprocess.Popen(command, env=clean_env(), cwd=REPO, stdout=out,
                                               stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + TIMEOUT_S
    while any(p.poll() is None for p in processes.values()) and time.monotonic() < deadline:
        time.sleep(0.2)
    timed_out = [name for name, p in processes.items() if p.poll() is None]
    for name in timed_out:
        os.killpg(processes[name].pid, signal.SIGKILL)
        processes[name].wait()
    codes = {name: p.returncode for name, p in processes.items()}
    if timed_out or any(codes.values()):
        report = "\n".join(f"===== {name} (exit {codes[name]}) =====\n{(logs / f'{name}.log').read_text()[-4000:]}"
                           for name in commands)
        pytest.fail(f"exit codes {codes}; killed after {TIMEOUT_S} s: {timed_out or 'none'}\n{report}", pytrace=False)


def torchrun_node(port: int, args: list[str]) -> list[str]:
    """What each host runs (README, "Many hosts"): `torchrun` is `python -m torch.distributed.run`."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
            "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", f"msit-test-{port}",
            "--max_restarts", "0", "-m", "msit_rec.cli", *args]


@pytest.mark.slow
def test_two_torchrun_nodes_train_like_two_local_processes(small_examples: Path, tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    args = fit_args(small_examples, hosts, "trainer.devices=1", "trainer.num_nodes=2")
    port = free_port()
    run_all({"node_a": torchrun_node(port, args), "node_b": torchrun_node(port, args)}, tmp_path / "logs")
    local = tmp_path / "local"
    run_all({"local": [sys.executable, "-m", "msit_rec.cli", *fit_args(small_examples, local, "trainer.devices=2")]},
            tmp_path / "logs")

    for name in ("last", "best"):
        expected = flat_tensors(load_unsharded_checkpoint(local / f"checkpoints/{name}.ckpt"))
        actual = flat_tensors(load_unsharded_checkpoint(hosts / f"checkpoints/{name}.ckpt"))
        assert expected.keys() == actual.keys()
        assert any("embedding_bags" in key for key in actual) and any("head." in key for key in actual)
        differ = [k for k in expected if not torch.equal(expected[k], actual[k])]
        assert not differ, (name, differ)
    results = [json.loads((run / "fit_result.json").read_text()) for run in (local, hosts)]
    for key in ("best_val_auc", "best_position", "last_position"):
        assert results[0][key] == results[1][key], key
    assert results[1]["best_val_auc"] is not None
    # the one rank 0 wrote the run: its record, and the checkpoints hold both ranks' shards
    assert (hosts / "fit_config.yaml").is_file()
    assert sorted(p.name for p in (hosts / "checkpoints/last.ckpt").glob("*.distcp")) == ["__0_0.distcp",
                                                                                          "__1_0.distcp"]


def _torchrun_env(monkeypatch: pytest.MonkeyPatch, rank: int, local_world: int, nodes: int, **outer: str) -> None:
    for key, value in {"TORCHELASTIC_RUN_ID": "job", "RANK": str(rank), "LOCAL_RANK": str(rank % local_world),
                       "GROUP_RANK": str(rank // local_world), "LOCAL_WORLD_SIZE": str(local_world),
                       "WORLD_SIZE": str(local_world * nodes), "GROUP_WORLD_SIZE": str(nodes), **outer}.items():
        monkeypatch.setenv(key, value)


def test_check_launch_names_the_keys_torchrun_implies(monkeypatch: pytest.MonkeyPatch) -> None:
    check_launch(devices=4, num_nodes=3)  # not under torchrun: nothing to compare with
    _torchrun_env(monkeypatch, rank=0, local_world=1, nodes=2)
    check_launch(devices=1, num_nodes=2)
    for devices, num_nodes in ((2, 1), (1, 1)):  # (2, 1): the right product, the wrong topology
        with pytest.raises(ConfigError, match="pass --set trainer.devices=1 --set trainer.num_nodes=2"):
            check_launch(devices, num_nodes)


def test_global_rank_zero_is_the_launching_process_under_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    # srun runs one torchrun per node; c10d rendezvous may give global rank 0 to the node of SLURM task 1
    _torchrun_env(monkeypatch, rank=0, local_world=1, nodes=2, SLURM_PROCID="1", GROUP_RANK="1")
    assert is_launching_process()
    _torchrun_env(monkeypatch, rank=1, local_world=1, nodes=2, SLURM_PROCID="0", GROUP_RANK="0")
    assert not is_launching_process()


def example_launch(path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[argparse.Namespace, list[str]]:
    """The torchrun arguments (as torchrun parses them) and the msit-rec arguments of an example job file; the values a
    scheduler supplies (PET_* variables from the Kubeflow operator, SLURM's) are set as it would set them."""
    if path.suffix == ".yaml":
        job = yaml.safe_load(path.read_text())
        spec, (container,) = job["spec"], job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"]
        replicas = job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"]
        elastic = spec["elasticPolicy"]
        assert elastic["minReplicas"] == elastic["maxReplicas"] == replicas, "a fixed number of pods"
        for key, value in {"PET_NNODES": f"{elastic['minReplicas']}:{elastic['maxReplicas']}",
                           "PET_NPROC_PER_NODE": spec["nprocPerNode"], "PET_RDZV_BACKEND": elastic["rdzvBackend"],
                           "PET_RDZV_ENDPOINT": "msit-fit-worker-0:23456",
                           "PET_MAX_RESTARTS": str(elastic["maxRestarts"])}.items():
            monkeypatch.setenv(key, value)
        command = container["command"]
    else:
        for key, value in {"SLURM_NNODES": "2", "SLURM_JOB_ID": "7", "HEAD": "node-0", "GPUS_PER_NODE": "8"}.items():
            monkeypatch.setenv(key, value)
        text = path.read_text().replace("\\\n", " ")
        (line,) = [line for line in text.splitlines() if line.startswith("srun ")]
        command = shlex.split(os.path.expandvars(line))
        command = command[next(i for i, word in enumerate(command) if word.endswith("torchrun")):]
    assert Path(command[0]).name == "torchrun"
    launch = get_args_parser().parse_args(command[1:])
    return launch, launch.training_script_args


@pytest.mark.parametrize("example", ["pytorchjob.yaml", "slurm.sbatch"])
def test_multihost_examples_match_the_cli(example: str, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """The job files are not run here; what they tell torchrun and `fit` is checked against both parsers: the config
    resolves, and trainer.devices/num_nodes are what torchrun will start (check_launch would refuse otherwise)."""
    launch, fit_command = example_launch(REPO / "configs/trainer/multihost" / example, monkeypatch)
    assert launch.module and launch.training_script == "msit_rec.cli" and fit_command[0] == "fit"
    assert launch.rdzv_backend == "c10d" and int(launch.max_restarts) == 0
    monkeypatch.chdir(REPO)
    assert main([*fit_command, "--print_config"]) == 0
    trainer = yaml.safe_load(capsys.readouterr().out)["trainer"]
    assert launch.nnodes in (str(trainer["num_nodes"]), f"{trainer['num_nodes']}:{trainer['num_nodes']}")
    assert launch.nproc_per_node == str(trainer["devices"]) and trainer["num_nodes"] > 1
    assert trainer["accelerator"] == "gpu"
