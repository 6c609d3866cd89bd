"""What `moescope demo` prints: the worst finding per run and rule (known answers on hand-built findings),
expected vs found per scenario, the legend, and output that streams through a pipe as it happens."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from moescope.commands._legend import LEGEND, TERMS
from moescope.commands.demo import _print_findings, judge, worst_findings

pytest.importorskip("moescope.reference.scenarios")  # torch
from moescope.reference.scenarios import build_scenarios  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _finding(rule: str, status: str, layer: int, ws: int, metric: str, value: float, threshold: float,
             expert: list[int] | None, message: str, run: str = "collapse") -> dict:
    return {"rule": rule, "status": status, "run": run, "layer": layer, "expert": expert,
            "window": "" if ws is None else f"steps {ws}–{ws + 79}", "window_start": ws,
            "window_end": None if ws is None else ws + 79, "metric": metric,
            "value": value, "threshold": threshold, "message": message}


#: The collapse run's findings in the order health() returns them (layer, then window): the first window of
#: each rule is not its worst.
COLLAPSE = pd.DataFrame([
    _finding("dead_expert", "FAIL", 0, 0, "utilization", 0.016, 0.05, [14], "layer 0: 1 of 16 experts dead"),
    _finding("maxvio", "FAIL", 0, 0, "maxvio", 3.19, 3.0, [13], "layer 0: MaxVio 3.19"),
    _finding("load_cv", "WARN", 0, 0, "load_cv", 1.09, 0.5, [13, 8], "layer 0: CV 1.09"),
    _finding("overconfidence", "WARN", 0, 0, "router_entropy", 0.073, 0.1, None, "layer 0: entropy 0.073"),
    _finding("maxvio", "WARN", 0, 80, "maxvio", 2.99, 1.0, [8], "layer 0: MaxVio 2.99"),
    _finding("dead_expert", "FAIL", 1, 0, "utilization", 0.0001, 0.05, [2, 12, 14], "layer 1: 3 of 16 dead"),
    _finding("dead_expert", "FAIL", 1, 80, "utilization", 0.0005, 0.05, [1, 4, 5, 7, 8, 9, 12, 13],
             "layer 1: 8 of 16 experts dead"),
    _finding("maxvio", "FAIL", 1, 80, "maxvio", 6.59, 3.0, [10], "layer 1: MaxVio 6.59"),
    _finding("load_cv", "WARN", 1, 80, "load_cv", 2.10, 0.5, [10, 0], "layer 1: CV 2.10"),
    _finding("collapse", "FAIL", 1, 80, "top_m_share", 0.968, 0.9, [10, 0, 15, 3], "layer 1: 96.8% on 4"),
    _finding("collapse", "FAIL", 1, 160, "top_m_share", 0.928, 0.9, [10, 0, 15, 3], "layer 1: 92.8% on 4"),
    _finding("overconfidence", "WARN", 1, 160, "router_entropy", 0.0033, 0.1, None, "layer 1: entropy 0.0033"),
    _finding("clones", "SKIP", None, None, "similarity", float("nan"), 0.8, None, "no snapshot"),
])


def test_worst_finding_per_rule_is_the_maximum() -> None:
    worst = worst_findings(COLLAPSE).set_index("rule")["message"].to_dict()
    assert worst["dead_expert"] == "layer 1: 8 of 16 experts dead"  # the most dead experts, not the first window
    assert worst["maxvio"] == "layer 1: MaxVio 6.59"
    assert worst["load_cv"] == "layer 1: CV 2.10"
    assert worst["collapse"] == "layer 1: 96.8% on 4"
    assert worst["overconfidence"] == "layer 1: entropy 0.0033"  # a below-the-limit rule: the lowest is worst
    assert worst["clones"] == "no snapshot"
    # the FAIL beats a larger WARN of the same rule
    mixed = pd.DataFrame([
        _finding("maxvio", "WARN", 0, 0, "maxvio", 2.99, 1.0, [1], "warn"),
        _finding("maxvio", "FAIL", 0, 80, "maxvio", 3.01, 3.0, [1], "fail"),
    ])
    assert worst_findings(mixed)["message"].tolist() == ["fail"]


def test_findings_print_whole_messages(capsys: pytest.CaptureFixture[str]) -> None:
    long = ("layer 1: routing collapsed: the 4 busiest experts (10, 0, 15, 3) carry 96.8% of assignments "
            "(≥ 90%; m = max(k, N/4) = 4 of 16)")
    df = COLLAPSE.copy()
    df.loc[df["rule"] == "collapse", "message"] = long
    _print_findings(df)
    out = capsys.readouterr().out
    assert " ".join(out.split()).count(long) == 1  # wrapped, never cut
    assert "8 of 16 experts dead" in out and "1 of 16 experts dead" not in out


def test_expected_vs_found() -> None:
    sc = build_scenarios(quick=True)
    ok, found = judge(sc["collapse"], COLLAPSE)
    assert ok and found.startswith("FAIL collapse, dead_expert, maxvio; WARN")
    ok, found = judge(sc["upcycled"], COLLAPSE)
    assert not ok  # the upcycled run should show a clones WARN only
    clones = pd.DataFrame([_finding("clones", "WARN", 0, 120, "cka", 0.9, 0.8, ["1-2"], "clones", run="upcycled"),
                           _finding("maxvio", "PASS", 0, 0, "maxvio", 0.5, 1.0, [1], "ok", run="upcycled")])
    assert judge(sc["upcycled"], clones) == (True, "WARN clones")
    skip_only = COLLAPSE[COLLAPSE["rule"] == "clones"]
    assert judge(sc["balanced"], skip_only) == (True, "every rule PASS")  # a SKIP is not a finding
    drift = pd.DataFrame({"layer": [0, 1], "flagged": [False, False]})
    ok, found = judge(sc["shift"], skip_only, drift)
    assert not ok and found.endswith("no drift flagged")


def test_legend_names_every_term_once() -> None:
    for term, _ in TERMS:
        assert sum(line.startswith(f"  {term} ") for line in LEGEND.splitlines()) == 1, term
    assert [t for t, _ in TERMS] == ["N·f", "MaxVio", "CV", "top-m share", "JS", "TV", "overlap"]


def test_demo_streams_through_a_pipe(tmp_path: Path) -> None:
    """Progress and the scenario's verdict reach a pipe while the demo runs, not at exit."""
    env = {**os.environ, "PYTHONUNBUFFERED": ""}  # what a user's shell has: no help from the environment
    env.pop("PYTHONUNBUFFERED")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moescope", "demo", "--quick", "--scenario", "upcycled", "--out", str(tmp_path / "d")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env,
    )
    arrived: list[tuple[float, str]] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        arrived.append((time.monotonic(), line.rstrip("\n")))
    proc.wait(timeout=300)
    end = time.monotonic()
    err = proc.stderr.read() if proc.stderr else ""
    assert proc.returncode == 0, err
    lines = [text for _, text in arrived]
    steps = [t for t, text in arrived if "upcycled  step" in text]
    assert len(steps) >= 5, lines  # per-step lines without a terminal
    # the first progress line arrived while training still had most of its steps to go
    assert steps[-1] - steps[0] > 0.5 and end - steps[0] > 1.0, arrived
    assert "\r" not in "".join(lines) and "it/s" not in err  # no progress bar into a log
    verdict = next(text for text in lines if text.strip().startswith("found:"))
    assert verdict.strip() == "found:    WARN clones  -> as expected"  # the README's promise for upcycled
    assert any(x.startswith("done in") and "1 of 1 scenario(s) found as expected" in x for x in lines)
    assert LEGEND.splitlines()[1] in lines


def test_help_and_readme_agree_on_timings_and_sample_traces(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from moescope.cli import main
    from moescope.commands.demo import TIMINGS

    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert TIMINGS in help_text and TIMINGS in readme
    assert "moescope demo --out sample_traces" in help_text and "moescope demo --out sample_traces" in readme
    # and it is true: the committed traces have the default (not --quick) step counts
    full = build_scenarios(quick=False)
    for name in ("balanced", "collapse", "shift", "upcycled"):
        meta = json.loads((ROOT / "sample_traces" / name / "manifest.json").read_text())["meta"]
        assert meta["train"]["steps"] == full[name].steps, name


def test_report_prints_the_same_legend_once() -> None:
    import moescope
    from moescope.commands.report import render_report

    with moescope.open(ROOT / "sample_traces" / "collapse") as tr:
        text = render_report(tr)
    assert text.count(LEGEND) == 1 and text.rstrip().endswith(LEGEND.rstrip())
