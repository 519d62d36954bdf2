"""``corebus`` command line: ``plugins``, ``demo``, ``run``, ``sync``, ``report``, ``compare``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence


def _cmd_plugins(args: argparse.Namespace) -> int:
    from corebus.bus.registry import installed_plugins

    infos = installed_plugins()
    if args.json:
        print(json.dumps([info.as_dict() for info in infos], indent=2))
        return 0
    rows = [("name", "distribution", "version", "hooks")]
    rows += [(i.name, i.distribution, i.version, ", ".join(i.hooks)) for i in infos]
    widths = [max(len(row[c]) for row in rows) for c in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(widths[c]) for c, cell in enumerate(row[:3])) + "  " + row[3])
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from corebus.demo import run_demo
    from corebus.errors import ConfigError

    try:
        run_demo(epochs=args.epochs, batch_size=args.batch_size, verbose=args.verbose, root=args.root)
    except ConfigError as exc:  # missing extras, bad input: one line, not a traceback
        print(f"corebus demo: {exc}", file=sys.stderr)
        return 2
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    """Train from a run config; every error in it is reported before anything runs."""
    from corebus.app.config import describe_config, load_run_config
    from corebus.errors import CorebusError

    overrides = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            print(f"corebus run: --set {item!r}: write section.key=value", file=sys.stderr)
            return 2
        overrides[key] = _parse_value(value)
    if args.workers is not None or args.address:
        from corebus.app.ray_run import run_on_ray

        try:
            final = run_on_ray(
                args.config, overrides, args.workers or 1, args.address, args.print_plan, args.storage_path
            )
        except CorebusError as exc:
            print(f"corebus run: {exc}", file=sys.stderr)
            return 2
        if final:
            print("final epoch: " + "  ".join(f"{k}={v:.4f}" for k, v in final.items() if isinstance(v, float)))
        return 0
    try:
        config = load_run_config(args.config, overrides)
        trainer, fit = config.build()
    except CorebusError as exc:
        print(f"corebus run: {exc}", file=sys.stderr)
        return 2
    if args.print_plan:
        print(describe_config(config))
        print(trainer.describe(verbose=fit.get("verbose", 1)))
        return 0
    history = trainer.fit(**fit)
    final = {k: v[-1] for k, v in history.history.items() if v}
    print("final epoch: " + "  ".join(f"{k}={v:.4f}" for k, v in final.items()))
    return 0


def _parse_value(text: str) -> object:
    """``--set`` values: TOML scalars (3, 0.5, true, "x"), else the text itself."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except Exception:
        return text


def _cmd_sync(args: argparse.Namespace) -> int:
    """Replay every spool under a run directory through the plugin that wrote it."""
    from pathlib import Path

    from corebus.bus.registry import load_plugin_class
    from corebus.delivery.sinks import SPOOL_SUFFIX, read_spool

    spools = sorted(Path(args.run_dir).rglob(f"*{SPOOL_SUFFIX}"))
    if not spools:
        print(f"nothing to replay under {args.run_dir}")
        return 0
    failed = 0
    for path in spools:
        header, records = read_spool(path)
        plugin = header.get("plugin")
        if not plugin:
            print(f"{path}: no header naming its plugin; skipped")
            failed += 1
            continue
        cls = load_plugin_class(plugin)
        replay = getattr(cls, "replay_spool", None)
        if replay is None:
            print(f"{path}: plugin {plugin!r} cannot replay spools; skipped")
            failed += 1
            continue
        sent = replay(path)
        print(f"{path}: replayed {sent} of {len(records)} records through {plugin}")
        failed += sent < len(records)
    return 1 if failed else 0


def _cmd_report(args: argparse.Namespace) -> int:
    """Re-render a run report (PNGs + HTML) from its report.json; no TensorFlow needed."""
    from corebus.app.report import load_report, render_report
    from corebus.errors import ConfigError

    try:
        report, path = load_report(args.path)
        written = render_report(report, args.out or os.path.dirname(path))  # a file, or a storage URL
    except ConfigError as exc:
        print(f"corebus report: error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(str(p) for p in written))
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    """Overlay several runs' reports in one PNG + HTML (e.g. one run per optimizer)."""
    from corebus.app.report import compare_reports
    from corebus.errors import ConfigError

    try:
        written = compare_reports(args.runs, args.out, metric=args.metric)
    except ConfigError as exc:
        print(f"corebus compare: error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(str(p) for p in written))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="corebus", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    plugins = sub.add_parser("plugins", help="list installed plugins (without importing them)")
    plugins.add_argument("--json", action="store_true", help="machine-readable output")
    plugins.set_defaults(func=_cmd_plugins)

    demo = sub.add_parser("demo", help="train a small model on the bundled digits dataset")
    demo.add_argument("--epochs", type=int, default=15)
    demo.add_argument("--batch-size", type=int, default=64)
    demo.add_argument("--verbose", type=int, default=1, choices=(0, 1, 2))
    demo.add_argument("--root", default="corebus-runs", help="runs are written under ROOT/<run>/")
    demo.set_defaults(func=_cmd_demo)
    run = sub.add_parser("run", help="train from a run config (TOML or YAML: model, data, fit, plugins)")
    run.add_argument("config")
    run.add_argument("--print-plan", action="store_true", help="validate, print the hook plan, do not train")
    run.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config value")
    run.add_argument(
        "--workers", type=int, metavar="N", help='train on N Ray Train workers (pip install "corebus[ray]")'
    )
    run.add_argument("--address", metavar="ADDR", help="the Ray cluster to use (default: start a local one)")
    run.add_argument("--storage-path", metavar="URL", help="where Ray keeps results: a folder or s3://bucket/prefix")
    run.set_defaults(func=_cmd_run)
    sync = sub.add_parser("sync", help="replay undelivered logger records (spools) of a run directory")
    sync.add_argument("run_dir")
    sync.set_defaults(func=_cmd_sync)
    report = sub.add_parser("report", help="re-render a run report (PNGs + report.html) from its report.json")
    report.add_argument("path", help="the report directory, the run directory holding report/, or report.json")
    report.add_argument("--out", help="write there instead of beside report.json")
    report.set_defaults(func=_cmd_report)
    compare = sub.add_parser(
        "compare", help="overlay several runs' curves (loss, metric, LR, accuracy) in one PNG + HTML"
    )
    compare.add_argument("runs", nargs="+", help="run or report directories (labels are their names)")
    compare.add_argument("--out", default="corebus-runs/compare", help="output directory")
    compare.add_argument("--metric", default="val_loss", help="the epoch metric to compare (default val_loss)")
    compare.set_defaults(func=_cmd_compare)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
