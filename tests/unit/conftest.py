"""The `quick` marker: every test under tests/unit that is not slow, browser, dist, gpu or hf, so
`python -m pytest -m quick` is the developer loop (hand-built traces, no training runs, no extra processes)."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).parent
#: Markers that keep a unit test out of the quick loop.
NOT_QUICK = ("slow", "browser", "dist", "gpu", "hf")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the unit tests that belong to the quick loop."""
    for item in items:
        if HERE in Path(str(item.fspath)).parents and not any(item.get_closest_marker(m) for m in NOT_QUICK):
            item.add_marker(pytest.mark.quick)
