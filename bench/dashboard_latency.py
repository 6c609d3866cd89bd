"""Dashboard latency on a big trace: every page's data callbacks, first open and subsequent opens.

Generates a synthetic trace with about --assignments token-level assignments (default 100M: 2 runs × 8 layers ×
16 experts, top-2; reused from --out when it is already there), builds the app, and times the real request
path of each page through Flask's test client: the pages router callback (layout = data functions + figures +
JSON), first open (cold caches), the same view again, another layer, another step window and the other run.
The SQL page also runs its default query. Target: every page within 2 s after the first open.

Live phase (--live ROUNDS, default 1): a writer appends one flush (the last steps of every table, shifted to new
steps) to the first run every --every seconds; after each append the dashboard's refresh timer fires (the
interval callback: Trace.refresh) and the open page re-renders from the new data version, as the browser does.
Each page is measured after its own append, so every figure is a first render on new data. Also timed: the Drift
page's first open on a new baseline/current pair (per-sequence counts kept per part, not the raw rows).

    python bench/dashboard_latency.py                          # 100M assignments (a few minutes to generate)
    python bench/dashboard_latency.py --assignments 2000000    # quick run
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from moescope import dashboard

PAGES = ["/", "/utilization", "/collapse", "/similarity", "/drift", "/tokens", "/sql"]


def shape_for(assignments: int) -> Any:
    """A Shape with about `assignments` routed assignments over 2 runs, 8 layers, 2 tags, top-2."""
    syn = dashboard.synthetic
    runs, layers, tags, k, seq_len = 2, 8, 2, 2, 128
    routed_steps = 200
    per_chunk = assignments / (runs * layers * tags * k * routed_steps)  # tokens per step × tag × layer
    seqs = max(1, round(per_chunk / seq_len))
    return syn.Shape(layers=layers, experts=16, top_k=k, steps=routed_steps * 5, tokens_per_step=seqs * seq_len,
                     routing_every=5, seqs=seqs, seq_len=seq_len)


def ensure_trace(out: Path, assignments: int, fresh: bool) -> tuple[Path, float]:
    """Generate the trace unless `out` already holds one made with the same parameters."""
    marker = out / "bench.json"
    shape = shape_for(assignments)
    params = {"assignments": assignments, "shape": shape.__dict__}
    if not fresh and marker.is_file() and json.loads(marker.read_text()) == params:
        return out, 0.0
    if out.exists():
        shutil.rmtree(out)
    t0 = time.perf_counter()
    dashboard.synthetic.make_trace(out, kinds=("balanced", "collapse"), shape=shape)
    marker.write_text(json.dumps(params))
    return out, time.perf_counter() - t0


class Client:
    """Drives the Dash pages router and page callbacks over Flask's test client, as the browser does."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.http = app.server.test_client()
        assert self.http.get("/").status_code == 200
        deps = self.http.get("/_dash-dependencies").get_json()
        self.router = next(d for d in deps if "_pages_content.children" in d["output"])
        self.sql = next(d for d in deps if d["output"].startswith("..sql-msg.children"))
        self.tick_dep = next((d for d in deps if "ms-live.children" in d["output"]), None)
        self.version = 0

    def _post(self, dep: dict[str, Any], inputs: list[dict[str, Any]], state: list[dict[str, Any]]) -> Any:
        outputs = [
            {"id": o.split(".")[0], "property": o.split(".")[1]}
            for o in dep["output"].strip(".").split("...")
        ]
        body = {"output": dep["output"], "outputs": outputs, "inputs": inputs, "state": state,
                "changedPropIds": [f"{inputs[0]['id']}.{inputs[0]['property']}"]}
        r = self.http.post("/_dash-update-component", json=body)
        if r.status_code != 200:
            raise RuntimeError(f"callback failed ({r.status_code}): {r.data[:300]!r}")
        return r.get_json()

    def open(self, path: str, search: str = "") -> tuple[float, int]:
        """Open a page: (seconds, response bytes)."""
        inputs = [{"id": "_pages_location", "property": "pathname", "value": path},
                  {"id": "_pages_location", "property": "search", "value": search}]
        if any(i["id"] == "ms-live-version" for i in self.router["inputs"]):  # the live dashboard's router input
            inputs.append({"id": "ms-live-version", "property": "data", "value": self.version})
        t0 = time.perf_counter()
        out = self._post(self.router, inputs, [])
        dt = time.perf_counter() - t0
        text = json.dumps(out)
        if "ms-msg-error" in text:
            raise RuntimeError(f"{path}{search}: a panel failed: {text[text.index('ms-msg-error'):][:300]}")
        return dt, len(text)

    def run_sql(self, query: str) -> float:
        """Run a query in the SQL console: seconds."""
        inputs = [{"id": "sql-run", "property": "n_clicks", "value": 1}]
        state = [{"id": "sql-query", "property": "value", "value": query}]
        t0 = time.perf_counter()
        self._post(self.sql, inputs, state)
        return time.perf_counter() - t0


    def tick(self) -> float:
        """Fire the live refresh timer once (Trace.refresh); seconds. Remembers the data version it returns."""
        inputs = [{"id": "ms-live-interval", "property": "n_intervals", "value": 1}]
        state = [{"id": "ms-live-version", "property": "data", "value": self.version}]
        t0 = time.perf_counter()
        out = self._post(self.tick_dep, inputs, state)
        dt = time.perf_counter() - t0
        new = out.get("response", {}).get("ms-live-version", {}).get("data")
        if new is not None:
            self.version = new
        return dt


def append_flush(run_dir: Path, steps: int = 5) -> list[Path]:
    """Append one flush to `run_dir`, as a recorder does: the last `steps` steps of each table, moved past the end.

    Returns the parts written (complete under a temporary name, then renamed: format.writer).
    """
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from moescope.format.writer import next_part_seq, write_part

    seq = next_part_seq(run_dir, 0)
    last = {}
    for table in ("expert_load", "router_stats", "routing"):
        parts = sorted((run_dir / table).glob("part-*.parquet"))
        if parts:
            last[table] = pq.read_table(parts[-1])
    top = max(int(pc.max(t.column("step")).as_py()) for t in last.values())
    written = []
    for table, t in last.items():
        hi = int(pc.max(t.column("step")).as_py())
        lo = hi - steps + 1 if table != "routing" else hi  # routing: the last routed step only
        t = t.filter(pc.greater_equal(t.column("step"), lo))
        shifted = pc.add(t.column("step"), top + 1 - lo)
        written.append(write_part(run_dir, table, 0, seq, t.set_column(t.schema.get_field_index("step"), "step",
                                                                        shifted)))
    return written


def live_phase(client: Client, data: Any, root: Path, rounds: int, every: float, search: str) -> dict[str, list[float]]:
    """Per page: seconds from an append to the page re-rendered on the new data (refresh + render), `rounds` times."""
    run_dir = Path(data.trace.run_dirs[data.run_names()[0]])
    out: dict[str, list[float]] = {p: [] for p in PAGES}
    written: list[Path] = []
    try:
        for _ in range(rounds):
            for path in PAGES:
                t_write = time.perf_counter()
                written += append_flush(run_dir)
                before = client.version
                refresh_s = client.tick()
                if client.version == before:
                    raise RuntimeError("the refresh did not see the appended flush")
                render_s, _ = client.open(path, search)
                out[path].append(refresh_s + render_s)
                time.sleep(max(0.0, every - (time.perf_counter() - t_write)))
    finally:  # the benchmark trace is reused by later runs: leave it as generated
        for p in written:
            p.unlink(missing_ok=True)
    return out


def main(argv: list[str] | None = None) -> int:
    """Generate (or reuse) the trace, time every page, print a table and a verdict."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--assignments", type=int, default=100_000_000, help="token-level assignments (default 100M)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/moescope-dashboard-bench"), help="where the trace goes")
    ap.add_argument("--fresh", action="store_true", help="regenerate the trace even when --out has it")
    ap.add_argument("--target", type=float, default=2.0, help="seconds every page must stay under after first open")
    ap.add_argument("--live", type=int, default=1, metavar="ROUNDS",
                    help="live phase: rounds of (append a flush, refresh, re-render) per page (0 = skip)")
    ap.add_argument("--every", type=float, default=2.0, metavar="S", help="live phase: seconds between appends")
    ap.add_argument("--live-only", action="store_true", help="skip the cold/warm page table (live phase and drift)")
    args = ap.parse_args(argv)

    root, gen_s = ensure_trace(args.out, args.assignments, args.fresh)
    import moescope

    tr = moescope.open(root)
    n_assign = tr.con.execute("SELECT SUM(len(experts)) FROM routing").fetchone()[0]
    n_load = tr.con.execute("SELECT COUNT(*) FROM expert_load").fetchone()[0]
    size = sum(p.stat().st_size for p in root.rglob("*.parquet"))
    tr.close()
    print(f"trace {root}: {n_assign:,} assignments in routing, {n_load:,} expert_load rows, {size / 2**20:,.0f} MiB"
          + (f" (generated in {gen_s:.0f} s)" if gen_s else " (reused)"))

    t0 = time.perf_counter()
    app = dashboard.create_app(root, warm=False)  # cold caches: "first open" pays for every query
    client = Client(app)
    print(f"app start-up (open trace, build app): {time.perf_counter() - t0:.2f} s")

    data = app.moescope_data
    runs = data.run_names()
    lo, hi = data.step_ranges()[runs[0]]
    views = [
        ("first open", f"?run={runs[0]}&layer=0"),
        ("again", f"?run={runs[0]}&layer=0"),
        ("other layer", f"?run={runs[0]}&layer=3"),
        ("step window", f"?run={runs[0]}&layer=3&steps={lo + (hi - lo) // 4}-{lo + (hi - lo) // 2}"),
        ("other run", f"?run={runs[-1]}&layer=3"),
        ("other run again", f"?run={runs[-1]}&layer=3"),
    ]
    worst_after = 0.0
    if not args.live_only:
        rows = []
        for path in PAGES:
            times = []
            for _, search in views:
                dt, _ = client.open(path, search)
                times.append(dt)
            if path == "/sql":
                query = ("SELECT layer, expert, SUM(tokens) AS assignments FROM expert_load "
                         f"WHERE run = '{runs[0]}' GROUP BY layer, expert ORDER BY layer, expert")
                times.append(client.run_sql(query))
                times.append(client.run_sql("SELECT layer, expert, COUNT(*) AS n FROM assignments "
                                            f"WHERE run = '{runs[0]}' AND step = {lo} GROUP BY ALL"))
            rows.append((path, times))

        names = [v[0] for v in views]
        print()
        print(f"{'page':<14}" + "".join(f"{n:>17}" for n in names) + f"{'sql query':>12}{'sql assignments':>17}")
        for path, times in rows:
            cells = "".join(f"{t:>16.3f}s" for t in times[: len(views)])
            extra = "".join(f"{t:>11.3f}s" if i == 0 else f"{t:>16.3f}s" for i, t in enumerate(times[len(views):]))
            print(f"{path:<14}{cells}{extra}")
            worst_after = max(worst_after, *times[1:])

        cold = max(t[0] for _, t in rows)
        print()
        print(f"slowest first open: {cold:.2f} s; slowest view after the first open: {worst_after:.2f} s "
              f"(target {args.target:g} s): {'OK' if worst_after <= args.target else 'MISSED'}")
    else:
        t0 = time.perf_counter()
        client.open("/drift", f"?run={runs[0]}")
        print(f"/drift first open after start (builds the per-sequence counts of every routing part): "
              f"{time.perf_counter() - t0:.2f} s")

    # A new drift comparison (other slices) is a first open of its own: the bootstrap resamples the baseline's
    # per-sequence counts, kept per routing part since the first drift, not the raw rows.
    tags = [t for t in data.tags(runs[0]) if t]
    drift_first = float("nan")
    if len(tags) >= 2:
        mid = lo + (hi - lo) // 2
        search = f"?run={runs[0]}&b_run={runs[0]}&b_tag={tags[1]}&b_steps={lo}-{mid}&c_run={runs[-1]}&c_tag={tags[0]}"
        drift_first, _ = client.open("/drift", search)
        again, _ = client.open("/drift", search)
        print(f"/drift on a new baseline/current pair: first open {drift_first:.3f}s, again {again:.3f}s "
              f"(target {args.target:g} s): {'OK' if drift_first <= args.target else 'MISSED'}")

    live_worst = 0.0
    if args.live > 0:
        print()
        print(f"live: one flush appended every {args.every:g} s to run {runs[0]!r}; seconds from the append to the "
              "page re-rendered on the new data (refresh + render):")
        live = live_phase(client, data, root, args.live, args.every, f"?run={runs[0]}&layer=0")
        for path, times in live.items():
            print(f"  {path:<14}" + "".join(f"{t:>9.3f}s" for t in times))
            live_worst = max(live_worst, *times)
        print(f"slowest re-render after a refresh: {live_worst:.2f} s (target {args.target:g} s): "
              f"{'OK' if live_worst <= args.target else 'MISSED'}")
    print(f"cache: {data.cache.hits} hits, {data.cache.misses} misses")
    data.close()
    if not args.live_only:
        fresh = dashboard.data.DashboardData(root)
        print(f"background warm-up that create_app(warm=True) starts: {fresh.warm():.2f} s")
        fresh.close()
    worst = max(worst_after, live_worst, 0.0 if math.isnan(drift_first) else drift_first)
    return 0 if worst <= args.target else 1


if __name__ == "__main__":
    sys.exit(main())
