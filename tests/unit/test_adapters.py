"""Router adapters: spec loading, MRO resolution, registration priority, selection rules, output layouts."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from moescope._paths import content_dir  # noqa: E402
from moescope.capture import adapters as A  # noqa: E402
from moescope.capture import specs as S  # noqa: E402


@pytest.fixture
def clean_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let a test register routers without leaking them into other tests."""
    A.all_specs()  # load the files first, so the copy holds them
    monkeypatch.setattr(S.REGISTRY, "entries", list(S.REGISTRY.entries))


# -- spec loading ----------------------------------------------------------------------------------------------


def test_every_shipped_spec_loads_and_families_are_unique() -> None:
    """All hooks/*.toml parse into RouterSpecs; among specs active together (same `requires`: transformers 4.x and
    5 each have theirs) family names and class names are not claimed twice."""
    specs = A.load_spec_files()
    assert len(specs) >= 40
    assert {s.requires for s in specs if s.module == "transformers.models.*"} == {"transformers>=5", "transformers<5"}
    for req in {s.requires for s in specs}:
        group = [s for s in specs if s.requires in (req, None)]
        families = [s.family for s in group]
        assert len(families) == len(set(families)), sorted(f for f in families if families.count(f) > 1)
        classes = [c for s in group for c in s.classes]
        assert len(classes) == len(set(classes)), sorted(c for c in classes if classes.count(c) > 1)


def test_unknown_field_is_a_clear_error() -> None:
    """A misspelt field names itself and lists the valid ones."""
    with pytest.raises(A.AdapterError, match=r"unknown router spec field\(s\) \['weight'\].*valid fields"):
        A._spec_from_mapping({"classes": ["X"], "ids": 2, "weight": 1}, "x.toml[router 0]")


def test_register_router_rejects_unknown_fields(clean_registry: None) -> None:
    """register_router takes exactly the TOML fields."""
    with pytest.raises(A.AdapterError, match=r"register_router\(MyRouter\).*\['idz'\]"):
        A.register_router("MyRouter", idz=2)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"source": "outputs", "ids": 2}, "source must be one of"),
        ({"ids": 2, "probs": "tanh"}, "probs must be one of"),
        ({"source": "logits", "selection": "top2"}, "selection must be one of"),
        ({"source": "output", "ids": None}, "needs `ids`"),
        ({"ids": 0, "ids_layout": "sorted"}, "ids_layout must be one of"),
        ({"ids": 0, "ids_layout": "sorted_by_expert", "weights": 2}, "needs `expert_sizes`"),
        ({"ids": 2, "logits_are": "scores"}, "logits_are must be one of"),
        ({"ids": 2}, None),
    ],
)
def test_spec_validation(fields: dict[str, object], message: str | None) -> None:
    """Invalid field values fail at load time with the family named."""
    if message is None:
        assert A._spec_from_mapping({"classes": ["R"], **fields}, "t").family == "R"
        return
    with pytest.raises(A.AdapterError, match=re.escape(message)):
        A._spec_from_mapping({"classes": ["R"], "family": "fam", **fields}, "t")


def test_shipped_classes_exist_in_transformers() -> None:
    """Every transformers class named by the specs for the installed version is defined there (no typos)."""
    transformers = pytest.importorskip("transformers")
    root = Path(transformers.__file__).parent / "models"
    defined: set[str] = set()
    for path in root.glob("*/modeling_*.py"):
        defined.update(re.findall(r"^class (\w+)\(", path.read_text(encoding="utf-8"), flags=re.M))
    named = {c for s in A.load_spec_files() if s.module == "transformers.models.*" and s.active() for c in s.classes}
    assert len(named) >= (70 if S.requirement_met("transformers>=5") else 30) and named - defined == set()


def test_standard_family_is_one_classes_entry(tmp_path: Path) -> None:
    """Defaults: logits 0, weights 1, ids 2, softmax; a file's [defaults] apply to each of its routers."""
    (tmp_path / "mine.toml").write_text(
        '[defaults]\nmodule = "mypkg.*"\nprobs = "sigmoid"\n\n'
        '[[router]]\nfamily = "a"\nclasses = ["ARouter"]\n\n'
        '[[router]]\nfamily = "b"\nclasses = ["BRouter"]\nprobs = "softmax"\n'
    )
    a, b = S.load_spec_files(tmp_path)
    assert (a.logits, a.weights, a.ids, a.source, a.module) == (0, 1, 2, "output", "mypkg.*")
    assert (a.probs, b.probs) == ("sigmoid", "softmax")  # the entry's own field beats the file's default
    assert A.describe(a) == "forward hook: ids=output[2], weights=output[1], logits=output[0], sigmoid scores"


def test_spec_files_must_qualify_their_classes(tmp_path: Path) -> None:
    """A bare class name without a module path is refused at load time (it would match any same-named class)."""
    (tmp_path / "bad.toml").write_text('[[router]]\nfamily = "x"\nclasses = ["XRouter"]\n')
    with pytest.raises(A.AdapterError, match=r"bad.toml\[router 0\].*'XRouter' needs a module path"):
        S.load_spec_files(tmp_path)
    (tmp_path / "bad.toml").write_text('[route]\nfamily = "x"\n')
    with pytest.raises(A.AdapterError, match=r"unknown table\(s\) \['route'\]"):
        S.load_spec_files(tmp_path)


def test_shipped_files_are_grouped_by_routing_convention() -> None:
    """One file per convention; the mixtral entry is just family + classes (everything else is a default)."""
    names = {p.stem for p in content_dir("hooks").glob("*.toml")}
    assert {"softmax_topk", "topk_softmax", "sigmoid_topk", "special", "reference"} <= names
    import tomllib

    doc = tomllib.loads((content_dir("hooks") / "softmax_topk.toml").read_text())
    assert next(r for r in doc["router"] if r["family"] == "mixtral") == {
        "family": "mixtral", "classes": ["MixtralTopKRouter"]}
    sig = {s.family: s for s in S.load_spec_files()}
    assert sig["deepseek_v3"].probs == "sigmoid" and sig["gpt_oss"].router_kind == "topk_softmax"


# -- resolution ------------------------------------------------------------------------------------------------

# These tests resolve against the shipped v5 specs (requires = "transformers>=5"); under transformers 4.x those
# are inactive and tests/integration/test_hf_v4_families.py covers the 4.x specs.
V5_SPECS = pytest.mark.skipif(
    not S.requirement_met("transformers>=5"), reason="the shipped v5 specs apply only with transformers>=5 installed"
)


class MixtralTopKRouter(nn.Module):
    """A user class that happens to share transformers' class name: not hooked by accident."""


MixtralTopKRouter.__module__ = "transformers.models.mixtral.modeling_mixtral"  # stands in for transformers' class


class PatchedRouter(MixtralTopKRouter):
    """A user subclass (e.g. a quantised or instrumented router), defined in the user's own module."""


class SameName(nn.Module):
    """Renamed below to transformers' class name, but defined in this test module."""


SameName.__qualname__ = SameName.__name__ = "MixtralTopKRouter"


@V5_SPECS
def test_resolve_by_module_path_and_name_through_the_mro() -> None:
    """The class at transformers' module path matches; a subclass inherits its base's spec; a namesake does not."""
    assert A.resolve(MixtralTopKRouter()).family == "mixtral"
    assert A.resolve(PatchedRouter()).family == "mixtral"
    assert A.resolve(SameName()) is None  # same class name, another module: not hooked by accident
    assert A.resolve(nn.Linear(2, 2)) is None


def test_qualified_names_and_registration_by_string(clean_registry: None) -> None:
    """A qualified class string matches that module only; register_router(cls) registers cls's own module path."""
    spec = A.register_router(f"{__name__}.SameName", family="by-path")
    assert spec.classes == (f"{__name__}.SameName",) and spec.module is None
    assert A.resolve(SameName()) is None  # qualname is MixtralTopKRouter now: the path names another class
    own = A.register_router(SameName, family="own")
    assert own.classes == (f"{__name__}.MixtralTopKRouter",)
    assert A.resolve(SameName()) is own


@V5_SPECS
def test_register_router_wins_over_files(clean_registry: None) -> None:
    """A user registration beats the shipped spec for the same class; the exact class beats a base's spec."""
    own = A.register_router(PatchedRouter, family="patched", ids=0, logits=None)
    assert A.resolve(PatchedRouter()) is own
    assert A.resolve(MixtralTopKRouter()).family == "mixtral"  # the file spec still serves the base
    spec = A.register_router(MixtralTopKRouter, family="mine", logits=0, weights=1, ids=2, probs="sigmoid")
    assert A.resolve(MixtralTopKRouter()) is spec
    # registered later (higher priority) for the base, but the MRO walk meets the subclass's own spec first
    assert A.resolve(PatchedRouter()) is own
    assert A.all_specs()[0] is spec  # highest priority first


@V5_SPECS
def test_router_shape_reads_dotted_attributes_and_the_parent() -> None:
    """DBRX: n_experts from `layer.out_features`, top_k from the parent block."""
    spec = next(s for s in A.all_specs() if s.family == "dbrx")
    router = nn.Module()
    router.layer = nn.Linear(4, 6, bias=False)
    parent = nn.Module()
    parent.top_k = 2
    assert A.router_shape(router, spec, parent) == (6, 2)


# -- selection rules -------------------------------------------------------------------------------------------

LOGITS = torch.tensor([[2.0, 0.0, 1.0, -1.0]])


def _softmax(xs: list[float]) -> list[float]:
    z = sum(math.exp(x) for x in xs)
    return [math.exp(x) / z for x in xs]


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


@pytest.mark.parametrize(
    ("rule", "weights"),
    [
        ("softmax_topk", [_softmax([2, 0, 1, -1])[0], _softmax([2, 0, 1, -1])[2]]),
        ("softmax_topk_norm", _softmax([2, 1])),
        ("sigmoid_topk", [_sig(2), _sig(1)]),
        ("sigmoid_topk_norm", [_sig(2) / (_sig(2) + _sig(1)), _sig(1) / (_sig(2) + _sig(1))]),
        ("topk_softmax", _softmax([2, 1])),
        ("topk_sigmoid", [_sig(2), _sig(1)]),
    ],
)
def test_select_known_answers(rule: str, weights: list[float]) -> None:
    """Every rule picks experts 2.0 → id 0 and 1.0 → id 2, in that slot order, with its own gate weights."""
    ids, w = A.select(LOGITS, 2, rule)
    assert ids.tolist() == [[0, 2]]
    torch.testing.assert_close(w, torch.tensor([weights]), rtol=1e-6, atol=1e-7)


def test_select_unknown_rule() -> None:
    """A rule name that does not exist is an error, not a silent softmax."""
    with pytest.raises(A.AdapterError, match="unknown selection rule"):
        A.select(LOGITS, 2, "softmax-topk")


# -- output layouts --------------------------------------------------------------------------------------------


def _spec(**fields: object) -> A.RouterSpec:
    return A._spec_from_mapping({"classes": ["T"], **fields}, "test")


def test_output_tuple_is_flattened_over_batch_and_sequence() -> None:
    """(logits [B, S, E], weights [B, S, k], ids [B, S, k]) → T = B·S rows."""
    logits = torch.randn(2, 3, 4)
    w, ids = torch.rand(2, 3, 2), torch.randint(0, 4, (2, 3, 2))
    ev = A.extract_router_output(_spec(logits=0, weights=1, ids=2), (logits, w, ids), 4, 2)
    assert ev is not None and ev.logits.shape == (6, 4) and ev.dropped is None
    assert torch.equal(ev.ids, ids.reshape(6, 2)) and torch.equal(ev.weights, w.reshape(6, 2))


def test_dense_weights_are_gathered_at_the_ids() -> None:
    """A dense [T, E] gate matrix (zeros off the selection) gives each selected expert's weight."""
    dense = torch.tensor([[0.0, 0.7, 0.0, 0.3]])
    ids = torch.tensor([[1, 3]])
    ev = A.extract_router_output(_spec(logits=None, weights=0, ids=1), (dense, ids), 4, 2)
    assert ev is not None and ev.weights.tolist() == [[pytest.approx(0.7), pytest.approx(0.3)]]


def test_onehot_dispatch_with_dropped_tokens() -> None:
    """Switch: all-zero rows are dropped tokens, stored with the expert they chose (argmax of logits)."""
    mask = torch.tensor([[0, 1, 0], [0, 0, 0], [1, 0, 0]])  # token 1 dropped over capacity
    prob = torch.tensor([[0.5], [0.6], [0.7]])
    logits = torch.tensor([[0.0, 3.0, 0.0], [0.0, 0.0, 2.0], [1.0, 0.0, 0.0]])
    spec = _spec(ids=0, weights=1, logits=2, onehot=True, top_k=1)
    ev = A.extract_router_output(spec, (mask, prob, logits), 3, 1)
    assert ev is not None
    assert ev.ids.tolist() == [[1], [2], [0]]
    assert ev.dropped is not None and ev.dropped.tolist() == [False, True, False]
    assert ev.weights.reshape(-1).tolist() == pytest.approx([0.5, 0.6, 0.7])
    # without logits the dropped token's choice is unknown: expert 0, still flagged dropped
    ev = A.extract_router_output(_spec(ids=0, weights=1, logits=None, onehot=True), (mask, prob), 3, 1)
    assert ev is not None and ev.ids.tolist() == [[1], [0], [0]] and ev.dropped.tolist() == [False, True, False]


def test_sorted_by_expert_layout_is_unsorted() -> None:
    """JetMoE: slots sorted by expert (with per-expert sizes) map back to [T, k] in the router's slot order."""
    ids = torch.tensor([[2, 0], [1, 2], [0, 1]])  # T=3, k=2
    gates = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.9, 0.1]])
    order = ids.reshape(-1).argsort(stable=True)  # slot index of each sorted position
    sizes = torch.bincount(ids.reshape(-1), minlength=4).tolist()  # a list, as JetMoE returns it
    logits = torch.randn(3, 4)
    out = (order, order // 2, gates.reshape(-1)[order], sizes, logits)
    spec = _spec(ids=0, weights=2, expert_sizes=3, logits=4, ids_layout="sorted_by_expert")
    ev = A.extract_router_output(spec, out, 4, 2)
    assert ev is not None and torch.equal(ev.ids, ids) and torch.equal(ev.weights, gates)
    assert torch.equal(ev.logits, logits)


def test_probabilities_in_place_of_logits() -> None:
    """Gemma 4: output[0] holds softmax probabilities; their log has the same softmax and lse 0."""
    logits = torch.randn(5, 4)
    probs = torch.softmax(logits, -1)
    ev = A.extract_router_output(_spec(logits=0, weights=1, ids=2, logits_are="probs"), (probs, probs, probs), 4, 2)
    assert ev is not None
    torch.testing.assert_close(torch.softmax(ev.logits, -1), probs)
    torch.testing.assert_close(torch.logsumexp(ev.logits, -1), torch.zeros(5), atol=1e-6, rtol=0)


def test_no_logits_in_the_output() -> None:
    """Doge: output[1] holds per-key logits, not per-expert ones: logits_are='none' keeps them out of the event."""
    spec = _spec(source="experts_input", logits=1, logits_are="none")
    ev = A.extract_router_output(spec, (torch.zeros(2, 3), torch.randn(2, 6, 4)), 16, 2)
    assert ev is not None and ev.logits is None and ev.ids.shape == (0, 2)
    assert "logits" not in A.describe(spec)


def test_skip_expert_slots_are_stored_as_the_last_class() -> None:
    """Zaya: a slot masked to (id 0, weight 0) is the skip class E; a real expert 0 keeps its id."""
    ids = torch.tensor([[0], [0], [3]])
    w = torch.tensor([[0.0], [0.4], [0.2]])
    ev = A.extract_router_output(_spec(logits=None, weights=0, ids=1, skip_expert=True), (w, ids), 5, 1)
    assert ev is not None and ev.ids.tolist() == [[4], [0], [3]]


def test_logits_source_applies_the_named_rule() -> None:
    """Llama 4: logits at output[1], ids/weights by topk_sigmoid."""
    spec = _spec(source="logits", logits=1, selection="topk_sigmoid")
    ev = A.extract_router_output(spec, (torch.zeros(1, 4), LOGITS), 4, 2)
    assert ev is not None and ev.ids.tolist() == [[0, 2]]
    with pytest.raises(A.AdapterError, match="no logits"):
        A.extract_router_output(_spec(source="logits", logits=3), (LOGITS,), 4, 2)


def test_missing_output_entries_are_errors() -> None:
    """A spec whose indices do not fit the output says which entry is missing."""
    with pytest.raises(A.AdapterError, match="no ids at index 2"):
        A.extract_router_output(_spec(logits=0, ids=2), (LOGITS,), 4, 2)
    with pytest.raises(A.AdapterError, match="no weights at index 5"):
        A.extract_router_output(_spec(logits=0, ids=1, weights=5), (LOGITS, torch.tensor([[0, 2]])), 4, 2)


def test_experts_input_reads_ids_and_weights() -> None:
    """DBRX: experts(hidden, top_k_index, top_k_weights) as positional arguments, or by keyword."""
    spec = next(s for s in A.all_specs() if s.family == "dbrx")
    ids = torch.tensor([[1, 0], [2, 3]])
    w = torch.tensor([[0.6, 0.4], [0.5, 0.5]])
    got_ids, got_w = A.extract_experts_input(spec, (torch.zeros(2, 8), ids, w), {}, 4)
    assert torch.equal(got_ids, ids) and torch.equal(got_w, w)
    kw = A._spec_from_mapping(
        {"classes": ["K"], "source": "experts_input", "experts_ids": "top_k_index", "experts_weights": "w"}, "t"
    )
    got_ids, got_w = A.extract_experts_input(kw, (), {"top_k_index": ids}, 4)
    assert torch.equal(got_ids, ids) and torch.equal(got_w, torch.ones(2, 2))
    with pytest.raises(A.AdapterError, match="no ids tensor"):
        A.extract_experts_input(spec, (torch.zeros(2, 8),), {}, 4)


@V5_SPECS
def test_describe_says_how_each_source_is_hooked() -> None:
    """One line per spec, naming where ids, weights and logits come from."""
    by_family = {s.family: s for s in A.all_specs()}
    assert A.describe(by_family["mixtral"]) == "forward hook: ids=output[2], weights=output[1], logits=output[0]"
    assert "one-hot dispatch" in A.describe(by_family["switch_transformers"])
    assert "sorted by expert" in A.describe(by_family["jetmoe"])
    assert "pre-hook on 'experts'" in A.describe(by_family["dbrx"])
    assert "topk_sigmoid" in A.describe(by_family["llama4"])
    assert A.describe(by_family["gemma4"]).endswith("(probabilities)")
