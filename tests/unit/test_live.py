"""A trace that follows its files: Trace.refresh(), data_version, the live state, and alerts kept in the trace."""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
from trace_helpers import layer_spec, load_frame, stats_frame

import moescope
from moescope.analysis.live import LiveState
from moescope.format.writer import write_manifest, write_run

LAYERS = [layer_spec(0, 4, 1)]


def _load(steps: range) -> pd.DataFrame:
    return load_frame([(s, 0, [100, 100, 100, 100]) for s in steps])


def _stats(steps: range) -> pd.DataFrame:
    return stats_frame([{"step": s, "layer": 0, "tokens": 400} for s in steps])


def _steps(tr: moescope.Trace) -> list[int]:
    return [int(r[0]) for r in tr.sql("SELECT DISTINCT step FROM expert_load ORDER BY step").fetchall()]


def test_refresh_picks_up_new_parts_ranks_and_runs(trace_root: Path, make_run: Callable[..., Path]) -> None:
    run_dir = make_run("a", layers=LAYERS, expert_load=_load(range(0, 2)), router_stats=_stats(range(0, 2)))
    tr = moescope.open(trace_root)
    assert _steps(tr) == [0, 1] and tr.data_version == 0
    assert tr.refresh() is False and tr.data_version == 0  # nothing new: nothing rebuilt

    write_run(run_dir, {"expert_load": _load(range(2, 4)), "router_stats": _stats(range(2, 4))}, run="a")
    assert tr.refresh() is True and tr.data_version == 1
    assert _steps(tr) == [0, 1, 2, 3]
    assert tr.utilization(run="a", window="all")["assignments"].sum() == 4 * 400

    # another rank of the same run, then a new run: both show up, with their manifests
    write_run(run_dir, {"expert_load": _load(range(4, 5))}, run="a", rank=1, layers=LAYERS)
    make_run("b", layers=LAYERS, expert_load=_load(range(0, 1)))
    assert tr.refresh() is True and tr.data_version == 2
    assert tr.runs == ["a", "b"]
    ranks = tr.sql("SELECT DISTINCT rank FROM expert_load WHERE run = 'a' ORDER BY rank").fetchall()
    assert [r[0] for r in ranks] == [0, 1]
    assert tr.sql("SELECT COUNT(*) FROM runs").fetchall()[0][0] == 3  # a rank 0, a rank 1, b
    assert tr.sql("SELECT COUNT(*) FROM layer_info WHERE run = 'b'").fetchall()[0][0] == 1
    tr.close()


def test_refresh_reads_no_known_file_again(
    trace_root: Path, make_run: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = make_run("a", layers=LAYERS, expert_load=_load(range(0, 2)))
    tr = moescope.open(trace_root)
    checked: list[Path] = []
    import moescope.analysis.trace as T

    real = T._check_file
    monkeypatch.setattr(T, "_check_file", lambda p: checked.append(p) or real(p))
    write_run(run_dir, {"expert_load": _load(range(2, 3))}, run="a")
    assert tr.refresh()
    assert [p.name for p in checked] == ["part-0-000001.parquet"]  # only the new part's footer was read
    tr.close()


def test_partial_vanished_and_temporary_parts_are_skipped(trace_root: Path, make_run: Callable[..., Path]) -> None:
    run_dir = make_run("a", layers=LAYERS, expert_load=_load(range(0, 2)))
    tr = moescope.open(trace_root)
    # a writer's temporary file (renamed when complete) and a part still being copied by a foreign tool
    (run_dir / "expert_load" / ".part-0-000001.parquet.123.tmp").write_bytes(b"PAR1 half")
    (run_dir / "expert_load" / "part-0-000009.parquet").write_bytes(b"PAR1 half a file")
    assert tr.refresh() is False
    assert _steps(tr) == [0, 1]
    # the partial part becomes complete: the next refresh takes it
    os.remove(run_dir / "expert_load" / "part-0-000009.parquet")
    write_run(run_dir, {"expert_load": _load(range(2, 3))}, run="a")
    assert tr.refresh() is True and _steps(tr) == [0, 1, 2]
    # a part that vanishes is dropped from the views, not an error
    os.remove(run_dir / "expert_load" / "part-0-000001.parquet")
    assert tr.refresh() is True and _steps(tr) == [0, 1]
    tr.close()


def test_refresh_in_locked_mode(trace_root: Path, make_run: Callable[..., Path]) -> None:
    run_dir = make_run("a", layers=LAYERS, expert_load=_load(range(0, 2)))
    tr = moescope.open(trace_root, locked=True)
    write_run(run_dir, {"expert_load": _load(range(2, 3))}, run="a")
    assert tr.refresh()
    assert tr.query("SELECT MAX(step) AS s FROM expert_load")["s"].iloc[0] == 2
    with pytest.raises(Exception, match="refused|not allowed"):
        tr.query("CREATE TABLE x AS SELECT 1")
    tr.close()


def test_snapshot_appears_after_refresh(trace_root: Path, make_run: Callable[..., Path]) -> None:
    run_dir = make_run("a", layers=LAYERS, expert_load=_load(range(0, 2)))
    tr = moescope.open(trace_root)
    assert tr.similarity(run="a").empty
    sim = pd.DataFrame({"step": [5], "layer": [0], "expert_a": [0], "expert_b": [1], "metric": ["cka"],
                        "value": [0.97]})
    write_run(run_dir, {"expert_similarity": sim}, run="a")
    assert tr.refresh()
    got = tr.similarity(run="a")
    assert got[["expert_a", "expert_b", "value"]].values.tolist() == [[0, 1, 0.97]]
    tr.close()


def test_live_state_follows_the_manifest(trace_root: Path, make_run: Callable[..., Path]) -> None:
    run_dir = make_run("a", layers=LAYERS, expert_load=_load(range(0, 1235)), extra={"closed": False})
    tr = moescope.open(trace_root)
    st = tr.live_state()
    assert st.state == "recording" and st.step == 1234
    assert st.describe(now=st.updated + 3) == "recording · step 1,234 · updated 3 s ago"
    m = tr.manifest("a")
    time.sleep(0.01)  # a new mtime
    write_manifest(run_dir, {**{k: v for k, v in m.items() if k not in ("format", "version")}, "closed": True})
    assert tr.refresh()
    assert tr.live_state().describe() == "finished · step 1,234"
    stop = {"step": 99, "rule": "collapse", "layer": 1}
    time.sleep(0.01)
    write_manifest(run_dir, {**{k: v for k, v in m.items() if k not in ("format", "version")}, "closed": True,
                             "stopped_by_alert": stop})
    assert tr.refresh()
    assert tr.live_state().describe() == "stopped by an alert at step 99 (collapse, layer 1)"
    tr.close()
    assert LiveState("recording", None, None).describe() == "recording · no steps yet"


# -- alerts kept in the trace ------------------------------------------------------------------------


def _collapsed_toy() -> object:
    torch = pytest.importorskip("torch")
    from toy_moe import ToyMoE

    torch.manual_seed(0)
    model = ToyMoE(vocab=64, hidden=16, n_layers=2, n_experts=8, top_k=2)
    with torch.no_grad():  # every token to experts 0 and 1: channel 0 dominates every router's input
        model.emb.weight[:, 0] += 50.0
        for blk in model.blocks:
            blk.router.proj.weight.zero_()
            blk.router.proj.weight[:2, 0] = 5.0
    return model


def test_alerts_are_written_to_the_trace(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    model = _collapsed_toy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with moescope.record(model, tmp_path / "run", flush_every=2, alert_rules={}) as rec:
            for step in range(4):
                rec.step = step
                model(torch.randint(0, 64, (4, 32)))
    assert rec.alerts
    tr = moescope.open(tmp_path / "run")
    df = tr.query("SELECT * FROM alerts ORDER BY step, layer, rule")
    assert len(df) == len(rec.alerts)
    got = {(int(r.step_start), int(r.step), int(r.layer), r.rule) for r in df.itertuples()}
    assert ("collapse" in df["rule"].tolist()) and (0, 1, 0, "collapse") in got and (2, 3, 1, "collapse") in got
    dead = df[(df["rule"] == "dead_expert") & (df["layer"] == 0)].iloc[0]
    assert list(dead["experts"]) == [2, 3, 4, 5, 6, 7] and dead["threshold"] == pytest.approx(0.05)
    assert "stopped_by_alert" not in tr.manifest("run")
    assert tr.live_state().state == "finished"
    tr.close()


def test_raise_on_stop_is_in_manifest_and_alerts(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from moescope.capture.alerts import RoutingCollapseError

    model = _collapsed_toy()
    with pytest.raises(RoutingCollapseError), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with moescope.record(model, tmp_path / "run", flush_every=2, raise_on="fail") as rec:
            for step in range(10):
                rec.step = step
                model(torch.randint(0, 64, (4, 32)))
    tr = moescope.open(tmp_path / "run")
    m = tr.manifest("run")
    assert m["closed"] is True
    assert m["stopped_by_alert"]["step"] == 1 and m["stopped_by_alert"]["layer"] == 0
    assert m["stopped_by_alert"]["rule"] in {"dead_expert", "collapse"}
    n = tr.sql("SELECT COUNT(*) FROM alerts WHERE step = 1").fetchall()[0][0]
    assert n == len(rec.alerts) > 0
    assert tr.live_state().describe().startswith("stopped by an alert at step 1 (")
    tr.close()


def test_check_and_report_on_snapshot_only_and_alerts(trace_root: Path, make_run: Callable[..., Path],
                                                      tmp_path: Path) -> None:
    import subprocess
    import sys

    sim = pd.DataFrame({"step": [5, 5], "layer": [0, 0], "expert_a": [0, 0], "expert_b": [1, 2],
                        "metric": ["subspace_overlap"] * 2, "value": [0.95, 0.1]})
    make_run("ckpt", layers=LAYERS, expert_similarity=sim)
    cli = [sys.executable, "-m", "moescope"]
    r = subprocess.run([*cli, "check", str(trace_root)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "WARN    clones" in r.stdout and "0-1" in r.stdout

    # a stopped run's alerts show in check and report
    from moescope.capture.alerts import Alert
    from moescope.capture.recorder import alerts_table

    a = Alert("collapse", "FAIL", 0, (0,), 0, 9, 0.97, 0.9, "routing collapsed on expert 0", "r", 0)
    run_dir = make_run("r", layers=LAYERS, expert_load=_load(range(0, 10)), router_stats=_stats(range(0, 10)),
                       alerts=alerts_table("r", 0, [a]).to_pandas(),
                       extra={"stopped_by_alert": {"step": 9, "rule": "collapse", "layer": 0, "raise_on": "fail"}})
    assert run_dir.is_dir()
    r = subprocess.run([*cli, "check", str(trace_root)], capture_output=True, text=True)
    assert "run r was stopped by an alert at step 9 (collapse, layer 0; raise_on='fail')" in r.stdout, r.stdout
    assert "step 9 · run r · layer 0 · FAIL collapse: routing collapsed on expert 0" in r.stdout

    tr = moescope.open(trace_root)
    from moescope.commands.report import render_report

    text = render_report(tr)
    assert "Alerts kept in the trace:" in text and "run r was stopped by an alert at step 9" in text
    tr.close()


def test_sequence_units_follow_refresh_and_match_the_sql(trace_root: Path, make_run: Callable[..., Path]) -> None:
    from trace_helpers import routing_frame

    from moescope.analysis.drift import drift
    from moescope.analysis.live import sequence_units
    from moescope.analysis.selection import Selection

    def routing(steps: range, tag: str, first: int) -> pd.DataFrame:
        # 3 sequences of 4 tokens per step; sequence s sends its tokens to experts (s + first) % 4 and (s + 1) % 4
        return routing_frame([{"step": st, "tag": tag, "layer": 0, "seq": s, "pos": p,
                               "experts": [(s + first) % 4, (s + first + 1) % 4]}
                              for st in steps for s in range(3) for p in range(4)])

    def load(steps: range, tag: str) -> pd.DataFrame:
        return load_frame([(s, 0, [60, 60, 60, 60]) for s in steps], tag=tag)

    run_dir = make_run("a", layers=[layer_spec(0, 4, 2)], expert_load=load(range(0, 4), "en"),
                       routing=routing(range(0, 4), "en", 0))
    tr = moescope.open(trace_root)
    u = sequence_units(tr, Selection.of({"run": "a", "tag": "en", "steps": (1, 1)}))
    # step 1: 3 sequences (units 0, 1, 2) × 2 experts each, 4 tokens per (sequence, expert)
    assert len(u) == 6 and set(u["c"]) == {4.0} and sorted(u["unit"]) == [0, 0, 1, 1, 2, 2]
    assert sorted(u[u["unit"] == 1]["expert"]) == [1, 2]
    write_run(run_dir, {"expert_load": load(range(4, 8), "code"), "routing": routing(range(4, 8), "code", 2)},
              run="a")
    assert tr.refresh()
    assert len(sequence_units(tr, Selection.of({"tag": "code"}))) == 4 * 6  # the new part's units, after refresh
    base, cur = Selection.of({"tag": "en"}), Selection.of({"tag": "code"})
    via_trace = tr.drift({"tag": "en"}, {"tag": "code"}, n_boot=200)
    via_sql = drift(tr.cursor(), base, tr.cursor(), cur, n_boot=200)
    # the same statistics and units; the bootstrap resamples the same units (numbered in another order)
    cols = ["layer", "js", "tv", "psi", "chi2", "flagged", "status", "n_baseline", "n_current", "n_units", "unit"]
    pd.testing.assert_frame_equal(via_trace[cols], via_sql[cols])
    assert via_trace["unit"].tolist() == ["sequence"] and via_trace["n_units"].tolist() == [12]
    assert via_trace["bootstrap"].iloc[0] == pytest.approx(via_sql["bootstrap"].iloc[0], abs=0.05)
    tr.close()
