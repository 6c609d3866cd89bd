"""Loading the analyses/*.sql files: named stages, includes and `{{param}}` templating.

An analysis file is a list of named stages (`-- stage: NAME` followed by one SELECT). Stages of
other files are pulled in with `-- include: FILE` at the point of the directive. Rendering turns
the stages into one portable query, `WITH s1 AS (...), s2 AS (...) <last stage>`, the way splink
builds its pipelines, so the same text can run on another SQL engine over the same Parquet.
Parameters are written `{{name}}` and substituted by Python: numbers and strings become literals,
`Raw` fragments (filters built by `moescope.analysis.selection`) are pasted as they are.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from .._paths import content_dir

_STAGE = re.compile(r"^--\s*stage:\s*([A-Za-z_][A-Za-z0-9_]*)\s*$")
_INCLUDE = re.compile(r"^--\s*include:\s*([A-Za-z_][A-Za-z0-9_]*)\s*$")
_PARAM = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


@dataclass(frozen=True)
class Raw:
    """A trusted SQL fragment (e.g. a filter built from a selection) pasted into a template verbatim."""

    sql: str


def literal(value: Any) -> str:
    """Render a Python value as a portable SQL literal."""
    if isinstance(value, Raw):
        return value.sql
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"cannot render non-finite number {value!r} as SQL")
        return repr(value)
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    raise TypeError(f"cannot render {type(value).__name__} as an SQL literal")


def analyses_dir() -> Path:
    """The folder holding the analyses/*.sql files (checkout or wheel)."""
    return content_dir("analyses")


@cache
def _read(name: str) -> str:
    path = analyses_dir() / f"{name}.sql"
    if not path.is_file():
        raise FileNotFoundError(f"analysis {name!r} not found ({path})")
    return path.read_text()


def stages(name: str, _seen: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """Return the (stage name, SELECT text) pairs of analysis `name`, includes expanded in place."""
    if name in _seen:
        raise ValueError(f"analysis include cycle: {' -> '.join((*_seen, name))}")
    out: list[tuple[str, str]] = []
    current: str | None = None
    body: list[str] = []

    def close() -> None:
        if current is not None:
            text = "\n".join(body).strip().rstrip(";").strip()
            if not text:
                raise ValueError(f"{name}.sql: stage {current!r} is empty")
            out.append((current, text))

    for line in _read(name).splitlines():
        s = line.strip()
        if m := _STAGE.match(s):
            close()
            current, body = m.group(1), []
        elif m := _INCLUDE.match(s):
            close()
            current, body = None, []
            out.extend(stages(m.group(1), (*_seen, name)))
        elif current is not None:
            body.append(line)
    close()
    names = [n for n, _ in out]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ValueError(f"{name}.sql: stage names used twice: {sorted(dup)}")
    return out


def render(name: str, params: dict[str, Any] | None = None, final: str | None = None) -> str:
    """Render analysis `name` into one SQL query with `params` substituted; `final` stops at that stage."""
    params = params or {}
    parts = stages(name)
    if final is not None:
        names = [n for n, _ in parts]
        if final not in names:
            raise KeyError(f"analysis {name!r} has no stage {final!r}")
        parts = parts[: names.index(final) + 1]

    def sub(text: str) -> str:
        def one(m: re.Match[str]) -> str:
            key = m.group(1)
            if key not in params:
                raise KeyError(f"analysis {name!r} needs parameter {key!r}")
            return literal(params[key])

        return _PARAM.sub(one, text)

    *ctes, (_, last) = parts
    if not ctes:
        return sub(last)
    with_ = ",\n".join(f"{n} AS (\n{sub(t)}\n)" for n, t in ctes)
    return f"WITH {with_}\n{sub(last)}"
