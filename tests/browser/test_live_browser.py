"""The live dashboard in headless Chromium while a recording subprocess writes the trace: the step count in the
header grows, charts redraw with the new steps and keep the user's zoom, no console error, and the header says
"finished" once the recorder closes."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.browser

TESTS = Path(__file__).resolve().parents[1]

RECORDER = textwrap.dedent("""
    import sys, time
    import torch
    import moescope
    from toy_moe import ToyMoE

    out, steps, pause = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    torch.manual_seed(0)
    model = ToyMoE(vocab=64, hidden=16, n_layers=2, n_experts=8, top_k=2)
    with moescope.record(model, out, flush_every=2, tokens=0.5) as rec:
        for step in range(steps):
            rec.step = step
            with torch.no_grad():
                model(torch.randint(0, 64, (4, 32)))
            if step == 3:
                rec.flush(); rec.wait()  # the first parts are on disk before the dashboard opens
                open(out + ".ready", "w").close()
            time.sleep(pause)
""")


def _step(text: str) -> int:
    m = re.search(r"step ([\d,]+)", text)
    return int(m.group(1).replace(",", "")) if m else -1


def _severe(dash_duo: Any) -> list[dict[str, Any]]:
    return [e for e in (dash_duo.get_logs() or []) if e.get("level") == "SEVERE"]


def _wait(cond: Any, timeout: float, what: str) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = cond()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


_FIG_JS = """
var el = document.querySelector('#' + arguments[0] + ' .js-plotly-plot') || document.getElementById(arguments[0]);
if (!el || !el._fullData) { return null; }
var xs = el._fullData.map(function (t) { return t.x ? Array.from(t.x).length : 0; });
var r = el._fullLayout && el._fullLayout.xaxis ? el._fullLayout.xaxis.range : null;
return {points: xs.reduce(function (a, b) { return a + b; }, 0), maxx: Math.max.apply(null,
  el._fullData.map(function (t) { return t.x && t.x.length ? Math.max.apply(null, Array.from(t.x)) : -1; })),
  range: r ? [r[0], r[1]] : null, autorange: el.layout && el.layout.xaxis ? el.layout.xaxis.autorange : null};
"""


def test_dashboard_follows_a_recording_run(dash_duo: Any, start_dashboard: Any, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    out = tmp_path / "trace" / "live"
    rec = subprocess.Popen([sys.executable, "-c", RECORDER, str(out), "90", "0.15"], cwd=TESTS,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait(lambda: Path(str(out) + ".ready").exists() or rec.poll() is not None, 120, "the first flush")
        assert rec.poll() is None, rec.communicate()[1]
        base = start_dashboard(tmp_path / "trace", refresh=1.0, warm=False)

        # Overview: the step in the header grows while the recorder writes
        dash_duo.wait_for_page(f"{base}/?run=live")
        dash_duo.wait_for_element("#ms-live", timeout=30)
        first = _step(dash_duo.find_element("#ms-live").text)
        assert dash_duo.find_element("#ms-live").text.startswith("recording · step")
        later = _wait(lambda: (s := _step(dash_duo.find_element("#ms-live").text)) > first + 4 and s, 60,
                      "the header's step to grow")
        assert later > first

        # Collapse: a chart redraws with new steps and keeps a zoom the user set
        dash_duo.wait_for_page(f"{base}/collapse?run=live&layer=0")
        _wait(lambda: dash_duo.driver.execute_script(_FIG_JS, "col-minutil"), 60, "the min-utilization chart")
        # the user zooms (a relayout event, as a box zoom sends it: the page re-renders too often here for a
        # selenium drag to finish on one graph)
        dash_duo.driver.execute_script(
            "Plotly.relayout(document.querySelector('#col-minutil .js-plotly-plot'), {'xaxis.range': [0, 3]});")
        zoomed = _wait(lambda: (f := dash_duo.driver.execute_script(_FIG_JS, "col-minutil")) and
                       f["range"] == [0, 3] and f, 10, "the zoom to apply")
        dash_duo.driver.execute_script("document.querySelector('#col-minutil .js-plotly-plot').__msProbe = 1;")
        redrawn = _wait(lambda: (f := dash_duo.driver.execute_script(_FIG_JS, "col-minutil")) and
                        f["points"] != zoomed["points"] and f["range"] == [0, 3] and f, 60,
                        "the chart to redraw with new steps")
        # a new graph was drawn (the page re-rendered), with new data, and the user's zoom
        assert dash_duo.driver.execute_script(
            "return document.querySelector('#col-minutil .js-plotly-plot').__msProbe;") is None
        assert redrawn["range"] == zoomed["range"], f"zoom lost on redraw: {zoomed} -> {redrawn}"
        assert not _severe(dash_duo), f"console errors: {_severe(dash_duo)}"
        errors = dash_duo.driver.find_elements("css selector", ".ms-msg-error")
        assert not errors, [e.text for e in errors]

        assert rec.wait(timeout=120) == 0, rec.communicate()[1]
        done = _wait(lambda: (t := dash_duo.find_element("#ms-live").text).startswith("finished") and t, 30,
                     "the header to say finished")
        assert done == "finished · step 89"
        assert not _severe(dash_duo), f"console errors: {_severe(dash_duo)}"
    finally:
        if rec.poll() is None:
            rec.kill()
            rec.wait()
