"""The `moescope` command line: a thin dispatcher over moescope/commands/*, one module per command."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from . import __version__
from .errors import CLIError, classify, debug

__all__ = ["main", "build_parser", "CLIError", "COMMANDS"]

#: Command modules in the order `--help` lists them; each defines `register(subparsers)`.
COMMANDS = ["demo", "check", "sql", "report", "dashboard", "watch", "inspect", "whatif", "compact", "import_", "explain"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # argparse prints usage + message; keep it to one line and exit 2 as DESIGN.md asks.
        sys.stderr.write(f"moescope: error: {message} (see `{self.prog} --help`)\n")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every available command."""
    parser = _Parser(
        prog="moescope",
        description="Router diagnostics for Mixture-of-Experts models: record routing into Parquet traces, "
        "analyse them with SQL, fail CI when routing collapses, browse them in a dashboard.",
    )
    parser.add_argument("--version", action="version", version=f"moescope {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f".commands.{name}", __package__)
        except ModuleNotFoundError as e:  # a command whose optional module is absent in this build
            if e.name and e.name.startswith("moescope.commands"):
                continue
            raise
        mod.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `moescope` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
        return int(rc or 0)
    except (Exception, KeyboardInterrupt) as e:  # never a traceback: one classifier decides line and exit code
        failure = classify(e)
        if failure.code == 1 and debug():
            raise
        if failure.message:
            kind = "" if isinstance(e, KeyboardInterrupt) else "error: "
            sys.stderr.write(f"moescope: {kind}{failure.message}\n")
        return failure.code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
