"""The selection every page shares (run, layer, step window), carried in the URL query string.

A view is shared by sending its link: `/utilization?run=collapse&layer=1&steps=200-399` opens the same
charts for anyone with the same trace. Parsing is forgiving (a bad value is dropped, not an error page),
and `resolve` fills in defaults from what the trace holds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import parse_qsl, urlencode

#: Query-string keys of the shared selection, in the order links spell them.
KEYS = ("run", "layer", "steps")


@dataclass(frozen=True)
class ViewState:
    """The shared selection: a run, a layer and an inclusive step window (None = not chosen)."""

    run: str | None = None
    layer: int | None = None
    steps: tuple[int, int] | None = None
    #: Why the URL's selection was changed (a run, layer or step window the trace does not have); not in links.
    notice: str | None = field(default=None, compare=False)

    def with_(self, **changes: Any) -> ViewState:
        """A copy with some fields changed."""
        return replace(self, **changes)


def as_int(value: Any) -> int | None:
    """An int from a query-string value, or None."""
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        return None


def parse_steps(value: Any) -> tuple[int, int] | None:
    """Parse '200-399' (or a 2-sequence) into (200, 399); reversed bounds are swapped, junk gives None."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        # Split on the last '-' that is not a leading sign, so '-5-10' still parses as (-5, 10).
        text = value.strip()
        cut = text.find("-", 1)
        if cut < 0:
            one = as_int(text)
            return None if one is None else (one, one)
        parts: Sequence[Any] = (text[:cut], text[cut + 1 :])
    elif isinstance(value, Sequence) and len(value) == 2:
        parts = value
    else:
        return None
    lo, hi = as_int(parts[0]), as_int(parts[1])
    if lo is None or hi is None:
        return None
    return (lo, hi) if lo <= hi else (hi, lo)


def format_steps(steps: tuple[int, int] | None) -> str | None:
    """'200-399' for (200, 399); None for no window."""
    return None if steps is None else f"{int(steps[0])}-{int(steps[1])}"


def from_query(query: str | Mapping[str, Any] | None) -> ViewState:
    """Read the selection from a query string ('?run=a&layer=1') or the dict Dash passes to page layouts."""
    if query is None:
        params: Mapping[str, Any] = {}
    elif isinstance(query, str):
        params = dict(parse_qsl(query.lstrip("?"), keep_blank_values=False))
    else:
        params = query
    run = params.get("run")
    if isinstance(run, list):  # a repeated key: Dash hands over a list; the first one wins
        run = run[0] if run else None
    return ViewState(
        run=str(run) if run not in (None, "") else None,
        layer=as_int(params.get("layer")),
        steps=parse_steps(params.get("steps")),
    )


def to_query(state: ViewState, extra: Mapping[str, Any] | None = None) -> str:
    """The query string ('?run=a&layer=1&steps=0-99', '' when empty) of a selection plus page-specific keys."""
    pairs: list[tuple[str, str]] = []
    if state.run is not None:
        pairs.append(("run", state.run))
    if state.layer is not None:
        pairs.append(("layer", str(state.layer)))
    if state.steps is not None:
        pairs.append(("steps", format_steps(state.steps) or ""))
    for k, v in (extra or {}).items():
        if v is not None and v != "" and k not in KEYS:
            pairs.append((k, str(v)))
    return "?" + urlencode(pairs) if pairs else ""


def href(path: str, state: ViewState, extra: Mapping[str, Any] | None = None) -> str:
    """A link to page `path` that keeps the selection."""
    return path + to_query(state, extra)


def resolve(
    state: ViewState,
    runs: Sequence[str],
    layers: Mapping[str, Sequence[int]],
    step_range: Mapping[str, tuple[int, int]],
    prefer: Sequence[str] = (),
    prefer_layer: Mapping[str, int] | None = None,
) -> ViewState:
    """Make a selection valid for the trace: no or unknown run → the first of `prefer` in the trace (the run a page
    most wants to show), else the first run; no or unknown layer → `prefer_layer[run]`, else the run's first layer;
    steps clipped to the run's range (dropped when they miss it or cover all of it)."""
    first = next((r for r in prefer if r in runs), runs[0] if runs else None)
    run = state.run if state.run in runs else first
    if run is None:
        return ViewState()
    run_layers = list(layers.get(run, []))
    default_layer = (prefer_layer or {}).get(run)
    if default_layer not in run_layers:
        default_layer = run_layers[0] if run_layers else None
    layer = state.layer if state.layer in run_layers else default_layer
    steps = state.steps
    if steps is not None and run in step_range:
        lo, hi = step_range[run]
        a, b = max(steps[0], lo), min(steps[1], hi)
        steps = None if a > b or (a, b) == (lo, hi) else (a, b)
    return ViewState(run=run, layer=layer, steps=steps)


def explain(asked: ViewState, got: ViewState, runs: Sequence[str], layers: Mapping[str, Sequence[int]],
            step_range: Mapping[str, tuple[int, int]]) -> str | None:
    """One line saying which part of the URL's selection the trace does not have and what is shown instead."""
    if asked.run is not None and asked.run not in runs:
        return (f"This trace has no run {asked.run!r} (runs: {', '.join(runs) or 'none'}); showing {got.run}.")
    if asked.layer is not None and got.run is not None and asked.layer != got.layer:
        have = ", ".join(str(x) for x in layers.get(got.run, []))
        return f"Run {got.run} has no layer {asked.layer} (layers: {have}); showing layer {got.layer}."
    if asked.steps is not None and got.steps is None and got.run in step_range:
        lo, hi = step_range[got.run]
        if asked.steps[1] < lo or asked.steps[0] > hi:
            return (f"Steps {asked.steps[0]}–{asked.steps[1]} are outside run {got.run}'s steps {lo}–{hi}; "
                    "showing all steps.")
    return None


def merge_controls(current: ViewState, values: Mapping[str, Any]) -> ViewState:
    """Apply the selection bar's control values ({'run': .., 'layer': .., 'steps': [a, b]}) to a selection.

    Changing the run drops layer and steps, since another run may have other layers and step ranges
    (resolve() then picks that run's defaults). A URL without a run is not a change: the controls then show
    the page's default run and layer, and those are kept.
    """
    run = values.get("run", current.run)
    run = str(run) if run not in (None, "") else None
    if run != current.run and current.run is not None:
        return ViewState(run=run)
    layer = as_int(values["layer"]) if "layer" in values else current.layer
    steps = parse_steps(values["steps"]) if "steps" in values else current.steps
    return ViewState(run=run, layer=layer, steps=steps)
