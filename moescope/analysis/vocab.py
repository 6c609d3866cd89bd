"""Token ids a person can read: each run's decoder, and the per-expert view of vocabulary specialization.

The manifest says how a run's ids decode (`model.tokenizer`, the `tokenizer=` capture option): "bytes" (the
reference model's byte-level vocabulary), or an HF tokenizer's name or path, loaded here with
`local_files_only=True` (never downloaded) when transformers is installed. When nothing says, or the tokenizer
cannot be loaded, ids are shown as `#123` with a note saying why: an id is never guessed to be a byte.

No torch here: transformers is imported lazily, only to load a named tokenizer.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

#: The manifest's tokenizer value of byte-level models: id i is the byte i (vocabulary 256).
BYTES = "bytes"
#: Whitespace and control characters shown visibly (a token that is only spaces shows as ␣ per space).
_VISIBLE = {"\n": "↵", "\t": "⇥", "\r": "␍"}
#: Columns of the per-expert view (`Trace.vocab_specialization(per_expert=True)`).
EXPERT_COLUMNS = ["run", "layer", "window", "window_start", "window_end", "expert", "n_experts", "top_k",
                  "token_ids", "texts", "token_shares", "share", "chance", "token_ids_seen", "tags", "decoder",
                  "text"]


def visible(text: str) -> str:
    """A decoded token as it shows on screen: newlines, tabs and control characters visible, spaces kept
    (a token of spaces only shows one ␣ per space)."""
    if text and text.strip(" ") == "":
        return "␣" * len(text)
    out = []
    for ch in text:
        if ch in _VISIBLE:
            out.append(_VISIBLE[ch])
        elif ord(ch) < 32 or ord(ch) == 127:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return "".join(out)


def byte_text(token_id: int) -> str:
    """The byte `token_id` (0..255) as a character: printable ASCII as itself, whitespace visible, the rest as
    unambiguous hex (control bytes and UTF-8 fragments)."""
    if 32 <= token_id < 127:
        return visible(chr(token_id))
    if chr(token_id) in _VISIBLE:
        return _VISIBLE[chr(token_id)]
    return f"\\x{token_id:02x}"


def id_text(token_id: int) -> str:
    """An id shown as an id: '#123'."""
    return f"#{token_id}"


@dataclass(frozen=True)
class Decoder:
    """How one run's token ids show: kind "bytes", "hf" (a tokenizer) or "ids" (with `note` saying why)."""

    source: str | None  # the manifest's model.tokenizer
    kind: str
    note: str = ""
    tokenizer: Any = field(default=None, repr=False, compare=False)

    def text(self, token_id: Any) -> str:
        """One id as text ('?' for something that is not an id; '#id' for an id outside the vocabulary)."""
        try:
            t = int(token_id)
        except (TypeError, ValueError):
            return "?"
        if isinstance(token_id, float) and (math.isnan(token_id) or token_id != t):
            return "?"
        if t < 0:
            return id_text(t)
        if self.kind == BYTES:
            return byte_text(t) if t < 256 else id_text(t)
        if self.kind == "hf":
            return self._hf_text(t)
        return id_text(t)

    def texts(self, ids: Iterable[Any]) -> list[str]:
        """Many ids as text, in order."""
        return [self.text(i) for i in ids]

    def _hf_text(self, t: int) -> str:
        tok = self.tokenizer
        if t >= len(tok):  # beyond the vocabulary the run recorded: not a token of this tokenizer
            return id_text(t)
        text = tok.decode([t], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if not text:  # a token that decodes to nothing alone (a special or byte-fallback piece): its name
            text = str(tok.convert_ids_to_tokens(t) or "")
        return visible(text) if text else id_text(t)


NO_TOKENIZER = ("the run records no tokenizer (record(..., tokenizer=NAME_OR_PATH) keeps one): "
                "token ids shown as #id")
_cache: dict[str, Decoder] = {}
_lock = threading.Lock()


def decoder_for(source: str | None) -> Decoder:
    """The decoder of a manifest's tokenizer value (loaded once per process, locally only)."""
    if source is None:
        return Decoder(None, "ids", NO_TOKENIZER)
    if source == BYTES:
        return Decoder(BYTES, BYTES)
    with _lock:
        if source not in _cache:
            _cache[source] = _load(source)
        return _cache[source]


def _load(source: str) -> Decoder:
    try:
        from transformers import AutoTokenizer
    except ImportError:
        return Decoder(source, "ids", f"decoding with tokenizer {source!r} needs transformers "
                                      "(pip install transformers): token ids shown as #id")
    try:
        tok = AutoTokenizer.from_pretrained(source, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to load means: show ids, and say why
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        return Decoder(source, "ids", f"tokenizer {source!r} is not available on this machine ({first}): "
                                      "token ids shown as #id")
    return Decoder(source, "hf", tokenizer=tok)


def run_decoders(trace: Any, runs: Iterable[str] | None = None) -> dict[str, Decoder]:
    """Run name -> its decoder, from each run's manifest (`model.tokenizer`)."""
    out = {}
    for run in runs if runs is not None else trace.runs:
        model = trace.manifest(run).get("model") or {}
        out[run] = decoder_for(model.get("tokenizer"))
    return out


def quoted(text: str) -> str:
    """A token in backticks, as Markdown quotes code: `` ` `` for a token holding a backtick."""
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def _quoted(texts: list[str]) -> str:
    return ", ".join(quoted(t) for t in texts)


def describe_expert(row: Mapping[str, Any], min_count: int | None = None) -> str:
    """One expert's line: "layer 1, expert 3 takes: ` def`, ` return` … (share 0.71 vs chance 0.125); tags: …"."""
    head = f"layer {int(row['layer'])}, expert {int(row['expert'])}"
    texts = list(row["texts"])
    if not texts:
        seen = f" seen {min_count}+ times" if min_count else ""
        line = f"{head} takes no token id{seen} (chance {row['chance']:.3g})"
    else:
        more = " …" if int(row["token_ids_seen"]) > len(texts) else ""
        line = f"{head} takes: {_quoted(texts)}{more} (share {row['share']:.2f} vs chance {row['chance']:.3g})"
    tags = row["tags"] or {}
    if tags and set(tags) != {""}:
        line += "; tags: " + ", ".join(f"{t or 'untagged'} {v:.2f}" for t, v in tags.items())
    return line


def expert_view(
    tokens: pd.DataFrame, domains: pd.DataFrame, decoders: Mapping[str, Decoder], min_count: int | None = None
) -> pd.DataFrame:
    """The per-expert view from expert_tokens.sql rows and domain_specialization.sql rows (columns EXPERT_COLUMNS).

    share: of the listed tokens' occurrences, the fraction routed to the expert (chance k/N); tags: the share of
    the expert's assignments from each tag (domain_specialization's expert_tag_share), largest first.
    """
    keys = ["run", "layer", "window"]
    if tokens.empty:
        return pd.DataFrame(columns=EXPERT_COLUMNS)
    cells = tokens.drop_duplicates(keys)[[*keys, "window_start", "window_end", "n_experts", "top_k", "chance"]]
    tags: dict[tuple[Any, ...], dict[str, float]] = {}
    if not domains.empty:
        d = domains[domains["expert_tag_share"].fillna(0) > 0].sort_values(
            [*keys, "expert", "expert_tag_share", "tag"], ascending=[True, True, True, True, False, True])
        for k, g in d.groupby([*keys, "expert"], sort=False):
            tags[tuple(int(x) if i else str(x) for i, x in enumerate(k))] = {
                str(t): float(v) for t, v in zip(g["tag"], g["expert_tag_share"])}
    by = {tuple(int(x) if i else str(x) for i, x in enumerate(k)): g
          for k, g in tokens.groupby([*keys, "expert"], sort=False)}
    rows = []
    for c in cells.to_dict("records"):
        dec = decoders.get(str(c["run"])) or decoder_for(None)
        for e in range(int(c["n_experts"])):
            key = (str(c["run"]), int(c["layer"]), int(c["window"]), e)
            g = by.get(key)
            if g is None:
                ids, texts, shares, seen, share = [], [], [], 0, float("nan")
            else:
                g = g.sort_values("place")
                ids = [int(t) for t in g["token_id"]]
                texts = dec.texts(ids)
                shares = [float(s) for s in g["share"]]
                seen = int(g["token_ids_seen"].iloc[0])
                share = float(g["assignments"].sum() / g["occurrences"].sum())
            row = {**c, "expert": e, "token_ids": ids, "texts": texts, "token_shares": shares, "share": share,
                   "token_ids_seen": seen, "tags": tags.get(key, {}), "decoder": dec.kind}
            row["text"] = describe_expert(row, min_count)
            rows.append(row)
    return pd.DataFrame(rows, columns=EXPERT_COLUMNS)


def decoder_notes(decoders: Mapping[str, Decoder]) -> list[str]:
    """'run X: why its ids show as #id' for every run whose ids are not decoded."""
    return [f"run {run}: {d.note}" for run, d in decoders.items() if d.note]


__all__ = ["BYTES", "Decoder", "EXPERT_COLUMNS", "byte_text", "decoder_for", "decoder_notes", "describe_expert",
           "expert_view", "run_decoders", "visible"]
