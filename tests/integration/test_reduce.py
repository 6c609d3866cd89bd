"""reduce="global": each flush's counts and stats summed over the process group, written once; gloo processes.

Every rank records the same inputs twice, per rank (reduce="none") and reduced (reduce="global"), and counts
what its routers dispatched with its own hook: the reduced trace equals the sum of the per-rank traces and the
sum of the hooks' counts, maxima are maxima, token rows stay per rank, and a (step, tag) that only one rank ran
is kept (the union of the ranks' keys).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import duckdb
import pytest

pytest.importorskip("torch")

WORKER = textwrap.dedent(
    """
    import json, os, sys, torch, torch.distributed as dist, moescope
    sys.path.insert(0, {tests!r})
    from toy_moe import ToyMoE
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    out = {out!r}
    torch.manual_seed(0)
    m = ToyMoE()  # the same weights on every rank
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 64, (2 * world, 6), generator=g) for _ in range(5)]
    dispatched = {{}}  # (mode, step, tag, layer, expert) -> assignments, from our own hook on each router
    state = {{"mode": None, "rec": None}}

    def hook(layer):
        def fn(mod, args, output):
            rec = state["rec"]
            for e in output[2].reshape(-1).tolist():  # ids [T, k]
                key = (state["mode"], rec.step, rec.current_tag, layer, e)
                dispatched[key] = dispatched.get(key, 0) + 1
        return fn

    for i, b in enumerate(m.blocks):
        b.router.register_forward_hook(hook(i))
    groups = None
    if world == 4:  # two reduce groups, {{0, 1}} and {{2, 3}} (e.g. the data-parallel groups of two stages)
        groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    # "rowcap": the token-row cap flushes after every forward, a different number of times per rank (rank 0 runs
    # one forward more): those flushes write rows only, without a collective, so the group never waits
    modes = [("none", {{"reduce": "none"}}), ("global", {{}}), ("rowcap", {{"max_rows_per_flush": 1}})]
    if groups is not None:
        modes.append(("group", {{"group": groups[rank // 2]}}))
    for mode, kw in modes:
        state["mode"] = mode
        with moescope.record(m, f"{{out}}/{{mode}}/run", tokens=0.5, flush_every=2, **kw) as rec:
            state["rec"] = rec
            for step, x in enumerate(batches):
                rec.step = step
                m(x[rank::world])  # data parallel: each rank its shard of the global batch
                if step == 3 and rank == 0:
                    with rec.tag("solo"):  # a (step, tag) only rank 0 runs: the union of keys keeps it
                        m(x[:1])
    if world == 2:  # an exception on every rank: the last window is written per rank, not reduced
        state["mode"] = "crash"
        try:
            with moescope.record(m, f"{{out}}/crash/run", flush_every=2) as rec:
                state["rec"] = rec
                for step, x in enumerate(batches):
                    rec.step = step
                    m(x[rank::world])
                    if step == 2:
                        raise KeyboardInterrupt
        except KeyboardInterrupt:
            pass
    if world == 2:  # steps counted from forwards, rank 0 one forward more: must not hang, writes per rank
        state["mode"] = "autostep"
        with moescope.record(m, f"{{out}}/autostep/run", flush_every=2) as rec:
            state["rec"] = rec
            for step, x in enumerate(batches):
                m(x[rank::world])
                if step == 1 and rank == 0:
                    m(x[:1])  # an evaluation forward on rank 0 alone: its step counter runs ahead
    with open(f"{{out}}/dispatched-{{rank}}.json", "w") as fh:
        json.dump([[*k, v] for k, v in dispatched.items()], fh)
    dist.barrier()
    dist.destroy_process_group()
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(out: Path, world: int) -> None:
    script = WORKER.format(tests=str(Path(__file__).resolve().parents[1]), out=str(out))
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(world)}
    procs = [subprocess.Popen([sys.executable, "-c", script], env={**env, "RANK": str(r)}, stderr=subprocess.PIPE,
                              text=True) for r in range(world)]
    try:
        for p in procs:
            _, err = p.communicate(timeout=300)
            assert p.returncode == 0, err[-3000:]
    finally:
        for p in procs:  # a rank stuck in a collective must not outlive the test
            if p.poll() is None:
                p.kill()


def _q(sql: str) -> list[tuple]:
    return duckdb.sql(sql).fetchall()


def _close(a: list[tuple], b: list[tuple], exact: int) -> None:
    """Rows equal: the first `exact` columns exactly, the rest to float64 summation-order precision."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x[:exact] == y[:exact]
        for u, v in zip(x[exact:], y[exact:]):
            assert (u is None and v is None) or u == pytest.approx(v, rel=1e-9, abs=1e-9), (x, y)


@pytest.mark.dist
@pytest.mark.parametrize("world", [2, 4])
def test_reduced_trace_is_the_sum_of_the_per_rank_traces(tmp_path: Path, world: int) -> None:
    _run(tmp_path, world)
    none, glob = tmp_path / "none" / "run", tmp_path / "global" / "run"
    # One rank writes the counts; every rank still writes its manifest and its own token rows.
    assert {p.name.split("-")[1] for p in (glob / "expert_load").glob("*.parquet")} == {"0"}
    assert {p.name.split("-")[1] for p in (glob / "router_stats").glob("*.parquet")} == {"0"}
    assert {p.name.split("-")[1] for p in (none / "expert_load").glob("*.parquet")} == {str(r) for r in range(world)}
    for r in range(world):
        man = json.loads((glob / ("manifest.json" if r == 0 else f"manifest.rank-{r}.json")).read_text())
        assert (man["capture"]["reduce"], man["capture"]["reduce_group_size"]) == ("global", world)
        assert ("expert_load" in man["counters"]["rows_written"]) == (r == 0)
    assert json.loads((none / "manifest.json").read_text())["capture"]["reduce"] == "none"

    load = "step, tag, layer, expert, {}(tokens), {}(prob_sum), {}(weight_sum)"
    summed = _q(f"SELECT {load.format('sum', 'sum', 'sum')} FROM '{none}/expert_load/*.parquet' "
                "GROUP BY ALL ORDER BY ALL")
    reduced = _q(f"SELECT {load.format('', '', '')} FROM '{glob}/expert_load/*.parquet' ORDER BY ALL")
    _close(reduced, summed, exact=5)
    assert ("solo" in {r[1] for r in reduced}) and len(reduced) == len(summed)

    # Known answer: every (step, layer) holds the global batch's tokens × top-2 (plus the solo forward).
    per_step = dict(_q(f"SELECT step || tag, sum(tokens) FROM '{glob}/expert_load/*.parquet' WHERE layer = 0 "
                       "GROUP BY ALL"))
    assert per_step == {**{f"{s}": 2 * world * 6 * 2 for s in range(5)}, "3solo": 6 * 2}
    # ... and exactly what the routers dispatched, summed over the ranks' own hooks.
    hooks: dict[tuple, int] = {}
    for r in range(world):
        for mode, step, tag, layer, expert, n in json.loads((tmp_path / f"dispatched-{r}.json").read_text()):
            if mode == "global":
                hooks[(step, tag, layer, expert)] = hooks.get((step, tag, layer, expert), 0) + n
    assert {r[:4]: r[4] for r in reduced if r[4]} == hooks

    stats = ("step, tag, layer, {s}(tokens), {s}(entropy_sum), {s}(lse_sum), {s}(lse_sq_sum), {s}(margin_sum), "
             "{s}(nonfinite), {m}(lse_max)")
    summed = _q(f"SELECT {stats.format(s='sum', m='max')} FROM '{none}/router_stats/*.parquet' GROUP BY ALL "
                "ORDER BY ALL")
    reduced = _q(f"SELECT {stats.format(s='', m='')} FROM '{glob}/router_stats/*.parquet' ORDER BY ALL")
    _close(reduced, summed, exact=4)
    # the maximum is a maximum over ranks, not a sum: it is one of the ranks' own maxima
    assert _q(f"SELECT count(*) FROM '{glob}/router_stats/*.parquet' g WHERE g.lse_max NOT IN "
              f"(SELECT lse_max FROM '{none}/router_stats/*.parquet')") == [(0,)]

    # Token rows are per rank in both modes (distinct tokens, not copies): the same rows, the same ranks.
    rows = "rank, step, tag, layer, seq, pos, token_id, experts"
    assert _q(f"SELECT {rows} FROM '{glob}/routing/*.parquet' ORDER BY ALL") == \
        _q(f"SELECT {rows} FROM '{none}/routing/*.parquet' ORDER BY ALL")
    assert {r[0] for r in _q(f"SELECT DISTINCT rank FROM '{glob}/routing/*.parquet'")} == set(range(world))
    cap = tmp_path / "rowcap" / "run"
    assert len(list((cap / "routing").glob("*.parquet"))) > len(list((glob / "routing").glob("*.parquet")))
    assert _q(f"SELECT {rows} FROM '{cap}/routing/*.parquet' ORDER BY ALL") == \
        _q(f"SELECT {rows} FROM '{glob}/routing/*.parquet' ORDER BY ALL")
    counts = "SELECT rank, step, tag, layer, expert, tokens FROM '{}/expert_load/*.parquet' ORDER BY ALL"
    assert _q(counts.format(cap)) == _q(counts.format(glob))

    if world == 4:  # group=: each group's first rank writes its group's sums
        grp = tmp_path / "group" / "run"
        assert {p.name.split("-")[1] for p in (grp / "expert_load").glob("*.parquet")} == {"0", "2"}
        by_group = _q(f"SELECT rank // 2, step, tag, layer, expert, sum(tokens) FROM '{none}/expert_load/*.parquet' "
                      "GROUP BY ALL ORDER BY ALL")
        assert _q(f"SELECT rank // 2, step, tag, layer, expert, tokens FROM '{grp}/expert_load/*.parquet' "
                  "ORDER BY ALL") == by_group
        assert json.loads((grp / "manifest.rank-2.json").read_text())["capture"]["reduce_group_size"] == 2
    else:  # leaving on an exception: the windows reduced so far are rank 0's, the last one is per rank
        crash = tmp_path / "crash" / "run"
        got = _q(f"SELECT step, rank FROM '{crash}/expert_load/*.parquet' GROUP BY ALL ORDER BY ALL")
        assert got == [(0, 0), (1, 0), (2, 0), (2, 1)]
        assert _q(f"SELECT step, layer, expert, sum(tokens) FROM '{crash}/expert_load/*.parquet' GROUP BY ALL "
                  "ORDER BY ALL") == _q(f"SELECT step, layer, expert, sum(tokens) FROM '{none}/expert_load/*.parquet'"
                                        " WHERE step <= 2 AND tag = '' GROUP BY ALL ORDER BY ALL")
        assert json.loads((crash / "manifest.rank-1.json").read_text())["counters"]["unreduced_close"] is True
        # no rec.step: the recorder does not risk a collective the ranks may reach at different times
        auto = tmp_path / "autostep" / "run"
        assert {p.name.split("-")[1] for p in (auto / "expert_load").glob("*.parquet")} == {"0", "1"}
        for r in range(2):
            man = json.loads((auto / ("manifest.json" if r == 0 else "manifest.rank-1.json")).read_text())
            assert "rec.step never set" in man["counters"]["unreduced"]
        mine: dict[tuple, int] = {}
        for r in range(2):
            for mode, step, _tag, layer, expert, n in json.loads((tmp_path / f"dispatched-{r}.json").read_text()):
                if mode == "autostep":
                    mine[(r, step, layer, expert)] = mine.get((r, step, layer, expert), 0) + n
        got = _q(f"SELECT rank, step, layer, expert, tokens FROM '{auto}/expert_load/*.parquet' WHERE tokens > 0")
        assert {g[:4]: g[4] for g in got} == mine
