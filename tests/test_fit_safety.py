"""`msit-rec fit` never retrains over a run silently, never trains on a NaN loss, and resumes only from a complete,
intact checkpoint of the same model trained on the same examples; a refused fit prints one line and exits 2.

Oracles: the bytes of the previous run (untouched), the stderr line count, a marker file that a malicious pickle
would create, and for kills an uninterrupted run's final tensors (bit-identical after kill + resume).
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from msit_rec.cli import build_parser, main
from msit_rec.train.checkpoint import (
    RECORD_FILE,
    TRAINER_STATE_FILE,
    check_checkpoint_dir,
    load_trainer_state,
    load_unsharded_checkpoint,
    recover_interrupted_swap,
)
from msit_rec.train.strategy import DENSE_PARAM_GROUPS_KEY
from tests.checkpoints import flat_tensors
from tests.launch import LAUNCH_ENV
from tests.training_worker import SMALL_RUN

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("in_process_launch_env")]

REPO = Path(__file__).resolve().parents[1]
SMALL = [arg for override in SMALL_RUN for arg in ("--set", override)]


def fit_args(data: Path, out: Path, *extra: str, trainer: str = "cpu") -> list[str]:
    return ["fit", "--data", str(data), "--trainer", str(REPO / f"configs/trainer/{trainer}.yaml"),
            "--model", str(REPO / "configs/model/msit.yaml"), "--out", str(out), "--quiet", *SMALL, *extra]


def refused(capsys: pytest.CaptureFixture[str], args: list[str], before_training: bool = True) -> str:
    """Run the CLI in this process; assert exit 2 with one error line and no traceback, and return the line.

    Refusals before training print nothing else; a refusal during training follows Lightning's start-up lines.
    """
    assert main(args) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("msit-rec fit: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in err, err[-3000:]
    if before_training:
        assert len(lines) == 1, lines
    return errors[0]


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(small_examples: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(fit_args(small_examples, out)) == 0
    return out


def copy_run(run: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(run, target)
    return target


# ---- the run directory ------------------------------------------------------------------------------------


def test_existing_run_is_refused_without_resume_or_overwrite(finished_run, small_examples, tmp_path, capsys) -> None:
    run = copy_run(finished_run, tmp_path)
    before = tree_bytes(run)
    line = refused(capsys, fit_args(small_examples, run))
    assert "holds a run already" in line and "--resume" in line and "last.ckpt" in line and "--overwrite" in line
    assert tree_bytes(run) == before


def test_resume_and_overwrite_together_are_refused(finished_run, small_examples, tmp_path, capsys) -> None:
    run = copy_run(finished_run, tmp_path)
    line = refused(capsys, fit_args(small_examples, run, "--overwrite", "--resume", str(run / "checkpoints/last.ckpt")))
    assert "pass one of them" in line


def test_out_holding_user_files_is_refused(small_examples, tmp_path, capsys) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    line = refused(capsys, fit_args(small_examples, tmp_path, "--overwrite"))
    assert "notes.txt" in line
    assert (tmp_path / "notes.txt").read_text() == "mine" and sorted(os.listdir(tmp_path)) == ["notes.txt"]


def test_failed_overwrite_puts_the_old_run_back(finished_run, small_examples, tmp_path, capsys) -> None:
    run = copy_run(finished_run, tmp_path)
    before = tree_bytes(run)
    line = refused(capsys, fit_args(small_examples, run, "--overwrite", "--set", "trainer.optim.dense_lr=1.0e+30",
                                    "--set", "trainer.sharding.embedding_lr=1.0e+30"), before_training=False)
    assert "not finite" in line
    assert tree_bytes(run) == before
    assert sorted(os.listdir(tmp_path)) == ["run"]  # neither the new run nor a set-aside copy is left


def test_non_finite_loss_stops_at_the_first_step(small_examples, tmp_path, capsys) -> None:
    line = refused(capsys, fit_args(small_examples, tmp_path / "run", "--set", "trainer.optim.dense_lr=1.0e+30",
                                    "--set", "trainer.sharding.embedding_lr=1.0e+30"), before_training=False)
    assert "training loss is not finite" in line and "at step 1 " in line
    assert not (tmp_path / "run").exists()  # no checkpoint was written: no half-made run is left


@pytest.mark.parametrize("value", ["0", "-2"])
def test_max_epochs_must_be_positive(small_examples, tmp_path, capsys, value: str) -> None:
    line = refused(capsys, fit_args(small_examples, tmp_path / "run", "--set", f"trainer.max_epochs={value}"))
    assert "max_epochs" in line
    assert not (tmp_path / "run").exists()


def test_help_names_the_real_resume_path() -> None:
    fit_parser = build_parser()._subparsers._group_actions[0].choices["fit"]  # type: ignore[union-attr]
    assert "RUN/checkpoints/last.ckpt" in fit_parser.format_help()


# ---- resuming ---------------------------------------------------------------------------------------------


def resume_args(data: Path, run: Path, ckpt: Path) -> list[str]:
    return fit_args(data, run, "--resume", str(ckpt), "--set", "trainer.max_epochs=3")


def rewrite_record(ckpt: Path) -> None:
    """What a careful forger does: make checkpoint.json agree with tampered files."""
    from msit_rec.train.checkpoint import _write_record

    (ckpt / RECORD_FILE).unlink()
    _write_record(ckpt)


def test_resume_from_a_partial_checkpoint_is_refused(finished_run, small_examples, tmp_path, capsys) -> None:
    run = copy_run(finished_run, tmp_path)
    (run / "checkpoints/last.ckpt" / RECORD_FILE).unlink()
    before = tree_bytes(run)
    assert "incomplete" in refused(capsys, resume_args(small_examples, run, run / "checkpoints/last.ckpt"))
    assert tree_bytes(run) == before


def test_resume_from_a_corrupt_checkpoint_is_refused(finished_run, small_examples, tmp_path, capsys) -> None:
    run = copy_run(finished_run, tmp_path)
    shard = next((run / "checkpoints/last.ckpt").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    line = refused(capsys, resume_args(small_examples, run, run / "checkpoints/last.ckpt"))
    assert "corrupt" in line and shard.name in line


def test_resume_from_a_foreign_model_is_refused(finished_run, small_examples, tmp_path, capsys) -> None:
    run = copy_run(finished_run, tmp_path)
    line = refused(capsys, [*resume_args(small_examples, run, run / "checkpoints/last.ckpt"),
                            "--model", str(REPO / "configs/model/din.yaml")])
    assert "does not fit the model" in line and "model.head.gate" in line


def test_resume_of_a_run_without_the_recency_group_is_refused(finished_run, small_examples, tmp_path, capsys) -> None:
    run = copy_run(finished_run, tmp_path)
    ckpt = run / "checkpoints/last.ckpt"
    state = load_trainer_state(ckpt)
    assert [group["name"] for group in state[DENSE_PARAM_GROUPS_KEY]] == ["dense", "recency"]
    state[DENSE_PARAM_GROUPS_KEY] = state[DENSE_PARAM_GROUPS_KEY][:1]  # what msit runs wrote before the profile's lr
    torch.save(state, ckpt / TRAINER_STATE_FILE)
    rewrite_record(ckpt)
    line = refused(capsys, resume_args(small_examples, run, ckpt))
    assert "1 parameter group(s)" in line and "2 (dense, recency)" in line and "--init-from" in line


def test_resume_on_re_prepared_examples_is_refused(finished_run, small_examples, tmp_path, capsys) -> None:
    run = copy_run(finished_run, tmp_path)
    other = tmp_path / "examples"
    shutil.copytree(small_examples, other)
    meta = json.loads((other / "dataset.json").read_text())
    meta["content_hash"] = "0" * 16  # what a re-prepare with other logs gives: the same layout, other content
    (other / "dataset.json").write_text(json.dumps(meta))
    line = refused(capsys, resume_args(other, run, run / "checkpoints/last.ckpt"))
    assert "content_hash" in line and "re-prepared" in line


def test_resume_into_a_new_directory_leaves_nothing_when_refused(finished_run, small_examples, tmp_path, capsys):
    bad = copy_run(finished_run, tmp_path)
    (bad / "checkpoints/last.ckpt" / TRAINER_STATE_FILE).unlink()
    refused(capsys, resume_args(small_examples, tmp_path / "new_run", bad / "checkpoints/last.ckpt"))
    assert not (tmp_path / "new_run").exists()


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['MSIT_EXPLOIT_MARKER']}",))


def test_trainer_state_never_runs_code(finished_run, small_examples, tmp_path, capsys, monkeypatch) -> None:
    run = copy_run(finished_run, tmp_path)
    ckpt = run / "checkpoints/last.ckpt"
    marker = tmp_path / "exploited"
    monkeypatch.setenv("MSIT_EXPLOIT_MARKER", str(marker))
    state = torch.load(ckpt / TRAINER_STATE_FILE, weights_only=True)
    state["payload"] = _Exploit()
    torch.save(state, ckpt / TRAINER_STATE_FILE)
    rewrite_record(ckpt)
    line = refused(capsys, resume_args(small_examples, run, ckpt))
    assert "not loadable as plain data" in line
    assert not marker.exists()


def test_dcp_metadata_never_runs_code(finished_run, small_examples, tmp_path, capsys, monkeypatch) -> None:
    """DCP unpickles `.metadata` without restrictions: a forged one (with a matching record) must be refused first."""
    run = copy_run(finished_run, tmp_path)
    ckpt = run / "checkpoints/last.ckpt"
    marker = tmp_path / "exploited"
    monkeypatch.setenv("MSIT_EXPLOIT_MARKER", str(marker))
    (ckpt / ".metadata").write_bytes(pickle.dumps(_Exploit()))
    rewrite_record(ckpt)
    line = refused(capsys, resume_args(small_examples, run, ckpt))
    assert ".metadata refused" in line and "not allowed" in line
    assert not marker.exists()


def test_checkpoint_record_and_swap_recovery(finished_run, tmp_path) -> None:
    run = copy_run(finished_run, tmp_path)
    ckpt = run / "checkpoints/last.ckpt"
    record = json.loads((ckpt / RECORD_FILE).read_text())
    assert set(record["files"]) == {p.name for p in ckpt.iterdir()} - {RECORD_FILE}
    assert load_trainer_state(ckpt)["epoch"] >= 0
    # a kill between the two renames of a swap: only `.last.ckpt.old-*` is there, and it comes back
    ckpt.rename(ckpt.parent / ".last.ckpt.old-123-abc")
    recover_interrupted_swap(ckpt)
    assert check_checkpoint_dir(ckpt) == ckpt


# ---- kills ------------------------------------------------------------------------------------------------

KILL_RUN = ("--set", "trainer.max_epochs=3", "--set", "trainer.limit_train_batches=6", "--set", "trainer.batch_size=128")


def cli_fit(data: Path, out: Path, *extra: str) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.Popen(
        [sys.executable, "-m", "msit_rec.cli", *fit_args(data, out, *KILL_RUN, *extra, trainer="multiprocess")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )


def kill_when(process: subprocess.Popen[bytes], ready) -> bool:
    """SIGKILL the whole process group once `ready()`; False when the fit ended first."""
    while process.poll() is None:
        if ready():
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return True
        time.sleep(0.001)
    return False


def test_sigkill_at_any_moment_then_resume_reaches_the_uninterrupted_weights(small_examples, tmp_path) -> None:
    """2 processes, killed 4 times (twice inside a checkpoint save), resumed each time from what is on disk."""
    reference = cli_fit(small_examples, tmp_path / "reference")
    _, err = reference.communicate(timeout=600)
    assert reference.returncode == 0, err.decode()[-3000:]
    run = tmp_path / "run"
    last = run / "checkpoints/last.ckpt"
    rng = random.Random(int(os.environ.get("MSIT_KILL_SEED", "7")))
    saving = lambda: any(run.glob("checkpoints/.*.partial"))  # a save is under way
    kills = [
        saving,  # the first save: nothing to resume from afterwards, the next fit starts over with --overwrite
        lambda: last.is_dir() and saving(),  # a save while a complete `last` exists: it must survive
        "random",
        "random",
    ]
    outcomes = []
    for moment in kills:
        extra = ("--resume", str(last)) if last.is_dir() else (("--overwrite",) if run.exists() else ())
        process = cli_fit(small_examples, run, *extra)
        if moment == "random":
            deadline = time.monotonic() + rng.uniform(2.0, 10.0)
            killed = kill_when(process, lambda d=deadline: time.monotonic() > d)
        else:
            killed = kill_when(process, moment)
        outcomes.append(killed)
        if not killed:
            _, err = process.communicate()
            assert process.returncode == 0, err.decode()[-3000:]
        for ckpt in run.glob("checkpoints/*.ckpt"):  # after any kill, what carries the name is complete and intact
            check_checkpoint_dir(ckpt)
    assert outcomes[0] and outcomes[1], "the kills inside a save must have happened"
    if outcomes[-1]:  # else the last random moment came after the end: the run is complete already
        final = cli_fit(small_examples, run, "--resume", str(run / "checkpoints/last.ckpt"))
        _, err = final.communicate(timeout=600)
        assert final.returncode == 0, err.decode()[-3000:]
    expected = flat_tensors(load_unsharded_checkpoint(tmp_path / "reference/checkpoints/last.ckpt"))
    actual = flat_tensors(load_unsharded_checkpoint(run / "checkpoints/last.ckpt"))
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[k], actual[k]) for k in expected), [
        k for k in expected if not torch.equal(expected[k], actual[k])
    ]
    assert load_trainer_state(run / "checkpoints/last.ckpt")["epoch"] == 2


def test_a_failed_save_raises_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch) -> None:
    from msit_rec.train import checkpoint

    def save(value: float) -> None:
        checkpoint.save_sharded({"state_dict": {"w": torch.full((3,), value)}}, {"epoch": int(value)},
                                tmp_path / "last.ckpt", is_rank_zero=True, barrier=lambda _: None,
                                all_succeeded=lambda ok: ok)

    save(1.0)
    before = tree_bytes(tmp_path / "last.ckpt")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "replace_dir", disk_full)
    with pytest.raises(checkpoint.DataError, match="save failed on rank 0.*No space left"):
        save(2.0)
    assert tree_bytes(tmp_path / "last.ckpt") == before
    assert load_unsharded_checkpoint(tmp_path / "last.ckpt")["state_dict"]["w"].tolist() == [1.0, 1.0, 1.0]


def test_a_malformed_checkpoint_record_is_one_line(finished_run, small_examples, tmp_path, capsys) -> None:
    run = copy_run(finished_run, tmp_path)
    ckpt = run / "checkpoints/last.ckpt"
    (ckpt / RECORD_FILE).write_text('{"version": 1, "files": [1, 2]}')
    line = refused(capsys, resume_args(small_examples, run, ckpt))
    assert "unreadable record (AttributeError" in line


def test_resume_from_another_run_into_an_existing_run_is_refused(finished_run, small_examples, tmp_path, capsys):
    source, target = copy_run(finished_run, tmp_path / "a"), copy_run(finished_run, tmp_path / "b")
    before = tree_bytes(target)
    line = refused(capsys, resume_args(small_examples, target, source / "checkpoints/last.ckpt"))
    assert "holds a run already" in line and "a new or empty --out" in line
    assert tree_bytes(target) == before
