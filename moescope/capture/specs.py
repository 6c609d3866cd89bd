"""Router specs: the schema of hooks/*.toml, their defaults, loading, registration and class matching.

A spec file groups the families that route the same way. Its optional `[defaults]` table applies to every
`[[router]]` in the file; RouterSpec's own defaults cover the standard transformers v5 layout (the router's
forward returns `(logits [T, E], weights [T, k], ids [T, k])`: logits = 0, weights = 1, ids = 2, softmax
probabilities), so a standard family is one entry:

    [defaults]
    module = "transformers.models.*"      # classes below are matched only in modules matching this glob

    [[router]]
    family = "mixtral"
    classes = ["MixtralTopKRouter"]

Classes match by module path and name, never by bare name alone: an entry is either a qualified name
("transformers.models.mixtral.modeling_mixtral.MixtralTopKRouter", globs allowed) or a bare class name
qualified by the spec's `module` glob. So a user's own class that happens to be called `MixtralTopKRouter`
is not hooked by accident. Shipped files must qualify every class; `register_router(MyRouter)` registers the
class's own qualified name. Nothing here needs torch.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import re
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from .. import _toml
from .._paths import content_dir

SOURCES = ("output", "experts_input", "logits")
SELECTIONS = (
    "softmax_topk",
    "softmax_topk_norm",
    "sigmoid_topk",
    "sigmoid_topk_norm",
    "topk_softmax",
    "topk_sigmoid",
)
PROBS = ("softmax", "sigmoid")
#: How the ids a spec reads are laid out (README "Custom routers" has one worked example per layout):
#: "topk" ids [T, k]; "k_first" ids [k, T] (DeepSpeed); "routing_map" a [T, E] bool/0-1 mask (Megatron-Core),
#: 0..E experts per token; "dispatch" a dispatch mask with a capacity axis [..., E, C] (GShard, lucidrains),
#: its combine tensor (same shape) at `weights`; "sorted_by_expert" JetMoE's slots sorted by expert + sizes.
IDS_LAYOUTS = ("topk", "k_first", "routing_map", "dispatch", "sorted_by_expert")
#: Token order of the router's rows: "batch_first" [B, S] (flattened b*S + s), "seq_first" [S, B] (Megatron).
TOKEN_LAYOUTS = ("batch_first", "seq_first")
LOGITS_ARE = ("logits", "probs", "none")


class AdapterError(ValueError):
    """A router spec is invalid or a router output does not match its spec."""


@dataclass(frozen=True)
class RouterSpec:
    """How to read one router family's decisions. Field names are those of hooks/*.toml."""

    family: str
    classes: tuple[str, ...]
    # glob on the defining module of bare class names in `classes` (e.g. "transformers.models.*"); None: bare
    # names match in any module (only for register_router("Name"); shipped files must qualify their classes)
    module: str | None = None
    source: str = "output"
    logits: int | None = 0  # index of the logits in the router output; None: the output is the logits tensor
    weights: int | None = 1  # index of the gate weights in the router output
    ids: int | None = 2  # index of the selected expert ids (or, with onehot, the dispatch mask)
    # ids are a one-hot dispatch mask [..., E]; all-zero rows are tokens dropped over capacity, stored with the
    # expert they chose (argmax of the logits, the router's own choice before the capacity cut) and counted in `dropped`
    onehot: bool = False
    ids_layout: str = "topk"  # one of IDS_LAYOUTS: how the ids (and, for masks, the weights) are laid out
    # an id meaning "no expert" (DeepSpeed's -1 for a route dropped over capacity): counted as dropped, never as
    # an expert; any other id outside [0, n_experts) is an error at the router's first call
    sentinel: int | None = None
    token_layout: str = "batch_first"  # "seq_first": rows are [S, B] ordered and reordered to the input's [B, S]
    # path of a submodule of the router whose output is the logits (torchtitan's `gate`), for routers that do not
    # return them; `logits_are` and `probs` apply to what is read there
    logits_from: str | None = None
    # escape hatch: "pkg.module:function" (TOML) or a callable (register_router), called as
    # fn(module, args, output) -> (logits [T, E] or None, ids [T, k] long with -1 = no expert, weights [T, k] or None)
    ids_fn: Any = None
    expert_sizes: int | None = None  # sorted_by_expert: index of the per-expert slot counts in the output
    # "probs": the output holds softmax probabilities (their log is stored as logits); "none": no per-expert logits
    logits_are: str = "logits"
    skip_expert: bool = False  # last logits column is a skip class the router masks to (id 0, weight 0)
    weights_from: str = "output"  # "output", "probs" (probability of each selected expert), "ones"
    selection: str = "softmax_topk"  # for source="logits", and to fill missing weights
    probs: str = "softmax"  # how router probabilities follow from logits (for prob_sum and entropy)
    n_experts: Any = "num_experts"  # attribute name(s) on the router module, or an int
    top_k: Any = "top_k"
    experts: str = "experts"  # path of the experts module, relative to the router's parent
    experts_ids: Any = 1  # positional index or keyword of the ids in the experts forward (experts_input)
    experts_weights: Any = 2
    router_kind: str = "softmax_topk"
    parent_n_experts: Any = None  # attribute names looked up on the parent block when the router lacks them
    parent_top_k: Any = None
    # a PEP 508 requirement on an installed distribution ("transformers>=5"): the spec is matched only where it
    # holds, so one class name can have a spec per major version of its library (hooks/transformers_v4.toml)
    requires: str | None = None
    # bool attribute of the hooked module that switches the selection's renormalisation (transformers v4's
    # `norm_topk_prob`): true → the "_norm" variant of `selection`, false → without; read per module (bind)
    selection_norm: str | None = None
    # numeric router settings a flight dump keeps with the evidence, beside the common names flight.SETTINGS finds
    # by itself: dotted attribute paths from the router module ("capacity_factor", "config.moe_router_topk_scaling_
    # factor"), or from its parent block with a "parent." prefix ("parent.router_jitter_noise")
    settings: tuple[str, ...] = ()
    notes: str = ""

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise AdapterError(f"router spec {self.family!r}: source must be one of {SOURCES}, got {self.source!r}")
        if self.probs not in PROBS:
            raise AdapterError(f"router spec {self.family!r}: probs must be one of {PROBS}, got {self.probs!r}")
        if self.selection not in SELECTIONS:
            raise AdapterError(
                f"router spec {self.family!r}: selection must be one of {SELECTIONS}, got {self.selection!r}"
            )
        if self.source == "output" and self.ids is None:
            raise AdapterError(f"router spec {self.family!r}: source='output' needs `ids` (index in the output)")
        if self.ids_layout not in IDS_LAYOUTS:
            raise AdapterError(
                f"router spec {self.family!r}: ids_layout must be one of {IDS_LAYOUTS}, got {self.ids_layout!r}"
            )
        if self.token_layout not in TOKEN_LAYOUTS:
            raise AdapterError(f"router spec {self.family!r}: token_layout must be one of {TOKEN_LAYOUTS}, "
                               f"got {self.token_layout!r}")
        if self.sentinel is not None and (isinstance(self.sentinel, bool) or not isinstance(self.sentinel, int)):
            raise AdapterError(f"router spec {self.family!r}: sentinel must be an integer id (e.g. -1) or unset, "
                               f"got {self.sentinel!r}")
        if self.logits_from is not None and (not isinstance(self.logits_from, str) or not self.logits_from):
            raise AdapterError(f"router spec {self.family!r}: logits_from must be the dotted path of a submodule of "
                               f"the router (e.g. \"gate\"), got {self.logits_from!r}")
        if self.ids_fn is not None and not callable(self.ids_fn) and not (
            isinstance(self.ids_fn, str) and _FN_PATH.fullmatch(self.ids_fn)
        ):
            raise AdapterError(f"router spec {self.family!r}: ids_fn must be \"pkg.module:function\" or a callable, "
                               f"got {self.ids_fn!r}")
        if self.ids_fn is not None and self.source != "output":
            raise AdapterError(f"router spec {self.family!r}: ids_fn reads the router's forward; it needs "
                               f"source = \"output\", got {self.source!r}")
        if self.ids_layout in ("routing_map", "dispatch", "k_first") and (self.onehot or self.source != "output"):
            raise AdapterError(f"router spec {self.family!r}: ids_layout={self.ids_layout!r} reads the router output "
                               "(source = \"output\") and replaces `onehot`; unset onehot")
        if self.ids_layout == "sorted_by_expert" and (self.expert_sizes is None or self.weights is None):
            raise AdapterError(
                f"router spec {self.family!r}: ids_layout='sorted_by_expert' needs `expert_sizes` and `weights`"
            )
        if self.logits_are not in LOGITS_ARE:
            raise AdapterError(
                f"router spec {self.family!r}: logits_are must be one of {LOGITS_ARE}, got {self.logits_are!r}"
            )
        if self.requires is not None:
            parse_requirement(self.requires, f"router spec {self.family!r}")
        if self.selection_norm is not None and (
            not isinstance(self.selection_norm, str) or f"{_base_selection(self.selection)}_norm" not in SELECTIONS
        ):
            raise AdapterError(f"router spec {self.family!r}: selection_norm names a bool attribute of the router "
                               f"(e.g. \"norm_topk_prob\") and needs a selection with a _norm variant "
                               f"({[s for s in SELECTIONS if s.endswith('_norm')]}), got {self.selection!r}")

        if not isinstance(self.settings, tuple) or not all(
            isinstance(n, str) and _ATTR_PATH.fullmatch(n) for n in self.settings
        ):
            raise AdapterError(f"router spec {self.family!r}: settings must be a list of attribute paths such as "
                               f"\"temperature\", \"config.router_temperature\" or \"parent.jitter_noise\", "
                               f"got {self.settings!r}")

    def active(self) -> bool:
        """Whether this spec applies here: its `requires` holds (always, without one)."""
        return self.requires is None or requirement_met(self.requires)

    def bind(self, module: Any) -> RouterSpec:
        """The spec as it applies to one router module: `selection_norm` resolved from the module's attribute."""
        if self.selection_norm is None:
            return self
        flag = getattr(module, self.selection_norm, None)
        if not isinstance(flag, (bool, int)):
            raise AdapterError(f"router spec {self.family!r}: {type(module).__name__} has no bool attribute "
                               f"{self.selection_norm!r} (spec field selection_norm)")
        base = _base_selection(self.selection)
        return dataclasses.replace(self, selection=f"{base}_norm" if flag else base, selection_norm=None)

    def matches(self, klass: type) -> bool:
        """Whether `klass` itself (not its bases) is one of this spec's classes, by module path and name."""
        qualified = f"{klass.__module__}.{klass.__qualname__}"
        for c in self.classes:
            if "." in c:
                if fnmatchcase(qualified, c):
                    return True
            elif c == klass.__qualname__ and (self.module is None or fnmatchcase(klass.__module__, self.module)):
                return True
        return False


FIELDS = {f.name for f in dataclasses.fields(RouterSpec)}


def _base_selection(selection: str) -> str:
    return selection[: -len("_norm")] if selection.endswith("_norm") else selection


# `requires`: "name", then comma-separated PEP 440 clauses (the subset the fallback comparator understands)
_REQ = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(.*?)\s*")
_CLAUSE = re.compile(r"\s*(~=|===|==|!=|<=|>=|<|>)\s*([0-9][0-9A-Za-z.+!-]*(?:\.\*)?)\s*")


def parse_requirement(requirement: str, origin: str = "requires") -> tuple[str, list[tuple[str, str]]]:
    """(distribution name, [(operator, version)]) of a requirement such as "transformers>=4.45,<5"."""
    m = _REQ.fullmatch(requirement) if isinstance(requirement, str) else None
    clauses = [_CLAUSE.fullmatch(c) for c in m.group(2).split(",")] if m and m.group(2) else []
    if m is None or not all(clauses):
        raise AdapterError(f"{origin}: requires must be a requirement such as \"transformers>=5\", "
                           f"got {requirement!r}")
    return m.group(1), [(c.group(1), c.group(2)) for c in clauses if c is not None]


def _release(version: str) -> tuple[int, ...]:
    """The release numbers of a version ("4.57.1.dev0" -> (4, 57, 1)); pre/dev/local parts are ignored."""
    m = re.match(r"\d+(?:\.\d+)*", version)
    return tuple(int(p) for p in m.group(0).split(".")) if m else ()


def _clause_holds(op: str, want: str, have: tuple[int, ...]) -> bool:
    if want.endswith(".*"):  # ==4.57.* / !=4.*: prefix match on the release numbers
        prefix = _release(want[:-2])
        return (have[: len(prefix)] == prefix) == (op == "==")
    w = _release(want)
    n = max(len(w), len(have))
    a, b = have + (0,) * (n - len(have)), w + (0,) * (n - len(w))
    if op == "~=":
        return a >= b and a[: len(w) - 1] == w[:-1]
    return {"==": a == b, "===": a == b, "!=": a != b, "<=": a <= b, ">=": a >= b, "<": a < b, ">": a > b}[op]


def satisfies(requirement: str, version: str) -> bool:
    """Whether `version` of the requirement's distribution meets it (packaging where installed, else a comparator)."""
    _, clauses = parse_requirement(requirement)
    try:
        from packaging.requirements import Requirement
    except ImportError:  # packaging is not a core dependency: release-number comparison covers "pkg>=5" etc.
        have = _release(version)
        return all(_clause_holds(op, want, have) for op, want in clauses)
    return Requirement(requirement).specifier.contains(version, prereleases=True)


@functools.cache
def requirement_met(requirement: str) -> bool:
    """Whether the installed distribution meets `requirement`; a distribution that is not installed never does."""
    name, _ = parse_requirement(requirement)
    try:
        version = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return satisfies(requirement, version)
#: "pkg.module:function" for ids_fn in TOML
_FN_PATH = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")
#: a dotted attribute path (settings)
_ATTR_PATH = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")


def spec_from_mapping(d: dict[str, Any], origin: str) -> RouterSpec:
    """A RouterSpec from TOML-style fields; unknown fields and bad values name `origin`."""
    unknown = sorted(set(d) - FIELDS)
    if unknown:
        raise AdapterError(f"{origin}: unknown router spec field(s) {unknown}; valid fields: {sorted(FIELDS)}")
    d = dict(d)
    classes = d.get("classes")
    if isinstance(classes, str):
        classes = [classes]
    if not classes:
        raise AdapterError(f"{origin}: router spec needs `classes`")
    d["classes"] = tuple(classes)
    if isinstance(d.get("settings"), (list, str)):
        d["settings"] = tuple([d["settings"]] if isinstance(d["settings"], str) else d["settings"])
    d.setdefault("family", d["classes"][0].rsplit(".", 1)[-1])
    return RouterSpec(**d)


def load_spec_file(path: Path) -> list[RouterSpec]:
    """The specs of one hooks/*.toml file, its `[defaults]` applied; every class must be qualified."""
    try:
        doc = _toml.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, _toml.TOMLDecodeError) as e:
        raise AdapterError(f"{path}: cannot read router specs ({e})") from None
    extra = sorted(set(doc) - {"defaults", "router"})
    if extra:
        raise AdapterError(f"{path.name}: unknown table(s) {extra}; a spec file holds [defaults] and [[router]]")
    defaults = doc.get("defaults", {})
    specs = []
    for i, entry in enumerate(doc.get("router", [])):
        origin = f"{path.name}[router {i}]"
        spec = spec_from_mapping({**defaults, **entry}, origin)
        bare = [c for c in spec.classes if "." not in c]
        if bare and spec.module is None:
            raise AdapterError(f"{origin}: class {bare[0]!r} needs a module path (a qualified name, or `module = "
                               '"package.*"` in the entry or [defaults]) so same-named user classes are not hooked')
        specs.append(spec)
    return specs


def load_spec_files(folder: Path | None = None) -> list[RouterSpec]:
    """Read every hooks/*.toml spec shipped with moescope (or in `folder`)."""
    folder = folder or content_dir("hooks")
    return [s for path in sorted(folder.glob("*.toml")) for s in load_spec_file(path)]


class Registry:
    """Known specs with priorities: shipped files load lazily at priority 0; each registration outranks the last."""

    def __init__(self) -> None:
        self.entries: list[tuple[RouterSpec, int]] = []
        self.files_loaded = False

    def _ensure_loaded(self) -> None:
        if not self.files_loaded:
            self.entries.extend((s, 0) for s in load_spec_files())
            self.files_loaded = True

    def register(self, cls: type | str, **fields: Any) -> RouterSpec:
        """Register a user router class (or qualified name) with the fields of a hooks/*.toml spec."""
        self._ensure_loaded()
        name = cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"
        fields.setdefault("family", name.rsplit(".", 1)[-1])
        s = spec_from_mapping({"classes": [name], **fields}, f"register_router({name})")
        self.entries.append((s, 1 + len(self.entries)))
        return s

    def unregister(self, cls: type | str) -> int:
        """Remove the registrations of a class (or qualified name, or family name); returns how many were removed.

        Shipped specs are matched by family name only, so `unregister("mixtral")` stops moescope hooking Mixtral.
        """
        self._ensure_loaded()
        name = cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"
        # a class name removes your registrations (priority > 0) only; shipped specs go by their family name
        keep = [(s, p) for s, p in self.entries if not ((p > 0 and name in s.classes) or s.family == name)]
        removed = len(self.entries) - len(keep)
        if not removed:
            known = sorted({s.family for s, _ in self.entries})
            raise AdapterError(f"unregister_router({name}): no registered class or family of that name; "
                               f"families: {known}")
        self.entries = keep
        return removed

    def all(self) -> list[RouterSpec]:
        """Every known spec, highest priority first."""
        self._ensure_loaded()
        return [s for s, _ in sorted(self.entries, key=lambda sp: -sp[1]) if s.active()]

    def resolve(self, klass: type, stop: tuple[type, ...] = (object,)) -> RouterSpec | None:
        """The spec for a class, through its MRO (the class itself first, then its bases; highest priority wins)."""
        specs = self.all()
        for k in klass.__mro__:
            if k in stop:
                break
            for s in specs:
                if s.matches(k):
                    return s
        return None


#: The process-wide registry `moescope.register_router` writes to and the recorder resolves from.
REGISTRY = Registry()
