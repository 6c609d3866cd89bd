"""A trace that follows its files while a run records: `Trace.refresh()`, the data version, the live state.

The writer's protocol makes this cheap and safe: every part appears complete, by rename, under a name that
never changes, and a manifest is replaced atomically. So a refresh lists the run directories (no file is
re-read), reads the footer of each *new* part only, re-reads manifests only when their mtime changed, and
rebuilds the views (under the Trace's lock) when the file set moved. `data_version` counts those changes;
`run_versions` counts them per run. Every cache of results is keyed by one of them (the dashboard's per-run
results, a drift pair and each run's health by the versions of the runs they read; `moescope watch`'s and the
drift units below by `data_version`), so nothing stale is served.

A part that vanishes or cannot be read yet is skipped (and retried at the next refresh), never an error:
a reader must not fail because a writer is busy.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from ..format.compact import visible_parts
from ..format.schema import TABLES
from ..format.storage import RemotePath
from ..format.writer import TraceError

if TYPE_CHECKING:  # pragma: no cover
    from .trace import Trace

#: Live states of a trace, in the order the header reports them (the first that applies wins).
STATES = ("stopped", "recording", "finished")


def _manifest_stamps(roots: list[Path]) -> dict[str, tuple[int, int]]:
    """Every manifest below the roots with its (mtime_ns, size): one walk that skips the part folders."""
    out: dict[str, tuple[int, int]] = {}
    for root in roots:
        if isinstance(root, RemotePath):
            out.update(_remote_manifest_stamps(root))
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            # Part folders hold only parts; walking them would list every file of a big trace for nothing.
            dirnames[:] = [d for d in dirnames if d not in TABLES and not d.startswith(".")]
            for name in filenames:
                if name == "manifest.json" or (name.startswith("manifest.rank-") and name.endswith(".json")):
                    p = os.path.join(dirpath, name)
                    try:
                        st = os.stat(p)
                    except OSError:  # replaced between the listing and the stat: the next refresh sees it
                        continue
                    out[p] = (st.st_mtime_ns, st.st_size)
    return out


def _is_manifest(name: str) -> bool:
    return name == "manifest.json" or (name.startswith("manifest.rank-") and name.endswith(".json"))


def _remote_manifest_stamps(root: RemotePath) -> dict[str, tuple[int, int]]:
    """`_manifest_stamps` of an object-store root: one listing per folder, part folders skipped."""
    out: dict[str, tuple[int, int]] = {}
    fs = root.fs
    fs.invalidate_cache(root.key)
    try:
        for _dir, dirs, files in fs.walk(root.key, detail=True, topdown=True):
            for d in [d for d in dirs if d in TABLES or d.startswith(".")]:
                del dirs[d]  # pruned: part folders hold only parts
            for name, info in files.items():
                if _is_manifest(name):
                    out[fs.unstrip_protocol(info["name"])] = (_remote_mtime(info), int(info.get("size") or 0))
    except FileNotFoundError:
        pass
    return out


def _remote_mtime(info: dict[str, Any]) -> int:
    from ..format.storage import _mtime_ns

    return _mtime_ns(info)


def _list_parts(run_dir: Path) -> dict[str, list[Path]]:
    """Complete parts of every table of one run, less those a committed compaction replaced (temporary files
    start with '.', so they never match; moescope.format.compact.visible_parts lists under one compaction record)."""
    return {t: sorted(ps) for t, ps in visible_parts(run_dir).items()}  # type: ignore[type-var,misc]


def scan_files(tr: Trace) -> bool:
    """Bring `tr._runs` (manifests and part lists) up to date with the disk; True when anything changed.

    New parts have their footer checked (columns remembered in `tr._columns`); one that is not readable yet is
    left out until a later refresh. Raises TraceError only when the manifests themselves became invalid.
    """
    from .trace import _check_file, discover

    changed = False
    moved: set[str] = set()  # runs whose files or manifests changed: their run_versions go up
    stamps = _manifest_stamps(tr.roots)
    if stamps != tr._manifest_stamps:
        # Manifests change at a run's start and end (and when a run appears): re-read them with discover's rules.
        runs = discover(tr.roots)
        old = {r.run: r for r in tr._runs}
        for r in runs:  # keep the part lists already known (new runs start empty); both are refreshed below
            prev = old.get(r.run)
            if prev is None or prev.path != r.path or prev.manifests != r.manifests:
                moved.add(r.run)
            r.files = prev.files if prev is not None else {}
        moved.update(set(old) - {r.run for r in runs})  # a run that went away
        tr._runs = runs
        tr._manifest_stamps = stamps
        changed = True
    for info in tr._runs:
        listing = _list_parts(info.path)  # TraceError (a bad compaction record): refresh() keeps what is known
        for table in TABLES:
            listed = listing.get(table, [])
            known = info.files.get(table, [])
            if listed == known:
                continue
            kept: list[Path] = []
            for p in listed:
                if p not in tr._columns:
                    try:
                        tr._columns[p] = _check_file(p)
                    except TraceError:  # vanished, or not readable yet: skip it this time
                        continue
                kept.append(p)
            if kept != known:
                info.files[table] = kept
                moved.add(info.run)
                changed = True
    versions = run_versions(tr)
    for run in moved:
        versions[run] = versions.get(run, 0) + 1
    return changed


def run_versions(tr: Trace) -> dict[str, int]:
    """Run -> how many refreshes changed that run's parts or manifests (absent: unchanged since the open).

    A finer key than `data_version`: a result that reads only some runs' rows (one run's health, a drift pair)
    stays valid while other runs grow, because parts never change once written.
    """
    return tr.__dict__.setdefault("_run_versions", {})  # type: ignore[no-any-return]


def version_of(tr: Trace, runs: Any) -> tuple[tuple[str, int], ...]:
    """The cache key of a result that reads only `runs` (names; a run not in the trace counts too)."""
    versions = run_versions(tr)
    return tuple((str(r), versions.get(str(r), 0)) for r in sorted({str(r) for r in runs}))


def refresh(tr: Trace) -> bool:
    """Pick up new parts, ranks and runs of `tr`; rebuild its views when the file set changed. True if it did."""
    with tr._lock:
        try:
            changed = scan_files(tr)
        except TraceError as e:
            # A run directory mid-creation or a renamed run: keep serving what is known, say why.
            tr.refresh_error = str(e)
            return False
        tr.refresh_error = None
        tr.refreshed_at = time.time()
        if not changed:
            return False
        tr._rebuild_views()
        tr.data_version += 1
        return True


# -- live state --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LiveState:
    """Where the recording of a trace stands: what the dashboard's header and `moescope watch` say."""

    state: str  # one of STATES
    step: int | None  # last step recorded (None: nothing yet)
    updated: float | None  # epoch seconds of the newest data file or manifest
    stopped: dict[str, Any] | None = None  # the manifest's stopped_by_alert: {step, rule, layer, ...}

    def describe(self, now: float | None = None) -> str:
        """'recording · step 1,234 · updated 3 s ago', 'finished · step 1,234' or 'stopped by an alert at step N'."""
        step = f"step {self.step:,}" if self.step is not None else "no steps yet"
        if self.state == "stopped" and self.stopped is not None:
            s = self.stopped
            what = f" ({s.get('rule')}, layer {s.get('layer')})" if s.get("rule") is not None else ""
            return f"stopped by an alert at step {s.get('step')}{what}"
        if self.state == "finished":
            return f"finished · {step}"
        ago = "" if self.updated is None else f" · updated {_ago((now or time.time()) - self.updated)}"
        return f"recording · {step}{ago}"


def _ago(seconds: float) -> str:
    """'3 s ago', '4 min ago', '2 h ago'."""
    s = max(0.0, seconds)
    if s < 90:
        return f"{s:.0f} s ago"
    if s < 90 * 60:
        return f"{s / 60:.0f} min ago"
    return f"{s / 3600:.0f} h ago"


def live_state(tr: Trace) -> LiveState:
    """The trace's live state from its manifests (closed, stopped_by_alert) and its newest step and file."""
    manifests = [m for info in tr._runs for m in info.manifests.values()]
    stopped = next((m["stopped_by_alert"] for m in manifests if isinstance(m.get("stopped_by_alert"), dict)), None)
    open_ = any(m.get("closed") is False for m in manifests)
    state = "stopped" if stopped is not None else ("recording" if open_ else "finished")
    step = last_step(tr)
    stamps = [st[0] / 1e9 for st in tr._manifest_stamps.values()]
    for info in tr._runs:
        for files in info.files.values():
            if files:
                try:  # parts are named in write order: the last one is the newest
                    stamps.append(files[-1].stat().st_mtime)
                except OSError:
                    continue
    return LiveState(state, step, max(stamps) if stamps else None, stopped)


def last_step(tr: Trace) -> int | None:
    """The highest step in expert_load or router_stats (None when they are empty)."""
    with tr._lock:
        rows = tr.con.execute(
            "SELECT MAX(s) FROM (SELECT MAX(step) AS s FROM router_stats UNION ALL SELECT MAX(step) FROM expert_load)"
        ).fetchall()
    return None if not rows or rows[0][0] is None else int(rows[0][0])


def alerts_frame(tr: Trace, run: str | None = None, limit: int | None = None) -> pd.DataFrame:
    """The online alerts kept in the trace, newest first: run, rank, step, step_start, layer, rule, status, value,
    threshold, experts, message."""
    where = "" if run is None else " WHERE run = ?"
    lim = "" if limit is None else f" LIMIT {int(limit)}"
    q = f"SELECT * FROM alerts{where} ORDER BY step DESC, run, layer, rule{lim}"
    with tr._lock:
        return tr.con.execute(q, [] if run is None else [run]).df()


def alert_line(a: Any) -> str:
    """One alert as a line: 'step 99 · run a · layer 1 · FAIL collapse: <message>' (a row of alerts_frame)."""
    run = f" · run {a['run']}" if a.get("run") else ""
    return f"step {int(a['step'])}{run} · layer {int(a['layer'])} · {a['status']} {a['rule']}: {a['message']}"


def alert_summary(tr: Trace, limit: int = 10) -> list[str]:
    """What `report` and `check` print about the online alerts kept in the trace: stops first, then the newest."""
    lines = []
    for info in tr._runs:
        m = info.manifests.get(0) or info.manifests[min(info.manifests)]
        stop = m.get("stopped_by_alert")
        if isinstance(stop, dict):
            lines.append(f"run {info.run} was stopped by an alert at step {stop.get('step')} "
                         f"({stop.get('rule')}, layer {stop.get('layer')}; raise_on={stop.get('raise_on')!r})")
    df = alerts_frame(tr)
    if len(df):
        lines.append(f"{len(df)} online alert(s) recorded while training" +
                     (f", newest {limit}:" if len(df) > limit else ":"))
        lines += ["  " + alert_line(r) for r in df.head(limit).to_dict("records")]
    return lines


# -- per-sequence units, computed once per part --------------------------------------------------------


def sequence_units(tr: Trace, sel: Any) -> pd.DataFrame:
    """Per whole sequence × layer × expert, the assignments of a selection: unit (sequence id), layer, expert, c.

    The drift bootstrap resamples these (analyses/drift_units.sql's rows). They are aggregated once per routing
    part (parts never change) into a table that a refresh extends with the new parts only, and filtered per
    selection: a new baseline/current pair reads no raw rows. Units are numbered 0..n-1 in the order the
    sequences were written. The rows of the last selections asked for are kept with the parts they cover, so
    after a flush only the new parts' rows are read and numbered (the same rows and numbers as a fresh read).
    """
    import threading

    import numpy as np

    lock = tr.__dict__.setdefault("_units_lock", threading.Lock())
    with lock:
        con = _units_connection(tr)
        state = tr.__dict__["_units"]
        where = sel.filter().sql
        kept = state["sels"].get(where)
        done = len(state["parts"])
        start = kept["parts"] if kept is not None else 0
        got = con.execute(f"SELECT sid, layer, expert, c FROM units WHERE part >= {start} AND ({where})").fetchnumpy()
        new = {k: np.asarray(got[k]) for k in ("sid", "layer", "expert", "c")}
        uniq_new = np.unique(new["sid"])
        if kept is not None and (not len(kept["uniq"]) or bool(np.all(
                (uniq_new > kept["uniq"][-1]) | np.isin(uniq_new, kept["uniq"])))):
            # New sequences have higher ids than every known one (a flush-split sequence keeps its id), so the
            # units numbered already keep their numbers.
            uniq = np.union1d(kept["uniq"], uniq_new)
            cols = {k: np.concatenate([kept[k], new[k]]) for k in ("layer", "expert", "c")}
            unit = np.concatenate([kept["unit"], np.searchsorted(uniq, new["sid"])])
        else:
            if kept is not None:  # a sequence id below the known ones: renumber from every row
                got = con.execute(f"SELECT sid, layer, expert, c FROM units WHERE {where}").fetchnumpy()
                new = {k: np.asarray(got[k]) for k in ("sid", "layer", "expert", "c")}
            # Sequence ids of the whole trace → 0..n-1 for this selection (numpy: cheaper than a window in SQL).
            uniq, unit = np.unique(new["sid"], return_inverse=True)
            cols = {k: new[k] for k in ("layer", "expert", "c")}
        unit = unit.astype(np.int64)
        state["sels"][where] = {"parts": done, "uniq": uniq, "unit": unit, **cols}
        while len(state["sels"]) > _UNIT_SELECTIONS:  # the oldest selection first (dicts keep insertion order)
            del state["sels"][next(iter(state["sels"]))]
    return pd.DataFrame({"unit": unit, "layer": cols["layer"], "expert": cols["expert"], "c": cols["c"]})


#: Baselines whose per-sequence rows sequence_units keeps between refreshes (~20 bytes a row: ~60 MB for a
#: whole run of the 100M-assignment benchmark trace, so only the few last ones).
_UNIT_SELECTIONS = 3


_UNIT_KEY = ("run", "rank", "step", "tag", "seq")


def _units_connection(tr: Trace) -> Any:
    """A private DuckDB connection whose `units` table holds every current routing part's per-sequence counts.

    A refresh that adds parts inserts their rows; one that drops a part rebuilds the table. Each sequence key
    (run, rank, step, tag, seq) gets one id `sid` for the life of the Trace, also when a flush split it
    across two parts.
    """
    import duckdb

    from .sqlkit import Raw, render
    from .trace import _with_parts

    state = tr.__dict__.setdefault("_units", {"con": None, "version": None, "parts": [], "sids": {}, "sels": {}})
    if state["con"] is not None and state["version"] == tr.data_version:
        return state["con"]
    files = [f for info in tr._runs for f in info.files.get("routing", [])]
    con = state["con"]
    if con is None or any(p not in set(files) for p in state["parts"]):  # first build, or a part vanished
        if con is not None:
            con.close()
        con = duckdb.connect(":memory:")
        con.execute("CREATE TABLE units (run VARCHAR, rank SMALLINT, step BIGINT, tag VARCHAR, seq INTEGER, "
                    "layer SMALLINT, expert SMALLINT, c DOUBLE, sid BIGINT, part INTEGER)")
        state.update(con=con, parts=[], sels={})  # part numbers restart: the kept selections start over
    sids: dict[tuple[Any, ...], int] = state["sids"]
    known = set(state["parts"])
    for f in files:
        if f in known:
            continue
        # The analysis's own SQL over this one part: a view named `routing` on the private connection.
        # a table, not a view: the part is read once here, and the next part replaces it
        _with_parts(con, "routing", [f], set(tr._columns[f]), "CREATE OR REPLACE TEMP TABLE routing AS {select}")
        con.execute(f"CREATE OR REPLACE TEMP TABLE part_units AS {render('drift_units', {'filter': Raw('1 = 1')})}")
        cols = ", ".join(_UNIT_KEY)
        keys = con.execute(f"SELECT DISTINCT {cols} FROM part_units ORDER BY {cols}").fetchall()
        ids = [sids.setdefault(tuple(k), len(sids)) for k in keys]
        con.register("_part_sids", pd.DataFrame([(*k, i) for k, i in zip(keys, ids)], columns=[*_UNIT_KEY, "sid"]))
        con.execute(
            "INSERT INTO units SELECT u.run, u.rank, u.step, u.tag, u.seq, u.layer, u.expert, u.c, s.sid, "
            f"{len(state['parts'])} FROM part_units u JOIN _part_sids s ON "  # NULL keys (older writers) still match themselves
            + " AND ".join(f"u.{k} IS NOT DISTINCT FROM s.{k}" for k in _UNIT_KEY)
        )
        con.unregister("_part_sids")
        state["parts"].append(f)
    state["version"] = tr.data_version
    return con
