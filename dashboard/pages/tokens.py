"""Tokens: for token-level traces, one sequence's routing in every layer, token by token."""

from __future__ import annotations

from typing import Any

import dash
import pandas as pd
from dash import html

from moescope.dashboard import components as C
from moescope.dashboard import figures as F
from moescope.dashboard.state import as_int

dash.register_page(__name__, path="/tokens", name="Tokens", title="moescope · Tokens", order=5)


def _strip(tok: pd.DataFrame, layer: int) -> Any:
    """The sequence as text, each token on its first-choice expert's colour in `layer` (hover: all experts)."""
    df = tok[tok["layer"] == layer]
    if df.empty:
        return C.message(f"Layer {layer} has no routing rows for this sequence.", "info")
    spans = []
    for r in df.itertuples():
        experts = ", ".join(f"E{e} ({w:.2f})" for e, w in zip(r.experts, r.weights))
        spans.append(
            html.Span(
                r.text, className="ms-tok",
                style={"backgroundColor": F.expert_color(r.expert0)},
                title=f"pos {r.pos} · token {r.token_id} ({r.text}) → {experts}",
            )
        )
    return html.Div(spans, className="ms-tokstrip", id="tok-strip")


#: Tokens listed per expert in the "what each expert takes" table.
TOP_TOKENS = 8


def _experts_table(data: Any, run: str, layer: int) -> Any:
    """Per expert of `layer`: the tokens it takes most (decoded), its share vs chance k/N, its shares by tag."""
    view = data.expert_tokens(run, top=TOP_TOKENS)
    note = data.decoder(run).note
    rows = view[view["layer"] == layer] if len(view) else view
    if rows.empty:
        return C.message(f"Layer {layer}: no token id seen 5+ times in the token-level rows of {run!r}.", "info")
    head = html.Tr([html.Th(h) for h in ("expert", "takes", "share", "chance", "tags")])
    body = []
    for r in rows.itertuples():
        more = " …" if int(r.token_ids_seen) > len(r.texts) else ""
        toks = [html.Code(t, className="ms-tokcode", title=f"token {i}: {s:.0%} of its occurrences")
                for t, i, s in zip(r.texts, r.token_ids, r.token_shares)]
        tags = ", ".join(f"{t or 'untagged'} {v:.2f}" for t, v in (r.tags or {}).items())
        body.append(html.Tr([
            html.Td([html.Span(className="ms-swatch", style={"backgroundColor": F.expert_color(int(r.expert))}),
                     f"E{int(r.expert)}"]),
            html.Td([*toks, more] if toks else "–"),
            html.Td("–" if pd.isna(r.share) else f"{r.share:.2f}"),
            html.Td(f"{r.chance:.3g}"),
            html.Td(tags or "–"),
        ], title=r.text))
    parts = [html.Table([html.Thead(head), html.Tbody(body)], className="ms-exptable", id="tok-experts")]
    if note:
        parts.insert(0, C.message(note, "info", id="tok-decoder-note"))
    return html.Div(parts)


def seq_key(rank: Any, tag: Any, seq: Any) -> str:
    """The URL value naming a sequence of a step: 'RANK:TAG:SEQ' (tags may hold ':', ranks and seqs do not)."""
    return f"{int(rank)}:{tag}:{int(seq)}"


def parse_seq_key(key: str) -> tuple[int, str, int]:
    """(rank, tag, seq) from seq_key()'s text."""
    rank, rest = key.split(":", 1)
    tag, seq = rest.rsplit(":", 1)
    return int(rank), tag, int(seq)


def _legend(n: int) -> Any:
    return html.Div(
        [html.Span([html.Span(className="ms-swatch", style={"backgroundColor": F.expert_color(e)}), f"E{e}"],
                   className="ms-legend-item") for e in range(n)],
        className="ms-legend",
    )


def layout(**query: Any) -> html.Div:
    """The tokens page (extra URL keys: tstep, seq as 'RANK:TAG:SEQ')."""
    data, state = C.page_state(query, prefer="routing")
    return C.guard("tokens", lambda: _page(data, state, query))


def _page(data: Any, state: Any, query: dict[str, Any]) -> html.Div:
    head = C.header("Tokens", "Which experts each token went to, in every layer (token-level traces only), and "
                    "what each expert takes. Token ids are decoded with the run's tokenizer (␣ space, ↵ newline); "
                    "a run that records none shows ids as #id.")
    if state.run is None or state.layer is None:
        return html.Div([head, C.message("This trace has no MoE layers to show.", "warn")])
    run, layer = state.run, state.layer
    seqs = data.sequences(run)
    if seqs.empty:
        runs = data.runs()
        others = [r for r, n in zip(runs["run"], runs["routing_rows"]) if n > 0]
        hint = f" Runs with token-level routing: {', '.join(others)}." if others else ""
        return html.Div([head, C.selection_bar(state, data, steps=False), C.message(
            f"Run {run!r} was recorded without token-level routing (tokens=0). Record with "
            "moescope.record(model, path, tokens=0.25) to keep whole sequences." + hint, "info")])
    steps = sorted(int(s) for s in seqs["step"].unique())
    step = as_int(query.get("tstep"))
    step = step if step in steps else steps[-1]
    at = seqs[seqs["step"] == step]
    multi_rank = at["rank"].nunique() > 1
    keys = [seq_key(r, t, s) for r, t, s in zip(at["rank"], at["tag"], at["seq"])]
    labels = [
        (f"rank {int(r)} · " if multi_rank else "") + f"{t or 'untagged'} · seq {int(s)} ({int(n)} tokens)"
        for r, t, s, n in zip(at["rank"], at["tag"], at["seq"], at["tokens"])
    ]
    key = query.get("seq") if query.get("seq") in keys else keys[0]
    rank, tag, seq = parse_seq_key(key)
    tok = data.token_routing(run, step, seq, tag, rank)
    n = data.n_experts(run)
    step_ctl = C.choice("tstep", "Step", steps, step, labels=[f"step {s}" for s in steps], width="140px")
    return html.Div(
        [
            head,
            C.selection_bar(state, data, steps=False, extra=[
                step_ctl, C.choice("seq", "Sequence", keys, key, labels=labels, width="300px")]),
            C.card(
                html.Div(C.guard("token heatmap", lambda: C.figure(data, "tok-heatmap", (run, step, key), lambda: (
                    F.token_heatmap(tok, n, f"{run}, step {step}, {tag or 'untagged'} seq {seq}: first-choice "
                                    "expert per layer (cell text: all chosen experts)")))), className="ms-scroll-x"),
                _legend(n),
            ),
            C.card(
                C.guard("token strip", lambda: _strip(tok, layer)),
                title=f"Layer {layer}: the sequence coloured by first-choice expert (hover a token for all experts)",
            ),
            C.card(
                C.guard("expert tokens", lambda: _experts_table(data, run, layer)),
                title=f"Layer {layer}: what each expert takes (the token ids, seen 5+ times in the whole run, with "
                      "the largest share of their occurrences routed to it; share vs chance k/N; share of its "
                      "load by tag)",
            ),
        ]
    )
