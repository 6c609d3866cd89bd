"""Readable specialization (issue 17 item 4): decoders and the per-expert view, known answers on hand-built traces."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from trace_helpers import layer_spec, load_frame, routing_frame

import moescope
from moescope.analysis.vocab import NO_TOKENIZER, byte_text, decoder_for, quoted, visible
from moescope.format.manifest import Manifest, TraceError

# token 65 ('A'): expert 0 in 4 of 4 occurrences, 1 in 2, 2 in 1, 3 in 1;
# token 66 ('B'): expert 2 in 4 of 4, 1 in 3; one slot is empty (dropped: no expert)
# token 67 ('C'): seen once, under min_count=2
_ROWS = [(65, [0, 1]), (65, [0, 2]), (65, [0, 1]), (65, [0, 3]),
         (66, [1, 2]), (66, [1, 2]), (66, [2, None]), (66, [1, 2]), (67, [3, 1])]


def _run(make_run, name: str, tokenizer: str | None) -> None:
    rows = [{"pos": i, "token_id": t, "experts": e} for i, (t, e) in enumerate(_ROWS)]
    load = pd.concat([load_frame([(0, 0, [4, 2, 1, 1])], tag="en"), load_frame([(0, 0, [0, 3, 4, 0])], tag="code")])
    model = {"class": "hand-built", **({"tokenizer": tokenizer} if tokenizer else {})}
    make_run(name, layers=[layer_spec(0, 4, 2)], routing=routing_frame(rows), expert_load=load,
             extra={"model": model})


def test_per_expert_view_known_answer(make_run, trace_root: Path) -> None:
    _run(make_run, "b", "bytes")
    tr = moescope.open(trace_root)
    v = tr.vocab_specialization(run="b", min_count=2, per_expert=True, top=2).set_index("expert")
    assert list(v.index) == [0, 1, 2, 3]  # every expert of the layer, none from the dropped slot
    assert v.loc[0, "token_ids"] == [65] and v.loc[0, "share"] == pytest.approx(1.0)
    assert v.loc[1, "token_ids"] == [66, 65] and v.loc[1, "token_shares"] == pytest.approx([0.75, 0.5])
    assert v.loc[1, "share"] == pytest.approx((3 + 2) / (4 + 4))
    assert v.loc[2, "token_ids"] == [66, 65] and v.loc[2, "share"] == pytest.approx((4 + 1) / 8)
    assert v.loc[3, "token_ids"] == [65] and v.loc[3, "share"] == pytest.approx(0.25)  # 67 is under min_count
    assert (v["chance"] == 0.5).all() and v.loc[1, "texts"] == ["B", "A"]
    assert v.loc[1, "tags"] == pytest.approx({"code": 0.6, "en": 0.4})
    assert v.loc[1, "text"] == "layer 0, expert 1 takes: `B`, `A` (share 0.62 vs chance 0.5); tags: code 0.60, en 0.40"
    top1 = tr.vocab_specialization(run="b", min_count=2, per_expert=True, top=1).set_index("expert")
    assert top1.loc[1, "token_ids"] == [66] and top1.loc[1, "token_ids_seen"] == 2
    assert top1.loc[1, "text"].startswith("layer 0, expert 1 takes: `B` … (share 0.75 vs chance 0.5)")
    # every assignment of a real expert is counted once: the listed counts add up to the routing rows
    full = tr.vocab_specialization(run="b", min_count=1, per_expert=True, top=10)
    assert sum(len(x) for x in full["token_ids"]) == 4 + 2 + 2  # 65 -> 4 experts, 66 -> 2, 67 -> 2
    with pytest.raises(ValueError, match="window='all' or a width"):
        tr.vocab_specialization(per_expert=True, window="thirds")


def test_without_a_tokenizer_ids_are_ids(make_run, trace_root: Path) -> None:
    _run(make_run, "n", None)
    tr = moescope.open(trace_root)
    v = tr.vocab_specialization(run="n", min_count=2, per_expert=True).set_index("expert")
    assert v.loc[1, "texts"] == ["#66", "#65"] and (v["decoder"] == "ids").all()  # 65 is not guessed to be 'A'
    assert tr.sql("SELECT tokenizer FROM runs").fetchall() == [(None,)]
    assert decoder_for(None).note == NO_TOKENIZER


def test_per_expert_view_of_a_count_only_run_is_empty(make_run, trace_root: Path) -> None:
    make_run("c", layers=[layer_spec(0, 4, 2)], expert_load=load_frame([(0, 0, [1, 2, 3, 4])]))
    tr = moescope.open(trace_root)
    assert tr.vocab_specialization(per_expert=True).empty
    from moescope.commands.report import render_experts

    assert "no token-level routing in this run" in render_experts(tr, "c")[0]


def test_bytes_decoder_and_visible_text() -> None:
    d = decoder_for("bytes")
    assert d.texts([65, 32, 10, 9, 0, 200, 300, -1, None]) == ["A", "␣", "↵", "⇥", "\\x00", "\\xc8", "#300", "#-1", "?"]
    assert byte_text(127) == "\\x7f" and visible(" def\n") == " def↵" and visible("  ") == "␣␣"
    assert quoted("`") == "`` ` ``" and quoted(" def") == "` def`"


def test_manifest_tokenizer_is_validated(tmp_path: Path) -> None:
    body = {"format": "moescope-trace", "version": 1, "run": "r", "model": {"class": "M", "tokenizer": ""}}
    with pytest.raises(TraceError, match="model.tokenizer' must be a non-empty string"):
        Manifest.from_dict(body)
    body["model"]["tokenizer"] = "gpt2"
    assert Manifest.from_dict(body).model.tokenizer == "gpt2"
    assert Manifest.from_dict(body).to_dict()["model"]["tokenizer"] == "gpt2"


def _word_tokenizer(path: Path) -> None:
    """A tiny WordLevel tokenizer built in-process and saved as an HF tokenizer folder."""
    pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "def": 1, "return": 2, "self": 3}
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]").save_pretrained(str(path))


@pytest.mark.hf
def test_hf_tokenizer_decodes_from_a_path(make_run, trace_root: Path, tmp_path: Path) -> None:
    tok_dir = tmp_path / "tok"
    _word_tokenizer(tok_dir)
    d = decoder_for(str(tok_dir))
    assert d.kind == "hf" and d.texts([1, 2, 3, 99]) == ["def", "return", "self", "#99"]  # 99: not in its vocab
    rows = [{"pos": i, "token_id": t, "experts": [0, 1]} for i, t in enumerate([1, 1, 3, 3, 3])]
    make_run("h", layers=[layer_spec(0, 2, 1)], routing=routing_frame(rows),
             extra={"model": {"class": "M", "tokenizer": str(tok_dir)}})
    v = moescope.open(trace_root).vocab_specialization(run="h", min_count=2, per_expert=True).set_index("expert")
    assert v.loc[0, "texts"] == ["self", "def"]  # both shares 1.0: the more frequent first
    missing = decoder_for(str(tmp_path / "nowhere"))
    assert missing.kind == "ids" and "not available on this machine" in missing.note
    assert missing.text(3) == "#3"
