"""Known-answer tests of every metric in the catalogue on tiny hand-built traces."""

from __future__ import annotations

import math

import numpy as np
import pytest
from trace_helpers import layer_spec, load_frame, routing_frame, stats_frame

import moescope
from moescope.analysis.metrics import gini, locality_chance

# Three steps (= three windows by thirds) of one layer, N = 4, k = 2, T = 500 tokens per step:
# balanced, then skewed, then collapsed onto experts 0 and 1.
COUNTS = {0: [250, 250, 250, 250], 1: [500, 300, 100, 100], 2: [900, 100, 0, 0]}
PROB = {0: [125, 125, 125, 125], 1: [250, 150, 50, 50], 2: [450, 50, 0, 0]}  # prob_sum: P_e = prob_sum / T
T = 500
LSE_SQ = {0: 500.0, 1: 1000.0, 2: 6000.0}  # z-loss 1, 2, 12


@pytest.fixture
def tr(make_run, trace_root):
    el = load_frame([(s, 0, COUNTS[s]) for s in COUNTS], prob=[PROB[s] for s in COUNTS])
    rs = stats_frame(
        {"step": s, "layer": 0, "tokens": T, "lse_sq_sum": LSE_SQ[s], "entropy_sum": T * math.log(4) * 0.5,
         "margin_sum": 0.2 * T, "nonfinite": 3 if s == 2 else 0, "dropped": 50 if s == 1 else 0}
        for s in COUNTS
    )
    make_run("a", layers=[layer_spec(0, 4, 2)], expert_load=el, router_stats=rs)
    return moescope.open(trace_root)


def test_utilization_per_window(tr):
    u = tr.utilization(run="a")
    assert sorted(u["window"].unique()) == [0, 1, 2]
    w1 = u[u["window"] == 1].sort_values("expert")
    # N·f_e = N c_e / (k T) = 4 c / 1000
    assert np.allclose(w1["utilization"], [2.0, 1.2, 0.4, 0.4])
    assert np.allclose(w1["load_share"], [0.5, 0.3, 0.1, 0.1])
    assert np.allclose(w1["mean_prob"], [0.5, 0.3, 0.1, 0.1])
    assert (w1["window_start"] == 1).all() and (w1["window_end"] == 1).all()
    w2 = u[u["window"] == 2].sort_values("expert")
    assert np.allclose(w2["utilization"], [3.6, 0.4, 0.0, 0.0])


def test_load_metrics_known_answers(tr):
    lm = tr.load_metrics(run="a").set_index("window")
    c = np.array(COUNTS[1], float)
    f = c / c.sum()
    row = lm.loc[1]
    assert row["cv"] == pytest.approx(c.std() / c.mean())  # population std: 16.58/25 = 0.6633
    assert row["cv"] == pytest.approx(math.sqrt(275) / 25)
    assert row["maxvio"] == pytest.approx(500 / 250 - 1)  # = 1.0
    assert row["load_entropy"] == pytest.approx(-(f * np.log(f)).sum() / math.log(4))  # 0.8427
    assert row["gini"] == pytest.approx(2800 / (2 * 16 * 250))  # Σ over ordered pairs of abs(ci - cj) = 2800; / (2 N² mean) = 0.35
    assert row["gini"] == pytest.approx(gini(c))
    assert row["aux_loss"] == pytest.approx(4 * (0.5 * 0.5 + 0.3 * 0.3 + 0.1 * 0.1 + 0.1 * 0.1))  # 1.44
    assert row["z_loss"] == pytest.approx(2.0)
    assert row["router_entropy"] == pytest.approx(0.5)
    assert row["router_margin"] == pytest.approx(0.2)
    assert row["drop_rate"] == pytest.approx(50 / (500 * 2))  # dropped routes per route: of T·k
    assert row["top_m_share"] == pytest.approx(0.8)  # m = max(k, N/4) = 2 busiest: 800 of 1000
    assert row["m90"] == 3
    assert row["expected_per_expert"] == pytest.approx(2 * 500 / 4)
    # balanced window: the ideal values
    b = lm.loc[0]
    assert b["cv"] == pytest.approx(0) and b["maxvio"] == pytest.approx(0) and b["gini"] == pytest.approx(0)
    assert b["load_entropy"] == pytest.approx(1.0) and b["aux_loss"] == pytest.approx(1.0)
    # collapsed window: experts 2, 3 have no rows' worth of load
    x = lm.loc[2]
    assert x["min_utilization"] == pytest.approx(0.0) and x["top_m_share"] == pytest.approx(1.0)
    assert x["nonfinite"] == 3 and x["z_loss"] == pytest.approx(12.0)


def test_window_all_and_fixed(tr):
    lm = tr.load_metrics(run="a", window="all")
    assert len(lm) == 1 and lm["window_start"].iloc[0] == 0 and lm["window_end"].iloc[0] == 2
    c = np.sum([COUNTS[s] for s in COUNTS], axis=0).astype(float)
    assert lm["maxvio"].iloc[0] == pytest.approx(c.max() / c.mean() - 1)
    fixed = tr.load_metrics(run="a", window=2)  # steps 0–1, 2
    assert sorted(zip(fixed["window_start"], fixed["window_end"])) == [(0, 1), (2, 2)]


def test_gini_extremes():
    assert gini([5, 5, 5, 5]) == pytest.approx(0.0)
    assert gini([0, 0, 0, 8]) == pytest.approx(3 / 4)  # (N-1)/N when one expert takes everything


def test_fallback_n_and_k_without_manifest_layers(make_run, trace_root):
    # no manifest layers: N = max expert + 1 = 4 (expert 3 has a row), k = assignments / tokens = 2
    el = load_frame([(0, 0, [60, 40, 0, 0])])
    el = el[el["expert"] != 2]  # expert 2 absent altogether: still densified as 0
    make_run("b", expert_load=el, router_stats=stats_frame([{"step": 0, "layer": 0, "tokens": 50}]))
    tr = moescope.open(trace_root)
    info = tr.sql("SELECT n_experts, top_k FROM layer_info WHERE run = 'b'").fetchall()
    assert info == [(4, 2)]
    u = tr.utilization(run="b").sort_values("expert")
    assert list(u["expert"]) == [0, 1, 2, 3]
    assert np.allclose(u["utilization"], [2.4, 1.6, 0.0, 0.0])


def test_coactivation_pairs_and_lift(make_run, trace_root):
    toks = [[0, 1]] * 4 + [[2, 3]] * 4 + [[0, 2]] * 2
    rt = routing_frame({"step": 0, "layer": 0, "seq": 0, "pos": i, "experts": e} for i, e in enumerate(toks))
    make_run("c", layers=[layer_spec(0, 4, 2)], routing=rt)
    tr = moescope.open(trace_root)
    co = tr.coactivation(run="c").set_index(["expert_a", "expert_b"])
    assert len(co) == 4 * 3  # every ordered pair a != b
    assert co.loc[(0, 1), "n_ab"] == 4 and co.loc[(0, 1), "n_a"] == 6 and co.loc[(0, 1), "n_b"] == 4
    assert co.loc[(0, 1), "p_b_given_a"] == pytest.approx(4 / 6)
    assert co.loc[(1, 0), "p_b_given_a"] == pytest.approx(4 / 4)
    assert co.loc[(0, 1), "lift"] == pytest.approx(4 * 10 / (6 * 4))  # P(a,b)/(P(a)P(b)) = 1.667
    assert co.loc[(0, 2), "lift"] == pytest.approx(2 * 10 / (6 * 6))
    assert co.loc[(1, 3), "n_ab"] == 0 and co.loc[(1, 3), "lift"] == 0
    assert (co["tokens"] == 10).all()


def test_temporal_locality_and_chance(make_run, trace_root):
    seq0 = [[0, 1], [0, 2], [1, 3], [1, 3], [2, 0]]
    rows = [{"step": 0, "layer": 0, "seq": 0, "pos": i, "experts": e} for i, e in enumerate(seq0)]
    rows += [{"step": 0, "layer": 0, "seq": 1, "pos": p, "experts": [0, 1]} for p in (0, 2)]  # not consecutive
    make_run("t", layers=[layer_spec(0, 4, 2)], routing=routing_frame(rows))
    tl = moescope.open(trace_root).temporal_locality(run="t")
    row = tl.iloc[0]
    assert row["pairs"] == 4
    assert row["first_choice"] == pytest.approx(2 / 4)
    assert row["any_expert"] == pytest.approx(2 / 4)
    assert row["first_choice_chance"] == pytest.approx(1 / 4)
    assert row["any_expert_chance"] == pytest.approx(1 - math.comb(2, 2) / math.comb(4, 2))  # 5/6
    assert locality_chance(8, 2) == pytest.approx((1 / 8, 1 - 15 / 28))


def test_domain_specialization(make_run, trace_root):
    el = load_frame([(0, 0, [100, 100, 0, 0])], tag="en")
    el2 = load_frame([(0, 0, [0, 50, 50, 100])], tag="code")
    rs = stats_frame([{"step": 0, "layer": 0, "tag": "en", "tokens": 100}, {"step": 0, "layer": 0, "tag": "code", "tokens": 100}])
    make_run("d", layers=[layer_spec(0, 4, 2)], expert_load=__import__("pandas").concat([el, el2]), router_stats=rs)
    ds = moescope.open(trace_root).domain_specialization(run="d").set_index(["tag", "expert"])
    assert ds.loc[("en", 0), "share"] == pytest.approx(1.0)  # every English token went to expert 0
    assert ds.loc[("en", 0), "chance"] == pytest.approx(2 / 4)
    assert ds.loc[("en", 0), "specialization"] == pytest.approx(2.0)
    assert ds.loc[("code", 1), "specialization"] == pytest.approx(1.0)
    assert ds.loc[("code", 3), "share"] == pytest.approx(1.0)
    assert ds.loc[("en", 1), "expert_tag_share"] == pytest.approx(100 / 150)
    assert ds.loc[("en", 2), "share"] == 0


def test_vocab_specialization(make_run, trace_root):
    t7 = [[0, 1], [0, 2], [0, 1], [3, 0]]  # expert 0 every time: 4/4
    t9 = [[1, 2], [2, 3], [3, 1], [0, 2]] * 2  # expert 2 in 6 of 8
    rows = [{"pos": i, "token_id": 7, "experts": e} for i, e in enumerate(t7)]
    rows += [{"pos": 10 + i, "token_id": 9, "experts": e} for i, e in enumerate(t9)]
    rows += [{"pos": 30, "token_id": 11, "experts": [1, 2]}]  # seen once: under min_count
    make_run("v", layers=[layer_spec(0, 4, 2)], routing=routing_frame(rows))
    tr = moescope.open(trace_root)
    vs = tr.vocab_specialization(run="v", min_count=2).iloc[0]
    assert vs["token_ids"] == 2
    assert vs["specialization"] == pytest.approx((1.0 + 0.75) / 2)
    assert vs["weighted_specialization"] == pytest.approx((4 + 6) / (4 + 8))
    assert vs["chance"] == pytest.approx(0.5)
    per = tr.vocab_specialization(run="v", min_count=1, by_token=True).set_index("token_id")
    assert per.loc[11, "top_share"] == pytest.approx(1.0) and per.loc[9, "top_share"] == pytest.approx(0.75)


def test_saturation_between_runs_and_within_a_run(make_run, trace_root):
    ck = [[0, 1], [2, 3], [0, 1], [1, 2]]
    fin = [[0, 1], [0, 3], [2, 3], [2, 1]]  # overlaps 2, 1, 0, 2 of k = 2
    make_run("ckpt", layers=[layer_spec(0, 4, 2)],
             routing=routing_frame({"pos": i, "token_id": 100 + i, "experts": e} for i, e in enumerate(ck)))
    make_run("final", layers=[layer_spec(0, 4, 2)],
             routing=routing_frame({"pos": i, "token_id": 100 + i, "experts": e} for i, e in enumerate(fin)))
    both = [{"step": s, "pos": i, "token_id": 100 + i, "experts": e}
            for s, toks in ((0, ck), (10, fin)) for i, e in enumerate(toks)]
    make_run("ev", layers=[layer_spec(0, 4, 2)], routing=routing_frame(both))
    tr = moescope.open(trace_root)
    s = tr.saturation({"run": "ckpt"}, {"run": "final"})
    assert len(s) == 1 and s["tokens"].iloc[0] == 4
    assert s["saturation"].iloc[0] == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert s["chance"].iloc[0] == pytest.approx(0.5)
    per_step = tr.saturation(run="ev").set_index("step")
    assert per_step.loc[0, "saturation"] == pytest.approx(0.625)
    assert per_step.loc[10, "saturation"] == pytest.approx(1.0)


def test_similarity_reader(make_run, trace_root):
    import pandas as pd

    sim = pd.DataFrame([
        {"step": 0, "layer": 0, "expert_a": 0, "expert_b": 1, "metric": "cka", "value": 0.95},
        {"step": 100, "layer": 0, "expert_a": 2, "expert_b": 3, "metric": "subspace_overlap", "value": 0.9},
    ])
    make_run("s", layers=[layer_spec(0, 4, 2)], expert_similarity=sim)
    tr = moescope.open(trace_root)
    df = tr.similarity(run="s")
    assert list(df.columns) == ["run", "step", "layer", "expert_a", "expert_b", "metric", "value"]
    assert len(df) == 2
    assert list(tr.similarity(run="s", metric="cka")["value"]) == [0.95]


def test_no_router_probabilities_leave_aux_loss_unknown(make_run, trace_root):
    """A run whose spec (or importer) read no probabilities stores NULL prob_sum: P_e and the aux loss are unknown,
    never 0 (an expert without rows gets P_e = 0 only where the window recorded probabilities at all)."""
    el = load_frame([(0, 0, [60, 40, 0, 0])])
    el = el[el["expert"] < 2].assign(prob_sum=None)
    make_run("np", layers=[layer_spec(0, 4, 2)], expert_load=el,
             router_stats=stats_frame([{"step": 0, "layer": 0, "tokens": 50}]))
    make_run("p", layers=[layer_spec(0, 4, 2)], expert_load=load_frame([(0, 0, [60, 40, 0, 0])],
                                                                        prob=[[30, 20, 0, 0]]),
             router_stats=stats_frame([{"step": 0, "layer": 0, "tokens": 50}]))
    tr = moescope.open(trace_root)
    u = tr.utilization(run="np").sort_values("expert")
    assert u["mean_prob"].isna().all() and np.allclose(u["utilization"], [2.4, 1.6, 0.0, 0.0])
    lm = tr.load_metrics(window="all")
    aux = dict(zip(lm["run"], lm["aux_loss"]))
    assert math.isnan(aux["np"]) or aux["np"] is None
    assert aux["p"] == pytest.approx(4 * (0.6 * 0.6 + 0.4 * 0.4))  # N Σ f_e P_e with P = prob_sum / T
