"""Online routing alerts: the collapse rules evaluated on each flushed window while training runs.

The recorder calls `evaluate_flush` once per flush with the host copy of the window's counts, so the
rules cost nothing per forward. Each rule looks at one layer over every step and tag of the window
(a window is `flush_every` steps). Thresholds follow the design's metric catalogue; when
`moescope.config.HealthConfig` is importable its values are used, so online alerts and
`moescope check` agree.

A WARN/FAIL alert is reported four ways: a `MoEAlertWarning`, a `logging.getLogger("moescope")`
record, `recorder.alerts`, and the `on_alert(alert)` callback. With `raise_on="fail"` (or "warn")
the recorder is closed first (data on disk, manifest final, hooks detached) and then
`RoutingCollapseError` is raised, so a training loop stops and leaves no hooks behind, whether or
not it used the context manager.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from ..integrations._scalars import load_scalars

if TYPE_CHECKING:  # pragma: no cover
    from .recorder import Recorder

logger = logging.getLogger("moescope")

_I_TOKENS = 0
_I_NONFINITE = 6


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

    rule: str  # dead_expert | load_cv | maxvio | collapse | nonfinite
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


@dataclass(frozen=True)
class AlertRules:
    """Thresholds of the online rules (defaults: the design's catalogue, as in moescope.config.HealthConfig)."""

    dead_utilization: float = 0.05  # FAIL when N·f_e is below this for an expert
    load_cv_warn: float = 0.5  # WARN when std(c)/mean(c) exceeds this
    load_cv_fail: float | None = None  # FAIL above this (off by default)
    maxvio_warn: float = 1.0  # WARN when max(c)/mean(c) − 1 exceeds this
    maxvio_fail: float | None = 3.0  # FAIL when it exceeds this
    collapse_share: float = 0.9  # FAIL when the m busiest experts carry this share with m ≤ max(k, N/4)
    collapse_fraction: float = 0.25  # the N/4 above
    min_expected: float = 50.0  # skip load rules while kT/N, the expected assignments per expert, is below this
    nonfinite_fail_above: int = 0  # FAIL when more tokens than this had NaN/Inf router logits
    disabled: frozenset[str] = field(default_factory=frozenset)  # rule names to skip

    @classmethod
    def from_any(cls, value: Any) -> AlertRules:
        """Rules from None (project defaults), an AlertRules, a mapping of its fields, a HealthConfig, or a moescope.toml path."""
        if value is None:
            return default_rules()
        if isinstance(value, AlertRules):
            return value
        if isinstance(value, (str, os.PathLike)):
            from ..config import load_config

            return from_health_config(load_config(value))
        if isinstance(value, Mapping):
            names = {f.name for f in fields(cls)}
            unknown = set(value) - names
            if unknown:
                raise ValueError(f"alert_rules: unknown field(s) {sorted(unknown)}; known: {sorted(names)}")
            kw = dict(value)
            if "disabled" in kw:
                kw["disabled"] = frozenset(kw["disabled"])
            return replace(default_rules(), **kw)
        if hasattr(value, "dead_expert") and hasattr(value, "maxvio"):
            return from_health_config(value)
        raise TypeError(
            f"alert_rules: expected None, AlertRules, a mapping, a HealthConfig or a moescope.toml path, got {type(value).__name__}"
        )


def from_health_config(cfg: Any) -> AlertRules:
    """The online thresholds of a moescope.config.HealthConfig, so alerts and `moescope check` agree."""
    disabled = frozenset(
        name
        for name in ("dead_expert", "load_cv", "maxvio", "collapse", "nonfinite")
        if not getattr(getattr(cfg, name, None), "enabled", True)
    )
    return AlertRules(
        dead_utilization=float(cfg.dead_expert.fail_below),
        load_cv_warn=float(cfg.load_cv.warn_above),
        load_cv_fail=None if cfg.load_cv.fail_above is None else float(cfg.load_cv.fail_above),
        maxvio_warn=float(cfg.maxvio.warn_above),
        maxvio_fail=None if cfg.maxvio.fail_above is None else float(cfg.maxvio.fail_above),
        collapse_share=float(cfg.collapse.share),
        min_expected=float(cfg.min_tokens),
        nonfinite_fail_above=int(cfg.nonfinite.fail_above),
        disabled=disabled,
    )


def default_rules() -> AlertRules:
    """The project-wide thresholds: moescope.config.HealthConfig() when importable, else the built-ins."""
    try:
        from ..config import HealthConfig
    except ImportError:  # a trimmed install without the analysis side still alerts
        return AlertRules()
    return from_health_config(HealthConfig())


def evaluate_window(
    load: Mapping[int, np.ndarray],
    nonfinite: Mapping[int, int],
    top_k: Mapping[int, int],
    step_start: int,
    step_end: int,
    rules: AlertRules,
    *,
    run: str = "",
    rank: int = 0,
    modules: Mapping[int, str] | None = None,
) -> list[Alert]:
    """WARN/FAIL alerts of one window from per-layer assignment counts [E] and non-finite token counts."""
    out: list[Alert] = []
    modules = modules or {}
    span = f"steps {step_start}–{step_end}" if step_end != step_start else f"step {step_start}"

    def add(
        rule: str, status: str, layer: int, experts: Sequence[int], value: float, threshold: float, what: str
    ) -> None:
        mod = modules.get(layer, "")
        where = f"layer {layer}" + (f" ({mod})" if mod else "")
        who = f" run {run!r}" if run else ""
        msg = f"moescope {status}: {where}: {what} over {span} [{rule}]{who} rank {rank}"
        out.append(
            Alert(
                rule,
                status,
                layer,
                tuple(int(e) for e in experts),
                step_start,
                step_end,
                float(value),
                float(threshold),
                msg,
                run,
                rank,
                mod,
            )
        )

    for layer in sorted(set(load) | set(nonfinite)):
        bad = int(nonfinite.get(layer, 0))
        if "nonfinite" not in rules.disabled and bad > rules.nonfinite_fail_above:
            add(
                "nonfinite",
                "FAIL",
                layer,
                (),
                bad,
                rules.nonfinite_fail_above,
                f"{bad} token(s) with NaN/Inf router logits",
            )
        if layer not in load:
            continue
        c = np.asarray(load[layer], dtype=np.float64)
        n = int(c.shape[0])
        k = max(int(top_k.get(layer, 1)), 1)
        total = float(c.sum())
        # kT/N with T = Σc/k tokens is Σc/N: too few assignments make every load rule noise, so skip them.
        if n == 0 or total / n < rules.min_expected:
            logger.debug(
                "moescope: layer %d %s: %.1f expected assignments per expert < %g, load rules skipped",
                layer,
                span,
                total / max(n, 1),
                rules.min_expected,
            )
            continue
        s = load_scalars(layer, c, rules.dead_utilization)
        util = n * c / total
        if "dead_expert" not in rules.disabled:
            dead = np.flatnonzero(util < rules.dead_utilization)
            if dead.size:
                add(
                    "dead_expert",
                    "FAIL",
                    layer,
                    dead,
                    float(util[dead].min()),
                    rules.dead_utilization,
                    f"expert(s) {dead.tolist()} dead (N·f_e {_fmt(util[dead])} < {rules.dead_utilization:g})",
                )
        order = np.argsort(-c, kind="stable")
        if "collapse" not in rules.disabled:
            share = np.cumsum(c[order]) / total
            m = int(np.searchsorted(share, rules.collapse_share - 1e-12) + 1)
            m_max = max(k, int(math.floor(n * rules.collapse_fraction)))
            if m <= m_max and m < n:
                top = order[:m]
                add(
                    "collapse",
                    "FAIL",
                    layer,
                    top,
                    float(share[m - 1]),
                    rules.collapse_share,
                    f"routing collapsed: expert(s) {top.tolist()} carry {share[m - 1]:.1%} of assignments "
                    f"(≥ {rules.collapse_share:.0%} on {m} ≤ max(k={k}, N/4={n * rules.collapse_fraction:g}) of {n} experts)",
                )
        if "maxvio" not in rules.disabled and s.maxvio > rules.maxvio_warn:
            fail = rules.maxvio_fail is not None and s.maxvio > rules.maxvio_fail
            limit = rules.maxvio_fail if fail and rules.maxvio_fail is not None else rules.maxvio_warn
            add(
                "maxvio",
                "FAIL" if fail else "WARN",
                layer,
                (int(order[0]),),
                s.maxvio,
                limit,
                f"expert {int(order[0])} overloaded: MaxVio {s.maxvio:.2f} > {limit:g}",
            )
        if "load_cv" not in rules.disabled and s.load_cv > rules.load_cv_warn:
            fail = rules.load_cv_fail is not None and s.load_cv > rules.load_cv_fail
            limit = rules.load_cv_fail if fail and rules.load_cv_fail is not None else rules.load_cv_warn
            add(
                "load_cv",
                "FAIL" if fail else "WARN",
                layer,
                order[:k].tolist(),
                s.load_cv,
                limit,
                f"load imbalanced: CV {s.load_cv:.2f} > {limit:g} (busiest {order[:k].tolist()})",
            )
    return out


def _fmt(values: np.ndarray) -> str:
    """A short list of utilizations for a message."""
    return "[" + ", ".join(f"{v:.3f}" for v in values[:8]) + (", …]" if len(values) > 8 else "]")


def evaluate_flush(
    recorder: Recorder,
    load_host: list[tuple[int, str, int, np.ndarray]],
    stats_host: list[tuple[int, str, int, np.ndarray]],
) -> list[Alert]:
    """Run the rules on one flush (called by the recorder), report the alerts, and raise per `raise_on`."""
    if not load_host and not stats_host:
        return []
    rules = AlertRules.from_any(recorder.alert_rules)
    load: dict[int, np.ndarray] = {}
    for _step, _tag, layer, arr in load_host:  # arr [E, 3]: assignments, prob_sum, weight_sum
        col = np.asarray(arr[:, 0], dtype=np.float64)
        load[layer] = load[layer] + col if layer in load else col.copy()
    nonfinite: dict[int, int] = {}
    for _step, _tag, layer, st in stats_host:  # st [8]
        nonfinite[layer] = nonfinite.get(layer, 0) + int(round(float(st[_I_NONFINITE])))
    steps = [s for s, *_ in load_host] or [s for s, *_ in stats_host]
    infos = {li.layer: li for li in recorder.layers}
    alerts = evaluate_window(
        load,
        nonfinite,
        {layer: li.top_k for layer, li in infos.items()},
        min(steps),
        max(steps),
        rules,
        run=recorder.run,
        rank=recorder.rank,
        modules={layer: li.module for layer, li in infos.items()},
    )
    for a in alerts:
        # stacklevel 2 points the warning at the recorder's flush, the same place for every alert.
        warnings.warn(MoEAlertWarning(a.message), stacklevel=2)
        logger.log(logging.ERROR if a.status == "FAIL" else logging.WARNING, a.message)
        recorder.alerts.append(a)
        if recorder.on_alert is not None:
            recorder.on_alert(a)
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
