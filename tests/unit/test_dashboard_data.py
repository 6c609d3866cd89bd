"""Dashboard without a browser: URL state, data functions (known answers on a synthetic trace), locked SQL,
figures, page layouts rendered server-side, the app factory and the CLI."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

pytest.importorskip("dash")
pytest.importorskip("plotly")

from moescope import dashboard as glue  # noqa: E402

S = glue.state
D = glue.data
F = glue.figures
SYN = glue.synthetic

SHAPE = SYN.Shape(layers=2, experts=8, top_k=2, steps=30, tokens_per_step=256, routing_every=10, seqs=2, seq_len=16)
PAGES = ["overview", "utilization", "collapse", "similarity", "drift", "tokens", "sql"]


@pytest.fixture(scope="module")
def trace_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return SYN.make_trace(tmp_path_factory.mktemp("dash") / "trace", shape=SHAPE)


@pytest.fixture(scope="module")
def data(trace_root: Path) -> Any:
    d = D.DashboardData(trace_root, sql_timeout=1.0, sql_max_rows=50)
    yield d
    d.close()


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


# -- URL state -------------------------------------------------------------------------------------------


def test_steps_parse_and_format() -> None:
    assert S.parse_steps("200-399") == (200, 399)
    assert S.parse_steps("399-200") == (200, 399)
    assert S.parse_steps("7") == (7, 7)
    assert S.parse_steps("-5-10") == (-5, 10)
    assert S.parse_steps([3, 4]) == (3, 4)
    for junk in ("", None, "a-b", "1-2-x", [1], "--"):
        assert S.parse_steps(junk) is None
    assert S.format_steps((200, 399)) == "200-399"
    assert S.format_steps(None) is None


def test_query_round_trip() -> None:
    st = S.ViewState(run="run a&b", layer=3, steps=(10, 20))
    q = S.to_query(st, {"ckpt": 5, "run": "ignored", "empty": ""})
    assert q.startswith("?run=run+a%26b&layer=3&steps=10-20")
    assert "ckpt=5" in q and "empty" not in q and q.count("run=") == 1
    assert S.from_query(q) == st
    assert S.from_query({"run": "a", "layer": "x", "steps": "junk"}) == S.ViewState(run="a")
    assert S.from_query({"run": ["a", "b"]}).run == "a"
    assert S.from_query(None) == S.ViewState()
    assert S.to_query(S.ViewState()) == ""
    assert S.href("/drift", S.ViewState(run="a")) == "/drift?run=a"


def test_resolve_fills_defaults_and_clips() -> None:
    runs = ["a", "b"]
    layers = {"a": [0, 1], "b": [2, 3]}
    ranges = {"a": (0, 99), "b": (100, 199)}
    assert S.resolve(S.ViewState(), runs, layers, ranges) == S.ViewState("a", 0, None)
    assert S.resolve(S.ViewState("zz", 1), runs, layers, ranges) == S.ViewState("a", 1, None)
    assert S.resolve(S.ViewState("b", 1), runs, layers, ranges) == S.ViewState("b", 2, None)
    assert S.resolve(S.ViewState("a", 1, (50, 500)), runs, layers, ranges).steps == (50, 99)
    assert S.resolve(S.ViewState("a", 1, (0, 99)), runs, layers, ranges).steps is None  # the whole run: no filter
    assert S.resolve(S.ViewState("a", 1, (300, 400)), runs, layers, ranges).steps is None  # misses the run
    assert S.resolve(S.ViewState("a"), [], {}, {}) == S.ViewState()


def test_merge_controls() -> None:
    cur = S.ViewState("a", 1, (10, 20))
    assert S.merge_controls(cur, {"run": "b", "layer": 1, "steps": [10, 20]}) == S.ViewState("b")
    assert S.merge_controls(cur, {"run": "a", "layer": 2}) == S.ViewState("a", 2, (10, 20))
    assert S.merge_controls(cur, {"steps": [30, 5]}) == S.ViewState("a", 1, (5, 30))


# -- pure helpers ------------------------------------------------------------------------------------------


def test_bucket_width() -> None:
    assert D.bucket_width(0, 99, 120) == 1
    assert D.bucket_width(0, 119, 120) == 1
    assert D.bucket_width(0, 120, 120) == 2
    assert D.bucket_width(0, 999, 120) == 10
    assert D.bucket_width(0, 99_999, 120) == 1000
    assert D.bucket_width(0, 599, 120) == 5
    assert D.bucket_width(5, 5) == 1


def test_worst_status_and_token_text() -> None:
    assert D.worst_status(["PASS", "WARN", "SKIP"]) == "WARN"
    assert D.worst_status(["PASS", "ERROR", "FAIL"]) == "ERROR"
    assert D.worst_status([]) == ""
    from moescope.analysis.vocab import decoder_for

    assert [D.token_text(t, decoder_for("bytes")) for t in (65, 32, 10, 9, 0, 200, 300, None)] == [
        "A", "␣", "↵", "⇥", "\\x00", "\\xc8", "#300", "?"
    ]
    assert D.token_text(65) == "#65"  # a run that records no tokenizer: an id is never guessed to be a byte


def test_drift_sides() -> None:
    ranges = {"a": (0, 99), "b": (0, 9)}
    assert D.default_drift_sides(["a", "b"], {"a": [""], "b": ["", "code", "english"]}, ranges) == (
        {"run": "b", "tag": "code"}, {"run": "b", "tag": "english"})
    assert D.default_drift_sides(["a", "b"], {"a": [""], "b": ["x"]}, ranges) == ({"run": "a"}, {"run": "b"})
    assert D.default_drift_sides(["a"], {}, ranges) == ({"run": "a", "steps": (0, 49)}, {"run": "a", "steps": (50, 99)})
    side = D.drift_side({"b_run": "b", "b_tag": "*", "b_steps": "5-500"}, "b_", {"run": "a"}, ["a", "b"], ranges)
    assert side == {"run": "b", "steps": (5, 9)}
    assert D.drift_side({}, "c_", {"run": "zz", "tag": "code"}, ["a"], ranges) == {"run": "a", "tag": "code"}
    assert D.describe_side({"run": "a", "tag": "code", "steps": (1, 2)}) == "a · tag code · steps 1–2"
    assert D.drift_side({"b_tag": "~"}, "b_", {"run": "a"}, ["a"], ranges) == {"run": "a", "tag": ""}
    assert D.describe_side({"run": "a", "tag": ""}) == "a · untagged"
    assert D.describe_side({"run": "a"}) == "a · all tags"


def test_expert_palette_is_fixed_and_distinct() -> None:
    colors = F.expert_colors(64)
    assert colors[:8] == F.expert_colors(8)  # expert e has one colour whatever the layer size
    assert len(set(colors)) == 64
    assert all(c.startswith("#") and len(c) == 7 for c in colors)
    assert F.status_color("FAIL") != F.status_color("PASS")


# -- data functions on a synthetic trace -------------------------------------------------------------------


def test_runs_and_layers(data: Any) -> None:
    runs = data.runs()
    assert list(runs["run"]) == ["balanced", "collapse"]
    r = runs.set_index("run").loc["collapse"]
    assert (int(r["layers"]), int(r["experts"]), int(r["top_k"])) == (2, 8, 2)
    assert (int(r["first_step"]), int(r["last_step"]), int(r["steps"])) == (0, 29, 30)
    assert r["tags"] == "code, english"
    # Routing kept at steps 0, 10, 20: 2 tags × 2 layers × 2 seqs × 16 tokens each.
    assert int(r["routing_rows"]) == 3 * 2 * 2 * 2 * 16
    assert int(r["tokens"]) == 30 * 2 * 256  # tokens seen per layer
    assert int(r["snapshots"]) == 2
    assert data.layers("collapse") == [0, 1]
    assert data.step_ranges() == {"balanced": (0, 29), "collapse": (0, 29)}
    assert data.n_experts("collapse", 0) == 8
    assert data.tags("collapse") == ["code", "english"]


def test_utilization_known_answer(data: Any) -> None:
    u = data.utilization("collapse")
    assert set(u["layer"]) == {0, 1}
    assert len(u) == 2 * 30 * 8  # 30 steps fit one-step windows
    # Utilization averages to 1 over experts in every window (N·f with Σf = 1).
    mean = u.groupby(["layer", "window_start"])["utilization"].mean()
    assert mean.round(9).eq(1.0).all()
    late = u[(u["window_start"] >= 25) & (u["expert"] >= 3)]
    assert late["utilization"].max() < 0.05  # experts 3.. are dead at the end of the collapse run
    sub = data.utilization("collapse", (10, 19))
    assert sub["window_start"].min() == 10 and sub["window_end"].max() == 19
    lm = data.load_metrics("collapse")
    assert {"aux_loss", "z_loss", "min_utilization", "top_m_share", "maxvio"} <= set(lm.columns)
    first, last = lm[lm["layer"] == 0].iloc[0], lm[lm["layer"] == 0].iloc[-1]
    assert last["aux_loss"] > first["aux_loss"] and last["z_loss"] > first["z_loss"]
    lu = data.layer_utilization("collapse")
    assert len(lu) == 16


def test_health_grid(data: Any) -> None:
    grid = data.health_grid().set_index(["run", "layer"])
    assert grid.loc[("collapse", 0), "status"] == "FAIL"
    assert grid.loc[("balanced", 0), "status"] in ("PASS", "SKIP")
    f = data.findings()
    assert "PASS" not in set(f["status"]) and f.iloc[0]["status"] in ("FAIL", "ERROR")
    assert len(data.findings(include_pass=True)) == len(data.health())


def test_similarity_spectra_tokens(data: Any) -> None:
    assert data.snapshot_steps("collapse") == [0, 29]
    sim = data.similarity("collapse")
    assert set(sim["metric"]) == {"subspace_overlap", "cka"}
    sp = data.spectra("collapse", 0, 29)
    assert set(sp["matrix"]) == {"w_in", "w_out"} and len(sp) == 8 * 2 * 16
    seqs = data.sequences("collapse")
    assert list(seqs["step"].unique()) == [0, 10, 20] and set(seqs["tokens"]) == {16} and set(seqs["rank"]) == {0}
    tag, seq = seqs.iloc[0]["tag"], int(seqs.iloc[0]["seq"])
    tok = data.token_routing("collapse", 0, seq, tag)
    assert len(tok) == 2 * 16 and list(tok["pos"][:3]) == [0, 1, 2]
    assert all(len(e) == 2 and len(set(e)) == 2 for e in tok["experts"])
    assert tok["text"].str.len().min() >= 1
    # Every layer routed the same tokens (whole sequences are kept).
    by_layer = tok.groupby("layer")["token_id"].apply(list)
    assert by_layer.loc[0] == by_layer.loc[1]


def test_drift_and_shares(data: Any) -> None:
    base, cur = {"run": "balanced", "tag": "english"}, {"run": "balanced", "tag": "code"}
    dr = data.drift(base, cur)
    assert list(dr["layer"]) == [0, 1] and dr["flagged"].all()  # code leans on experts 0, 3, 6
    shares = data.expert_shares(cur)
    assert shares.groupby("layer")["share"].sum().round(9).eq(1.0).all()
    s0 = shares[shares["layer"] == 0].set_index("expert")["share"]
    b0 = data.expert_shares(base)
    b0 = b0[b0["layer"] == 0].set_index("expert")["share"]
    assert s0.loc[3] > b0.loc[3] and s0.loc[6] > b0.loc[6]
    same = data.drift(base, base)
    assert not same["flagged"].any()
    untagged = data.expert_shares({"run": "balanced", "tag": ""})
    assert untagged.empty  # every synthetic row is tagged: '' selects the untagged rows, not all of them


def test_cache_hits(data: Any) -> None:
    a = data.utilization("balanced", (0, 9))
    hits = data.cache.hits
    b = data.utilization("balanced", (0, 9))
    assert a is b and data.cache.hits == hits + 1


# -- SQL console (locked mode) ---------------------------------------------------------------------------------


def test_sql_console_returns_rows(data: Any) -> None:
    res = data.run_sql("SELECT layer, expert, SUM(tokens) AS n FROM expert_load GROUP BY ALL ORDER BY ALL")
    assert res.ok and len(res.frame) == 16 and "16 rows" in res.message
    big = data.run_sql("SELECT * FROM range(1000)")
    assert big.ok and big.truncated and len(big.frame) == 50 and "cut" in big.message
    assert not data.run_sql("").ok


@pytest.mark.parametrize(
    "query",
    [
        "COPY (SELECT * FROM expert_load) TO '{out}'",
        "SELECT * FROM read_csv('/etc/passwd')",
        "SELECT * FROM read_text('/etc/hostname')",
        "ATTACH '{db}' AS x",
        "INSTALL httpfs",
        "LOAD httpfs",
        "SET threads = 1",
        "CREATE TABLE t AS SELECT 1",
        "SELECT 1; SELECT 2",
        "SELECT no_such_column FROM expert_load",
    ],
)
def test_sql_console_refuses(data: Any, tmp_path: Path, query: str) -> None:
    out = tmp_path / "stolen.csv"
    res = data.run_sql(query.format(out=out, db=tmp_path / "x.duckdb"))
    assert not res.ok and res.message and "\n" not in res.message
    assert not out.exists() and not (tmp_path / "x.duckdb").exists()
    assert data.run_sql("SELECT COUNT(*) AS n FROM runs").ok  # the console still works afterwards


def test_sql_console_stops_endless_query(data: Any) -> None:
    res = data.run_sql("SELECT COUNT(*) FROM range(1000000000000) a")
    assert not res.ok and "time limit" in res.message and res.seconds < 10
    assert data.run_sql("SELECT 42 AS answer").frame["answer"].tolist() == [42]


def test_never_writes_to_the_trace(trace_root: Path) -> None:
    before = _snapshot(trace_root)
    d = D.DashboardData(trace_root)
    for run in d.run_names():
        d.runs(), d.health_grid(), d.utilization(run), d.load_metrics(run), d.similarity(run), d.sequences(run)
        d.drift({"run": run, "tag": "english"}, {"run": run, "tag": "code"})
    d.run_sql("SELECT * FROM assignments LIMIT 5")
    assert d.trace.locked and d.console.locked  # both connections are locked (read-only) traces
    d.close()
    assert _snapshot(trace_root) == before


# -- figures -----------------------------------------------------------------------------------------------


def test_figures_have_data_and_titles(data: Any) -> None:
    u = data.utilization("collapse")
    figs = [
        F.health_grid(data.health_grid(), data.run_names()),
        F.utilization_heatmap(u, 0),
        F.load_lines(u, 0),
        F.metric_curves(data.load_metrics("collapse"), "aux_loss", "aux", "aux", 0, threshold=1.0),
        F.layer_expert_heatmap(data.layer_utilization("collapse"), 0),
        F.findings_timeline(data.health("collapse"), [0, 1], "collapse", 0),
        F.similarity_heatmap(data.similarity("collapse").query("layer == 0 and step == 29 and metric == 'cka'"), "s"),
        F.spectra_lines(data.spectra("collapse", 0, 29), "w_in", "spectra"),
        F.drift_bars(data.drift({"run": "balanced", "tag": "english"}, {"run": "balanced", "tag": "code"})),
        F.expert_deltas(data.expert_shares({"run": "balanced"}), data.expert_shares({"run": "collapse"}), 0),
    ]
    for fig in figs:
        assert fig.layout.title.text
        assert len(fig.data) > 0 and all(t.visible is not False for t in fig.data)
    lines = F.load_lines(u, 0)
    assert [t.line.color for t in lines.data] == F.expert_colors(8)  # the palette, expert by expert
    empty = F.utilization_heatmap(u.iloc[0:0], 0)
    assert len(empty.data) == 0 and empty.layout.annotations


# -- app and pages, server-side --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def app(trace_root: Path) -> Any:
    return glue.create_app(trace_root, sql_timeout=1.0)


def _layout(app: Any, page: str, **query: str) -> str:
    from dash._get_app import app_context

    token = app_context.set(app)
    try:
        return str(glue.app.page_module(page).layout(**query))
    finally:
        app_context.reset(token)


def test_pages_registered_in_nav_order(app: Any) -> None:
    import dash

    paths = [p["path"] for p in glue.app.nav_pages()]
    assert paths[:7] == ["/", "/utilization", "/collapse", "/similarity", "/drift", "/tokens", "/sql"]
    assert all(p["module"].rsplit(".", 2)[-2] == "pages" for p in dash.page_registry.values())


@pytest.mark.parametrize("page", PAGES)
@pytest.mark.parametrize(
    "query",
    [{}, {"run": "collapse", "layer": "1", "steps": "5-20"}, {"run": "nope", "layer": "x", "steps": "zz", "seq": "?"}],
)
def test_page_layouts_render(app: Any, page: str, query: dict[str, str]) -> None:
    text = _layout(app, page, **query)
    assert "ms-msg-error" not in text, text[:2000]
    if page not in ("sql",):
        assert "Graph" in text


def test_app_serves_and_builds_twice(app: Any, trace_root: Path) -> None:
    client = app.server.test_client()
    assert client.get("/").status_code == 200
    assert client.get("/_dash-layout").status_code == 200
    deps = client.get("/_dash-dependencies").get_json()
    outputs = [d["output"] for d in deps]
    assert len(outputs) == len(set(outputs))  # every callback once
    again = glue.create_app(trace_root)  # a second app in the process keeps its own callbacks
    deps2 = again.server.test_client().get("/_dash-dependencies").get_json()
    assert len(deps2) == len(deps)


def test_glue_locates_the_content_folder() -> None:
    folder = glue.dashboard_dir()
    assert (folder / "pages" / "overview.py").is_file() and (folder / "assets").is_dir()
    assert not (folder / "app.py").exists()  # the engine is the package moescope.dashboard, not content
    assert glue.is_loopback("127.0.0.1") and glue.is_loopback("::1") and glue.is_loopback("localhost")
    assert glue.exposure_warning("127.0.0.1") is None and "0.0.0.0" in (glue.exposure_warning("0.0.0.0") or "")
    assert not glue.is_loopback("0.0.0.0") and not glue.is_loopback("192.168.1.2") and not glue.is_loopback("x")


# -- CLI ------------------------------------------------------------------------------------------------------


def _cli(argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, Any]:
    from moescope import cli

    seen: dict[str, Any] = {}

    class FakeApp:
        def run(self, **kw: Any) -> None:  # stands in for Dash.run: nothing is bound
            seen.update(kw)

    def fake_create_app(trace: Any, **kw: Any) -> FakeApp:
        seen.update(trace=trace, **kw)
        return FakeApp()

    monkeypatch.setattr(glue, "create_app", fake_create_app)
    monkeypatch.setattr(glue, "bind_error", lambda host, port: None)  # nothing is bound: the port may be in use here
    rc = cli.main(argv)
    return rc, capsys.readouterr().err, seen


def test_cli_binds_loopback_by_default(trace_root: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    rc, err, seen = _cli(["dashboard", str(trace_root)], monkeypatch, capsys)
    assert rc == 0 and seen["host"] == "127.0.0.1" and seen["port"] == 8050 and "warning" not in err
    assert seen["trace"] == str(trace_root) and seen["sql_timeout"] == 10.0 and "http://127.0.0.1:8050/" in err


def test_cli_warns_on_other_address(trace_root: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    rc, err, seen = _cli(["dashboard", str(trace_root), "--host", "0.0.0.0", "--port", "9000"], monkeypatch, capsys)
    assert rc == 0 and seen["host"] == "0.0.0.0" and seen["port"] == 9000
    assert "warning" in err and "0.0.0.0" in err


def test_cli_errors_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    rc, err, _ = _cli(["dashboard", str(tmp_path / "missing")], monkeypatch, capsys)
    assert rc == 3 and err.count("\n") == 1 and "no such trace" in err
    rc, err, _ = _cli(["dashboard", str(tmp_path), "--port", "0"], monkeypatch, capsys)
    assert rc == 2 and err.count("\n") == 1


def test_cli_register_sets_run() -> None:
    from moescope.commands import dashboard as cmd

    parser = argparse.ArgumentParser()
    cmd.register(parser.add_subparsers())
    args = parser.parse_args(["dashboard", "t"])
    assert args.func is cmd.run and args.host == "127.0.0.1" and args.port == 8050 and args.debug is False


def test_synthetic_trace_is_a_valid_trace(trace_root: Path) -> None:
    import moescope

    tr = moescope.open(trace_root)
    n = tr.con.execute("SELECT COUNT(*) FROM assignments").fetchone()[0]
    assert n == 2 * data_rows_per_run() * SHAPE.top_k
    assert os.path.isfile(trace_root / "collapse" / "manifest.json")
    tr.close()


def data_rows_per_run() -> int:
    """Routing rows per run of SHAPE: routed steps × tags × layers × seqs × seq_len."""
    return len(range(0, SHAPE.steps, SHAPE.routing_every)) * 2 * SHAPE.layers * SHAPE.seqs * SHAPE.seq_len


def test_empty_frames_do_not_break_tables() -> None:
    C = glue.components
    t = C.table(pd.DataFrame({"a": [1.5, None], "b": [[1, 2], None]}), "t")
    assert t.data == [{"a": 1.5, "b": "1, 2"}, {"a": None, "b": None}]
    assert C.table(pd.DataFrame(columns=["x"]), "t2").data == []


def test_counts_only_trace_pages_say_what_is_missing(tmp_path: Path) -> None:
    """A run recorded with tokens=0 and no snapshots: Tokens and Similarity explain, nothing breaks."""
    shape = SYN.Shape(layers=1, experts=4, top_k=1, steps=6, tokens_per_step=64, routing_every=0)
    root = SYN.make_trace(tmp_path / "counts", kinds=("balanced",), shape=shape, snapshots=False, tags=("",))
    app = glue.create_app(root, warm=False)
    for page in PAGES:
        text = _layout(app, page)
        assert "ms-msg-error" not in text, (page, text[:1500])
    assert "without token-level routing" in _layout(app, "tokens")
    assert "no expert snapshots" in _layout(app, "similarity")


def test_sequence_keys_round_trip(app: Any) -> None:
    tokens = glue.app.page_module("tokens")
    for rank, tag, seq in ((0, "code", 3), (2, "a:b", 0), (1, "", 7)):
        assert tokens.parse_seq_key(tokens.seq_key(rank, tag, seq)) == (rank, tag, seq)


def test_ranks_keep_their_own_sequences(tmp_path: Path) -> None:
    """Two ranks number their sequences from 0 alike: the Tokens page shows one rank's tokens at a time."""
    import moescope
    from moescope.format.writer import write_run

    shape = SYN.Shape(layers=1, experts=4, top_k=1, steps=2, tokens_per_step=8, routing_every=1, seqs=1, seq_len=8)
    root = SYN.make_trace(tmp_path / "ranks", kinds=("balanced",), shape=shape, snapshots=False, tags=("",))
    tr = moescope.open(root)
    rank0 = tr.con.execute("SELECT * EXCLUDE (rank) FROM routing").df()
    tr.close()
    rank1 = rank0.assign(token_id=ord("Z"))
    write_run(root / "balanced", {"routing": rank1}, run="balanced", rank=1)
    d = D.DashboardData(root)
    seqs = d.sequences("balanced")
    assert sorted(set(seqs["rank"])) == [0, 1] and len(seqs) == 4
    one = d.token_routing("balanced", 0, 0, "", rank=1)
    assert len(one) == 8 and set(one["text"]) == {"Z"}
    d.close()


SAMPLES = Path(__file__).resolve().parents[2] / "sample_traces"


@pytest.mark.skipif(not SAMPLES.is_dir(), reason="sample_traces/ not present")
def test_sample_traces_render_every_page_for_every_run() -> None:
    """The committed demo traces: every page of every run renders without a failed panel."""
    before = _snapshot(SAMPLES)
    app = glue.create_app(SAMPLES, warm=False)
    for run in app.moescope_data.run_names():
        for page in PAGES:
            text = _layout(app, page, run=run, layer="1")
            assert "ms-msg-error" not in text, (run, page, text[:1500])
    app.moescope_data.close()
    assert _snapshot(SAMPLES) == before
