"""The recorder's record of flushed (step, tag) keys: exact membership, kept as a few ranges per tag."""

from __future__ import annotations

import random

import pytest

pytest.importorskip("torch")

from moescope.capture.recorder import WrittenKeys  # noqa: E402


def test_membership_equals_a_set_of_keys() -> None:
    rng = random.Random(0)
    keys, ref = WrittenKeys(), set()
    for _ in range(3000):
        step, tag = rng.randint(0, 200), rng.choice(["", "eval"])
        keys.add(step, tag)
        ref.add((step, tag))
        q = (rng.randint(-3, 205), rng.choice(["", "eval", "other"]))
        assert (q in keys) == (q in ref), q


def test_a_long_run_is_one_range_per_tag() -> None:
    keys = WrittenKeys()
    for step in range(100_000):
        keys.add(step, "")
        if step % 50 == 0:
            keys.add(step, "eval")
    assert keys._ranges[""] == [[0, 99_999]]  # one range, not 100k entries
    assert (99_999, "") in keys and (100_000, "") not in keys
    assert (50, "eval") in keys and (51, "eval") not in keys
