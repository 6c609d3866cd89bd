"""moescope: router diagnostics and observability for Mixture-of-Experts models.

Reading and analysing traces needs no torch; `record`, `snapshot_experts` and `register_router`
import torch lazily on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from .format.writer import TraceError  # noqa: E402

if TYPE_CHECKING:  # pragma: no cover
    from .analysis.trace import Trace
    from .capture.recorder import Recorder

__all__ = ["__version__", "TraceError", "open", "record", "register_router", "sinks", "snapshot_experts", "unregister_router"]


def __getattr__(name: str) -> Any:
    """`moescope.sinks` (the metric sinks) loads on first use: recording and reading traces do not need it."""
    if name == "sinks":
        import importlib

        return importlib.import_module("moescope.sinks")
    raise AttributeError(f"module 'moescope' has no attribute {name!r}")


def open(root: Any, **kwargs: Any) -> Trace:  # noqa: A001 - the public name of the design
    """Open a trace root (or one run directory) for SQL and analyses; engine="spark" runs them on PySpark."""
    from .analysis.trace import open_trace

    return open_trace(root, **kwargs)


def record(model: Any, path: Any, **kwargs: Any) -> Recorder:
    """Record the routing decisions of `model` into the run directory `path` (a context manager)."""
    from .capture.recorder import Recorder

    return Recorder(model, path, **kwargs)


def register_router(cls: Any, **spec: Any) -> None:
    """Register how to hook a user router class; takes the same fields as a hooks/*.toml spec."""
    from .capture.adapters import register_router as _register

    _register(cls, **spec)


def unregister_router(cls: Any) -> int:
    """Forget a registered router class (or its qualified name, or a family name); returns how many specs went."""
    from .capture.adapters import unregister_router as _unregister

    return _unregister(cls)


def snapshot_experts(model: Any, path: Any, step: int = 0, **kwargs: Any) -> Any:
    """Write spectral snapshots and pairwise similarity of every MoE layer's experts."""
    from .capture.spectral import snapshot_experts as _snap

    return _snap(model, path, step=step, **kwargs)
