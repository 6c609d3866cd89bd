"""Browser tests of the dashboard: headless Chromium through dash[testing]'s `dash_duo` (selenium).

Skipped with a reason when dash[testing], Chromium or chromedriver is missing. Screenshots go to
$MOESCOPE_SCREENSHOT_DIR when set (e.g. `docs` to refresh the README images), else to a temporary folder;
$MOESCOPE_DASHBOARD_TRACE points the tests at another trace (e.g. sample_traces) instead of the synthetic one.
The README images (docs/dashboard-*.png) were made from the committed demo traces with

    MOESCOPE_DASHBOARD_TRACE=sample_traces MOESCOPE_SCREENSHOT_DIR=docs pytest tests/browser -k every_page
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = next((p for p in (os.environ.get("DASH_TEST_CHROMEPATH"), shutil.which("chromium"),
                             shutil.which("chromium-browser"), shutil.which("google-chrome")) if p), None)
CHROMEDRIVER = shutil.which("chromedriver")
#: The viewport every screenshot is taken at.
VIEWPORT = (1280, 800)


def _missing() -> str | None:
    try:
        import dash.testing  # noqa: F401
        import selenium  # noqa: F401
    except ImportError:
        return "dash[testing] / selenium not installed"
    if CHROMIUM is None:
        return "Chromium not found (install the chromium package or set DASH_TEST_CHROMEPATH)"
    if CHROMEDRIVER is None:
        return "chromedriver not found on PATH (install chromium-driver)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test here `browser`, and skip them all with the reason when the browser stack is missing."""
    reason = _missing()
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.browser)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))


def pytest_setup_options() -> Any:
    """Chrome options dash[testing] starts the browser with: headless, no sandbox, no background traffic."""
    from selenium.webdriver.chrome.options import Options

    options = Options()
    if CHROMIUM:
        options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-dev-shm-usage", f"--window-size={VIEWPORT[0]},{VIEWPORT[1]}", "--hide-scrollbars"):
        options.add_argument(arg)
    return options


def free_port() -> int:
    """An unused loopback port (tests run beside other servers)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def browser_trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trace the browser tests browse: $MOESCOPE_DASHBOARD_TRACE, else a small synthetic one."""
    env = os.environ.get("MOESCOPE_DASHBOARD_TRACE")
    if env:
        return Path(env)
    from moescope import dashboard

    syn = dashboard.synthetic
    shape = syn.Shape(layers=3, experts=8, top_k=2, steps=40, tokens_per_step=512, routing_every=10, seqs=3,
                      seq_len=48)
    return syn.make_trace(tmp_path_factory.mktemp("browser") / "trace", shape=shape)


@pytest.fixture
def start_dashboard(dash_duo: Any) -> Any:
    """start(trace, **create_app_kwargs) -> base URL: serve the dashboard on a free port at a 1280×800 viewport."""
    from moescope import dashboard

    def start(trace: Path, **kw: Any) -> str:
        app = dashboard.create_app(trace, **kw)
        port = free_port()
        dash_duo.start_server(app, port=port)
        dash_duo.driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": VIEWPORT[0], "height": VIEWPORT[1], "deviceScaleFactor": 1, "mobile": False},
        )
        return f"http://127.0.0.1:{port}"

    return start


@pytest.fixture
def shot_dir(tmp_path: Path) -> Path:
    """Where screenshots go."""
    d = Path(os.environ.get("MOESCOPE_SCREENSHOT_DIR") or tmp_path)
    d.mkdir(parents=True, exist_ok=True)
    return d
