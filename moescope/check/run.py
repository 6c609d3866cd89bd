"""`moescope check`: run the health rules (and regressions against a reference) and format the findings for CI.

The logic lives here, apart from the CLI, so `moescope.testing.assert_healthy` and the CLI share it:
`run_check(...)` returns a `CheckResult` and the `format_*` functions turn one into text, JSON, JUnit XML
or GitHub Actions annotations. Exit codes are decided by `CheckResult.exit_code` (0 pass, 1 fail); usage and
config errors (2) and unreadable traces (3) are raised as exceptions for the caller to map.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from ..analysis.rules import COLUMNS, STATUS_ORDER, Status, severity
from ..analysis.selection import Selection, check_selection
from ..format.storage import as_path
from ..format.writer import TraceError

if TYPE_CHECKING:  # pragma: no cover
    from ..analysis.trace import Trace
    from ..config import HealthConfig

#: Statuses worst first: the order a person reads findings in (the reverse of the one `Status` order).
READING_ORDER: tuple[str, ...] = tuple(reversed(STATUS_ORDER))
#: Keys of one entry of the JSON report's "checks" list.
JSON_KEYS: list[str] = ["rule", "status", "run", "layer", "expert", "window", "metric", "value", "threshold", "message"]
FORMATS: tuple[str, ...] = ("text", "json", "junit", "github")
FAIL_ON: tuple[str, ...] = ("fail", "warn")
#: Rule names of the findings that a comparison against a reference adds.
REFERENCE_RULES: tuple[str, ...] = ("drift", "regression_dead_expert", "regression_load_cv", "regression_nonfinite")
#: GitHub caps a step summary at 1 MiB; this many rows keeps the table far below it.
MAX_SUMMARY_ROWS = 200


# --------------------------------------------------------------------------------------------- result


class CheckError(ValueError):
    """A usage problem of the check itself (a run the trace does not have, a bad fail_on): exit 2."""


@dataclass
class CheckResult:
    """The outcome of one check: every finding, its counts, and what was checked (trace, config, reference)."""

    findings: pd.DataFrame
    meta: dict[str, Any] = field(default_factory=dict)
    fail_on: str = "fail"

    def __post_init__(self) -> None:
        if self.fail_on not in FAIL_ON:
            raise CheckError(f"fail_on must be one of {', '.join(FAIL_ON)}, got {self.fail_on!r}")
        self.findings = normalize_findings(self.findings)

    @property
    def failing_statuses(self) -> tuple[str, ...]:
        """Statuses that make the check fail: ERROR counts, since a rule that could not run proves nothing."""
        lowest = Status.WARN if self.fail_on == "warn" else Status.FAIL
        return tuple(s for s in READING_ORDER if Status(s) >= lowest)

    @property
    def summary(self) -> dict[str, Any]:
        """Counts by status, the total and the overall result ("pass" or "fail")."""
        counts = self.findings["status"].value_counts()
        out: dict[str, Any] = {s.lower(): int(counts.get(s, 0)) for s in READING_ORDER}
        out["total"] = len(self.findings)
        out["result"] = "fail" if self.exit_code else "pass"
        out["fail_on"] = self.fail_on
        return out

    @property
    def failures(self) -> pd.DataFrame:
        """The findings that fail the check under `fail_on`."""
        return self.findings[self.findings["status"].isin(self.failing_statuses)]

    @property
    def ok(self) -> bool:
        """True when nothing fails the check."""
        return self.failures.empty

    @property
    def exit_code(self) -> int:
        """0 when the check passes, 1 when a finding fails it (usage/trace errors are exceptions, not results)."""
        return 0 if self.ok else 1


def normalize_findings(df: pd.DataFrame | None) -> pd.DataFrame:
    """Return a copy with every column of `COLUMNS`, upper-case statuses, sorted worst first (`Status` order)."""
    df = pd.DataFrame(columns=COLUMNS) if df is None else df.copy()
    for col in COLUMNS:
        if col not in df.columns:
            df[col] = None
    df["status"] = df["status"].fillna("ERROR").astype(str).str.upper()
    df["_rank"] = [-severity(s) for s in df["status"]]
    # A stable sort keeps the order the rules produced within one status (rule order, then layer, ...).
    df = df.sort_values("_rank", kind="stable").drop(columns="_rank").reset_index(drop=True)
    extra = [c for c in df.columns if c not in COLUMNS]
    return df[COLUMNS + extra]


# --------------------------------------------------------------------------------------------- running


def _open(trace: str | os.PathLike[str] | Trace, label: str, engine: str = "duckdb",
          spark_conf: Mapping[str, str] | None = None) -> Trace:
    """Open a trace root (or run directory) on `engine`; a missing path or unreadable data is a TraceError (exit 3)."""
    import moescope

    if not isinstance(trace, (str, os.PathLike)):
        return trace
    path = as_path(trace)  # a directory or an object-store URL (moescope.format.storage)
    if not path.exists():
        raise TraceError(f"{label}: no such trace (path does not exist)")
    # Opening only discovers files and reads them into views, so any DuckDB error here is the data's fault
    # (e.g. a corrupt data page raises a bare duckdb.Error "Corrupted file?"), never a query bug.
    kwargs: dict[str, Any] = {"engine": engine} if engine != "duckdb" else {}
    if spark_conf:
        kwargs["spark_conf"] = dict(spark_conf)
    return _guard(label, moescope.open, path, broad=True, **kwargs)


def _guard(what: str, fn: Any, *args: Any, broad: bool = False, **kwargs: Any) -> Any:
    """Call an analysis; a DuckDB or Arrow read failure means the trace is unreadable (exit 3), so say so.

    `broad`: treat every DuckDB error as unreadable data (for calls that only read the trace files).
    """
    import duckdb
    import pyarrow as pa

    read_errors: tuple[type[BaseException], ...] = (
        duckdb.IOException,
        duckdb.InvalidInputException,
        pa.ArrowInvalid,
        OSError,
    )
    if broad:
        read_errors = (*read_errors, duckdb.Error)
    try:
        return fn(*args, **kwargs)
    except TraceError:
        raise
    except duckdb.Error as e:
        # SQL mistakes raise specific subclasses (Binder, Parser, Catalog, ...); the Parquet reader's own
        # failures on a damaged file (thrift, "Corrupted file?") arrive as the bare base class.
        if not (isinstance(e, read_errors) or type(e) is duckdb.Error):
            raise
        raise TraceError(f"{what}: unreadable trace ({_first_line(e)})") from None
    except read_errors as e:
        raise TraceError(f"{what}: unreadable trace ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    """The first line of an exception message (errors are one line)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else e.__class__.__name__


def _runs(tr: Trace, label: str) -> list[str]:
    """The runs of a trace that hold routing data or expert snapshots; an empty trace is an unreadable one (exit 3)."""
    # Not just `tr.runs`: a run whose files hold no rows has nothing to check either. A snapshot-only run (a
    # downloaded checkpoint checked for clone experts) has the clones rule to evaluate.
    query = ("SELECT run FROM expert_load UNION SELECT run FROM router_stats "
             "UNION SELECT run FROM expert_similarity ORDER BY run")
    df = _guard(label, lambda: tr.sql(query).df(), broad=True)
    runs = [str(r) for r in df["run"].tolist()]
    if not runs:
        raise TraceError(f"{label}: empty trace (no expert_load, router_stats or expert_similarity rows)")
    return runs


def resolve_config(config: HealthConfig | str | os.PathLike[str] | None, min_tokens: int | None = None) -> HealthConfig:
    """Load a config path or check a HealthConfig (ConfigError naming the bad key); apply `min_tokens` to a copy."""
    from ..config import ConfigError, as_config

    if isinstance(config, (str, os.PathLike)) and not Path(config).is_file():
        raise ConfigError(f"{config}: config file not found")
    cfg = as_config(config)
    if min_tokens is not None:
        if int(min_tokens) < 0:
            raise ConfigError(f"min_tokens must be >= 0, got {min_tokens}")
        cfg = cfg.copy()  # a deep copy: the caller's config stays as it was
        cfg.min_tokens = int(min_tokens)
    return cfg


def run_check(
    trace: str | os.PathLike[str] | Trace,
    *,
    config: HealthConfig | str | os.PathLike[str] | None = None,
    reference: str | os.PathLike[str] | None = None,
    fail_on: str | None = None,
    min_tokens: int | None = None,
    run: str | None = None,
    tag: str | None = None,
    reference_tag: str | None = None,
    engine: str = "duckdb",
    spark_conf: Mapping[str, str] | None = None,
) -> CheckResult:
    """Run the health rules on `trace` (and drift/regressions against `reference`) and collect the findings.

    `engine`: "duckdb", or "spark" to run the same analyses on PySpark (`spark_conf`: its session settings,
    e.g. {"spark.master": "spark://host:7077"}); the findings are the same.

    `fail_on` and `reference` default to the config's [check] table (reference paths there are relative to
    the config file). `tag`/`reference_tag` narrow the drift comparison to data slices (`rec.tag(...)`); with
    `reference_tag` and no reference, the trace is its own reference (e.g. code vs english in one run).
    Raises TraceError for a missing, empty or unreadable trace, ConfigError for a bad config, CheckError for
    a bad argument, SelectionError for a tag that matches nothing (the message names the tags that exist).
    """
    from .. import __version__

    t0 = time.monotonic()
    cfg = resolve_config(config, min_tokens)
    check_cfg = getattr(cfg, "check", None)
    if fail_on is None:
        fail_on = getattr(check_cfg, "fail_on", None) or "fail"
    if fail_on not in FAIL_ON:
        raise CheckError(f"fail_on must be one of {', '.join(FAIL_ON)}, got {fail_on!r}")
    if reference is None and getattr(check_cfg, "reference", None):
        reference = Path(check_cfg.reference)
        if isinstance(config, (str, os.PathLike)) and not reference.is_absolute():
            reference = Path(config).parent / reference
    label = str(trace) if isinstance(trace, (str, os.PathLike)) else ", ".join(map(str, getattr(trace, "roots", [])))
    # --reference-tag alone compares two slices of the trace itself (e.g. code vs english of one run).
    self_reference = reference is None and reference_tag is not None
    if reference is None and tag is not None and not self_reference:
        raise CheckError("a drift tag needs --reference, or --reference-tag to compare slices of the trace itself")
    with contextlib.ExitStack() as stack:
        tr = _open(trace, label, engine, spark_conf)
        if tr is not trace:  # close what we opened (assert_healthy may run many times in one test session)
            stack.callback(tr.close)
        runs = _runs(tr, label)
        if run is not None and run not in runs:
            raise CheckError(f"{label}: no run {run!r} with routing data (runs: {', '.join(runs)})")
        checked = [run] if run is not None else runs
        if tag is not None:
            # A typo'd tag is a usage error naming the tags that exist, never a drift that silently vanishes.
            _guard(label, check_selection, tr.cursor(), Selection(run=checked, tag=tag), "--tag", broad=True)
        health = normalize_findings(_guard(label, tr.health, run=run, config=cfg))
        from ..analysis.live import alert_summary

        online_alerts = _guard(label, alert_summary, tr, broad=True)
        frames = [health]

        ref_label = None
        if self_reference:
            ref_label = label
            _guard(label, check_selection, tr.cursor(), Selection(tag=reference_tag), "--reference-tag", broad=True)
            # Regressions of a trace against itself are empty by construction; only the drift says something.
            frames.append(_drift_findings(tr, label, tr, checked, cfg, tag, reference_tag))
        elif reference is not None:
            ref_label = str(reference)
            if not Path(reference).exists():
                raise TraceError(f"{ref_label}: no such reference trace (path does not exist)")
            ref = _open(reference, ref_label, engine, spark_conf)
            stack.callback(ref.close)
            _runs(ref, ref_label)  # an empty reference is as unreadable as an empty trace
            if reference_tag is not None:
                _guard(ref_label, check_selection, ref.cursor(), Selection(tag=reference_tag), "--reference-tag",
                       broad=True)
            ref_health = normalize_findings(_guard(ref_label, ref.health, config=cfg))
            drift_label = f"{label} vs reference {ref_label}"
            frames.append(_drift_findings(tr, drift_label, ref, checked, cfg, tag, reference_tag))
            frames.append(regression_findings(ref_health, health))

    nonempty = [f for f in frames if not f.empty]
    findings = pd.concat(nonempty, ignore_index=True) if nonempty else pd.DataFrame(columns=COLUMNS)
    meta = {
        "trace": label,
        "runs": checked,
        "reference": ref_label,
        "config": _config_meta(config, cfg),
        "fail_on": fail_on,
        "min_tokens": min_tokens,
        "tag": tag,
        "reference_tag": reference_tag,
        "moescope_version": __version__,
        "engine": engine,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "elapsed_s": round(time.monotonic() - t0, 3),
        "online_alerts": online_alerts,  # what the recorder's alerts table and manifests say (informational)
    }
    return CheckResult(findings, meta, fail_on)


def _config_meta(config: Any, cfg: HealthConfig) -> dict[str, Any]:
    """What the JSON meta says about the config: its path (if any) and its values."""
    import dataclasses

    path = str(config) if isinstance(config, (str, os.PathLike)) else None
    return {"path": path, "values": _jsonable(dataclasses.asdict(cfg))}


# --------------------------------------------------------------------------------------------- reference


def _drift_findings(
    tr: Trace,
    label: str,
    reference: Any,
    runs: Iterable[str],
    cfg: HealthConfig,
    tag: str | None = None,
    reference_tag: str | None = None,
) -> pd.DataFrame:
    """Per current run and layer, drift of the expert-load distribution from the reference trace (or tag slices)."""
    rows: list[dict[str, Any]] = []
    # The open reference Trace is passed as the root, so drift does not discover and validate it again.
    baseline: dict[str, Any] = {"root": reference}
    if reference_tag is not None:
        baseline["tag"] = reference_tag
    slices = f" ({tag or 'all data'} vs reference {reference_tag or 'all data'})" if tag or reference_tag else ""
    for r in runs:
        current: dict[str, Any] = {"run": r}
        if tag is not None:
            current["tag"] = tag
        df = _guard(label, tr.drift, baseline=baseline, current=current, config=cfg)
        for rec in df.to_dict("records"):
            status = rec.get("status")
            if status is None or (isinstance(status, float) and math.isnan(status)):
                status = "WARN" if rec.get("flagged") else "PASS"
            rows.append(
                {
                    "rule": "drift",
                    "status": str(status).upper(),
                    "run": r,
                    "layer": rec.get("layer"),
                    "metric": "js",
                    "value": rec.get("js"),
                    "threshold": rec.get("threshold"),
                    "message": (rec.get("message") or _drift_message(rec)) + slices,
                }
            )
    return normalize_findings(pd.DataFrame(rows, columns=COLUMNS) if rows else None)


def _drift_message(rec: Mapping[str, Any]) -> str:
    """A one-line drift message when the analysis gave none."""
    return f"layer {rec.get('layer')}: JS distance {_fmt(rec.get('js'))} vs threshold {_fmt(rec.get('threshold'))}"


def regressions(
    baseline_con: Any,
    baseline: Selection,
    current_con: Any,
    current: Selection,
    config: HealthConfig | str | os.PathLike[str] | None = None,
) -> pd.DataFrame:
    """Regression findings of `current` (rows of current_con) against `baseline` (rows of baseline_con).

    A pure function of (connections, selections, config), like health and drift: the health rules run on each
    side, then `regression_findings` compares them.
    """
    from ..analysis.health import health
    from ..config import as_config

    cfg = as_config(config)
    base = normalize_findings(health(baseline_con, baseline, cfg))
    cur = normalize_findings(health(current_con, current, cfg))
    return regression_findings(base, cur)


def regression_findings(baseline: pd.DataFrame, current: pd.DataFrame) -> pd.DataFrame:
    """Findings for what got worse since the baseline: experts that died, load CV past its threshold, non-finite routing.

    Both inputs are health findings; runs are pooled per side (a baseline is usually one run), layers and
    experts are matched by index.
    """
    rows: list[dict[str, Any]] = []
    rows += _regress_dead(baseline, current)
    rows += _regress_threshold(baseline, current, "load_cv", "regression_load_cv", "load CV")
    rows += _regress_threshold(baseline, current, "nonfinite", "regression_nonfinite", "non-finite routing")
    return normalize_findings(pd.DataFrame(rows, columns=COLUMNS) if rows else None)


def _rule_rows(df: pd.DataFrame, rule: str) -> pd.DataFrame:
    """Rows of one health rule that were evaluated (PASS/WARN/FAIL; SKIP and ERROR say nothing about health)."""
    return df[(df["rule"] == rule) & df["status"].isin(["PASS", "WARN", "FAIL"])]


def _dead_sets(df: pd.DataFrame) -> dict[tuple[str, int], set[int]]:
    """(run, layer) -> experts a dead_expert FAIL named in any window, for every evaluated run × layer."""
    out: dict[tuple[str, int], set[int]] = {}
    for r in _rule_rows(df, "dead_expert").itertuples():
        if _int_or_none(r.layer) is None:
            continue
        dead = out.setdefault((str(r.run), int(r.layer)), set())
        if r.status == "FAIL":
            ids = _clean(r.expert)
            for e in ids if isinstance(ids, list) else [ids]:
                if _int_or_none(e) is not None:
                    dead.add(int(e))
    return out


def _regress_dead(baseline: pd.DataFrame, current: pd.DataFrame) -> list[dict[str, Any]]:
    """Per run × layer, experts alive in every baseline window (of every baseline run) and dead in some window now."""
    base = _dead_sets(baseline)
    base_layers = {layer for _, layer in base}
    dead_before: set[tuple[int, int]] = {(layer, e) for (_, layer), ids in base.items() for e in ids}
    cur_rows = _rule_rows(current, "dead_expert")
    rows = []
    for (run, layer), ids in _dead_sets(current).items():
        if layer not in base_layers:
            continue  # a layer the baseline never evaluated: nothing to regress from
        new = sorted(e for e in ids if (layer, e) not in dead_before)
        if not new:
            continue
        # The window where the lowest utilization shows is the one to point at.
        fails = cur_rows[(cur_rows["run"] == run) & (cur_rows["layer"] == layer) & (cur_rows["status"] == "FAIL")]
        worst = fails.sort_values("value", kind="stable").iloc[0]
        rows.append(
            {
                "rule": "regression_dead_expert",
                "status": "FAIL",
                "run": run,
                "layer": layer,
                "expert": new,
                "window": worst["window"],
                "window_start": worst["window_start"],
                "window_end": worst["window_end"],
                "metric": worst["metric"],
                "value": worst["value"],
                "threshold": worst["threshold"],
                "message": f"layer {layer}: expert{'s' if len(new) > 1 else ''} {', '.join(map(str, new))} "
                f"alive in the reference, dead now (utilization down to {_fmt(worst['value'])} "
                f"< {_fmt(worst['threshold'])})",
            }
        )
    return rows


def _regress_threshold(
    baseline: pd.DataFrame, current: pd.DataFrame, rule: str, new_rule: str, what: str
) -> list[dict[str, Any]]:
    """A layer whose rule passed in every baseline window and is WARN/FAIL now."""
    base = _rule_rows(baseline, rule)
    cur = _rule_rows(current, rule)
    if cur.empty:
        return []
    bad_before = {_int_or_none(r.layer) for r in base.itertuples() if r.status != "PASS"}
    base_layers = {_int_or_none(r.layer) for r in base.itertuples()}
    rows = []
    done: set[tuple[str, int]] = set()
    # Worst window first, so the finding points at the highest value of each layer.
    for r in cur.sort_values("value", ascending=False, kind="stable").itertuples():
        layer = _int_or_none(r.layer)
        if r.status == "PASS" or layer is None:
            continue
        # Only a layer the baseline evaluated and found healthy can regress.
        if layer not in base_layers or layer in bad_before or (r.run, layer) in done:
            continue
        done.add((r.run, layer))
        base_vals = base[base["layer"] == layer]["value"]
        before = _fmt(base_vals.max()) if not base_vals.empty else "n/a"
        rows.append(
            {
                "rule": new_rule,
                "status": r.status,
                "run": r.run,
                "layer": layer,
                "window": r.window,
                "window_start": r.window_start,
                "window_end": r.window_end,
                "metric": r.metric,
                "value": r.value,
                "threshold": r.threshold,
                "message": f"layer {layer}: {what} {_fmt(r.value)} past {_fmt(r.threshold)} (reference: {before})",
            }
        )
    return rows


# --------------------------------------------------------------------------------------------- values


def _clean(value: Any) -> Any:
    """A JSON-safe Python scalar: NaN/Inf/NA become None, numpy scalars become int/float/str."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "ndarray":
        # Health rules put several experts in one finding (e.g. every dead expert of a layer).
        return [_clean(v) for v in list(value)]
    try:
        if pd.isna(value):
            return None
    except (TypeError, ValueError):
        pass
    if hasattr(value, "item") and not isinstance(value, (list, dict, str)):
        try:
            value = value.item()
        except (ValueError, AttributeError):
            pass
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (pd.Timestamp,)):
        return value.isoformat()
    return value


def _jsonable(obj: Any) -> Any:
    """Recursively make a structure JSON-safe (no NaN, no numpy, paths as strings)."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return str(obj)
    return _clean(obj)


def _int_or_none(value: Any) -> int | None:
    v = _clean(value)
    if v is None:
        return None
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def _fmt(value: Any) -> str:
    """A short human rendering of a metric value."""
    v = _clean(value)
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
