"""Benchmark: the locked SQL console's limits against the attacks of issue 18, on the sample traces.

    python bench/console_limits.py              # the dashboard console's settings: 10 s, 1 GB
    python bench/console_limits.py --timeout 2  # a quicker run

Prints, each from one process: how fast an oversized query is refused, when a query that is costly to plan and
run is stopped while a second visitor queries every 0.5 s (and that visitor's worst latency), when a cross join
is stopped, and the peak RSS of a hash-aggregate bomb under the memory cap.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import threading
import time
from pathlib import Path

import moescope
from moescope.analysis.console import QueryError

SAMPLES = Path(__file__).resolve().parents[1] / "sample_traces"


def main() -> None:
    """Run the four measurements and print one line each."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--timeout", type=float, default=10.0, help="console time limit in seconds (default 10)")
    ap.add_argument("--memory", default="1GB", help="console memory limit (default 1GB, as the dashboard)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        root = Path(d) / "traces"
        shutil.copytree(SAMPLES, root)
        tr = moescope.open(root, locked=True, timeout=args.timeout, memory_limit=args.memory, threads=2)

        def timed(q: str) -> tuple[float, str]:
            t0 = time.perf_counter()
            try:
                tr.query(q)
                outcome = "ran"
            except QueryError as e:
                outcome = str(e)[:80]
            return time.perf_counter() - t0, outcome

        big = " UNION ALL ".join(["SELECT count(*) FROM expert_load"] * 5400)
        dt, outcome = timed(big)
        print(f"oversized UNION ALL ({len(big)} chars): {dt:.4f} s: {outcome}")
        under = " UNION ALL ".join(["SELECT count(*) FROM assignments"] * 450)
        waits: list[float] = []

        def other_visitor() -> None:
            time.sleep(0.5)
            for _ in range(int(args.timeout)):
                t0 = time.perf_counter()
                tr.query("SELECT count(*) FROM runs")
                waits.append(time.perf_counter() - t0)
                time.sleep(0.5)

        th = threading.Thread(target=other_visitor)
        th.start()
        dt, outcome = timed(under)
        print(f"UNION ALL under the size cap ({len(under)} chars): {dt:.2f} s: {outcome}")
        th.join()
        print(f"a second visitor meanwhile: worst {max(waits):.3f} s over {len(waits)} queries")
        dt, outcome = timed("SELECT count(*) FROM range(100000000) a, range(100000000) b")
        print(f"cross join: {dt:.2f} s: {outcome}")
        dt, outcome = timed("SELECT list(b.range) FROM range(50000000) a, range(50) b GROUP BY a.range")
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
        print(f"hash-aggregate bomb: {dt:.2f} s, peak RSS {rss:.2f} GB: {outcome}")
        tr.close()


if __name__ == "__main__":
    main()
