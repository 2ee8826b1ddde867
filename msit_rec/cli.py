"""`msit-rec`: the single command-line entry point.

Subcommands follow Lightning's conventions where they apply (`--config`, `--print_config`); every one also
takes `--set key=value` overrides. User mistakes (MsitError) print one clear line and exit 2, never a traceback.
The CLI is the composition root, so it is the one place in `msit_rec` that imports `pipelines`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from msit_rec import __version__
from msit_rec import option_defaults as defaults
from msit_rec.config import apply_overrides, from_dict, load_config, read_yaml, to_dict
from msit_rec.errors import ConfigError, MsitError, TrainingError
from msit_rec.host import is_launching_process
from msit_rec.serving.serve_config import SERVE_OPTIONS
from msit_rec.terminal import command_output


def _add_common(parser: argparse.ArgumentParser, example_config: str, example_override: str) -> None:
    parser.add_argument("--config", required=True, help=f"YAML config, e.g. {example_config}")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a config key (dotted for nested keys), e.g. --set {example_override}; repeatable",
    )
    parser.add_argument("--print_config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or step logs")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="msit-rec", description="Multi-scenario CTR ranking with scenario-conditioned interest transfer."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    generate = commands.add_parser("generate", help="write synthetic multi-scenario impression logs (Parquet)")
    _add_common(generate, "configs/generate/synthetic.yaml", "users=1000")
    generate.add_argument("--out", type=Path, help="output directory (day=... partitions); required unless --print_config")

    prepare = commands.add_parser("prepare", help="raw logs → leak-free training examples + dataset.json")
    _add_common(prepare, "configs/datasets/synthetic.yaml", "history.max_len=20")
    prepare.add_argument("--out", type=Path, help="output directory for the examples; required unless --print_config")
    prepare.add_argument("--source", help="raw log path (overrides source.path in the config)")
    prepare.add_argument("--vocab-from", dest="vocab_from", type=Path, metavar="EXAMPLES",
                         help="earlier examples directory (e.g. yesterday's): every id it knows keeps its index, new "
                              "ids are appended, so `fit --init-from` can warm-start from a model trained on it")

    fit = commands.add_parser("fit", help="train a model variant on prepared examples (1..N processes)")
    fit.add_argument("--data", type=Path, help="prepared examples directory (with dataset.json); required to train")
    fit.add_argument("--model", help="model config (section `model`), e.g. configs/model/din.yaml; default: msit with "
                                     "the defaults of msit_rec/fit_config.py")
    fit.add_argument("--trainer", help="trainer config (section `trainer`), e.g. configs/trainer/multiprocess.yaml; "
                                       "default: one CPU process with the defaults of msit_rec/fit_config.py")
    fit.add_argument("--out", type=Path, help="run directory: checkpoints/, logs/, fit_config.yaml; required to train")
    fit.add_argument("--resume", type=Path,
                     help="continue a run from its checkpoint directory, e.g. RUN/checkpoints/last.ckpt (same --data)")
    fit.add_argument("--init-from", dest="init_from", type=Path, metavar="RUN",
                     help="start a new run from another run's weights and optimizer state (RUN = its best checkpoint, "
                          "or RUN/checkpoints/NAME.ckpt); --data must be prepared with --vocab-from that run's examples "
                          "(tables may have grown: new rows start fresh)")
    fit.add_argument("--overwrite", action="store_true",
                     help="replace the run in --out (kept aside until the new fit has finished, restored if it fails)")
    fit.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a key, e.g. --set trainer.max_epochs=1 --set model.pooling=softmax")
    fit.add_argument("--print_config", action="store_true", help="print the resolved config and exit")
    fit.add_argument("--quiet", action="store_true", help="no progress bars or step logs")

    evaluate = commands.add_parser("evaluate", help="score checkpoints on a split: per-scenario metrics, report, plots")
    evaluate.add_argument("--run", dest="runs", action="append", required=True, type=Path, metavar="RUN",
                          help="run directory of `msit-rec fit`; repeat to compare models on the same rows")
    evaluate.add_argument("--checkpoint", default=defaults.CHECKPOINT,
                          help="best, last, or a checkpoint directory (one --run) (default: %(default)s)")
    evaluate.add_argument("--split", default=defaults.SPLIT, help="split to score (default: %(default)s)")
    evaluate.add_argument("--data", type=Path, help="examples directory (default: the first run's training data)")
    evaluate.add_argument("--batch_size", type=int, default=defaults.SCORING_BATCH_ROWS,
                          help="rows per scoring batch (default: %(default)s)")
    evaluate.add_argument("--out", required=True, type=Path,
                          help="output directory: metrics.json, scores.parquet, report.md, plots")
    evaluate.add_argument("--overwrite", action="store_true", help="replace earlier results in --out")
    evaluate.add_argument("--quiet", action="store_true", help="no progress bars")

    compare = commands.add_parser("compare", help="report + paired bootstrap AUC differences from saved evaluations")
    compare.add_argument("inputs", nargs="+", type=Path, metavar="METRICS",
                         help="metrics.json files or `evaluate --out` directories; the first model is the reference")
    compare.add_argument("--out", required=True, type=Path, help="output directory: comparison.json, report.md, plots")
    compare.add_argument("--resamples", type=int, default=defaults.COMPARE_RESAMPLES,
                         help="bootstrap resamples (default: %(default)s)")
    compare.add_argument("--level", type=float, default=defaults.CONFIDENCE_LEVEL,
                         help="confidence level of the intervals (default: %(default)s)")
    compare.add_argument("--seed", type=int, default=defaults.BOOTSTRAP_SEED, help="bootstrap seed (default: %(default)s)")
    compare.add_argument("--overwrite", action="store_true", help="replace earlier results in --out")
    compare.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_explain_command(commands)
    _add_export_command(commands)
    _add_serving_commands(commands)
    _add_runs_command(commands)
    requests = commands.add_parser("requests", help="raw requests rebuilt from prepared examples (to try predict/serve)")
    requests.add_argument("--data", required=True, type=Path, help="prepared examples directory (with dataset.json)")
    requests.add_argument("--split", default=defaults.SPLIT, help="split to sample (default: %(default)s)")
    requests.add_argument("--rows", type=int, default=defaults.REQUEST_ROWS,
                          help="requests to write: the split's first rows (default: %(default)s)")
    requests.add_argument("--out", required=True, type=Path, help="JSON lines file to write")
    requests.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    requests.add_argument("--quiet", action="store_true", help="no log lines")
    return parser


def _add_runs_command(commands: argparse._SubParsersAction) -> None:
    runs = commands.add_parser("runs", help="one table over many runs: config keys that differ, best validation "
                                            "AUC, wall time, test metrics")
    runs.add_argument("dirs", nargs="+", type=Path, metavar="DIR",
                      help="run directories of `msit-rec fit`, or directories holding them (one level down)")
    runs.add_argument("--evaluation", dest="evaluations", action="append", default=[], type=Path, metavar="METRICS",
                      help="metrics.json or `evaluate --out` directory: its test-split models add their run's test "
                           "AUC and logloss (matched by run directory); repeatable")
    runs.add_argument("--out", type=Path, help="also write the table to this directory as runs.md and runs.csv")
    runs.add_argument("--overwrite", action="store_true", help="replace earlier tables in --out")
    runs.add_argument("--quiet", action="store_true", help="no log lines")


def _add_explain_command(commands: argparse._SubParsersAction) -> None:
    explain = commands.add_parser("explain", help="what each scenario's behaviours give the others: transfer by "
                                                  "intervention, gate and attention statistics, top behaviours")
    explain.add_argument("--run", required=True, type=Path, help="run directory of `msit-rec fit`")
    explain.add_argument("--checkpoint", default=defaults.CHECKPOINT,
                         help="best, last, or a checkpoint directory (default: %(default)s)")
    explain.add_argument("--split", default=defaults.SPLIT, help="split to explain (default: %(default)s)")
    explain.add_argument("--data", type=Path, help="examples directory (default: the run's training data)")
    explain.add_argument("--out", required=True, type=Path,
                         help="output directory: explain.json, report.md, heatmaps")
    explain.add_argument("--resamples", type=int, default=defaults.EXPLAIN_RESAMPLES,
                         help="bootstrap resamples per cell (default: %(default)s)")
    explain.add_argument("--top", type=int, default=defaults.EXPLAIN_TOP,
                         help="most attended behaviours listed per served scenario and feature (default: %(default)s)")
    explain.add_argument("--batch_size", type=int, default=defaults.SCORING_BATCH_ROWS,
                         help="rows per scoring batch (default: %(default)s)")
    explain.add_argument("--max_rows", type=int,
                         help="explain a uniform sample of this many rows, the same every run (default: all)")
    explain.add_argument("--overwrite", action="store_true", help="replace earlier results in --out")
    explain.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_export_command(commands: argparse._SubParsersAction) -> None:
    export = commands.add_parser("export", help="checkpoint → serving artifact (torch.export, vocabularies, manifest)")
    export.add_argument("--run", required=True, type=Path, help="run directory of `msit-rec fit`")
    export.add_argument("--checkpoint", default=defaults.CHECKPOINT,
                        help="best, last, or a checkpoint directory (default: %(default)s)")
    export.add_argument("--out", required=True, type=Path, help="artifact directory to write")
    export.add_argument("--precision", default=defaults.PRECISION,
                        help="table storage: fp32 | fp16 | int8 (every table) or TABLE=P,... e.g. item=int8,user=fp16 "
                             "(the others fp32) (default: %(default)s)")
    export.add_argument("--compute", default=defaults.COMPUTE, choices=defaults.COMPUTES,
                        help="dtype of the dense products: bf16 only where this CPU multiplies bf16 natively (AMX, "
                             "AVX512-BF16); parity is then checked on the AUC (default: %(default)s)")
    export.add_argument("--aoti", action="store_true", help="also write an AOTInductor package (compiles for ~30 s)")
    export.add_argument("--split", default=defaults.SPLIT, help="split the parity check scores (default: %(default)s)")
    export.add_argument("--parity_rows", type=int, help="score at most this many rows for parity (default: all)")
    export.add_argument("--batch_size", type=int, default=defaults.SCORING_BATCH_ROWS,
                        help="rows per parity batch (default: %(default)s)")
    export.add_argument("--max_logit_diff", type=float,
                        help="parity bound on max |Δ logit| (default: 1e-5 when every table is fp32, else unchecked)")
    export.add_argument("--max_auc_drop", type=float,
                        help="parity bound on each scenario's AUC drop (default: 0.001 with fp16/int8 tables)")
    export.add_argument("--no_parity_gate", action="store_true",
                        help="keep an artifact that fails parity (marked passed: false) and exit 0")
    export.add_argument("--overwrite", action="store_true", help="replace an earlier artifact in --out")
    export.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_serving_commands(commands: argparse._SubParsersAction) -> None:
    predict = commands.add_parser("predict", help="score raw request rows (Parquet or JSON lines) with an artifact")
    predict.add_argument("--artifact", required=True, type=Path, help="artifact directory of `msit-rec export`")
    predict.add_argument("--input", required=True, type=Path, help="raw rows: .parquet or .jsonl (request schema)")
    predict.add_argument("--out", required=True, type=Path, help="the rows + logit, score: .parquet or .jsonl")
    predict.add_argument("--top_behaviours", type=int, default=defaults.TOP_BEHAVIOURS,
                         help="also write each row's K behaviours with the largest attention weight, as "
                              "top_behaviours: [{index (into its history), weight}] (default: %(default)s)")
    predict.add_argument("--batch_size", type=int, default=defaults.PREDICT_BATCH_ROWS,
                         help="rows per model call (default: %(default)s)")
    _add_backend(predict)
    predict.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    predict.add_argument("--quiet", action="store_true", help="no progress bar")

    serve = commands.add_parser("serve", help="HTTP JSON ranking service around an artifact (POST /rank)")
    serve.add_argument("--artifact", required=True, type=Path, help="artifact directory of `msit-rec export`")
    _add_backend(serve)
    for option in SERVE_OPTIONS:  # every ServeConfig field, its default and help declared there
        serve.add_argument(f"--{option.name}", type=type(option.default), default=option.default,
                           help=f"{option.metadata['help']} (default: %(default)s)")
    serve.add_argument("--quiet", action="store_true", help="no request log")


def _add_backend(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", default=defaults.BACKEND, choices=defaults.BACKENDS,
                        help="program to run: aoti package, torch.export program, or auto (aoti when present) "
                             "(default: %(default)s)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")


def _print_config(section: str, config: object) -> None:
    print(yaml.safe_dump({section: to_dict(config)}, sort_keys=False), end="")


def run_generate(args: argparse.Namespace) -> None:
    from pipelines.synthetic import GeneratorConfig, generate

    config = load_config(args.config, GeneratorConfig, section="generate", overrides=args.overrides)
    if args.print_config:
        _print_config("generate", config)
        return
    _require(args, "out")
    summary = generate(config, args.out, progress=not args.quiet, overwrite=args.overwrite)
    print(summary.table())
    print(f"raw logs written to {args.out}")


def run_prepare(args: argparse.Namespace) -> None:
    from pipelines.config import DatasetConfig
    from pipelines.prepare import prepare

    overrides = list(args.overrides) + ([f"source.path={args.source}"] if args.source else [])
    config = load_config(args.config, DatasetConfig, section="dataset", overrides=overrides)
    if args.print_config:
        _print_config("dataset", config)
        return
    _require(args, "out")
    meta = prepare(config, args.out, progress=not args.quiet, overwrite=args.overwrite, vocab_from=args.vocab_from)
    print(meta.summary_table())
    print(f"examples written to {args.out} (dataset.json, train/ valid/ test/, vocab/)")


def run_fit(args: argparse.Namespace) -> None:
    from msit_rec.fit_config import FitConfig
    from msit_rec.train.fit import fit

    data = {
        name: _section(read_yaml(path), name, path) if path is not None else {}
        for name, path in (("model", args.model), ("trainer", args.trainer))
    }
    config = from_dict(FitConfig, apply_overrides(data, args.overrides), "fit")
    if args.quiet:
        config.trainer.progress_bar = False
    if args.print_config:
        print(yaml.safe_dump(to_dict(config), sort_keys=False), end="")
        return
    _require(args, "data", "out")
    result = fit(config, args.data, args.out, resume=args.resume, overwrite=args.overwrite, init_from=args.init_from)
    if not is_launching_process():  # the other ranks return the same result: report it once
        return
    if result.monitor not in (None, "val/auc") and result.best_score is not None:  # picked by another metric
        auc = "" if result.best_val_auc is None else f" (validation AUC {result.best_val_auc:.5f})"
        print(f"best {result.monitor} {result.best_score:.5f}{auc}")
    elif result.best_val_auc is not None:
        print(f"best validation AUC {result.best_val_auc:.5f}")
    print(f"checkpoints: {result.best_checkpoint} (best), {result.last_checkpoint} (last); logs: {result.log_dir}")


def run_evaluate(args: argparse.Namespace) -> None:
    from msit_rec.evaluate import check_output_dir, evaluate_runs, write_evaluation
    from msit_rec.report import metrics_table

    check_output_dir(args.out, args.overwrite, [*args.runs, *([args.data] if args.data else [])])
    evaluation = evaluate_runs(
        args.runs, args.checkpoint, args.split, data_dir=args.data, batch_size=args.batch_size, progress=not args.quiet
    )
    written = write_evaluation(evaluation, args.out, overwrite=args.overwrite)
    print(metrics_table({name: model.metrics for name, model in evaluation.metrics.models.items()}))
    print(f"evaluation written to {args.out}: {', '.join(path.name for path in written)}")


def run_compare(args: argparse.Namespace) -> None:
    from msit_rec.compare import compare, difference_table

    comparison, written = compare(
        args.inputs, args.out, resamples=args.resamples, level=args.level, seed=args.seed, overwrite=args.overwrite,
        progress=not args.quiet,
    )
    print(difference_table(comparison))
    print(f"comparison written to {args.out}: {', '.join(path.name for path in written)}")


def run_explain(args: argparse.Namespace) -> None:
    from msit_rec.explain import explain
    from msit_rec.explain_report import transfer_table

    explanation, written = explain(
        args.run, args.out, checkpoint=args.checkpoint, split=args.split, data_dir=args.data,
        resamples=args.resamples, top=args.top, batch_size=args.batch_size, max_rows=args.max_rows,
        overwrite=args.overwrite, progress=not args.quiet,
    )
    print(transfer_table(explanation))
    print(f"explanation written to {args.out}: {', '.join(path.name for path in written)}")


def run_export(args: argparse.Namespace) -> None:
    from msit_rec.export import export_run
    from msit_rec.export.summary import export_summary

    manifest = export_run(
        args.run, args.out, checkpoint=args.checkpoint, precision=args.precision, compute=args.compute, aoti=args.aoti,
        split=args.split, parity_rows=args.parity_rows, batch_size=args.batch_size, max_logit_diff=args.max_logit_diff,
        max_auc_drop=args.max_auc_drop,
        parity_gate=not args.no_parity_gate, overwrite=args.overwrite, progress=not args.quiet,
    )
    print(export_summary(manifest))
    print(f"artifact written to {args.out}")


def run_runs(args: argparse.Namespace) -> None:
    from msit_rec.runs import legend, markdown_table, runs

    rows, written = runs(args.dirs, args.evaluations, out_dir=args.out, overwrite=args.overwrite)
    print(markdown_table(rows))
    print(legend(rows))
    if written:
        print(f"table of {len(rows)} runs written to {args.out}: {', '.join(path.name for path in written)}")


def run_predict(args: argparse.Namespace) -> None:
    from msit_rec.host import tune_glibc_malloc
    from msit_rec.serving.artifact import load_artifact
    from msit_rec.serving.predict import predict_file

    tune_glibc_malloc()
    artifact = load_artifact(args.artifact, backend=args.backend, threads=args.threads)
    summary = predict_file(artifact, args.input, args.out, batch_size=args.batch_size, overwrite=args.overwrite,
                           progress=not args.quiet, top_behaviours=args.top_behaviours)
    print(summary.table())
    print(f"scores written to {args.out} (columns logit, score; backend {artifact.backend})")


def run_serve(args: argparse.Namespace) -> None:
    from msit_rec.host import tune_glibc_malloc
    from msit_rec.serving.artifact import load_artifact
    from msit_rec.serving.server import RankingServer, ServeConfig

    tune_glibc_malloc()
    artifact = load_artifact(args.artifact, backend=args.backend, threads=args.threads)
    config = ServeConfig(**{option.name: getattr(args, option.name) for option in SERVE_OPTIONS})
    server = RankingServer(artifact, config)
    if server.unauthenticated_warning:
        print(server.unauthenticated_warning, file=sys.stderr, flush=True)
    print(f"serving {args.artifact} ({artifact.backend}) on {server.url} — POST /rank, GET /health, GET /metrics",
          flush=True)
    server.serve_forever()
    print("server stopped", flush=True)


def run_requests(args: argparse.Namespace) -> None:
    from msit_rec.outputs import check_no_overlap, check_replaceable_file
    from pipelines.requests import requests_from_examples, write_requests

    check_no_overlap(args.data, args.out, source_flag="--data")
    check_replaceable_file(args.out, args.overwrite)  # refuse before the work; write_requests checks again
    requests = requests_from_examples(args.data, args.split, args.rows)
    out = write_requests(requests, args.out, overwrite=args.overwrite)
    print(f"{len(requests)} raw requests from {args.data} ({args.split}) written to {out}")


def _require(args: argparse.Namespace, *names: str) -> None:
    """Flags needed to run the command but not to print its config."""
    missing = [f"--{name}" for name in names if getattr(args, name) is None]
    if missing:
        raise ConfigError(f"{args.command}: {', '.join(missing)} required (only --print_config runs without)")


def _section(content: dict, name: str, path: str) -> dict:
    if set(content) != {name}:
        raise ConfigError(f"config file {path}: expected exactly one top-level key '{name}', found {sorted(content)}")
    return content[name]


COMMANDS = {
    "generate": run_generate, "prepare": run_prepare, "fit": run_fit, "evaluate": run_evaluate, "compare": run_compare,
    "export": run_export, "predict": run_predict, "serve": run_serve, "requests": run_requests,
    "explain": run_explain, "runs": run_runs,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    trains = args.command == "fit" and not args.print_config
    with command_output(quiet=args.quiet, lightning=trains):  # one line per message; launched ranks: errors only
        try:
            COMMANDS[args.command](args)
        except MsitError as exc:
            if not isinstance(exc, TrainingError) or is_launching_process():  # every rank raises a TrainingError
                print(f"msit-rec {args.command}: error: {exc}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
