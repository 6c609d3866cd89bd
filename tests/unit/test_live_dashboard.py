"""The live dashboard without a browser: the refresh timer's callback, a page re-rendered from a new data version,
the header's live state, cache keys that follow the data version, and figures that keep the user's zoom."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from trace_helpers import layer_spec, load_frame, stats_frame

pytest.importorskip("dash")

from moescope import dashboard  # noqa: E402
from moescope.format.writer import write_run  # noqa: E402

LAYERS = [layer_spec(0, 4, 1)]


def _write(run_dir: Path, steps: range, closed: bool | None = False) -> None:
    load = load_frame([(s, 0, [100, 100, 100, 100]) for s in steps])
    stats = stats_frame([{"step": s, "layer": 0, "tokens": 400} for s in steps])
    write_run(run_dir, {"expert_load": load, "router_stats": stats}, run=run_dir.name, layers=LAYERS,
              extra=None if closed is None else {"closed": closed})


class Client:
    """Posts Dash callbacks over Flask's test client, as the browser does."""

    def __init__(self, app: Any) -> None:
        self.http = app.server.test_client()
        assert self.http.get("/").status_code == 200
        self.deps = self.http.get("/_dash-dependencies").get_json()

    def dep(self, output_part: str) -> dict[str, Any]:
        return next(d for d in self.deps if output_part in d["output"])

    def post(self, dep: dict[str, Any], inputs: list[dict[str, Any]], state: list[dict[str, Any]] = ()) -> Any:
        outputs = [{"id": o.split(".")[0], "property": o.split(".")[1]} for o in dep["output"].strip(".").split("...")]
        body = {"output": dep["output"], "outputs": outputs, "inputs": inputs, "state": list(state),
                "changedPropIds": [f"{inputs[0]['id']}.{inputs[0]['property']}"]}
        r = self.http.post("/_dash-update-component", json=body)
        return r.status_code, (r.get_json() if r.status_code == 200 else None)


def test_tick_rerenders_the_page_on_new_data(tmp_path: Path) -> None:
    run_dir = tmp_path / "trace" / "live"
    _write(run_dir, range(0, 10))
    app = dashboard.create_app(tmp_path / "trace", warm=False, refresh=1.0)
    c = Client(app)
    data = app.moescope_data
    assert data.live_text().startswith("recording · step 9 · updated")

    tick = c.dep("ms-live.children")
    router = c.dep("_pages_content.children")
    # the router takes the data version as an input: a new version re-renders the open page
    assert {"id": "ms-live-version", "property": "data"} in router["inputs"]

    status, out = c.post(tick, [{"id": "ms-live-interval", "property": "n_intervals", "value": 1}],
                         [{"id": "ms-live-version", "property": "data", "value": 0}])
    assert status == 200 and "ms-live-version" not in out["response"]  # nothing new: no re-render
    before = data.runs()["last_step"].iloc[0]

    _write(run_dir, range(10, 20))
    status, out = c.post(tick, [{"id": "ms-live-interval", "property": "n_intervals", "value": 2}],
                         [{"id": "ms-live-version", "property": "data", "value": 0}])
    assert status == 200
    assert out["response"]["ms-live-version"]["data"] == 1
    assert out["response"]["ms-live"]["children"].startswith("recording · step 19 · updated")
    assert before == 9 and data.runs()["last_step"].iloc[0] == 19  # the cache did not serve the old frame

    inputs = [{"id": "_pages_location", "property": "pathname", "value": "/"},
              {"id": "_pages_location", "property": "search", "value": ""},
              {"id": "ms-live-version", "property": "data", "value": 1}]
    status, out = c.post(router, inputs)
    assert status == 200
    text = json.dumps(out)
    assert "0\\u201319 (20)" in text  # the runs table shows the new steps (JSON escapes the en dash)
    data.close()


def test_graph_keeps_zoom_through_uirevision() -> None:
    import plotly.graph_objects as go

    C = dashboard.components
    g = C.graph({"data": [], "layout": {"title": {"text": "x"}}}, id="ov-x")
    assert g.figure["layout"]["uirevision"] == "ov-x" and g.figure["layout"]["title"] == {"text": "x"}
    g = C.graph(go.Figure(), id="a", uirevision="sel-1")
    assert g.figure.layout.uirevision == "sel-1"


def test_finished_and_refresh_off(tmp_path: Path) -> None:
    _write(tmp_path / "t" / "done", range(0, 3), closed=True)
    app = dashboard.create_app(tmp_path / "t", warm=False, refresh=0)
    assert app.moescope_data.live_text() == "finished · step 2"
    assert app.layout["ms-live-interval"].disabled is True
    app.moescope_data.close()


def test_cli_refresh_flag() -> None:
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "moescope", "dashboard", "--help"], capture_output=True, text=True)
    assert "--refresh SECONDS" in r.stdout
    r = subprocess.run([sys.executable, "-m", "moescope", "dashboard", "sample_traces", "--refresh", "-1"],
                       capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 2 and r.stderr.strip().endswith("--refresh must be 0 (off) or a positive number of "
                                                           "seconds, got -1")


def test_alerts_show_on_overview_and_collapse_timeline(tmp_path: Path) -> None:
    from moescope.capture.alerts import Alert
    from moescope.capture.recorder import alerts_table

    run_dir = tmp_path / "t" / "r"
    a = Alert("collapse", "FAIL", 0, (0,), 0, 9, 0.97, 0.9, "routing collapsed onto expert 0", "r", 0)
    write_run(run_dir, {"alerts": alerts_table("r", 0, [a]).to_pandas()}, run="r", layers=LAYERS)
    _write(run_dir, range(0, 10), closed=True)
    app = dashboard.create_app(tmp_path / "t", warm=False, refresh=0)
    c = Client(app)
    router = c.dep("_pages_content.children")

    def page(path: str, search: str = "") -> str:
        inputs = [{"id": "_pages_location", "property": "pathname", "value": path},
                  {"id": "_pages_location", "property": "search", "value": search},
                  {"id": "ms-live-version", "property": "data", "value": 0}]
        status, out = c.post(router, inputs)
        assert status == 200
        return json.dumps(out, ensure_ascii=False)

    ov = page("/")
    assert "Alerts raised while recording (1)" in ov and "routing collapsed onto expert 0" in ov
    col = page("/collapse", "?run=r&layer=0")
    assert '"name": "online alert"' in col and "FAIL collapse at step 9: routing collapsed onto expert 0" in col
    assert '"uirevision"' in col  # the timeline keeps its zoom through live redraws
    app.moescope_data.close()
