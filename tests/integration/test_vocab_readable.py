"""Readable specialization on a recording (issue 17 item 4): the per-expert view of a tiny reference model
compared with the experts its routers returned, the tokenizer stored in the manifest, `report --experts`."""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import moescope  # noqa: E402
from moescope.cli import main  # noqa: E402
from moescope.reference.model import MoEConfig, MoEModel  # noqa: E402


def _record(path: Path, **options: object) -> tuple[MoEModel, list[list[tuple[int, list[int]]]]]:
    """Record 3 steps of a tiny reference model; returns it and, per layer, (token id, ids the router returned)."""
    torch.manual_seed(0)
    m = MoEModel(MoEConfig(d_model=16, n_layers=2, n_heads=2, n_experts=4, top_k=2, d_expert=16)).eval()
    seen: list[list[tuple[int, list[int]]]] = [[], []]
    batch: list[torch.Tensor] = []
    hooks = [layer.moe.router.register_forward_hook(
        lambda mod, a, out, i=i: seen[i].extend(zip(batch[-1].reshape(-1).tolist(), out[2].tolist())))
        for i, layer in enumerate(m.layers)]
    text = b"def f(self): return self.x\n" * 2
    with moescope.record(m, path, tokens=1.0, flush_every=1, **options) as rec, torch.no_grad():
        for step in range(3):
            rec.step = step
            ids = torch.tensor([list(text[step:step + 24])])  # [1, 24] bytes
            batch.append(ids)
            m(ids)
    for h in hooks:
        h.remove()
    return m, seen


def test_reference_recording_per_expert_view_matches_the_router(tmp_path: Path) -> None:
    _, seen = _record(tmp_path / "t" / "ref")
    tr = moescope.open(tmp_path / "t")
    assert tr.manifest("ref")["model"]["tokenizer"] == "bytes"  # the reference model is byte-level: auto
    assert tr.sql("SELECT tokenizer FROM runs").fetchall() == [("bytes",)]
    view = tr.vocab_specialization(run="ref", min_count=3, per_expert=True, top=50)
    for layer in (0, 1):
        occ = Counter(t for t, _ in seen[layer])
        to = defaultdict(Counter)  # expert -> token id -> assignments
        for t, ids in seen[layer]:
            for e in ids:
                to[e][t] += 1
        for e in range(4):
            row = view[(view["layer"] == layer) & (view["expert"] == e)].iloc[0]
            want = sorted(((to[e][t] / occ[t], occ[t], t) for t in to[e] if occ[t] >= 3),
                          key=lambda x: (-x[0], -x[1], x[2]))
            assert row["token_ids"] == [t for _, _, t in want]
            assert row["token_shares"] == pytest.approx([s for s, _, _ in want])
            assert row["texts"] == [{32: "␣", 10: "↵"}.get(t, chr(t)) for _, _, t in want]  # the bytes as text
            assert row["chance"] == pytest.approx(2 / 4)


def test_report_experts_shows_decoded_bytes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _record(tmp_path / "t" / "ref")
    assert main(["report", str(tmp_path / "t"), "--experts", "--top", "3", "--min-count", "3"]) == 0
    out = capsys.readouterr().out
    lines = [ln.strip() for ln in out.splitlines() if ln.strip().startswith("layer ") and " expert " in ln]
    assert len(lines) == 2 * 4  # every layer × expert
    assert any("`s`" in ln or "`e`" in ln or "`f`" in ln for ln in lines)  # bytes shown as text, not #115
    assert "#1" not in " ".join(lines)
    assert main(["report", str(tmp_path / "t"), "--experts", "--top", "0"]) == 2


@pytest.mark.hf
def test_a_tokenizer_object_is_stored_by_its_path(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(b) if 33 <= b < 127 else f"<{b}>": b for b in range(256)}
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<0>"))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<0>")
    tok.save_pretrained(str(tmp_path / "tok"))
    tok = PreTrainedTokenizerFast.from_pretrained(str(tmp_path / "tok"))
    _record(tmp_path / "t" / "hf", tokenizer=tok)
    tr = moescope.open(tmp_path / "t")
    assert tr.manifest("hf")["model"]["tokenizer"] == str((tmp_path / "tok").resolve())
    view = tr.vocab_specialization(run="hf", min_count=3, per_expert=True, top=50)
    texts = {t for ts in view["texts"] for t in ts}
    assert "s" in texts and "<32>" in texts  # decoded by that tokenizer: its name for byte 32, not ␣
    with pytest.raises(ValueError, match="name_or_path"):
        moescope.record(torch.nn.Linear(2, 2), tmp_path / "x", tokenizer=object())


def test_auto_tokenizer_never_guesses(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from moescope.capture.options import CaptureOptions, auto_tokenizer

    ref = MoEModel(MoEConfig(d_model=16, n_layers=1, n_heads=2, n_experts=4, top_k=2, d_expert=16))
    assert auto_tokenizer(ref) == "bytes"
    assert auto_tokenizer(SimpleNamespace(config=SimpleNamespace(_name_or_path="org/tok"))) == "org/tok"
    assert auto_tokenizer(SimpleNamespace(config=SimpleNamespace(_name_or_path=""))) is None  # built from a config
    assert auto_tokenizer(torch.nn.Linear(2, 2)) is None
    (tmp_path / "tok").mkdir()
    assert CaptureOptions(tokenizer=str(tmp_path / "tok")).tokenizer == str((tmp_path / "tok").resolve())
    assert CaptureOptions(tokenizer="bytes").tokenizer == "bytes"
    with pytest.raises(ValueError, match="empty string"):
        CaptureOptions(tokenizer=" ")
