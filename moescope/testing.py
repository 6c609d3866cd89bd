"""Helpers for a project's own test suite: fail a pytest test when a trace's routing is unhealthy.

from moescope.testing import assert_healthy

def test_router_is_healthy(tmp_path):
    train_a_little(tmp_path / "trace")            # writes a trace with moescope.record(...)
    assert_healthy(tmp_path / "trace", config="moescope.toml")
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .check import CheckResult, _detail, run_check, summary_line

if TYPE_CHECKING:  # pragma: no cover
    from .analysis.trace import Trace
    from .config import HealthConfig

__all__ = ["assert_healthy", "check_trace"]


def check_trace(
    trace: str | os.PathLike[str] | Trace,
    *,
    config: HealthConfig | str | os.PathLike[str] | None = None,
    fail_on: str = "fail",
    reference: str | os.PathLike[str] | None = None,
    min_tokens: int | None = None,
    run: str | None = None,
    tag: str | None = None,
    reference_tag: str | None = None,
) -> CheckResult:
    """Run `moescope check` in-process and return the result (for tests that inspect findings themselves)."""
    return run_check(
        trace,
        config=config,
        reference=reference,
        fail_on=fail_on,
        min_tokens=min_tokens,
        run=run,
        tag=tag,
        reference_tag=reference_tag,
    )


def assert_healthy(
    trace: str | os.PathLike[str] | Trace,
    *,
    config: HealthConfig | str | os.PathLike[str] | None = None,
    fail_on: str = "fail",
    reference: str | os.PathLike[str] | None = None,
    min_tokens: int | None = None,
    run: str | None = None,
    tag: str | None = None,
    reference_tag: str | None = None,
) -> CheckResult:
    """Raise AssertionError listing the failing findings (one line each) unless the trace passes; else return the result.

    `trace` is a trace root, a run directory or an open `moescope.Trace`; `config` a moescope.toml path or a
    HealthConfig (None: built-in defaults, the config file is not looked up implicitly so tests stay hermetic).
    A missing, empty or unreadable trace raises `moescope.TraceError`, a bad config `ConfigError`.
    """
    result = check_trace(
        trace,
        config=config,
        fail_on=fail_on,
        reference=reference,
        min_tokens=min_tokens,
        run=run,
        tag=tag,
        reference_tag=reference_tag,
    )
    if not result.ok:
        lines = [_detail(rec) for rec in result.failures.to_dict("records")]
        raise AssertionError("\n".join([summary_line(result), *lines]))
    return result
