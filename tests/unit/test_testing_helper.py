"""`moescope.testing.assert_healthy`: the pytest helper a project calls on its own traces."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_check import COLLAPSED, SHIFTED, UNIFORM, make_run  # tests/ is on sys.path under pytest

from moescope.config import ConfigError, HealthConfig
from moescope.format.writer import TraceError
from moescope.testing import assert_healthy, check_trace


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A balanced run, a collapsed one and a merely imbalanced one (warnings, no failures)."""
    base = tmp_path_factory.mktemp("helper")
    return {
        "balanced": make_run(base / "balanced", [UNIFORM, UNIFORM], seed=11),
        "collapse": make_run(base / "collapse", [UNIFORM, COLLAPSED], seed=12),
        "imbalanced": make_run(base / "imbalanced", [SHIFTED], seed=13),
    }


def test_healthy_trace_returns_result(runs: dict[str, Path]) -> None:
    result = assert_healthy(runs["balanced"])
    assert result.ok and result.summary["fail"] == 0


def test_collapsed_trace_raises_with_one_line_per_finding(runs: dict[str, Path]) -> None:
    with pytest.raises(AssertionError) as info:
        assert_healthy(runs["collapse"])
    lines = str(info.value).splitlines()
    assert lines[0].startswith("moescope check: FAIL")
    result = check_trace(runs["collapse"])
    assert len(lines) == 1 + len(result.failures)
    assert all(ln.startswith("FAIL ") and "layer 1" in ln for ln in lines[1:])


def test_fail_on_warn(runs: dict[str, Path]) -> None:
    assert_healthy(runs["imbalanced"])  # warnings alone pass
    with pytest.raises(AssertionError, match="WARN"):
        assert_healthy(runs["imbalanced"], fail_on="warn")


def test_config_object_and_reference(runs: dict[str, Path]) -> None:
    cfg = HealthConfig()
    cfg.dead_expert.enabled = False
    cfg.collapse.enabled = False
    cfg.maxvio.enabled = False
    # With the failing rules switched off the collapsed run passes on its own...
    assert_healthy(runs["collapse"], config=cfg)
    # ...but not against a healthy reference: its dead experts are a regression and its load drifted.
    with pytest.raises(AssertionError, match="regression_|drift"):
        assert_healthy(runs["collapse"], config=cfg, reference=runs["balanced"], fail_on="warn")


def test_errors_are_not_assertions(runs: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(TraceError):
        assert_healthy(tmp_path / "missing")
    bad = tmp_path / "moescope.toml"
    bad.write_text("[rules.dead_expert]\nfail_bellow = 0.1\n")
    with pytest.raises(ConfigError):
        assert_healthy(runs["balanced"], config=bad)


def test_open_trace_object_is_left_open(runs: dict[str, Path]) -> None:
    import moescope

    with moescope.open(runs["collapse"]) as tr:
        with pytest.raises(AssertionError):
            assert_healthy(tr)
        # The caller's Trace is still usable afterwards: assert_healthy closes only what it opened.
        assert tr.sql("SELECT count(*) FROM expert_load").fetchall()[0][0] > 0
        # A slice compared with the trace's own (here untagged) data needs no second path.
        result = check_trace(tr, reference_tag="")
        assert "drift" in set(result.findings["rule"])
