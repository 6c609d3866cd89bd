"""Online routing alerts: known-answer rules on hand-built windows, and a planted collapse on a live tiny Mixtral."""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from hf_helpers import plant_collapse, tiny_mixtral  # noqa: E402

from moescope.capture.alerts import (
    Alert,
    MoEAlertWarning,
    RoutingCollapseError,
    evaluate_flush,
    evaluate_window,
    resolve_rules,
)
from moescope.config import HealthConfig
from moescope.integrations._scalars import load_scalars, metrics_from_tables, window_counts

RULES = HealthConfig()


def _rules(alerts: list[Alert]) -> dict[str, str]:
    return {a.rule: a.status for a in alerts}


# -- known answers --------------------------------------------------------------------------------


def test_balanced_window_raises_nothing() -> None:
    assert evaluate_window({0: np.full(8, 100.0)}, {0: 0}, {0: 2}, 0, 9, RULES) == []


def test_two_of_four_experts_collapse() -> None:
    # Top-2 of 4, every token on experts 0 and 1: dead 2, 3; CV = 1; MaxVio = 1 (not > 1); collapse m = 2 ≤ max(2, 1).
    alerts = evaluate_window({3: np.array([500.0, 500.0, 0.0, 0.0])}, {}, {3: 2}, 10, 19, RULES, run="r", rank=1)
    got = _rules(alerts)
    assert got == {"dead_expert": "FAIL", "collapse": "FAIL", "load_cv": "WARN"}
    dead = next(a for a in alerts if a.rule == "dead_expert")
    assert dead.experts == (2, 3) and dead.layer == 3 and (dead.step_start, dead.step_end) == (10, 19)
    assert "layer 3" in dead.message and "experts 2, 3" in dead.message and "steps 10–19" in dead.message
    assert dead.message.startswith("moescope FAIL: layer 3: ") and "[dead_expert] run 'r' rank 1" in dead.message
    assert next(a for a in alerts if a.rule == "collapse").experts == (0, 1)
    assert next(a for a in alerts if a.rule == "load_cv").value == pytest.approx(1.0)


def test_maxvio_warn_and_fail_thresholds() -> None:
    # c = [x, 1, 1, 1, ...] over 8 experts: MaxVio = x/mean − 1.
    base = np.full(8, 100.0)
    warn = base.copy()
    warn[0] = 300.0  # mean 125 → MaxVio 1.4
    fail = base.copy()
    fail[0] = 2000.0  # mean 337.5 → MaxVio 4.93
    w = [a for a in evaluate_window({0: warn}, {}, {0: 2}, 0, 0, RULES) if a.rule == "maxvio"]
    f = [a for a in evaluate_window({0: fail}, {}, {0: 2}, 0, 0, RULES) if a.rule == "maxvio"]
    assert w[0].status == "WARN" and w[0].value == pytest.approx(300 / 125 - 1) and w[0].experts == (0,)
    assert f[0].status == "FAIL" and f[0].value == pytest.approx(2000 / 337.5 - 1) and f[0].threshold == 3.0


def test_dead_expert_is_five_percent_of_fair_share() -> None:
    c = np.full(4, 1000.0)
    c[2] = 0.04 * 1000 * 3 / (4 - 0.04)  # N·f_2 just below 0.05 after renormalisation
    alerts = evaluate_window({0: c}, {}, {0: 1}, 0, 0, RULES)
    assert [a.experts for a in alerts if a.rule == "dead_expert"] == [(2,)]
    c[2] = 60.0  # N·f_2 ≈ 0.078: alive
    assert not [a for a in evaluate_window({0: c}, {}, {0: 1}, 0, 0, RULES) if a.rule == "dead_expert"]


def test_too_little_data_skips_load_rules_but_not_nonfinite() -> None:
    # kT/N = Σc/N = 40 < 50: a fully collapsed window is still too small to judge.
    small = {0: np.array([80.0, 80.0, 0.0, 0.0])}
    assert evaluate_window(small, {}, {0: 2}, 0, 0, RULES) == []
    alerts = evaluate_window(small, {0: 3}, {0: 2}, 0, 0, RULES)
    assert _rules(alerts) == {"nonfinite": "FAIL"} and alerts[0].value == 3


def test_rules_from_mapping_and_disabled() -> None:
    r = resolve_rules({"min_expected": 1, "disabled": ["load_cv"]})
    got = _rules(evaluate_window({0: np.array([80.0, 80.0, 0.0, 0.0])}, {}, {0: 2}, 0, 0, r))
    assert got == {"dead_expert": "FAIL", "collapse": "FAIL"}
    r = resolve_rules({"rules": {"collapse": {"enabled": False}}, "health": {"min_tokens": 1}})
    assert "collapse" not in _rules(evaluate_window({0: np.array([80.0, 80.0, 0.0, 0.0])}, {}, {0: 2}, 0, 0, r))
    with pytest.raises(ValueError, match="unknown table"):
        resolve_rules({"nope": 1})
    with pytest.raises(ValueError, match=r"rules.collapse.share = 1.5 is out of range"):
        resolve_rules({"rules": {"collapse": {"share": 1.5}}})
    with pytest.raises(TypeError, match="alert_rules"):
        resolve_rules(3)


def test_rules_follow_health_config(tmp_path: Path) -> None:
    from moescope.capture.alerts import default_rules

    assert default_rules() == HealthConfig()  # the online defaults are the check's defaults
    cfg = HealthConfig()
    cfg.maxvio.fail_above = None
    cfg.min_tokens = 7
    cfg.load_cv.enabled = False
    r = resolve_rules(cfg)
    c = np.array([1000.0, 10.0, 10.0, 10.0, 10.0, 10.0, 10.0, 10.0])  # MaxVio ≈ 6.6: only WARN without a FAIL bar
    got = evaluate_window({0: c}, {}, {0: 1}, 0, 0, r)
    assert [a.status for a in got if a.rule == "maxvio"] == ["WARN"] and "load_cv" not in _rules(got)
    toml = tmp_path / "moescope.toml"
    toml.write_text("[rules.maxvio]\nfail_above = 5.0\n[rules.dead_expert]\nfail_below = 0.1\n")
    r = resolve_rules(toml)
    assert (r.maxvio.fail_above, r.dead_expert.fail_below) == (5.0, 0.1)


def test_scalars_known_answer() -> None:
    s = load_scalars(2, np.array([3, 1, 0, 0]))
    assert s.load_cv == pytest.approx(np.std([3, 1, 0, 0]) / 1.0)
    assert s.maxvio == pytest.approx(2.0)
    assert s.entropy_norm == pytest.approx(-(0.75 * np.log(0.75) + 0.25 * np.log(0.25)) / np.log(4))
    assert s.dead_experts == 2
    table = pa.table(
        {
            "step": [0, 0, 1, 1, 1, 1],
            "tag": ["", "", "", "", "val", "val"],
            "layer": pa.array([0, 0, 0, 0, 0, 0], pa.int16()),
            "expert": pa.array([0, 1, 0, 1, 0, 1], pa.int16()),
            "tokens": [1, 3, 2, 2, 100, 0],
        }
    )
    assert window_counts(table, [""])[0].tolist() == [3, 5]
    assert window_counts(table)[0].tolist() == [103, 5]
    m = metrics_from_tables({"expert_load": table}, [""])
    assert set(m) == {f"moescope/layer0/{k}"
                      for k in ("load_cv", "maxvio", "entropy_norm", "dead_experts", "min_utilization")}
    assert m["moescope/layer0/min_utilization"] == pytest.approx(2 * 3 / 8)  # N·c_min/Σc
    assert m["moescope/layer0/maxvio"] == pytest.approx(5 / 4 - 1)


# -- evaluate_flush reporting ---------------------------------------------------------------------


class _FakeRecorder:
    """The attributes evaluate_flush reads from a Recorder."""

    def __init__(self, raise_on: str | None = None, on_alert: Any = None) -> None:
        self.layers = [SimpleNamespace(layer=0, module="m.layers.0.gate", n_experts=4, top_k=2)]
        self.alerts: list[Alert] = []
        self.on_alert = on_alert
        self.raise_on = raise_on
        self.alert_rules = None
        self.run, self.rank, self.run_dir = "r", 0, Path("x")
        self.closed = 0

    def close(self) -> None:
        self.closed += 1


def _collapsed_flush() -> tuple[list[Any], list[Any]]:
    load = [(s, "", 0, np.array([[100.0, 50, 50], [100, 50, 50], [0, 0, 0], [0, 0, 0]])) for s in (4, 5)]
    # entropy_sum = 100 tokens × 0.5 ln 4: a router still mixing, so only the load rules fire.
    stats = [(s, "", 0, np.array([100.0, 50 * np.log(4), 0, 0, 0, 0, 0, 0])) for s in (4, 5)]
    return load, stats


def test_evaluate_flush_reports_once(caplog: pytest.LogCaptureFixture) -> None:
    # With a callback the callback is the report (no warning); logging gets a record where it is configured.
    seen: list[Alert] = []
    rec = _FakeRecorder(on_alert=seen.append)
    with caplog.at_level(logging.WARNING, logger="moescope"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = evaluate_flush(rec, *_collapsed_flush())  # type: ignore[arg-type]
    assert not [w for w in caught if issubclass(w.category, MoEAlertWarning)]
    assert {a.rule for a in out} == {"dead_expert", "collapse", "load_cv"}
    assert seen == out == rec.alerts and rec.closed == 0
    assert all(a.step_start == 4 and a.step_end == 5 and a.module == "m.layers.0.gate" for a in out)
    assert any(r.levelno == logging.ERROR and "experts 2, 3" in r.getMessage() for r in caplog.records)
    # Without a callback: one warning per alert, pointing at the caller's line (this file), not into moescope.
    rec = _FakeRecorder()
    with pytest.warns(MoEAlertWarning, match="layer 0") as record:
        evaluate_flush(rec, *_collapsed_flush())  # type: ignore[arg-type]
    assert len(record) == 3 and {Path(w.filename).name for w in record} == {"test_alerts.py"}


def test_plain_script_prints_one_line_per_alert(tmp_path: Path) -> None:
    # A plain script (no logging set up, no callback): each alert is one warning line at the user's line,
    # not a warning plus a last-resort logger echo.
    script = tmp_path / "train.py"
    script.write_text(
        "import numpy as np\n"
        "from types import SimpleNamespace\n"
        "from pathlib import Path\n"
        "from moescope.capture.alerts import evaluate_flush\n"
        "rec = SimpleNamespace(layers=[SimpleNamespace(layer=0, module='gate', n_experts=4, top_k=2)], alerts=[],\n"
        "    on_alert=None, raise_on=None, alert_rules=None, run='r', rank=0, run_dir=Path('x'), close=lambda: None)\n"
        "load = [(4, '', 0, np.array([[100.0, 50, 50], [100, 50, 50], [0, 0, 0], [0, 0, 0]]))]\n"
        "stats = [(4, '', 0, np.array([100.0, 69.3, 0, 0, 0, 0, 0, 0]))]\n"
        "evaluate_flush(rec, load, stats)  # USER LINE\n"
    )
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=True)
    alert_lines = [ln for ln in res.stderr.splitlines() if "moescope FAIL" in ln or "moescope WARN" in ln]
    assert len(alert_lines) == 3, res.stderr
    assert all(ln.startswith(f"{script}:9: MoEAlertWarning") for ln in alert_lines), res.stderr


def test_evaluate_flush_raise_on_fail_closes_first() -> None:
    rec = _FakeRecorder(raise_on="fail")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MoEAlertWarning)
        with pytest.raises(RoutingCollapseError, match=r"layer 0 .*recording stopped") as ei:
            evaluate_flush(rec, *_collapsed_flush())  # type: ignore[arg-type]
    assert rec.closed == 1 and {a.status for a in ei.value.alerts} == {"FAIL"}


# -- live recorder (tiny_mixtral needs torch + transformers) --------------------------------------


@pytest.mark.hf
def test_planted_collapse_alerts_within_one_flush(tmp_path: Path) -> None:
    import torch

    import moescope

    model = tiny_mixtral()
    plant_collapse(model)
    seen: list[Alert] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with moescope.record(model, tmp_path / "run", flush_every=2, on_alert=seen.append) as rec:
            for step in range(2):
                rec.step = step
                model(input_ids=torch.randint(0, 100, (2, 32)))
            assert seen == []  # nothing flushed yet
            rec.step = 2
            model(input_ids=torch.randint(0, 100, (2, 32)))  # starts step 2: the window 0–1 flushes
            assert {(a.rule, a.layer) for a in seen} >= {("collapse", 0), ("collapse", 1), ("dead_expert", 0)}
            assert all((a.step_start, a.step_end) == (0, 1) for a in seen)
    # The callback is the report: no second copy as a warning.
    assert not any(issubclass(w.category, MoEAlertWarning) for w in caught)
    assert next(a for a in seen if a.rule == "dead_expert").experts == (2, 3)


@pytest.mark.hf
def test_raise_on_fail_stops_and_detaches(tmp_path: Path) -> None:
    import pyarrow.parquet as pq
    import torch

    import moescope

    model = tiny_mixtral()
    plant_collapse(model)
    steps_run = 0
    with pytest.raises(RoutingCollapseError, match="layer 0"), warnings.catch_warnings():
        warnings.simplefilter("ignore", MoEAlertWarning)
        with moescope.record(model, tmp_path / "run", flush_every=2, raise_on="fail") as rec:
            for step in range(10):
                rec.step = step
                model(input_ids=torch.randint(0, 100, (2, 32)))
                steps_run += 1
    assert steps_run == 2  # the first forward of step 2 flushed window 0–1 and raised
    assert not rec._open and len(rec._handles) == 0
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    assert hooks == 0
    steps = pq.read_table(tmp_path / "run" / "expert_load").column("step").to_pylist()
    assert sorted(set(steps)) == [0, 1]  # the window that raised is on disk


@pytest.mark.hf
def test_rank_names_parts(tmp_path: Path) -> None:
    import torch

    import moescope

    model = tiny_mixtral()
    with moescope.record(model, tmp_path / "run", rank=3) as rec:
        rec.step = 0
        model(input_ids=torch.randint(0, 100, (1, 8)))
    parts = sorted(p.name for p in (tmp_path / "run" / "expert_load").iterdir())
    assert parts and all(p.startswith("part-3-") for p in parts)


def test_import_moescope_imports_no_framework() -> None:
    code = (
        "import moescope, moescope.capture.alerts, moescope.integrations._scalars, sys; "
        "bad = [m for m in ('lightning', 'pytorch_lightning', 'transformers') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def doc_example(heading: str) -> str:
    """The python block under `### heading` in docs/integrations.md."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "integrations.md").read_text()
    return text.split(f"### {heading}\n", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]


@pytest.mark.hf
def test_docs_plain_loop_example_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    exec(compile(doc_example("Plain PyTorch loop"), "docs/integrations.md", "exec"), {"__name__": "doc_example"})
    import pyarrow.parquet as pq

    st = pq.read_table(tmp_path / "traces" / "plain-run" / "router_stats").to_pandas()
    assert sorted(st.step.unique()) == list(range(8)) and (st.tokens == 2 * 8 * 32).all()


@pytest.mark.hf
def test_live_recorder_alert_points_at_the_users_line(tmp_path: Path) -> None:
    # A plain script with a real recorder: one warning line per alert, at the script's own line.
    tests_dir = Path(__file__).resolve().parents[1]
    script = tmp_path / "train.py"
    script.write_text(
        "import sys, torch\n"
        f"sys.path.insert(0, {str(tests_dir)!r})\n"
        "import moescope\n"
        "from hf_helpers import plant_collapse, tiny_mixtral\n"
        "model = tiny_mixtral()\n"
        "plant_collapse(model)\n"
        f"with moescope.record(model, {str(tmp_path / 'run')!r}, flush_every=2, alert_rules={{}}) as rec:\n"
        "    for step in range(3):\n"
        "        rec.step = step  # line 9: a new step may flush the last window\n"
        "        model(input_ids=torch.randint(0, 100, (2, 32)))  # line 10: or the forward that starts it\n"
    )
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, check=True)
    lines = [ln for ln in res.stderr.splitlines() if "MoEAlertWarning" in ln]
    alerts = [ln for ln in res.stderr.splitlines() if "moescope FAIL" in ln or "moescope WARN" in ln]
    assert lines and len(alerts) == len(lines), res.stderr  # no second copy through a logger
    # The warning names the user's line that flushed (which of the two depends on where the recorder flushes).
    assert all(ln.startswith((f"{script}:9: MoEAlertWarning: moescope ", f"{script}:10: MoEAlertWarning: moescope "))
               for ln in lines), res.stderr
