"""`moescope check`: verdicts and exit codes on hand-built traces, every output format, and bad inputs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree as ET

import numpy as np
import pandas as pd
import pytest

from moescope.check import (
    COLUMNS,
    JSON_KEYS,
    CheckResult,
    format_github,
    format_json,
    format_junit,
    format_markdown,
    format_text,
    regression_findings,
    write_step_summary,
)
from moescope.cli import main
from moescope.format.writer import write_run

REPO = Path(__file__).resolve().parents[2]
#: The demo traces (`moescope demo --out sample_traces`); the variable points the tests at a fresh demo run.
SAMPLES = Path(os.environ.get("MOESCOPE_SAMPLE_TRACES", REPO / "sample_traces"))
N_EXPERTS, TOP_K, TOKENS, STEPS = 8, 2, 512, 30

UNIFORM = [1.0] * N_EXPERTS
#: Two experts take almost everything; experts 4-7 fall far below 5% of their fair share.
COLLAPSED = [0.47, 0.47, 0.02, 0.02, 0.005, 0.005, 0.005, 0.005]
#: Half the experts busy, half quiet: a different distribution from UNIFORM (JS ≈ 0.27, TV 0.3) with
#: load CV 0.6 (WARN above 0.5, clear of sampling noise), MaxVio 0.6 (PASS) and no expert dead.
SHIFTED = [4.0, 4.0, 4.0, 4.0, 1.0, 1.0, 1.0, 1.0]


# ------------------------------------------------------------------------------------------ trace builders


def make_run(
    run_dir: Path,
    layer_loads: list[list[float]],
    *,
    steps: int = STEPS,
    tokens: int = TOKENS,
    nonfinite: dict[int, int] | None = None,
    seed: int = 0,
    tag: str = "",
) -> Path:
    """Write a hand-built run: per layer, each step's k·T assignments drawn from the given expert weights."""
    rng = np.random.default_rng(seed)
    load_rows, stat_rows = [], []
    for layer, weights in enumerate(layer_loads):
        p = np.asarray(weights, float) / np.sum(weights)
        h = float(-(p[p > 0] * np.log(p[p > 0])).sum())
        for step in range(steps):
            counts = rng.multinomial(TOP_K * tokens, p)
            for e, c in enumerate(counts):
                load_rows.append(
                    dict(
                        step=step,
                        tag=tag,
                        layer=layer,
                        expert=e,
                        tokens=int(c),
                        prob_sum=float(p[e] * tokens),
                        weight_sum=float(c) * 0.5,
                    )
                )
            stat_rows.append(
                dict(
                    step=step,
                    tag=tag,
                    layer=layer,
                    tokens=tokens,
                    entropy_sum=h * tokens,
                    lse_sq_sum=4.0 * tokens,
                    lse_sum=2.0 * tokens,
                    lse_max=3.0,
                    margin_sum=0.1 * tokens,
                    nonfinite=int((nonfinite or {}).get(layer, 0)) if step == steps - 1 else 0,
                    dropped=0,
                )
            )
    layers = [
        dict(layer=i, module=f"model.layers.{i}.mlp.router", n_experts=N_EXPERTS, top_k=TOP_K, router_kind="topk")
        for i in range(len(layer_loads))
    ]
    return write_run(
        run_dir,
        {"expert_load": pd.DataFrame(load_rows), "router_stats": pd.DataFrame(stat_rows)},
        run=run_dir.name,
        layers=layers,
    )


@pytest.fixture(scope="module")
def traces(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A balanced run, a run whose layer 1 collapsed, a shifted run and its baseline, each under its own root."""
    base = tmp_path_factory.mktemp("traces")
    return {
        "balanced": make_run(base / "balanced" / "balanced", [UNIFORM, UNIFORM], seed=1),
        "collapse": make_run(base / "collapse" / "collapse", [UNIFORM, COLLAPSED], seed=2),
        "baseline": make_run(base / "baseline" / "baseline", [UNIFORM, UNIFORM], seed=3),
        "shift": make_run(base / "shift" / "shift", [SHIFTED, UNIFORM], seed=4),
        "nonfinite": make_run(base / "nonfinite" / "nonfinite", [UNIFORM, UNIFORM], nonfinite={0: 7}, seed=5),
    }


def run_cli(*args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run the CLI in-process; returns (exit code, stdout, stderr). argparse errors exit through SystemExit."""
    try:
        code = main(["check", *args])
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def run_both(*args: str, capsys: pytest.CaptureFixture[str], subprocess_: bool) -> tuple[int, str, str]:
    """Run in a fresh interpreter where the case asks for it (what CI runs), else in-process (faster)."""
    if subprocess_:
        proc = run_subprocess(*args)
        return proc.returncode, proc.stdout, proc.stderr
    return run_cli(*args, capsys=capsys)


def run_subprocess(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run `python -m moescope check ...` in a fresh interpreter (what CI runs)."""
    return subprocess.run(
        [sys.executable, "-m", "moescope", "check", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        timeout=120,
    )


# ------------------------------------------------------------------------------------------ verdicts


def test_balanced_run_passes(traces: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(str(traces["balanced"]), capsys=capsys)
    assert code == 0, out + err
    assert "moescope check: PASS" in out
    assert "0 fail" in out


def test_collapsed_run_fails_naming_the_layer(traces: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(str(traces["collapse"]), capsys=capsys)
    assert code == 1, out + err
    assert "moescope check: FAIL" in out
    fails = [ln for ln in out.splitlines() if ln.startswith("FAIL")]
    assert fails, out
    # Only layer 1 collapsed: every FAIL row names it, none names the healthy layer 0.
    cols = [re.split(r"\s{2,}", ln) for ln in fails]
    assert {c[3] for c in cols} == {"1"}, out
    # Failures come before everything else in the table.
    statuses = [
        ln.split()[0] for ln in out.splitlines()[1:] if ln and ln.split()[0] in {"FAIL", "WARN", "SKIP", "ERROR"}
    ]
    assert statuses[: len(fails)] == ["FAIL"] * len(fails)


def test_collapse_json_names_collapsed_layers(traces: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(str(traces["collapse"]), "--format", "json", capsys=capsys)
    assert code == 1
    report = json.loads(out)
    failed_layers = {c["layer"] for c in report["checks"] if c["status"] == "FAIL"}
    assert failed_layers == {1}
    failed_rules = {c["rule"] for c in report["checks"] if c["status"] == "FAIL"}
    assert "dead_expert" in failed_rules or "collapse" in failed_rules, failed_rules


def test_fail_on_warn(traces: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    # The shifted run's layer 0 is imbalanced enough to warn (CV > 0.5) yet has no dead expert.
    code, out, _ = run_cli(str(traces["shift"]), "--format", "json", capsys=capsys)
    report = json.loads(out)
    assert report["summary"]["warn"] > 0, report["summary"]
    assert report["summary"]["fail"] == 0, report["summary"]
    assert code == 0
    code, out, _ = run_cli(str(traces["shift"]), "--fail-on", "warn", capsys=capsys)
    assert code == 1
    assert "WARN*" in out


def test_shift_flagged_against_reference(traces: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(
        str(traces["shift"]), "--reference", str(traces["baseline"]), "--format", "json", capsys=capsys
    )
    report = json.loads(out)
    drift = [c for c in report["checks"] if c["rule"] == "drift"]
    assert {c["layer"] for c in drift} == {0, 1}, drift
    flagged = {c["layer"] for c in drift if c["status"] in ("WARN", "FAIL")}
    assert flagged == {0}, drift
    assert report["meta"]["reference"] == str(traces["baseline"])
    # The same trace against itself (a balanced one against its twin) drifts nowhere.
    code, out, _ = run_cli(
        str(traces["balanced"]), "--reference", str(traces["baseline"]), "--format", "json", capsys=capsys
    )
    drift = [c for c in json.loads(out)["checks"] if c["rule"] == "drift"]
    assert drift and all(c["status"] == "PASS" for c in drift), drift
    assert code == 0


def test_typod_tags_are_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = make_run(tmp_path / "shift", [UNIFORM, UNIFORM], tag="english", seed=21)
    make_run(run, [SHIFTED, UNIFORM], tag="code", seed=22)
    for args, flag, bad in (
        (("--tag", "cdoe", "--reference-tag", "englsh"), "--tag", "cdoe"),
        (("--tag", "code", "--reference-tag", "englsh"), "--reference-tag", "englsh"),
        (("--reference-tag", "englsh"), "--reference-tag", "englsh"),
    ):
        code, out, err = run_cli(str(run), *args, capsys=capsys)
        assert code == 2, (args, out, err)
        assert err.count("\n") == 1 and f"{flag}: no tag {bad!r}" in err and "(tags: 'code', 'english')" in err, err
    ref = make_run(tmp_path / "ref", [UNIFORM, UNIFORM], tag="english", seed=23)
    code, _, err = run_cli(str(run), "--reference", str(ref), "--reference-tag", "code", capsys=capsys)
    assert code == 2 and "no tag 'code'" in err and "(tags: 'english')" in err


def test_drift_between_tags_of_one_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # One run evaluated on two data slices (rec.tag): code routes differently from english in layer 0.
    run = make_run(tmp_path / "shift", [UNIFORM, UNIFORM], tag="english", seed=21)
    make_run(run, [SHIFTED, UNIFORM], tag="code", seed=22)  # a second part in the same run
    code, out, err = run_cli(str(run), "--reference-tag", "english", "--tag", "code", "--format", "json", capsys=capsys)
    report = json.loads(out)
    drift = {c["layer"]: c for c in report["checks"] if c["rule"] == "drift"}
    assert drift[0]["status"] == "WARN" and drift[1]["status"] == "PASS", drift
    assert "code vs reference english" in drift[0]["message"]
    assert report["meta"]["reference_tag"] == "english" and report["meta"]["tag"] == "code"
    code, out, _ = run_cli(
        str(run), "--reference-tag", "english", "--tag", "english", "--format", "json", capsys=capsys
    )
    assert all(c["status"] == "PASS" for c in json.loads(out)["checks"] if c["rule"] == "drift")
    # A tag without anything to compare it with is a usage error.
    code, _, err = run_cli(str(run), "--tag", "code", capsys=capsys)
    assert code == 2
    _one_line(err)


def test_regressions_against_reference(traces: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(
        str(traces["collapse"]), "--reference", str(traces["baseline"]), "--format", "json", capsys=capsys
    )
    assert code == 1
    checks = json.loads(out)["checks"]
    dead = [c for c in checks if c["rule"] == "regression_dead_expert"]
    assert [c["layer"] for c in dead] == [1]  # one finding per run × layer, listing the experts
    assert {4, 5, 6, 7} <= set(dead[0]["expert"]) <= {2, 3, 4, 5, 6, 7}
    assert any(c["rule"] == "regression_load_cv" and c["layer"] == 1 for c in checks)
    code, out, _ = run_cli(
        str(traces["nonfinite"]), "--reference", str(traces["baseline"]), "--format", "json", capsys=capsys
    )
    assert code == 1
    nf = [c for c in json.loads(out)["checks"] if c["rule"] == "regression_nonfinite"]
    assert [c["layer"] for c in nf] == [0]
    # A healthy run against a healthy baseline has no regressions.
    code, out, _ = run_cli(
        str(traces["balanced"]), "--reference", str(traces["baseline"]), "--format", "json", capsys=capsys
    )
    assert not [c for c in json.loads(out)["checks"] if c["rule"].startswith("regression_")]


def test_run_selection(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_run(tmp_path / "good", [UNIFORM])
    make_run(tmp_path / "bad", [COLLAPSED])
    assert run_cli(str(tmp_path), capsys=capsys)[0] == 1
    assert run_cli(str(tmp_path), "--run", "good", capsys=capsys)[0] == 0
    code, _, err = run_cli(str(tmp_path), "--run", "nope", capsys=capsys)
    assert code == 2 and "nope" in err and len(err.strip().splitlines()) == 1


def test_min_tokens_skips_thin_data(traces: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    # kT/N per window is ~1,300 here; demanding more turns the load rules into SKIP, never PASS or FAIL.
    code, out, _ = run_cli(str(traces["collapse"]), "--min-tokens", "10000000", "--format", "json", capsys=capsys)
    report = json.loads(out)
    assert report["summary"]["skip"] > 0
    assert not [c for c in report["checks"] if c["rule"] in ("dead_expert", "collapse") and c["status"] == "FAIL"]


def test_config_file_and_default_lookup(
    traces: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A moescope.toml in the working directory is used without --config; its [check] table sets fail_on.
    (tmp_path / "moescope.toml").write_text('[check]\nfail_on = "warn"\n')
    proc = run_subprocess(str(traces["shift"]), "--format", "json", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr  # the shifted run only warns, and warnings fail under this config
    report = json.loads(proc.stdout)
    assert report["meta"]["config"]["path"] == "moescope.toml"
    assert report["summary"]["fail_on"] == "warn"
    # The command line wins over the config file.
    monkeypatch.chdir(tmp_path)
    assert run_cli(str(traces["shift"]), "--fail-on", "fail", capsys=capsys)[0] == 0
    # An explicit --config replaces the lookup.
    other = tmp_path / "other.toml"
    other.write_text("[rules.load_cv]\nwarn_above = 5.0\n")
    code, out, err = run_cli(str(traces["shift"]), "--config", str(other), "--format", "json", capsys=capsys)
    assert code == 0, err
    assert not [c for c in json.loads(out)["checks"] if c["rule"] == "load_cv" and c["status"] != "PASS"]


def test_reference_from_config(traces: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # [check].reference is relative to the config file, so a repo-root moescope.toml works from any directory.
    import shutil

    shutil.copytree(traces["baseline"], tmp_path / "ci" / "baseline")
    cfg = tmp_path / "moescope.toml"
    cfg.write_text('[check]\nreference = "ci/baseline"\n')
    code, out, err = run_cli(str(traces["shift"]), "--config", str(cfg), "--format", "json", capsys=capsys)
    report = json.loads(out)
    assert report["meta"]["reference"] == str(tmp_path / "ci" / "baseline")
    assert any(c["rule"] == "drift" and c["status"] == "WARN" for c in report["checks"])


def test_example_config_is_the_defaults_and_matches_the_docs() -> None:
    from moescope.config import HealthConfig, load_config

    example = REPO / "moescope.example.toml"
    cfg = load_config(example)
    cfg.window = None if cfg.window == "thirds" else cfg.window  # "thirds" is the default spelled out
    assert cfg == HealthConfig()
    # docs/ci.md embeds the same file, so the two cannot drift apart.
    doc = (REPO / "docs" / "ci.md").read_text()
    block = re.search(r"```toml\n(.*?)```", doc, re.S)
    assert block and block.group(1) == example.read_text()


# ------------------------------------------------------------------------------------------ formats


def test_json_format(traces: dict[str, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out_file = tmp_path / "report.json"
    code, out, err = run_cli(str(traces["collapse"]), "--format", "json", "-o", str(out_file), capsys=capsys)
    assert code == 1
    # The report went to the file; the log gets the table a person reads, and stderr stays clean.
    assert out.startswith("STATUS") and "moescope check: FAIL" in out
    assert err == ""
    text = out_file.read_text()
    report = json.loads(text)  # strict: json.loads accepts NaN, so also check the raw text
    assert not re.search(r"[:\[,]\s*(NaN|-?Infinity)\b", text)  # no bare NaN/Infinity values
    assert set(report) == {"summary", "checks", "meta"}
    assert {"pass", "warn", "fail", "skip", "error", "total", "result"} <= set(report["summary"])
    assert report["summary"]["result"] == "fail"
    assert report["summary"]["total"] == len(report["checks"])
    for c in report["checks"]:
        assert list(c) == JSON_KEYS
        assert c["status"] in {"PASS", "WARN", "FAIL", "SKIP", "ERROR"}
    for k in ("trace", "moescope_version", "config", "reference"):
        assert k in report["meta"]


def test_junit_format(traces: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(str(traces["collapse"]), "--format", "junit", capsys=capsys)
    assert code == 1
    root = ET.fromstring(out)
    assert root.tag == "testsuites"
    suites = root.findall("testsuite")
    assert len(suites) == 1
    suite = suites[0]
    cases = suite.findall("testcase")
    assert int(suite.get("tests")) == len(cases) > 0
    assert int(suite.get("failures")) == len([c for c in cases if c.find("failure") is not None]) > 0
    assert int(suite.get("errors")) == len([c for c in cases if c.find("error") is not None])
    assert int(suite.get("skipped")) == len([c for c in cases if c.find("skipped") is not None])
    for c in cases:
        assert c.get("classname") and c.get("name") and c.get("time") is not None
    # One testcase per rule × run × layer.
    names = [(c.get("classname"), c.get("name")) for c in cases]
    assert len(names) == len(set(names))
    assert all("layer 1" in c.get("name") for c in cases if c.find("failure") is not None)


def test_github_format(
    traces: dict[str, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    code, out, _ = run_cli(str(traces["collapse"]), "--format", "github", capsys=capsys)
    assert code == 1
    lines = out.strip().splitlines()
    annotations = [ln for ln in lines if ln.startswith("::")]
    assert annotations and all(re.match(r"^::(error|warning) file=[^,]+,title=[^:]+::\S", ln) for ln in annotations)
    assert any(ln.startswith("::error") for ln in annotations)
    assert lines[-1].startswith("moescope check: FAIL")
    md = summary.read_text()
    assert md.startswith("earlier step\n")  # appended, never overwritten
    assert "## moescope check" in md and "| status | rule |" in md


def test_unwritable_step_summary_keeps_the_verdict(
    traces: dict[str, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(tmp_path / "no" / "such" / "dir" / "summary.md"))
    code, _, err = run_cli(str(traces["collapse"]), "--format", "github", capsys=capsys)
    assert code == 1  # the check's own verdict, not a usage error
    assert err.startswith("moescope: warning:") and len(err.strip().splitlines()) == 1


def test_output_file_in_new_directory(
    traces: dict[str, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    target = tmp_path / "reports" / "moescope.xml"
    code, out, _ = run_cli(str(traces["balanced"]), "--format", "junit", "-o", str(target), capsys=capsys)
    assert code == 0 and ET.parse(target).getroot().tag == "testsuites"
    assert "moescope check: PASS" in out


# ------------------------------------------------------------------------------------------ formatters on hand-made findings


def _findings() -> pd.DataFrame:
    """Findings with every status, NaN/None values and characters that need escaping."""
    return pd.DataFrame(
        [
            dict(
                rule="load_cv",
                status="WARN",
                run="r",
                layer=0,
                expert=None,
                window=0,
                window_start=0,
                window_end=9,
                metric="cv",
                value=0.7,
                threshold=0.5,
                message="layer 0: CV 0.7 > 0.5",
            ),
            dict(
                rule="dead_expert",
                status="FAIL",
                run="r",
                layer=1,
                expert=3,
                window=2,
                window_start=20,
                window_end=29,
                metric="utilization",
                value=0.01,
                threshold=0.05,
                message="layer 1 expert 3: 1% of fair share, 50%: a|b,c\nsecond line",
            ),
            dict(
                rule="z_loss",
                status="SKIP",
                run="r",
                layer=1,
                expert=None,
                window=None,
                window_start=None,
                window_end=None,
                metric="z_loss",
                value=float("nan"),
                threshold=None,
                message="too few tokens",
            ),
            dict(
                rule="nonfinite",
                status="PASS",
                run="r",
                layer=0,
                expert=None,
                window=0,
                window_start=0,
                window_end=29,
                metric="nonfinite",
                value=0,
                threshold=0,
                message="ok",
            ),
            dict(
                rule="similarity",
                status="ERROR",
                run="r",
                layer=None,
                expert=None,
                window=None,
                window_start=None,
                window_end=None,
                metric=None,
                value=float("inf"),
                threshold=None,
                message="no expert_similarity table",
            ),
        ]
    )


def test_result_sorting_and_exit_codes() -> None:
    res = CheckResult(_findings(), {"trace": "t"})
    assert list(res.findings.columns) == COLUMNS
    # Worst first by the one Status order (PASS < SKIP < WARN < FAIL < ERROR): a rule that could not run is read first.
    assert list(res.findings["status"]) == ["ERROR", "FAIL", "WARN", "SKIP", "PASS"]
    assert res.exit_code == 1
    warn_only = _findings()
    warn_only = warn_only[warn_only["status"].isin(["WARN", "PASS", "SKIP"])]
    assert CheckResult(warn_only, {}).exit_code == 0
    assert CheckResult(warn_only, {}, fail_on="warn").exit_code == 1
    assert CheckResult(pd.DataFrame(columns=COLUMNS), {}).exit_code == 0
    with pytest.raises(ValueError):
        CheckResult(warn_only, {}, fail_on="never")


def test_formatters_handle_nan_and_escaping(tmp_path: Path) -> None:
    res = CheckResult(_findings(), {"trace": "traces/run, a:b", "elapsed_s": 0.5})
    report = json.loads(format_json(res))
    skip = next(c for c in report["checks"] if c["status"] == "SKIP")
    assert skip["value"] is None and skip["threshold"] is None and skip["expert"] is None
    err = next(c for c in report["checks"] if c["status"] == "ERROR")
    assert err["value"] is None and err["layer"] is None
    fail = next(c for c in report["checks"] if c["status"] == "FAIL")
    assert fail["layer"] == 1 and fail["expert"] == 3 and isinstance(fail["layer"], int)

    root = ET.fromstring(format_junit(res))
    suite = root.find("testsuite")
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors"), suite.get("skipped")) == (
        "5",
        "1",
        "1",
        "1",
    )
    warn_case = next(c for c in suite if c.get("name") == "load_cv[layer 0]")
    assert warn_case.find("failure") is None and "CV 0.7" in warn_case.find("system-out").text
    strict = ET.fromstring(format_junit(CheckResult(_findings(), {}, fail_on="warn"))).find("testsuite")
    assert strict.get("failures") == "2"

    gh = format_github(res).splitlines()
    ann = [ln for ln in gh if ln.startswith("::")]
    assert len(ann) == 3  # FAIL, ERROR as errors; WARN as a warning; SKIP and PASS silent
    assert all(re.match(r"^::(error|warning) ", ln) for ln in ann)
    assert all("\n" not in ln for ln in ann)
    # Under --fail-on warn a warning fails the job, so it is annotated as an error.
    strict_ann = [
        ln for ln in format_github(CheckResult(_findings(), {}, fail_on="warn")).splitlines() if ln[:2] == "::"
    ]
    assert sum(ln.startswith("::error") for ln in strict_ann) == 3
    fail_ann = next(ln for ln in ann if "dead_expert" in ln)
    assert "file=traces/run%2C a%3Ab," in fail_ann
    assert "a|b,c second line" in fail_ann and "50%25" in fail_ann  # one line per annotation, % escaped

    text = format_text(res)
    assert text.splitlines()[0].startswith("STATUS")
    assert "1 passing finding not shown (-v lists them); rules that passed everywhere: nonfinite" in text
    assert text.strip().splitlines()[-1].startswith("moescope check: FAIL")
    assert "nonfinite" in format_text(res, verbose=True).splitlines()[5]

    md = format_markdown(res)
    assert "a\\|b,c second line" in md  # pipes escaped, newlines folded: the table stays one row
    assert write_step_summary(res, tmp_path / "s.md") == tmp_path / "s.md"


def test_summary_line_never_calls_a_failing_rule_passed() -> None:
    # collapse FAILs in layer 1 and passes in layer 0: the folded-PASS line must not list it as passed.
    df = pd.DataFrame(
        [
            dict(rule="collapse", status="FAIL", run="r", layer=1, value=0.97, threshold=0.9, message="collapsed"),
            dict(rule="collapse", status="PASS", run="r", layer=0, value=0.5, threshold=0.9, message="fine"),
            dict(rule="nonfinite", status="PASS", run="r", layer=0, value=0.0, threshold=0, message="fine"),
        ]
    )  # fmt: skip
    text = format_text(CheckResult(df, {"trace": "t"}))
    line = next(ln for ln in text.splitlines() if "passing finding" in ln)
    assert line == "2 passing findings not shown (-v lists them); rules that passed everywhere: nonfinite"
    only_fail = df[df["rule"] == "collapse"]
    assert "passed everywhere" not in format_text(CheckResult(only_fail, {"trace": "t"}))


def test_many_experts_in_one_finding() -> None:
    df = pd.DataFrame(
        [
            dict(rule="dead_expert", status="FAIL", run="r", layer=2, expert=list(range(4, 24)), value=0.0,
                 threshold=0.05, message="layer 2: 20 of 32 experts dead"),
            dict(rule="clones", status="WARN", run="r", layer=2, expert=["0-1", "2-3"], value=0.93, threshold=0.8,
                 message="layer 2: 2 expert pairs look like clones"),
        ]
    )  # fmt: skip
    res = CheckResult(df, {"trace": "t"})
    text = format_text(res)
    assert "4,5,6,7,8,…(+15)" in text  # the table column stays narrow: at most EXPERT_WIDTH characters
    header = text.splitlines()[0]
    assert header.index("WINDOW") - header.index("EXPERT") <= 16 + 2
    checks = json.loads(format_json(res))["checks"]
    assert checks[0]["expert"] == list(range(4, 24))  # JSON keeps every expert
    assert checks[1]["expert"] == ["0-1", "2-3"]
    gh = format_github(res)
    assert "experts 0-1%2C2-3" in gh  # commas in a title are escaped
    assert "experts 4%2C5%2C6%2C7%2C8%2C9%2C10%2C11%2C…(+12))" in gh  # and long lists cut short


def test_regression_findings_unit() -> None:
    base = pd.DataFrame(
        [
            dict(rule="dead_expert", status="PASS", run="b", layer=0, expert=None, value=0.9, threshold=0.05),
            dict(rule="dead_expert", status="FAIL", run="b", layer=0, expert=[2], value=0.01, threshold=0.05),
            dict(rule="load_cv", status="PASS", run="b", layer=0, value=0.2, threshold=0.5),
            dict(rule="nonfinite", status="PASS", run="b", layer=0, value=0, threshold=0),
        ]
    )
    cur = pd.DataFrame(
        [
            dict(rule="dead_expert", status="FAIL", run="c", layer=0, expert=[1, 2], value=0.01, threshold=0.05),
            # Layer 3 was never evaluated in the baseline: no regression can be claimed there.
            dict(rule="dead_expert", status="FAIL", run="c", layer=3, expert=[0], value=0.01, threshold=0.05),
            dict(rule="load_cv", status="WARN", run="c", layer=0, value=0.8, threshold=0.5),
            dict(rule="nonfinite", status="FAIL", run="c", layer=0, value=3, threshold=0),
        ]
    )
    from moescope.check.run import _clean, normalize_findings

    reg = regression_findings(normalize_findings(base), normalize_findings(cur))
    got = {(r.rule, r.layer, str(_clean(r.expert)), r.status) for r in reg.itertuples()}
    # Expert 2 was already dead in the baseline: not a regression.
    assert got == {
        ("regression_dead_expert", 0, "[1]", "FAIL"),
        ("regression_load_cv", 0, "None", "WARN"),
        ("regression_nonfinite", 0, "None", "FAIL"),
    }
    assert regression_findings(normalize_findings(cur), normalize_findings(cur)).empty


# ------------------------------------------------------------------------------------------ bad inputs


def _one_line(err: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("moescope: error:"), err


def test_missing_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_both(str(tmp_path / "nope"), capsys=capsys, subprocess_=True)
    assert code == 3 and out == ""
    _one_line(err)


def test_empty_run_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(str(tmp_path / "empty"), capsys=capsys)
    assert code == 3
    _one_line(err)


def test_run_without_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = pd.DataFrame(
        {
            c: pd.Series(dtype=t)
            for c, t in [
                ("step", "int64"),
                ("layer", "int16"),
                ("expert", "int16"),
                ("tokens", "int64"),
                ("prob_sum", "float64"),
                ("weight_sum", "float64"),
            ]
        }
    )
    write_run(tmp_path / "r", {"expert_load": empty}, layers=[])
    code, _, err = run_cli(str(tmp_path), capsys=capsys)
    assert code == 3
    _one_line(err)


def _corrupt_copy(src: Path, dst: Path, how: str) -> Path:
    """Copy a run and damage its first expert_load part: 'garbage', 'truncated' to half, or scrambled 'pages'."""
    import shutil

    shutil.copytree(src, dst)
    part = sorted((dst / "expert_load").glob("*.parquet"))[0]
    data = part.read_bytes()
    if how == "garbage":
        part.write_bytes(b"this is not parquet at all" * 10)
    elif how == "truncated":
        part.write_bytes(data[: len(data) // 2])
    else:  # "pages": a valid footer over scrambled data pages, found only when the data is read
        body = bytes(b ^ 0x5A for b in data[100 : len(data) // 2])
        part.write_bytes(data[:100] + body + data[len(data) // 2 :])
    return dst


@pytest.mark.parametrize("how", ["garbage", "truncated", "pages"])
def test_corrupt_parquet(traces: dict[str, Path], tmp_path: Path, how: str, capsys: pytest.CaptureFixture[str]) -> None:
    bad = _corrupt_copy(traces["balanced"], tmp_path / "bad", how)
    code, out, err = run_both(str(bad), capsys=capsys, subprocess_=how == "truncated")
    assert code == 3, out + err
    _one_line(err)


def test_corrupt_reference(traces: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = _corrupt_copy(traces["baseline"], tmp_path / "badref", "truncated")
    code, _, err = run_cli(str(traces["balanced"]), "--reference", str(bad), capsys=capsys)
    assert code == 3
    _one_line(err)
    code, _, err = run_cli(str(traces["balanced"]), "--reference", str(tmp_path / "nope"), capsys=capsys)
    assert code == 3
    _one_line(err)


def test_corrupt_routing_in_reference(
    traces: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Token-level routing is read only by drift (its bootstrap units), long after the trace opened fine.
    ref = tmp_path / "ref"
    make_run(ref, [UNIFORM, UNIFORM], seed=31)
    rng = np.random.default_rng(0)
    rows = [
        dict(step=s, layer=layer, seq=q, pos=p, token_id=int(rng.integers(256)),
             experts=[int(e) for e in rng.choice(N_EXPERTS, TOP_K, replace=False)], weights=[0.5, 0.5],
             entropy=1.0, lse=2.0, margin=0.1)
        for s in range(STEPS) for layer in range(2) for q in range(4) for p in range(16)
    ]  # fmt: skip
    write_run(ref, {"routing": pd.DataFrame(rows)})
    assert run_cli(str(traces["balanced"]), "--reference", str(ref), capsys=capsys)[0] == 0
    part = sorted((ref / "routing").glob("*.parquet"))[0]
    data = part.read_bytes()
    part.write_bytes(data[:100] + bytes(b ^ 0x5A for b in data[100 : len(data) // 2]) + data[len(data) // 2 :])
    code, out, err = run_cli(str(traces["balanced"]), "--reference", str(ref), capsys=capsys)
    assert code == 3, out + err
    _one_line(err)


@pytest.mark.parametrize(
    "toml",
    [
        "[rules.dead_expert]\nthreshhold = 0.05\n",  # a typo in a key
        "[rules.no_such_rule]\nwarn = 1.0\n",  # an unknown rule
        "[rules.load_cv\nwarn = 1.0\n",  # not TOML
    ],
    ids=["key-typo", "unknown-rule", "bad-toml"],
)
def test_bad_config(traces: dict[str, Path], tmp_path: Path, toml: str, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "moescope.toml"
    cfg.write_text(toml)
    code, out, err = run_both(
        str(traces["balanced"]), "--config", str(cfg), capsys=capsys, subprocess_="no_such_rule" in toml
    )
    assert code == 2, out + err
    _one_line(err)


def test_missing_config(traces: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(str(traces["balanced"]), "--config", str(tmp_path / "nope.toml"), capsys=capsys)
    assert code == 2
    _one_line(err)


@pytest.mark.parametrize(
    "args",
    [["--format", "yaml"], ["--fail-on", "never"], ["--min-tokens", "many"], ["--min-tokens", "-1"], []],
    ids=["format", "fail-on", "min-tokens-nan", "min-tokens-negative", "no-trace"],
)
def test_usage_errors(traces: dict[str, Path], args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    argv = [str(traces["balanced"]), *args] if args else []
    code, out, err = run_both(*argv, capsys=capsys, subprocess_=args[:1] == ["--format"])
    assert code == 2, out + err
    _one_line(err)


def test_help_lists_exit_codes() -> None:
    proc = run_subprocess("--help")
    assert proc.returncode == 0
    assert "exit codes" in proc.stdout and "--reference" in proc.stdout


# ------------------------------------------------------------------------------------------ sample traces


def _sample(name: str) -> Path:
    """The run directory of demo scenario `name` below sample_traces/ (wherever `moescope demo` put it)."""
    runs = sorted(p.parent for p in SAMPLES.rglob("manifest.json") if p.parent.name == name) if SAMPLES.is_dir() else []
    if not runs:
        pytest.skip(f"sample_traces/: no {name} run (generate with `moescope demo --out sample_traces`)")
    return runs[0]


def test_sample_balanced_passes(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(str(_sample("balanced")), capsys=capsys)
    assert code == 0, out + err


def test_sample_collapse_fails(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(str(_sample("collapse")), "--format", "json", capsys=capsys)
    assert code == 1, out + err
    failed = {c["rule"] for c in json.loads(out)["checks"] if c["status"] == "FAIL"}
    assert failed & {"dead_expert", "collapse"}, failed


def test_sample_shift_flagged_against_baseline(capsys: pytest.CaptureFixture[str]) -> None:
    import moescope

    shift = _sample("shift")
    with moescope.open(shift) as tr:
        tags = set(tr.sql("SELECT DISTINCT tag FROM expert_load").df()["tag"])
    if {"english", "code"} <= tags:
        # The demo evaluates the English-trained model on held-out English (the baseline) and on code.
        args = ["--reference-tag", "english", "--tag", "code"]
    else:
        args = ["--reference", str(_sample("balanced"))]
    code, out, err = run_cli(str(shift), *args, "--format", "json", capsys=capsys)
    assert code in (0, 1), err
    drift = [c for c in json.loads(out)["checks"] if c["rule"] == "drift"]
    assert any(c["status"] in ("WARN", "FAIL") for c in drift), drift


def test_regressions_is_a_function_of_connections_and_selections(traces: dict[str, Path]) -> None:
    import moescope
    from moescope.analysis.selection import Selection
    from moescope.check import regressions, run_check

    base, cur = moescope.open(traces["baseline"]), moescope.open(traces["collapse"])
    reg = regressions(base.cursor(), Selection(), cur.cursor(), Selection(), None)
    assert set(reg["rule"]) >= {"regression_dead_expert"} and set(reg["layer"]) == {1}
    # the same rows `check --reference` reports
    via_check = run_check(traces["collapse"], reference=traces["baseline"]).findings
    via_check = via_check[via_check["rule"].str.startswith("regression_")]
    key = ["rule", "layer", "status", "value"]
    assert reg[key].sort_values(key).values.tolist() == via_check[key].sort_values(key).values.tolist()
    # against itself nothing regressed
    assert regressions(cur.cursor(), Selection(), cur.cursor(), Selection()).empty
