"""Object storage: record to and read from s3:// on a local S3 server (moto, 127.0.0.1) with known answers."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")
torch = pytest.importorskip("torch")

import moescope  # noqa: E402
from moescope.format.reader import check_part  # noqa: E402
from moescope.format.storage import RemotePath, as_path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from toy_moe import ToyMoE, ToyRouter  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
BUCKET = "moescope-test"


@pytest.fixture(scope="module")
def s3() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 (a free port), its bucket, and the AWS variables pointing at it."""
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        import s3fs

        s3fs.S3FileSystem(endpoint_url=env["AWS_ENDPOINT_URL"]).mkdir(BUCKET)
        yield f"s3://{BUCKET}"
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def _keys(url: str) -> list[str]:
    p = as_path(url)
    assert isinstance(p, RemotePath)
    p.fs.invalidate_cache()
    return sorted(p.fs.find(p.key))


def _record(path: str | Path, steps: int = 6) -> dict[tuple[int, int, int], int]:
    """Record the toy model for `steps` steps into `path`; return what its routers dispatched per (step, layer, e)."""
    torch.manual_seed(0)
    model = ToyMoE().eval()
    routers = [m for m in model.modules() if isinstance(m, ToyRouter)]
    truth: dict[tuple[int, int, int], int] = {}
    cur = {"step": 0}

    def hook(mod: torch.nn.Module, args: tuple, out: tuple) -> None:
        for e in out[2].reshape(-1).tolist():
            key = (cur["step"], routers.index(mod), e)
            truth[key] = truth.get(key, 0) + 1

    hs = [r.register_forward_hook(hook) for r in routers]
    with moescope.record(model, path, tokens=1.0, flush_every=2) as rec:
        for s in range(steps):
            cur["step"] = rec.step = s
            with torch.no_grad():
                model(torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(s)))
    for h in hs:
        h.remove()
    return truth


def _counts(tr: moescope.Trace) -> dict[tuple[int, int, int], int]:
    return {(s, ly, e): n for s, ly, e, n in tr.sql(
        "SELECT step, layer, expert, sum(tokens) FROM expert_load GROUP BY ALL").fetchall() if n}


def _table(tr: moescope.Trace, name: str) -> list[tuple]:
    return tr.sql(f"SELECT * EXCLUDE (run) FROM {name} ORDER BY ALL").fetchall()


def test_record_to_s3_and_read_back(s3: str, tmp_path: Path) -> None:
    url = f"{s3}/traces/run-a"
    truth = _record(url)
    local = _record(tmp_path / "run-a")
    assert truth == local  # same model, same inputs: the S3 and the local recording must hold the same rows
    keys = _keys(url)
    # only whole parts and the manifest: no temporaries, the lock object gone with its recorder
    assert [k.split("/", 3)[-1] for k in keys] == sorted(["manifest.json"] + [
        f"{t}/part-0-{i:06d}.parquet" for t in ("expert_load", "router_stats", "routing") for i in range(3)]), keys
    for k in keys:
        if k.endswith(".parquet"):
            check_part(f"s3://{k}")  # footer, version and every page checksum, read through fsspec
    with moescope.open(f"{s3}/traces") as tr, moescope.open(tmp_path) as lt:
        assert tr.runs == ["run-a"]
        assert _counts(tr) == truth == _counts(lt)
        for name in ("expert_load", "router_stats", "routing"):
            assert _table(tr, name) == _table(lt, name)
        assert tr.manifest("run-a")["closed"] is True
        h, lh = tr.health(), lt.health()
        assert h[["rule", "status", "layer", "value"]].equals(lh[["rule", "status", "layer", "value"]])


def test_check_and_report_read_s3(s3: str, tmp_path: Path) -> None:
    url = f"{s3}/cli/run-b"
    _record(url, steps=4)
    _record(tmp_path / "run-b", steps=4)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "moescope", *args], capture_output=True, text=True, env=env,
                              timeout=300, cwd=tmp_path)

    remote = cli("check", f"{s3}/cli", "--format", "json")
    here = cli("check", str(tmp_path), "--format", "json")
    assert remote.returncode == here.returncode and remote.returncode in (0, 1), remote.stderr
    r, h = json.loads(remote.stdout), json.loads(here.stdout)
    assert r["checks"] == h["checks"] and r["summary"] == h["summary"] and r["checks"]
    assert r["meta"]["trace"] == f"{s3}/cli"
    rep = cli("report", f"{s3}/cli")
    loc = cli("report", str(tmp_path))
    assert rep.returncode == 0, rep.stderr
    def norm(text: str, root: str) -> str:  # the two recordings differ only in where and when they were made
        return re.sub(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", "TIME", text.replace(root, "ROOT"))

    assert norm(rep.stdout, f"{s3}/cli") == norm(loc.stdout, str(tmp_path)) and "run run-b" in rep.stdout
    missing = cli("check", f"{s3}/no-such-prefix")
    assert missing.returncode == 3 and "no such trace" in missing.stderr
    env["MOESCOPE_STORAGE_OPTIONS"] = "{not json"
    bad = cli("check", f"{s3}/cli")
    assert bad.returncode == 2 and "MOESCOPE_STORAGE_OPTIONS must be a JSON object" in bad.stderr


def test_live_refresh_and_dashboard_data_on_s3(s3: str, tmp_path: Path) -> None:
    pytest.importorskip("dash")
    from moescope.dashboard.data import DashboardData

    url = f"{s3}/live/run-c"
    _record(url, steps=2)
    tr = moescope.open(f"{s3}/live")
    data = DashboardData(f"{s3}/live")
    try:
        before = _counts(tr)
        assert sum(before.values()) == 2 * 2 * 10 * 2  # steps x layers x tokens x k
        # a second recording session resumes the run on S3: the live reader picks up exactly the new rows
        torch.manual_seed(0)
        model = ToyMoE().eval()
        with moescope.record(model, url, tokens=1.0, resume=True) as rec:
            with torch.no_grad():
                model(torch.randint(0, 64, (3, 5)))
            assert rec.step == 2  # continues after the last step found on S3
        assert tr.refresh()
        after = _counts(tr)
        assert {k: v for k, v in after.items() if k[0] < 2} == before
        assert sum(v for k, v in after.items() if k[0] == 2) == 2 * 15 * 2
        data.refresh()
        util = data.utilization("run-c")
        assert int(util["assignments"].sum()) == sum(after.values())
        assert list(data.health()["rule"].unique())  # the health grid reads it like a local trace
    finally:
        data.close()
        tr.close()


def test_readers_see_only_complete_parts_while_recording(s3: str) -> None:
    """A reader listing the prefix while a recorder writes finds every listed part whole (one PUT per part)."""
    url = f"{s3}/concurrent/run-d"
    done = threading.Event()
    errors: list[BaseException] = []

    def write() -> None:
        try:
            _record(url, steps=10)
        except BaseException as e:  # noqa: BLE001 - reported by the test thread
            errors.append(e)
        finally:
            done.set()

    t = threading.Thread(target=write)
    t.start()
    seen = 0
    while not done.is_set() or seen == 0:
        for k in _keys(f"{s3}/concurrent"):
            if k.endswith(".parquet"):
                check_part(f"s3://{k}")
                seen += 1
    t.join()
    assert not errors and seen > 0
    with moescope.open(f"{s3}/concurrent") as tr:
        (n,), = tr.sql("SELECT count(*) FROM routing").fetchall()
    assert n == 10 * 10 * 2  # steps x tokens x layers


def test_no_locks_on_s3_is_a_warning(s3: str) -> None:
    url = f"{s3}/locks/run-e"
    model = ToyMoE().eval()
    first = moescope.record(model, url).start()
    try:
        with pytest.warns(RuntimeWarning, match=f"object stores have no locks.*pid {os.getpid()}"):
            moescope.record(ToyMoE().eval(), url).start().close()
    finally:
        first.close()


def test_compaction_on_s3(s3: str) -> None:
    """Merged parts are one PUT each (the commit) after the record; a recorder's lock object means up_to_step."""
    from moescope.format.compact import RECORD, CompactUsageError, compact_run
    from moescope.format.lock import RunLocked

    url = f"{s3}/compact/run-h"
    truth = _record(url)  # flush_every=2: parts 0, 1, 2 hold steps 0-1, 2-3, 4-5
    run = as_path(url)
    (run / ".moescope-rank-0.lock").write_bytes(b'{"pid": 1, "host": "elsewhere"}\n')  # a recorder, as S3 shows it
    with pytest.raises(CompactUsageError, match="being recorded"):
        compact_run(url)
    res = compact_run(url, up_to_step=3)
    assert res.live_ranks == [0] and sorted(res.merged) == [
        f"{t}/part-0-000000-000001.parquet" for t in ("expert_load", "router_stats", "routing")]
    (run / ".moescope-rank-0.lock").unlink()
    (run / ".moescope-compact.lock").write_bytes(b'{"pid": 1, "host": "elsewhere", "role": "compacted"}\n')
    with pytest.raises(RunLocked, match="being compacted by pid 1 on elsewhere"):
        compact_run(url)
    (run / ".moescope-compact.lock").unlink()
    res = compact_run(url)
    assert res.parts_after == 3 and res.removed == 6
    names = [k.split("/", 3)[-1] for k in _keys(url)]
    assert names == [".moescope-compaction.json", "expert_load/part-0-000000-000002.parquet", "manifest.json",
                     "router_stats/part-0-000000-000002.parquet", "routing/part-0-000000-000002.parquet"], names
    for name in names:
        if name.endswith(".parquet"):
            check_part(f"{url}/{name}")
    assert json.loads((run / RECORD).read_bytes())["replaced"] == {}
    with moescope.open(url) as tr:
        assert _counts(tr) == truth
        (n,), = tr.sql("SELECT count(*) FROM routing").fetchall()
    assert n == 6 * 10 * 2


@pytest.mark.parametrize("stage", ["recorded", "renaming", "deleting"])
def test_compaction_killed_on_s3(s3: str, stage: str) -> None:
    from moescope.format.compact import compact_run

    url = f"{s3}/killed-{stage}/run-i"
    truth = _record(url, steps=4)
    script = (f"import os, signal\nfrom moescope.format import compact\n"
              f"compact._at = lambda s: os.kill(os.getpid(), signal.SIGKILL) if s == {stage!r} else None\n"
              f"compact.compact_run({url!r})\n")
    p = subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": str(ROOT)},
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == -9, p.stderr
    with moescope.open(url) as tr:  # right after the kill: every row once
        assert _counts(tr) == truth
    as_path(f"{url}/.moescope-compact.lock").unlink()  # the killed compaction's lock object (S3 cannot drop it)
    res = compact_run(url)
    assert res.parts_after == 3
    with moescope.open(url) as tr:
        assert _counts(tr) == truth


def test_watch_and_dashboard_serve_s3(s3: str, tmp_path: Path) -> None:
    """`moescope watch --once` and `moescope dashboard` on an s3:// root, as separate processes."""
    pytest.importorskip("dash")
    import socket
    import time
    import urllib.request

    url = f"{s3}/served/run-f"
    _record(url, steps=3)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    watch = subprocess.run([sys.executable, "-m", "moescope", "watch", f"{s3}/served", "--once"],
                           capture_output=True, text=True, env=env, timeout=300)
    assert watch.returncode == 0, watch.stderr
    assert "run-f" in watch.stdout and "finished · step 2" in watch.stdout, watch.stdout
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    proc = subprocess.Popen([sys.executable, "-m", "moescope", "dashboard", f"{s3}/served", "--port", str(port),
                             "--refresh", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_dash-layout", timeout=10) as r:
                    layout = r.read().decode()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        assert "finished \\u00b7 step 2" in layout  # the header's live state, read from the S3 trace
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert f"serving {s3}/served on http://127.0.0.1:{port}/" in out, out


def test_resume_on_s3_sets_a_torn_flush_aside(s3: str) -> None:
    """A crash between a flush's tables on S3: the resumed recorder sets the lone part aside (copy + delete)."""
    url = f"{s3}/torn/run-g"
    _record(url, steps=2)  # flush_every=2: one flush, part number 0 (steps 0 and 1)
    run = as_path(url)
    lone = run / "router_stats" / "part-0-000001.parquet"
    lone.write_bytes((run / "router_stats" / "part-0-000000.parquet").read_bytes())  # router_stats only: torn
    torch.manual_seed(0)
    model = ToyMoE().eval()
    with pytest.warns(RuntimeWarning, match="cut short"), moescope.record(model, url, resume=True) as rec:
        with torch.no_grad():
            model(torch.randint(0, 64, (2, 5)))
    assert rec.torn_parts == ["router_stats/part-0-000001.parquet.torn"]
    names = [k.split("/", 3)[-1] for k in _keys(url)]
    assert "router_stats/part-0-000001.parquet.torn" in names  # set aside; part number 1 is the resumed flush
    with moescope.open(url) as tr:
        rows = tr.sql("SELECT step, count(*) FROM router_stats GROUP BY step ORDER BY step").fetchall()
    assert rows == [(0, 2), (1, 2), (2, 2)]  # each step once per layer: the torn copy is not counted


def _copies() -> list[Path]:
    """Every cached copy of an object-store part (one file per object version)."""
    from moescope.format.storage import cache_root

    return sorted(p for p in cache_root().rglob("*") if p.is_file() and not p.name.startswith("."))


def _inodes() -> dict[Path, tuple[int, int]]:
    """(inode, mtime) of every cached copy: a copy downloaded again is a new file (a temporary renamed over it)."""
    return {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in _copies()}


def test_s3_parts_are_downloaded_once_and_the_cache_follows_the_listing(s3: str, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Opening an S3 trace copies each part into the cache once; a second open downloads nothing; after a
    compaction the next refresh leaves exactly the merged parts' copies, and the answers stay those of the run."""
    from moescope.format.compact import compact_run
    from moescope.format.storage import CACHE_ENV

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    url = f"{s3}/cached/run-j"
    truth = _record(url)  # 3 tables × 3 parts
    with moescope.open(f"{s3}/cached") as tr:
        assert _counts(tr) == truth
        first = _inodes()
        assert len(first) == 9
        with moescope.open(f"{s3}/cached") as again:
            assert _counts(again) == truth
        assert _inodes() == first  # every part was a cache hit: nothing downloaded again
        compact_run(url)  # deletes the 9 sources (and their copies), writes 3 merged parts
        assert tr.refresh()
        assert _counts(tr) == truth
        copies = _copies()
        assert len(copies) == 3 and all("part-0-000000-000002.parquet" in str(c) for c in copies), copies
    (n,), = moescope.open(url).sql("SELECT count(*) FROM routing").fetchall()
    assert n == 6 * 10 * 2


def test_a_large_s3_trace_is_scanned_from_disk_not_loaded_into_memory(s3: str, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Above the materialize threshold an S3 trace is views over the cached copies (as a local trace is over its
    parts), not tables in DuckDB memory; the rows are the same."""
    from moescope.analysis import trace as trace_mod
    from moescope.format.storage import CACHE_ENV

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(trace_mod, "MATERIALIZE_BYTES", 1)
    url = f"{s3}/big/run-k"
    truth = _record(url)
    with moescope.open(f"{s3}/big") as tr:
        assert tr._loaded == {}  # noqa: SLF001  (no table is a copy in memory)
        (sql,), = tr.sql("SELECT sql FROM duckdb_views() WHERE view_name = 'routing'").fetchall()
        assert str(tmp_path / "cache") in sql and "s3://" not in sql
        assert _counts(tr) == truth


def test_an_unwritable_cache_is_one_line_naming_the_setting(s3: str, tmp_path: Path) -> None:
    url = f"{s3}/nocache/run-l"
    _record(url, steps=2)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    p = subprocess.run([sys.executable, "-m", "moescope", "check", f"{s3}/nocache"], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "MOESCOPE_CACHE_DIR": str(blocker / "cache")},
                       timeout=300)
    assert p.returncode == 3 and len(p.stderr.strip().splitlines()) == 1, p.stderr  # check: an unreadable trace
    assert f"{s3}/nocache/run-l/" in p.stderr and "cannot copy into the cache" in p.stderr
    assert "MOESCOPE_CACHE_DIR" in p.stderr and "corrupt" not in p.stderr


def test_an_object_written_after_a_cached_listing_is_found(s3: str) -> None:
    """fsspec answers `info` from a folder listing it cached; a listing another thread stored just before a part's
    PUT must not make that part "not found" to the writer's size check or a reader (it failed CI once)."""
    folder = as_path(f"{s3}/race/run-m/routing")
    assert isinstance(folder, RemotePath)
    (folder / "part-0-000000.parquet").write_bytes(b"x")
    list(folder.iterdir())
    stale = list(folder.fs.dircache[folder.key])  # the listing before the next PUT
    (folder / "part-0-000001.parquet").write_bytes(b"yy")
    folder.fs.dircache[folder.key] = stale
    assert (folder / "part-0-000001.parquet").stat().st_size == 2


def test_a_store_error_while_copying_is_not_blamed_on_the_cache(s3: str, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from moescope.format.storage import CACHE_ENV, local_copy

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    obj = as_path(f"{s3}/denied/part-0-000000.parquet")
    assert isinstance(obj, RemotePath)
    obj.write_bytes(b"abc")

    def denied(rpath: str, lpath: str, **kw: object) -> None:
        raise PermissionError("Access Denied")

    monkeypatch.setattr(obj.fs, "get_file", denied)
    with pytest.raises(OSError) as e:
        local_copy(obj)
    assert str(e.value) == f"{obj.url}: Access Denied"
    assert not any(p.is_file() for p in (tmp_path / "cache").rglob("*"))  # no temporary left behind
