"""Selections (run, tag, steps, layer) and step windows, turned into SQL filters and template parameters."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

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


def window_label(start: Any, end: Any) -> str:
    """A person's label for an inclusive step window, e.g. 'steps 200–299'."""
    if start is None or end is None:
        return ""
    try:
        s, e = int(start), int(end)
    except (TypeError, ValueError):
        return ""
    return f"step {s}" if s == e else f"steps {s}–{e}"
