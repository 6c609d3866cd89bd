"""The Manifest dataclass: one typed schema, one writer, one reader (moescope/format/manifest.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moescope.format.manifest import CaptureSettings, Counters, LayerEntry, Manifest, ModelInfo, TraceError
from moescope.format.writer import read_manifest, write_manifest

SAMPLES = Path(__file__).resolve().parents[2] / "sample_traces"


def _full() -> Manifest:
    return Manifest(
        run="r", created="2026-01-01T00:00:00Z", updated="2026-01-01T00:01:00Z", closed=True, moescope_version="0.1.0",
        model=ModelInfo("MoEModel", 1234),
        layers=[LayerEntry(0, "layers.0.moe.router", 8, 2, "softmax_topk", family="x", experts_module="layers.0.e")],
        capture=CaptureSettings(tokens=0.25, flush_every=10, seed=0, on_full="block", max_queue_mb=256.0),
        counters=Counters(forwards=10, flushes=1, parts_written=3, rows_written={"expert_load": 80},
                          dropped_flushes=0, dropped_records=0, write_errors=["OSError: disk full"]),
        rank=0, world_size=1, meta={"scenario": "x"},
    )


def test_round_trip(tmp_path: Path) -> None:
    m = _full()
    path = m.write(tmp_path)
    assert path.name == "manifest.json"
    back = Manifest.read(path)
    assert back == m
    assert back.write_errors == ["OSError: disk full"]
    raw = json.loads(path.read_text())
    assert raw["format"] == "moescope-trace" and raw["version"] == 1 and raw["model"]["class"] == "MoEModel"
    assert raw["counters"]["write_errors"] == ["OSError: disk full"]


def test_unknown_keys_survive_a_round_trip(tmp_path: Path) -> None:
    raw = {**_full().to_dict(), "new_top": {"a": 1}}
    raw["capture"]["new_setting"] = "x"
    raw["layers"][0]["new_layer_key"] = 3
    write_manifest(tmp_path, {k: v for k, v in raw.items() if k not in ("format", "version")})
    again = read_manifest(tmp_path)
    assert again["new_top"] == {"a": 1} and again["capture"]["new_setting"] == "x"
    assert again["layers"][0]["new_layer_key"] == 3


def test_old_v1_spellings_are_read_in_one_place() -> None:
    m = Manifest.from_dict({"format": "moescope-trace", "version": 1, "run": "r",
                            "capture": {"token_fraction": 0.5, "flush_interval": 20},
                            "counters": {"dropped_rows": 7}})
    assert (m.capture.tokens, m.capture.flush_every, m.counters.dropped_records) == (0.5, 20, 7)
    assert "token_fraction" not in m.to_dict()["capture"]  # written back in today's spelling


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda d: d["layers"][0].update(n_experts="many"), "layers[0].n_experts"),
        (lambda d: d["layers"][0].update(top_k=99), "layers[0].top_k"),
        (lambda d: d.update(closed="yes"), "'closed'"),
        (lambda d: d.update(layers={"layer": 0}), "'layers'"),
        (lambda d: d["capture"].update(tokens="all"), "capture.tokens"),
        (lambda d: d["capture"].update(tokens=1.5), "capture.tokens"),
        (lambda d: d["counters"].update(dropped_records=-1), "counters.dropped_records"),
        (lambda d: d["model"].update(n_params=True), "model.n_params"),
        (lambda d: d.update(version="1"), "'version'"),
        (lambda d: d.update(run=5), "'run'"),
    ],
)
def test_wrong_typed_field_names_file_and_field(tmp_path: Path, change, field: str) -> None:
    raw = _full().to_dict()
    change(raw)
    p = tmp_path / "manifest.json"
    p.write_text(json.dumps(raw))
    with pytest.raises(TraceError) as e:
        Manifest.read(p)
    msg = str(e.value)
    assert str(p) in msg and field in msg and "\n" not in msg


def test_future_version_and_foreign_files(tmp_path: Path) -> None:
    p = tmp_path / "manifest.json"
    p.write_text(json.dumps({**_full().to_dict(), "version": 2}))
    with pytest.raises(TraceError, match="v2 is newer"):
        Manifest.read(p)
    p.write_text(json.dumps({"format": "other"}))
    with pytest.raises(TraceError, match="not a moescope trace manifest"):
        Manifest.read(p)
    p.write_bytes(b"\xff\xfe not json")
    with pytest.raises(TraceError, match="unreadable manifest"):
        Manifest.read(p)


def test_writer_refuses_what_the_reader_would_refuse(tmp_path: Path) -> None:
    bad = _full()
    bad.layers[0].top_k = 9  # > n_experts
    with pytest.raises(TraceError, match="top_k"):
        bad.write(tmp_path)
    assert not (tmp_path / "manifest.json").exists()


def test_numpy_scalars_are_written_as_numbers(tmp_path: Path) -> None:
    np = pytest.importorskip("numpy")
    m = _full()
    m.capture.flush_every = np.int64(5)  # type: ignore[assignment]
    m.write(tmp_path)
    assert Manifest.read(tmp_path / "manifest.json").capture.flush_every == 5


@pytest.mark.parametrize("run", ["balanced", "collapse", "shift", "upcycled"])
def test_committed_sample_manifests_still_read(run: str) -> None:
    path = SAMPLES / run / "manifest.json"
    if not path.is_file():
        pytest.skip("sample_traces not in this checkout")
    m = Manifest.read(path)
    raw = json.loads(path.read_text())
    assert m.run == raw["run"] and len(m.layers) == len(raw["layers"])
    # nothing lost or renamed on a round trip of a real v1 manifest (a null or empty counter is the same as none)
    assert _no_nulls(m.to_dict()) == _no_nulls(raw)


def _no_nulls(d: dict) -> dict:
    return {k: _no_nulls(v) if isinstance(v, dict) else v for k, v in d.items() if v is not None and v != []}
