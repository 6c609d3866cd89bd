"""The import graph of moescope: no cycles, and the rooms of docs/ARCHITECTURE.md import only what they may.

The graph is read from the AST of every module (no code runs). Cycles are checked on module-level imports
(top-level statements, including those under a module-level `if`/`try`), with relative imports resolved and
importing `a.b.c` counted as importing the packages `a.b` and `a` that Python initialises first. Imports
inside functions run lazily, after every module involved has loaded, so they cannot form an import-time
cycle and are left out of the cycle check; `if TYPE_CHECKING:` blocks never run and are left out too. The room
rules (no torch, no capture) are checked on every import, lazy ones included: a lazy torch import on a
trace-reading path still breaks a machine without torch.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "moescope"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _walk(body: list[ast.stmt], top: bool) -> Iterator[tuple[ast.stmt, bool]]:
    """Every import statement with whether it runs at module import time (top)."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, top
        elif isinstance(node, ast.If):
            if _is_type_checking(node):
                continue
            yield from _walk(node.body, top)
            yield from _walk(node.orelse, top)
        elif isinstance(node, ast.Try):
            for part in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                yield from _walk(part, top)
        elif isinstance(node, (ast.With, ast.For, ast.While)):
            yield from _walk(node.body, top)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            # A class body runs at import time; a function body does not.
            yield from _walk(node.body, top and isinstance(node, ast.ClassDef))


def _targets(node: ast.stmt, module: str, is_pkg: bool, known: set[str]) -> list[str]:
    """Absolute names a statement imports (for `from X import Y`: X.Y where that is a module, else X)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    assert isinstance(node, ast.ImportFrom)
    if node.level:
        base = module.split(".") if is_pkg else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        src = ".".join(base + ([node.module] if node.module else []))
    else:
        src = node.module or ""
    out = [src]
    for a in node.names:
        if f"{src}.{a.name}" in known:
            out.append(f"{src}.{a.name}")
    return out


def _graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(module-level edges between moescope modules, every import of each module incl. lazy and external)."""
    files = {_module_name(p): p for p in PKG.rglob("*.py")}
    known = set(files)
    edges: dict[str, set[str]] = {m: set() for m in files}
    every: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node, top in _walk(tree.body, True):
            for target in _targets(node, mod, path.name == "__init__.py", known):
                every[mod].add(target)
                if not top or not target.startswith("moescope"):
                    continue
                # Importing a.b.c initialises a, then a.b: edges to each package not already above the importer.
                parts = target.split(".")
                for i in range(1, len(parts) + 1):
                    name = ".".join(parts[:i])
                    if name in known and name != mod and not mod.startswith(name + "."):
                        edges[mod].add(name)
    return edges, every


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan), as sorted lists."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in edges.get(v, ()):
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_graph_is_read() -> None:
    edges, every = _graph()
    assert "moescope.analysis.rules.base" in edges["moescope.analysis.rules.load"]
    assert "moescope.analysis.rules" in edges["moescope.capture.alerts"]
    assert "torch" in every["moescope.capture.recorder"]


def test_no_import_cycles() -> None:
    edges, _ = _graph()
    assert _cycles(edges) == []


def test_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


#: Rooms that read traces: no torch anywhere in them (a machine that checks traces has none).
NO_TORCH = ("moescope.format", "moescope.analysis", "moescope.check", "moescope.dashboard", "moescope.config",
            "moescope.integrations._scalars", "moescope.testing")
#: Command modules that legitimately need torch (they train or inspect models).
TORCH_COMMANDS = ("moescope.commands.demo", "moescope.commands.inspect")
#: room -> moescope packages it must not import (docs/ARCHITECTURE.md "Rooms and what each may import").
FORBIDDEN = {
    "moescope.format": ("moescope.analysis", "moescope.capture", "moescope.check", "moescope.commands",
                        "moescope.dashboard", "moescope.integrations", "moescope.reference", "moescope.config"),
    "moescope.analysis": ("moescope.capture", "moescope.check", "moescope.commands", "moescope.dashboard",
                          "moescope.integrations", "moescope.reference"),
    "moescope.check": ("moescope.capture", "moescope.commands", "moescope.dashboard", "moescope.integrations",
                       "moescope.reference"),
    "moescope.dashboard": ("moescope.capture", "moescope.check", "moescope.integrations", "moescope.reference"),
    "moescope.capture": ("moescope.check", "moescope.commands", "moescope.dashboard", "moescope.integrations",
                         "moescope.reference"),
    "moescope.integrations": ("moescope.check", "moescope.commands", "moescope.dashboard", "moescope.reference"),
    # Design rule 6: the reference model (and its data) know nothing about moescope. The demo scenarios in
    # moescope.reference.scenarios drive `moescope.record` through the public API (a lazy import), by design.
    "moescope.reference.model": ("moescope",),
    "moescope.reference.data": ("moescope",),
}


def _in(mod: str, room: str) -> bool:
    return mod == room or mod.startswith(room + ".")


@pytest.mark.parametrize("room", sorted(FORBIDDEN))
def test_room_imports(room: str) -> None:
    _, every = _graph()
    bad = []
    for mod, targets in every.items():
        if not _in(mod, room):
            continue
        for t in targets:
            for f in FORBIDDEN[room]:
                if _in(t, f) and not (room.startswith("moescope.reference") and _in(t, "moescope.reference")):
                    bad.append(f"{mod} imports {t}")
    assert bad == []


def test_capture_reads_only_the_pure_rules_of_analysis() -> None:
    _, every = _graph()
    bad = [f"{m} imports {t}" for m, ts in every.items() if _in(m, "moescope.capture") for t in ts
           if _in(t, "moescope.analysis") and not _in(t, "moescope.analysis.rules")]
    assert bad == []
    # and the rules themselves stay pure: no duckdb, no torch, no other analysis module
    rules = [f"{m} imports {t}" for m, ts in every.items() if _in(m, "moescope.analysis.rules") for t in ts
             if t.split(".")[0] in ("duckdb", "torch", "pandas") or (_in(t, "moescope") and not _in(t, "moescope.analysis.rules"))]
    assert rules == []


def test_trace_reading_rooms_never_import_torch() -> None:
    _, every = _graph()
    bad = []
    for mod, targets in every.items():
        reads = any(_in(mod, r) for r in NO_TORCH) or (_in(mod, "moescope.commands") and mod not in TORCH_COMMANDS)
        if reads:
            bad += [f"{mod} imports {t}" for t in targets if t.split(".")[0] == "torch"]
    assert bad == []


def _all_names(mod: str) -> set[str]:
    """Every moescope module `mod` names in an import, lazy and TYPE_CHECKING ones included."""
    path = next(p for p in PKG.rglob("*.py") if _module_name(p) == mod)
    known = {_module_name(p) for p in PKG.rglob("*.py")}
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            out.update(_targets(node, mod, path.name == "__init__.py", known))
    return out


@pytest.mark.parametrize(("mod", "never"), [
    ("moescope.analysis.health", "moescope.analysis.trace"),  # health is a function of (connection, selection, config)
    ("moescope.analysis.drift", "moescope.analysis.trace"),
    ("moescope.capture.alerts", "moescope.capture.recorder"),  # alerts read the recorder through a Protocol
    ("moescope.capture.alerts", "moescope.integrations"),  # the metrics come from analysis.rules
])
def test_the_old_cycles_stay_broken_even_lazily(mod: str, never: str) -> None:
    # Stricter than the module-level check: not even a lazy or TYPE_CHECKING import closes these loops again.
    assert not [t for t in _all_names(mod) if _in(t, never)]
