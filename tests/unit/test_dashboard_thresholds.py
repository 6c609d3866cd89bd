"""The dashboard reads the rules' settings: threshold lines and findings follow moescope.toml, not constants."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest

pytest.importorskip("dash")

from moescope import dashboard as glue  # noqa: E402
from moescope.config import HealthConfig, config_from_dict  # noqa: E402
from moescope.dashboard.data import DashboardData  # noqa: E402

SAMPLES = Path(__file__).resolve().parents[2] / "sample_traces"


@pytest.fixture(scope="module")
def collapse_page() -> Any:
    glue.create_app(SAMPLES, warm=False)  # registers the pages
    return glue.app.page_module("collapse")


def test_threshold_lines_are_the_rules_defaults(collapse_page: Any) -> None:
    lines = collapse_page.thresholds(HealthConfig())
    assert lines["min_utilization"]["threshold"] == HealthConfig().dead_expert.fail_below == 0.05
    assert lines["top_m_share"]["threshold"] == 0.9
    assert (lines["maxvio"]["threshold"], lines["maxvio"]["threshold2"]) == (1.0, 3.0)
    assert lines["router_entropy"]["threshold"] == 0.1  # the over-confidence rule's line


def test_threshold_lines_follow_the_config(collapse_page: Any) -> None:
    cfg = config_from_dict({"rules": {"dead_expert": {"fail_below": 0.2}, "collapse": {"share": 0.75},
                                      "maxvio": {"warn_above": 2.0}, "overconfidence": {"enabled": False}}})
    cfg.maxvio.fail_above = None  # no FAIL line
    lines = collapse_page.thresholds(cfg)
    assert lines["min_utilization"] == {"threshold": 0.2, "threshold_label": "dead expert < 0.2"}
    assert lines["top_m_share"]["threshold"] == 0.75 and "0.75" in lines["top_m_share"]["threshold_label"]
    assert lines["maxvio"] == {"threshold": 2.0, "threshold_label": "WARN > 2"}
    assert lines["router_entropy"] == {}  # a disabled rule draws no line


def test_dashboard_findings_use_the_config(tmp_path: Path) -> None:
    toml = tmp_path / "moescope.toml"
    toml.write_text("[rules.overconfidence]\nenabled = false\n[rules.collapse]\nshare = 0.99\n", encoding="utf-8")
    data = DashboardData(SAMPLES, config=toml)
    try:
        h = data.health("collapse")
        assert "overconfidence" not in set(h["rule"])
        assert set(h.loc[h["rule"] == "collapse", "threshold"]) == {0.99}
    finally:
        data.close()


def test_load_lines_follow_the_config(collapse_page: Any) -> None:
    from moescope.dashboard import figures as F

    u = pd.DataFrame({"layer": [0, 0], "expert": [0, 1], "window_start": [0, 0], "utilization": [1.5, 0.5]})
    ys = [s.y0 for s in F.load_lines(u, 0, dead_below=0.2).layout.shapes]
    assert 0.2 in ys and 0.05 not in ys and 1.0 in ys
    assert [s.y0 for s in F.load_lines(u, 0, dead_below=None).layout.shapes] == [1.0]  # rule off: no dead line
    page = glue.app.page_module("utilization")  # registered by the module fixture's app

    class Data:
        config = config_from_dict({"rules": {"dead_expert": {"fail_below": 0.2}}})

    assert page._dead_below(Data()) == 0.2
    Data.config = config_from_dict({"rules": {"dead_expert": {"enabled": False}}})
    assert page._dead_below(Data()) is None
