"""pyproject.toml and the code agree: Python 3.10 support (tomli), core dependencies, extras."""

from __future__ import annotations

import ast
import importlib
import re
import sys
import types
from pathlib import Path

import pytest

from moescope import _toml

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = _toml.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
#: Folders whose modules need an extra (torch, transformers, dash, lightning); everything else is the core.
EXTRA_ROOMS = ("capture", "reference", "integrations", "dashboard")
#: Core modules that only run with an extra installed (their third-party imports are lazy or torch-only).
EXTRA_MODULES = ("commands/demo.py", "commands/inspect.py")


def _name(req: str) -> str:
    return re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0].strip().lower()


def _core_requirements() -> dict[str, str]:
    return {_name(r): r for r in PYPROJECT["dependencies"]}


def _min_python() -> tuple[int, int]:
    m = re.fullmatch(r">=\s*(\d+)\.(\d+)", PYPROJECT["requires-python"].strip())
    assert m, PYPROJECT["requires-python"]
    return int(m.group(1)), int(m.group(2))


def test_python_310_gets_tomli_exactly_where_tomllib_is_missing() -> None:
    """requires-python allows 3.10, so tomli must be declared for python_version < '3.11' (and only there)."""
    if _min_python() >= (3, 11):
        return  # a 3.11+ floor needs no backport
    reqs = _core_requirements()
    assert "tomli" in reqs, "requires-python allows 3.10 but tomli is not a dependency"
    marker = reqs["tomli"].split(";", 1)[1].replace(" ", "").replace('"', "'")
    assert marker == "python_version<'3.11'"


def _imports(tree: ast.Module) -> list[tuple[str, ast.stmt, list[ast.stmt]]]:
    """Module-level imports (also inside if/try at module level) with the chain of statements enclosing each."""
    out: list[tuple[str, ast.stmt, list[ast.stmt]]] = []

    def walk(body: list[ast.stmt], chain: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.Import):
                out.extend((a.name.split(".")[0], node, chain) for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                out.append((node.module.split(".")[0], node, chain))
            elif isinstance(node, ast.If):
                if "TYPE_CHECKING" in ast.unparse(node.test):
                    continue
                walk(node.body, [*chain, node])
                walk(node.orelse, [*chain, node])
            elif isinstance(node, ast.Try):
                walk(node.body, [*chain, node])

    walk(tree.body, [])
    return out


def _sources() -> list[Path]:
    return sorted((ROOT / "moescope").rglob("*.py"))


def test_tomllib_is_imported_only_behind_the_version_check() -> None:
    """Every module-level `import tomllib` sits under `if sys.version_info >= (3, 11)` with tomli as the else."""
    for path in _sources():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for name, _node, chain in _imports(tree):
            if name != "tomllib":
                continue
            guard = next((c for c in reversed(chain) if isinstance(c, ast.If)), None)
            assert guard is not None and ast.unparse(guard.test) == "sys.version_info >= (3, 11)", (
                f"{path}: `import tomllib` without the 3.11 guard (use moescope._toml)")
            assert any(isinstance(n, ast.Import) and n.names[0].name == "tomli" for n in guard.orelse), path


def test_the_fallback_imports_tomli_on_310(monkeypatch: pytest.MonkeyPatch) -> None:
    """With version_info 3.10, moescope._toml reads TOML through `tomli` (a stand-in module here)."""
    fake = types.ModuleType("tomli")
    fake.loads = lambda s: {"via": "tomli"}  # type: ignore[attr-defined]
    fake.TOMLDecodeError = ValueError  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tomli", fake)
    monkeypatch.setattr(sys, "version_info", (3, 10, 14, "final", 0))
    try:
        mod = importlib.reload(_toml)
        assert mod.loads("x = 1") == {"via": "tomli"} and mod.TOMLDecodeError is ValueError
    finally:
        monkeypatch.undo()
        importlib.reload(_toml)
    assert _toml.loads("x = 1") == {"x": 1}


def test_core_imports_only_core_dependencies() -> None:
    """Module-level third-party imports of the core (trace reading, analysis, check, CLI) are core dependencies."""
    core = set(_core_requirements())
    stdlib = set(sys.stdlib_module_names)
    bad = []
    for path in _sources():
        rel = path.relative_to(ROOT / "moescope").as_posix()
        if rel.split("/")[0] in EXTRA_ROOMS or rel in EXTRA_MODULES:
            continue
        for name, node, _ in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            if name in stdlib or name in ("moescope", "__future__"):
                continue
            if name not in core:
                bad.append(f"{rel}:{node.lineno} imports {name}")
    assert bad == []


def test_core_has_no_scipy_or_tqdm_and_demo_gets_tqdm_from_its_extra() -> None:
    """scipy is only a test reference; tqdm only draws the demo's progress bar, which needs the torch extra."""
    core = _core_requirements()
    assert "scipy" not in core and "tqdm" not in core
    extras = {k: {_name(r) for r in v} for k, v in PYPROJECT["optional-dependencies"].items()}
    assert {"torch", "tqdm"} <= extras["torch"]
    assert "scipy" in extras["dev"]
    for path in _sources():
        if "tqdm" in path.read_text(encoding="utf-8"):
            assert path.relative_to(ROOT / "moescope").as_posix() == "commands/demo.py", path


def test_hf_extra_promises_only_transformers_versions_with_specs() -> None:
    """[hf] allows transformers 4.45+ and 5: the shipped specs must cover both majors (chosen by `requires`)."""
    hf = [r for r in PYPROJECT["optional-dependencies"]["hf"] if _name(r) == "transformers"]
    assert hf and re.search(r">=\s*4\.45", hf[0]), hf
    from moescope.capture.specs import load_spec_files

    requires = {s.requires for s in load_spec_files() if s.module and s.module.startswith("transformers")}
    assert {"transformers<5", "transformers>=5"} <= requires, requires
