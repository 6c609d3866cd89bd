"""The dashboard in headless Chromium: every page loads without console errors and draws its charts, the
selection changes the charts and travels in the URL, and the SQL console returns rows, refuses what it
must and keeps serving."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.keys import Keys

from moescope import dashboard

pytestmark = pytest.mark.browser

#: Page path, screenshot name, the least number of charts with data it must draw, and which run it shows
#: (the least healthy run makes the health pages worth a picture; the healthiest one colours the tokens).
PAGES = [
    ("/", "overview", 1, "worst"),
    ("/utilization", "utilization", 5, "worst"),
    ("/collapse", "collapse", 5, "worst"),
    ("/similarity", "similarity", 2, "snapshots"),
    ("/drift", "drift", 2, "worst"),
    ("/tokens", "tokens", 1, "tokens"),
    ("/sql", "sql", 0, "worst"),
]


def _runs_by_health(trace: Path) -> dict[str, str]:
    """'worst': the run with the most FAIL/WARN findings; 'snapshots': the worst run with expert snapshots;
    'tokens': the healthiest run with token-level routing."""
    data = dashboard.data.DashboardData(trace)
    grid = data.health_grid()
    runs = data.runs().set_index("run")
    score = (grid.assign(s=grid["fail"] * 100 + grid["warn"]).groupby("run")["s"].sum()
             .reindex(data.run_names(), fill_value=0))
    data.close()
    snap = score[runs["snapshots"].reindex(score.index) > 0]
    tok = score[runs["routing_rows"].reindex(score.index) > 0]
    worst = str(score.idxmax())
    return {"worst": worst, "snapshots": str(snap.idxmax()) if len(snap) else worst,
            "tokens": str(tok.idxmin()) if len(tok) else worst}

# Plotly keeps the figure as sent (typed arrays base64-encoded); _fullData holds the decoded arrays.
_PLAIN_JS = """
function plain(v) {
  if (v === undefined || v === null) { return null; }
  if (ArrayBuffer.isView(v)) { return Array.from(v); }
  if (Array.isArray(v)) { return v.map(plain); }
  return v;
}
function size(t) {
  var v = t.z || t.y || t.x;
  return (v && v.length) || t._length || 0;
}
"""

_CHARTS_JS = _PLAIN_JS + """
return Array.from(document.querySelectorAll('.js-plotly-plot')).map(function (el) {
  var full = el._fullData || [];
  var n = 0;
  full.forEach(function (t) { n += size(t); });
  return {id: el.parentElement ? el.parentElement.id : '', traces: full.length, points: n};
});
"""


def _charts(dash_duo: Any, at_least: int, timeout: float = 60.0) -> list[dict[str, Any]]:
    """Wait until at least `at_least` plotly charts hold data; return a summary of every chart."""
    end = time.monotonic() + timeout
    charts: list[dict[str, Any]] = []
    while time.monotonic() < end:
        charts = dash_duo.driver.execute_script(_CHARTS_JS)
        if sum(1 for c in charts if c["traces"] and c["points"]) >= at_least and not _loading(dash_duo):
            return charts
        time.sleep(0.25)
    raise AssertionError(f"expected {at_least} charts with data, got {charts}")


def _loading(dash_duo: Any) -> bool:
    return bool(dash_duo.driver.execute_script(
        "return document.querySelectorAll('[data-dash-is-loading=\"true\"]').length"))


def _severe(dash_duo: Any) -> list[dict[str, Any]]:
    return [e for e in (dash_duo.get_logs() or []) if e.get("level") == "SEVERE"]


def _figure(dash_duo: Any, graph_id: str) -> str:
    """A fingerprint of a chart's data (the plotted arrays)."""
    return dash_duo.driver.execute_script(
        _PLAIN_JS + "var el = document.getElementById(arguments[0]);"
        "el = el.classList.contains('js-plotly-plot') ? el : el.querySelector('.js-plotly-plot');"
        "return JSON.stringify((el._fullData || []).map(function (t) { return [plain(t.x), plain(t.y), plain(t.z)]; }));",
        graph_id,
    )


def _wait(cond: Any, timeout: float = 30.0, what: str = "condition") -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = cond()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_every_page_loads_and_draws(dash_duo: Any, start_dashboard: Any, browser_trace: Path, shot_dir: Path) -> None:
    """Each page: no severe console error, its charts drawn with data, a 1280×800 screenshot."""
    base = start_dashboard(browser_trace)
    pick = _runs_by_health(browser_trace)
    for path, name, n_charts, which in PAGES:
        dash_duo.wait_for_page(f"{base}{path}?run={pick[which]}")
        dash_duo.wait_for_element(".ms-title", timeout=30)
        charts = _charts(dash_duo, n_charts)
        if name == "sql":  # run the default query so the screenshot shows a result
            dash_duo.find_element("#sql-run").click()
            _wait(lambda: "row" in dash_duo.find_element("#sql-msg").text, what="SQL result")
        errors = dash_duo.driver.find_elements("css selector", ".ms-msg-error")
        assert not errors, f"{path}: {[e.text for e in errors]}"
        assert not _severe(dash_duo), f"{path}: console errors {_severe(dash_duo)}"
        assert all(c["traces"] for c in charts), f"{path}: a chart without traces: {charts}"
        time.sleep(0.5)  # let plotly finish its transitions before the picture
        dash_duo.driver.save_screenshot(str(shot_dir / f"dashboard-{name}.png"))


def test_run_and_layer_change_the_charts(dash_duo: Any, start_dashboard: Any, browser_trace: Path) -> None:
    """Picking another layer, then another run, redraws the charts and rewrites the URL."""
    base = start_dashboard(browser_trace)
    runs = dashboard.data.DashboardData(browser_trace).run_names()
    assert len(runs) >= 2, "the browser trace needs two runs"
    dash_duo.wait_for_page(f"{base}/utilization?run={runs[0]}&layer=0")
    _charts(dash_duo, 5)
    before = _figure(dash_duo, "util-heatmap")

    dash_duo.select_dcc_dropdown(".ms-ctl-layer .ms-dd", index=1)
    _wait(lambda: "layer=1" in dash_duo.driver.current_url, what="layer in the URL")
    _wait(lambda: _figure(dash_duo, "util-heatmap") != before, what="the heatmap to change with the layer")
    after_layer = _figure(dash_duo, "util-heatmap")

    dash_duo.select_dcc_dropdown(".ms-ctl-run .ms-dd", index=1)  # options list the runs in order
    _wait(lambda: f"run={runs[1]}" in dash_duo.driver.current_url, what="run in the URL")
    _wait(lambda: _figure(dash_duo, "util-heatmap") not in (before, after_layer),
          what="the heatmap to change with the run")
    _charts(dash_duo, 5)
    assert not _severe(dash_duo)


def test_selection_travels_in_the_url(dash_duo: Any, start_dashboard: Any, browser_trace: Path) -> None:
    """A shared link opens the same selection; the nav links carry it to the other pages."""
    base = start_dashboard(browser_trace)
    runs = dashboard.data.DashboardData(browser_trace).run_names()
    run = runs[-1]
    dash_duo.wait_for_page(f"{base}/collapse?run={run}&layer=1&steps=5-20")
    _charts(dash_duo, 5)
    assert dash_duo.find_element(".ms-ctl-run").text.splitlines()[-1] == run
    assert "layer 1" in dash_duo.find_element(".ms-ctl-layer").text
    assert "5–20" in dash_duo.find_element(".ms-ctl-steps").text
    link = dash_duo.find_element("#ms-nav-utilization")
    assert link.get_attribute("href").endswith(f"/utilization?run={run}&layer=1&steps=5-20")
    link.click()
    _wait(lambda: "/utilization?" in dash_duo.driver.current_url, what="navigation")
    dash_duo.wait_for_element("#util-heatmap .js-plotly-plot", timeout=30)  # the old page's charts are gone
    charts = _charts(dash_duo, 5)
    assert {"util-heatmap", "util-lines"} <= {c["id"] for c in charts}
    ticks = json.loads(_figure(dash_duo, "util-heatmap"))[0][0]
    assert min(ticks) >= 5 and max(ticks) <= 20  # the step window came along


def test_health_cell_opens_collapse_page(dash_duo: Any, start_dashboard: Any, browser_trace: Path) -> None:
    """Clicking a run × layer cell of the overview's health grid opens that run and layer on the Collapse page."""
    base = start_dashboard(browser_trace)
    dash_duo.wait_for_page(base + "/")
    _charts(dash_duo, 1)
    drag = dash_duo.find_element("#ov-health-grid .nsewdrag")
    ActionChains(dash_duo.driver).move_to_element(drag).click().perform()  # the middle of the grid
    _wait(lambda: "/collapse?" in dash_duo.driver.current_url, what="the Collapse page")
    url = dash_duo.driver.current_url
    assert "run=" in url and "layer=" in url
    _charts(dash_duo, 5)
    assert not _severe(dash_duo)


def test_sql_console_rows_refusals_and_timeout(
    dash_duo: Any, start_dashboard: Any, browser_trace: Path, tmp_path: Path
) -> None:
    """Rows for a SELECT; COPY, read_csv, ATTACH, INSTALL, SET and an endless query refused or stopped with
    a message; the server keeps serving."""
    base = start_dashboard(browser_trace, sql_timeout=2.0)
    dash_duo.wait_for_page(base + "/sql")
    dash_duo.wait_for_element("#sql-query", timeout=30)

    def run(query: str) -> tuple[str, str]:
        box = dash_duo.find_element("#sql-query")
        old = dash_duo.find_element("#sql-msg").text
        box.send_keys(Keys.CONTROL, "a")  # clear() does not reach React's state; select-all + type does
        box.send_keys(Keys.DELETE)
        box.send_keys(query)
        dash_duo.find_element("#sql-run").click()
        _wait(lambda: dash_duo.find_element("#sql-msg").text not in ("", old), timeout=30,
              what=f"an answer to {query!r}")
        time.sleep(0.3)
        msg = dash_duo.find_element("#sql-msg")
        return msg.text, msg.get_attribute("class")

    text, cls = run("SELECT layer, expert, SUM(tokens) AS n FROM expert_load GROUP BY ALL ORDER BY ALL")
    assert "rows" in text and "error" not in cls
    _wait(lambda: dash_duo.driver.find_elements("css selector", "#sql-table td"), what="result rows")

    out = tmp_path / "stolen.csv"
    bad = [
        (f"COPY (SELECT * FROM expert_load) TO '{out}'", "refused"),
        ("SELECT * FROM read_csv('/etc/passwd')", ""),
        (f"ATTACH '{tmp_path / 'x.duckdb'}' AS x", "refused"),
        ("INSTALL httpfs", "refused"),
        ("SET threads = 1", "refused"),
        ("SELECT COUNT(*) FROM range(1000000000000) a, range(1000) b", "time limit"),
    ]
    for query, expect in bad:
        text, cls = run(query)
        assert "ms-msg-error" in cls, (query, text)
        assert expect in text, (query, text)
    assert not out.exists() and not (tmp_path / "x.duckdb").exists()

    text, cls = run("SELECT COUNT(*) AS n FROM runs")
    assert "1 row" in text and "error" not in cls
    dash_duo.wait_for_page(base + "/utilization")  # another page still serves after all that
    _charts(dash_duo, 5)
    assert not _severe(dash_duo)


SAMPLES = Path(__file__).resolve().parents[2] / "sample_traces"


@pytest.mark.skipif(not (SAMPLES / "collapse").is_dir(), reason="sample_traces/ not present")
def test_first_visit_opens_each_page_on_the_run_worth_seeing(dash_duo: Any, start_dashboard: Any) -> None:
    """A new user clicks through the nav from a bare URL: each page opens on its telling run, no error boxes,
    and the utilization heatmap's colour scale is centred on fair share (log2 N·f = 0)."""
    base = start_dashboard(SAMPLES)
    dash_duo.wait_for_page(f"{base}/")
    for page, run in (("utilization", "collapse"), ("collapse", "collapse"), ("similarity", "upcycled"),
                      ("drift", None)):
        dash_duo.find_element(f"#ms-nav-{page}").click()
        _wait(lambda page=page: f"/{page}" in dash_duo.driver.current_url, what=f"{page} page")
        dash_duo.wait_for_element(".ms-title", timeout=30)
        errors = [e.text for e in dash_duo.driver.find_elements("css selector", ".ms-msg-error")]
        assert not errors, (page, errors)
        try:
            _charts(dash_duo, 2, timeout=30)
        except AssertionError as e:  # say what the page showed instead
            raise AssertionError((page, dash_duo.driver.current_url,
                                  dash_duo.find_element(".ms-main").text[:800])) from e
        if run is not None:
            assert dash_duo.find_element(".ms-ctl-run").text.splitlines()[-1] == run, page
        else:
            assert "Baseline: shift · tag english" in dash_duo.find_element(".ms-main").text
        if page == "utilization":
            lo, hi = dash_duo.driver.execute_script(
                "var el = document.querySelector('#util-heatmap .js-plotly-plot');"
                "var t = el._fullData[0]; return [t.zmin, t.zmax];")
            assert lo == -hi
    assert not _severe(dash_duo)
