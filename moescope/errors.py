"""The one error classifier: every exception a command can end with -> (exit code, one-line message).

Exit codes (the same for every command):

    0  success (and a closed pipe: `moescope sql ... | head`)
    1  check found a FAIL (decided by the command, not here), or an internal error (a bug: MOESCOPE_DEBUG=1 shows it)
    2  usage or configuration error: bad argument, bad moescope.toml, unknown run/tag/layer, a bad SQL query,
       an output file that cannot be written, a missing optional dependency
    3  unreadable or empty trace: missing path, no runs, bad manifest, newer format, truncated or corrupt part

`moescope.cli.main` catches everything a command raises and asks `classify`; commands raise, they do not
classify. Damaged trace data found late (DuckDB reading a page that fails) is exit 3 here too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .format.manifest import TraceError

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_TRACE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


class CLIError(Exception):
    """A user-facing error raised by a command: printed as one line, exits with `code` (default 2, usage)."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Failure:
    """How a command ends on an exception: the exit code and the one line printed (empty: print nothing)."""

    code: int
    message: str


def one_line(e: BaseException) -> str:
    """An exception's message on one line (whitespace collapsed), or its class name when it has none."""
    text = " ".join(str(e).split())
    return text or e.__class__.__name__


def _usage_types() -> tuple[type[BaseException], ...]:
    """Exceptions that mean the user asked for something wrong (imported lazily: only on the error path)."""
    from .analysis.console import QueryError
    from .analysis.dialects import UnsupportedError
    from .analysis.rules.base import RangeError
    from .analysis.selection import SelectionError
    from .check.run import CheckError
    from .config import ConfigError

    return (ConfigError, RangeError, SelectionError, CheckError, QueryError, UnsupportedError)


#: DuckDB errors about the query itself, never about the files it read.
_DUCKDB_QUERY_ERRORS = ("ParserException", "BinderException", "CatalogException", "SyntaxException",
                        "PermissionException", "NotImplementedException", "ConstraintException",
                        "ConversionException", "OutOfRangeException", "TypeMismatchException")
#: Words in a DuckDB or pyarrow message that mean a trace file is damaged, whatever the exception type.
_DAMAGE_WORDS = ("corrupt", "thrift", "parquet", "magic bytes", "no magic", "checksum", "crc", "decompress",
                 "truncated", "zstd", "snappy")


def _module_root(e: BaseException) -> str:
    return type(e).__module__.split(".")[0]


def is_damaged_data(e: BaseException) -> bool:
    """True for a DuckDB or pyarrow error that means a trace file is truncated, corrupt or unreadable."""
    root = _module_root(e)
    text = str(e).lower()
    if root in ("duckdb", "_duckdb"):
        if type(e).__name__ in _DUCKDB_QUERY_ERRORS:
            return False
        return type(e).__name__ == "IOException" or any(w in text for w in _DAMAGE_WORDS)
    if root == "pyarrow":
        return True  # pyarrow only runs on trace files in the commands (writing goes through other paths)
    if isinstance(e, OSError) and any(w in text for w in _DAMAGE_WORDS):
        return True  # pyarrow raises OSError for failed page checksums and decompression
    return False


def classify(e: BaseException) -> Failure:
    """Map an exception to (exit code, one line); the single place where exit codes are decided for errors."""
    if isinstance(e, CLIError):
        return Failure(e.code, one_line(e))
    if isinstance(e, TraceError):
        return Failure(EXIT_TRACE, one_line(e))
    if isinstance(e, KeyboardInterrupt):
        return Failure(EXIT_INTERRUPTED, "interrupted")
    if isinstance(e, BrokenPipeError):
        return Failure(EXIT_OK, "")
    if is_damaged_data(e):
        return Failure(EXIT_TRACE, f"unreadable trace data: {one_line(e)}")
    if isinstance(e, _usage_types()):
        return Failure(EXIT_USAGE, one_line(e))
    if _module_root(e) in ("duckdb", "_duckdb"):
        if type(e).__name__ in _DUCKDB_QUERY_ERRORS:
            return Failure(EXIT_USAGE, f"SQL error: {one_line(e)}")
        return Failure(EXIT_FAIL, f"DuckDB {type(e).__name__}: {one_line(e)}")
    if isinstance(e, ImportError):  # an optional extra that is not installed: the message says which
        return Failure(EXIT_USAGE, one_line(e))
    if isinstance(e, OSError):  # an output path that cannot be written, a config file that cannot be read
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        return Failure(EXIT_USAGE, f"{where}{e.strerror or one_line(e)}")
    return Failure(EXIT_FAIL, f"{e.__class__.__name__}: {one_line(e)}")


def as_usage(e: Exception) -> Exception:
    """For a call whose ValueErrors mean bad arguments: a usage CLIError, unless `e` is classified otherwise."""
    failure = classify(e)
    if failure.code != EXIT_FAIL:
        return e
    return CLIError(one_line(e), EXIT_USAGE)


def debug() -> bool:
    """MOESCOPE_DEBUG=1 shows tracebacks of internal errors (exit 1) instead of one line."""
    return bool(os.environ.get("MOESCOPE_DEBUG"))
