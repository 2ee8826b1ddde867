"""The CLI end to end on generated data: generate → prepare, as `make demo` runs it."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
import yaml

from msit_rec.cli import main
from msit_rec.data.spec import DatasetMeta

ROOT = Path(__file__).resolve().parents[1]


def test_generate_then_prepare(tmp_path: Path, capsys) -> None:
    raw, examples = tmp_path / "raw", tmp_path / "examples"
    assert main(["generate", "--config", str(ROOT / "configs/generate/tiny.yaml"), "--out", str(raw), "--quiet"]) == 0
    assert "raw logs written to" in capsys.readouterr().out
    code = main([
        "prepare", "--config", str(ROOT / "configs/datasets/synthetic.yaml"), "--source", str(raw),
        "--out", str(examples), "--quiet", "--set", "history.max_len=20",
    ])
    printed = capsys.readouterr().out
    assert code == 0
    meta = DatasetMeta.load(examples)
    raw_rows = pl.scan_parquet(str(raw / "**" / "*.parquet")).select(pl.len()).collect().item()
    assert meta.rows_in == raw_rows == sum(s.rows for s in meta.splits.values()) + sum(meta.rejects.values())
    assert meta.history.max_len == 20
    assert meta.scenarios == ["home", "search", "detail", "channel", "new"]
    assert all(meta.splits[s].rows > 0 for s in ("train", "valid", "test"))
    assert "new" in printed and "rows in" in printed  # the per-scenario summary is printed
    train = pl.read_parquet(examples / meta.splits["train"].files[0])
    assert train["hist_len"].max() <= 20 and train["hist_len"].mean() > 0


def test_print_config_resolves_overrides(capsys) -> None:
    code = main(["prepare", "--config", str(ROOT / "configs/datasets/synthetic.yaml"), "--out", "unused",
                 "--print_config", "--set", "history.max_len=7"])
    assert code == 0
    assert "max_len: 7" in capsys.readouterr().out


def test_unknown_override_key_is_named(capsys) -> None:
    code = main(["generate", "--config", str(ROOT / "configs/generate/tiny.yaml"), "--out", "unused",
                 "--set", "userz=5", "--print_config"])
    assert code == 2
    assert "unknown key(s) ['userz']" in capsys.readouterr().err


def test_version_and_print_config_need_no_output_or_repository(tmp_path: Path, capsys, monkeypatch) -> None:
    from msit_rec import __version__

    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0 and __version__ in capsys.readouterr().out
    monkeypatch.chdir(tmp_path)  # nothing resolves against the repository: fit's defaults live in the dataclasses
    assert main(["fit", "--print_config", "--set", "model.variant=din"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["variant"] == "din" and printed["trainer"]["devices"] == 1
    assert main(["prepare", "--config", str(ROOT / "configs/datasets/synthetic.yaml"), "--print_config"]) == 0
    assert "dataset:" in capsys.readouterr().out


def test_commands_that_write_name_their_missing_flags(capsys) -> None:
    assert main(["prepare", "--config", str(ROOT / "configs/datasets/synthetic.yaml")]) == 2
    assert "--out required" in capsys.readouterr().err
    assert main(["fit", "--out", "somewhere"]) == 2
    assert "--data required" in capsys.readouterr().err


def test_flag_defaults_are_the_library_defaults() -> None:
    """Each flag a library function also takes defaults to that function's own default (declared once)."""
    import inspect
    from dataclasses import asdict

    from msit_rec.cli import build_parser
    from msit_rec.compare import compare
    from msit_rec.evaluate import evaluate_runs
    from msit_rec.explain import explain
    from msit_rec.export import export_run
    from msit_rec.serving.artifact import load_artifact
    from msit_rec.serving.predict import predict_file
    from msit_rec.serving.server import ServeConfig
    from pipelines.requests import requests_from_examples

    commands = {
        "evaluate": (["--run", "r", "--out", "o"], [evaluate_runs]),
        "compare": (["m", "--out", "o"], [compare]),
        "explain": (["--run", "r", "--out", "o"], [explain]),
        "export": (["--run", "r", "--out", "o"], [export_run]),
        "predict": (["--artifact", "a", "--input", "i", "--out", "o"], [predict_file, load_artifact]),
        "serve": (["--artifact", "a"], [load_artifact]),
        "requests": (["--data", "d", "--out", "o"], [requests_from_examples]),
    }
    parser = build_parser()
    for command, (required, functions) in commands.items():
        args = vars(parser.parse_args([command, *required]))
        checked = 0
        for function in functions:
            for name, parameter in inspect.signature(function).parameters.items():
                if name in args and parameter.default is not inspect.Parameter.empty and name != "overwrite":
                    assert args[name] == parameter.default, (command, name, args[name], parameter.default)
                    checked += 1
        assert checked >= 1, command
    serve_args = vars(parser.parse_args(["serve", "--artifact", "a"]))
    assert {name: serve_args[name] for name in asdict(ServeConfig())} == asdict(ServeConfig())
