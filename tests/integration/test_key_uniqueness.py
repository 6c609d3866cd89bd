"""A (rank, step, tag, layer, expert) is written once (issue 18 item 2): the recorder never splits a key across
parts by itself, and a split forced by the user is warned about and reported by `check` as an ERROR."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from toy_moe import ToyMoE  # noqa: E402

import moescope  # noqa: E402
from moescope.cli import main  # noqa: E402

KEYS = {"expert_load": "rank, step, tag, layer, expert", "router_stats": "rank, step, tag, layer"}


def _dups(root: Path) -> int:
    tr = moescope.open(root)
    return sum(tr.sql(f"SELECT count(*) FROM (SELECT {k} FROM {t} GROUP BY ALL HAVING count(*) > 1)").fetchall()[0][0]
               for t, k in KEYS.items())


def _forward(model: torch.nn.Module, g: torch.Generator) -> None:
    with torch.no_grad():
        model(torch.randint(0, 64, (2, 8), generator=g))


def test_tags_reentered_and_row_cap_never_split_a_key(tmp_path: Path) -> None:
    """flush_every=1, tags left and re-entered within a step, and a token-row cap that flushes every forward."""
    torch.manual_seed(0)
    model, g = ToyMoE(), torch.Generator().manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no split warning may fire
        with moescope.record(model, tmp_path / "r", tokens=1.0, flush_every=1, max_rows_per_flush=1) as rec:
            for step in range(4):
                rec.step = step
                for tag in ("train", "eval", "train", "train"):  # 3 forwards of (step, "train"), split by eval
                    with rec.tag(tag):
                        _forward(model, g)
            assert rec.flushes > 4  # the cap and flush_every did flush mid-step
    assert _dups(tmp_path / "r") == 0
    tr = moescope.open(tmp_path / "r")
    # every train key holds its three forwards: 3 × 2 × 8 tokens per layer and step
    assert tr.sql("SELECT DISTINCT tokens FROM router_stats WHERE tag = 'train'").fetchall() == [(48,)]
    assert main(["check", str(tmp_path / "r")]) == 0


def test_a_user_flush_mid_step_is_warned_and_reported(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, g = ToyMoE(), torch.Generator().manual_seed(1)
    with moescope.record(model, tmp_path / "r", flush_every=100) as rec:
        rec.step = 0
        _forward(model, g)
        rec.flush()
        with pytest.warns(RuntimeWarning, match="step 0 was already flushed and records again"):
            _forward(model, g)
    assert _dups(tmp_path / "r") > 0
    assert moescope.format.writer.read_manifest(tmp_path / "r")["counters"]["split_keys"] == [[0, ""]]
    h = moescope.open(tmp_path / "r").health()
    assert "ERROR" in set(h.loc[h["rule"] == "data", "status"])
    assert main(["check", str(tmp_path / "r")]) == 1
