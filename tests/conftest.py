"""Shared fixtures; the table builders live in trace_helpers.py (a conftest is not importable by name once
tests/browser has its own conftest)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from trace_helpers import layer_spec, load_frame, routing_frame, stats_frame  # noqa: F401

from moescope.format.writer import write_run


@pytest.fixture(autouse=True, scope="session")
def _part_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Object-store parts are cached in a folder of the session (subprocesses inherit it), never in ~/.cache."""
    from moescope.format.storage import CACHE_ENV

    saved = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("part-cache"))
    yield
    if saved is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = saved


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
