"""Thin glue for the Dash dashboard: import the dashboard content folder, build the app, serve it.

The dashboard lives in the content folder `dashboard/` (checkout) or `moescope/_content/dashboard` (wheel),
found by `moescope._paths.content_dir`. It is imported once as the package `moescope_dashboard`, because
Dash imports the page modules itself and they need one stable name to import their helpers by.
"""

from __future__ import annotations

import importlib
import importlib.util
import ipaddress
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from ._paths import content_dir

if TYPE_CHECKING:  # pragma: no cover
    from dash import Dash

#: The import name of the dashboard content folder.
PACKAGE = "moescope_dashboard"


def dashboard_dir() -> Path:
    """The dashboard content folder (wheel or checkout)."""
    return content_dir("dashboard")


def package() -> ModuleType:
    """Import the dashboard content folder as the package `moescope_dashboard` (idempotent)."""
    mod = sys.modules.get(PACKAGE)
    if mod is not None:
        return mod
    folder = dashboard_dir()
    spec = importlib.util.spec_from_file_location(
        PACKAGE, folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    if spec is None or spec.loader is None:  # pragma: no cover - only on a broken install
        raise ImportError(f"cannot import the dashboard from {folder}")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules[PACKAGE]
        raise
    return mod


def module(name: str) -> ModuleType:
    """Import one module of the dashboard package, e.g. module("data")."""
    package()
    return importlib.import_module(f"{PACKAGE}.{name}")


def create_app(trace_root: str | os.PathLike[str], **kwargs: Any) -> Dash:
    """Build the Dash app for the trace at `trace_root` (opened read-only); kwargs go to dashboard/app.py."""
    try:
        import dash  # noqa: F401
        import plotly  # noqa: F401
    except ImportError as e:
        raise ImportError("the dashboard needs dash and plotly: pip install 'moescope[dashboard]'") from e
    return module("app").create_app(trace_root, **kwargs)


def is_loopback(host: str) -> bool:
    """Whether `host` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
    app.run(host=host, port=port, debug=debug)
