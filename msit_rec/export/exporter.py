"""`msit-rec export`: a trained run's checkpoint → a self-contained serving artifact, checked for parity.

Steps: load the (possibly N-process, sharded) checkpoint unsharded into one process; build the `ServingModel`
with the chosen table precisions; `torch.export` it (optionally AOTInductor-compile it); copy dataset.json and
the vocabularies; score the split with the eager model and the program *loaded back from disk*; write the
manifest (with the parity report) last. All of it is written into a temporary sibling of `out_dir` that replaces
it only when complete and passing: a failed parity leaves `out_dir` as it was, keeps the failed artifact (marked
`passed: false`) in `OUT.parity-failed` for inspection and raises, unless the gate is switched off.
"""

from __future__ import annotations

import platform
from pathlib import Path

import torch

import msit_rec
from msit_rec import option_defaults as defaults
from msit_rec.data.loader import ExamplesDataset, make_loader
from msit_rec.data.spec import DatasetMeta
from msit_rec.errors import ConfigError, DataError
from msit_rec.export.artifact_files import ARTIFACT_ENTRIES, copy_data_files, hash_files, keep_failed_artifact
from msit_rec.export.inputs import batch_to_inputs, input_schema
from msit_rec.export.parity import ParityBounds, describe_parity, failure_cause, paired_logits, parity_report
from msit_rec.export.precision import parse_precision
from msit_rec.export.program import compile_aoti, export_program, load_program, save_program
from msit_rec.export.serving_model import ServingModel, embedding_table_names
from msit_rec.outputs import check_no_overlap, check_replaceable_dir, staged_dir
from msit_rec.provenance import BF16_CPU_FLAGS, collect, native_bf16_flags, utc_now
from msit_rec.run_dir import check_dataset, checkpoint_position, load_model, read_run, resolve_checkpoint
from msit_rec.serving.contract import AOTI_FILE, ARTIFACT_VERSION, PROGRAM_FILE, InputSchema, Manifest, ParityReport

SERVING_DEVICE = torch.device("cpu")  # where the serving runtime runs the program unless told otherwise
EXAMPLE_ROWS = 16  # rows traced by torch.export (any number ≥ 2: the batch dimension stays symbolic)
EXAMPLE_CONTEXTS = 8  # contexts of the traced rows: ≥ 2 and ≠ EXAMPLE_ROWS, so neither size is specialised


def export_run(
    run_dir: str | Path,
    out_dir: str | Path,
    *,
    checkpoint: str = defaults.CHECKPOINT,
    precision: str | dict[str, str] = defaults.PRECISION,
    compute: str = defaults.COMPUTE,
    aoti: bool = False,
    split: str = defaults.SPLIT,
    parity_rows: int | None = None,
    batch_size: int = defaults.SCORING_BATCH_ROWS,
    max_logit_diff: float | None = None,
    max_auc_drop: float | None = None,
    parity_gate: bool = True,
    overwrite: bool = False,
    device: torch.device | None = None,
    progress: bool = True,
) -> Manifest:
    """Write the artifact of `run_dir`'s checkpoint to `out_dir` and return its manifest.

    `precision`: see `parse_precision`. `compute`: the dtype of the program's dense products, fp32 or bf16 (only
    where this host multiplies bf16 natively: AMX or AVX512-BF16). Parity bounds: by default |Δ logit| ≤ 1e-5 when
    every table and the compute are fp32, else per-scenario AUC drop ≤ 0.001; `max_logit_diff` / `max_auc_drop` set (and switch on) either bound.
    `parity_gate=False` keeps a failed artifact without raising. `device`: where the program's weights live
    (default the host CPU, where serving runs).
    """
    if parity_rows is not None and parity_rows < 1:
        raise ConfigError(f"--parity_rows must be ≥ 1 (or omitted for every row), got {parity_rows}")
    device = device if device is not None else SERVING_DEVICE
    out_dir = Path(out_dir)
    run = read_run(run_dir)
    meta = DatasetMeta.load(run.data_dir)
    check_dataset(run, meta, run.data_dir)
    tables = parse_precision(precision, embedding_table_names(meta))
    check_compute(compute, device)
    if split not in meta.splits:
        raise ConfigError(f"--split {split!r}: the dataset has splits {list(meta.splits)}")
    check_no_overlap(run.run_dir, out_dir, "--run")
    check_no_overlap(run.data_dir, out_dir, "the run's examples")
    check_replaceable_dir(out_dir, overwrite, ARTIFACT_ENTRIES)  # before the slow part; checked again at the swap
    ckpt = resolve_checkpoint(run, checkpoint)
    model = load_model(run, ckpt, meta, device)
    schema = input_schema(meta)
    dataset = ExamplesDataset(run.data_dir, split, batch_size)
    bounds = ParityBounds.for_precision(tables, compute).overridden(max_logit_diff, max_auc_drop)
    with staged_dir(out_dir, overwrite, ARTIFACT_ENTRIES) as staging:
        serving = ServingModel(model, meta, tables, compute)
        save_program(export_program(serving, _example_inputs(dataset, schema, device)), staging / PROGRAM_FILE)
        programs = [PROGRAM_FILE]
        if aoti:
            compile_aoti(torch.export.load(staging / PROGRAM_FILE), staging / AOTI_FILE)
            programs.append(AOTI_FILE)
        written = programs + copy_data_files(meta, run.data_dir, staging)

        infos = [table.info() for table in serving.tables.values()]
        table_bytes = (sum(t.fp32_bytes for t in infos), sum(t.bytes for t in infos))
        checked = {}
        for name in programs:  # each loaded back from disk: the files serving will run
            pairs = paired_logits(model, load_program(staging / name), make_loader(dataset), schema, device,
                                  parity_rows, len(dataset), progress)
            checked[name] = parity_report(pairs, split, meta.scenarios, bounds, *table_bytes)
        manifest = Manifest(
            artifact_version=ARTIFACT_VERSION,
            created_at=utc_now(),
            versions={"torch": torch.__version__, "msit_rec": msit_rec.__version__, "python": platform.python_version()},
            run_dir=str(run.run_dir.resolve()),
            checkpoint=str(ckpt.resolve()),
            dataset_name=meta.name,
            dataset_hash=meta.content_hash,
            model=run.model,
            inputs=schema,
            tables=infos,
            files=hash_files(staging, written),
            aoti=aoti,
            parity=_worst(checked),
            notes=[*_parity_notes(checked), f"the scenario embedding (S rows) is a dense module: {compute}, like the gate, attention and tower"],
            checkpoint_position=checkpoint_position(ckpt),
            provenance=collect(),
            compute=compute,
        )
        manifest.save(staging)
        if parity_gate and not manifest.parity.passed:
            failed = keep_failed_artifact(staging, out_dir)
            raise DataError(
                f"export parity FAILED: {failure_cause(manifest.parity)}; {out_dir} is unchanged and the failed "
                f"artifact is in {failed} for inspection, marked passed: false (pass --no_parity_gate to keep it "
                f"deliberately)\n{describe_parity(manifest.parity)}"
            )
    return manifest


def check_compute(compute: str, device: torch.device) -> None:
    """bf16 products only where they are native: elsewhere the CPU emulates them, slower than fp32."""
    if compute not in defaults.COMPUTES:
        raise ConfigError(f"--compute {compute!r}: expected one of {list(defaults.COMPUTES)}")
    if compute == "bf16" and device.type == "cpu" and not native_bf16_flags():
        raise ConfigError(f"--compute bf16: this CPU has no native bf16 products (none of {list(BF16_CPU_FLAGS)}), "
                          "so a bf16 program would run slower than fp32 here; export with --compute fp32")


def _example_inputs(dataset: ExamplesDataset, schema: InputSchema, device: torch.device) -> tuple[torch.Tensor, ...]:
    batch = next(iter(make_loader(dataset))).to(device)
    inputs = batch_to_inputs(batch, schema)
    repeats = -(-EXAMPLE_ROWS // inputs[0].shape[0])  # a 1-row split still gives a symbolic batch
    sparse, history, hist_len, scenario, dense, _ = (t.repeat_interleave(repeats, dim=0) for t in inputs)
    context = torch.arange(EXAMPLE_ROWS, device=device) % EXAMPLE_CONTEXTS  # [B]
    per_context = (t[:EXAMPLE_CONTEXTS] for t in (history, hist_len, scenario))
    return (sparse[:EXAMPLE_ROWS], *per_context, dense[:EXAMPLE_ROWS], context)


def _worst(reports: dict[str, ParityReport]) -> ParityReport:
    """The portable program's report, unless the AOTInductor package did worse (then that one)."""
    ordered = list(reports.values())
    failing = [r for r in ordered if not r.passed]
    return failing[0] if failing else max(ordered, key=lambda r: r.max_abs_logit_diff)


def _parity_notes(reports: dict[str, ParityReport]) -> list[str]:
    return [
        f"{name}: max |Δ logit| {report.max_abs_logit_diff:.3g} on {report.rows} rows, "
        f"{'passed' if report.passed else 'FAILED'}"
        for name, report in reports.items()
    ]
