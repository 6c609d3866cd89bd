"""Importers: traces other frameworks already write, turned into moescope traces (`moescope import`).

The registry below is the one list of formats: `moescope import --help` prints it, the command looks names up
here. One module per producer; each reads its producer's files into `_base.Tables`, and `_base.write_import`
writes the run through `moescope.format.writer` (the trace schema is never redeclared).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import CLIError
from . import megatron, sglang, vllm
from ._base import Importer, ImportOptions, ImportSummary, Progress, list_sources, parse_layers, write_import

__all__ = ["IMPORTERS", "Importer", "ImportOptions", "ImportSummary", "get", "import_trace", "parse_layers"]

#: name -> importer, in the order --help lists them
IMPORTERS: dict[str, Importer] = {imp.name: imp for imp in (megatron.IMPORTER, sglang.IMPORTER, vllm.ROUTED, vllm.EPLB)}


def get(name: str) -> Importer:
    """The importer called `name`; an unknown name is a usage error listing the known ones."""
    try:
        return IMPORTERS[name]
    except KeyError:
        raise CLIError(f"unknown import format {name!r}: one of {', '.join(IMPORTERS)}") from None


def import_trace(fmt: str, src: str | Path, dst: str | Path, *, run: str | None = None,
                 options: ImportOptions | None = None, quiet: bool = True) -> ImportSummary:
    """Import SRC (a file or a directory of the format's files) as run `run` under trace root DST."""
    imp = get(fmt)
    opts = options or ImportOptions()
    files = list_sources(Path(src), imp.patterns)
    name = run or Path(src).name.split(".")[0] or fmt
    return write_import(imp, files, Path(dst), name, opts, Progress(len(files), quiet=quiet))
