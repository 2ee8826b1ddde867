"""`msit-rec runs`: one table over many runs of `msit-rec fit`, to compare them at a glance.

A row per run: its path, its variant, the config keys (dotted, `model.*` and `trainer.*` of fit_config.yaml) whose
values differ between the runs given — the keys every run shares a value for say nothing and are left out — the
dataset (short content hash) and the host (CPU model, GPUs) when those differ too, the best validation AUC with the
epoch/step of the best checkpoint, and the wall time of the fit (from fit_result.json; blank while a run has not
finished). Test metrics join a row from `--evaluation` inputs (metrics.json of `msit-rec evaluate`): a model of an
evaluation on the `test` split belongs to the run its `run_dir` names (files written before `run_dir` was recorded:
the run holding its checkpoint, `RUN/checkpoints/NAME.ckpt`, relative paths taken from the current directory).
An evaluation joins only while it still describes the run: one whose scored checkpoint (best/last) was at another
epoch/step than the run's checkpoint of that name now, or that was written before the run's current (not resumed)
fit started, scored a model the run directory no longer holds — it is skipped with a warning. A run scored on two
datasets shows its evaluation on its own training data, else is refused; a `test data` column (short hash) appears
when some run's test data is not its training data. An `--evaluation` none of whose models joins a run is warned
about (stderr), and a JSON that is not a metrics.json of `msit-rec evaluate` is refused.

The table prints as aligned Markdown; `--out DIR` writes it as runs.md and, with unformatted values, runs.csv.
"""

from __future__ import annotations

import csv
import datetime
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from msit_rec.config import to_dict
from msit_rec.errors import DataError
from msit_rec.metrics_file import METRICS_FILE, MetricsFile, ModelMetrics, load_metrics, metrics_path
from msit_rec.outputs import check_no_overlap, staged_dir
from msit_rec.provenance import HostFacts
from msit_rec.run_dir import (
    CHECKPOINT_DIR,
    FIT_CONFIG_FILE,
    NAMED_CHECKPOINTS,
    FitResult,
    RunRecord,
    read_fit_result,
    read_run,
)

log = logging.getLogger(__name__)

RUNS_MARKDOWN = "runs.md"
RUNS_CSV = "runs.csv"
RUNS_OUTPUTS = (RUNS_MARKDOWN, RUNS_CSV)
TEST_SPLIT = "test"
CONFIG_SECTIONS = ("model", "trainer")
NOT_COMPARED = {"model.variant", "trainer.progress_bar"}  # a column of its own; display only
MISSING = "—"
LEGEND = (  # what every table has; legend(rows) adds the test columns' line where the table has them
    "Config columns: the keys whose values differ between these runs. best epoch/step: Lightning's 0-based epoch "
    "and the optimizer steps when the best checkpoint was saved. wall: the last `fit` invocation (since its resume, "
    "for a resumed run)."
)
TEST_LEGEND = "test: the run's evaluation on the test split (overall AUC and logloss)."
TEST_DATA_LEGEND = "test data: the dataset it was scored on (short hash), where that is not the run's training data."


@dataclass
class RunRow:
    path: Path
    record: RunRecord
    result: FitResult | None  # None until the fit has finished
    test: ModelMetrics | None  # its evaluation on the test split, when one was given


@dataclass
class Column:
    title: str  # in the printed table and runs.md
    text: Callable[[RunRow], str]
    csv: dict[str, Callable[[RunRow], Any]]  # runs.csv column → unformatted value
    numeric: bool = False  # right-aligned


def find_runs(dirs: Iterable[str | Path]) -> list[Path]:
    """Each of `dirs` is a run directory, or holds run directories one level down (hidden entries skipped)."""
    found: list[Path] = []
    for given in map(Path, dirs):
        if not given.is_dir():
            what = "not a directory" if given.exists() else "no such directory"
            raise DataError(f"{given}: {what}; give run directories of `msit-rec fit` (its --out)")
        inside = [given] if _is_run(given) else sorted(
            child for child in given.iterdir() if not child.name.startswith(".") and _is_run(child)
        )
        if not inside:
            raise DataError(f"{given}: not a run directory (no {FIT_CONFIG_FILE}) and none of its subdirectories "
                            f"is one; give `msit-rec fit --out` directories or a directory holding them")
        found += [run for run in inside if run.resolve() not in {r.resolve() for r in found}]
    return found


def _is_run(path: Path) -> bool:
    return (path / FIT_CONFIG_FILE).is_file()


@dataclass
class _Scored:
    """A test-split model of one --evaluation file, and that file."""

    model: ModelMetrics
    source: Path


def load_evaluation(given: str | Path) -> tuple[Path, MetricsFile]:
    """The metrics.json of `given` (the file or an evaluate --out directory) and its contents; any other JSON (a
    dataset.json, a fit_result.json, `{}`) is a DataError saying it is not a metrics.json of `msit-rec evaluate`."""
    path = metrics_path(given)
    try:
        return path, load_metrics(path)
    except DataError:  # no format version: say why when it is not a metrics.json at all (read again on failure only)
        raw = json.loads(path.read_text())  # load_metrics parsed it: valid JSON here
        if not isinstance(raw, dict) or not isinstance(raw.get("models"), dict):
            raise DataError(f"{path}: not a {METRICS_FILE} of `msit-rec evaluate` (no 'models'); give --evaluation a "
                            f"metrics.json or an `evaluate --out` directory") from None
        raise


def evaluations_by_run(inputs: Iterable[str | Path], rows: list[RunRow]) -> dict[Path, ModelMetrics]:
    """Resolved run directory (of `rows`) → its model of an evaluation on the test split.

    A model that scored a checkpoint the run no longer holds (`stale_reason`) is skipped with a warning, as is an
    input none of whose models belongs to one of `rows`. A run scored at two different checkpoints (or one checkpoint
    at two training positions) is ambiguous: an error naming both files. A run scored on two datasets shows the
    evaluation on its training data; without one, an error naming both files.
    """
    by_path = {row.path.resolve(): row for row in rows}
    found: dict[Path, list[_Scored]] = {}
    for given in inputs:
        path, metrics = load_evaluation(given)
        tested = {name: model for name, model in metrics.models.items() if model.split == TEST_SPLIT}
        matched = {name: run for name, model in tested.items() if (run := _run_of(model)) in by_path}
        for name, run in matched.items():
            model = tested[name]
            stale = stale_reason(model, metrics, by_path[run])
            if stale is not None:
                log.warning("%s: model '%s' not shown (stale): %s", path, name, stale)
                continue
            for other in found.get(run, []):
                if _scored(other.model) != _scored(model):
                    raise DataError(
                        f"run {run} has test evaluations of two checkpoints ({other.model.checkpoint} in "
                        f"{other.source}, {model.checkpoint} in {path}); give one --evaluation of it"
                    )
            found.setdefault(run, []).append(_Scored(model, path))
        if not matched:
            log.warning("%s: %s; not in the table", path, _unmatched(metrics, tested))
    return {run: _on_which_data(run, scored, by_path[run]) for run, scored in found.items()}


def _unmatched(metrics: MetricsFile, tested: dict[str, ModelMetrics]) -> str:
    if not tested:
        splits = sorted({model.split for model in metrics.models.values()})
        return f"no model evaluated on the {TEST_SPLIT} split (split {', '.join(splits) or 'none'})"
    runs = sorted({str(run) if (run := _run_of(model)) else model.checkpoint for model in tested.values()})
    return f"its models are of no run given here ({', '.join(runs)})"


def _on_which_data(run: Path, scored: list[_Scored], row: RunRow) -> ModelMetrics:
    """The one evaluation of `run` to show: on its training data where the run was scored on two datasets."""
    first = scored[0]
    other = next((s for s in scored if s.model.dataset_hash != first.model.dataset_hash), None)
    if other is None:
        return first.model
    own = next((s for s in scored if s.model.dataset_hash == row.record.dataset_hash), None)
    if own is not None:
        return own.model
    raise DataError(
        f"run {run} has test evaluations on two datasets, neither its training data "
        f"{row.record.dataset_hash[:12]} ({first.model.dataset_hash[:12]} in {first.source}, "
        f"{other.model.dataset_hash[:12]} in {other.source}); give one --evaluation of it"
    )


def stale_reason(model: ModelMetrics, metrics: MetricsFile, row: RunRow) -> str | None:
    """Why `model` (an evaluation of `row`'s run) scored a checkpoint the run directory no longer holds, or None.

    Stale: the scored checkpoint (best or last) was at another epoch/step than the run's checkpoint of that name is
    now (both recorded), or the evaluation was written before the run's current fit started and that fit did not
    resume (a fit with --overwrite replaced the run: its checkpoints may well be at the same epoch/step)."""
    result = row.result
    if result is None:  # not finished: nothing to compare with
        return None
    checkpoint = Path(model.checkpoint)
    name = checkpoint.name.removesuffix(".ckpt")
    current = {"best": result.best_position, "last": result.last_position}.get(name)
    if checkpoint.parent.name == CHECKPOINT_DIR and name in NAMED_CHECKPOINTS:
        scored = model.checkpoint_position
        if scored is not None and current is not None and scored != current:
            return (f"it scored {row.path}'s {checkpoint.name} at {scored}, but that checkpoint is now at {current} "
                    "(fitted again since)")
    evaluated = _time(metrics.provenance.created_at) if metrics.provenance is not None else None
    started = _time(result.started_at)
    if evaluated is not None and started is not None and result.resumed_from is None and evaluated < started:
        return (f"evaluated at {metrics.provenance.created_at}, before the current fit of {row.path} started "
                f"({result.started_at}): the run was fitted again since")
    return None


def _time(text: str | None) -> datetime.datetime | None:
    try:
        moment = datetime.datetime.fromisoformat(text) if text else None
    except ValueError:
        return None
    return moment if moment is None or moment.tzinfo is not None else moment.replace(tzinfo=datetime.UTC)


def _resolved(path: str) -> Path:
    return Path(path).resolve()


def _scored(model: ModelMetrics) -> tuple[str, Any]:
    """What was scored: the checkpoint's name (best.ckpt, ...) and, where recorded, its epoch and step."""
    return Path(model.checkpoint).name, model.checkpoint_position


def _run_of(model: ModelMetrics) -> Path | None:
    if model.run_dir is not None:
        return _resolved(model.run_dir)
    checkpoint = Path(model.checkpoint)
    return _resolved(str(checkpoint.parent.parent)) if checkpoint.parent.name == CHECKPOINT_DIR else None


def collect_runs(dirs: Iterable[str | Path], evaluations: Iterable[str | Path] = ()) -> list[RunRow]:
    rows = [RunRow(path, read_run(path).record, read_fit_result(path), None) for path in find_runs(dirs)]
    tests = evaluations_by_run(evaluations, rows)
    for row in rows:
        row.test = tests.get(row.path.resolve())
    return rows


def flat_config(record: RunRecord) -> dict[str, Any]:
    """`section.key.subkey` → value of the run's model and trainer config (lists kept whole)."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key, child in value.items():
                walk(f"{prefix}.{key}", child)
        else:
            flat[prefix] = value

    for section in CONFIG_SECTIONS:
        walk(section, to_dict(getattr(record, section)))
    return flat


def differing_keys(rows: list[RunRow]) -> list[str]:
    """Config keys whose values are not the same in every run (a key some runs lack differs), in config order."""
    flats = [flat_config(row.record) for row in rows]
    keys = list(dict.fromkeys(key for flat in flats for key in flat))
    return [
        key for key in keys
        if key not in NOT_COMPARED and len({_value_text(flat.get(key, MISSING)) for flat in flats}) > 1
    ]


def _config_value(key: str) -> Callable[[RunRow], str]:
    return lambda row: _value_text(flat_config(row.record).get(key, MISSING))


def _value_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _number(value: float | None, digits: int) -> str:
    return MISSING if value is None else f"{value:.{digits}f}"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return MISSING
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


def host_label(host: HostFacts | None) -> str | None:
    if host is None:
        return None
    gpus = f" + {', '.join(host.gpus)}" if host.gpus else ""
    return f"{host.cpu_model or 'unknown CPU'} ({host.cpu_capability}){gpus}"


def _host(row: RunRow) -> HostFacts | None:
    return row.result.provenance.host if row.result is not None and row.result.provenance is not None else None


def _result(field: str) -> Callable[[RunRow], Any]:
    return lambda row: getattr(row.result, field) if row.result is not None else None


def _best(field: str) -> Callable[[RunRow], int | None]:
    return lambda row: getattr(row.result.best_position, field) if row.result and row.result.best_position else None


def _test(metric: str) -> Callable[[RunRow], float | None]:
    return lambda row: getattr(row.test.overall, metric) if row.test is not None else None


def _tested(row: RunRow) -> str | None:
    return None if row.test is None else Path(row.test.checkpoint).name.removesuffix(".ckpt")


def _position_text(epoch: int | None, step: int | None) -> str:
    return MISSING if epoch is None else f"{epoch}/{step}"


def _other_test_data(rows: list[RunRow]) -> bool:
    """Whether some run's test metrics come from other data than the run was trained on."""
    return any(row.test is not None and row.test.dataset_hash != row.record.dataset_hash for row in rows)


def legend(rows: list[RunRow]) -> str:
    """The lines under the table: LEGEND, and what the test columns are where the table has them."""
    tested = any(row.test is not None for row in rows)
    return " ".join([LEGEND, *([TEST_LEGEND] if tested else []), *([TEST_DATA_LEGEND] if _other_test_data(rows) else [])])


def columns(rows: list[RunRow]) -> list[Column]:
    """The table's columns for these runs: the optional ones only where they tell the runs apart (or were asked)."""
    config_columns = [Column(key, value, {key: value}) for key in differing_keys(rows) for value in [_config_value(key)]]
    optional = []
    if len({row.record.dataset_hash for row in rows}) > 1:
        optional.append(Column("data", lambda row: row.record.dataset_hash[:12],
                               {"dataset_hash": lambda row: row.record.dataset_hash}))
    if len({host_label(_host(row)) for row in rows} - {None}) > 1:  # runs fitted before hosts were recorded: unknown
        optional.append(Column("host", lambda row: host_label(_host(row)) or MISSING,
                               {"host": lambda row: host_label(_host(row))}))
    test_data = [
        Column("test data", lambda row: row.test.dataset_hash[:12] if row.test is not None else MISSING,
               {"test_dataset_hash": lambda row: row.test.dataset_hash if row.test is not None else None}),
    ] if _other_test_data(rows) else []
    test_columns = [
        Column("tested", lambda row: _tested(row) or MISSING,
               {"test_checkpoint": lambda row: row.test.checkpoint if row.test is not None else None}),
        *test_data,
        Column("test AUC", lambda row: _number(_test("auc")(row), 4), {"test_auc": _test("auc")}, numeric=True),
        Column("test logloss", lambda row: _number(_test("logloss")(row), 4), {"test_logloss": _test("logloss")},
               numeric=True),
    ] if any(row.test is not None for row in rows) else []
    return [
        Column("run", lambda row: str(row.path), {"run": lambda row: str(row.path)}),
        Column("variant", lambda row: row.record.model.variant, {"variant": lambda row: row.record.model.variant}),
        *config_columns,
        *optional,
        Column("best val AUC", lambda row: _number(_result("best_val_auc")(row), 5),
               {"best_val_auc": _result("best_val_auc")}, numeric=True),
        Column("best epoch/step", lambda row: _position_text(_best("epoch")(row), _best("global_step")(row)),
               {"best_epoch": _best("epoch"), "best_step": _best("global_step")}, numeric=True),
        Column("wall", lambda row: duration(_result("wall_seconds")(row)), {"wall_seconds": _result("wall_seconds")},
               numeric=True),
        *test_columns,
    ]


def markdown_table(rows: list[RunRow]) -> str:
    """The table as Markdown, padded so that it reads aligned as plain text too."""
    cols = columns(rows)
    cells = [[col.title for col in cols]] + [[col.text(row).replace("|", "\\|") for col in cols] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(cols))]

    def line(values: list[str]) -> str:
        padded = [v.rjust(w) if col.numeric else v.ljust(w) for v, w, col in zip(values, widths, cols)]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join("-" * (w + 1) + (":" if col.numeric else "-") for w, col in zip(widths, cols)) + "|"
    return "\n".join([line(cells[0]), rule, *map(line, cells[1:])])


def write_runs(rows: list[RunRow], out_dir: str | Path, overwrite: bool = False) -> list[Path]:
    """runs.md (table and legend) and runs.csv (one column per value, unformatted), swapped in together."""
    with staged_dir(out_dir, overwrite, RUNS_OUTPUTS) as staging:
        (staging / RUNS_MARKDOWN).write_text(f"# Runs\n\n{markdown_table(rows)}\n\n{legend(rows)}\n")
        getters = {name: get for col in columns(rows) for name, get in col.csv.items()}
        with (staging / RUNS_CSV).open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(getters)
            writer.writerows([["" if (v := get(row)) is None else v for get in getters.values()] for row in rows])
    return [Path(out_dir) / name for name in RUNS_OUTPUTS]


def runs(
    dirs: list[str | Path], evaluations: list[str | Path] = (), out_dir: str | Path | None = None,
    overwrite: bool = False,
) -> tuple[list[RunRow], list[Path]]:
    """The rows of `dirs`' runs (with the test metrics of `evaluations`), and the files written to `out_dir`."""
    rows = collect_runs(dirs, evaluations)
    if out_dir is None:
        return rows, []
    for source in [*(row.path for row in rows), *evaluations]:
        check_no_overlap(source, out_dir, "input", "--out")
    return rows, write_runs(rows, out_dir, overwrite)
