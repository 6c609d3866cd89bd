"""Output formats of `moescope check`: text, JSON, JUnit XML, GitHub annotations and the step-summary table."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

from ..analysis.rules import worst
from .run import FORMATS, JSON_KEYS, MAX_SUMMARY_ROWS, READING_ORDER, CheckResult, _clean, _fmt, _int_or_none, _jsonable

#: Widest EXPERT cell of the text table; the message names every expert anyway.
EXPERT_WIDTH = 16


def _window(rec: Mapping[str, Any]) -> str:
    """The window label of a finding, from `window` or its start/end steps."""
    w = _clean(rec.get("window"))
    if isinstance(w, str) and w:
        return w
    # Step bounds say more to a person than a window index, so they win over a bare number.
    s, e = _int_or_none(rec.get("window_start")), _int_or_none(rec.get("window_end"))
    if s is not None and e is not None:
        return f"step {s}" if s == e else f"steps {s}–{e}"
    return "" if w is None else str(w)


def _expert_text(value: Any, limit: int | None = None, width: int | None = None) -> str:
    """An expert id, or a comma-separated list of them (at most `limit` items or `width` characters shown)."""
    v = _clean(value)
    if v is None:
        return ""
    if isinstance(v, list):
        items = [str(_int_or_none(x) if _int_or_none(x) is not None else x) for x in v]
        keep = len(items) if limit is None else min(limit, len(items))
        if width is not None:
            # Fit "a,b,c,…(+n)" into width characters; at least one item is always shown.
            while keep > 1 and len(",".join(items[:keep]) + (f",…(+{len(items) - keep})" if keep < len(items) else "")) > width:
                keep -= 1
        if keep < len(items):
            return ",".join(items[:keep]) + f",…(+{len(items) - keep})"
        return ",".join(items)
    n = _int_or_none(v)
    return str(n) if n is not None else str(v)


def _expert_json(value: Any) -> Any:
    """An expert for JSON: an int, a list (ints where they are ints), or null."""
    v = _clean(value)
    if isinstance(v, list):
        return [x if _int_or_none(x) is None or isinstance(x, str) else _int_or_none(x) for x in v]
    if isinstance(v, str):
        return v
    return _int_or_none(v)


def _where(rec: Mapping[str, Any]) -> str:
    """'run r, layer 3, expert 5' for a finding (the parts it has)."""
    parts = []
    if _clean(rec.get("run")) is not None:
        parts.append(f"run {rec['run']}")
    if (layer := _int_or_none(rec.get("layer"))) is not None:
        parts.append(f"layer {layer}")
    experts = _expert_text(rec.get("expert"), limit=8)
    if experts:
        parts.append(f"expert{'s' if ',' in experts else ''} {experts}")
    return ", ".join(parts)


def _records(result: CheckResult) -> list[dict[str, Any]]:
    return result.findings.to_dict("records")


# --------------------------------------------------------------------------------------------- formats


def summary_line(result: CheckResult) -> str:
    """One line: overall result, counts by status and what was checked."""
    s = result.summary
    counts = ", ".join(f"{s[k.lower()]} {k.lower()}" for k in READING_ORDER)
    meta = result.meta
    trace = meta.get("trace", "trace")
    ref = ""
    if meta.get("reference") and meta["reference"] != trace:
        ref = f" against {meta['reference']}"
    if meta.get("tag") is not None or meta.get("reference_tag") is not None:

        def name(t: Any) -> str:
            return "all data" if t is None else f"tag {t!r}"

        ref += f" (drift: {name(meta.get('tag'))} vs {name(meta.get('reference_tag'))})"
    return f"moescope check: {s['result'].upper()} ({counts}) for {trace}{ref}"


def format_text(result: CheckResult, *, verbose: bool = False) -> str:
    """A table a person reads: every non-PASS finding (failures first), passing rules folded, a summary line."""
    df = result.findings
    shown = df if verbose else df[df["status"] != "PASS"]
    header = ["STATUS", "RULE", "RUN", "LAYER", "EXPERT", "WINDOW", "VALUE", "THRESHOLD", "MESSAGE"]
    rows = []
    for rec in shown.to_dict("records"):
        status = rec["status"]
        if status == "WARN" and result.fail_on == "warn":
            status = "WARN*"  # marks a warning that fails this check
        rows.append(
            [
                status,
                str(_clean(rec["rule"]) or ""),
                str(_clean(rec["run"]) or ""),
                "" if _int_or_none(rec["layer"]) is None else str(_int_or_none(rec["layer"])),
                _expert_text(rec["expert"], width=EXPERT_WIDTH),
                _window(rec),
                _fmt(rec["value"]),
                _fmt(rec["threshold"]),
                " ".join(str(_clean(rec["message"]) or "").split()),
            ]
        )
    lines: list[str] = []
    if rows:
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
        widths[-1] = 0  # the message is last and not padded
        fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
        lines.append(fmt(header))
        lines.extend(fmt(r) for r in rows)
        lines.append("")
    passed = df[df["status"] == "PASS"]
    if not verbose and not passed.empty:
        # Only rules with nothing but PASS findings are named as passing: a rule that FAILs in one layer and
        # passes in another did not pass.
        other = set(df.loc[df["status"] != "PASS", "rule"].astype(str))
        clean = sorted({str(r) for r in passed["rule"]} - other)
        line = f"{len(passed)} passing finding{'s' if len(passed) != 1 else ''} not shown (-v lists them)"
        lines.append(line + (f"; rules that passed everywhere: {', '.join(clean)}" if clean else ""))
    if result.fail_on == "warn" and (df["status"] == "WARN").any():
        lines.append("WARN* fails this check (--fail-on warn)")
    lines.append(summary_line(result))
    return "\n".join(lines) + "\n"


def to_dict(result: CheckResult) -> dict[str, Any]:
    """The JSON report as a dict: summary, checks, meta."""
    checks = []
    for rec in _records(result):
        item = {k: _clean(rec.get(k)) for k in JSON_KEYS}
        item["layer"] = _int_or_none(item["layer"])
        item["expert"] = _expert_json(rec.get("expert"))
        item["window"] = _window(rec) or None
        checks.append(item)
    return {"summary": result.summary, "checks": checks, "meta": _jsonable(result.meta)}


def format_json(result: CheckResult) -> str:
    """The JSON report (strict JSON: NaN and Inf are null)."""
    return json.dumps(to_dict(result), indent=2, allow_nan=False) + "\n"


def _cases(result: CheckResult) -> list[tuple[str, str, str, list[dict[str, Any]]]]:
    """Group findings into JUnit testcases: one per rule × run × layer, in first-seen order."""
    groups: dict[tuple[str, str, Any], list[dict[str, Any]]] = {}
    for rec in _records(result):
        key = (str(_clean(rec["rule"]) or "?"), str(_clean(rec["run"]) or ""), _int_or_none(rec["layer"]))
        groups.setdefault(key, []).append(rec)
    out = []
    for (rule, run, layer), recs in groups.items():
        # One testcase holds several findings (windows, experts): the worst status by the one Status order.
        status = worst(r["status"] for r in recs)
        classname = f"moescope.{run}" if run else "moescope"
        name = rule if layer is None else f"{rule}[layer {layer}]"
        out.append((classname, name, status, recs))
    return out


def format_junit(result: CheckResult) -> str:
    """JUnit XML for GitLab, Jenkins and other CI: one testcase per rule × run × layer.

    FAIL → <failure>, ERROR → <error>, SKIP → <skipped>, WARN → passes with <system-out>
    (or <failure> with fail_on="warn").
    """
    cases = _cases(result)
    counts = {"tests": len(cases), "failures": 0, "errors": 0, "skipped": 0}
    elapsed = f"{float(result.meta.get('elapsed_s') or 0.0):.3f}"
    suites = ET.Element("testsuites", name="moescope check")
    suite = ET.SubElement(
        suites,
        "testsuite",
        name=f"moescope check {result.meta.get('trace', '')}".strip(),
        # JUnit's schema wants an ISO 8601 timestamp without a zone designator (Jenkins parses it strictly).
        timestamp=str(result.meta.get("created", "")).rstrip("Z"),
        time=elapsed,
    )
    props = ET.SubElement(suite, "properties")
    for k in ("trace", "reference", "fail_on", "moescope_version"):
        if result.meta.get(k) is not None:
            ET.SubElement(props, "property", name=k, value=str(result.meta[k]))
    for classname, name, status, recs in cases:
        case = ET.SubElement(suite, "testcase", classname=classname, name=name, time="0")
        details = "\n".join(_detail(r) for r in recs if r["status"] != "PASS" or status == "PASS")
        bad = [r for r in recs if r["status"] == status]
        first = " ".join(str(_clean(bad[0]["message"]) or status).split()) if bad else status
        if status == "ERROR":
            counts["errors"] += 1
            ET.SubElement(case, "error", message=first, type="ERROR").text = details
        elif status == "FAIL" or (status == "WARN" and result.fail_on == "warn"):
            counts["failures"] += 1
            ET.SubElement(case, "failure", message=first, type=status).text = details
        elif status == "SKIP":
            counts["skipped"] += 1
            ET.SubElement(case, "skipped", message=first)
        elif status == "WARN":
            ET.SubElement(case, "system-out").text = details
    for k, v in counts.items():
        suite.set(k, str(v))
        suites.set(k, str(v))
    suites.set("time", elapsed)
    ET.indent(suites)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"


def _detail(rec: Mapping[str, Any]) -> str:
    """One line per finding in JUnit bodies and annotations."""
    where = _where(rec)
    win = _window(rec)
    extra = f" [{win}]" if win else ""
    msg = " ".join(str(_clean(rec.get("message")) or "").split())
    return f"{rec['status']} {rec['rule']} ({where}){extra}: {msg} (value {_fmt(rec.get('value'))}, threshold {_fmt(rec.get('threshold'))})"


def _gh_escape_data(s: str) -> str:
    """Escape an annotation message the way the GitHub Actions toolkit does."""
    return s.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _gh_escape_prop(s: str) -> str:
    """Escape an annotation property (file, title): also ':' and ','."""
    return _gh_escape_data(s).replace(":", "%3A").replace(",", "%2C")


def format_github(result: CheckResult) -> str:
    """GitHub Actions workflow commands: `::error` for failing findings, `::warning` for warnings, then a summary line."""
    lines = []
    trace = str(result.meta.get("trace", ""))
    for rec in _records(result):
        status = rec["status"]
        if status in result.failing_statuses:
            level = "error"
        elif status == "WARN":
            level = "warning"
        else:
            continue
        where = _where(rec)
        title = f"moescope {rec['rule']}" + (f" ({where})" if where else "")
        msg = " ".join(str(_clean(rec.get("message")) or "").split())
        msg = f"{status}: {msg} (value {_fmt(rec.get('value'))}, threshold {_fmt(rec.get('threshold'))})"
        win = _window(rec)
        if win:
            msg += f" [{win}]"
        lines.append(f"::{level} file={_gh_escape_prop(trace)},title={_gh_escape_prop(title)}::{_gh_escape_data(msg)}")
    lines.append(summary_line(result))
    return "\n".join(lines) + "\n"


def _md_cell(value: Any) -> str:
    return " ".join(str(value).split()).replace("|", "\\|")


def format_markdown(result: CheckResult, max_rows: int = MAX_SUMMARY_ROWS) -> str:
    """A markdown report for `$GITHUB_STEP_SUMMARY`: result, counts, and a table of the non-PASS findings."""
    s = result.summary
    icon = {"FAIL": "❌", "ERROR": "💥", "WARN": "⚠️", "SKIP": "⏭️", "PASS": "✅"}
    lines = [
        f"## moescope check: {'✅ pass' if s['result'] == 'pass' else '❌ fail'}",
        "",
        f"Trace `{result.meta.get('trace', '')}`"
        + (f" against reference `{result.meta['reference']}`" if result.meta.get("reference") else "")
        + f" · fail on: {result.fail_on}",
        "",
        "| " + " | ".join(k for k in READING_ORDER) + " |",
        "|" + "---:|" * len(READING_ORDER),
        "| " + " | ".join(str(s[k.lower()]) for k in READING_ORDER) + " |",
        "",
    ]
    shown = result.findings[result.findings["status"] != "PASS"]
    if not shown.empty:
        lines += [
            "| status | rule | run | layer | expert | window | value | threshold | message |",
            "|---|---|---|---:|---:|---|---:|---:|---|",
        ]
        for rec in shown.head(max_rows).to_dict("records"):
            cells = [
                f"{icon.get(rec['status'], '')} {rec['status']}",
                rec["rule"],
                _clean(rec["run"]) or "",
                "" if _int_or_none(rec["layer"]) is None else _int_or_none(rec["layer"]),
                _expert_text(rec["expert"], limit=8),
                _window(rec),
                _fmt(rec["value"]),
                _fmt(rec["threshold"]),
                _clean(rec["message"]) or "",
            ]
            lines.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
        if len(shown) > max_rows:
            lines.append(f"\n… and {len(shown) - max_rows} more (see the job log or the JSON report)")
    lines.append("")
    return "\n".join(lines) + "\n"


def write_step_summary(result: CheckResult, path: str | os.PathLike[str] | None = None) -> Path | None:
    """Append the markdown report to `path` or `$GITHUB_STEP_SUMMARY`; returns the file, or None when unset."""
    target = path or os.environ.get("GITHUB_STEP_SUMMARY")
    if not target:
        return None
    with open(target, "a", encoding="utf-8") as fh:
        fh.write(format_markdown(result))
    return Path(target)


FORMATTERS = {"text": format_text, "json": format_json, "junit": format_junit, "github": format_github}


def render(result: CheckResult, fmt: str = "text") -> str:
    """Render a result in one of `FORMATS`."""
    try:
        return FORMATTERS[fmt](result)
    except KeyError:
        raise ValueError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}") from None
