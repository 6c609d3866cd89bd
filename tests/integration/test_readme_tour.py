"""The README as a new user follows it: the tour's code block runs exactly as printed in a fresh directory, the
test command is CI's, and the docs name only public functions."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def section(heading: str) -> str:
    """The README text from `heading` to the next heading of the same level."""
    level = heading.split(" ", 1)[0]
    body = README.split(heading + "\n", 1)[1]
    return re.split(rf"^{level} ", body, maxsplit=1, flags=re.M)[0]


def blocks(text: str, lang: str) -> list[str]:
    """The fenced code blocks of one language in `text`."""
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def test_tour_runs_as_printed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torch")
    (code,) = blocks(section("## The tour: model → trace → SQL → check → dashboard"), "python")
    monkeypatch.chdir(tmp_path)  # a fresh trace directory: nothing recorded before
    ns: dict = {"__name__": "readme_tour"}
    exec(compile(code, "README.md (tour)", "exec"), ns)
    tr = ns["tr"]
    assert (tmp_path / "traces" / "run-a" / "manifest.json").is_file()
    assert len(tr.similarity(run="run-a")) > 0  # the snapshot is on disk before the trace is opened
    health = tr.health(run="run-a")
    assert len(health) and set(health["status"]) - {"SKIP"}  # the rules judged something
    drift = tr.drift(baseline={"tag": "english"}, current={"tag": "code"})
    assert len(drift) and (drift["status"] != "SKIP").all()  # both tags are recorded: a real comparison
    assert drift["flagged"].all()  # the two slices route differently, and drift says so


def test_test_command_is_what_ci_runs() -> None:
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    commands = [b.strip() for b in blocks(section("### Tests"), "bash")]
    assert ci in commands
    assert "apt-get update" not in ci.split("||")[0]  # no apt when chromium is there already


def test_quick_loop_is_documented_and_registered() -> None:
    import tomllib

    markers = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["markers"]
    assert any(m.startswith("quick:") for m in markers)
    assert "python -m pytest -m quick" in section("### Tests")


def test_docs_name_no_private_helpers() -> None:
    texts = {p.name: p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]}
    for name, text in texts.items():
        if name == "ARCHITECTURE.md":  # written for contributors, who do work on private modules
            continue
        private = re.findall(r"moescope(?:\.\w+)*\._\w+", text)
        assert not private, (name, private)
    from moescope.integrations import metrics_from_tables  # the public name the docs give

    assert callable(metrics_from_tables)


def test_install_lines_name_what_exists() -> None:
    # no index serves moescope: every pip line installs torch or a local checkout, never "moescope[...]" by name
    texts = [README, *(p.read_text() for p in (ROOT / "docs").glob("*.md"))]
    for text in texts:
        assert not re.search(r"pip install [\"']?moescope\[[^\]]*\](?!\s*@)", text)
    ignored = (ROOT / ".gitignore").read_text().splitlines()
    assert "/moescope-demo/" in ignored or "moescope-demo/" in ignored


def test_lightning_example_needs_only_the_lightning_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's Lightning line installs [torch,lightning]; the docs example it links must not need more."""
    pytest.importorskip("lightning.pytorch")
    import ast

    text = (ROOT / "docs" / "integrations.md").read_text()
    code = text.split("### Lightning\n", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert '".[torch,lightning]"' in code and '".[torch,lightning]"' in README
    imported = {a.name.split(".")[0] for node in ast.walk(ast.parse(code)) if isinstance(node, ast.Import)
                for a in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(ast.parse(code))
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert imported <= {"lightning", "torch", "moescope"}, imported  # no transformers (the [hf] extra)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "docs/integrations.md (Lightning)", "exec"), {"__name__": "doc_example"})
    assert (tmp_path / "traces" / "lightning-run" / "manifest.json").is_file()
    with open(next((tmp_path / "logs").rglob("metrics.csv"))) as fh:
        assert "moescope/layer1/dead_experts" in fh.readline()


def test_custom_router_example_runs_and_records_what_the_router_chose(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    code = next(b for b in blocks(section("### Custom routers"), "python") if "MyRouter" in b)
    ns: dict = {"__name__": "readme_custom_router"}
    exec(compile(code, "README.md (custom router)", "exec"), ns)
    moescope, nn = ns["moescope"], ns["nn"]
    model = nn.Sequential(nn.Linear(16, 16), ns["MyRouter"]())
    seen: list = []
    model[1].register_forward_hook(lambda m, i, out: seen.append(out[2].flatten()))  # the router's own ids
    x = torch.randn(3, 5, 16)
    with moescope.record(model, tmp_path / "run"):
        model(x)
    got = moescope.open(tmp_path).sql("SELECT expert, sum(tokens) AS n FROM expert_load GROUP BY expert").df()
    want = torch.bincount(torch.cat(seen), minlength=8)
    # every expert has a row, an idle one with 0 (x is unseeded: an expert may get no token)
    assert {int(e): int(n) for e, n in zip(got["expert"], got["n"])} == dict(enumerate(want.tolist()))
    assert int(got["n"].sum()) == 3 * 5 * 2  # every token, top-2
