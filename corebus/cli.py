"""``corebus`` command line: ``corebus plugins`` and ``corebus demo``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


def _cmd_plugins(args: argparse.Namespace) -> int:
    from .registry import installed_plugins

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
    from .demo import run_demo

    run_demo(epochs=args.epochs, batch_size=args.batch_size, verbose=args.verbose, root=args.root)
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
