"""The analysis layer: DuckDB views over Parquet traces and the metric catalogue (analyses/*.sql). No torch here.

Entry point: `moescope.open(root)` -> `moescope.analysis.trace.Trace`. Metric functions live in
`moescope.analysis.metrics` (pure functions of a connection, a selection and parameters), the health
rules in `moescope.analysis.health`, drift in `moescope.analysis.drift`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Trace", "QueryError", "Selection"]


def __getattr__(name: str) -> Any:
    # Lazy, so `import moescope.analysis` stays cheap for tools that only need one submodule.
    if name in ("Trace", "QueryError"):
        from . import trace

        return getattr(trace, name)
    if name == "Selection":
        from .selection import Selection

        return Selection
    raise AttributeError(name)
