"""record(tokens_every=N): token rows on every N-th step only, counts on every step; the routing analyses say so."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import moescope
from moescope.analysis.metrics import describe_steps
from moescope.capture.options import CaptureOptions

torch = pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from toy_moe import ToyMoE  # noqa: E402


def _record(path: Path, **kw: object) -> dict[tuple[int, int], list[list[int]]]:
    """Record 8 steps of a ToyMoE; returns what each router itself dispatched per (step, layer): ids [T][k]."""
    torch.manual_seed(0)
    m = ToyMoE()
    g = torch.Generator().manual_seed(1)
    own: dict[tuple[int, int], list[list[int]]] = {}
    state = {"step": 0}
    for i, b in enumerate(m.blocks):
        b.router.register_forward_hook(
            lambda mod, a, out, i=i: own.__setitem__((state["step"], i), out[2].tolist()))
    with moescope.record(m, path, tokens=1.0, flush_every=3, **kw) as rec:
        for step in range(8):
            state["step"] = rec.step = step
            m(torch.randint(0, 64, (2, 5), generator=g))
    return own


def test_token_rows_on_every_nth_step_and_counts_on_every_step(tmp_path: Path) -> None:
    own = _record(tmp_path / "run", tokens_every=3)
    tr = moescope.open(tmp_path)
    assert [r[0] for r in tr.sql("SELECT DISTINCT step FROM routing ORDER BY 1").fetchall()] == [0, 3, 6]
    assert [r[0] for r in tr.sql("SELECT DISTINCT step FROM expert_load ORDER BY 1").fetchall()] == list(range(8))
    # the rows kept are exactly what the routers returned at those steps (2 sequences × 5 tokens, k = 2)
    rows = tr.sql("SELECT step, layer, experts FROM routing ORDER BY step, layer, seq, pos").fetchall()
    want = [(s, layer, ids) for s in (0, 3, 6) for layer in (0, 1) for ids in own[(s, layer)]]
    assert rows == want
    counts = tr.sql("SELECT sum(tokens) FROM expert_load").fetchall()[0][0]
    assert counts == 8 * 2 * 2 * 5 * 2  # every step's assignments, with or without token rows
    man = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert man["capture"]["tokens_every"] == 3
    assert tr.manifest("run")["capture"]["tokens_every"] == 3

    # The routing-based analyses say which steps they cover.
    for df in (tr.temporal_locality(), tr.vocab_specialization(min_count=1), tr.coactivation()):
        assert set(df["covers"]) == {"steps 0–6, every 3rd (3 steps)"} and set(df["token_steps"]) == {3}
    loc = tr.temporal_locality(window=4)  # windows of 4 steps over the token rows' steps: {0, 3} and {6}
    assert sorted(zip(loc["window_start"], loc["token_steps"], loc["covers"])) == [
        (0, 2, "steps 0–3, every 3rd (2 steps)")] * 2 + [(6, 1, "step 6")] * 2
    from moescope.commands.report import render_report

    assert "token rows (routing analyses): steps 0–6, every 3rd (3 steps); tokens_every=3" in render_report(tr)


def test_default_keeps_every_step_and_the_option_is_checked(tmp_path: Path) -> None:
    _record(tmp_path / "run")
    tr = moescope.open(tmp_path)
    assert tr.sql("SELECT count(DISTINCT step) FROM routing").fetchall() == [(8,)]
    assert set(tr.temporal_locality()["covers"]) == {"steps 0–7 (8 steps)"}
    assert "token rows (routing analyses): steps 0–7 (8 steps)\n" in render_report_text(tr)
    with pytest.raises(ValueError, match="tokens_every"):
        CaptureOptions.build(tokens_every=0)
    with pytest.raises(ValueError, match="reduce"):
        CaptureOptions.build(reduce="sum")
    with pytest.raises(ValueError, match="group"):
        CaptureOptions.build(reduce="none", group=object())
    assert describe_steps([]) == "no token rows" and describe_steps([4, 5, 9]) == "3 steps in 4–9"


def render_report_text(tr: object) -> str:
    """`moescope report`'s text."""
    from moescope.commands.report import render_report

    return render_report(tr)
