"""SQL dialect differences in one place: the analyses are written once, in DuckDB's SQL, and translated.

`analyses/*.sql` and the few queries the analysis layer writes in Python are DuckDB SQL. DuckDB runs them as
they are (no parsing, no translation: its path costs nothing here). Another engine gets them through
`translate(sql, dialect)`: sqlglot parses DuckDB, the rules below fix what sqlglot's own generator does not
carry over with the same meaning, and the result is cached per SQL text, so an analysis is translated once per
rendering however often it runs. This is how splink keeps one pipeline for several backends
(splink/internals/dialects.py). An analysis is never rewritten by hand for an engine: a difference that these
rules cannot express is an error here, not a second copy of the SQL.

Rules for Spark (each one keeps DuckDB's meaning):

- decimal literals (`4.0`, `0.9`) are DOUBLE: DuckDB computes `/` of decimals in DOUBLE and turns DECIMAL
  results into float64, while Spark keeps exact decimals whose division rounds to a fixed scale;
- `list[i]` is `GET(list, i - 1)`: NULL past the end, as in DuckDB (Spark's `list[i]` raises under ANSI);
- `len(list)` is `SIZE(list)` (the analyses take len() of lists only; sqlglot reads it as a string length);
- `list_has_any(a, b)` is `ARRAYS_OVERLAP(a, b)`;
- `?` placeholders are bound as literals (`bind`), lists as arrays.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

#: The engines the analyses run on; the first is the default and needs no translation.
ENGINES: tuple[str, ...] = ("duckdb", "spark")
#: The dialect the analyses are written in.
SOURCE = "duckdb"


class UnsupportedError(ValueError):
    """A feature that the chosen engine does not have (e.g. live refresh on Spark): one line, a usage error."""


def unsupported(what: str, engine: str) -> UnsupportedError:
    """The one wording of a feature missing on an engine: '<what> is not supported on engine=<engine>'."""
    return UnsupportedError(f"{what} is not supported on engine={engine} (use engine=duckdb)")


def check_engine(engine: str) -> str:
    """`engine` if the analyses can run on it, else a one-line UnsupportedError naming the engines."""
    if engine not in ENGINES:
        raise UnsupportedError(f"unknown engine {engine!r}; use one of {', '.join(ENGINES)}")
    return engine


def translate(sql: str, dialect: str) -> str:
    """`sql` (DuckDB) in `dialect`: unchanged for DuckDB, else translated once per text (cached)."""
    if dialect == SOURCE:
        return sql
    return _translate(sql, check_engine(dialect))


def bind(sql: str, params: Sequence[Any], dialect: str) -> str:
    """`sql` with its `?` placeholders bound to `params` as literals, in `dialect` (for engines without binding)."""
    import sqlglot.expressions as exp

    values = iter(params)

    def one(node: exp.Expression) -> exp.Expression:
        if isinstance(node, exp.Placeholder):
            try:
                return _literal(next(values))
            except StopIteration:
                raise ValueError(f"too few parameters for the query: {sql}") from None
        return node

    tree = _parse(sql).copy().transform(one)
    if next(values, _END) is not _END:
        raise ValueError(f"too many parameters for the query: {sql}")
    return _generate(tree, check_engine(dialect))


_END = object()


@lru_cache(maxsize=1)
def _reader() -> Any:
    from sqlglot.dialects.duckdb import DuckDB

    class DuckDBAsWritten(DuckDB):
        # sqlglot moves `list[i]` to 0-based while reading only where it can infer an integer index (literals);
        # reading it as written lets one rule below convert every index, literal or not.
        INDEX_OFFSET = 0

    return DuckDBAsWritten


@lru_cache(maxsize=1024)
def _parse(sql: str) -> Any:
    import sqlglot

    return sqlglot.parse_one(sql, read=_reader())


@lru_cache(maxsize=1024)
def _translate(sql: str, dialect: str) -> str:
    return _generate(_parse(sql).copy(), dialect)


def _generate(tree: Any, dialect: str) -> str:
    if dialect == "spark":
        tree = tree.transform(_spark_rule)
    return tree.sql(dialect=dialect)


def _spark_rule(node: Any) -> Any:
    import sqlglot.expressions as exp

    if isinstance(node, exp.Literal) and not node.is_string and not node.this.lstrip("-").isdigit():
        return exp.cast(node.copy(), "DOUBLE")
    if isinstance(node, exp.Bracket) and len(node.expressions) == 1:
        i = node.expressions[0]
        zero_based = exp.Literal.number(int(i.this) - 1) if i.is_int else exp.Sub(this=i, expression=exp.Literal.number(1))
        return exp.Anonymous(this="GET", expressions=[node.this, zero_based])
    if isinstance(node, exp.Length):
        return exp.Anonymous(this="SIZE", expressions=[node.this])
    if isinstance(node, exp.ArrayOverlaps):
        return exp.Anonymous(this="ARRAYS_OVERLAP", expressions=[node.this, node.expression])
    return node


def _literal(value: Any) -> Any:
    """A Python value as a sqlglot literal (strings, numbers, booleans, None, lists of them)."""
    import sqlglot.expressions as exp

    if isinstance(value, (list, tuple)):
        return exp.Array(expressions=[_literal(v) for v in value])
    if value is None:
        return exp.Null()
    if isinstance(value, bool):
        return exp.Boolean(this=value)
    if isinstance(value, int):
        return exp.Literal.number(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"cannot bind non-finite number {value!r}")
        return exp.Literal.number(repr(value))  # DOUBLE by the rule for decimal literals
    if isinstance(value, str):
        return exp.Literal.string(value)
    raise TypeError(f"cannot bind {type(value).__name__} as an SQL literal")
