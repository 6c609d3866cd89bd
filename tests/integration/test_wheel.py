"""The wheel ships the content folders and reads traces without torch, in a fresh venv."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

CHECK = textwrap.dedent(
    """
    import sys
    import moescope
    from moescope._paths import content_dir
    assert "torch" not in sys.modules, "import moescope pulled in torch"
    for name in ("hooks", "analyses", "dashboard"):
        d = content_dir(name)
        assert "site-packages" in str(d), d
        assert any(d.iterdir()), d
    tr = moescope.open({trace!r})
    n = tr.sql("SELECT sum(tokens) FROM expert_load").fetchall()[0][0]
    assert n == 24, n
    h = tr.health()
    assert len(h) > 0
    assert "torch" not in sys.modules, "reading a trace pulled in torch"
    from moescope.capture.specs import load_spec_files  # the router specs are content: readable without torch
    specs = load_spec_files()
    assert len(specs) >= 40 and all(s.module or "." in s.classes[0] for s in specs)
    assert "torch" not in sys.modules, "reading router specs pulled in torch"
    import pyarrow.parquet as pq
    part = next(iter(__import__("pathlib").Path({trace!r}).rglob("part-*.parquet")))
    pq.ParquetFile(part, page_checksum_verification=True).read()  # the wheel writes page checksums
    print("ok", n)
    """
)


@pytest.mark.slow
def test_wheel_installs_without_torch_and_opens_a_trace(tmp_path: Path) -> None:
    import pandas as pd

    from moescope.format.writer import write_run

    trace = tmp_path / "traces"
    write_run(
        trace / "run-a",
        {
            "expert_load": pd.DataFrame(
                {"step": [0] * 4, "tag": [""] * 4, "layer": [0] * 4, "expert": [0, 1, 2, 3],
                 "tokens": [6, 6, 6, 6], "prob_sum": [3.0] * 4, "weight_sum": [3.0] * 4}
            ),
            "router_stats": pd.DataFrame({"step": [0], "tag": [""], "layer": [0], "tokens": [12]}),
        },
        layers=[{"layer": 0, "module": "m", "n_experts": 4, "top_k": 2, "router_kind": "softmax_topk"}],
    )
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(ROOT)], check=True)
    wheel = next(dist.glob("moescope-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", str(wheel)], check=True)
    out = subprocess.run(
        [str(py), "-c", CHECK.format(trace=str(trace))], capture_output=True, text=True, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "ok 24"
    torch_there = subprocess.run([str(py), "-c", "import torch"], capture_output=True)
    assert torch_there.returncode != 0  # the venv really has no torch


def _python310() -> str | None:
    """A Python 3.10 interpreter to test the oldest supported version with: $MOESCOPE_PYTHON310, PATH or pyenv."""
    import os
    import shutil

    for cand in (os.environ.get("MOESCOPE_PYTHON310"),
                 *sorted(Path("~/.pyenv/versions").expanduser().glob("3.10.*/bin/python")), shutil.which("python3.10")):
        if cand and Path(cand).exists():  # a pyenv shim may exist without that version installed: ask it
            ok = subprocess.run([str(cand), "-c", "import sys; assert sys.version_info[:2] == (3, 10)"],
                                capture_output=True)
            if ok.returncode == 0:
                return str(cand)
    return None


@pytest.mark.slow
def test_python_310_reads_and_checks_traces_with_the_core_dependencies(tmp_path: Path) -> None:
    """requires-python says 3.10: on 3.10 the wheel installs tomli (no tomllib there) and check/report/specs work."""
    py310 = _python310()
    if py310 is None:
        pytest.skip("no Python 3.10 interpreter (set MOESCOPE_PYTHON310)")
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(ROOT)], check=True)
    venv = tmp_path / "venv310"
    subprocess.run([py310, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(next(dist.glob("*.whl")))],
                   check=True)
    code = (
        "import sys, tomli, moescope\n"
        "assert sys.version_info[:2] == (3, 10)\n"
        "from moescope.capture.specs import load_spec_files\n"
        "assert len(load_spec_files()) >= 40\n"
        "from moescope.config import load_config\n"
        "print('ok')\n"
    )
    out = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
    check = subprocess.run([str(venv / "bin" / "moescope"), "check", str(ROOT / "sample_traces" / "balanced")],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout[-2000:] + check.stderr[-2000:]
