"""The dashboard's engine: the Dash app, its data and figure functions, URL state and shared components.

The pages and assets are content, like hooks/ and analyses/: they live in the top-level `dashboard/` folder
of a checkout (`moescope/_content/dashboard` in a wheel), found by `moescope._paths.content_dir`, and Dash
imports them itself through its pages_folder mechanism. Pages import their helpers from this package.

    app.py        create_app(trace_root): the Dash app (nav bar, page container, URL state callbacks)
    data.py       data functions: cached, read-only queries over a trace (no plotting)
    figures.py    figure functions: DataFrames in, plotly figures out (one expert palette)
    state.py      the selection (run, layer, steps) carried in the URL query string
    components.py shared layout pieces (selection bar, cards, tables, messages)
    synthetic.py  synthetic traces for tests and the latency benchmark
"""

from __future__ import annotations

import errno
import importlib
import ipaddress
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from .._paths import content_dir

if TYPE_CHECKING:  # pragma: no cover
    from dash import Dash

def dashboard_dir() -> Path:
    """The dashboard content folder (wheel or checkout)."""
    return content_dir("dashboard")


#: The engine's modules, importable as attributes (`moescope.dashboard.data`) without importing dash up front.
SUBMODULES = ("app", "components", "data", "figures", "state", "synthetic")


def __getattr__(name: str) -> ModuleType:
    """Import an engine module on first attribute access (PEP 562), so `import moescope.dashboard` needs no dash."""
    if name in SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def module(name: str) -> ModuleType:
    """Import one module of the dashboard engine, e.g. module("data") (kept for callers of the old loader)."""
    return importlib.import_module(f"{__name__}.{name}")


def create_app(trace_root: str | os.PathLike[str], **kwargs: Any) -> Dash:
    """Build the Dash app for the trace at `trace_root` (opened read-only); kwargs go to dashboard/app.py."""
    try:
        import dash  # noqa: F401
        import plotly  # noqa: F401
    except ImportError as e:
        raise ImportError("the dashboard needs dash and plotly: pip install 'moescope[dashboard]'") from e
    from .app import create_app as _create_app

    return _create_app(trace_root, **kwargs)


def is_loopback(host: str) -> bool:
    """Whether `host` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_error(host: str, port: int) -> str | None:
    """Why `host:port` cannot be served (unresolvable host, port in use, no permission), or None if it can.

    Checked before Dash starts: its server dies on these with a C++ abort (exit 134), not a message.
    """
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, OverflowError) as e:
        return f"--host {host}: cannot resolve this address ({getattr(e, 'strerror', None) or e})"
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as werkzeug does: a TIME_WAIT port is free
        try:
            s.bind(addr)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return f"port {port} on {host} is in use (another dashboard?): pick another with --port"
            return f"cannot listen on {host}:{port}: {e.strerror or e}"
    return None


def exposure_warning(host: str) -> str | None:
    """The warning to print when `host` is reachable from other machines (None for loopback)."""
    if is_loopback(host):
        return None
    return (
        f"moescope: warning: binding {host}: the dashboard has no authentication and anyone who can reach this "
        "address can read the trace; use --host 127.0.0.1 unless that is what you want"
    )


def serve(
    trace_root: str | os.PathLike[str], host: str = "127.0.0.1", port: int = 8050, debug: bool = False, **kwargs: Any
) -> None:
    """Build the app and serve it until interrupted (Dash's built-in server; binds `host`, loopback by default)."""
    app = create_app(trace_root, **kwargs)
    warning = exposure_warning(host)
    if warning:
        sys.stderr.write(warning + "\n")
    sys.stderr.write(f"moescope dashboard: serving {trace_root} on http://{host}:{port}/ (Ctrl+C stops)\n")
    if not debug:
        quiet_server(app)
    app.run(host=host, port=port, debug=debug)


def quiet_server(app: Any) -> None:
    """No Flask banner, no "Dash is running on", no line per request: the one line serve() prints is the news.

    Errors still reach stderr (werkzeug logs them at ERROR); --debug keeps every log line.
    """
    import logging

    import flask.cli

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    logging.getLogger("dash.dash").setLevel(logging.WARNING)  # Dash's own logger ("Dash is running on ...")
    # Flask's app.run looks the banner function up on flask.cli at call time
    flask.cli.show_server_banner = lambda *args, **kwargs: None
