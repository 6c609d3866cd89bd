"""`moescope import`: Megatron-Core, SGLang and vLLM routing dumps become moescope traces with exact loads.

Megatron-Core runs here on CPU (tests/importer_fixtures.py: its own TopKRouter and RouterReplay write the files;
the two CPU shims are described there), and the imported loads are compared with the routing map the router
itself returned. SGLang and vLLM need CUDA, so their dumps are built from the producer's source, field by field:

- SGLang: sgl-project/sglang python/sglang/srt/eplb/expert_distribution.py — `_StatAccumulator.dump` (stat),
  `_DetailAccumulator.dump` with `_SelectExpertsSinglePassGatherer.collect` (per_pass) and
  `_DetailSinglePassGatherer.collect` (per_token);
- vLLM: vllm/outputs.py `CompletionOutput.routed_experts` with
  vllm/model_executor/layers/fused_moe/routed_experts_capturer.py `RoutedExpertsCapturer` (zeroed buffer, uint16),
  and vllm/distributed/eplb/eplb_state.py `EplbModelState` (expert_load_window ring, physical_to_logical_map) /
  `EplbState.rearrange` (physical loads scatter-added onto logical experts).

Every known answer below is a sum written out by hand from the fixture, or what the producer's router dispatched.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

import moescope
from moescope.cli import main
from moescope.importers import IMPORTERS, ImportOptions, import_trace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from importer_fixtures import (  # noqa: E402
    megatron_steps,
    sglang_detail,
    sglang_per_pass_record,
    sglang_per_token_record,
    sglang_stat,
    vllm_eplb,
    vllm_routed,
)


def _q(tr: Any, query: str) -> pd.DataFrame:
    return tr.sql(query).df()


def _info(tr: Any) -> pd.DataFrame:
    """N and k per layer as the analyses see them (manifest layers, else derived)."""
    return _q(tr, "SELECT layer, n_experts, top_k FROM layer_info ORDER BY layer")


def _loads(root: Path, run: str) -> dict[tuple[int, int], list[int]]:
    """{(step, layer): tokens per expert} of an imported run, read back through moescope.open."""
    tr = moescope.open(root)
    df = _q(tr, f"SELECT step, layer, expert, tokens FROM expert_load WHERE run = '{run}' ORDER BY step, layer, expert")
    out: dict[tuple[int, int], list[int]] = {}
    for step, layer, expert, tokens in df.itertuples(index=False):
        row = out.setdefault((int(step), int(layer)), [])
        assert expert == len(row)  # every expert has a row, in order
        row.append(int(tokens))
    return out


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


# -- Megatron-Core: its own router on CPU --------------------------------------------------------------------------


def test_megatron_replay_indices_import_exactly_what_the_router_dispatched(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    truth = megatron_steps(tmp_path / "mg", steps=3, layers=2, seq=6, batch=2, experts=8, topk=2)
    rc, out, err = _cli(capsys, "import", "megatron", str(tmp_path / "mg"), str(tmp_path / "tr"),
                        "--num-experts", "8", "--micro-batch-size", "2")
    assert rc == 0, err
    assert "imported 3 step(s) x 2 layer(s), 144 expert assignments" in out  # 3 steps × 2 layers × 12 tokens × k=2
    assert "[3/3]" in err  # progress, one line per file
    loads = _loads(tmp_path / "tr", "mg")
    steps = [10, 20, 30]  # the numbers in routing_step_0010.pt ...
    assert sorted({s for s, _ in loads}) == steps
    for step, per_layer in zip(steps, truth):
        for layer, t in enumerate(per_layer):
            assert loads[(step, layer)] == t["routing_map"].sum(dim=0).tolist()
    # Routing rows: token t of Megatron's [S, B] flattening is position t // B of sequence t % B.
    tr = moescope.open(tmp_path / "tr")
    rows = _q(tr, "SELECT seq, pos, experts FROM routing WHERE step = 20 AND layer = 1 ORDER BY pos, seq")
    idx = truth[1][1]["indices"]  # [S*B, k] as RouterReplay recorded it
    assert len(rows) == 12
    for seq, pos, experts in rows.itertuples(index=False):
        assert list(experts) == idx[pos * 2 + seq].tolist()
    info = _info(tr)
    assert info[["n_experts", "top_k"]].values.tolist() == [[8, 2], [8, 2]]


def test_megatron_router_output_with_token_dropping_counts_dispatched_routes_and_gate_weights(tmp_path: Path) -> None:
    # capacity factor 1.0: some tokens lose a route; the routing map TopKRouter returns is what was dispatched
    truth = megatron_steps(tmp_path / "mgr", steps=2, layers=2, save="router", capacity_factor=1.0, seed=3)
    dropped = sum(12 * 2 - int(t["routing_map"].sum()) for per in truth for t in per)
    assert dropped > 0  # the fixture really drops routes
    summary = import_trace("megatron", tmp_path / "mgr", tmp_path / "tr", run="mgr",
                           options=ImportOptions(micro_batch_size=2))
    assert summary.layers[0].n_experts == 8
    loads = _loads(tmp_path / "tr", "mgr")
    tr = moescope.open(tmp_path / "tr")
    w = _q(tr, "SELECT step, layer, expert, weight_sum FROM expert_load ORDER BY step, layer, expert")
    for i, step in enumerate([10, 20]):
        for layer in range(2):
            rmap, probs = truth[i][layer]["routing_map"], truth[i][layer]["probs"]
            assert loads[(step, layer)] == rmap.sum(dim=0).tolist()
            got = w[(w.step == step) & (w.layer == layer)].weight_sum.to_numpy()
            np.testing.assert_allclose(got, (probs * rmap).sum(dim=0).double().numpy(), rtol=1e-6)
    # tokens per (step, layer): tokens that kept at least one route
    n_tok = _q(tr, "SELECT step, layer, tokens FROM router_stats ORDER BY step, layer").tokens.tolist()
    assert n_tok == [int(t["routing_map"].any(dim=1).sum()) for per in truth for t in per]


def test_megatron_stacked_inference_indices(tmp_path: Path) -> None:
    truth = megatron_steps(tmp_path / "st", steps=1, layers=3, save="stacked")  # [T, L, k]
    import_trace("megatron", tmp_path / "st", tmp_path / "tr", run="st", options=ImportOptions(num_experts=8))
    loads = _loads(tmp_path / "tr", "st")
    assert [loads[(10, ly)] for ly in range(3)] == [t["routing_map"].sum(dim=0).tolist() for t in truth[0]]


# -- SGLang: dumps built from expert_distribution.py ----------------------------------------------------------------


def test_sglang_stat_dump_loads_and_empty_buffer_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # logical_count [passes=3, layers=3, experts=4]; layer 0 is dense (all zero), pass 2 an unused buffer slot
    lc = np.array([
        [[0, 0, 0, 0], [5, 3, 2, 6], [1, 1, 7, 7]],
        [[0, 0, 0, 0], [4, 4, 4, 4], [0, 9, 3, 4]],
        [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]],
    ])
    sglang_stat(tmp_path / "expert_distribution_recorder_1718000000.5.pt", lc)
    rc, out, err = _cli(capsys, "import", "sglang", str(tmp_path / "expert_distribution_recorder_1718000000.5.pt"),
                        str(tmp_path / "tr"), "--run", "stat", "--top-k", "2")
    assert rc == 0, err
    assert "1 buffered pass(es) with no assignments" in out
    assert _loads(tmp_path / "tr", "stat") == {
        (0, 1): [5, 3, 2, 6], (0, 2): [1, 1, 7, 7], (1, 1): [4, 4, 4, 4], (1, 2): [0, 9, 3, 4]}
    info = _info(moescope.open(tmp_path / "tr"))
    assert info.layer.tolist() == [1, 2]  # the dense layer is not a trace layer
    assert info.top_k.tolist() == [2, 2]


def test_sglang_per_pass_sums_physical_slots_onto_logical_experts(tmp_path: Path) -> None:
    # 2 layers, 6 physical slots over 4 logical experts (EPLB redundant experts): slot -> logical expert
    p2l = np.array([[0, 1, 2, 3, 0, 1],
                    [0, 2, 0, 1, 0, 3]])
    recs = [
        sglang_per_pass_record(7, 1, np.array([[5, 1, 2, 3, 7, 4], [1, 2, 3, 4, 5, 6]])),
        sglang_per_pass_record(8, 1, np.array([[0, 0, 0, 0, 9, 0], [0, 0, 0, 0, 0, 0]])),
    ]
    sglang_detail(tmp_path / "expert_distribution_recorder_1718000001.0_1.pt", recs, p2l)
    s = import_trace("sglang", tmp_path / "expert_distribution_recorder_1718000001.0_1.pt", tmp_path / "tr",
                     run="pp")
    assert s.ranks == [1]
    # layer 0: e0 = 5+7, e1 = 1+4, e2 = 2, e3 = 3; layer 1: e0 = 1+3+5, e1 = 4, e2 = 2, e3 = 6
    assert _loads(tmp_path / "tr", "pp") == {(7, 0): [12, 5, 2, 3], (7, 1): [9, 4, 2, 6], (8, 0): [9, 0, 0, 0]}
    assert any("summed onto logical experts" in n for n in s.notes)
    tr = moescope.open(tmp_path / "tr")
    assert _q(tr, "SELECT DISTINCT rank FROM expert_load").iloc[:, 0].tolist() == [1]


def test_sglang_per_token_maps_slots_and_ignores_padding(tmp_path: Path) -> None:
    p2l = np.array([[0, 1, 2, 0], [0, 1, 2, 1]])  # 4 physical slots over 3 logical experts
    # [L=2, T=3, k=2] physical ids; prefill of two requests (2 + 1 tokens)
    ids = np.array([[[0, 1], [3, 2], [1, 2]],
                    [[3, 0], [2, 1], [0, 3]]])
    rec = sglang_per_token_record(4, 0, ids, input_ids=[101, 102, 201], positions=[0, 1, 0], extend_seq_lens=[2, 1])
    sglang_detail(tmp_path / "d.pt", [rec], p2l)
    import_trace("sglang", tmp_path / "d.pt", tmp_path / "tr", run="pt")
    # layer 0 logical: [0,1],[0,2],[1,2] -> e0 2, e1 2, e2 2; layer 1: [1,0],[2,1],[0,1] -> e0 2, e1 3, e2 1
    assert _loads(tmp_path / "tr", "pt") == {(4, 0): [2, 2, 2], (4, 1): [2, 3, 1]}
    tr = moescope.open(tmp_path / "tr")
    rows = _q(tr, "SELECT seq, pos, token_id, experts FROM routing WHERE layer = 1 ORDER BY seq, pos")
    assert [(r.seq, r.pos, r.token_id, list(r.experts)) for r in rows.itertuples()] == [
        (0, 0, 101, [1, 0]), (0, 1, 102, [2, 1]), (1, 0, 201, [0, 1])]  # columns 2..7 (-1) never became experts
    assert _info(tr).top_k.tolist() == [2, 2]


# -- vLLM: routed experts and EPLB state, built from its source ----------------------------------------------------


def test_vllm_routed_experts_skip_zero_filled_dense_layers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "req"
    src.mkdir()
    # [tokens, num_hidden_layers=3, k=2]; layer 0 is dense: the capturer's zeroed buffer is never written there
    a = np.array([[[0, 0], [1, 3], [2, 0]],
                  [[0, 0], [3, 2], [1, 2]],
                  [[0, 0], [0, 1], [3, 0]]])
    b = np.array([[[0, 0], [2, 3], [0, 1]],
                  [[0, 0], [1, 0], [0, 0]]])  # last row of layer 2 unwritten too: [0, 0] is not a top-2 choice
    vllm_routed(src / "req-000.npy", a)
    vllm_routed(src / "req-001.npy", b)
    rc, out, err = _cli(capsys, "import", "vllm-routed", str(src), str(tmp_path / "tr"), "--num-experts", "4")
    assert rc == 0, err
    assert "layers 0: every row zero-filled" in out and "layer 2: 1 token row(s)" in out
    # layer 1: 1,3 3,2 0,1 2,3 1,0 -> e0 2, e1 3, e2 2, e3 3; layer 2: 2,0 1,2 3,0 0,1 -> e0 3, e1 2, e2 2, e3 1
    assert _loads(tmp_path / "tr", "req") == {(0, 1): [2, 3, 2, 3], (0, 2): [3, 2, 2, 1]}
    tr = moescope.open(tmp_path / "tr")
    assert _q(tr, "SELECT count(*) FROM routing WHERE layer = 2").iloc[0, 0] == 4  # the unwritten row is not a token
    assert _q(tr, "SELECT tokens FROM router_stats ORDER BY layer").tokens.tolist() == [5, 4]


def test_vllm_eplb_window_ring_order_and_physical_to_logical(tmp_path: Path) -> None:
    # EplbModelState: window of 3 passes × 1 layer × 5 physical slots; slots 3, 4 replicate logical 0 and 2
    p2l = np.array([[0, 1, 2, 0, 2]])
    win = np.array([[[1, 1, 1, 1, 1]],    # slot 0: written third (ring position 1 is the next to overwrite)
                    [[0, 0, 0, 0, 0]],    # slot 1: never written
                    [[4, 0, 2, 6, 1]]])   # slot 2: the oldest pass
    vllm_eplb(tmp_path / "eplb.pt", win, p2l, expert_load_window_step=1)
    s = import_trace("vllm-eplb", tmp_path / "eplb.pt", tmp_path / "tr", run="eplb")
    # oldest first: slot 2 (e0 = 4+6, e1 = 0, e2 = 2+1), then slot 0 (e0 = 1+1, e1 = 1, e2 = 1+1); slot 1 empty
    assert _loads(tmp_path / "tr", "eplb") == {(0, 0): [10, 0, 3], (1, 0): [2, 1, 2]}
    assert any("1 pass(es) with no load" in n for n in s.notes)
    assert _info(moescope.open(tmp_path / "tr")).n_experts.tolist() == [3]


# -- check, report and the dashboard on imported traces --------------------------------------------------------------


def _stat_trace(tmp_path: Path, collapsed: bool) -> Path:
    rng = np.random.default_rng(0)
    passes = 30
    lc = rng.multinomial(2 * 400, [1 / 8] * 8, size=(passes, 2))  # [passes, layers, experts]: even routing, k=2
    if collapsed:
        lc[:, 1, :] = 0
        lc[:, 1, 0] = 400  # layer 1: every token's two routes on experts 0 and 1
        lc[:, 1, 1] = 400
    sglang_stat(tmp_path / "stat.pt", lc)
    return tmp_path / "stat.pt"


def test_imported_traces_pass_check_report_and_dashboard(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _stat_trace(tmp_path, collapsed=False)
    assert _cli(capsys, "import", "sglang", str(src), str(tmp_path / "ok"), "--top-k", "2", "-q")[0] == 0
    rc, out, _ = _cli(capsys, "check", str(tmp_path / "ok"))
    assert rc == 0 and "PASS" in out
    rc, out, _ = _cli(capsys, "report", str(tmp_path / "ok"))
    assert rc == 0 and "model imported from SGLang" in out
    pytest.importorskip("dash")
    from moescope.dashboard.data import DashboardData

    lc = torch.load(src, weights_only=True)["logical_count"].numpy()
    data = DashboardData(tmp_path / "ok")
    try:
        util = data.layer_utilization("stat")
        for layer in (0, 1):
            got = util[util.layer == layer].sort_values("expert").assignments.tolist()
            assert got == lc[:, layer, :].sum(axis=0).tolist()
    finally:
        data.close()


def test_check_fails_a_collapsed_imported_layer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _stat_trace(tmp_path, collapsed=True)
    assert _cli(capsys, "import", "sglang", str(src), str(tmp_path / "bad"), "--top-k", "2", "-q")[0] == 0
    rc, out, _ = _cli(capsys, "check", str(tmp_path / "bad"))
    assert rc == 1
    fails = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert fails and all(" 1 " in line for line in fails)  # only layer 1 fails; layer 0 is even


# -- usage and damaged input -------------------------------------------------------------------------------------


def test_help_lists_every_format_and_what_it_reads(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["import", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for imp in IMPORTERS.values():
        assert f"\n  {imp.name}\n" in out
    assert "RouterReplay.get_recorded_data()" in out and "last_physical_to_logical_map" in out
    assert "expert_load_window" in out and "routed_experts" in out


def test_usage_errors_exit_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    megatron_ids = tmp_path / "ids.pt"
    torch.save([torch.tensor([[0, 1], [2, 3]])], megatron_ids)
    with pytest.raises(SystemExit) as e:
        main(["import", "nemo", str(megatron_ids), str(tmp_path / "tr")])
    assert e.value.code == 2
    assert "invalid choice: 'nemo'" in capsys.readouterr().err
    cases = [
        (["megatron", str(megatron_ids), str(tmp_path / "tr")], "pass --num-experts N"),
        (["sglang", str(megatron_ids), str(tmp_path / "tr"), "--micro-batch-size", "2"],
         "--micro-batch-size B is not used by format sglang"),
        (["megatron", str(megatron_ids), str(tmp_path / "tr"), "--num-experts", "4", "--layers", "3-1"],
         "runs backwards"),
    ]
    for argv, words in cases:
        rc, _, err = _cli(capsys, "import", *argv, "-q")
        assert rc == 2 and words in err and err.count("\n") == 1, (argv, err)
    assert _cli(capsys, "import", "megatron", str(megatron_ids), str(tmp_path / "tr"), "--num-experts", "4")[0] == 0
    rc, _, err = _cli(capsys, "import", "megatron", str(megatron_ids), str(tmp_path / "tr"), "--num-experts", "4")
    assert rc == 2 and "already exists" in err  # an import never merges into an existing run


def test_damaged_or_foreign_input_exits_3_naming_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = sglang_stat(tmp_path / "good.pt", np.ones((2, 2, 4), np.int64))
    torn = tmp_path / "torn.pt"
    torn.write_bytes(good.read_bytes()[:200])
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    out_of_range = tmp_path / "range.pt"
    torch.save([torch.tensor([[0, 9]])], out_of_range)
    bad_npy = tmp_path / "req.npy"
    bad_npy.write_bytes(b"\x93NUMPY garbage")
    cases = [
        (["sglang", str(torn)], str(torn)),
        (["sglang", str(foreign)], "not an SGLang expert-distribution dump"),
        (["megatron", str(out_of_range), "--num-experts", "8"], "expert id 9 at layer 0 is outside [0, 8)"),
        (["vllm-routed", str(bad_npy), "--num-experts", "8"], "not a readable numpy file"),
        (["sglang", str(tmp_path / "missing.pt")], "no such file or directory"),
    ]
    for i, (argv, words) in enumerate(cases):
        fmt, src, *rest = argv
        rc, _, err = _cli(capsys, "import", fmt, src, str(tmp_path / f"tr{i}"), "-q", *rest)
        assert rc == 3 and words in err and err.count("\n") == 1, (argv, err)
        assert not (tmp_path / f"tr{i}" / Path(src).stem).exists()  # nothing half-written left behind


def test_batching_a_large_source_changes_no_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Large sources are written in batches; loads of one step spread over many batches must still add up once.
    from moescope.importers import sglang as sglang_mod
    from moescope.importers import vllm as vllm_mod

    rng = np.random.default_rng(1)
    src = tmp_path / "req"
    src.mkdir()
    for i in range(5):
        ids = np.stack([rng.permutation(6)[:2] for _ in range(7 * 2)]).reshape(7, 2, 2)  # [T, L, k], distinct ids
        vllm_routed(src / f"r{i}.npy", ids)
    recs = [sglang_per_token_record(p, 0, rng.integers(0, 6, size=(2, 4, 1)), list(range(4)), list(range(4)), [4])
            for p in range(6)]
    sglang_detail(tmp_path / "pt.pt", recs, np.arange(6)[None, :])
    sglang_stat(tmp_path / "stat.pt", rng.integers(0, 9, size=(5, 2, 4)))
    vllm_eplb(tmp_path / "eplb.pt", rng.integers(1, 9, size=(4, 2, 5)), np.array([[0, 1, 2, 0, 1]] * 2), 2)

    def everything(root: Path) -> None:
        import_trace("vllm-routed", src, root, options=ImportOptions(num_experts=6))
        for fmt, name in (("sglang", "pt.pt"), ("sglang", "stat.pt"), ("vllm-eplb", "eplb.pt")):
            import_trace(fmt, tmp_path / name, root)

    everything(tmp_path / "one")
    monkeypatch.setattr(vllm_mod, "BATCH_ROWS", 3)
    monkeypatch.setattr(sglang_mod, "BATCH_ROWS", 3)
    everything(tmp_path / "many")
    for run in ("req", "pt", "stat", "eplb"):
        assert _loads(tmp_path / "many", run) == _loads(tmp_path / "one", run)
        table = "routing" if run in ("req", "pt") else "expert_load"
        assert len(list((tmp_path / "many" / run / table).glob("*.parquet"))) > 1  # really batched
    tr = moescope.open(tmp_path / "many")
    assert _q(tr, "SELECT count(*) FROM routing WHERE run = 'req'").iloc[0, 0] == 5 * 7 * 2
    assert sum(sum(v) for v in _loads(tmp_path / "many", "req").values()) == 5 * 7 * 2 * 2


def test_sglang_tensor_parallel_replicas_are_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Two ranks whose per_token records hold the same tokens and experts (tensor parallelism): the import says
    the loads count each token once per rank and how to count it once; a rank with other tokens is not named."""
    p2l = np.array([[0, 1, 2], [0, 1, 2]])
    ids = np.array([[[0, 1], [2, 1]], [[1, 0], [0, 2]]])  # [L=2, T=2, k=2]
    src = tmp_path / "src"
    src.mkdir()
    for rank in (0, 1):  # TP: both ranks routed the same two tokens
        sglang_detail(src / f"expert_distribution_recorder_1718000002.0_{rank}.pt",
                      [sglang_per_token_record(3, rank, ids, input_ids=[7, 8], positions=[0, 1], extend_seq_lens=[2])],
                      p2l)
    sglang_detail(src / "expert_distribution_recorder_1718000002.0_2.pt",  # DP: other tokens
                  [sglang_per_token_record(3, 2, ids, input_ids=[9, 8], positions=[0, 1], extend_seq_lens=[2])], p2l)
    rc, out, _err = _cli(capsys, "import", "sglang", str(src), str(tmp_path / "tr"))
    assert rc == 0
    assert "rank 1 routed the same tokens to the same experts as rank 0 in 1 forward pass(es)" in out
    assert "rank 2 routed" not in out
    # said, not undone: identical requests on data-parallel ranks would look the same
    tr = moescope.open(tmp_path / "tr")
    assert _q(tr, "SELECT rank, sum(tokens) AS n FROM expert_load WHERE layer = 0 GROUP BY rank ORDER BY rank"
              ).n.tolist() == [4, 4, 4]
