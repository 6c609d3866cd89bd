"""Recording reports every loss: failed writes (disk full), dropped flushes, two recorders, torn flushes.

Each loss must show where a user looks: one warning when it happens (naming table, steps and cause), the
manifest's counters (write_errors, lost_steps), an ERROR finding in `check` and a line in `report`.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import duckdb
import pytest

torch = pytest.importorskip("torch")

import moescope  # noqa: E402
import moescope.format.manifest as manifest_mod  # noqa: E402
import moescope.format.writer as writer_mod  # noqa: E402
from moescope.capture.recorder import RecordError  # noqa: E402
from moescope.check.run import run_check  # noqa: E402
from moescope.commands.report import render_report  # noqa: E402

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))
from toy_moe import ToyMoE  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread() -> object:
    """Tiny tensors: torch's thread pool only costs here (10 ms per softmax on a busy 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _model() -> ToyMoE:
    torch.manual_seed(0)
    return ToyMoE().eval()


def _steps(run_dir: Path, table: str) -> list[int]:
    files = sorted((run_dir / table).glob("*.parquet"))
    if not files:
        return []
    got = duckdb.sql(f"SELECT DISTINCT step FROM read_parquet({[str(f) for f in files]}) ORDER BY 1").fetchall()
    return [r[0] for r in got]


def _expand(ranges: list[list[int]]) -> set[int]:
    return {s for a, b in ranges for s in range(a, b + 1)}


def _record(run_dir: Path, steps: range, **kw: object) -> list[warnings.WarningMessage]:
    m = _model()
    x = torch.randint(0, 64, (2, 8))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with moescope.record(m, run_dir, **kw) as rec:
            for s in steps:
                rec.step = s
                m(x)
                rec.wait()  # one flush at a time reaches the writer: the failing flushes are deterministic
    return list(seen)


class _FullDisk:
    """A filesystem with `budget` bytes for Parquet parts: the write that crosses it raises ENOSPC."""

    def __init__(self, budget: int) -> None:
        self.budget, self.used, self.failures = budget, 0, 0
        self.real = writer_mod._write_parquet

    def __call__(self, data: object, tmp: Path, schema: object) -> None:
        self.real(data, tmp, schema)
        size = tmp.stat().st_size
        if self.used + size > self.budget:
            self.failures += 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))
        self.used += size


def _assert_losses_reported(run_dir: Path, all_steps: set[int]) -> dict:
    man = json.loads((run_dir / "manifest.json").read_text())
    c = man["counters"]
    assert man["closed"] is True
    lost = _expand(c["lost_steps"])
    kept = set(_steps(run_dir, "expert_load"))
    assert lost and kept, (lost, kept)
    assert kept | lost == all_steps and not kept & lost  # every step is either on disk or counted lost
    assert set(_steps(run_dir, "router_stats")) == kept  # a failed flush is removed whole
    # part numbers never collide: every part of a table has its own number, and no temporary is left behind
    for table in ("expert_load", "router_stats"):
        names = [p.name for p in (run_dir / table).glob("part-*.parquet")]
        assert len(names) == len(set(names))
    assert not list(run_dir.rglob("*.tmp"))
    assert not list(run_dir.glob(".moescope-rank-*.lock"))  # the lock is gone after close

    res = run_check(run_dir.parent)
    assert res.exit_code == 1
    rec = res.findings[res.findings["rule"] == "recording"]
    assert list(rec["status"]) == ["ERROR"] and int(rec["value"].iloc[0]) == len(lost)
    first_lost = min(lost)
    assert f"steps {first_lost}" in rec["message"].iloc[0]
    text = render_report(moescope.open(run_dir.parent))
    assert "ERROR recording" in text and "not recorded: steps" in text
    return c


def test_disk_full_every_loss_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    disk = _FullDisk(budget=60_000)
    monkeypatch.setattr(writer_mod, "_write_parquet", disk)
    run_dir = tmp_path / "root" / "full"
    seen = _record(run_dir, range(60), tokens=1.0, flush_every=2)
    assert disk.failures > 1
    at_the_time = [str(w.message) for w in seen if "later losses are counted" in str(w.message)]
    assert len(at_the_time) == 1  # once, not once per failed flush
    assert "for steps" in at_the_time[0] and "No space left on device" in at_the_time[0]
    assert any(t in at_the_time[0] for t in ("routing", "router_stats", "expert_load"))
    summary = [str(w.message) for w in seen if "were not recorded" in str(w.message)]
    assert len(summary) == 1 and f"{disk.failures} write(s) failed" in summary[0]
    c = _assert_losses_reported(run_dir, set(range(60)))
    assert len(c["write_errors"]) == disk.failures
    assert all("No space left on device" in e for e in c["write_errors"])


def test_dropped_flushes_reported_by_check_and_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = writer_mod.write_part

    def slow(*a: object, **kw: object) -> Path:
        time.sleep(0.05)  # a slow disk: the queue is busy while training goes on
        return real(*a, **kw)

    monkeypatch.setattr(writer_mod, "write_part", slow)
    run_dir = tmp_path / "root" / "dropping"
    m = _model()
    x = torch.randint(0, 64, (8, 16))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with moescope.record(m, run_dir, tokens=1.0, flush_every=1, max_queue_mb=1e-6, on_full="drop") as rec:
            for s in range(30):
                rec.step = s
                m(x)
    assert sum("dropped a flush of steps" in str(w.message) for w in seen) == 1
    c = _assert_losses_reported(run_dir, set(range(30)))
    assert c["dropped_flushes"] == len(_expand(c["lost_steps"])) and not c["write_errors"]


def test_manifest_on_full_disk_uses_the_reserve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The final manifest write fails once (disk full): the lock's reserve is given back and the retry lands."""
    disk = _FullDisk(budget=30_000)
    monkeypatch.setattr(writer_mod, "_write_parquet", disk)
    real = manifest_mod.atomic_write_bytes
    state = {"closing": False, "failed": 0}

    def atomic(path: Path, data: bytes) -> None:
        if state["closing"] and b'"closed": true' in data and not state["failed"]:
            state["failed"] += 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, data)

    monkeypatch.setattr(manifest_mod, "atomic_write_bytes", atomic)
    run_dir = tmp_path / "root" / "r"
    m = _model()
    x = torch.randint(0, 64, (2, 8))
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        rec = moescope.record(m, run_dir, tokens=1.0, flush_every=2).start()
        lock = run_dir / ".moescope-rank-0.lock"
        assert lock.stat().st_size > 100_000  # the reserve is real bytes
        for s in range(40):
            rec.step = s
            m(x)
            rec.wait()
        state["closing"] = True
        rec.close()
    assert state["failed"] == 1
    _assert_losses_reported(run_dir, set(range(40)))


def test_manifest_write_impossible_raises_after_reporting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    disk = _FullDisk(budget=20_000)
    monkeypatch.setattr(writer_mod, "_write_parquet", disk)
    real = manifest_mod.atomic_write_bytes
    state = {"full": False}

    def atomic(path: Path, data: bytes) -> None:
        if state["full"]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, data)

    monkeypatch.setattr(manifest_mod, "atomic_write_bytes", atomic)
    run_dir = tmp_path / "root" / "r"
    m = _model()
    x = torch.randint(0, 64, (2, 8))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        rec = moescope.record(m, run_dir, tokens=1.0, flush_every=2).start()
        for s in range(30):
            rec.step = s
            m(x)
            rec.wait()
        state["full"] = True
        with pytest.raises(RecordError, match="final manifest could not be written"):
            rec.close()
    # the loss was reported before the raise, and the manifest on disk already counted the first loss
    assert any("were not recorded" in str(w.message) for w in seen)
    man = json.loads((run_dir / "manifest.json").read_text())
    assert man["closed"] is False and man["counters"]["write_errors"] and man["counters"]["lost_steps"]
    assert run_check(run_dir.parent).exit_code == 1
    assert not (run_dir / ".moescope-rank-0.lock").exists()


def test_real_tmpfs_disk_full(tmp_path: Path) -> None:
    """A real 2 MB tmpfs (needs mount rights; skipped where `mount -t tmpfs` is refused)."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if not shutil.which("mount") or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
                                                  capture_output=True).returncode:
        pytest.skip("mount -t tmpfs is not permitted here")
    try:
        (mnt / "ballast").write_bytes(b"\1" * (1400 << 10))  # other files: ~600 KB left for the recording
        run_dir = mnt / "root" / "full"
        m = _model()
        x = torch.randint(0, 64, (8, 64))
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            with moescope.record(m, run_dir, tokens=1.0, flush_every=5) as rec:
                for s in range(300):
                    rec.step = s
                    m(x)
        assert any("No space left on device" in str(w.message) for w in seen)
        c = _assert_losses_reported(run_dir, set(range(300)))
        assert c["write_errors"]
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


HOLD = textwrap.dedent(
    """
    import sys, time, torch, moescope
    sys.path.insert(0, {tests!r})
    from toy_moe import ToyMoE
    torch.manual_seed(0)
    m = ToyMoE()
    x = torch.randint(0, 64, (2, 4))
    with moescope.record(m, {out!r}, flush_every=2) as rec:
        for s in range(10_000):
            rec.step = s
            m(x)
            if s == 5:
                rec.wait()
                print("recording", flush=True)
            time.sleep(0.002)
    """
)


def test_second_recorder_refused_while_live_then_takes_over_after_sigkill(tmp_path: Path) -> None:
    run_dir = tmp_path / "shared"
    p = subprocess.Popen([sys.executable, "-c", HOLD.format(tests=str(TESTS), out=str(run_dir))],
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "recording"
        m = _model()
        with pytest.raises(RecordError, match=rf"already being recorded .*by pid {p.pid} on "):
            moescope.record(m, run_dir).start()
        assert not any(h for mod in m.modules() for h in mod._forward_hooks.values())  # nothing attached
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
    # the dead owner's lock file is still there; the kernel dropped its lock, so a new recorder takes over
    assert (run_dir / ".moescope-rank-0.lock").exists()
    before = set(_steps(run_dir, "expert_load"))
    m = _model()
    x = torch.randint(0, 64, (2, 4))
    last = max(before)
    with moescope.record(m, run_dir, flush_every=2) as rec:
        for s in range(last + 1, last + 7):
            rec.step = s
            m(x)
    assert set(_steps(run_dir, "expert_load")) == set(range(last + 7))
    assert _steps(run_dir, "router_stats") == list(range(last + 7))
    got = duckdb.sql(f"SELECT step, count(*) FROM '{run_dir}/expert_load/*.parquet' GROUP BY step "
                     "HAVING count(*) <> 16").fetchall()
    assert got == []  # 2 layers × 8 experts per step, nothing written twice


def test_second_recorder_in_the_same_process_refused(tmp_path: Path) -> None:
    m1, m2 = _model(), _model()
    with moescope.record(m1, tmp_path / "r"):
        with pytest.raises(RecordError, match="already being recorded"):
            moescope.record(m2, tmp_path / "r").start()
        with moescope.record(m2, tmp_path / "r", rank=1):  # another rank of the same run has its own lock
            pass
    with moescope.record(m2, tmp_path / "r"):  # released at close
        pass


@pytest.mark.parametrize("missing", ["router_stats", "expert_load"])
def test_resume_after_torn_flush_completes_every_table(tmp_path: Path, missing: str) -> None:
    """A crash between the tables of one flush: resume sets the flush aside and rewrites it in every table."""
    run_dir = tmp_path / "root" / "torn"
    _record(run_dir, range(6), tokens=1.0, flush_every=2)
    last = max(int(p.name.split("-")[2][:6]) for p in (run_dir / missing).glob("part-0-*.parquet"))
    (run_dir / missing / f"part-0-{last:06d}.parquet").unlink()
    # router_stats missing: expert_load (the pre-fix write order) is ahead; expert_load missing: the others are
    ahead = "expert_load" if missing == "router_stats" else "router_stats"
    assert max(_steps(run_dir, ahead)) > max(_steps(run_dir, missing))
    seen = _record(run_dir, range(2, 10), tokens=1.0, flush_every=2)  # resumed from a checkpoint at step 2
    assert any("was cut short" in str(w.message) for w in seen)
    for table in ("expert_load", "router_stats", "routing"):
        assert _steps(run_dir, table) == list(range(10)), table
    tr = moescope.open(run_dir.parent)
    dup = tr.sql("SELECT step, layer, expert, count(*) FROM expert_load GROUP BY ALL HAVING count(*) > 1")
    assert dup.fetchall() == []
    assert tr.sql("SELECT count(*) FROM router_stats").fetchall()[0][0] == 10 * 2
    man = json.loads((run_dir / "manifest.json").read_text())
    assert man["counters"]["torn_parts_set_aside"]
    assert list(run_dir.rglob("*.parquet.torn"))
