"""Known answers for the capture hot path: one router call with padding, a NaN row, an +Inf row and a masked
(-Inf) expert, added into the buffer and decoded on the host."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from moescope.capture.adapters import RouterEvent  # noqa: E402
from moescope.capture.hotpath import STAT_NAMES, Grid, HotPath, decode  # noqa: E402

E, K = 4, 2


def call() -> tuple[RouterEvent, torch.Tensor]:
    logits = torch.tensor([
        [2.0, 1.0, 0.0, -1.0],
        [0.5, -math.inf, 0.5, 0.0],  # a masked expert: finite, its probability 0
        [math.nan, 0.0, 0.0, 0.0],  # non-finite
        [math.inf, 0.0, 0.0, 0.0],  # non-finite
        [1.0, 3.0, 0.0, 0.0],  # padding
    ])
    ids = torch.tensor([[0, 1], [0, 2], [1, 2], [0, 3], [1, 0]])
    w = torch.tensor([[0.6, 0.4], [0.5, 0.5], [0.7, 0.3], [0.9, 0.1], [0.8, 0.2]])
    valid = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0])
    return RouterEvent(logits, ids, w), valid


def test_one_call_known_answer() -> None:
    ev, valid = call()
    grid = Grid()
    grid.fill(valid, [K])
    hot = HotPath([E], torch.device("cpu"))
    hot.update(0, ev, grid)
    hot.update(0, ev, grid)  # two calls add up
    load, st = decode(hot.snapshot()[0].numpy(), E, True)
    stats = dict(zip(STAT_NAMES, st, strict=True))

    real = slice(0, 4)
    counts = np.bincount(ev.ids[real].reshape(-1).numpy(), minlength=E)
    wsum = np.bincount(ev.ids[real].reshape(-1).numpy(), weights=ev.weights[real].reshape(-1).numpy(), minlength=E)
    assert load[:, 0].tolist() == (2 * counts).tolist()
    np.testing.assert_allclose(load[:, 2], 2 * wsum, rtol=1e-6)
    finite = ev.logits[:2].double()  # the two finite real rows
    p = torch.softmax(finite, -1)
    np.testing.assert_allclose(load[:, 1], 2 * p.sum(0).numpy(), rtol=1e-6)
    ent = -(torch.special.xlogy(p, p)).sum()
    lse = torch.logsumexp(finite, -1)
    top2 = p.topk(2, -1).values
    assert stats["tokens"] == 8 and stats["nonfinite"] == 4 and stats["dropped"] == 0
    np.testing.assert_allclose(stats["entropy_sum"], 2 * float(ent), rtol=1e-5)
    np.testing.assert_allclose(stats["lse_sum"], 2 * float(lse.sum()), rtol=1e-5)
    np.testing.assert_allclose(stats["lse_sq_sum"], 2 * float((lse**2).sum()), rtol=1e-5)
    np.testing.assert_allclose(stats["margin_sum"], 2 * float((top2[:, 0] - top2[:, 1]).sum()), rtol=1e-5)
    # the max over real finite tokens: the padded row (lse ≈ 3.18) and the non-finite rows do not count
    np.testing.assert_allclose(stats["lse_max"], float(lse.max()), rtol=1e-6)
    # the snapshot reset the buffer
    load2, st2 = decode(hot.snapshot()[0].numpy(), E, True)
    assert load2[:, 0].sum() == 0 and st2[0] == 0 and st2[STAT_NAMES.index("lse_max")] == -math.inf


def test_counts_only_and_no_grid() -> None:
    ev, _ = call()
    hot = HotPath([E], torch.device("cpu"), stats=False)
    hot.update(0, ev, None)  # no token grid (a router called outside any entry module): every token counts
    load, st = decode(hot.snapshot()[0].numpy(), E, False)
    assert load[:, 0].tolist() == np.bincount(ev.ids.reshape(-1).numpy(), minlength=E).tolist()
    assert np.isnan(load[:, 1]).all()
    stats = dict(zip(STAT_NAMES, st, strict=True))
    assert stats["tokens"] == 5 and np.isnan(stats["nonfinite"]) and np.isnan(stats["entropy_sum"])


def test_ids_outside_the_experts_count_as_dropped_never_as_an_expert() -> None:
    """-1 (a sentinel), E and E + 3 land in the dropped columns: no expert's count, weight or clamp."""
    ids = torch.tensor([[0, -1], [3, 4], [7, 2], [-5, -1], [1, 4]])  # E = 4; the last row is padding
    w = torch.tensor([[0.6, 0.4], [0.5, 0.5], [0.7, 0.3], [0.9, 0.1], [0.8, 0.2]])
    valid = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0])
    grid = Grid()
    grid.fill(valid)
    grid.rows[0] = (torch.full((5, K), -1), torch.empty(5, K), torch.full((5, 4), math.nan))
    hot = HotPath([E], torch.device("cpu"), rows=True)
    hot.update(0, RouterEvent(None, ids, w), grid)
    load, st = decode(hot.snapshot()[0].numpy(), E, True)
    stats = dict(zip(STAT_NAMES, st, strict=True))
    assert load[:, 0].tolist() == [1, 0, 1, 1]  # experts 0, 2, 3 once each among real tokens
    np.testing.assert_allclose(load[:, 2], [0.6, 0.0, 0.3, 0.5], rtol=1e-6)
    assert stats["tokens"] == 4 and stats["dropped"] == 5  # -1, 4, 7, -5, -1 of real tokens
    # the token rows keep slot columns: 1 + expert, 0 below the range, E + 1 above (the flush writes NULL)
    assert grid.rows[0][0].tolist() == [[1, 0], [4, 5], [5, 3], [0, 0], [2, 5]]


def test_a_call_without_logits_leaves_the_logit_statistics_unknown() -> None:
    """Counts are exact; prob_sum, entropy, lse and the non-finite count are NaN, not the 0 of nothing added."""
    ev, valid = call()
    grid = Grid()
    grid.fill(valid)
    hot = HotPath([E], torch.device("cpu"))
    hot.update(0, ev, grid)  # with logits
    hot.update(0, RouterEvent(None, ev.ids, ev.weights), grid)  # the same window, one call without
    load, st = decode(hot.snapshot()[0].numpy(), E, True)
    stats = dict(zip(STAT_NAMES, st, strict=True))
    assert load[:, 0].tolist() == (2 * np.bincount(ev.ids[:4].reshape(-1).numpy(), minlength=E)).tolist()
    assert stats["tokens"] == 8 and np.isnan(load[:, 1]).all()
    assert all(np.isnan(stats[n]) for n in ("entropy_sum", "lse_sum", "lse_max", "margin_sum", "nonfinite"))
