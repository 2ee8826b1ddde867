"""`msit-rec`: the single command-line entry point.

Subcommands follow Lightning's conventions where they apply (`--config`, `--print_config`); every one also
takes `--set key=value` overrides. User mistakes (MsitError) print one clear line and exit 2, never a traceback.
The CLI is the composition root, so it is the one place in `msit_rec` that imports `pipelines`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import yaml

from msit_rec.config import apply_overrides, from_dict, load_config, read_yaml, to_dict
from msit_rec.errors import ConfigError, DataError, MsitError


def _add_common(parser: argparse.ArgumentParser, default_config: str) -> None:
    parser.add_argument("--config", default=default_config, help=f"YAML config (default: {default_config})")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (dotted for nested keys), e.g. --set users=1000; repeatable",
    )
    parser.add_argument("--print_config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or step logs")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="msit-rec", description="Multi-scenario CTR ranking with scenario-conditioned interest transfer."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    generate = commands.add_parser("generate", help="write synthetic multi-scenario impression logs (Parquet)")
    _add_common(generate, "configs/generate/synthetic.yaml")
    generate.add_argument("--out", required=True, type=Path, help="output directory (day=... partitions)")

    prepare = commands.add_parser("prepare", help="raw logs → leak-free training examples + dataset.json")
    _add_common(prepare, "configs/datasets/synthetic.yaml")
    prepare.add_argument("--out", required=True, type=Path, help="output directory for the examples")
    prepare.add_argument("--source", help="raw log path (overrides source.path in the config)")

    fit = commands.add_parser("fit", help="train a model variant on prepared examples (1..N processes)")
    fit.add_argument("--data", required=True, type=Path, help="prepared examples directory (with dataset.json)")
    fit.add_argument("--model", default="configs/model/msit.yaml", help="model config (section `model`)")
    fit.add_argument("--trainer", default="configs/trainer/cpu.yaml", help="trainer config (section `trainer`)")
    fit.add_argument("--out", required=True, type=Path, help="run directory: checkpoints/, logs/, fit_config.yaml")
    fit.add_argument("--resume", type=Path, help="checkpoint directory to continue from (e.g. RUN/checkpoints/last)")
    fit.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a key, e.g. --set trainer.max_epochs=1 --set model.pooling=softmax")
    fit.add_argument("--print_config", action="store_true", help="print the resolved config and exit")
    fit.add_argument("--quiet", action="store_true", help="no progress bars or step logs")

    evaluate = commands.add_parser("evaluate", help="score checkpoints on a split: per-scenario metrics, report, plots")
    evaluate.add_argument("--run", dest="runs", action="append", required=True, type=Path, metavar="RUN",
                          help="run directory of `msit-rec fit`; repeat to compare models on the same rows")
    evaluate.add_argument("--checkpoint", default="best", help="best, last, or a checkpoint directory (one --run)")
    evaluate.add_argument("--split", default="test", help="split to score (default: test)")
    evaluate.add_argument("--data", type=Path, help="examples directory (default: the first run's training data)")
    evaluate.add_argument("--batch_size", type=int, default=8192, help="rows per scoring batch (default: 8192)")
    evaluate.add_argument("--out", required=True, type=Path,
                          help="output directory: metrics.json, scores.parquet, report.md, plots")
    evaluate.add_argument("--overwrite", action="store_true", help="replace earlier results in --out")
    evaluate.add_argument("--quiet", action="store_true", help="no progress bars")

    compare = commands.add_parser("compare", help="report + paired bootstrap AUC differences from saved evaluations")
    compare.add_argument("inputs", nargs="+", type=Path, metavar="METRICS",
                         help="metrics.json files or `evaluate --out` directories; the first model is the reference")
    compare.add_argument("--out", required=True, type=Path, help="output directory: comparison.json, report.md, plots")
    compare.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (default: 1000)")
    compare.add_argument("--level", type=float, default=0.95, help="confidence level of the intervals (default: 0.95)")
    compare.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: 0)")
    compare.add_argument("--overwrite", action="store_true", help="replace earlier results in --out")
    compare.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_export_command(commands)
    _add_serving_commands(commands)
    requests = commands.add_parser("requests", help="raw requests rebuilt from prepared examples (to try predict/serve)")
    requests.add_argument("--data", required=True, type=Path, help="prepared examples directory (with dataset.json)")
    requests.add_argument("--split", default="test", help="split to sample (default: test)")
    requests.add_argument("--rows", type=int, default=20, help="requests to write: the split's first rows (default: 20)")
    requests.add_argument("--out", required=True, type=Path, help="JSON lines file to write")
    requests.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    requests.add_argument("--quiet", action="store_true", help="no log lines")
    return parser


def _add_export_command(commands: argparse._SubParsersAction) -> None:
    export = commands.add_parser("export", help="checkpoint → serving artifact (torch.export, vocabularies, manifest)")
    export.add_argument("--run", required=True, type=Path, help="run directory of `msit-rec fit`")
    export.add_argument("--checkpoint", default="best", help="best, last, or a checkpoint directory (default: best)")
    export.add_argument("--out", required=True, type=Path, help="artifact directory to write")
    export.add_argument("--precision", default="fp32",
                        help="table storage: fp32 | fp16 | int8 (every table) or TABLE=P,... e.g. item=int8,user=fp16 "
                             "(the others fp32); default fp32")
    export.add_argument("--aoti", action="store_true", help="also write an AOTInductor package (compiles for ~30 s)")
    export.add_argument("--split", default="test", help="split the parity check scores (default: test)")
    export.add_argument("--parity_rows", type=int, help="score at most this many rows for parity (default: all)")
    export.add_argument("--batch_size", type=int, default=8192, help="rows per parity batch (default: 8192)")
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
    predict.add_argument("--batch_size", type=int, default=4096, help="rows per model call (default: 4096)")
    predict.add_argument("--backend", default="auto", choices=["auto", "export", "aoti"],
                         help="program to run: aoti package, torch.export program, or auto (aoti when present)")
    predict.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    predict.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    predict.add_argument("--quiet", action="store_true", help="no progress bar")

    serve = commands.add_parser("serve", help="HTTP JSON ranking service around an artifact (POST /rank)")
    serve.add_argument("--artifact", required=True, type=Path, help="artifact directory of `msit-rec export`")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, loopback only)")
    serve.add_argument("--port", type=int, default=8080, help="port (default: 8080; 0 = any free port, printed)")
    serve.add_argument("--backend", default="auto", choices=["auto", "export", "aoti"],
                       help="program to run: aoti package, torch.export program, or auto (aoti when present)")
    serve.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    serve.add_argument("--max_body_bytes", type=int, default=8 << 20, help="largest request body (default: 8 MiB)")
    serve.add_argument("--max_batch_rows", type=int, default=4096,
                       help="rows of concurrent requests scored in one model call (default: 4096)")
    serve.add_argument("--batch_wait_ms", type=float, default=0.0,
                       help="how long a model call waits for more concurrent requests (default: 0)")
    serve.add_argument("--quiet", action="store_true", help="no request log")


def _print_config(section: str, config: object) -> None:
    print(yaml.safe_dump({section: to_dict(config)}, sort_keys=False), end="")


def run_generate(args: argparse.Namespace) -> None:
    from pipelines.synthetic import GeneratorConfig, generate

    config = load_config(args.config, GeneratorConfig, section="generate", overrides=args.overrides)
    if args.print_config:
        _print_config("generate", config)
        return
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
    meta = prepare(config, args.out, progress=not args.quiet, overwrite=args.overwrite)
    print(meta.summary_table())
    print(f"examples written to {args.out} (dataset.json, train/ valid/ test/, vocab/)")


def run_fit(args: argparse.Namespace) -> None:
    from msit_rec.train.fit import FitConfig, fit

    data = {name: _section(read_yaml(path), name, path) for name, path in (("model", args.model), ("trainer", args.trainer))}
    config = from_dict(FitConfig, apply_overrides(data, args.overrides), "fit")
    if args.quiet:
        config.trainer.progress_bar = False
    if args.print_config:
        print(yaml.safe_dump(to_dict(config), sort_keys=False), end="")
        return
    result = fit(config, args.data, args.out, resume=args.resume)
    if result.global_rank != 0:
        return
    if result.best_val_auc is not None:
        print(f"best validation AUC {result.best_val_auc:.5f}")
    print(f"checkpoints: {result.best_checkpoint} (best), {result.last_checkpoint} (last); logs: {result.log_dir}")


def run_evaluate(args: argparse.Namespace) -> None:
    from msit_rec.evaluate import evaluate_runs, write_evaluation
    from msit_rec.report import metrics_table

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


def run_export(args: argparse.Namespace) -> None:
    from msit_rec.export import export_run
    from msit_rec.export.summary import export_summary

    manifest = export_run(
        args.run, args.out, checkpoint=args.checkpoint, precision=args.precision, aoti=args.aoti, split=args.split,
        parity_rows=args.parity_rows, batch_size=args.batch_size, max_logit_diff=args.max_logit_diff,
        max_auc_drop=args.max_auc_drop,
        parity_gate=not args.no_parity_gate, overwrite=args.overwrite, progress=not args.quiet,
    )
    print(export_summary(manifest))
    print(f"artifact written to {args.out}")


def run_predict(args: argparse.Namespace) -> None:
    from msit_rec.host import tune_glibc_malloc
    from msit_rec.serving.artifact import load_artifact
    from msit_rec.serving.predict import predict_file

    tune_glibc_malloc()
    artifact = load_artifact(args.artifact, backend=args.backend, threads=args.threads)
    summary = predict_file(artifact, args.input, args.out, batch_size=args.batch_size, overwrite=args.overwrite,
                           progress=not args.quiet)
    print(summary.table())
    print(f"scores written to {args.out} (columns logit, score; backend {artifact.backend})")


def run_serve(args: argparse.Namespace) -> None:
    from msit_rec.host import tune_glibc_malloc
    from msit_rec.serving.artifact import load_artifact
    from msit_rec.serving.server import RankingServer, ServeConfig

    tune_glibc_malloc()
    artifact = load_artifact(args.artifact, backend=args.backend, threads=args.threads)
    config = ServeConfig(host=args.host, port=args.port, max_body_bytes=args.max_body_bytes,
                         max_batch_rows=args.max_batch_rows, batch_wait_ms=args.batch_wait_ms)
    server = RankingServer(artifact, config)
    print(f"serving {args.artifact} ({artifact.backend}) on {server.url} — POST /rank, GET /health, GET /metrics",
          flush=True)
    server.serve_forever()
    print("server stopped", flush=True)


def run_requests(args: argparse.Namespace) -> None:
    from pipelines.requests import requests_from_examples, write_requests

    if args.out.exists() and not args.overwrite:
        raise DataError(f"{args.out} exists; pass --overwrite to replace it")
    requests = requests_from_examples(args.data, args.split, args.rows)
    out = write_requests(requests, args.out)
    print(f"{len(requests)} raw requests from {args.data} ({args.split}) written to {out}")


def _section(content: dict, name: str, path: str) -> dict:
    if set(content) != {name}:
        raise ConfigError(f"config file {path}: expected exactly one top-level key '{name}', found {sorted(content)}")
    return content[name]


COMMANDS = {
    "generate": run_generate, "prepare": run_prepare, "fit": run_fit, "evaluate": run_evaluate, "compare": run_compare,
    "export": run_export, "predict": run_predict, "serve": run_serve, "requests": run_requests,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    try:
        COMMANDS[args.command](args)
    except MsitError as exc:
        print(f"msit-rec {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
