"""One exit code per kind of damage, whatever the command (moescope.errors.classify decides, once).

Matrix: (missing path, empty run, corrupt page, truncated part, bad manifest, wrongly typed manifest field,
future format version, wrongly typed column, duplicated part) × (sql, sql -o x.csv, report, check, whatif, dashboard --check). Every cell must exit 3
with one line on stderr naming what is wrong; the intact trace exits 0 in every command (the control row).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from trace_helpers import layer_spec, stats_frame

from moescope.cli import main
from moescope.format.writer import write_run

N_EXPERTS, STEPS = 8, 400


def _build(root: Path) -> Path:
    """A small valid trace: one run, one layer, STEPS steps of expert_load and router_stats."""
    rng = np.random.default_rng(7)
    rows = [
        {"step": s, "tag": "", "layer": 0, "expert": e, "tokens": int(rng.integers(50, 150)),
         "prob_sum": float(rng.random() * 100), "weight_sum": float(rng.random() * 50)}
        for s in range(STEPS) for e in range(N_EXPERTS)
    ]  # fmt: skip
    stats = stats_frame([{"step": s, "layer": 0, "tokens": 512, "entropy_sum": 900.0} for s in range(STEPS)])
    return write_run(root / "run", {"expert_load": pd.DataFrame(rows), "router_stats": stats}, run="run",
                     layers=[layer_spec(0, N_EXPERTS, 2)])


def zero_page_bytes(part: Path, column: str = "prob_sum", n: int = 64) -> None:
    """Zero `n` bytes in the middle of `column`'s data page (a disk or copy fault; footer stays intact)."""
    md = pq.read_metadata(part)
    col = next(md.row_group(0).column(i) for i in range(md.num_columns)
               if md.row_group(0).column(i).path_in_schema == column)
    start = col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset
    mid = start + col.total_compressed_size // 2
    data = bytearray(part.read_bytes())
    data[mid : mid + n] = bytes(n)
    part.write_bytes(bytes(data))


def _first_part(run: Path) -> Path:
    return sorted((run / "expert_load").glob("*.parquet"))[0]


def _edit_manifest(run: Path, **changes: object) -> None:
    m = json.loads((run / "manifest.json").read_text())
    m.update(changes)
    (run / "manifest.json").write_text(json.dumps(m))


def _missing(root: Path) -> Path:
    return root / "no-such-trace"


def _empty_run(root: Path) -> Path:
    run = _build(root)
    for d in ("expert_load", "router_stats"):
        for p in (run / d).glob("*.parquet"):
            p.unlink()
    return root


def _corrupt_page(root: Path) -> Path:
    zero_page_bytes(_first_part(_build(root)))
    return root


def _truncated(root: Path) -> Path:
    part = _first_part(_build(root))
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    return root


def _bad_manifest(root: Path) -> Path:
    (_build(root) / "manifest.json").write_text('{"format": "moescope-trace", "version": 1, "run": ')
    return root


def _wrong_type(root: Path) -> Path:
    run = _build(root)
    m = json.loads((run / "manifest.json").read_text())
    m["layers"][0]["n_experts"] = "many"
    (run / "manifest.json").write_text(json.dumps(m))
    return root


def _wrong_column_type(root: Path) -> Path:
    part = _first_part(_build(root))
    t = pq.read_table(part)
    i = t.schema.get_field_index("step")
    pq.write_table(t.set_column(i, "step", t.column("step").cast(pa.string())), part)
    return root


def _duplicated_part(root: Path) -> Path:
    part = _first_part(_build(root))
    shutil.copy(part, part.with_name("part-0-000007.parquet"))
    return root


def _future(root: Path) -> Path:
    _edit_manifest(_build(root), version=99)
    return root


DAMAGES: dict[str, tuple[Callable[[Path], Path], str]] = {
    # damage -> (make it, a word the one-line message must contain)
    "missing path": (_missing, "no such trace"),
    "empty run": (_empty_run, "empty trace"),
    "corrupt page": (_corrupt_page, "part-0-000000.parquet"),
    "truncated part": (_truncated, "part-0-000000.parquet"),
    "bad manifest": (_bad_manifest, "manifest.json"),
    "wrong-typed manifest field": (_wrong_type, "layers[0].n_experts"),
    "future format version": (_future, "newer than this moescope"),
    "wrong-typed column": (_wrong_column_type, "column 'step' is string"),
    "duplicated part": (_duplicated_part, "a duplicated part"),
}

COMMANDS: dict[str, Callable[[Path, Path], list[str]]] = {
    "sql": lambda t, tmp: ["sql", str(t), "SELECT expert, sum(tokens), sum(prob_sum) FROM expert_load GROUP BY ALL"],
    "sql -o csv": lambda t, tmp: ["sql", str(t), "SELECT * FROM expert_load", "--format", "csv",
                                  "-o", str(tmp / "x.csv")],
    "report": lambda t, tmp: ["report", str(t)],
    "check": lambda t, tmp: ["check", str(t)],
    "whatif": lambda t, tmp: ["whatif", str(t), "capacity"],
    "dashboard": lambda t, tmp: ["dashboard", str(t), "--check", "--refresh", "0"],
}


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def _needs(command: str) -> None:
    if command == "dashboard":
        pytest.importorskip("dash")


@pytest.mark.parametrize("command", list(COMMANDS))
def test_intact_trace_exits_0(command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _needs(command)
    root = tmp_path / "t"
    _build(root)
    code, out, err = _run(COMMANDS[command](root, tmp_path), capsys)
    assert code == 0, err
    assert err == "" or "warning" in err


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damage_exits_3_in_every_command(
    damage: str, command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _needs(command)
    make, word = DAMAGES[damage]
    target = make(tmp_path / "t")
    code, out, err = _run(COMMANDS[command](target, tmp_path), capsys)
    assert code == 3, (damage, command, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moescope: error: "), err
    assert word in lines[0], lines[0]
    assert "Traceback" not in err
    assert not (tmp_path / "x.csv").exists()  # nothing half-written


def test_damaged_page_is_not_read_as_numbers(tmp_path: Path) -> None:
    # Without checksums the same damage is read back as other numbers; with them it is an error.
    run = _build(tmp_path / "t")
    part = _first_part(run)
    before = pq.read_table(part).column("prob_sum").to_numpy()
    plain = tmp_path / "plain.parquet"
    pq.write_table(pq.read_table(part), plain, write_page_checksum=False, use_dictionary=False, compression="none")
    zero_page_bytes(plain)
    assert not np.array_equal(pq.read_table(plain).column("prob_sum").to_numpy(), before)  # the fault, unverified
    zero_page_bytes(part)
    with pytest.raises(OSError, match="CRC|checksum"):
        pq.ParquetFile(part, page_checksum_verification=True).read()
