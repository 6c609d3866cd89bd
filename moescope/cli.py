"""The `moescope` command line: a thin dispatcher over moescope/commands/*, one module per command."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from . import __version__
from .format.writer import TraceError

#: Command modules in the order `--help` lists them; each defines `register(subparsers)`.
COMMANDS = ["demo", "check", "sql", "report", "dashboard", "watch", "inspect", "whatif"]


class CLIError(Exception):
    """A user-facing error: printed as one line, exits with `code`."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


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
    except CLIError as e:
        sys.stderr.write(f"moescope: error: {e}\n")
        return e.code
    except TraceError as e:
        sys.stderr.write(f"moescope: error: {e}\n")
        return 3
    except KeyboardInterrupt:
        sys.stderr.write("moescope: interrupted\n")
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:  # never a traceback for a user; MOESCOPE_DEBUG=1 shows it
        if os.environ.get("MOESCOPE_DEBUG"):
            raise
        msg = " ".join(str(e).split())
        if _is_damaged_data(e):
            # DuckDB finds a damaged data page only when a query reads it: still an unreadable trace (exit 3).
            sys.stderr.write(f"moescope: error: unreadable trace data: {msg}\n")
            return 3
        sys.stderr.write(f"moescope: error: {e.__class__.__name__}: {msg}\n")
        return 1


def _is_damaged_data(e: BaseException) -> bool:
    """True for DuckDB errors that mean a trace file is corrupt or unreadable (not a bad query)."""
    if type(e).__module__.split(".")[0] not in ("duckdb", "_duckdb"):
        return False
    text = str(e).lower()
    return any(w in text for w in ("corrupt", "thrift", "parquet", "io error", "invalid input error: no magic"))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
