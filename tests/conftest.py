"""Shared fixtures; the table builders live in trace_helpers.py (a conftest is not importable by name once
tests/browser has its own conftest)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from trace_helpers import layer_spec, load_frame, routing_frame, stats_frame  # noqa: F401

from moescope.format.writer import write_run


@pytest.fixture
def trace_root(tmp_path: Path) -> Path:
    """An empty directory to hold hand-built runs."""
    root = tmp_path / "traces"
    root.mkdir()
    return root


@pytest.fixture
def make_run(trace_root: Path) -> Callable[..., Path]:
    """Write one hand-built run below `trace_root`: make_run("a", layers=[...], expert_load=df, ...)."""

    def make(run: str, *, layers: list[dict[str, Any]] | None = None, rank: int = 0, root: Path | None = None,
             extra: dict[str, Any] | None = None, **tables: pd.DataFrame) -> Path:
        return write_run((root or trace_root) / run, {k: v for k, v in tables.items() if v is not None},
                         run=run, layers=layers, rank=rank, extra=extra)

    return make
