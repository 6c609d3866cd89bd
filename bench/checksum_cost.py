"""What verifying Parquet page checksums costs when a trace is opened (moescope.format.reader.check_part).

Times, side by side in one run: opening the trace with every page verified (cold: first open in a process),
opening it again (warm: the (path, size, mtime) cache, one stat per part), and reading footers only (what
opening cost before checksums). Runs on sample_traces and on a synthetic trace of about --assignments
token-level assignments (written with page checksums, like every part moescope writes now).

    python bench/checksum_cost.py                        # sample_traces + 20M assignments
    python bench/checksum_cost.py --assignments 2000000  # quick
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

import moescope
from moescope.format import reader


def _parts(root: Path) -> list[Path]:
    return sorted(root.rglob("part-*.parquet"))


def measure(root: Path, label: str) -> None:
    """Print footer-only, cold verified and warm open times for the trace at `root`."""
    parts = _parts(root)
    size = sum(p.stat().st_size for p in parts)
    t0 = time.perf_counter()
    for p in parts:
        pq.read_metadata(p)
    footers = time.perf_counter() - t0
    reader.forget_verified()
    t0 = time.perf_counter()
    moescope.open(root).close()
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    moescope.open(root).close()
    warm = time.perf_counter() - t0
    reader.forget_verified()
    t0 = time.perf_counter()
    for p in parts:
        reader.check_part(p)
    verify = time.perf_counter() - t0
    print(f"{label}: {len(parts)} parts, {size / 1e6:.1f} MB | footers only {footers * 1e3:.0f} ms | "
          f"verify all pages {verify * 1e3:.0f} ms ({size / 1e6 / max(verify, 1e-9):.0f} MB/s) | "
          f"open cold (verified) {cold * 1e3:.0f} ms | open warm (cached) {warm * 1e3:.0f} ms")


def main() -> None:
    """Run the measurements."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--assignments", type=int, default=20_000_000)
    args = ap.parse_args()
    samples = Path(__file__).resolve().parents[1] / "sample_traces"
    if samples.is_dir():
        measure(samples, "sample_traces")
    from moescope.dashboard import synthetic as syn

    seq_len, layers, k, routed = 128, 8, 2, 100
    seqs = max(1, round(args.assignments / (2 * layers * 2 * k * routed) / seq_len))
    shape = syn.Shape(layers=layers, experts=16, top_k=k, steps=routed * 5, tokens_per_step=seqs * seq_len,
                      routing_every=5, seqs=seqs, seq_len=seq_len)
    tmp = Path(tempfile.mkdtemp(prefix="moescope-checksum-"))
    try:
        syn.make_trace(tmp, kinds=("balanced", "collapse"), shape=shape)
        measure(tmp, f"synthetic ~{args.assignments / 1e6:g}M assignments")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
