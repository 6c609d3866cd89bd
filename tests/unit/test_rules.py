"""The rule registry: one Status order, online alerts and Trace.health() agree on the same counts, the numpy
metrics equal the SQL ones, the over-confidence rule's known answers, and range-checked configs."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from trace_helpers import layer_spec, load_frame, stats_frame

import moescope
from moescope.analysis.rules import (
    REGISTRY,
    STATUS_ORDER,
    Status,
    cell_values,
    rules,
    severity,
    worst,
)
from moescope.capture.alerts import evaluate_window
from moescope.cli import main
from moescope.config import ConfigError, HealthConfig, config_from_dict, load_config

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]

# One step per layer, each layer a different situation: (N, k, counts, router tokens T, entropy share, nonfinite).
LAYERS = {
    0: (4, 2, [250, 250, 250, 250], 500, 0.9, 0),  # healthy: every rule passes
    1: (4, 2, [500, 500, 0, 0], 500, 0.5, 0),  # dead 2, 3; collapse onto 0, 1; CV 1.0 (WARN); MaxVio 1.0 (not > 1)
    2: (8, 1, [2000] + [100] * 7, 2700, 0.6, 0),  # MaxVio 4.93: FAIL; CV WARN
    3: (4, 2, [20, 0, 0, 0], 10, 0.5, 3),  # kT/N = 5 < 50: load rules SKIP; 3 NaN tokens: FAIL
    4: (2, 2, [100, 100], 100, 0.9, 0),  # m = max(k, N/4) = 2 = N: collapse undefined (SKIP)
    5: (4, 1, [100, 100, 100, 100], 400, 0.04, 0),  # a router that stopped mixing: over-confidence WARN
    6: (8, 2, [300] + [100] * 7, 500, 0.7, 0),  # MaxVio 1.4: WARN
    7: (16, 2, [200] * 2 + [40] * 14, 480, 0.3, 0),  # top-4 share 520/960 = 0.54: no collapse; no dead expert
    # Tokens dropped over capacity: Σc = 100 < kT = 240. Data enough by kT/N = 60 (the one skip rule), though
    # Σc/N = 25 (the old online skip rule, which disagreed with health here).
    8: (4, 2, [90, 10, 0, 0], 120, 0.5, 0),
}


@pytest.fixture
def tr(make_run, trace_root):
    el, rs, layers = [], [], []
    for layer, (n, k, counts, t, h, bad) in LAYERS.items():
        layers.append(layer_spec(layer, n, k))
        el.append(load_frame([(0, layer, counts)]))
        rs.append({"step": 0, "layer": layer, "tokens": t, "entropy_sum": h * t * math.log(n), "nonfinite": bad,
                   "lse_sq_sum": 2.0 * t})
    make_run("a", layers=layers, expert_load=pd.concat(el, ignore_index=True), router_stats=stats_frame(rs))
    return moescope.open(trace_root)


def _online(cfg: HealthConfig) -> dict[tuple[str, int], tuple[str, float]]:
    load = {layer: np.array(c, dtype=float) for layer, (_, _, c, _, _, _) in LAYERS.items()}
    router = {layer: {"tokens": float(t), "entropy_sum": h * t * math.log(n), "nonfinite": float(bad),
                      "lse_sq_sum": 2.0 * t} for layer, (n, _, _, t, h, bad) in LAYERS.items()}
    top_k = {layer: k for layer, (_, k, _, _, _, _) in LAYERS.items()}
    n_exp = {layer: n for layer, (n, _, _, _, _, _) in LAYERS.items()}
    alerts = evaluate_window(load, {}, top_k, 0, 0, cfg, router=router, n_experts=n_exp)
    return {(a.rule, a.layer): (a.status, a.value) for a in alerts}


@pytest.mark.parametrize("cfg", [HealthConfig(window="all"), config_from_dict(
    {"health": {"window": "all", "min_tokens": 4}, "rules": {"collapse": {"share": 0.5}, "maxvio": {"fail_above": 1.2},
                                                            "overconfidence": {"warn_below": 0.65}}})],
                         ids=["defaults", "custom"])
def test_online_alerts_and_health_agree_on_the_same_counts(tr, cfg: HealthConfig) -> None:
    h = tr.health(config=cfg)
    online = _online(cfg)
    checked = 0
    for spec in rules("window", online=True):
        for layer in LAYERS:
            row = h[(h["rule"] == spec.name) & (h["layer"] == layer)]
            assert len(row) == 1, (spec.name, layer, row)
            status, value = row["status"].iloc[0], row["value"].iloc[0]
            if status in ("WARN", "FAIL"):
                assert (spec.name, layer) in online, (spec.name, layer, status, row["message"].iloc[0])
                assert online[(spec.name, layer)][0] == status
                assert online[(spec.name, layer)][1] == pytest.approx(value, rel=1e-9)
                checked += 1
            else:  # PASS and SKIP raise no alert
                assert (spec.name, layer) not in online, (spec.name, layer, status, online.get((spec.name, layer)))
    assert checked >= 6  # the fixture does exercise the WARN/FAIL paths
    assert len(online) == checked


def test_known_verdicts_under_defaults(tr) -> None:
    h = tr.health(config=HealthConfig(window="all"))
    h = h[h["layer"].notna()]
    got = {(r.rule, int(r.layer)): r.status for r in h.itertuples()}
    assert {k for k, v in got.items() if k[1] == 0 and v != "PASS"} <= {("z_loss", 0)}  # healthy layer
    assert got[("dead_expert", 1)] == got[("collapse", 1)] == "FAIL" and got[("load_cv", 1)] == "WARN"
    assert got[("maxvio", 1)] == "PASS" and got[("maxvio", 2)] == "FAIL" and got[("maxvio", 6)] == "WARN"
    assert {got[(r, 3)] for r in ("dead_expert", "load_cv", "maxvio", "collapse")} == {"SKIP"}
    assert got[("nonfinite", 3)] == "FAIL"
    assert got[("collapse", 4)] == "SKIP" and "undefined" in h[(h.rule == "collapse") & (h.layer == 4)].message.iloc[0]
    assert got[("overconfidence", 5)] == "WARN" and got[("collapse", 7)] == "PASS" and got[("dead_expert", 7)] == "PASS"
    assert got[("dead_expert", 8)] == "FAIL" and got[("collapse", 8)] == "FAIL"


def test_numpy_metrics_equal_the_sql_ones(tr) -> None:
    lm = tr.load_metrics(window="all").set_index("layer")
    cols = ["cv", "maxvio", "load_entropy", "min_utilization", "max_utilization", "top_m_share", "collapse_m",
            "expected_per_expert", "router_entropy", "z_loss", "tokens", "assignments"]
    for layer, (n, k, counts, t, h, bad) in LAYERS.items():
        v = cell_values(np.array(counts), k, t, nonfinite=bad, entropy_sum=h * t * math.log(n), lse_sq_sum=2.0 * t)
        for c in cols:
            assert v[c] == pytest.approx(float(lm.loc[layer, c]), rel=1e-9), (layer, c)
    # Without router tokens T = Σc/k, as utilization.sql's fallback.
    assert cell_values(np.array([30, 10]), 2)["expected_per_expert"] == pytest.approx(20.0)


# -- the new rule: router over-confidence ---------------------------------------------------------------------


@pytest.mark.parametrize(("share", "status"), [(0.05, "WARN"), (0.0999, "WARN"), (0.1, "PASS"), (0.8, "PASS")])
def test_overconfidence_known_answer(make_run, trace_root, share: float, status: str) -> None:
    n, t = 8, 1000
    make_run("r", layers=[layer_spec(0, n, 2)], expert_load=load_frame([(0, 0, [250] * 8)]),
             router_stats=stats_frame([{"step": 0, "layer": 0, "tokens": t, "entropy_sum": share * t * math.log(n)}]))
    h = moescope.open(trace_root).health(config=HealthConfig(window="all"))
    row = h[h["rule"] == "overconfidence"].iloc[0]
    assert row["status"] == status and row["value"] == pytest.approx(share) and row["threshold"] == 0.1
    assert row["metric"] == "router_entropy"
    if status == "WARN":
        assert "router stopped mixing" in row["message"]


def test_overconfidence_threshold_and_skip(make_run, trace_root) -> None:
    make_run("r", layers=[layer_spec(0, 4, 1)], expert_load=load_frame([(0, 0, [100] * 4)]),
             router_stats=stats_frame([{"step": 0, "layer": 0, "tokens": 400, "entropy_sum": 0.5 * 400 * math.log(4)}]))
    make_run("counts_only", layers=[layer_spec(0, 4, 1)], expert_load=load_frame([(0, 0, [100] * 4)]))
    tr = moescope.open(trace_root)
    cfg = config_from_dict({"rules": {"overconfidence": {"warn_below": 0.6}}, "health": {"window": "all"}})
    h = tr.health(config=cfg)
    oc = h[h["rule"] == "overconfidence"].set_index("run")
    assert oc.loc["r", "status"] == "WARN" and oc.loc["r", "threshold"] == 0.6
    assert oc.loc["counts_only", "status"] == "SKIP"  # no router_stats: nothing to judge, never PASS


def test_collapse_run_of_the_demo_stopped_mixing() -> None:
    # sample_traces (the demo's output): the collapse run's routers are near one-hot, the balanced run's are not.
    tr = moescope.open(ROOT / "sample_traces")
    h = tr.health()
    oc = h[h["rule"] == "overconfidence"]
    assert set(oc[oc["run"] == "collapse"]["status"]) == {"WARN"}
    assert set(oc[oc["run"] == "balanced"]["status"]) == {"PASS"}


# -- one Status -----------------------------------------------------------------------------------------------


def test_one_status_order() -> None:
    assert STATUS_ORDER == ("PASS", "SKIP", "WARN", "FAIL", "ERROR")
    assert Status.PASS < Status.SKIP < Status.WARN < Status.FAIL < Status.ERROR
    assert max(Status) is Status.ERROR and Status("FAIL") > "WARN"
    assert worst(["PASS", "FAIL", "SKIP"]) == "FAIL" and worst([]) == "PASS" and worst(["WARN", "ERROR"]) == "ERROR"
    assert [severity(s) for s in STATUS_ORDER] == [0, 1, 2, 3, 4]
    from moescope.check import READING_ORDER
    from moescope.dashboard.data import STATUS_ORDER as DASH

    assert READING_ORDER == tuple(reversed(STATUS_ORDER)) and DASH is STATUS_ORDER


# -- config: every rule has its row, every value is range-checked ----------------------------------------------


def test_example_toml_lists_every_rule_with_its_defaults() -> None:
    data = tomllib.loads((ROOT / "moescope.example.toml").read_text(encoding="utf-8"))
    assert set(data["rules"]) == set(REGISTRY)
    cfg = load_config(ROOT / "moescope.example.toml")
    assert cfg == HealthConfig(window="thirds")  # every value in the example is the built-in default


BAD = [
    ("[rules.collapse]\nshare = 1.5\n", "rules.collapse.share = 1.5 is out of range (allowed: a number in (0, 1])"),
    ("[rules.maxvio]\nwarn_above = nan\n", "rules.maxvio.warn_above = nan is not a finite number"),
    ("[rules.dead_expert]\nfail_below = inf\n", "rules.dead_expert.fail_below = inf is not a finite number"),
    ("[rules.load_cv]\nwarn_above = -1\n", "rules.load_cv.warn_above = -1.0 is out of range (allowed: a number > 0)"),
    ("[rules.nonfinite]\nfail_above = -1\n", "rules.nonfinite.fail_above = -1 is out of range (allowed: an integer ≥ 0)"),
    ("[rules.maxvio]\nwarn_above = 2.0\nfail_above = 1.0\n", "rules.maxvio: fail_above = 1 is below warn_above = 2"),
    ("[drift]\nn_boot = 0\n", "drift.n_boot = 0 is out of range (allowed: an integer ≥ 1)"),
    ("[drift]\nquantile = 2\n", "drift.quantile = 2.0 is out of range (allowed: a number in (0, 1))"),
    ('[rules.clones]\nmetrics = ["bogus"]\n', "rules.clones.metrics: unknown value 'bogus' (allowed: subspace_overlap, cka)"),
    ("[rules.overconfidence]\nwarn_below = 1.0\n", "rules.overconfidence.warn_below = 1.0 is out of range"),
    ("[rules.z_loss]\ngrowth = 0.5\n", "rules.z_loss.growth = 0.5 is out of range (allowed: a number > 1)"),
    ("[health]\nmin_tokens = -3\n", "health.min_tokens = -3 is out of range (allowed: an integer ≥ 0)"),
    ("[health]\nwindow = 0\n", "health.window = 0: expected"),
    ('[check]\nfail_on = "never"\n', 'check: fail_on must be "fail" or "warn"'),
]


@pytest.mark.parametrize(("text", "message"), BAD, ids=[b[1].split(" ")[0] for b in BAD])
def test_out_of_range_values_are_config_errors(tmp_path: Path, text: str, message: str) -> None:
    p = tmp_path / "moescope.toml"
    p.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    assert str(ei.value).startswith(f"{p}: ") and message in str(ei.value) and "\n" not in str(ei.value)


def test_programmatic_configs_are_checked_too(tr) -> None:
    cfg = HealthConfig()
    cfg.collapse.share = float("nan")
    with pytest.raises(ConfigError, match="rules.collapse.share = nan is not a finite number"):
        tr.health(config=cfg)
    from moescope.analysis.rules import DriftConfig

    with pytest.raises(ConfigError, match="drift.quantile"):
        tr.drift({}, {}, config=DriftConfig(quantile=1.0))


@pytest.mark.parametrize("text", [b[0] for b in BAD[:3]] + [b"\xff\xfe[rules]\n"], ids=["share", "nan", "inf", "utf8"])
def test_cli_exits_2_with_one_line(tr, trace_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                   text: str | bytes) -> None:
    p = tmp_path / "bad.toml"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    for cmd in (["check", str(trace_root), "--config", str(p)], ["report", str(trace_root), "--config", str(p)]):
        assert main(cmd) == 2, cmd
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(p) in err and "Traceback" not in err, err
    if isinstance(text, bytes):
        assert "not UTF-8" in err


def test_registry_order_is_report_order() -> None:
    # Findings, alerts and the example toml list rules in this order; an import sorter must not reshuffle it.
    assert list(REGISTRY) == ["dead_expert", "load_cv", "maxvio", "collapse", "z_loss", "nonfinite",
                              "overconfidence", "clones", "precision"]
    assert [s.name for s in rules(online=True)] == ["dead_expert", "load_cv", "maxvio", "collapse", "nonfinite",
                                                    "overconfidence"]


def test_report_and_whatif_usage_errors(tr, trace_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for cmd, text in ((["report", str(trace_root), "--window", "0"], "--window"),
                      (["report", str(trace_root), "--run", "nope"], "no run 'nope'"),
                      (["whatif", str(trace_root), "capacity", "--run", "nope"], "--run: no run 'nope' in this trace (runs: 'a')")):
        assert main(cmd) == 2, cmd
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and text in err, err
    with pytest.raises(ValueError, match=r"health: no run 'nope' in this trace \(runs: 'a'\)"):
        tr.health(run="nope")


def test_alerts_read_a_config_file_once_per_change(tmp_path: Path) -> None:
    from moescope.capture.alerts import resolve_rules

    p = tmp_path / "moescope.toml"
    p.write_text("[rules.collapse]\nshare = 0.8\n", encoding="utf-8")
    first = resolve_rules(p)
    assert first.collapse.share == 0.8 and resolve_rules(p) is first  # cached while unchanged
    p.write_text("[rules.collapse]\nshare = 0.85\n", encoding="utf-8")
    assert resolve_rules(p).collapse.share == 0.85
