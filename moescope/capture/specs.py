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
IDS_LAYOUTS = ("topk", "sorted_by_expert")
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
    ids_layout: str = "topk"  # "topk": ids [T, k]; "sorted_by_expert": JetMoE (slot order, gates, sizes by expert)
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
        if self.ids_layout == "sorted_by_expert" and (self.expert_sizes is None or self.weights is None):
            raise AdapterError(
                f"router spec {self.family!r}: ids_layout='sorted_by_expert' needs `expert_sizes` and `weights`"
            )
        if self.logits_are not in LOGITS_ARE:
            raise AdapterError(
                f"router spec {self.family!r}: logits_are must be one of {LOGITS_ARE}, got {self.logits_are!r}"
            )

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

    def all(self) -> list[RouterSpec]:
        """Every known spec, highest priority first."""
        self._ensure_loaded()
        return [s for s, _ in sorted(self.entries, key=lambda sp: -sp[1])]

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
