"""`moescope check`: run the health rules (and regressions against a reference) and format the findings for CI.

`run.py` decides (findings, exit code); `formats.py` renders a result as text, JSON, JUnit or GitHub annotations.
"""

from __future__ import annotations

from .formats import (
    FORMATTERS,
    _detail,
    format_github,
    format_json,
    format_junit,
    format_markdown,
    format_text,
    render,
    summary_line,
    to_dict,
    write_step_summary,
)
from .run import (
    COLUMNS,
    FAIL_ON,
    FORMATS,
    JSON_KEYS,
    MAX_SUMMARY_ROWS,
    READING_ORDER,
    REFERENCE_RULES,
    STATUS_ORDER,
    CheckError,
    CheckResult,
    normalize_findings,
    regression_findings,
    regressions,
    resolve_config,
    run_check,
)

__all__ = [
    "COLUMNS",
    "FAIL_ON",
    "FORMATS",
    "FORMATTERS",
    "JSON_KEYS",
    "MAX_SUMMARY_ROWS",
    "READING_ORDER",
    "REFERENCE_RULES",
    "STATUS_ORDER",
    "CheckError",
    "CheckResult",
    "_detail",
    "format_github",
    "format_json",
    "format_junit",
    "format_markdown",
    "format_text",
    "normalize_findings",
    "regression_findings",
    "regressions",
    "render",
    "resolve_config",
    "run_check",
    "summary_line",
    "to_dict",
    "write_step_summary",
]
