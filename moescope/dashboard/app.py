"""The Dash app: a nav bar over Dash's page container, and the callbacks that keep the selection in the URL.

Pages live in pages/ and register themselves with `dash.register_page` (Dash's pages_folder mechanism);
the nav bar lists whatever pages registered, ordered by their `order`, so pages added later (e.g. a
systems what-if page) appear without touching this file. Every control with the id
`{"type": "ms-sel", "key": K}` writes `K=value` into the URL query string; the page then re-renders from
the URL, so every view is a shareable link and the back button works.

Live traces: a `dcc.Interval` (every `refresh` seconds) calls `DashboardData.refresh()`; when the trace's data
version moved, the version store changes, and because that store is one of the pages router's inputs
(`routing_callback_inputs`), the open page re-renders from the same URL. Figures carry a `uirevision`, so the
user's zoom survives the redraw. The header shows the live state (recording, finished, stopped by an alert).
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from typing import Any
from urllib.parse import parse_qsl

import dash
from dash import ALL, Dash, Input, Output, State, dcc, html, no_update
from dash import _callback as _dash_callback
from dash import _pages as _dash_pages

from .._paths import content_dir
from .components import SEL
from .data import DashboardData
from .state import KEYS, from_query, merge_controls, resolve, to_query

#: The content folder holding pages/ and assets/ (checkout or wheel).
HERE = content_dir("dashboard")
#: Dash's own id of the page container's dcc.Location.
LOCATION = "_pages_location"
#: Ids of the live-refresh pieces: the timer, the data-version store (a router input), the header's state text.
LIVE_INTERVAL, LIVE_VERSION, LIVE_TEXT = "ms-live-interval", "ms-live-version", "ms-live"
#: Keyword under which page layouts receive the data version (pages take **query and ignore it).
LIVE_KW = "ms_live_version"

log = logging.getLogger("moescope.dashboard")


def _reset_dash_globals() -> None:
    """Forget pages and `dash.callback`s left by an earlier app in this process (tests build many apps).

    Dash keeps both in module globals and hands them to whichever app serves first; our pages are
    re-imported for every app, so stale copies would otherwise be registered twice.
    """
    _dash_pages.PAGE_REGISTRY.clear()
    _dash_callback.GLOBAL_CALLBACK_LIST.clear()
    _dash_callback.GLOBAL_CALLBACK_MAP.clear()


def _adopt_page_callbacks(app: Dash) -> None:
    """Bind the pages' `dash.callback`s to this app now, so a second app built in the process cannot take them."""
    cb_map = getattr(app, "callback_map", None)
    cb_list = getattr(app, "_callback_list", None)
    if cb_map is None or cb_list is None:  # another Dash version: it binds them at the first request instead
        return
    for key in list(_dash_callback.GLOBAL_CALLBACK_MAP):
        cb_map[key] = _dash_callback.GLOBAL_CALLBACK_MAP.pop(key)
    cb_list.extend(_dash_callback.GLOBAL_CALLBACK_LIST)
    _dash_callback.GLOBAL_CALLBACK_LIST.clear()


#: Warm-up threads still alive at exit are stopped and joined (see `_stop_warming`).
_WARMING: list[tuple[threading.Thread, DashboardData]] = []


@atexit.register
def _stop_warming() -> None:
    """Stop warm-up threads before the interpreter exits: a daemon thread killed inside a DuckDB query aborts the
    process ("terminate called…", exit 134) even after every test passed."""
    for thread, data in _WARMING:
        data.stop_warming()
        thread.join(timeout=10)
    _WARMING.clear()


def page_module(stem: str) -> Any:
    """The module Dash imported for the content file pages/<stem>.py (Dash names it after the pages folder)."""
    import sys

    for page in dash.page_registry.values():
        if page["module"].rsplit(".", 1)[-1] == stem:
            return sys.modules[page["module"]]
    raise KeyError(f"no dashboard page {stem!r}")


def nav_pages() -> list[dict[str, Any]]:
    """Registered pages in nav order (by `order`, then name); pages registered with nav=False are left out."""
    pages = [p for p in dash.page_registry.values() if p.get("nav", True) is not False]
    return sorted(pages, key=lambda p: (p.get("order") if p.get("order") is not None else 1_000, p["name"]))


def _nav_id(page: dict[str, Any]) -> str:
    return "ms-nav-" + page["module"].rsplit(".", 1)[-1].replace("_", "-")


def _shell(data: DashboardData, refresh: float = 0.0) -> html.Div:
    """The page frame: nav bar (brand, page links, live state, trace name) and Dash's page container."""
    links = [
        dcc.Link(p["name"], href=p["relative_path"], id=_nav_id(p), className="ms-nav-link")
        for p in nav_pages()
    ]
    root = data.root.resolve()
    return html.Div(
        [
            html.Header(
                [
                    html.A(
                        [html.Span("◆", className="ms-logo"), html.Span("moescope", className="ms-brand-name")],
                        href="/", className="ms-brand",
                    ),
                    html.Nav(links, className="ms-nav"),
                    html.Span(_live_text(data), id=LIVE_TEXT, className="ms-live ms-muted",
                              title=f"re-read every {refresh:g} s" if refresh > 0 else "live refresh off"),
                    dcc.Interval(id=LIVE_INTERVAL, interval=max(refresh, 0.5) * 1000, disabled=refresh <= 0),
                    dcc.Store(id=LIVE_VERSION, data=data.trace.data_version),
                    html.Div(
                        [html.Span("trace ", className="ms-muted"), html.Code(root.name or str(root))],
                        className="ms-trace", title=str(root),
                    ),
                ],
                className="ms-topbar",
            ),
            html.Main(
                # A page that computes for a while (a new drift comparison on a big trace) dims the old one
                # and shows a spinner instead of looking frozen.
                dcc.Loading(
                    dash.page_container, target_components={"_pages_content": "children"}, delay_show=400,
                    type="circle", color="#1f4e9e", overlay_style={"visibility": "visible", "opacity": 0.45},
                    parent_className="ms-loading", show_initially=False,
                ),
                className="ms-main",
            ),
        ],
        className="ms-app",
    )


def _live_text(data: DashboardData) -> str:
    """The header's live state; a failure to read it is shown, never raised (the pages still work)."""
    try:
        return data.live_text()
    except Exception as e:  # noqa: BLE001 - a header line must not break the app
        log.warning("moescope dashboard: live state unavailable: %s", e)
        return "live state unavailable"


def _register_live(app: Dash) -> None:
    @app.callback(
        Output(LIVE_TEXT, "children"),
        Output(LIVE_VERSION, "data"),
        Input(LIVE_INTERVAL, "n_intervals"),
        State(LIVE_VERSION, "data"),
        prevent_initial_call=True,
    )
    def _tick(_n: int | None, shown: Any) -> tuple[str, Any]:
        """Re-read the trace's file list; a new data version re-renders the open page (a router input)."""
        data: DashboardData = app.moescope_data  # type: ignore[attr-defined]
        try:
            data.refresh()
        except Exception as e:  # noqa: BLE001 - keep serving what is known; the next tick tries again
            log.warning("moescope dashboard: refresh failed: %s", e)
        version = data.trace.data_version
        return _live_text(data), (version if version != shown else no_update)


def _register_callbacks(app: Dash) -> None:
    pages = nav_pages()

    @app.callback(
        [Output(_nav_id(p), "href") for p in pages] + [Output(_nav_id(p), "className") for p in pages],
        Input(LOCATION, "pathname"),
        Input(LOCATION, "search"),
    )
    def _nav(pathname: str | None, search: str | None) -> list[str]:
        """Nav links keep the selection; the current page's link is highlighted."""
        state = from_query(search)
        path = app.strip_relative_path(pathname or "/") or ""
        hrefs = [p["relative_path"] + to_query(state) for p in pages]
        classes = [
            "ms-nav-link active" if (app.strip_relative_path(p["relative_path"]) or "") == path else "ms-nav-link"
            for p in pages
        ]
        return hrefs + classes

    @app.callback(
        Output(LOCATION, "search"),
        Input({"type": SEL, "key": ALL}, "value"),
        State({"type": SEL, "key": ALL}, "id"),
        State(LOCATION, "search"),
        prevent_initial_call=True,
    )
    def _selection_to_url(values: list[Any], ids: list[dict[str, Any]], search: str | None) -> Any:
        """Write the controls' values into the query string (the page re-renders from it)."""
        if len(dash.ctx.triggered) != 1:
            # A person changes one control at a time; a page's controls appearing fire all of them at once.
            # That is no choice: writing the page's default run into the URL would carry it to the next page,
            # which may want another (Similarity opens on the run with snapshots).
            return no_update
        data: DashboardData = app.moescope_data  # type: ignore[attr-defined]
        controls = {i["key"]: v for i, v in zip(ids, values)}
        current = from_query(search)
        chosen = merge_controls(current, {k: v for k, v in controls.items() if k in KEYS})
        state = resolve(chosen, *data.context())
        extra = {k: v for k, v in parse_qsl((search or "").lstrip("?")) if k not in KEYS}
        for k, v in controls.items():
            if k not in KEYS:
                extra[k] = v if not isinstance(v, (list, tuple)) else "-".join(str(x) for x in v)
        new = to_query(state, extra)
        return new if new != (search or "") else no_update


def create_app(
    trace_root: str | os.PathLike[str],
    *,
    title: str = "moescope",
    sql_timeout: float = 10.0,
    sql_max_rows: int = 1000,
    cache_size: int = 512,
    warm: bool = True,
    refresh: float = 5.0,
    **dash_kwargs: Any,
) -> Dash:
    """Build the dashboard for the trace at `trace_root` (opened read-only, locked SQL).

    warm: compute the default views on a background thread right away (big traces: the first page opens fast).
    refresh: seconds between re-reads of the trace's file list while a run records (0 = off).
    """
    data = DashboardData(trace_root, sql_timeout=sql_timeout, sql_max_rows=sql_max_rows, cache_size=cache_size)
    _reset_dash_globals()
    app = Dash(
        "moescope.dashboard",
        use_pages=True,
        pages_folder=str(HERE / "pages"),
        assets_folder=str(HERE / "assets"),
        title=title,
        update_title=None,
        # Page layouts are built on demand; validating them all up front would compute every page at start-up.
        suppress_callback_exceptions=True,
        # A new data version re-renders the open page from its URL (see the module docstring).
        routing_callback_inputs={LIVE_KW: Input(LIVE_VERSION, "data")},
        **dash_kwargs,
    )
    app.moescope_data = data  # type: ignore[attr-defined]
    app.layout = _shell(data, refresh)
    _adopt_page_callbacks(app)
    _register_callbacks(app)
    _register_live(app)
    if warm:
        thread = threading.Thread(target=data.warm, name="moescope-dashboard-warm", daemon=True)
        _WARMING[:] = [(t, d) for t, d in _WARMING if t.is_alive()]
        _WARMING.append((thread, data))
        thread.start()
    return app
