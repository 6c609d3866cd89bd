"""`moescope dashboard` as a user runs it: one line of our own on start, no Flask banner, no line per request."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("dash")

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "sample_traces"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.skipif(not SAMPLES.is_dir(), reason="sample_traces/ not present")
def test_dashboard_prints_one_line_and_no_request_log() -> None:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moescope", "dashboard", str(SAMPLES), "--port", str(port), "--refresh", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
                    assert r.status == 200
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        for path in ("/_dash-layout", "/utilization", "/no-such-page"):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30).close()
            except OSError:
                pass
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    lines = [line for line in out.splitlines() if line.strip()]
    assert lines == [f"moescope dashboard: serving {SAMPLES} on http://127.0.0.1:{port}/ (Ctrl+C stops)"], out
