"""The Flight page in headless Chromium: it lists a trace's flight dumps, shows the selected dump's findings
(problems first, with their numbers), switches dumps from its dropdown, and says how to record when there are none."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("safetensors")

from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from trace_helpers import flight_dump, layer_spec, load_frame  # noqa: E402

from moescope import dashboard  # noqa: E402

pytestmark = pytest.mark.browser


def _text(dash_duo: Any, selector: str, want: str, timeout: float = 30.0) -> str:
    end = time.monotonic() + timeout
    text = ""
    while time.monotonic() < end:
        found = dash_duo.driver.find_elements("css selector", selector)
        try:
            text = found[0].text if found else ""
        except StaleElementReferenceException:  # re-rendered between finding and reading it: look again
            continue
        if want in text:
            return text
        time.sleep(0.2)
    raise AssertionError(f"{selector}: {want!r} not shown; got {text[:600]!r}")


def test_flight_page_lists_dumps_and_explains_the_selected_one(
    dash_duo: Any, start_dashboard: Any, make_run: Any, trace_root: Path
) -> None:
    nan_run = make_run("nan", layers=[layer_spec(0, 4, 2)], expert_load=load_frame([(7, 0, [2, 2, 2, 2])]))
    hot_run = make_run("hot", layers=[layer_spec(0, 4, 2)], expert_load=load_frame([(12, 0, [0, 0, 0, 8])]))
    # nan: token 42 at position 2 has NaN logits; hot: every token went to experts 3 and 0
    flight_dump(nan_run, "rank0-step00000007-alert", 7,
                [[1.0, 0.5, 0.2, 0.1], [0.3, 1.2, 0.1, 0.0], [float("nan")] * 4, [0.9, 0.1, 0.8, 0.0]],
                [[0, 1], [1, 0], [0, 1], [0, 2]], token_ids=[40, 41, 42, 43],
                alerts=[{"rule": "nonfinite", "status": "FAIL", "layer": 0, "message": "layer 0: non-finite logits"}])
    flight_dump(hot_run, "rank0-step00000012-demand", 12, [[0.0, 0.1, 0.2, 5.0]] * 8, [[3, 0]] * 8, reason="demand")
    base = start_dashboard(trace_root)
    dash_duo.wait_for_page(f"{base}/flight?run=nan")
    dash_duo.wait_for_element("#fl-findings", timeout=30)
    table = _text(dash_duo, "#fl-dumps", "demand")
    assert "alert" in table and "non-finite logits" in table  # both dumps listed with reason and alerts
    findings = _text(dash_duo, "#fl-findings", "step 7 seq 0 pos 2 (token 42)")
    assert findings.splitlines()[0].startswith("problem")  # problems first
    assert "tokens=1, sampled=4" in findings  # with their numbers
    # the dropdown switches to the other run's dump: its findings replace the first ones, and the URL says so
    data = dashboard.data.DashboardData(trace_root)
    order = list(data.flight_dumps()["run"])  # the dropdown lists the dumps in this order
    data.close()
    dash_duo.select_dcc_dropdown(".ms-selbar .ms-dd", index=order.index("hot"))
    findings = _text(dash_duo, "#fl-findings", "expert 3")
    assert "token 42" not in findings and "dump=hot" in dash_duo.driver.current_url.replace("%2F", "/")
    assert not dash_duo.driver.find_elements("css selector", ".ms-msg-error")
    assert not [e for e in (dash_duo.get_logs() or []) if e.get("level") == "SEVERE"]


def test_flight_page_without_dumps(dash_duo: Any, start_dashboard: Any, make_run: Any, trace_root: Path) -> None:
    make_run("r", layers=[layer_spec(0, 4, 2)], expert_load=load_frame([(0, 0, [1, 1, 1, 1])]))
    base = start_dashboard(trace_root)
    dash_duo.wait_for_page(f"{base}/flight")
    assert "flight_steps=N" in _text(dash_duo, "#fl-none", "flight_steps=N")
