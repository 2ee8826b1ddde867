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
from msit_rec.errors import ConfigError, MsitError


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
    return parser


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


def _section(content: dict, name: str, path: str) -> dict:
    if set(content) != {name}:
        raise ConfigError(f"config file {path}: expected exactly one top-level key '{name}', found {sorted(content)}")
    return content[name]


COMMANDS = {
    "generate": run_generate, "prepare": run_prepare, "fit": run_fit, "evaluate": run_evaluate, "compare": run_compare
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
