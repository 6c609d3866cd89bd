"""Drift: known-answer statistics, false-alarm rate under the null, and a planted shift found in one layer only."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy.spatial.distance import jensenshannon
from scipy.stats import chi2_contingency
from trace_helpers import layer_spec, routing_frame

import moescope
from moescope.analysis.drift import drift_stats
from moescope.analysis.selection import SelectionError
from moescope.analysis.trace import Trace

N, K = 8, 2


def _sample_run(rng, n_seq, seq_len, layers, shift_layer=None, concentration=20.0):
    """Token-level routing and the matching expert_load of sequences with their own (Dirichlet) expert taste."""
    base = np.full(N, 1.0 / N)
    rows, load = [], {}
    for s in range(n_seq):
        step, seq = s // 4, s % 4
        for layer in layers:
            p = base.copy()
            if layer == shift_layer:
                p = p.copy()
                p[0] -= 0.05
                p[1] += 0.05
            taste = rng.dirichlet(concentration * p)
            for pos in range(seq_len):
                ex = rng.choice(N, size=K, replace=False, p=taste)
                rows.append({"step": step, "seq": seq, "pos": pos, "layer": layer, "experts": ex.tolist()})
                for e in ex:
                    load[(step, layer, int(e))] = load.get((step, layer, int(e)), 0) + 1
    el = pd.DataFrame([{"step": st, "tag": "", "layer": la, "expert": e, "tokens": c, "prob_sum": 0.0, "weight_sum": 0.0}
                       for (st, la, e), c in load.items()])
    return routing_frame(rows), el


def test_drift_stats_known_answers():
    b = np.array([30.0, 10.0, 0.0, 60.0])
    c = np.array([10.0, 30.0, 0.0, 60.0])
    st = drift_stats(b, c)
    assert st["tv"] == pytest.approx(0.2)
    assert st["js"] == pytest.approx(jensenshannon(b / b.sum(), c / c.sum(), base=2))
    bs, cs = (b + 1) / (b + 1).sum(), (c + 1) / (c + 1).sum()
    assert st["psi"] == pytest.approx(((cs - bs) * np.log(cs / bs)).sum())
    assert st["chi2"] == pytest.approx(chi2_contingency(np.vstack([b[[0, 1, 3]], c[[0, 1, 3]]]), correction=False)[0])
    far = drift_stats(np.array([1.0, 0.0]), np.array([0.0, 1.0]))
    assert far["js"] == pytest.approx(1.0) and far["tv"] == pytest.approx(1.0)
    # JS distance base 2 of a concentrated TV-0.1 shift over 8 experts
    p = np.full(8, 1 / 8)
    q = p.copy()
    q[0], q[1] = 0.025, 0.225
    assert drift_stats(p * 1e6, q * 1e6)["js"] == pytest.approx(math.sqrt(0.5 * (
        sum(x * math.log2(x / ((x + y) / 2)) for x, y in zip(p, q) if x) +
        sum(y * math.log2(y / ((x + y) / 2)) for x, y in zip(p, q) if y))), rel=1e-6)


def test_false_alarm_rate_under_the_null(make_run, trace_root):
    # 100 seeded null trials at a small size (8 sequences of 16 tokens a side), one tag per trial in two runs
    rng = np.random.default_rng(1234)
    trials = 100
    for side in ("b", "c"):
        rts, els = [], []
        for i in range(trials):
            rt, el = _sample_run(rng, n_seq=8, seq_len=16, layers=[0])
            rt["tag"], el["tag"] = f"t{i}", f"t{i}"
            rts.append(rt)
            els.append(el)
        make_run(side, layers=[layer_spec(0, N, K)], routing=pd.concat(rts), expert_load=pd.concat(els))
    tr = moescope.open(trace_root)
    flagged = 0
    for i in range(trials):
        d = tr.drift({"run": "b", "tag": f"t{i}"}, {"run": "c", "tag": f"t{i}"}, seed=i)
        assert d["unit"].iloc[0] == "sequence" and d["n_units"].iloc[0] == 8
        flagged += int(d["flagged"].sum())
    print(f"null false alarms: {flagged}/{trials}")
    assert flagged / trials <= 0.05


def test_planted_shift_found_in_that_layer_only(make_run, trace_root, tmp_path):
    rng = np.random.default_rng(7)
    rt, el = _sample_run(rng, n_seq=200, seq_len=32, layers=[0, 1, 2])
    make_run("base", layers=[layer_spec(i, N, K) for i in range(3)], routing=rt, expert_load=el)
    # current: layers 0 and 2 from the same process; layer 1 with 0.1 of the load moved from expert 0 to expert 1
    totals = el.groupby("layer")["tokens"].sum()
    rows = []
    for layer in range(3):
        q = np.full(N, 1.0 / N)
        if layer == 1:
            q[0], q[1] = 0.025, 0.225  # TV 0.1 from uniform
        counts = rng.multinomial(int(totals[layer]), q)
        rows += [{"step": 0, "tag": "", "layer": layer, "expert": e, "tokens": int(c), "prob_sum": 0.0,
                  "weight_sum": 0.0} for e, c in enumerate(counts)]
    cur = pd.DataFrame(rows)
    make_run("cur", layers=[layer_spec(i, N, K) for i in range(3)], expert_load=cur, root=tmp_path / "other")
    tr = moescope.open(trace_root)
    d = tr.drift({"run": "base"}, {"run": "cur", "root": tmp_path / "other"}, seed=0).set_index("layer")
    assert d["flagged"].tolist() == [False, True, False]
    assert d.loc[1, "status"] == "WARN" and d.loc[0, "status"] == "PASS"
    assert d.loc[1, "tv"] == pytest.approx(0.1, abs=0.03)
    assert d.loc[1, "js"] > max(0.1, d.loc[1, "bootstrap"])
    assert "drifted" in d.loc[1, "message"]
    # the same with the other root opened as a Trace
    d2 = tr.drift({"run": "base"}, {"run": "cur", "root": Trace(tmp_path / "other")}, seed=0)
    assert d2["flagged"].tolist() == [False, True, False]


def test_step_units_without_routing_and_tag_selection(make_run, trace_root):
    rng = np.random.default_rng(3)
    rows = []
    for step in range(40):
        for tag, q in (("en", np.full(N, 1 / N)), ("code", np.r_[0.025, 0.225, np.full(6, 1 / N)])):
            counts = rng.multinomial(2 * 256, q)
            rows += [{"step": step, "tag": tag, "layer": 0, "expert": e, "tokens": int(c), "prob_sum": 0.0,
                      "weight_sum": 0.0} for e, c in enumerate(counts)]
    make_run("mix", layers=[layer_spec(0, N, K)], expert_load=pd.DataFrame(rows))
    tr = moescope.open(trace_root)
    d = tr.drift({"tag": "en", "steps": (0, 19)}, {"tag": "code", "steps": (20, 39)}, seed=0)
    assert d["unit"].iloc[0] == "step" and d["flagged"].iloc[0]
    same = tr.drift({"tag": "en", "steps": (0, 19)}, {"tag": "en", "steps": (20, 39)}, seed=0)
    assert not same["flagged"].iloc[0]
    # A tag that matches nothing is a usage error naming the tags that exist, never a silent SKIP.
    with pytest.raises(SelectionError, match=r"current: no tag 'nothing' \(tags: 'code', 'en'\)"):
        tr.drift({"tag": "en"}, {"tag": "nothing"})
    with pytest.raises(SelectionError, match="baseline: no run 'nope'"):
        tr.drift({"run": "nope"}, {"tag": "en"})
