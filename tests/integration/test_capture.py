"""Capture: hooks attach and detach, counts and rows are exact, padding, sampling, flushing, crashes, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import duckdb
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import moescope  # noqa: E402
from moescope.capture.recorder import RecordError, _keep_sequence  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from toy_moe import ToyMoE, ToyRouter  # noqa: E402


def _model(seed: int = 0, **kw: int) -> ToyMoE:
    torch.manual_seed(seed)
    return ToyMoE(**kw).eval()


def _ground_truth(model: ToyMoE, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """What each router returned, captured with plain hooks (the thing moescope must reproduce)."""
    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    hs = [m.register_forward_hook(lambda m, a, o: seen.append(tuple(t.detach() for t in o)))
          for m in model.modules() if isinstance(m, ToyRouter)]
    with torch.no_grad():
        model(x)
    for h in hs:
        h.remove()
    return seen


def q(path: Path, sql: str) -> list[tuple]:
    return duckdb.sql(sql.replace("$R", str(path))).fetchall()


def test_counts_and_rows_equal_router_outputs(tmp_path: Path) -> None:
    m = _model()
    x = torch.randint(0, 64, (4, 9))
    truth = _ground_truth(m, x)
    with moescope.record(m, tmp_path / "r", tokens=1.0) as rec:
        rec.step = 7
        with torch.no_grad():
            m(x)
    for layer, (logits, w, ids) in enumerate(truth):
        rows = q(tmp_path, f"SELECT experts, weights, seq, pos, token_id FROM '$R/r/routing/*.parquet' "
                           f"WHERE layer={layer} ORDER BY seq, pos")
        got_ids = np.array([r[0] for r in rows])
        got_w = np.array([r[1] for r in rows])
        np.testing.assert_array_equal(got_ids, ids.numpy())
        np.testing.assert_allclose(got_w, w.numpy(), atol=1e-3)  # stored as fp16
        assert [r[4] for r in rows] == x.reshape(-1).tolist()
        assert [r[3] for r in rows] == list(range(9)) * 4
        load = dict(q(tmp_path, f"SELECT expert, tokens FROM '$R/r/expert_load/*.parquet' WHERE layer={layer}"))
        expected = np.bincount(ids.reshape(-1).numpy(), minlength=8)
        assert [load[e] for e in range(8)] == expected.tolist()
        p = torch.softmax(logits.double(), -1)
        prob = dict(q(tmp_path, f"SELECT expert, prob_sum FROM '$R/r/expert_load/*.parquet' WHERE layer={layer}"))
        np.testing.assert_allclose([prob[e] for e in range(8)], p.sum(0).numpy(), rtol=1e-5)
        (tok, ent, lsq, margin), = q(tmp_path, f"SELECT tokens, entropy_sum, lse_sq_sum, margin_sum FROM "
                                          f"'$R/r/router_stats/*.parquet' WHERE layer={layer}")
        assert tok == 36
        np.testing.assert_allclose(ent, float(-(p * p.log()).sum()), rtol=1e-5)
        np.testing.assert_allclose(lsq, float((torch.logsumexp(logits.double(), -1) ** 2).sum()), rtol=1e-5)
        top2 = torch.topk(p, 2, -1).values
        np.testing.assert_allclose(margin, float((top2[:, 0] - top2[:, 1]).sum()), rtol=1e-5)
    man = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert man["closed"] is True and [li["n_experts"] for li in man["layers"]] == [8, 8]
    assert q(tmp_path, "SELECT DISTINCT step FROM '$R/r/expert_load/*.parquet'") == [(7,)]


def test_recording_does_not_change_outputs_and_detaches(tmp_path: Path) -> None:
    m = _model()
    x = torch.randint(0, 64, (2, 5))
    before = m(x)
    n_hooks = sum(len(mod._forward_hooks) + len(mod._forward_pre_hooks) for mod in m.modules())
    with moescope.record(m, tmp_path / "r", tokens=1.0):
        during = m(x)  # grad enabled
        during.sum().backward()
    assert torch.equal(before, during)
    after_hooks = sum(len(mod._forward_hooks) + len(mod._forward_pre_hooks) for mod in m.modules())
    assert after_hooks == n_hooks
    with pytest.raises(ZeroDivisionError), moescope.record(m, tmp_path / "r2"):
        m(x)
        1 / 0  # noqa: B018
    assert sum(len(mod._forward_hooks) + len(mod._forward_pre_hooks) for mod in m.modules()) == n_hooks
    # the trace written before the exception is complete
    assert q(tmp_path, "SELECT sum(tokens) FROM '$R/r2/expert_load/*.parquet'") == [(2 * 5 * 2 * 2,)]


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "autocast"])
def test_modes(tmp_path: Path, mode: str) -> None:
    m = _model()
    x = torch.randint(0, 64, (2, 6))
    ctx = {
        "no_grad": torch.no_grad(),
        "inference_mode": torch.inference_mode(),
        "autocast": torch.autocast("cpu", dtype=torch.bfloat16),
    }[mode]
    with moescope.record(m, tmp_path / "r", tokens=1.0) as rec:
        with ctx:
            m(x)
            rec.step = 1
            m(x)
        m(x)  # outside the mode, accumulating into the same step
    assert q(tmp_path, "SELECT step, sum(tokens) FROM '$R/r/expert_load/*.parquet' GROUP BY step ORDER BY step") == [
        (0, 2 * 6 * 2 * 2),
        (1, 2 * 2 * 6 * 2 * 2),
    ]


def test_padding_is_left_out(tmp_path: Path) -> None:
    m = _model()
    x = torch.randint(0, 64, (3, 6))
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[0, :4] = 0  # left padding
    mask[2, 5:] = 0  # right padding
    truth = _ground_truth(m, x)
    with moescope.record(m, tmp_path / "r", tokens=1.0):
        m(x, attention_mask=mask)
    valid = mask.reshape(-1).bool()
    for layer, (_, _, ids) in enumerate(truth):
        load = dict(q(tmp_path, f"SELECT expert, tokens FROM '$R/r/expert_load/*.parquet' WHERE layer={layer}"))
        expected = np.bincount(ids[valid].reshape(-1).numpy(), minlength=8)
        assert [load[e] for e in range(8)] == expected.tolist()
    assert q(tmp_path, "SELECT count(*) FROM '$R/r/routing/*.parquet' WHERE layer=0") == [(18 - 5,)]
    assert q(tmp_path, "SELECT min(tokens) FROM '$R/r/router_stats/*.parquet'") == [(13,)]


def test_token_sampling_whole_sequences_same_in_every_layer(tmp_path: Path) -> None:
    m = _model()
    x = torch.randint(0, 64, (16, 4))
    with moescope.record(m, tmp_path / "r", tokens=0.25, seed=3) as rec:
        for s in range(5):
            rec.step = s
            m(x)
    kept = q(tmp_path, "SELECT step, layer, seq, count(*) FROM '$R/r/routing/*.parquet' GROUP BY ALL")
    by_layer: dict[int, set[tuple[int, int]]] = {}
    for step, layer, seq, n in kept:
        assert n == 4  # whole sequences
        by_layer.setdefault(layer, set()).add((step, seq))
    assert by_layer[0] == by_layer[1]
    expected = {(s, i) for s in range(5) for i in range(16) if _keep_sequence(3, s, i, 0.25)}
    assert by_layer[0] == expected
    assert 5 <= len(expected) <= 35  # ~20 of 80
    # counts stay exact for every token, sampled or not
    assert q(tmp_path, "SELECT sum(tokens) FROM '$R/r/expert_load/*.parquet' WHERE layer=0") == [(5 * 64 * 2,)]


def test_counts_only_writes_no_routing(tmp_path: Path) -> None:
    m = _model()
    with moescope.record(m, tmp_path / "r", tokens=0.0):
        m(torch.randint(0, 64, (2, 3)))
    assert not (tmp_path / "r" / "routing").exists()
    assert (tmp_path / "r" / "expert_load").is_dir()


def test_flush_every_and_default_step_counter(tmp_path: Path) -> None:
    m = _model()
    x = torch.randint(0, 64, (2, 3))
    with moescope.record(m, tmp_path / "r", flush_every=3) as rec:
        for _ in range(7):
            m(x)
        assert rec.step == 6
    parts = sorted((tmp_path / "r" / "expert_load").glob("part-0-*.parquet"))
    assert len(parts) == 3  # steps 0-2, 3-5, 6 at close
    assert q(tmp_path, "SELECT count(DISTINCT step) FROM '$R/r/expert_load/*.parquet'") == [(7,)]


def test_tags(tmp_path: Path) -> None:
    m = _model()
    x = torch.randint(0, 64, (2, 3))
    with moescope.record(m, tmp_path / "r") as rec:
        rec.step = 0
        with rec.tag("english"):
            m(x)
        with rec.tag("code"):
            m(x)
            m(x)
    got = q(tmp_path, "SELECT tag, sum(tokens) FROM '$R/r/expert_load/*.parquet' WHERE layer=0 GROUP BY tag ORDER BY tag")
    assert got == [("code", 24), ("english", 12)]


def test_no_router_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(RecordError, match="register_router"):
        moescope.record(torch.nn.Linear(2, 2), tmp_path / "r").start()
    assert not (tmp_path / "r").exists()


def test_resume_continues_without_duplicates(tmp_path: Path) -> None:
    m = _model()
    x = torch.randint(0, 64, (2, 3))
    with moescope.record(m, tmp_path / "r") as rec:
        for s in range(4):
            rec.step = s
            m(x)
    # resumed from a checkpoint at step 2: steps 2-3 are recorded already
    with moescope.record(m, tmp_path / "r") as rec:
        for s in range(2, 6):
            rec.step = s
            m(x)
    got = q(tmp_path, "SELECT step, count(*) FROM '$R/r/expert_load/*.parquet' WHERE layer=0 GROUP BY step ORDER BY step")
    assert got == [(s, 8) for s in range(6)]


def test_drop_when_queue_full_is_counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import moescope.format.writer as trace_mod

    real_write = trace_mod.write_part

    def slow_write(*a: object, **kw: object) -> Path:
        time.sleep(0.05)  # a slow disk: the queue stays occupied while training goes on
        return real_write(*a, **kw)

    monkeypatch.setattr(trace_mod, "write_part", slow_write)
    m = _model()
    x = torch.randint(0, 64, (8, 16))
    with moescope.record(m, tmp_path / "r", tokens=1.0, flush_every=1, max_queue_mb=1e-6, on_full="drop") as rec:
        for s in range(30):
            rec.step = s
            m(x)
    man = json.loads((tmp_path / "r" / "manifest.json").read_text())
    written = q(tmp_path, "SELECT count(DISTINCT step) FROM '$R/r/expert_load/*.parquet'")[0][0]
    assert man["counters"]["dropped_flushes"] == 30 - written
    assert man["counters"]["dropped_flushes"] > 0 and written >= 1


KILL_SCRIPT = textwrap.dedent(
    """
    import sys, time, torch, moescope
    sys.path.insert(0, {tests!r})
    from toy_moe import ToyMoE
    torch.manual_seed(0)
    m = ToyMoE()
    x = torch.randint(0, 64, (2, 4))
    with moescope.record(m, {out!r}, tokens=1.0, flush_every=2) as rec:
        for s in range(10_000):
            rec.step = s
            m(x)
            if s == 9:
                rec.wait()
                print("flushed", flush=True)
            time.sleep(0.002)
    """
)


def test_sigkill_leaves_a_readable_trace(tmp_path: Path) -> None:
    out = tmp_path / "killed"
    script = KILL_SCRIPT.format(tests=str(Path(__file__).resolve().parents[1]), out=str(out))
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    assert p.stdout.readline().strip() == "flushed"
    time.sleep(0.3)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    tr = moescope.open(out)
    steps = [r[0] for r in tr.sql("SELECT DISTINCT step FROM expert_load ORDER BY 1").fetchall()]
    # steps 0..9 were flushed before the kill (flushes at 2, 4, 6, 8 plus the wait); none are half-written
    assert steps[:8] == list(range(8))
    assert steps == list(range(len(steps)))
    import pyarrow.parquet as pq

    for part in out.rglob("part-*.parquet"):
        assert pq.ParquetFile(part).metadata.num_rows > 0
    # temporary files of an interrupted write are hidden (dot-prefixed), so no reader globbing part-* sees them
    assert all(t.name.startswith(".") for t in out.rglob("*.tmp"))


def test_wrapper_whose_forward_is_not_called(tmp_path: Path) -> None:
    """Lightning-style: the recorded module's own forward never runs; its inner model's does."""

    class Wrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = _model()

        def training_step(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return self.model(x, attention_mask=mask)

    w = Wrapper()
    x = torch.randint(0, 64, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, :2] = 0
    with moescope.record(w, tmp_path / "r", tokens=1.0) as rec:
        for s in range(3):
            rec.step = s
            with rec.tag("train" if s < 2 else "val"):
                w.training_step(x, mask)
    got = q(tmp_path, "SELECT step, tag, count(*), min(pos), max(pos) FROM '$R/r/routing/*.parquet' WHERE layer=0 "
                      "GROUP BY ALL ORDER BY step")
    assert got == [(0, "train", 8, 0, 4), (1, "train", 8, 0, 4), (2, "val", 8, 0, 4)]
    # the padded row's first real token is position 0, as generate() numbers left-padded prompts
    assert q(tmp_path, "SELECT pos FROM '$R/r/routing/*.parquet' WHERE layer=0 AND step=0 AND seq=1 ORDER BY pos") == [
        (0,), (1,), (2,)
    ]
