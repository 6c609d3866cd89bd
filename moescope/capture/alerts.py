"""Online routing alerts: the registry's window rules evaluated on each flushed window while training runs.

The recorder calls `evaluate_flush` once per flush with the host copy of the window's counts, so the
rules cost nothing per forward. Each rule looks at one layer over every step and tag of the window (a
window is `flush_every` steps). The rules, thresholds and verdicts are those of `moescope check`: the same
`moescope.analysis.rules` evaluation on the same metric definitions (`rules.cell_values`, the numpy twin of
analyses/load_metrics.sql), configured by the same `HealthConfig` / moescope.toml. Rules that need a whole
run (z_loss growth since the first window) or snapshots (clones) run offline only.

A WARN/FAIL alert is reported once: by `on_alert(alert)` when you pass a callback, else as one
`MoEAlertWarning` pointing at your line (the `rec.step = ...` or forward call that flushed). It also goes
to `recorder.alerts`, and to `logging.getLogger("moescope")` when logging is configured (no last-resort
echo). With `raise_on="fail"` (or "warn") the recorder is closed first (data on disk, manifest final,
hooks detached) and then `RoutingCollapseError` is raised, so a training loop stops and leaves no hooks
behind, whether or not it used the context manager.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..analysis.rules import Cell, Status, cell_from_counts, rules
from ..config import ConfigError, HealthConfig, as_config, config_from_dict
from ..format.schema import ROUTER_STATS

logger = logging.getLogger("moescope")

#: The recorder's per-layer stats vector follows the router_stats columns after the key columns.
_STATS = [n for n in ROUTER_STATS.names if n not in ("run", "rank", "step", "tag", "layer")]
_I_TOKENS, _I_ENTROPY, _I_LSE_SQ, _I_NONFINITE = (_STATS.index(n) for n in ("tokens", "entropy_sum", "lse_sq_sum", "nonfinite"))
#: Files whose frames a warning skips, so it points at the user's line (the package and torch's module plumbing).
_SKIP_DIRS = (str(Path(__file__).resolve().parents[1]) + os.sep,)

#: Old name: the online rules are configured by the same HealthConfig as `moescope check`.
AlertRules = HealthConfig


class MoEAlertWarning(UserWarning):
    """A routing alert (WARN or FAIL) raised as a Python warning while recording."""


class RoutingCollapseError(RuntimeError):
    """Recording stopped because a routing alert reached `raise_on`; `.alerts` holds the window's alerts."""

    def __init__(self, message: str, alerts: Sequence[Alert] = ()) -> None:
        super().__init__(message)
        self.alerts = list(alerts)


@dataclass(frozen=True)
class Alert:
    """One rule's verdict for one layer over one flushed window."""

    rule: str  # a window rule of the registry: dead_expert | load_cv | maxvio | collapse | nonfinite | overconfidence
    status: str  # WARN | FAIL
    layer: int
    experts: tuple[int, ...]
    step_start: int
    step_end: int
    value: float
    threshold: float
    message: str
    run: str = ""
    rank: int = 0
    module: str = ""


class _Flushing(Protocol):
    """What evaluate_flush reads from the recorder (a Protocol, so this module never imports the recorder)."""

    alert_rules: Any
    alerts: list[Any]
    on_alert: Any
    raise_on: str | None
    run: str
    rank: int
    run_dir: Any
    layers: Sequence[Any]

    def close(self) -> None: ...


def resolve_rules(value: Any) -> HealthConfig:
    """The online rules' config from None (defaults), a HealthConfig, a moescope.toml path, or a mapping.

    A mapping is shaped like moescope.toml ({"health": {...}, "rules": {"maxvio": {"fail_above": 5}}}); two
    shortcuts are accepted too: "min_expected" (= health.min_tokens) and "disabled" (rule names to switch off).
    """
    if isinstance(value, (str, os.PathLike)):
        return _config_file(Path(value))
    if value is None or isinstance(value, HealthConfig):
        return as_config(value)
    if isinstance(value, Mapping):
        data = {k: v for k, v in value.items() if k not in ("min_expected", "disabled")}
        if "min_expected" in value:
            data = {**data, "health": {**dict(data.get("health") or {}), "min_tokens": value["min_expected"]}}
        rules_table = {k: dict(v) for k, v in (data.get("rules") or {}).items()}
        for name in value.get("disabled", ()):
            rules_table.setdefault(name, {})["enabled"] = False
        if rules_table:
            data["rules"] = rules_table
        try:
            return config_from_dict(data, "alert_rules")
        except ConfigError as e:
            raise ValueError(str(e)) from None
    raise TypeError(
        f"alert_rules: expected None, a HealthConfig, a moescope.toml path or a mapping, got {type(value).__name__}"
    )


#: moescope.toml files read by the alerts, by (path, mtime, size): a flush does not re-read an unchanged file.
_FILES: dict[tuple[str, int, int], HealthConfig] = {}


def _config_file(path: Path) -> HealthConfig:
    try:
        st = path.stat()
    except OSError:
        return as_config(path)  # load_config says what is wrong with it
    key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
    if key not in _FILES:
        _FILES.clear()  # one config per training run: keep only the latest
        _FILES[key] = as_config(path)
    return _FILES[key]


def default_rules() -> HealthConfig:
    """The project-wide defaults (those of `moescope check`)."""
    return HealthConfig()


def _layer_cell(
    run: str, layer: int, span: tuple[int, int], counts: np.ndarray | None, top_k: int, n_experts: int | None,
    stats: Mapping[str, float] | None,
) -> Cell:
    st = dict(stats or {})
    router = {"nonfinite": st.get("nonfinite"), "entropy_sum": st.get("entropy_sum"), "lse_sq_sum": st.get("lse_sq_sum")}
    if counts is not None:
        return cell_from_counts(run, layer, span, counts, top_k, st.get("tokens"), **router)
    # Router stats without expert_load: only the router rules can judge; the load rules SKIP.
    t = st.get("tokens") or 0.0
    n = int(n_experts or 0)
    values = {"tokens": t, "nonfinite": router["nonfinite"], "z_loss": None,
              "router_entropy": router["entropy_sum"] / (t * np.log(n)) if t and n > 1 and router["entropy_sum"] is not None else None}
    return Cell(run, layer, span[0], span[1], n, top_k, values)


def evaluate_window(
    load: Mapping[int, np.ndarray],
    nonfinite: Mapping[int, int],
    top_k: Mapping[int, int],
    step_start: int,
    step_end: int,
    rules_config: Any = None,
    *,
    run: str = "",
    rank: int = 0,
    modules: Mapping[int, str] | None = None,
    router: Mapping[int, Mapping[str, float]] | None = None,
    n_experts: Mapping[int, int] | None = None,
) -> list[Alert]:
    """WARN/FAIL alerts of one window from per-layer assignment counts [E] and router stats.

    `router[layer]` holds the window's summed router_stats (tokens, entropy_sum, lse_sq_sum, nonfinite);
    `nonfinite` is the older way to pass the last one. Without router tokens T = Σc/k.
    """
    cfg = resolve_rules(rules_config)
    modules = modules or {}
    span = f"steps {step_start}–{step_end}" if step_end != step_start else f"step {step_start}"
    out: list[Alert] = []
    for layer in sorted(set(load) | set(nonfinite) | set(router or {})):
        st = dict((router or {}).get(layer) or {})
        if layer in nonfinite:
            st.setdefault("nonfinite", float(nonfinite[layer]))
        st.setdefault("nonfinite", 0.0)
        k = max(int(top_k.get(layer, 1)), 1)
        cell = _layer_cell(run, layer, (step_start, step_end), load.get(layer), k, (n_experts or {}).get(layer), st)
        mod = modules.get(layer, "")
        where = f"layer {layer}" + (f" ({mod})" if mod else "")
        for spec in rules("window", online=True):
            rc = cfg.rule(spec.name)
            if not rc.enabled:
                continue
            f = spec.evaluate(rc, cell, cfg.min_tokens)
            if f["status"] not in (Status.WARN, Status.FAIL):
                if f["status"] == Status.SKIP:
                    logger.debug("moescope: %s %s skipped: %s", spec.name, span, f["message"])
                continue
            what = f["message"].split(": ", 1)[1] if f["message"].startswith(f"layer {layer}: ") else f["message"]
            who = f" run {run!r}" if run else ""
            msg = f"moescope {f['status']}: {where}: {what} over {span} [{spec.name}]{who} rank {rank}"
            experts = f["expert"] if isinstance(f["expert"], list) else ()
            out.append(Alert(spec.name, f["status"], layer, tuple(int(e) for e in experts), step_start, step_end,
                             float(f["value"] if f["value"] is not None else np.nan),
                             float(f["threshold"] if f["threshold"] is not None else np.nan), msg, run, rank, mod))
    return out


def _stacklevel() -> int:
    """The warnings stacklevel of the first frame outside moescope (and torch's module call plumbing)."""
    frame = sys._getframe(1)
    level = 1
    torch_dir = None
    if "torch" in sys.modules and getattr(sys.modules["torch"], "__file__", None):
        torch_dir = str(Path(sys.modules["torch"].__file__).resolve().parent) + os.sep  # type: ignore[arg-type]
    while frame is not None:
        name = frame.f_code.co_filename
        inside = name.startswith(_SKIP_DIRS) or (torch_dir is not None and name.startswith(torch_dir))
        if not inside:
            return level
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    return 1


def evaluate_flush(
    recorder: _Flushing,
    load_host: list[tuple[int, str, int, np.ndarray]],
    stats_host: list[tuple[int, str, int, np.ndarray]],
) -> list[Alert]:
    """Run the rules on one flush (called by the recorder), report the alerts, and raise per `raise_on`."""
    if not load_host and not stats_host:
        return []
    cfg = resolve_rules(recorder.alert_rules)
    load: dict[int, np.ndarray] = {}
    for _step, _tag, layer, arr in load_host:  # arr [E, 3]: assignments, prob_sum, weight_sum
        col = np.asarray(arr[:, 0], dtype=np.float64)
        load[layer] = load[layer] + col if layer in load else col.copy()
    router: dict[int, dict[str, float]] = {}
    for _step, _tag, layer, st in stats_host:  # st [8] in router_stats column order
        acc = router.setdefault(layer, {"tokens": 0.0, "entropy_sum": 0.0, "lse_sq_sum": 0.0, "nonfinite": 0.0})
        acc["tokens"] += float(st[_I_TOKENS])
        acc["entropy_sum"] += float(st[_I_ENTROPY])
        acc["lse_sq_sum"] += float(st[_I_LSE_SQ])
        acc["nonfinite"] += float(st[_I_NONFINITE])  # NaN (stats=False: not measured) stays NaN: the rule SKIPs
    steps = [s for s, *_ in load_host] or [s for s, *_ in stats_host]
    infos = {li.layer: li for li in recorder.layers}
    alerts = evaluate_window(
        load, {}, {layer: li.top_k for layer, li in infos.items()}, min(steps), max(steps), cfg,
        run=recorder.run, rank=recorder.rank, modules={layer: li.module for layer, li in infos.items()},
        router=router, n_experts={layer: li.n_experts for layer, li in infos.items()},
    )
    level = _stacklevel() if alerts else 1
    for a in alerts:
        recorder.alerts.append(a)
        if logger.hasHandlers():  # only where logging is configured: no last-resort echo of the warning
            logger.log(logging.ERROR if a.status == "FAIL" else logging.WARNING, a.message)
        if recorder.on_alert is not None:
            recorder.on_alert(a)  # the callback replaces the default report
        else:
            warnings.warn(MoEAlertWarning(a.message), stacklevel=level)
    trigger = {"fail": ("FAIL",), "warn": ("FAIL", "WARN")}.get(recorder.raise_on or "", ())
    hits = [a for a in alerts if a.status in trigger]
    if hits:
        # Close before raising: the window is already queued, so the trace stays complete up to it, the
        # manifest is final and no hook is left on the model (an HF Trainer has no exception hook to do it).
        recorder.close()
        head = hits[0].message
        more = f" (+{len(hits) - 1} more alert(s))" if len(hits) > 1 else ""
        raise RoutingCollapseError(
            f"{head}{more}; recording stopped (raise_on={recorder.raise_on!r}), trace kept in {recorder.run_dir}",
            hits,
        )
    return alerts
