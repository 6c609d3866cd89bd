"""Health rules on hand-built traces: each rule's PASS/WARN/FAIL/SKIP, windows, and the config file."""

from __future__ import annotations

import pandas as pd
import pytest
from trace_helpers import layer_spec, load_frame, stats_frame

import moescope
from moescope.analysis.health import COLUMNS, worst_status
from moescope.config import ConfigError, HealthConfig, load_config

COUNTS = {0: [250, 250, 250, 250], 1: [500, 300, 100, 100], 2: [900, 100, 0, 0]}
T = 500


@pytest.fixture
def tr(make_run, trace_root):
    el = load_frame([(s, 0, COUNTS[s]) for s in COUNTS])
    rs = stats_frame({"step": s, "layer": 0, "tokens": T, "lse_sq_sum": {0: 500.0, 1: 1000.0, 2: 6000.0}[s],
                      "nonfinite": 3 if s == 2 else 0} for s in COUNTS)
    make_run("a", layers=[layer_spec(0, 4, 2)], expert_load=el, router_stats=rs)
    # a tiny run: expected assignments per expert kT/N = 2·10/4 = 5 < 50
    make_run("tiny", layers=[layer_spec(0, 4, 2)], expert_load=load_frame([(0, 0, [20, 0, 0, 0])]),
             router_stats=stats_frame([{"step": 0, "layer": 0, "tokens": 10}]))
    return moescope.open(trace_root)


def _find(h: pd.DataFrame, rule: str, window_start: int, run: str = "a") -> dict:
    rows = h[(h["rule"] == rule) & (h["run"] == run) & (h["window_start"] == window_start)]
    assert len(rows) == 1, rows
    return rows.iloc[0].to_dict()


def test_columns_and_windows(tr):
    h = tr.health(run="a")
    assert list(h.columns) == COLUMNS
    assert set(h["status"]) <= {"PASS", "WARN", "FAIL", "SKIP", "ERROR"}
    assert _find(h, "dead_expert", 2)["window"] == "step 2"
    assert worst_status(h) == "FAIL"
    assert all("\n" not in m for m in h["message"])


def test_collapse_in_last_third_is_not_averaged_away(tr):
    h = tr.health(run="a")
    first = _find(h, "collapse", 0)
    last = _find(h, "collapse", 2)
    assert first["status"] == "PASS"
    assert last["status"] == "FAIL" and last["value"] == pytest.approx(1.0) and last["threshold"] == 0.9
    assert last["expert"] == [0, 1]
    # over the whole run the busiest 2 carry 2100/3000 = 70%: the collapse would vanish
    h_all = tr.health(run="a", config=HealthConfig(window="all"))
    assert h_all[h_all["rule"] == "collapse"]["status"].tolist() == ["PASS"]


def test_dead_expert(tr):
    h = tr.health(run="a")
    dead = _find(h, "dead_expert", 2)
    assert dead["status"] == "FAIL" and dead["expert"] == [2, 3]
    assert dead["value"] == 0.0 and dead["threshold"] == 0.05
    ok = _find(h, "dead_expert", 1)
    assert ok["status"] == "PASS" and ok["value"] == pytest.approx(0.4)


def test_cv_and_maxvio(tr):
    h = tr.health(run="a")
    assert _find(h, "load_cv", 0)["status"] == "PASS"
    cv = _find(h, "load_cv", 1)
    assert cv["status"] == "WARN" and cv["value"] == pytest.approx(0.6633, abs=1e-4)
    assert _find(h, "maxvio", 1)["status"] == "PASS"  # exactly 1.0 is not > 1.0
    mv = _find(h, "maxvio", 2)
    assert mv["status"] == "WARN" and mv["value"] == pytest.approx(900 / 250 - 1) and mv["expert"] == [0]
    strict = HealthConfig()
    strict.maxvio.fail_above = 2.0
    assert _find(tr.health(run="a", config=strict), "maxvio", 2)["status"] == "FAIL"


def test_z_loss_growth_and_nonfinite(tr):
    h = tr.health(run="a")
    assert _find(h, "z_loss", 1)["status"] == "PASS"
    z = _find(h, "z_loss", 2)
    assert z["status"] == "WARN" and z["value"] == pytest.approx(12.0) and z["threshold"] == 10
    assert _find(h, "nonfinite", 1)["status"] == "PASS"
    nf = _find(h, "nonfinite", 2)
    assert nf["status"] == "FAIL" and nf["value"] == 3


def test_skip_with_too_little_data(tr):
    h = tr.health(run="tiny")
    load = h[h["rule"].isin(["dead_expert", "load_cv", "maxvio", "collapse"])]
    assert len(load) == 4 and set(load["status"]) == {"SKIP"}
    assert load["message"].str.contains("min_tokens 50").all()
    cfg = HealthConfig(min_tokens=1)
    h2 = tr.health(run="tiny", config=cfg)
    assert _find(h2, "collapse", 0, run="tiny")["status"] == "FAIL"
    # z-loss with nothing recorded is a SKIP too, never a PASS
    assert set(h[h["rule"] == "z_loss"]["status"]) == {"SKIP"}


def test_clone_rule(make_run, trace_root):
    sim = pd.DataFrame([
        {"step": 0, "layer": 0, "expert_a": 0, "expert_b": 1, "metric": "cka", "value": 0.95},
        {"step": 100, "layer": 0, "expert_a": 0, "expert_b": 1, "metric": "cka", "value": 0.5},
        {"step": 100, "layer": 0, "expert_a": 3, "expert_b": 2, "metric": "subspace_overlap", "value": 0.9},
        {"step": 100, "layer": 1, "expert_a": 0, "expert_b": 1, "metric": "cka", "value": 0.2},
        {"step": 100, "layer": 1, "expert_a": 0, "expert_b": 0, "metric": "cka", "value": 1.0},  # diagonal
    ])
    make_run("s", layers=[layer_spec(0, 4, 2)], expert_similarity=sim)
    make_run("nosim", layers=[layer_spec(0, 4, 2)], expert_load=load_frame([(0, 0, [100, 100, 100, 100])]))
    tr = moescope.open(trace_root)
    h = tr.health(run="s")
    c = h[h["rule"] == "clones"].set_index("layer")
    assert c.loc[0, "status"] == "WARN" and c.loc[0, "expert"] == ["2-3"] and c.loc[0, "window"] == "step 100"
    assert c.loc[1, "status"] == "PASS"
    h2 = tr.health(run="nosim")
    assert h2[h2["rule"] == "clones"]["status"].tolist() == ["SKIP"]


def test_disabled_rules_and_unknown_run(tr):
    cfg = HealthConfig()
    for name in ("dead_expert", "load_cv", "maxvio", "z_loss", "nonfinite", "overconfidence", "clones", "precision"):
        cfg.rule(name).enabled = False
    h = tr.health(run="a", config=cfg)
    assert set(h["rule"]) == {"collapse"}
    with pytest.raises(ValueError, match="no run 'zzz'"):
        tr.health(run="zzz")


def test_rule_window_override(tr):
    cfg = HealthConfig()
    cfg.collapse.window = "all"
    h = tr.health(run="a", config=cfg)
    assert len(h[h["rule"] == "collapse"]) == 1 and len(h[h["rule"] == "dead_expert"]) == 3


def test_config_file(tmp_path, tr):
    p = tmp_path / "moescope.toml"
    p.write_text('[health]\nwindow = "all"\nmin_tokens = 10\n[rules.maxvio]\nwarn_above = 0.5\nfail_above = 2\n'
                 '[rules.clones]\nenabled = false\n[drift]\njs_min = 0.2\n[check]\nfail_on = "warn"\n')
    cfg = load_config(p)
    assert cfg.window == "all" and cfg.min_tokens == 10 and cfg.maxvio.fail_above == 2.0
    assert cfg.drift.js_min == 0.2 and cfg.check.fail_on == "warn" and not cfg.clones.enabled
    h = tr.health(run="a", config=p)
    assert "clones" not in set(h["rule"]) and len(h[h["rule"] == "maxvio"]) == 1
    pp = tmp_path / "pyproject.toml"
    pp.write_text("[tool.moescope.rules.collapse]\nshare = 0.8\n")
    assert load_config(pp).collapse.share == 0.8


@pytest.mark.parametrize(
    "text, needle",
    [
        ("[rules.dead_expret]\nfail_below = 0.1\n", "unknown rule 'rules.dead_expret' (did you mean 'dead_expert'?)"),
        ("[rules.maxvio]\nwarn_abve = 1\n", "unknown key 'warn_abve' (did you mean 'warn_above'?)"),
        ("[helth]\nwindow = 3\n", "unknown table [helth] (did you mean 'health'?)"),
        ("[health]\nmin_token = 3\n", "did you mean 'min_tokens'?"),
        ("[rules.collapse]\nshare = 'lots'\n", "expected a number"),
        ("[health]\nwindow = -5\n", "window"),
        ("[rules.load_cv]\nenabled = 1\n", "true or false"),
        ("[drift]\njs_mni = 0.1\n", "did you mean 'js_min'?"),
        ("not toml = = =\n", "invalid TOML"),
    ],
)
def test_config_errors_name_the_key(tmp_path, text, needle):
    p = tmp_path / "moescope.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert isinstance(e.value, ValueError)
