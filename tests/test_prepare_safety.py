"""Writing commands never lose data: source and output may not overlap, and a failed run keeps the old output.

`prepare`, `generate` and `requests` build their output in a temporary sibling and swap it in only when it is
complete; these tests break each of them part-way and check that the earlier output is byte-identical and that
no temporary directory or file is left behind.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from msit_rec.cli import main
from msit_rec.config import load_config, to_dict
from msit_rec.errors import DataError
from pipelines import synthetic
from pipelines.prepare import prepare
from pipelines.synthetic import generate
from pipelines.synthetic_config import GeneratorConfig
from tests.raw_logs import dataset_config, write_log

REPO = Path(__file__).resolve().parents[1]


def small_log(rows: int = 40) -> dict[str, list]:
    rng = np.random.default_rng(0)
    return {
        "user_id": rng.integers(0, 5, rows).tolist(),
        "item_id": rng.integers(0, 12, rows).tolist(),
        "cat": rng.integers(0, 3, rows).tolist(),
        "scenario": ["a", "b"] * (rows // 2),
        "ts": list(range(1_700_000_000, 1_700_000_000 + rows)),
        "label": rng.integers(0, 2, rows).tolist(),
    }


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root` (symlinks not followed) → its bytes: equal snapshots mean nothing changed."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def leftovers(parent: Path) -> list[str]:
    """Temporary siblings (`.NAME.tmp-…`, `.NAME.old-…`) a staged write left in `parent`."""
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def write_config(path: Path, source: Path, **overrides) -> Path:
    path.write_text(yaml.safe_dump({"dataset": to_dict(dataset_config(source, **overrides))}))
    return path


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """Exit code and stderr of `msit-rec ARGV`."""
    capsys.readouterr()
    code = main(list(argv))
    return code, capsys.readouterr().err


@pytest.fixture()
def hive_log(tmp_path: Path) -> Path:
    """tmp/raw/day=1/part-0.parquet, tmp/raw/day=2/part-0.parquet."""
    log = small_log()
    half = {k: v[:20] for k, v in log.items()}, {k: v[20:] for k, v in log.items()}
    for day, part in enumerate(half, start=1):
        write_log(tmp_path / "raw" / f"day={day}" / "part-0.parquet", part)
    return tmp_path / "raw"


def overlapping_outputs(tmp_path: Path, raw: Path) -> dict[str, tuple[str, Path]]:
    """case → (--source, --out) pairs that overlap, directly or through a symlink or a glob."""
    link = tmp_path / "link"
    link.symlink_to(raw, target_is_directory=True)
    return {
        "equal": (str(raw), raw),
        "inside": (str(raw), raw / "examples"),
        "parent": (str(raw), tmp_path),
        "symlink_equal": (str(raw), link),
        "symlink_inside": (str(raw), link / "examples"),
        "source_via_symlink": (str(link), raw / "day=1"),
        "glob_folder": (str(raw / "day=*" / "*.parquet"), raw / "day=1"),  # a folder holding matched files
        "glob_would_read_output": (str(raw / "**" / "*.parquet"), raw / "examples"),  # the next run would read it
        "file_parent": (str(raw / "day=1" / "part-0.parquet"), raw / "day=1"),
    }


@pytest.mark.parametrize("overwrite", [False, True])
def test_prepare_refuses_output_overlapping_the_source(
    tmp_path: Path, hive_log: Path, capsys: pytest.CaptureFixture[str], overwrite: bool
) -> None:
    before = snapshot(hive_log)
    config = write_config(tmp_path / "ds.yaml", hive_log)
    for case, (source, out) in overlapping_outputs(tmp_path, hive_log).items():
        flags = ["--overwrite"] if overwrite else []
        code, err = run_cli(capsys, "prepare", "--config", str(config), "--source", source, "--out", str(out),
                            "--quiet", *flags)
        assert code == 2, case
        assert err.count("\n") == 1 and err.startswith("msit-rec prepare: error: --out ") and "overlaps source" in err, case
        assert snapshot(hive_log) == before, case
    assert not (hive_log / "examples").exists() and leftovers(tmp_path) == [] and leftovers(hive_log) == []


def test_prepare_next_to_the_source_is_fine(tmp_path: Path, hive_log: Path, capsys, monkeypatch) -> None:
    config = write_config(tmp_path / "ds.yaml", hive_log)
    code, _ = run_cli(capsys, "prepare", "--config", str(config), "--out", str(tmp_path / "raw-examples"), "--quiet")
    assert code == 0 and (tmp_path / "raw-examples" / "dataset.json").is_file()
    # a relative glob in the working directory and an output beside the files it matches
    monkeypatch.chdir(hive_log)
    code, _ = run_cli(capsys, "prepare", "--config", str(config), "--source", "day=*/*.parquet",
                      "--out", "examples", "--quiet")
    assert code == 0 and (hive_log / "examples" / "dataset.json").is_file()


def test_failed_prepare_with_overwrite_keeps_the_previous_output(
    tmp_path: Path, hive_log: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path / "ds.yaml", hive_log)
    out = tmp_path / "examples"
    assert run_cli(capsys, "prepare", "--config", str(config), "--out", str(out), "--quiet")[0] == 0
    before = snapshot(out)
    assert {"dataset.json", "train/part-00000.parquet"} <= set(before)

    (hive_log / "day=2" / "part-0.parquet").write_bytes(b"PAR1 truncated by a failed upload")  # corrupt input
    code, err = run_cli(capsys, "prepare", "--config", str(config), "--out", str(out), "--overwrite", "--quiet")
    assert code == 2 and "not a readable Parquet file" in err.splitlines()[-1]
    assert snapshot(out) == before and leftovers(tmp_path) == []


def test_prepare_crashing_after_writing_shards_keeps_the_previous_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = write_log(tmp_path / "raw.parquet", small_log())
    out = tmp_path / "examples"
    first = prepare(dataset_config(log), out)
    before = snapshot(out)

    def crash(*_: object) -> str:
        raise OSError("disk full")

    monkeypatch.setattr("pipelines.prepare._content_hash", crash)  # every shard and vocabulary is written by then
    with pytest.raises(OSError, match="disk full"):
        prepare(dataset_config(log, history={"max_len": 1}), out, overwrite=True)
    assert snapshot(out) == before and leftovers(tmp_path) == []
    monkeypatch.undo()
    again = prepare(dataset_config(log, history={"max_len": 1}), out, overwrite=True)  # and a good run replaces it
    assert again.history.max_len == 1 and again.content_hash != first.content_hash


def test_prepared_output_is_relocatable(tmp_path: Path) -> None:
    """Built in a staging directory and renamed: nothing in dataset.json may point into the staging path."""
    log = write_log(tmp_path / "raw.parquet", small_log())
    meta = prepare(dataset_config(log), tmp_path / "examples")
    text = (tmp_path / "examples" / "dataset.json").read_text()
    assert ".tmp-" not in text and str(tmp_path / "examples") not in text
    paths = [f for s in meta.splits.values() for f in s.files] + [f.vocabulary for f in meta.features if f.vocabulary]
    assert paths and all(not os.path.isabs(p) and (tmp_path / "examples" / p).is_file() for p in paths)


def test_failed_generate_with_overwrite_keeps_the_previous_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = load_config(REPO / "configs/generate/tiny.yaml", GeneratorConfig, "generate", overrides=["days=2"])
    out = tmp_path / "raw"
    generate(config, out, progress=False)
    before = snapshot(out)
    calls = []
    write_part = synthetic._write_part

    def write_then_crash(*args: object) -> None:
        if calls:
            raise OSError("disk full")
        calls.append(args)
        write_part(*args)

    monkeypatch.setattr(synthetic, "_write_part", write_then_crash)
    with pytest.raises(OSError, match="disk full"):
        generate(load_config(REPO / "configs/generate/tiny.yaml", GeneratorConfig, "generate"), out, progress=False,
                 overwrite=True)
    assert calls and snapshot(out) == before and leftovers(tmp_path) == []


def test_requests_failure_or_overlap_keeps_the_previous_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    log = write_log(tmp_path / "raw.parquet", small_log())
    data = tmp_path / "examples"
    prepare(dataset_config(log, split={"method": "time", "valid_fraction": 0.0, "test_fraction": 0.3}), data)
    out = tmp_path / "requests.jsonl"
    assert run_cli(capsys, "requests", "--data", str(data), "--rows", "4", "--out", str(out), "--quiet")[0] == 0
    before = out.read_bytes()
    assert before.count(b"\n") == 4

    written: list[str] = []

    def dump_then_crash(obj: object) -> str:
        if written:
            raise OSError("disk full")
        written.append(json.dumps(obj))
        return written[-1]

    monkeypatch.setattr("pipelines.requests.json", SimpleNamespace(dumps=dump_then_crash))
    with pytest.raises(OSError, match="disk full"):
        main(["requests", "--data", str(data), "--rows", "6", "--out", str(out), "--overwrite", "--quiet"])
    monkeypatch.undo()
    assert written and out.read_bytes() == before and leftovers(tmp_path) == []

    data_before = snapshot(data)
    code, err = run_cli(capsys, "requests", "--data", str(data), "--out", str(data / "dataset.json"), "--overwrite")
    assert code == 2 and err.count("\n") == 1 and "overlaps --data" in err
    assert snapshot(data) == data_before


def test_staged_prepare_refuses_a_file_as_output(tmp_path: Path) -> None:
    log = write_log(tmp_path / "raw.parquet", small_log())
    (tmp_path / "taken").write_text("mine")
    with pytest.raises(DataError, match="exists and is not a directory"):
        prepare(dataset_config(log), tmp_path / "taken", overwrite=True)
    assert (tmp_path / "taken").read_text() == "mine"


def test_a_mount_point_output_is_refused_before_any_work(tmp_path: Path, hive_log: Path, capsys, monkeypatch) -> None:
    """A mount point cannot be renamed: the swap at the end would fail after all the work, so it is refused first."""
    import os

    out = tmp_path / "mounted"
    out.mkdir()
    real = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: Path(p) == out or real(p))
    config = write_config(tmp_path / "ds.yaml", hive_log)
    code, err = run_cli(capsys, "prepare", "--config", str(config), "--out", str(out), "--quiet")
    assert code == 2 and err.count("\n") == 1 and f"--out {out}: is a mount point" in err
    assert list(out.iterdir()) == []
