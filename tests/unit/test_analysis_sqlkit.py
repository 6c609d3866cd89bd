"""The analyses/*.sql loader: stages, includes, parameters, and finding the SQL in a wheel-style install."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from moescope.analysis import sqlkit
from moescope.analysis.selection import Selection, window_label, window_params
from moescope.analysis.sqlkit import Raw, literal, render, stages

REPO = Path(__file__).resolve().parents[2]


def test_every_analysis_renders_to_one_with_query():
    for path in sorted((REPO / "analyses").glob("*.sql")):
        if path.stem.startswith("whatif_"):  # another module's SQL, with its own loader
            continue
        names = [n for n, _ in stages(path.stem)]
        assert names and len(names) == len(set(names)), path.name


def test_include_expands_in_place_and_final_stops_early():
    names = [n for n, _ in stages("load_metrics")]
    assert names[:4] == ["el", "rs", "src_steps", "span"]  # utilization's stages, windows' after src_steps
    assert names[-1] == "load_metrics" and "utilization" in names
    sql = render("vocab_specialization", {"filter": Raw("1 = 1"), "min_count": 2, **window_params(None)},
                 final="per_token")
    assert sql.startswith("WITH ") and "vocab_specialization AS" not in sql


def test_parameters_are_literals_and_required():
    assert literal("it's") == "'it''s'" and literal(3) == "3" and literal(None) == "NULL" and literal(True) == "TRUE"
    with pytest.raises(ValueError):
        literal(float("nan"))
    with pytest.raises(KeyError, match="needs parameter 'filter'"):
        render("similarity", {})


def test_selection_filters_quote_values():
    f = Selection.of({"run": "a'b", "tag": ["x", "y"], "steps": (1, 9), "layer": 3}).filter().sql
    assert f == "run IN ('a''b') AND tag IN ('x', 'y') AND layer IN (3) AND step BETWEEN 1 AND 9"
    assert Selection().filter().sql == "1 = 1"
    assert "tag" not in Selection(tag="x").filter(tag=False).sql
    with pytest.raises(ValueError, match="unknown selection key"):
        Selection.of({"runs": "a"})


def test_window_params_and_labels():
    assert window_params(None) == window_params("thirds") == {"window": 0, "n_windows": 3}
    assert window_params("all") == {"window": 0, "n_windows": 1}
    assert window_params(100) == {"window": 100, "n_windows": 1}
    for bad in (0, -5, "weekly", True):
        with pytest.raises(ValueError):
            window_params(bad)
    assert window_label(200, 299) == "steps 200–299" and window_label(5, 5) == "step 5"


def test_sql_found_in_a_wheel_style_install(tmp_path):
    # the wheel carries analyses/ as moescope/_content/analyses (pyproject force-include)
    site = tmp_path / "site"
    shutil.copytree(REPO / "moescope", site / "moescope", ignore=shutil.ignore_patterns("__pycache__", "_content"))
    shutil.copytree(REPO / "analyses", site / "moescope" / "_content" / "analyses")
    code = ("import moescope.analysis.sqlkit as s; p = s.analyses_dir(); "
            "assert '_content' in str(p), p; print(len(s.render('utilization', {'filter': s.Raw('1 = 1'), "
            "'window': 0, 'n_windows': 3})))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(site), "PATH": ""},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) > 500
    assert sqlkit.analyses_dir() == REPO / "analyses"  # this checkout (editable install)
