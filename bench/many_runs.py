"""Many runs: check, report and whatif on a root of 100 runs and of 1,000 runs, side by side with the ratio.

Each run is small (layers × experts × steps of expert_load and router_stats, written with `write_run`), so
what grows is the number of runs and files: a per-run loop of queries (each scanning every file's footer)
shows up as a ratio far above 10, a set-based one near 10 or below. Also counts the SQL statements each
command issues (the property tests/unit/test_many_runs.py asserts).

    python bench/many_runs.py                      # 100 vs 1,000 runs × 4 layers × 8 experts × 20 steps
    python bench/many_runs.py --small 20 --large 200 --only whatif
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from collections.abc import Callable
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


def build_root(root: Path, n_runs: int, layers: int = 4, experts: int = 8, steps: int = 20, seed: int = 0) -> Path:
    """`n_runs` small runs below `root` (a third of them collapsing onto two experts), via format.write_run."""
    from moescope.format.writer import write_run

    rng = np.random.default_rng(seed)
    s, ly, e = np.meshgrid(np.arange(steps), np.arange(layers), np.arange(experts), indexing="ij")
    s, ly, e = s.ravel(), ly.ravel(), e.ravel()
    for i in range(n_runs):
        p = np.full(experts, 1.0 / experts) if i % 3 else np.r_[[0.45, 0.45], np.full(experts - 2, 0.1 / (experts - 2))]
        counts = rng.multinomial(2 * 512, p, size=steps * layers).ravel()  # k=2 × 512 tokens per step × layer
        load = pd.DataFrame({"step": s, "layer": ly.astype("int16"), "expert": e.astype("int16"), "tokens": counts,
                             "prob_sum": counts / 2.0, "weight_sum": counts / 2.0})
        st, sl = np.meshgrid(np.arange(steps), np.arange(layers), indexing="ij")
        stats = pd.DataFrame({"step": st.ravel(), "layer": sl.ravel().astype("int16"), "tokens": 512,
                              "entropy_sum": 512 * 1.5, "lse_sq_sum": 512 * 4.0, "margin_sum": 512 * 0.2,
                              "nonfinite": 0, "dropped": 0})
        write_run(root / f"run-{i:04d}", {"expert_load": load, "router_stats": stats},
                  layers=[{"layer": j, "module": f"l{j}", "n_experts": experts, "top_k": 2, "router_kind": "softmax"}
                          for j in range(layers)])
    return root


class QueryCounter:
    """Counts DuckDB statements run through `con.execute` / `con.sql` of every connection while installed."""

    def __init__(self) -> None:
        self.n = 0

    def __enter__(self) -> QueryCounter:
        import duckdb

        self._cls = duckdb.DuckDBPyConnection
        self._orig = {name: getattr(self._cls, name) for name in ("execute", "sql")}
        counter = self

        def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
            def inner(self: Any, *a: Any, **kw: Any) -> Any:
                counter.n += 1
                return fn(self, *a, **kw)
            return inner

        for name, fn in self._orig.items():
            setattr(self._cls, name, wrap(fn))
        return self

    def __exit__(self, *exc: object) -> None:
        for name, fn in self._orig.items():
            setattr(self._cls, name, fn)


def commands(root: Path) -> dict[str, Callable[[], Any]]:
    """The measured calls: what `moescope check / report / whatif capacity` run, on a freshly opened root."""
    import moescope
    from moescope.analysis import whatif
    from moescope.check.run import run_check
    from moescope.commands.report import render_report

    def report() -> None:
        with moescope.open(root) as tr, redirect_stdout(io.StringIO()):
            render_report(tr)

    def cap() -> None:
        with moescope.open(root) as tr:
            whatif.capacity_drops(tr)

    out: dict[str, Callable[[], Any]] = {"open": lambda: moescope.open(root).close(),
                                         "check": lambda: run_check(root), "report": report, "whatif capacity": cap}
    for page in PAGES:  # first open of each page on a fresh app (cold caches), through the Dash router
        out[f"dashboard {page}"] = lambda page=page: _open_page(root, page)
    return out


#: Every dashboard page, as bench/dashboard_latency.py lists them.
PAGES = ("/", "/utilization", "/collapse", "/drift", "/similarity", "/tokens", "/systems", "/sql")


def _open_page(root: Path, page: str) -> float:
    """Seconds of the page's first open (the app's start-up, which opens the trace, is not counted)."""
    from dashboard_latency import Client  # bench/ is on sys.path when this script runs

    from moescope import dashboard

    app = dashboard.create_app(root, warm=False)
    try:
        return Client(app).open(page)[0]
    finally:
        app.moescope_data.close()


def main() -> None:
    """Build both roots, time each command on each, print the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", type=int, default=100)
    ap.add_argument("--large", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--only", default=None, help="commands starting with this: open, check, report, whatif, dashboard")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        roots = {}
        for n in (args.small, args.large):
            t0 = time.perf_counter()
            roots[n] = build_root(Path(tmp) / f"r{n}", n, steps=args.steps)
            print(f"built {n} runs in {time.perf_counter() - t0:.1f} s")
        print(f"{'command':<26}{args.small:>9} runs{args.large:>9} runs{'ratio':>8}{'queries':>16}")
        for name in commands(roots[args.small]):
            if args.only and not name.startswith(args.only):
                continue
            times, queries = [], []
            for n in (args.small, args.large):
                fn = commands(roots[n])[name]
                with QueryCounter() as qc:
                    t0 = time.perf_counter()
                    got = fn()
                    times.append(got if isinstance(got, float) else time.perf_counter() - t0)
                queries.append(qc.n)
            print(f"{name:<26}{times[0]:>12.2f} s{times[1]:>12.2f} s{times[1] / times[0]:>7.1f}×"
                  f"{queries[0]:>8} → {queries[1]}")


if __name__ == "__main__":
    main()
