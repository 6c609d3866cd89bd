"""What every health rule shares: the one `Status` order, the findings schema, config ranges and the registry.

Pure Python and numpy (no duckdb, no torch), so the online alerts in `moescope.capture` evaluate the same
rules on each flush that `Trace.health()` evaluates on a trace.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any

import numpy as np

#: What a rule accepts for `window`: None (inherit [health].window), "thirds", "all", or a width in steps.
Window = int | str | None


class Status(str, Enum):
    """A finding's verdict, ordered from best to worst: PASS < SKIP < WARN < FAIL < ERROR.

    ERROR is the worst because a rule that could not run proves nothing: it may hide a FAIL, and a person
    must look at it first. SKIP ranks above PASS because "not judged" must never read as "healthy".
    Text, JSON, JUnit, report and the dashboard all sort and summarise by this one order.
    """

    PASS = "PASS"
    SKIP = "SKIP"
    WARN = "WARN"
    FAIL = "FAIL"
    ERROR = "ERROR"

    @property
    def rank(self) -> int:
        """0 for PASS up to 4 for ERROR."""
        return _RANK[self.value]

    def __lt__(self, other: object) -> bool:  # type: ignore[override]
        return self.rank < Status(other).rank

    def __le__(self, other: object) -> bool:  # type: ignore[override]
        return self.rank <= Status(other).rank

    def __gt__(self, other: object) -> bool:  # type: ignore[override]
        return self.rank > Status(other).rank

    def __ge__(self, other: object) -> bool:  # type: ignore[override]
        return self.rank >= Status(other).rank

    def __str__(self) -> str:
        return self.value


_RANK = {"PASS": 0, "SKIP": 1, "WARN": 2, "FAIL": 3, "ERROR": 4}
#: Statuses best to worst (the order of `Status`); reverse it to list what broke first.
STATUS_ORDER: tuple[str, ...] = tuple(s.value for s in Status)


def severity(status: Any) -> int:
    """The rank of a status string (PASS 0 … ERROR 4); an unknown status ranks as ERROR."""
    return _RANK.get(str(status).upper(), _RANK["ERROR"])


def worst(statuses: Iterable[Any], default: str = "PASS") -> str:
    """The worst of some statuses by the `Status` order (`default` when there are none)."""
    out, rank = default, -1
    for s in statuses:
        r = severity(s)
        if r > rank:
            out, rank = str(s).upper(), r
    return out


#: The columns of a findings frame, in order: what health, check, report and the dashboard read.
COLUMNS: list[str] = [
    "rule", "status", "run", "layer", "expert", "window", "window_start", "window_end",
    "metric", "value", "threshold", "message",
]


def window_label(start: Any, end: Any) -> str:
    """A person's label for an inclusive step window, e.g. 'steps 200–299'."""
    if start is None or end is None:
        return ""
    try:
        s, e = int(start), int(end)
    except (TypeError, ValueError):
        return ""
    return f"step {s}" if s == e else f"steps {s}–{e}"


def as_float(x: Any) -> float | None:
    """A float or None (NaN, NULL and non-numbers become None)."""
    if x is None:
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


# --------------------------------------------------------------------------------------------- cells


@dataclass
class Cell:
    """What a window rule judges: one run × layer × step window, its metric values and its per-expert load.

    `values` holds the columns of the load_metrics analysis (cv, maxvio, min_utilization, top_m_share,
    expected_per_expert, router_entropy, z_loss, nonfinite, tokens, ...): from SQL for `Trace.health()`,
    from `cell_values` (numpy) for the online alerts. `assignments` and `utilization` are [N] by expert id
    (None where the cell has no expert_load rows).
    """

    run: str
    layer: int
    window_start: int | None
    window_end: int | None
    n_experts: int
    top_k: int
    values: Mapping[str, Any]
    assignments: np.ndarray | None = None
    utilization: np.ndarray | None = None

    def get(self, name: str) -> float | None:
        """One metric value as a float, None when absent or NaN."""
        return as_float(self.values.get(name))

    @property
    def where(self) -> str:
        """'layer L', how a finding's message starts."""
        return f"layer {self.layer}"

    def busiest(self, m: int) -> list[int]:
        """The ids of the m busiest experts (ties: lower id first)."""
        if self.assignments is None:
            return []
        order = np.lexsort((np.arange(len(self.assignments)), -self.assignments))
        return [int(e) for e in order[:m]]


def finding(
    rule: str, status: Status | str, cell: Cell | Mapping[str, Any], metric: str, value: Any, threshold: Any,
    message: str, expert: Any = None,
) -> dict[str, Any]:
    """One row of a findings frame (see COLUMNS) about `cell`."""
    get = (lambda k: getattr(cell, k, None)) if isinstance(cell, Cell) else cell.get
    start, end, layer = get("window_start"), get("window_end"), get("layer")
    return {
        "rule": rule,
        "status": Status(status).value,
        "run": get("run"),
        "layer": None if layer is None else int(layer),
        "expert": expert,
        "window": window_label(start, end),
        "window_start": None if start is None else int(start),
        "window_end": None if end is None else int(end),
        "metric": metric,
        "value": as_float(value),
        "threshold": as_float(threshold),
        "message": message,
    }


def experts_text(ids: list[int]) -> str:
    """'2, 3, 7' (at most 8 shown)."""
    shown = ", ".join(str(i) for i in ids[:8])
    return shown + (f" … (+{len(ids) - 8})" if len(ids) > 8 else "")


# --------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class Range:
    """The values a config number may take: [lo, hi] with open or closed ends; None = unbounded."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    optional: bool = False  # None allowed (the limit is off)
    integer: bool = False

    def contains(self, v: float) -> bool:
        """Whether a finite value lies in the range."""
        if self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo)):
            return False
        if self.hi is not None and (v > self.hi or (self.hi_open and v == self.hi)):
            return False
        return True

    def describe(self) -> str:
        """'[0, 1]', '(0, 1)', '≥ 0', '> 0', 'any finite number'."""
        kind = "an integer" if self.integer else "a number"
        if self.lo is not None and self.hi is not None:
            return f"{kind} in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{kind} {'>' if self.lo_open else '≥'} {self.lo:g}"
        if self.hi is not None:
            return f"{kind} {'<' if self.hi_open else '≤'} {self.hi:g}"
        return f"any finite {kind[2:] if kind.startswith('a ') else kind}"


def limit(default: Any, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
          hi_open: bool = False, optional: bool = False, integer: bool = False, doc: str = "") -> Any:
    """A config field with the range its values must lie in (checked when a config is loaded)."""
    rng = Range(lo, hi, lo_open, hi_open, optional, integer)
    return field(default=default, metadata={"range": rng, "doc": doc})


def choices(default: list[str], allowed: Iterable[str], doc: str = "") -> Any:
    """A list-of-strings config field whose items must be among `allowed` (at least one item)."""
    return field(default_factory=lambda: list(default), metadata={"choices": tuple(allowed), "doc": doc})


class RangeError(ValueError):
    """A config value outside its allowed range; the message is one line naming the key and the range."""


def check_ranges(obj: Any, where: str) -> None:
    """Raise RangeError for the first field of a config dataclass outside its range or choices."""
    for f in fields(obj):
        v = getattr(obj, f.name)
        key = f"{where}.{f.name}" if where else f.name
        rng: Range | None = f.metadata.get("range")
        if rng is not None:
            if v is None:
                if rng.optional:
                    continue
                raise RangeError(f"{key} must be set (allowed: {rng.describe()})")
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise RangeError(f"{key} = {v!r}: expected {rng.describe()}")
            if rng.integer and not isinstance(v, int):
                raise RangeError(f"{key} = {v!r}: expected {rng.describe()}")
            if not math.isfinite(v):
                raise RangeError(f"{key} = {v!r} is not a finite number (allowed: {rng.describe()})")
            if not rng.contains(v):
                raise RangeError(f"{key} = {v!r} is out of range (allowed: {rng.describe()})")
        allowed = f.metadata.get("choices")
        if allowed is not None:
            if not isinstance(v, list) or not v:
                raise RangeError(f"{key} must be a non-empty list of {', '.join(allowed)}")
            bad = [x for x in v if x not in allowed]
            if bad:
                raise RangeError(f"{key}: unknown value {bad[0]!r} (allowed: {', '.join(allowed)})")
    extra = getattr(obj, "check", None)
    if callable(extra):
        problem = extra()
        if problem:
            raise RangeError(f"{where}: {problem}" if where else problem)


@dataclass
class RuleConfig:
    """Fields every rule has: enabled, and a step window overriding [health].window (None = inherit)."""

    enabled: bool = True
    window: Window = None

    def check(self) -> str | None:
        """A cross-field problem (e.g. a FAIL limit below the WARN limit), or None."""
        warn, fail = getattr(self, "warn_above", None), getattr(self, "fail_above", None)
        if isinstance(warn, (int, float)) and isinstance(fail, (int, float)) and fail < warn:
            return f"fail_above = {fail:g} is below warn_above = {warn:g} (a FAIL limit must be ≥ the WARN limit)"
        return None


# --------------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class RuleSpec:
    """One health rule, defined once: its name, config dataclass, the metric it reads and its evaluation.

    scope "window": `evaluate(config, cell, min_tokens) -> finding row` for one run × layer × window (the
      online alerts evaluate these on each flush too);
    scope "series": `evaluate(config, cells) -> rows` over the windows of one run × layer in step order;
    scope "snapshot": `evaluate(config, frame, runs) -> rows` over expert-similarity snapshots;
    scope "table": `evaluate(config, frame, runs) -> rows` over the frame `analysis.metrics.<metric>(con, sel)`.
    """

    name: str
    config: type[RuleConfig]
    metric: str
    scope: str
    evaluate: Callable[..., Any]
    summary: str
    online: bool = False

    def defaults(self) -> RuleConfig:
        """A fresh config with the rule's defaults."""
        return self.config()


#: Rule name -> its spec, in the order findings are reported.
REGISTRY: dict[str, RuleSpec] = {}


def register(spec: RuleSpec) -> RuleSpec:
    """Add a rule to the registry (names are unique)."""
    if spec.name in REGISTRY:
        raise ValueError(f"rule {spec.name!r} is registered twice")
    REGISTRY[spec.name] = spec
    return spec


def rules(scope: str | None = None, *, online: bool | None = None) -> Iterator[RuleSpec]:
    """Registered rules, in report order, optionally of one scope or only those evaluated online."""
    for spec in REGISTRY.values():
        if (scope is None or spec.scope == scope) and (online is None or spec.online == online):
            yield spec


def skip_reason(cell: Cell, min_tokens: float) -> str | None:
    """Why a load rule cannot judge `cell` (too little data: kT/N below min_tokens), or None."""
    if cell.assignments is None and cell.get("assignments") is None:
        return "no expert_load rows in this window"
    exp = cell.get("expected_per_expert")
    if exp is None:
        return "no tokens in this window"
    if exp < min_tokens:
        return f"too little data: {exp:.1f} expected assignments per expert (kT/N) < min_tokens {min_tokens:g}"
    return None


def grade(value: float, warn_above: float, fail_above: float | None) -> tuple[Status, float]:
    """(status, limit crossed or checked) of a value against a WARN and an optional FAIL limit."""
    if fail_above is not None and value > fail_above:
        return Status.FAIL, fail_above
    if value > warn_above:
        return Status.WARN, warn_above
    return Status.PASS, warn_above
