"""`moescope watch`: one frame on a hand-built trace (known answers) and on the sample traces; a live session
while another process writes (no error, new steps shown, clean exit on Ctrl-C); refresh under a busy writer."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from trace_helpers import layer_spec, load_frame, stats_frame

import moescope
from moescope.capture.alerts import Alert
from moescope.capture.recorder import alerts_table
from moescope.commands.watch import sparkline
from moescope.format.writer import write_manifest, write_run

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "moescope"]
ENV = {**os.environ, "COLUMNS": "160", "PYTHONPATH": str(REPO / "tests")}


def test_sparkline_scale() -> None:
    # N·f: 3 (capped at 2× fair share: full), 1 (fair share: half), 0.5, and 0.01 (below the 0.05 dead limit)
    assert sparkline([3.0, 1.0, 0.5, 0.01], 0.05) == "█▄▂·"


def test_once_on_a_hand_built_trace(tmp_path: Path) -> None:
    root = tmp_path / "t"
    load = load_frame([(s, 0, [300, 100, 0, 0]) for s in range(10)] + [(s, 1, [100, 100, 100, 100]) for s in range(10)])
    stats = stats_frame([{"step": s, "layer": lay, "tokens": 400} for s in range(10) for lay in (0, 1)])
    a = Alert("dead_expert", "FAIL", 0, (2, 3), 0, 9, 0.0, 0.05, "experts 2, 3 dead", "a", 0)
    write_run(root / "a", {"expert_load": load, "router_stats": stats, "alerts": alerts_table("a", 0, [a]).to_pandas()},
              run="a", layers=[layer_spec(0, 4, 1), layer_spec(1, 4, 1)], extra={"closed": False})
    r = subprocess.run([*CLI, "watch", str(root), "--once", "--window", "5"], capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "recording · step 9 · updated" in lines[0]
    row0 = next(line for line in lines if line.split("│")[0].strip() == "a" and line.split("│")[1].strip() == "0")
    cells = [c.strip() for c in row0.split("│")]
    # latest 5-step window 5–9; N·f = 4·c/Σc = 3, 1, 0, 0; CV = std/mean of (300, 100, 0, 0) = 1.22
    assert cells[2] == "5–9" and cells[3] == "█▄··" and cells[4:7] == ["0.00", "3.00", "1.22"]
    assert cells[7] == "75% (m=1)" and cells[8] == "FAIL dead_expert@9"  # m = max(k=1, N/4=1): 300 of 400
    row1 = [c.strip() for c in lines[lines.index(row0) + 1].split("│")]
    assert row1[3] == "▄▄▄▄" and row1[4:7] == ["1.00", "1.00", "0.00"] and row1[8] == ""


def test_once_on_sample_traces() -> None:
    r = subprocess.run([*CLI, "watch", "sample_traces", "--once"], capture_output=True, text=True, env=ENV, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert "finished · step 239" in r.stdout.splitlines()[0]
    rows = {tuple(c.strip() for c in line.split("│")[:2]) for line in r.stdout.splitlines() if "│" in line}
    assert {("collapse", "0"), ("collapse", "1"), ("balanced", "0"), ("upcycled", "1")} <= rows
    collapse1 = next(line for line in r.stdout.splitlines() if line.startswith("collapse") and "│     1 │" in line)
    assert collapse1.count("·") >= 4  # the collapsed layer has dead experts


def test_bad_arguments_are_one_line() -> None:
    r = subprocess.run([*CLI, "watch", "sample_traces", "--interval", "0"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--interval" in r.stderr
    r = subprocess.run([*CLI, "watch", "no/such/trace", "--once"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 3 and "Traceback" not in r.stderr


WRITER = textwrap.dedent("""
    import sys, time
    from trace_helpers import layer_spec, load_frame, stats_frame
    from moescope.format.writer import write_manifest, write_run
    root, n, pause = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    for i in range(n):
        steps = range(i * 5, i * 5 + 5)
        write_run(root + "/live", {"expert_load": load_frame([(s, 0, [100, 100, 100, 100]) for s in steps]),
                                   "router_stats": stats_frame([{"step": s, "layer": 0, "tokens": 400} for s in steps])},
                  run="live", layers=[layer_spec(0, 4, 1)], extra={"closed": False})
        time.sleep(pause)
""")


def test_watch_while_a_process_writes(tmp_path: Path) -> None:
    root = tmp_path / "t"
    # the job has started (manifest written) but not flushed yet: watch waits for the first flush
    write_manifest(root / "live", {"run": "live", "layers": [layer_spec(0, 4, 1)], "closed": False})
    watch = subprocess.Popen([*CLI, "watch", str(root), "--interval", "0.3", "--window", "5"], env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    last_frame = threading.Event()
    err_chunks: list[str] = []

    def read_stdout() -> None:
        assert watch.stdout is not None
        for line in watch.stdout:
            lines.append(line)
            if "recording · step 149" in line:
                last_frame.set()

    def read_stderr() -> None:
        assert watch.stderr is not None
        err_chunks.append(watch.stderr.read())

    readers = [threading.Thread(target=read_stdout), threading.Thread(target=read_stderr)]
    for t in readers:
        t.start()
    time.sleep(1.5)
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(root), "30", "0.1"], env=ENV)
    try:
        writer.wait(timeout=60)
        # Wait for a frame showing the last part (a loaded machine draws it late), then Ctrl-C.
        last_frame.wait(timeout=60)
    finally:
        watch.send_signal(signal.SIGINT)
        watch.wait(timeout=30)
        for t in readers:
            t.join(timeout=30)
    out, err = "".join(lines), "".join(err_chunks)
    assert watch.returncode == 0, err
    assert "Traceback" not in err and "error" not in err.lower()
    assert "moescope watch: stopped" in err and "waiting for the first flush" in err
    # the last frame shows the writer's last window
    assert "recording · step 149" in out and "145–149" in out


def test_refresh_and_query_while_a_thread_writes(tmp_path: Path) -> None:
    root = tmp_path / "t"
    run_dir = root / "live"

    def write(i: int) -> None:
        steps = range(i * 5, i * 5 + 5)
        write_run(run_dir, {"expert_load": load_frame([(s, 0, [100, 100, 100, 100]) for s in steps]),
                            "router_stats": stats_frame([{"step": s, "layer": 0, "tokens": 400} for s in steps])},
                  run="live", layers=[layer_spec(0, 4, 1)])

    write(0)
    tr = moescope.open(root)
    done = threading.Event()

    def writer() -> None:
        for i in range(1, 40):
            write(i)
        done.set()

    t = threading.Thread(target=writer)
    t.start()
    seen = []
    while not done.is_set():
        tr.refresh()
        m = tr.load_metrics(window="all")  # every query sees a consistent file set: never an error
        seen.append(int(m["window_end"].max()))
    t.join()
    tr.refresh()
    assert seen == sorted(seen)
    assert int(tr.load_metrics(window="all")["window_end"].max()) == 199
    tr.close()


@pytest.mark.parametrize("kw", [{}])
def test_help_lists_watch(kw: dict) -> None:
    r = subprocess.run([*CLI, "--help"], capture_output=True, text=True)
    assert "watch" in r.stdout
    r = subprocess.run([*CLI, "watch", "--help"], capture_output=True, text=True)
    assert "--once" in r.stdout and "Ctrl-C" in r.stdout
