"""Known-answer tests of the systems what-ifs (capacity drops, expert placement, expert-cache hit rates)."""

from __future__ import annotations

import itertools
import json
import random
from functools import cache
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from moescope.analysis import whatif
from moescope.cli import main
from moescope.commands.whatif import open_trace
from moescope.format.writer import write_run


def _routing(tokens: list[tuple[int, int, int, list[int]]], layer: int = 0) -> pd.DataFrame:
    """Routing rows from (step, seq, pos, experts) tuples."""
    return pd.DataFrame(
        {
            "step": [t[0] for t in tokens],
            "tag": "",
            "layer": layer,
            "seq": [t[1] for t in tokens],
            "pos": [t[2] for t in tokens],
            "token_id": 0,
            "experts": [list(t[3]) for t in tokens],
            "weights": [[1.0 / len(t[3])] * len(t[3]) for t in tokens],
            "entropy": 0.0,
            "lse": 0.0,
            "margin": 0.0,
        }
    )


def _counts(routing: pd.DataFrame, n_experts: int, dropped: dict[int, int] | None = None) -> dict[str, pd.DataFrame]:
    """expert_load and router_stats consistent with `routing` (every expert listed, zeros included)."""
    load = []
    stats = []
    for (step, layer), g in routing.groupby(["step", "layer"]):
        c = np.bincount(np.concatenate([np.asarray(x) for x in g["experts"]]), minlength=n_experts)
        for e in range(n_experts):
            load.append(
                {
                    "step": step,
                    "tag": "",
                    "layer": layer,
                    "expert": e,
                    "tokens": int(c[e]),
                    "prob_sum": 0.0,
                    "weight_sum": 0.0,
                }
            )
        stats.append(
            {"step": step, "tag": "", "layer": layer, "tokens": len(g), "dropped": (dropped or {}).get(step, 0)}
        )
    return {"expert_load": pd.DataFrame(load), "router_stats": pd.DataFrame(stats)}


def _write(root: Path, run: str, tokens, n_experts: int, top_k: int, *, token_level: bool = True, dropped=None) -> None:
    routing = _routing(tokens)
    tables = _counts(routing, n_experts, dropped)
    if token_level:
        tables["routing"] = routing
    layers = [{"layer": 0, "module": "m", "n_experts": n_experts, "top_k": top_k, "router_kind": "topk"}]
    write_run(root / run, tables, run=run, layers=layers)


def _con(root: Path):
    return open_trace(root)


# ---------------------------------------------------------------------------------------------------------------
# Capacity
# ---------------------------------------------------------------------------------------------------------------

# N=4, k=2, one sequence of 4 tokens at step 0. Expert 0 is asked by t1 and t2 as first choice and by t0 as
# second choice, so at capacity 2 the priority rule must drop t0's second choice, not t2's first choice (which
# is what filling in plain token order would do). Step 1 spreads the same tokens with no drops at cf >= 1.
CAP_TOKENS = [
    (0, 0, 0, [1, 0]),
    (0, 0, 1, [0, 2]),
    (0, 0, 2, [0, 3]),
    (0, 0, 3, [2, 1]),
    (1, 0, 0, [0, 1]),
    (1, 0, 1, [2, 3]),
    (1, 0, 2, [1, 0]),
    (1, 0, 3, [3, 2]),
]


@pytest.fixture(scope="module")
def cap_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cap")
    _write(root, "tok", CAP_TOKENS, 4, 2, dropped={0: 1})
    _write(root, "cnt", CAP_TOKENS, 4, 2, token_level=False)
    # N=2, k=1, two sequences of two tokens: the batch is balanced, each sequence is not.
    _write(root, "grp", [(0, 0, 0, [0]), (0, 0, 1, [0]), (0, 1, 0, [1]), (0, 1, 1, [1])], 2, 1)
    # The same batch with only sequence 0 kept token-level (a token sample, as tokens=0.5 records it).
    full = _routing([(0, 0, 0, [0]), (0, 0, 1, [0]), (0, 1, 0, [1]), (0, 1, 1, [1])])
    layers = [{"layer": 0, "module": "m", "n_experts": 2, "top_k": 1, "router_kind": "topk"}]
    write_run(root / "samp", {**_counts(full, 2), "routing": full[full["seq"] == 0]}, run="samp", layers=layers)
    return root


def test_capacity_known_answer_per_step(cap_root: Path) -> None:
    df = whatif.capacity_drops(_con(cap_root), run="tok", factors=(0.5, 1.0, 2.0), window=1)
    assert set(df["source"]) == {"routing"}
    s0 = df[df["window_start"] == 0].set_index("capacity_factor")
    # cf 1.0: capacity ceil(1*2*4/4) = 2. e0 queue: t1 (1st), t2 (1st), t0 (2nd) -> t0's second choice dropped;
    # e1: t0 (1st), t3 (2nd); e2: t3 (1st), t1 (2nd); e3: t2 (2nd) -> all fit. 1 of 8 assignments dropped.
    r = s0.loc[1.0]
    assert r["tokens"] == 4 and r["assignments"] == 8 and r["dropped_assignments"] == 1
    assert r["drop_rate"] == pytest.approx(1 / 8)
    assert r["token_drop_rate"] == pytest.approx(1 / 4)
    assert r["full_drop_rate"] == 0
    assert r["first_choice_drop_rate"] == 0  # token order (no priority) would have dropped t2's first choice
    # cf 0.5: capacity 1. e0 keeps t1 (drops t2 1st, t0 2nd); e1 keeps t0 (drops t3 2nd); e2 keeps t3 (drops
    # t1 2nd); e3 keeps t2 2nd. 4 of 8 dropped, every token lost one choice, only t2 its first.
    r = s0.loc[0.5]
    assert r["dropped_assignments"] == 4 and r["drop_rate"] == pytest.approx(0.5)
    assert r["token_drop_rate"] == 1.0 and r["full_drop_rate"] == 0
    assert r["first_choice_drop_rate"] == pytest.approx(0.25)
    assert s0.loc[2.0, "dropped_assignments"] == 0
    # the model reported 1 dropped route of 4 tokens × 2 at step 0, none at step 1
    assert s0.loc[1.0, "reported_drop_rate"] == pytest.approx(1 / 8)
    s1 = df[df["window_start"] == 1].set_index("capacity_factor")
    assert s1.loc[1.0, "dropped_assignments"] == 0
    # cf 0.5 at step 1: each expert gets one first and one second choice, capacity 1 -> 4 second choices dropped
    assert s1.loc[0.5, "dropped_assignments"] == 4 and s1.loc[0.5, "first_choice_drop_rate"] == 0
    assert np.isnan(s1.loc[1.0, "reported_drop_rate"])
    assert (df["coverage"] == 1.0).all()


def test_capacity_whole_run_window(cap_root: Path) -> None:
    df = whatif.capacity_drops(_con(cap_root), run="tok", factors=(1.0,))
    assert len(df) == 1
    r = df.iloc[0]
    assert (r["window_start"], r["window_end"]) == (0, 1)
    assert r["drop_rate"] == pytest.approx(1 / 16)
    assert r["reported_drop_rate"] == pytest.approx(1 / 16)  # 1 route of 8 tokens × 2
    only1 = whatif.capacity_drops(_con(cap_root), run="tok", factors=(1.0,), steps=(1, 1)).iloc[0]
    assert (only1["window_start"], only1["dropped_assignments"], only1["tokens"]) == (1, 0, 4)


@pytest.mark.parametrize(("group", "rate"), [("batch", 0.0), ("sequence", 0.5), (2, 0.5), (4, 0.0), (1, 0.0)])
def test_capacity_groups(cap_root: Path, group, rate: float) -> None:
    # batch: T=4, capacity ceil(1*4/2) = 2 per expert, 2 tokens each -> none dropped. sequence (= groups of 2
    # tokens): T=2, capacity 1, each sequence sends both tokens to one expert -> 1 of 2 dropped. Groups of one
    # token: capacity ceil(1/2) = 1 -> nothing dropped.
    df = whatif.capacity_drops(_con(cap_root), run="grp", factors=(1.0,), group=group)
    assert df["drop_rate"].iloc[0] == pytest.approx(rate)


def test_capacity_groups_are_per_rank(tmp_path: Path) -> None:
    # N=2, k=1, one step on two data-parallel ranks: rank 0 sends both tokens to expert 0, rank 1 to expert 1.
    # Each rank routes its own batch (T=2, capacity 1), so each drops one token; pooled they would drop none.
    layers = [{"layer": 0, "module": "m", "n_experts": 2, "top_k": 1, "router_kind": "topk"}]
    for rank, e in ((0, 0), (1, 1)):
        routing = _routing([(0, 0, 0, [e]), (0, 0, 1, [e])])
        write_run(tmp_path / "dp", {**_counts(routing, 2), "routing": routing}, run="dp", layers=layers, rank=rank)
    # both ranks ask 0 then 1: with a cache of 2 per rank every request is a first (cold) request
    for rank in (0, 1):
        routing = _routing([(0, 0, 0, [0]), (0, 0, 1, [1])])
        write_run(tmp_path / "dp2", {**_counts(routing, 2), "routing": routing}, run="dp2", layers=layers, rank=rank)
    con = _con(tmp_path)
    for source in ("routing", "counts"):
        r = whatif.capacity_drops(con, run="dp", factors=(1.0,), source=source).iloc[0]
        assert (r["tokens"], r["dropped_assignments"]) == (4, 2), source
    # expert-parallel load sums the ranks: 2 + 2 on two devices is perfectly balanced
    assert whatif.placement_stats(con, run="dp", devices=2)["balancedness"].iloc[0] == 1.0
    # each rank holds its own cache, so rank 1 gains nothing from rank 0's loads (one shared cache: 2 hits)
    hits = whatif.cache_hit_rates(con, run="dp2", sizes=[2], policies=("lru",)).iloc[0]
    assert (hits["tokens"], hits["requests"], hits["hits"]) == (4, 4, 0)


def test_capacity_on_a_token_sample(cap_root: Path) -> None:
    con = _con(cap_root)
    # batch groups: the recorded half-batch (seq 0 alone, both tokens on expert 0) would drop 1 of 2, the
    # real batch drops nothing, and the per-step counts see the real batch
    auto = whatif.capacity_drops(con, run="samp", factors=(1.0,)).iloc[0]
    assert auto["source"] == "counts" and auto["drop_rate"] == 0 and "covers 50%" in auto["note"]
    forced = whatif.capacity_drops(con, run="samp", factors=(1.0,), source="routing").iloc[0]
    assert forced["drop_rate"] == pytest.approx(0.5) and forced["coverage"] == pytest.approx(0.5)
    assert "token sample (50%)" in forced["note"]
    # whole sequences are kept, so per-sequence groups replay exactly on the sample
    seq = whatif.capacity_drops(con, run="samp", factors=(1.0,), group="sequence").iloc[0]
    assert seq["source"] == "routing" and seq["drop_rate"] == pytest.approx(0.5)


def test_capacity_count_only_run(cap_root: Path) -> None:
    con = _con(cap_root)
    df = whatif.capacity_drops(con, run="cnt", factors=(0.5, 1.0), window=1)
    assert set(df["source"]) == {"counts"}
    s0 = df[df["window_start"] == 0].set_index("capacity_factor")
    # the count of drops per group does not depend on the priority: the same 1 and 4 as the token replay
    assert s0.loc[1.0, "dropped_assignments"] == 1 and s0.loc[0.5, "dropped_assignments"] == 4
    assert s0["token_drop_rate"].isna().all() and "lower bound" in s0["note"].iloc[0]
    seq = whatif.capacity_drops(con, run="cnt", group="sequence")
    assert list(seq["source"]) == ["none"] and "token-level routing" in seq["note"].iloc[0]
    assert np.isnan(seq["drop_rate"].iloc[0])


def test_capacity_rejects_bad_arguments(cap_root: Path) -> None:
    con = _con(cap_root)
    with pytest.raises(ValueError, match="group"):
        whatif.capacity_drops(con, group="epoch")
    with pytest.raises(ValueError, match="positive"):
        whatif.capacity_drops(con, factors=(0.0,))
    with pytest.raises(ValueError, match=r"capacity: no run 'nope' in this trace \(runs: 'cnt', "):
        whatif.capacity_drops(con, run="nope")
    with pytest.raises(ValueError, match=r"capacity: no tag 'cdoe'"):
        whatif.capacity_drops(con, tag="cdoe")


# ---------------------------------------------------------------------------------------------------------------
# Placement
# ---------------------------------------------------------------------------------------------------------------

# N=4, D=2, k=1, one step: sequence 0 (origin device 0) asks 0, 0, 2, 1, 3; sequence 1 (device 1) asks
# 0, 0, 0, 2, 2. Loads: e0=5, e1=1, e2=3, e3=1.
PLACE_TOKENS = [(0, 0, p, [e]) for p, e in enumerate([0, 0, 2, 1, 3])] + [
    (0, 1, p, [e]) for p, e in enumerate([0, 0, 0, 2, 2])
]


@pytest.fixture(scope="module")
def place_con(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("place")
    _write(root, "p", PLACE_TOKENS, 4, 1)
    return _con(root)


def test_placement_round_robin_known_answer(place_con) -> None:
    df = whatif.placement_stats(place_con, devices=2)
    assert len(df) == 1
    r = df.iloc[0]
    # round-robin: device 0 holds e0, e2 (5 + 3 = 8), device 1 holds e1, e3 (1 + 1 = 2); mean 5
    assert (r["max_load"], r["mean_load"]) == (8, 5)
    assert r["balancedness"] == pytest.approx(5 / 8) and r["straggler"] == pytest.approx(8 / 5)
    # seq 0 on device 0: e1, e3 remote (2); seq 1 on device 1: three e0 and two e2 remote (5) -> 7 of 10
    assert r["a2a_assignments"] == 7 and r["a2a_fraction"] == pytest.approx(0.7)


def test_placement_custom_and_replicas(place_con) -> None:
    # e0, e3 on device 0 (5 + 1 = 6); e1, e2 on device 1 (1 + 3 = 4). Remote: seq 0: e2, e1 (2); seq 1: e0 x3.
    r = whatif.placement_stats(place_con, placement=[0, 1, 1, 0], devices=2).iloc[0]
    assert r["balancedness"] == pytest.approx(5 / 6) and r["a2a_assignments"] == 5
    # e0 replicated on both devices (each serves half of it), e2 on 0, e1 and e3 on 1: loads 2.5+3, 2.5+1+1.
    # Expected remote: seq 0: half of 2 e0 + e1 + e3 = 3; seq 1: half of 3 e0 + 2 e2 = 3.5.
    spec = {0: [[0, 1], 1, 0, 1]}
    r = whatif.placement_stats(place_con, placement=spec, devices=2).iloc[0]
    assert r["max_load"] == pytest.approx(5.5) and r["balancedness"] == pytest.approx(5 / 5.5)
    assert r["a2a_assignments"] == pytest.approx(6.5)
    frame = pd.DataFrame({"layer": 0, "expert": [0, 0, 1, 2, 3], "device": [0, 1, 1, 0, 1]})
    r2 = whatif.placement_stats(place_con, placement=frame, devices=2).iloc[0]
    assert r2["balancedness"] == pytest.approx(r["balancedness"]) and r2["a2a_assignments"] == pytest.approx(6.5)
    with pytest.raises(ValueError, match="devices"):
        whatif.placement_stats(place_con, placement=[0, 1, 2, 0], devices=2)
    with pytest.raises(ValueError, match="places 2 experts"):
        whatif.placement_stats(place_con, placement=[0, 1], devices=2)


def _counts_trace(root: Path, run: str, probs: np.ndarray, steps: int, tokens: int, seed: int) -> None:
    """A count-only run whose expert loads per step are multinomial draws from `probs` (k=1)."""
    rng = np.random.default_rng(seed)
    n = len(probs)
    load, stats = [], []
    for s in range(steps):
        c = rng.multinomial(tokens, probs)
        load += [
            {"step": s, "tag": "", "layer": 0, "expert": e, "tokens": int(c[e]), "prob_sum": 0.0, "weight_sum": 0.0}
            for e in range(n)
        ]
        stats.append({"step": s, "tag": "", "layer": 0, "tokens": tokens})
    layers = [{"layer": 0, "module": "m", "n_experts": n, "top_k": 1, "router_kind": "topk"}]
    write_run(
        root / run, {"expert_load": pd.DataFrame(load), "router_stats": pd.DataFrame(stats)}, run=run, layers=layers
    )


def test_suggest_placement_improves_held_out_balance(tmp_path: Path) -> None:
    # Skewed but stable: round-robin pairs e0+e4=60, e1+e5=50, e2+e6=40, e3+e7=30 (balancedness 0.75);
    # LPT with two experts per device can pair them to 45 each.
    probs = np.array([40, 35, 30, 25, 20, 15, 10, 5], float)
    _counts_trace(tmp_path, "skew", probs / probs.sum(), steps=20, tokens=2000, seed=0)
    plan = whatif.suggest_placement(_con(tmp_path), devices=4)
    r = plan.report.iloc[0]
    assert (r["fit_start"], r["fit_end"], r["eval_start"], r["eval_end"]) == (0, 9, 10, 19)
    assert r["balancedness_before"] == pytest.approx(0.75, abs=0.03)
    assert r["balancedness_after"] > 0.95 and r["straggler_after"] < r["straggler_before"]
    assert np.isnan(r["a2a_fraction_before"])  # count-only: no all-to-all figure
    p = plan.placement
    assert sorted(p["expert"]) == list(range(8)) and (p.groupby("device").size() == 2).all()
    # the suggested placement, fed back in, reproduces the report's after-figure on the held-out window
    again = whatif.summarize_placement(whatif.placement_stats(_con(tmp_path), placement=p, devices=4, steps=(10, 19)))
    assert again["balancedness"].iloc[0] == pytest.approx(r["balancedness_after"])


def test_suggest_placement_replicates_hot_expert(tmp_path: Path) -> None:
    probs = np.array([0.5] + [0.5 / 7] * 7)
    _counts_trace(tmp_path, "hot", probs, steps=10, tokens=2000, seed=1)
    con = _con(tmp_path)
    plain = whatif.suggest_placement(con, devices=4).report.iloc[0]
    rep = whatif.suggest_placement(con, devices=4, replicas=4, fit_steps=(0, 4), eval_steps=(5, 9))
    r = rep.report.iloc[0]
    # without replicas one device carries at least half the load (balancedness <= 0.5)
    assert plain["balancedness_after"] <= 0.5 + 1e-9
    assert r["balancedness_after"] > plain["balancedness_after"] + 0.2
    hot = rep.placement[rep.placement["expert"] == 0]
    assert len(hot) > 1 and hot["device"].is_unique and hot["share"].sum() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no steps after"):
        whatif.suggest_placement(con, devices=4, fit_steps=(0, 9))


# ---------------------------------------------------------------------------------------------------------------
# Collapsed vs balanced routing
# ---------------------------------------------------------------------------------------------------------------


def _random_tokens(rng: random.Random, n: int, k: int, collapsed: bool) -> list[tuple[int, int, int, list[int]]]:
    out = []
    for step in range(3):
        for seq in range(4):
            for pos in range(32):
                pool = [0, 1] if collapsed and rng.random() < 0.9 else list(range(n))
                first = rng.sample(pool, min(k, len(pool)))
                rest = [e for e in rng.sample(range(n), n) if e not in first]
                out.append((step, seq, pos, (first + rest)[:k]))
    return out


def test_collapsed_trace_drops_more_and_balances_worse(tmp_path: Path) -> None:
    rng = random.Random(0)
    _write(tmp_path, "balanced", _random_tokens(rng, 8, 2, False), 8, 2)
    _write(tmp_path, "collapsed", _random_tokens(rng, 8, 2, True), 8, 2)
    con = _con(tmp_path)
    cap = whatif.capacity_drops(con, factors=(1.0,)).set_index("run")["drop_rate"]
    assert cap["collapsed"] > 0.3 and cap["collapsed"] > 3 * cap["balanced"]
    bal = whatif.summarize_placement(whatif.placement_stats(con, devices=4)).set_index("run")["balancedness"]
    assert bal["collapsed"] < 0.6 < bal["balanced"]


# ---------------------------------------------------------------------------------------------------------------
# Expert cache
# ---------------------------------------------------------------------------------------------------------------

# Worked by hand, one expert per token, N=4:
#   C=2 LRU: every request misses (each expert is evicted just before it comes back)             -> 0 hits
#   C=2 LFU: counts decide; the last request (1, count 2, kept over 3 with count 1) hits          -> 1 hit
#   C=2 Belady: 0 hits at t3 (kept over 1, used sooner) and again at t6 (kept over 1 at t5)       -> 2 hits
#   C=3: only 3's arrival evicts (2 under every policy: least recent, least frequent, never used) -> 4 hits
HAND = [[0], [1], [2], [0], [1], [3], [0], [1]]
HAND_HITS = {
    1: {"lru": 0, "lfu": 0, "belady": 0},
    2: {"lru": 0, "lfu": 1, "belady": 2},
    3: {"lru": 4, "lfu": 4, "belady": 4},
    4: {"lru": 4, "lfu": 4, "belady": 4},
}


@pytest.mark.parametrize("policy", whatif.POLICIES)
def test_cache_hand_worked(policy: str) -> None:
    df = whatif.simulate_cache(HAND, 4, policy=policy).set_index("cache_size")
    assert {c: int(df.loc[c, "hits"]) for c in HAND_HITS} == {c: h[policy] for c, h in HAND_HITS.items()}
    assert (df["requests"] == 8).all()


def test_cache_token_requests_together() -> None:
    # k=2: at C=2 the token [2, 0] hits 0 and must keep it while loading 2 (evicting 1); [1, 2] then hits 2.
    # At C=1 the cache keeps each token's first choice: 0 is cached when [2, 0] asks for it, 2 when [1, 2] does.
    seq = [[0, 1], [2, 0], [1, 2]]
    for policy in whatif.POLICIES:
        hits = whatif.simulate_cache(seq, 3, policy=policy).set_index("cache_size")["hits"].to_dict()
        assert hits == {1: 2, 2: 2, 3: 3}, policy


def test_cache_requests_ignore_padding_and_repeats() -> None:
    # -1 pads a token that routed to fewer experts; a repeated id is one request
    df = whatif.simulate_cache([[0, -1], [0, 0], [1, 0]], 2, policy="lru").set_index("cache_size")
    # C=1 and C=2 alike: the second token hits 0, the third hits 0 again (its second choice) and misses 1
    assert (df["requests"] == 4).all() and df.loc[1, "hits"] == 2 and df.loc[2, "hits"] == 2


def _reference(reqs: list[list[int]], size: int, policy: str) -> int:
    """Straightforward per-size simulation of the documented semantics (the stack algorithm must agree)."""
    cache: set[int] = set()
    last: dict[int, int] = {}
    count: dict[int, int] = {}
    hits = 0
    kmax = max(len(r) for r in reqs)

    def next_use(x: int, t: int) -> int:
        return next((u for u in range(t + 1, len(reqs)) if x in reqs[u]), len(reqs) + 1)

    for t, req in enumerate(reqs):
        hits += sum(e in cache for e in req)
        if size < len(req):
            cache = set(req[:size])
        else:
            others = [x for x in cache if x not in req]
            if policy == "lru":
                others.sort(key=lambda x: last[x], reverse=True)
            elif policy == "lfu":
                others.sort(key=lambda x: (count[x], last[x]), reverse=True)
            else:
                others.sort(key=lambda x: next_use(x, t))
            cache = set(req) | set(others[: size - len(req)])
        for s, e in enumerate(req):
            last[e] = t * kmax + kmax - 1 - s
            count[e] = count.get(e, 0) + 1
    return hits


def _optimum(reqs: list[list[int]], size: int) -> int:
    """Most hits any policy that holds each token's experts can reach (exhaustive search; tiny inputs only)."""

    @cache
    def best(t: int, held: frozenset[int]) -> int:
        if t == len(reqs):
            return 0
        req = reqs[t]
        h = sum(e in held for e in req)
        others = sorted(held - set(req))
        keep = min(len(others), size - len(req))
        return h + max(best(t + 1, frozenset(req) | frozenset(c)) for c in itertools.combinations(others, keep))

    return best(0, frozenset())


def test_cache_stack_algorithm_matches_reference_and_belady_bounds() -> None:
    rng = random.Random(7)
    for _ in range(40):
        n = rng.randint(2, 7)
        k = rng.randint(1, min(3, n))
        skew = [rng.random() ** 3 for _ in range(n)]
        reqs = []
        for _ in range(rng.randint(5, 60)):
            tok: list[int] = []
            while len(tok) < k:
                e = rng.choices(range(n), weights=skew)[0]
                if e not in tok:
                    tok.append(e)
            reqs.append(tok)
        got = {p: whatif.simulate_cache(reqs, n, policy=p).set_index("cache_size")["hits"] for p in whatif.POLICIES}
        for size in range(1, n + 1):
            for p in whatif.POLICIES:
                assert got[p][size] == _reference(reqs, size, p), (p, size, reqs)
            assert got["belady"][size] >= got["lru"][size] and got["belady"][size] >= got["lfu"][size]
        # LRU is a stack algorithm: hits never fall as the cache grows
        assert (np.diff(got["lru"].to_numpy()) >= 0).all()
        # the vectorized LRU and the generic one-pass stack update agree
        assert (whatif._lru_depths(reqs, n) == whatif._priority_depths(reqs, n, "lru")).all()


def test_belady_is_optimal_on_tiny_streams() -> None:
    rng = random.Random(3)
    for _ in range(25):
        n, k = 4, rng.randint(1, 2)
        reqs = [rng.sample(range(n), k) for _ in range(9)]
        hits = whatif.simulate_cache(reqs, n, policy="belady").set_index("cache_size")["hits"]
        for size in range(k, n + 1):
            assert hits[size] == _optimum(reqs, size), (reqs, size)


def test_cache_hit_rates_from_trace(tmp_path: Path) -> None:
    # the hand-worked stream, spread over two steps and two sequences in token order
    toks = [(t // 4, (t // 2) % 2, t % 2, e) for t, e in enumerate(HAND)]
    _write(tmp_path, "c", toks, 4, 1)
    _write(tmp_path, "counts_only", toks, 4, 1, token_level=False)
    con = _con(tmp_path)
    df = whatif.cache_hit_rates(con, sizes=[2, 3])
    assert set(df["run"]) == {"c"}  # runs without token-level routing have nothing to replay
    got = df.set_index(["policy", "cache_size"])["hits"]
    for size in (2, 3):
        for p in whatif.POLICIES:
            assert got[(p, size)] == HAND_HITS[size][p]
    assert (df["tokens"] == 8).all() and df.loc[df["cache_size"] == 3, "hit_rate"].eq(0.5).all()
    # a step window replays only its tokens: steps 0..0 are the first four requests 0 1 2 0 (one hit at C=3)
    early = whatif.cache_hit_rates(con, run="c", sizes=[3], policies=("lru",), layer=0, steps=(0, 0))
    assert (early["tokens"].iloc[0], early["hits"].iloc[0]) == (4, 1)
    assert whatif.cache_hit_rates(con, run="c", layer=5).empty
    with pytest.raises(ValueError, match="token-level routing"):
        whatif.cache_hit_rates(con, run="counts_only")
    with pytest.raises(ValueError, match="policy"):
        whatif.cache_hit_rates(con, policies=("fifo",))


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------


def test_cli_whatif(cap_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as ex:
        main(["whatif", "--help"])
    assert ex.value.code == 0 and "Belady" in capsys.readouterr().out
    assert main(["whatif", str(cap_root), "capacity", "--run", "tok", "--factors", "1", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["drop_rate"] == pytest.approx(1 / 16)
    assert main(["whatif", str(cap_root), "capacity"]) == 0
    out = capsys.readouterr().out
    assert "drop_rate" in out and "counts" in out
    assert main(["whatif", str(cap_root), "cache", "--run", "grp", "--format", "csv"]) == 0
    assert capsys.readouterr().out.startswith("run,layer,policy,cache_size")
    assert main(["whatif", str(cap_root), "cache", "--run", "tok"]) == 0
    assert "belady" in capsys.readouterr().out
    assert main(["whatif", str(cap_root), "placement", "--run", "tok", "--devices", "2"]) == 0
    assert "balancedness_after" in capsys.readouterr().out
    # user errors are one line and exit 2
    assert main(["whatif", str(cap_root), "cache", "--run", "cnt"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "token-level routing" in err
    assert main(["whatif", str(cap_root), "capacity", "--group", "epoch"]) == 2
    capsys.readouterr()
    assert main(["whatif", str(cap_root), "placement", "--run", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--run: no run 'nope' in this trace (runs: 'cnt', " in err
    # notes under the table say which run they are about
    assert main(["whatif", str(cap_root), "capacity"]) == 0
    notes = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("note")]
    assert notes and all(ln.startswith("note (run ") for ln in notes), notes
    capsys.readouterr()
    assert main(["whatif", str(tmp_path / "nope"), "capacity"]) == 3


# ---------------------------------------------------------------------------------------------------------------
# Dashboard page
# ---------------------------------------------------------------------------------------------------------------


def test_systems_page_renders(tmp_path: Path) -> None:
    pytest.importorskip("dash")
    pytest.importorskip("plotly")

    from dash._get_app import app_context

    from moescope import dashboard as glue

    syn = glue.synthetic
    shape = syn.Shape(layers=2, experts=8, top_k=2, steps=12, tokens_per_step=128, routing_every=3, seqs=2, seq_len=16)
    root = syn.make_trace(tmp_path / "trace", shape=shape)
    app = glue.create_app(root)
    page = glue.app.page_module("systems")
    token = app_context.set(app)
    try:
        for query in ({}, {"run": "collapse", "layer": "1", "devices": "4", "steps": "2-9"}, {"devices": "x"}):
            text = str(page.layout(**query))
            assert "ms-msg-error" not in text, text[:2000]
            assert text.count("Graph(") == 3
        data = app.moescope_data  # type: ignore[attr-defined]
        F = glue.figures
        cap = F.capacity_figure(data.whatif_capacity("collapse", None), 1)
        assert len(cap.data) == 2 and list(cap.data[-1].x) == list(glue.data.WHATIF_FACTORS)
        bal = F.balance_figure(data.whatif_placement("collapse", 4), 4, 1)
        assert [t.name for t in bal.data] == ["round-robin", "LPT", "LPT + 4 replicas"]
        hits = F.cache_figure(data.whatif_cache("collapse", 1, None), 1)
        assert len(hits.data) == 3 and list(hits.data[0].x) == list(range(1, 9))
    finally:
        app_context.reset(token)
    assert "/systems" in [p["path"] for p in glue.app.nav_pages()]
