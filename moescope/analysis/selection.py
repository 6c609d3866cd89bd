"""Selections (run, tag, steps, layer) and step windows, turned into SQL filters and template parameters."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .rules.base import window_label as window_label
from .sqlkit import Raw, literal

#: What a method accepts for `window`: None (thirds of each run), "thirds", "all", or a width in steps.
Window = int | str | None

Names = str | Sequence[str] | None
Ints = int | Sequence[int] | None


@dataclass(frozen=True)
class Selection:
    """Which rows an analysis reads: runs, tags, an inclusive step range and layers (None = all)."""

    run: Names = None
    tag: Names = None
    steps: tuple[int, int] | None = None
    layer: Ints = None

    @classmethod
    def of(cls, spec: Selection | Mapping[str, Any] | None) -> Selection:
        """Build a selection from a dict like {"run": "a", "tag": "code", "steps": (0, 99)}."""
        if spec is None:
            return cls()
        if isinstance(spec, Selection):
            return spec
        unknown = set(spec) - {"run", "tag", "steps", "layer", "root"}
        if unknown:
            raise ValueError(f"unknown selection key(s) {sorted(unknown)}; use run, tag, steps, layer, root")
        steps = spec.get("steps")
        if steps is not None:
            a, b = steps
            steps = (int(a), int(b))
        return cls(spec.get("run"), spec.get("tag"), steps, spec.get("layer"))

    def filter(self, *, tag: bool = True, alias: str = "") -> Raw:
        """An SQL boolean over the trace columns (`alias.` prefixed) selecting these rows."""
        p = f"{alias}." if alias else ""
        conds: list[str] = []
        for col, val in (("run", self.run), ("tag", self.tag if tag else None), ("layer", self.layer)):
            if val is None:
                continue
            vals = [val] if isinstance(val, (str, int)) else list(val)
            if not vals:
                conds.append("1 = 0")
                continue
            conds.append(f"{p}{col} IN ({', '.join(literal(v) for v in vals)})")
        if self.steps is not None:
            conds.append(f"{p}step BETWEEN {int(self.steps[0])} AND {int(self.steps[1])}")
        return Raw(" AND ".join(conds) if conds else "1 = 1")


def window_params(window: Window) -> dict[str, Any]:
    """Template parameters of a step window.

    None or "thirds": each run's observed step range split into three equal parts, so a collapse
    late in training shows in the last third instead of being averaged with a healthy start.
    "all": one window per run. An int w > 0: fixed windows of w steps aligned to multiples of w
    (steps 200–299, 300–399, ...).
    """
    if window is None or window == "thirds":
        return {"window": 0, "n_windows": 3}
    if window == "all":
        return {"window": 0, "n_windows": 1}
    if isinstance(window, str) and window.isdigit():
        window = int(window)
    if isinstance(window, int) and not isinstance(window, bool) and window > 0:
        return {"window": window, "n_windows": 1}
    raise ValueError(f"window must be None, 'thirds', 'all' or a positive number of steps, got {window!r}")


class SelectionError(ValueError):
    """A selection (run, tag, layer, steps) that matches nothing; the message is one line naming what exists."""


def _names(vals: Any) -> list[Any]:
    return [vals] if isinstance(vals, (str, int)) else list(vals)


def _listing(values: Sequence[Any], limit: int = 12) -> str:
    shown = ", ".join(repr(v) if isinstance(v, str) else str(v) for v in values[:limit])
    return (shown + f", … (+{len(values) - limit})" if len(values) > limit else shown) or "none"


def check_selection(con: Any, sel: Selection, what: str = "selection") -> None:
    """Raise SelectionError when a run, tag or layer of `sel` is not in the trace, or its steps hold no rows.

    Each named value must exist (a typo'd tag is an error, not an empty result); the message names what
    the trace has, e.g. "no tag 'cdoe' in run a (tags: code, english)". `con` holds the trace views.
    """
    runs = [str(r[0]) for r in con.execute("SELECT DISTINCT run FROM runs ORDER BY run").fetchall()]
    if sel.run is not None:
        for r in _names(sel.run):
            if str(r) not in runs:
                raise SelectionError(f"{what}: no run {r!r} in this trace (runs: {_listing(runs)})")
    scope = Selection(run=sel.run).filter(tag=False).sql
    in_runs = "" if sel.run is None else f" in run{'s' if len(_names(sel.run)) > 1 else ''} {_listing(_names(sel.run))}"
    if sel.tag is not None:
        tags = [str(t[0]) for t in con.execute(
            f"SELECT DISTINCT tag FROM (SELECT run, tag FROM expert_load UNION ALL SELECT run, tag FROM router_stats) "
            f"WHERE {scope} AND tag IS NOT NULL ORDER BY tag").fetchall()]
        for t in _names(sel.tag):
            if str(t) not in tags:
                raise SelectionError(f"{what}: no tag {t!r}{in_runs} (tags: {_listing(tags)})")
    if sel.layer is not None:
        layers = [int(x[0]) for x in con.execute(
            f"SELECT DISTINCT layer FROM layer_info WHERE {scope} ORDER BY layer").fetchall()]
        for x in _names(sel.layer):
            if int(x) not in layers:
                raise SelectionError(f"{what}: no layer {x!r}{in_runs} (layers: {_listing(layers)})")
    if sel.steps is not None:
        lo, hi = con.execute(
            f"SELECT MIN(step), MAX(step) FROM (SELECT run, tag, layer, step FROM expert_load UNION ALL "
            f"SELECT run, tag, layer, step FROM router_stats) WHERE {Selection(sel.run, sel.tag, None, sel.layer).filter().sql}"
        ).fetchall()[0]
        a, b = sel.steps
        if lo is None or b < lo or a > hi:
            have = "no steps" if lo is None else f"steps {lo}–{hi}"
            raise SelectionError(f"{what}: steps {a}–{b} match no rows{in_runs} (the data has {have})")
