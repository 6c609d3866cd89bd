"""RouterSpec `requires`: a spec applies only where the installed distribution meets its requirement."""

from __future__ import annotations

import sys

import pytest

from moescope.capture import specs as S

CASES = [  # (requirement, installed version, met)
    ("transformers>=5", "5.23.0", True),
    ("transformers>=5", "4.57.6", False),
    ("transformers<5", "4.57.6", True),
    ("transformers<5", "5.0.0", False),
    ("transformers>=4.45,<5", "4.45.0", True),
    ("transformers>=4.45,<5", "4.44.2", False),
    ("transformers==4.57.*", "4.57.1", True),
    ("transformers==4.57.*", "4.58.0", False),
    ("transformers!=4.57.*", "4.56.2", True),
    ("transformers~=4.57", "4.99", True),
    ("transformers~=4.57", "5.0", False),
    ("transformers > 4.9", "4.10.0", True),  # numeric, not string, comparison
    ("transformers==5", "5.0.0", True),
]


@pytest.mark.parametrize(("req", "version", "met"), CASES)
def test_satisfies_with_packaging(req: str, version: str, met: bool) -> None:
    pytest.importorskip("packaging.requirements")
    assert S.satisfies(req, version) is met


@pytest.mark.parametrize(("req", "version", "met"), CASES)
def test_satisfies_without_packaging(req: str, version: str, met: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fallback comparator (packaging is not a core dependency) gives the same answers."""
    monkeypatch.setitem(sys.modules, "packaging.requirements", None)  # `import` now raises ImportError
    assert S.satisfies(req, version) is met


@pytest.mark.parametrize("bad", ["", ">=5", "transformers >= five", "transformers>=5;", 5])
def test_bad_requirement_is_a_spec_error(bad: object) -> None:
    with pytest.raises(S.AdapterError, match="requires"):
        S.RouterSpec(family="x", classes=("a.B",), requires=bad)  # type: ignore[arg-type]


def test_spec_applies_only_where_its_requirement_holds() -> None:
    """pytest is installed here: `pytest>=1` holds, `pytest<1` and an absent distribution never do."""
    reg = S.Registry()
    reg.files_loaded = True  # only the specs registered below
    holds = reg.register("mypkg.routers.Router", requires="pytest>=1", family="holds")
    reg.register("mypkg.routers.Router", requires="pytest<1", family="old")
    reg.register("mypkg.routers.Router", requires="no-such-dist-moescope>=0", family="absent")
    assert [s.family for s in reg.all()] == ["holds"]

    class Router:
        pass

    Router.__module__, Router.__qualname__ = "mypkg.routers", "Router"
    assert reg.resolve(Router) is holds  # the later, inactive registrations do not outrank it


def test_selection_norm_binds_per_module() -> None:
    """selection_norm reads a bool attribute of each router module: _norm variant on, plain off."""
    spec = S.RouterSpec(family="x", classes=("a.B",), source="logits", selection="softmax_topk",
                        selection_norm="norm_topk_prob")

    class On:
        norm_topk_prob = True

    class Off:
        norm_topk_prob = False

    assert spec.bind(On()).selection == "softmax_topk_norm"
    assert spec.bind(Off()).selection == "softmax_topk"
    with pytest.raises(S.AdapterError, match="norm_topk_prob"):
        spec.bind(object())
    with pytest.raises(S.AdapterError, match="selection_norm"):
        S.RouterSpec(family="x", classes=("a.B",), source="logits", selection="topk_softmax",
                     selection_norm="norm_topk_prob")
