"""Compaction: the same rows before and after, readers exact at every stage, SIGKILL at every stage, live runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import moescope
from moescope.format.compact import RECORD, CompactUsageError, compact_run, visible_parts
from moescope.format.reader import check_part
from moescope.format.writer import next_part_seq, write_run

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trace_helpers import layer_spec, load_frame, routing_frame, stats_frame  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
#: Stages at which compact_run calls its hook (moescope.format.compact._at), in order.
STAGES = ("written", "recorded", "renaming", "renamed", "deleting", "cleaned")


def _build(root: Path, steps: int = 8, ranks: int = 2) -> dict[str, int]:
    """A run of `ranks` ranks, one flush (part number) per step; returns the expected totals."""
    run = root / "run"
    for rank in range(ranks):
        for step in range(steps):
            counts = [(step + e + rank) % 5 for e in range(4)]
            write_run(run, {
                "expert_load": load_frame([(step, 0, counts), (step, 1, counts[::-1])]),
                "router_stats": stats_frame([{"step": step, "layer": ly, "tokens": sum(counts)} for ly in (0, 1)]),
                "routing": routing_frame([{"step": step, "layer": 0, "seq": s, "experts": [s % 4, (s + 1) % 4]}
                                          for s in range(rank + 2)]),
            }, rank=rank, layers=[layer_spec(0, 4, 2), layer_spec(1, 4, 2)])
    return {"load_rows": ranks * steps * 8,
            "tokens": sum(2 * sum((s + e + r) % 5 for e in range(4)) for r in range(ranks) for s in range(steps)),
            "routing_rows": sum(steps * (r + 2) for r in range(ranks)),
            "stats_rows": ranks * steps * 2}


def _totals(tr: moescope.Trace) -> dict[str, int]:
    (rows, tokens), = tr.sql("SELECT count(*), sum(tokens) FROM expert_load").fetchall()
    (routing,), = tr.sql("SELECT count(*) FROM routing").fetchall()
    (stats,), = tr.sql("SELECT count(*) FROM router_stats").fetchall()
    return {"load_rows": rows, "tokens": int(tokens), "routing_rows": routing, "stats_rows": stats}


def _per_key(tr: moescope.Trace) -> list[tuple]:
    return tr.sql("SELECT rank, step, layer, expert, sum(tokens), count(*) FROM expert_load GROUP BY ALL "
                  "ORDER BY ALL").fetchall()


def _parts(run: Path) -> list[str]:
    return sorted(f"{t.name}/{p.name}" for t in run.iterdir() if t.is_dir() for p in t.iterdir())


def test_compaction_keeps_every_row_and_merges_parts(tmp_path: Path) -> None:
    want = _build(tmp_path)
    run = tmp_path / "run"
    with moescope.open(tmp_path) as tr:
        before, keys, health = _totals(tr), _per_key(tr), tr.health()
    assert before == want
    res = compact_run(run)
    assert (res.parts_before, res.parts_after) == (3 * 2 * 8, 3 * 2)  # 3 tables x 2 ranks x 8 flushes -> one each
    assert res.rows == want["load_rows"] + want["routing_rows"] + want["stats_rows"]
    assert res.bytes_after < res.bytes_before and res.bytes == res.bytes_after
    assert _parts(run) == [f"{t}/part-{r}-000000-000007.parquet"
                           for t in ("expert_load", "router_stats", "routing") for r in (0, 1)]
    for name in _parts(run):
        check_part(run / name)  # footer, version, every page's checksum
        assert pq.ParquetFile(run / name).metadata.row_group(0).column(0).statistics is not None
    with moescope.open(tmp_path) as tr:
        assert _totals(tr) == before
        assert _per_key(tr) == keys
        h = tr.health()
        assert h[["rule", "status", "layer", "value"]].equals(health[["rule", "status", "layer", "value"]])
    # part numbers are never reused after a compaction
    assert next_part_seq(run, 0) == 8 and next_part_seq(run, 1) == 8
    again = compact_run(run)
    assert again.merged == [] and again.parts_after == again.parts_before == 6


def test_cli_compact(tmp_path: Path) -> None:
    _build(tmp_path, steps=3, ranks=1)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "moescope", "compact", str(tmp_path / "run")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "9 parts" in out.stdout and "-> 3 " in out.stdout, out.stdout
    assert "merging 3 expert_load parts of rank 0" in out.stderr
    bad = subprocess.run([sys.executable, "-m", "moescope", "compact", str(tmp_path)], capture_output=True,
                         text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "not a moescope run directory" in bad.stderr
    from moescope.format.lock import RunLock

    with RunLock(tmp_path / "run", 0):  # what a live recorder of rank 0 holds
        live = subprocess.run([sys.executable, "-m", "moescope", "compact", str(tmp_path / "run")],
                              capture_output=True, text=True, env=env, timeout=120)
    assert live.returncode == 2 and "rank(s) 0 are being recorded" in live.stderr, live.stderr


def _kill_script(run: Path, stage: str, grace: float = 0.0) -> str:
    return textwrap.dedent(f"""
        import os, signal
        from moescope.format import compact
        def at(s):
            if s == {stage!r}:
                os.kill(os.getpid(), signal.SIGKILL)
        compact._at = at
        compact.compact_run({str(run)!r}, grace_s={grace})
        raise SystemExit(5)  # never reached when the stage is hit
    """)


@pytest.mark.parametrize("stage", STAGES)
def test_sigkill_at_every_stage_loses_and_doubles_nothing(tmp_path: Path, stage: str) -> None:
    want = _build(tmp_path, steps=4)
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-c", _kill_script(run, stage)], env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == -signal.SIGKILL, p.stderr
    with moescope.open(tmp_path, materialize=False) as tr:  # what a reader sees right after the kill
        assert _totals(tr) == want
    leftovers = [n for n in _parts(run) if ".compact.tmp" in n]
    assert bool(leftovers) == (stage in ("written", "recorded", "renaming")), leftovers
    res = compact_run(run)  # rolls the killed compaction back or forward, then compacts
    with moescope.open(tmp_path) as tr:
        assert _totals(tr) == want
    assert _parts(run) == [f"{t}/part-{r}-000000-000003.parquet"
                           for t in ("expert_load", "router_stats", "routing") for r in (0, 1)]
    assert json.loads((run / RECORD).read_text())["replaced"] == {}
    assert res.parts_after == 6
    assert not list(run.glob(".moescope-*.lock"))  # the locks went with their owners


def test_reader_loop_sees_exact_totals_while_compacting(tmp_path: Path) -> None:
    """A compaction in another process, slowed at every stage; readers in this one, checking at every moment."""
    want = _build(tmp_path, steps=6)
    run = tmp_path / "run"
    script = textwrap.dedent(f"""
        import time
        from moescope.format import compact
        compact._at = lambda s: time.sleep(0.3)
        compact.compact_run({str(run)!r}, grace_s=1.5)
    """)
    live_mem = moescope.open(tmp_path, materialize=True)
    live_view = moescope.open(tmp_path, materialize=False)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env)
    seen_states: set[int] = set()
    checks = 0
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            for tr in (live_mem, live_view):
                tr.refresh()
                assert _totals(tr) == want, f"after {checks} checks"
            with moescope.open(tmp_path, materialize=False) as fresh:
                assert _totals(fresh) == want
                seen_states.add(len(fresh.sql("SELECT * FROM trace_files").fetchall()))
            checks += 1
        assert proc.wait(timeout=60) == 0
        for tr in (live_mem, live_view):
            tr.refresh()
            assert tr.data_version >= 1  # the file set moved to the merged parts (and, in view mode, back)
            assert _totals(tr) == want
            assert len(tr.sql("SELECT * FROM trace_files").fetchall()) == 6
    finally:
        proc.kill()
        live_mem.close()
        live_view.close()
    assert checks >= 5 and {36, 6} <= seen_states  # readers ran before and after the commit


def test_running_run_compacts_only_flushed_steps(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from toy_moe import ToyMoE, ToyRouter

    torch.manual_seed(0)
    model = ToyMoE().eval()
    truth: dict[tuple[int, int, int], int] = {}
    cur = {"step": 0}
    layer_of = {id(m): i for i, m in enumerate(m for m in model.modules() if isinstance(m, ToyRouter))}

    def hook(mod: torch.nn.Module, args: tuple, out: tuple) -> None:  # the router's own dispatch
        for e in out[2].reshape(-1).tolist():
            key = (cur["step"], layer_of[id(mod)], e)
            truth[key] = truth.get(key, 0) + 1

    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, ToyRouter)]
    run = tmp_path / "run"

    def steps(rec: moescope.Recorder, a: int, b: int) -> None:
        for s in range(a, b):
            cur["step"] = s
            rec.step = s
            with torch.no_grad():
                model(torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(s)))

    with moescope.record(model, run, tokens=1.0, flush_every=1) as rec:
        steps(rec, 0, 6)
        rec.flush()
        rec.wait()
        with pytest.raises(CompactUsageError, match="being recorded"):
            compact_run(run)
        with pytest.raises(CompactUsageError, match="flushed up to step 5"):
            compact_run(run, up_to_step=50)  # steps after 5 do not exist yet
        res = compact_run(run, up_to_step=3)
        assert res.live_ranks == [0]
        assert sorted(res.merged) == [f"{t}/part-0-000000-000003.parquet"
                                      for t in ("expert_load", "router_stats", "routing")]
        steps(rec, 6, 9)
    with moescope.open(tmp_path) as tr:
        got = {(s, ly, e): n for s, ly, e, n in tr.sql(
            "SELECT step, layer, expert, sum(tokens) FROM expert_load GROUP BY ALL").fetchall() if n}
        (routing,), = tr.sql("SELECT count(*) FROM routing").fetchall()
    assert got == truth and routing == 9 * 10 * 2  # 9 steps x 10 tokens x 2 layers
    # a resumed recorder continues after the merged part numbers and records every new step once
    with moescope.record(model, run, tokens=1.0, flush_every=1, resume=True) as rec:
        steps(rec, 9, 11)
    for h in hs:
        h.remove()
    res = compact_run(run)
    # the small merged part is merged again with the newer parts: one part per table remains
    assert res.live_ranks == [] and [p.name[:14] for p in visible_parts(run)["expert_load"]] == ["part-0-000000-"]
    with moescope.open(tmp_path) as tr:
        got = {(s, ly, e): n for s, ly, e, n in tr.sql(
            "SELECT step, layer, expert, sum(tokens) FROM expert_load GROUP BY ALL").fetchall() if n}
    assert got == truth


def test_recorder_is_refused_while_compaction_holds_the_rank(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from toy_moe import ToyMoE

    from moescope.capture.recorder import RecordError
    from moescope.format import compact

    _build(tmp_path, steps=3, ranks=1)
    refused: list[str] = []

    def at(stage: str) -> None:
        if stage == "recorded":
            try:
                moescope.record(ToyMoE(), tmp_path / "run", resume=True).start()
            except RecordError as e:
                refused.append(str(e))

    old, compact._at = compact._at, at
    try:
        compact_run(tmp_path / "run")
    finally:
        compact._at = old
    assert len(refused) == 1 and "being compacted by pid" in refused[0]
    del torch


def test_damaged_part_is_an_error_and_nothing_changes(tmp_path: Path) -> None:
    from moescope.format.manifest import TraceError

    _build(tmp_path, steps=3, ranks=1)
    run = tmp_path / "run"
    victim = run / "expert_load" / "part-0-000001.parquet"
    data = bytearray(victim.read_bytes())
    data[8:40] = b"\0" * 32  # inside the first data page
    victim.write_bytes(bytes(data))
    before = _parts(run)
    with pytest.raises(TraceError, match="part-0-000001.parquet"):
        compact_run(run)
    assert _parts(run) == before


def test_readers_exact_while_a_live_recorder_and_a_compaction_run(tmp_path: Path) -> None:
    """A recorder (process 1) writes a step per flush; a compaction (process 2) merges up to a flushed step; this
    process reads in a loop. Every snapshot holds whole steps only, each equal to what the routers dispatched."""
    pytest.importorskip("torch")
    run = tmp_path / "run"
    truth_file = tmp_path / "truth.json"
    tests_dir = str(Path(__file__).resolve().parents[1])
    recorder = textwrap.dedent(f"""
        import json, sys, time
        import torch
        sys.path.insert(0, {tests_dir!r})
        import moescope
        from toy_moe import ToyMoE, ToyRouter
        torch.manual_seed(0)
        model = ToyMoE().eval()
        routers = [m for m in model.modules() if isinstance(m, ToyRouter)]
        truth, cur = {{}}, [0]
        def hook(mod, args, out):
            for e in out[2].reshape(-1).tolist():
                key = f"{{cur[0]}},{{routers.index(mod)}},{{e}}"
                truth[key] = truth.get(key, 0) + 1
        for r in routers:
            r.register_forward_hook(hook)
        with moescope.record(model, {str(run)!r}, tokens=1.0, flush_every=1) as rec:
            for s in range(40):
                cur[0] = rec.step = s
                with torch.no_grad():
                    model(torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(s)))
                time.sleep(0.1)
        json.dump(truth, open({str(truth_file)!r}, "w"))
    """)
    compactor = textwrap.dedent(f"""
        import json, time
        from moescope.format import compact
        compact._at = lambda s: time.sleep(0.3)
        res = compact.compact_run({str(run)!r}, up_to_step=8, grace_s=1.0)
        print(json.dumps({{"live": res.live_ranks, "merged": res.merged}}))
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    rec = subprocess.Popen([sys.executable, "-c", recorder], env=env)
    snapshots: list[dict[tuple[int, int, int], int]] = []
    comp = None
    try:
        deadline = time.monotonic() + 240
        while not (run / "manifest.json").exists() or not list((run / "expert_load").glob("part-0-00001*")):
            assert rec.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        live = moescope.open(tmp_path, materialize=False)
        comp = subprocess.Popen([sys.executable, "-c", compactor], env=env, stdout=subprocess.PIPE, text=True)
        while rec.poll() is None and time.monotonic() < deadline:
            live.refresh()
            snapshots.append({(s, ly, e): n for s, ly, e, n in live.sql(
                "SELECT step, layer, expert, sum(tokens) FROM expert_load GROUP BY ALL").fetchall() if n})
        assert rec.wait(timeout=60) == 0
        out, _ = comp.communicate(timeout=120)
        assert comp.returncode == 0
        live.close()
    finally:
        rec.kill()
        if comp is not None:
            comp.kill()
    done = json.loads(out)
    assert done["live"] == [0] and "expert_load/part-0-000000-000008.parquet" in done["merged"]
    truth = {tuple(int(x) for x in k.split(",")): v for k, v in json.loads(truth_file.read_text()).items()}
    assert len(snapshots) >= 5
    for snap in snapshots:
        steps = {s for s, _, _ in snap}
        assert steps == set(range(len(steps)))  # a prefix of the steps: nothing missing in between
        assert snap == {k: v for k, v in truth.items() if k[0] in steps}  # each step whole, nothing twice
    compact_run(run)
    with moescope.open(tmp_path) as tr:
        final = {(s, ly, e): n for s, ly, e, n in tr.sql(
            "SELECT step, layer, expert, sum(tokens) FROM expert_load GROUP BY ALL").fetchall() if n}
    assert final == truth


def test_damaged_compaction_record_is_an_error_naming_it(tmp_path: Path) -> None:
    from moescope.format.manifest import TraceError

    want = _build(tmp_path, steps=3, ranks=1)
    run = tmp_path / "run"
    compact_run(run)
    live = moescope.open(tmp_path)
    (run / RECORD).write_text('{"generation": "x"')  # torn by hand: never written this way (atomic replace)
    try:
        assert live.refresh() is False and RECORD in (live.refresh_error or "")
        assert _totals(live) == want  # keeps serving what it had
    finally:
        live.close()
    with pytest.raises(TraceError, match="unreadable compaction record"):
        moescope.open(tmp_path)
