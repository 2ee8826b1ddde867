"""`trainer.precision: auto`: bf16-mixed only on hosts with native bf16 products that a probe measures faster; the
verdict cached per host; the choice and its reason in fit_result.json.

Oracles: hand-set CPU flags and probe results (the choice must follow them, and the cache must stop a second probe);
the run's own fit_result.json against `choose_precision` on this host.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

from msit_rec.errors import ConfigError
from msit_rec.run_dir import read_fit_result
from msit_rec.train import auto_precision
from msit_rec.train.auto_precision import BF16, FP32, choose_precision, measure_bf16_speedup, probe_cache_path
from msit_rec.train.fit import fit
from tests.training_worker import tiny_fit_config


@pytest.fixture
def cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


def cpu_with(monkeypatch: pytest.MonkeyPatch, flags: list[str], model: str = "Test CPU") -> None:
    monkeypatch.setattr(auto_precision, "cpu_info", lambda: (model, flags))


def never_probe() -> float:
    raise AssertionError("the probe ran, but the answer should not need it")


def test_a_named_precision_is_kept_without_probing(cache_home: Path) -> None:
    for name in ("32-true", "bf16-mixed"):
        choice = choose_precision(name, "cpu", measure=never_probe)
        assert (choice.precision, choice.requested, choice.bf16_speedup) == (name, name, None)
    assert not cache_home.exists()


def test_auto_without_native_bf16_is_fp32_without_probing(cache_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cpu_with(monkeypatch, ["avx2", "fma", "avx512f"])
    choice = choose_precision("auto", "cpu", measure=never_probe)
    assert choice.precision == FP32
    assert "no native bf16" in choice.reason


@pytest.mark.parametrize(("speedup", "expected"), [(3.0, BF16), (1.1, FP32)])
def test_auto_follows_the_measured_speedup_and_caches_it(
    speedup: float, expected: str, cache_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cpu_with(monkeypatch, ["avx2", "avx512f", "avx512_bf16"])
    probes: list[float] = []

    def probe() -> float:
        probes.append(speedup)
        return speedup

    first = choose_precision("auto", "cpu", measure=probe)
    assert (first.precision, first.bf16_speedup) == (expected, speedup)
    assert "avx512_bf16" in first.reason
    assert probe_cache_path().is_relative_to(cache_home) and probe_cache_path().is_file()
    again = choose_precision("auto", "cpu", measure=never_probe)  # another process of the job, same host
    assert again == first and probes == [speedup]
    cpu_with(monkeypatch, ["avx2", "avx512f", "avx512_bf16", "amx_bf16"], model="Other CPU")  # another host
    assert choose_precision("auto", "cpu", measure=lambda: 5.0).bf16_speedup == 5.0


def test_a_corrupt_cache_is_measured_again(cache_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cpu_with(monkeypatch, ["avx512_bf16"])
    probe_cache_path().parent.mkdir(parents=True)
    probe_cache_path().write_text("{not json")
    assert choose_precision("auto", "cpu", measure=lambda: 2.0).precision == BF16
    assert list(json.loads(probe_cache_path().read_text()).values()) == [2.0]


def test_fp16_autocast_on_cpu_is_refused_not_silently_changed(small_examples: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="16-mixed .* does not run on CPU"):
        choose_precision("16-mixed", "cpu", measure=never_probe)
    config = tiny_fit_config("msit")
    config = dataclasses.replace(config, trainer=dataclasses.replace(config.trainer, precision="16-mixed"))
    with pytest.raises(ConfigError, match="fit.trainer.precision"):
        fit(config, small_examples, tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_the_probe_measures_this_cpu() -> None:
    speedup = measure_bf16_speedup()
    assert math.isfinite(speedup) and speedup > 0


@pytest.mark.usefixtures("in_process_launch_env", "slow_setup")
def test_fit_records_what_auto_chose_and_why(small_examples: Path, tmp_path: Path, cache_home: Path) -> None:
    config = tiny_fit_config("msit")
    config = dataclasses.replace(config, trainer=dataclasses.replace(config.trainer, precision="auto", max_epochs=1))
    fit(config, small_examples, tmp_path / "run")
    recorded = read_fit_result(tmp_path / "run").precision
    expected = choose_precision("auto", "cpu")  # the cached verdict the fit wrote: no second probe
    assert recorded == expected
    assert recorded.requested == "auto" and recorded.precision in (FP32, BF16)
