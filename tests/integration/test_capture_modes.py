"""Capture under the execution modes real MoE runs use: activation checkpointing, torch.compile (both orders),
the lean hot path's op budget, the watchdog, CUDA graphs. Each is compared with the eager, uncheckpointed run
and with the ids the routers themselves returned."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

torch = pytest.importorskip("torch")

import moescope  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from toy_moe import ToyMoE, ToyRouter  # noqa: E402

B, S, K = 2, 32, 2


def tables(run: Path) -> dict[str, pd.DataFrame]:
    """Every table of a run, sorted so two runs compare row by row."""
    out = {}
    for name, keys in (("expert_load", ["step", "tag", "layer", "expert"]), ("router_stats", ["step", "tag", "layer"]),
                       ("routing", ["step", "tag", "layer", "seq", "pos"]),
                       ("router_precision", ["step", "tag", "layer"])):
        if (run / name).is_dir():
            df = pq.read_table(run / name).to_pandas().drop(columns=["run"])
            out[name] = df.sort_values(keys).reset_index(drop=True)
    return out


def assert_same_trace(a: Path, b: Path) -> None:
    """Counts and rows identical; float statistics equal within float32 tolerance."""
    ta, tb = tables(a), tables(b)
    assert set(ta) == set(tb)
    pd.testing.assert_frame_equal(ta["expert_load"].drop(columns=["prob_sum", "weight_sum"]),
                                  tb["expert_load"].drop(columns=["prob_sum", "weight_sum"]))
    for col in ("prob_sum", "weight_sum"):
        np.testing.assert_allclose(ta["expert_load"][col], tb["expert_load"][col], rtol=1e-5, atol=1e-5)
    sa, sb = ta["router_stats"], tb["router_stats"]
    for col in sa.columns:
        if sa[col].dtype.kind in "iuO":
            assert sa[col].tolist() == sb[col].tolist(), col
        else:
            np.testing.assert_allclose(sa[col], sb[col], rtol=1e-5, atol=1e-4, err_msg=col)
    if "router_precision" in ta:  # the same rows: routing the same samples again gives the same flips
        pd.testing.assert_frame_equal(ta["router_precision"], tb["router_precision"])
    if "routing" in ta:
        ra, rb = ta["routing"], tb["routing"]
        for col in ("step", "tag", "layer", "seq", "pos", "token_id"):
            assert ra[col].tolist() == rb[col].tolist(), col
        assert [list(x) for x in ra.experts] == [list(x) for x in rb.experts]
        np.testing.assert_allclose(np.stack(ra.weights), np.stack(rb.weights), atol=1e-3)


def batch(seed: int = 0, vocab: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, :10] = 0  # left padding: 54 real tokens of 64
    return x, mask


def router_truth(model: torch.nn.Module, router_cls: type, run: Any) -> list[torch.Tensor]:
    """ids [T, k] each router returned in forwards (not in backward recomputes), in call order."""
    seen: list[torch.Tensor] = []

    def hook(m: Any, a: Any, out: Any) -> None:
        if torch._C._current_graph_task_id() == -1:
            seen.append(out[2].detach().reshape(-1, out[2].shape[-1]).clone())

    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, router_cls)]
    try:
        run()
    finally:
        for h in hs:
            h.remove()
    return seen


# -- activation checkpointing -------------------------------------------------------------------------------


def train_steps(model: torch.nn.Module, out: Path | None, steps: int = 3, tokens: float = 1.0, hf: bool = False,
                vocab: int = 64, **record_kw: Any) -> None:
    """Forward + backward of `steps` padded batches, recorded into `out` (None: not recorded)."""
    def run(rec: Any = None) -> None:
        for s in range(steps):
            if rec is not None:
                rec.step = s
            x, mask = batch(s, vocab)
            y = model(input_ids=x, attention_mask=mask)
            loss = y.logits.float().pow(2).mean() if hf else (y.logits if hasattr(y, "logits") else y).pow(2).mean()
            loss.backward()
    if out is None:
        run()
        return
    with moescope.record(model, out, tokens=tokens, **record_kw) as rec:
        run(rec)


@pytest.mark.parametrize("mode", ["non_reentrant", "reentrant", "checkpoint_wrapper"])
def test_toy_checkpointing_records_once(mode: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    plain = ToyMoE()
    torch.manual_seed(0)
    ckpt = ToyMoE(checkpoint=None if mode == "checkpoint_wrapper" else mode)
    if mode == "checkpoint_wrapper":
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        ckpt.blocks = torch.nn.ModuleList(checkpoint_wrapper(b) for b in ckpt.blocks)
    train_steps(plain, tmp_path / "plain")
    truth = router_truth(ckpt, ToyRouter, lambda: train_steps(ckpt, tmp_path / "ckpt"))
    assert_same_trace(tmp_path / "plain", tmp_path / "ckpt")
    load = tables(tmp_path / "ckpt")["expert_load"]
    # 54 real tokens × top-2 per layer per step, not twice that: the recompute in backward is not recorded
    assert (load.groupby(["step", "layer"]).tokens.sum() == 54 * K).all()
    _, mask = batch()
    for i, ids in enumerate(truth):
        step, layer = divmod(i, 2)
        valid = batch(step)[1].reshape(-1).bool()
        expected = np.bincount(ids[valid].reshape(-1).numpy(), minlength=8)
        got = load[(load.step == step) & (load.layer == layer)].sort_values("expert").tokens.tolist()
        assert got == expected.tolist()


@pytest.mark.parametrize("reentrant", [False, True])
def test_hf_gradient_checkpointing_records_once(reentrant: bool, tmp_path: Path) -> None:
    from hf_helpers import tiny_mixtral

    plain = tiny_mixtral().train()
    ckpt = tiny_mixtral().train()
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    train_steps(plain, tmp_path / "plain", hf=True, vocab=100)
    router_cls = type(next(m for m in ckpt.modules() if type(m).__name__ == "MixtralTopKRouter"))
    truth = router_truth(ckpt, router_cls, lambda: train_steps(ckpt, tmp_path / "ckpt", hf=True, vocab=100))
    assert len(truth) == 3 * 2  # the recompute really ran in backward (the hook above skipped it)
    assert_same_trace(tmp_path / "plain", tmp_path / "ckpt")
    load = tables(tmp_path / "ckpt")["expert_load"]
    assert (load.groupby(["step", "layer"]).tokens.sum() == 54 * K).all()


def test_reference_model_checkpoint_wrapper(tmp_path: Path) -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    from moescope.reference.model import MoEConfig, MoEModel

    cfg = MoEConfig(vocab_size=64, d_model=32, n_layers=2, n_experts=4, top_k=2)
    torch.manual_seed(0)
    plain = MoEModel(cfg).train()
    torch.manual_seed(0)
    ckpt = MoEModel(cfg).train()
    ckpt.layers = torch.nn.ModuleList(checkpoint_wrapper(layer) for layer in ckpt.layers)
    train_steps(plain, tmp_path / "plain")
    train_steps(ckpt, tmp_path / "ckpt")
    assert_same_trace(tmp_path / "plain", tmp_path / "ckpt")
    load = tables(tmp_path / "ckpt")["expert_load"]
    assert (load.groupby(["step", "layer"]).tokens.sum() == 54 * K).all()


# -- the hot path's op budget ---------------------------------------------------------------------------------


def hook_ops(tmp_path: Path, **record_kw: Any) -> list[int]:
    """Top-level aten ops of each call of the second block's router hook in the two forwards of a new step
    (torch.profiler on CPU, inside real forwards: a warm-up step ran first, the token grid is the forward's own)."""
    from moescope.capture.hotpath import ops_in_forwards

    torch.manual_seed(0)
    m = ToyMoE(n_layers=4).eval()
    x, mask = batch()
    with moescope.record(m, tmp_path, **record_kw) as rec, torch.no_grad():
        rec.step = 0
        m(x, attention_mask=mask)  # warm: a router's first call checks the spec; the ring's buffers are made

        def two_forwards() -> None:
            rec.step = 1
            m(x, attention_mask=mask)
            m(x, attention_mask=mask)

        return ops_in_forwards(m.blocks[1].router, two_forwards)


def test_hot_path_op_budget(tmp_path: Path) -> None:
    counts_only = hook_ops(tmp_path / "a", tokens=0.0, stats=False)
    default = hook_ops(tmp_path / "b", tokens=0.0)
    rows = hook_ops(tmp_path / "c", tokens=1.0)
    assert counts_only[0] == counts_only[1] <= 8, counts_only
    assert default[0] == default[1] <= 20, default
    assert rows[0] == rows[1] <= 25, rows
    assert counts_only[0] < default[0] < rows[0]


@pytest.mark.parametrize(("mode", "budget"), [({"stats": False}, 8), ({}, 20), ({"tokens": 1.0}, 25)],
                         ids=["counts-only", "default", "rows"])
def test_flight_ring_stays_within_the_op_budget(tmp_path: Path, mode: dict[str, Any], budget: int) -> None:
    """The call that writes the flight ring (each layer's first of a step) stays within its mode's budget, and the
    later calls of the step cost what they cost without the ring."""
    kw = {"tokens": 0.0, **mode}
    plain = hook_ops(tmp_path / "plain", **kw)
    first, later = hook_ops(tmp_path / "ring", **kw, flight_steps=4, flight_tokens=16)
    assert first <= budget, (first, budget)
    assert later == plain[0] == plain[1] < first


def test_counts_only_mode_records_exact_counts(tmp_path: Path) -> None:
    torch.manual_seed(0)
    m = ToyMoE().eval()
    x, mask = batch()
    truth = router_truth(m, ToyRouter, lambda: m(x, attention_mask=mask))
    with moescope.record(m, tmp_path / "r", stats=False), torch.no_grad():
        m(x, attention_mask=mask)
    t = tables(tmp_path / "r")
    valid = mask.reshape(-1).bool()
    for layer, ids in enumerate(truth):
        load = t["expert_load"][t["expert_load"].layer == layer]
        assert load.tokens.tolist() == np.bincount(ids[valid].reshape(-1).numpy(), minlength=8).tolist()
        assert load.prob_sum.isna().all()  # not computed in this mode
    assert t["router_stats"].tokens.tolist() == [54, 54]
    man = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert man["capture"]["stats"] is False


# -- the watchdog ---------------------------------------------------------------------------------------------


class SometimesSkips(ToyMoE):
    """A model whose forward can bypass every MoE block (so its routers never run)."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                skip: bool = False) -> torch.Tensor:
        if skip:
            return self.head(self.emb(input_ids))
        return super().forward(input_ids, attention_mask)


def test_watchdog_warns_once_and_counts_silent_forwards(tmp_path: Path) -> None:
    torch.manual_seed(0)
    m = SometimesSkips().eval()
    x, _ = batch()
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        with moescope.record(m, tmp_path / "r", flush_every=2) as rec:
            for s in range(6):
                rec.step = s
                m(x, skip=s >= 2)
    silent = [w for w in caught if "no router hook fired" in str(w.message)]
    assert len(silent) == 1
    man = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert man["counters"]["silent_forwards"] == 4
    assert sorted(tables(tmp_path / "r")["expert_load"].step.unique()) == [0, 1]


# -- torch.compile ---------------------------------------------------------------------------------------------


def steps_with_tags(rec: Any, fn: Any, first: int, last: int) -> None:
    """Steps first..last-1, the step and the tag changing every step (what must not recompile)."""
    x, mask = batch()
    for s in range(first, last):
        rec.step = s
        with rec.tag(f"t{s % 3}"), torch.no_grad():
            fn(x, attention_mask=mask)


def dynamo_state() -> tuple[int, int, int]:
    """(graphs compiled, frames compiled, graph breaks) so far in this process."""
    from torch._dynamo.utils import counters

    return (counters["stats"]["unique_graphs"], counters["frames"]["total"], sum(counters["graph_break"].values()))


@pytest.fixture
def fresh_dynamo() -> Any:
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def eager_trace(out: Path, n: int = 53) -> None:
    torch.manual_seed(0)
    m = ToyMoE(dense=True).eval()
    with moescope.record(m, out, tokens=1.0) as rec:
        steps_with_tags(rec, m, 0, n)


@pytest.mark.slow
def test_compile_after_record_equals_eager_without_recompiles(tmp_path: Path, fresh_dynamo: Any) -> None:
    eager_trace(tmp_path / "eager")
    torch.manual_seed(0)
    m = ToyMoE(dense=True).eval()
    with moescope.record(m, tmp_path / "compiled", tokens=1.0) as rec:
        cm = torch.compile(m)
        steps_with_tags(rec, cm, 0, 3)  # warm-up
        warm = dynamo_state()
        steps_with_tags(rec, cm, 3, 53)
        assert dynamo_state() == warm  # 0 recompiles over 50 steps while step and tag change
    assert warm[2] == 0  # no graph break anywhere, MoE blocks included
    assert_same_trace(tmp_path / "eager", tmp_path / "compiled")


def test_checkpointing_with_the_flight_ring_records_each_forward_once(tmp_path: Path) -> None:
    """The flight ring and precision_check under activation checkpointing: counts as without checkpointing, and the
    ring holds the forward's router calls, never the recompute's."""
    from moescope.analysis.explain import read_dump

    flight = {"flight_steps": 3, "precision_check": True}
    torch.manual_seed(0)
    plain = ToyMoE()
    torch.manual_seed(0)
    ckpt = ToyMoE(checkpoint="non_reentrant")
    train_steps(plain, tmp_path / "plain", **flight)
    truth = router_truth(ckpt, ToyRouter, lambda: train_steps(ckpt, tmp_path / "ckpt", **flight))
    assert_same_trace(tmp_path / "plain", tmp_path / "ckpt")
    # a row per flush and layer, of the flush's latest step (one flush here, at close)
    assert tables(tmp_path / "ckpt")["router_precision"][["step", "layer", "sampled"]].values.tolist() == \
        [[2, 0, 64], [2, 1, 64]]
    with moescope.record(ckpt, tmp_path / "dump", flight_steps=3) as rec:
        truth = router_truth(ckpt, ToyRouter, lambda: [_ckpt_step(ckpt, rec, s) for s in range(3)])
        d = read_dump(rec.dump_flight())
    want = torch.cat([truth[2 * s][:64] for s in range(3)])  # layer 0's forward call of each step
    assert (d.layer(0, "ids") == want.numpy()).all()


def _ckpt_step(model: torch.nn.Module, rec: Any, step: int) -> None:
    rec.step = step
    x, mask = batch(step)
    model(input_ids=x, attention_mask=mask).pow(2).mean().backward()


@pytest.mark.slow
def test_compiled_with_the_flight_ring_equals_eager(tmp_path: Path, fresh_dynamo: Any) -> None:
    """Compiled router calls skip the ring (its slot is chosen on the host): counts equal eager, one warning says so."""
    eager_trace(tmp_path / "eager", n=6)
    torch.manual_seed(0)
    m = ToyMoE(dense=True).eval()
    with pytest.warns(RuntimeWarning, match="no router call wrote the flight ring"):
        with moescope.record(m, tmp_path / "compiled", tokens=1.0, flight_steps=2, precision_check=True) as rec:
            steps_with_tags(rec, torch.compile(m), 0, 6)
    assert_same_trace(tmp_path / "eager", tmp_path / "compiled")


@pytest.mark.slow
def test_compile_before_record_equals_eager(tmp_path: Path, fresh_dynamo: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    eager_trace(tmp_path / "eager", 6)
    torch.manual_seed(0)
    m = ToyMoE(dense=True).eval()
    cm = torch.compile(m)
    x, mask = batch()
    with torch.no_grad():
        cm(x, attention_mask=mask)  # compiled and cached before any hook exists
    with moescope.record(cm, tmp_path / "compiled", tokens=1.0) as rec:
        steps_with_tags(rec, cm, 0, 6)
    assert_same_trace(tmp_path / "eager", tmp_path / "compiled")

    # Another instance of the same class, compiled and run before: its cached code must not be reused hook-less.
    torch.manual_seed(0)
    other = ToyMoE(dense=True).eval()
    with moescope.record(other, tmp_path / "other", tokens=1.0) as rec:
        co = torch.compile(other)
        steps_with_tags(rec, co, 0, 6)
    assert_same_trace(tmp_path / "eager", tmp_path / "other")

    # What the reset prevents: without it, the cached code runs without the hooks and the watchdog speaks.
    import moescope.capture.recorder as recorder_mod

    monkeypatch.setattr(recorder_mod, "forget_compiled", lambda model: None)
    with torch.no_grad():
        cm(x, attention_mask=mask)  # compiled again (without hooks) after the last recording's reset
    with pytest.warns(UserWarning, match="no router hook fired"):
        with moescope.record(cm, tmp_path / "stale") as rec:
            steps_with_tags(rec, cm, 0, 2)
    assert not (tmp_path / "stale" / "expert_load").exists()  # nothing recorded, and the manifest says so
    assert json.loads((tmp_path / "stale" / "manifest.json").read_text())["counters"]["silent_forwards"] == 2


# -- CUDA graphs ----------------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


def expected_per_step(m: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    """Assignments per expert per layer of one forward, from the routers' own ids (real tokens only)."""
    truth = router_truth(m, ToyRouter, lambda: m(x, attention_mask=mask))
    valid = mask.reshape(-1).bool().cpu()
    return [np.bincount(ids.cpu()[valid].reshape(-1).numpy(), minlength=8).tolist() for ids in truth]


@cuda
def test_cuda_graph_replays_are_each_recorded(tmp_path: Path) -> None:
    torch.manual_seed(0)
    m = ToyMoE(dense=True).cuda().eval()
    x, mask = (t.cuda() for t in batch())
    with torch.no_grad():
        per_forward = expected_per_step(m, x, mask)
        with moescope.record(m, tmp_path / "g") as rec:
            rec.step = 0
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):  # warm-up, recorded at step 0
                    m(x, attention_mask=mask)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):  # capture runs no kernel: nothing is added here
                m(x, attention_mask=mask)
            for s in range(1, 6):
                rec.step = s
                for _ in range(s):  # step s replays the captured forward s times
                    graph.replay()
    load = tables(tmp_path / "g")["expert_load"]
    for s, n in [(0, 3)] + [(s, s) for s in range(1, 6)]:
        for layer in (0, 1):
            got = load[(load.step == s) & (load.layer == layer)].sort_values("expert").tokens.tolist()
            assert got == [n * c for c in per_forward[layer]], (s, layer)


@cuda
@pytest.mark.slow
def test_reduce_overhead_compile_records_every_call(tmp_path: Path, fresh_dynamo: Any) -> None:
    torch.manual_seed(0)
    m = ToyMoE(dense=True).cuda().eval()
    x, mask = (t.cuda() for t in batch())
    with torch.no_grad():
        per_forward = expected_per_step(m, x, mask)
        with moescope.record(m, tmp_path / "g") as rec:
            cm = torch.compile(m, mode="reduce-overhead")
            for s in range(8):  # the first calls warm up and record the graph; later ones replay it
                rec.step = s
                cm(x, attention_mask=mask)
    load = tables(tmp_path / "g")["expert_load"]
    for s in range(8):
        for layer in (0, 1):
            got = load[(load.step == s) & (load.layer == layer)].sort_values("expert").tokens.tolist()
            assert got == per_forward[layer], (s, layer)


@pytest.mark.slow
def test_compiled_hf_mixtral_breaks_only_at_entry_hooks(tmp_path: Path, fresh_dynamo: Any) -> None:
    """A transformers model: graph breaks only where the model's entry hooks run (outside every MoE block)."""
    from hf_helpers import tiny_mixtral
    from torch._dynamo.utils import counters

    x, mask = batch(vocab=100)

    def run(model: Any, out: Path, compiled: bool) -> None:
        with moescope.record(model, out, tokens=1.0) as rec, torch.no_grad():
            fn = torch.compile(model) if compiled else model
            for s in range(23):
                rec.step = s
                with rec.tag(f"t{s % 2}"):
                    fn(input_ids=x, attention_mask=mask)
                if s == 2:
                    warm = dynamo_state()
        if compiled:
            assert dynamo_state() == warm  # no recompile after warm-up

    run(tiny_mixtral().eval(), tmp_path / "eager", False)
    run(tiny_mixtral().eval(), tmp_path / "compiled", True)
    reasons = list(counters["graph_break"])
    assert reasons and all("torch.compiler.disable" in r and "Recorder._attach" in r for r in reasons), reasons
    assert_same_trace(tmp_path / "eager", tmp_path / "compiled")


# -- a failing hook -------------------------------------------------------------------------------------------


def test_exception_in_a_hook_stops_that_layer_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from moescope.capture import hotpath

    torch.manual_seed(0)
    m = ToyMoE().eval()
    x, mask = batch()
    before = m(x, attention_mask=mask)
    real = hotpath.HotPath.update

    def update(self: Any, layer: int, *a: Any, **kw: Any) -> None:
        if layer == 1:
            raise ValueError("boom")
        real(self, layer, *a, **kw)

    monkeypatch.setattr(hotpath.HotPath, "update", update)
    with pytest.warns(RuntimeWarning, match=r"capture of layer 1 \(blocks.1.router, spec 'toy'\) stopped: ValueError: boom"):
        with moescope.record(m, tmp_path / "r") as rec:
            for s in range(3):
                rec.step = s
                out = m(x, attention_mask=mask)  # the forward never sees the hook's exception
    assert torch.equal(out, before)
    load = tables(tmp_path / "r")["expert_load"]
    assert sorted(load.layer.unique()) == [0] and sorted(load.step.unique()) == [0, 1, 2]
    man = json.loads((tmp_path / "r" / "manifest.json").read_text())  # the manifest counts the disabled layer
    assert man["counters"]["disabled_layers"] == [
        {"layer": 1, "module": "blocks.1.router", "family": "toy", "error": "ValueError: boom"}]
