"""`moescope explain`: read a flight dump (capture/flight.py) and say what went wrong, in words and numbers.

A dump holds, per layer, a sample of the last steps' router inputs x [R, H], logits [R, E], dispatched ids
and weights [R, k], token ids, and the router's parameters; plus the experts the router picks for the same
rows in its own dtype and as a float32 copy. Each check below turns one kind of evidence into a statement:

- non-finite logits: which tokens (step, sequence, position, token) and whether their input was already bad;
- input norm outliers: rows whose norm is far above the sample's median;
- logit magnitude against the dtype: how close to its maximum, and whether its resolution at that magnitude
  is coarser than the gaps that decide the top-k;
- precision: how many tokens would route to other experts in float32;
- load: which experts took the sampled assignments, and a router bias that favours them.

numpy only (safetensors' numpy loader): explaining needs no torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..format.manifest import TraceError
from ..format.schema import FLIGHT_DIR

#: A router input row whose norm exceeds this many times the sample's median norm is an outlier.
NORM_OUTLIER_X = 10.0
#: Mantissa bits of the floating dtypes a router may run in (the resolution at a magnitude m is 2^(⌊log2 m⌋ - bits)).
MANTISSA = {"torch.float32": 23, "torch.bfloat16": 7, "torch.float16": 10, "torch.float64": 52}
#: Largest finite value of each dtype.
FMAX = {"torch.float32": 3.4028235e38, "torch.bfloat16": 3.3895314e38, "torch.float16": 65504.0,
        "torch.float64": 1.7976931348623157e308}
#: Fair-share multiple (of k/N of the tokens) above which an expert "took the load" in the sample.
HOT_SHARE_X = 2.0


@dataclass
class Finding:
    """One statement about one layer of a dump: a kind, a severity, the sentence and its numbers."""

    kind: str  # nonfinite | input_norm | logit_range | precision | load | bias | settings
    severity: str  # "problem" | "note"
    text: str
    numbers: dict[str, Any] = field(default_factory=dict)


@dataclass
class Dump:
    """A flight dump read back: its folder, meta.json and the tensors of evidence.safetensors."""

    path: Path
    meta: dict[str, Any]
    tensors: dict[str, np.ndarray]

    @property
    def step(self) -> int:
        """The step at which the dump was written."""
        return int(self.meta.get("step", -1))

    def layer(self, layer: int, name: str) -> np.ndarray | None:
        """One tensor of one layer (None when the dump does not hold it)."""
        return self.tensors.get(f"layer{layer}.{name}")

    def params(self, layer: int) -> dict[str, np.ndarray]:
        """The router parameters and buffers of one layer, by name."""
        head = f"layer{layer}.param."
        return {k[len(head):]: v for k, v in self.tensors.items() if k.startswith(head)}


def find_dumps(run_dirs: list[Path]) -> list[Path]:
    """Every complete flight dump folder under the run directories (temporary folders skipped), oldest first."""
    out: list[Path] = []
    for run_dir in run_dirs:
        folder = Path(run_dir) / FLIGHT_DIR
        if folder.is_dir():
            out += [p for p in sorted(folder.iterdir()) if p.is_dir() and not p.name.startswith(".")]
    return out


def read_dump(path: Path) -> Dump:
    """A dump folder read back; a damaged or partial one is a TraceError naming the file."""
    meta_path, data_path = path / "meta.json", path / "evidence.safetensors"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TraceError(f"{meta_path}: not a readable flight dump ({type(e).__name__}: {e})") from None
    if not isinstance(meta, dict) or meta.get("format") != "moescope-flight" or not isinstance(meta.get("layers"), list):
        raise TraceError(f"{meta_path}: not a moescope flight dump (format {meta.get('format') if isinstance(meta, dict) else None!r})")
    try:
        from safetensors.numpy import load_file

        tensors = load_file(str(data_path))
    except ImportError:
        raise TraceError("reading a flight dump needs the safetensors package: pip install safetensors") from None
    except Exception as e:  # safetensors raises its own error types for a torn or foreign file
        raise TraceError(f"{data_path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    return Dump(path, meta, tensors)


def _where(d: Dump, layer: int, rows: np.ndarray, limit: int = 5) -> str:
    """'step 7 seq 0 pos 3 (token 'x')' for the first `limit` of `rows`."""
    step, row, seq_len, tok = (d.layer(layer, n) for n in ("step", "row", "seq_len", "token_ids"))
    parts = []
    for i in rows[:limit]:
        where = f"step {int(step[i])}" if step is not None else "a sampled step"
        if row is not None and seq_len is not None and int(seq_len[i]) > 0:
            b, p = divmod(int(row[i]), int(seq_len[i]))
            where += f" seq {b} pos {p}"
        elif row is not None:
            where += f" row {int(row[i])}"
        if tok is not None and int(tok[i]) >= 0:
            where += f" (token {int(tok[i])})"
        parts.append(where)
    more = f" and {len(rows) - limit} more" if len(rows) > limit else ""
    return ", ".join(parts) + more


def _resolution(m: Any, dtype: str) -> np.ndarray | None:
    """The spacing of representable values of `dtype` at magnitudes m, elementwise (None for an unknown dtype)."""
    bits = MANTISSA.get(dtype)
    if bits is None:
        return None
    with np.errstate(divide="ignore"):
        return 2.0 ** (np.floor(np.log2(np.maximum(np.asarray(m, dtype=np.float64), 1e-30))) - bits)


def explain_layer(d: Dump, info: dict[str, Any]) -> list[Finding]:
    """The findings of one layer of a dump, problems first."""
    layer = int(info["layer"])
    x, logits, ids = d.layer(layer, "x"), d.layer(layer, "logits"), d.layer(layer, "ids")
    if x is None or ids is None:
        return [Finding("data", "note", f"layer {layer}: the dump holds no sampled rows")]
    n_rows, n, k = int(x.shape[0]), int(info["n_experts"]), int(info["top_k"])
    out: list[Finding] = []
    x_ok = np.isfinite(x).all(-1)  # [R]
    has_logits = logits is not None and not np.isnan(logits).all()
    # 1. non-finite logits
    if has_logits:
        bad = np.flatnonzero(~np.isfinite(logits).all(-1))  # rows with NaN or ±Inf in any expert's logit
        bad = bad[np.isnan(logits[bad]).any(-1) | np.isposinf(logits[bad]).any(-1)]  # a lone -inf is a mask
        if len(bad):
            upstream = int((~x_ok[bad]).sum())
            why = (f"{upstream} of them already had NaN/Inf in the router input: the router only passed it on; "
                   "look upstream of layer {layer} (embeddings, attention, the previous block) at those positions"
                   if upstream else "their router inputs were finite: the logits overflowed inside the router "
                   f"(input norms up to {float(np.linalg.norm(x[bad], axis=-1).max()):.3g})")
            out.append(Finding("nonfinite", "problem",
                               f"layer {layer}: {len(bad)} of {n_rows} sampled tokens have non-finite router logits: "
                               f"{_where(d, layer, bad)}. {why.format(layer=layer)}",
                               {"tokens": int(len(bad)), "sampled": n_rows, "upstream": upstream}))
    elif not x_ok.all():
        bad = np.flatnonzero(~x_ok)
        out.append(Finding("nonfinite", "problem", f"layer {layer}: {len(bad)} of {n_rows} sampled router inputs hold "
                           f"NaN/Inf: {_where(d, layer, bad)}", {"tokens": int(len(bad)), "sampled": n_rows}))
    # 2. input norm outliers (finite rows)
    norms = np.linalg.norm(np.where(x_ok[:, None], x, 0.0), axis=-1)  # [R]
    med = float(np.median(norms[x_ok])) if x_ok.any() else 0.0
    if med > 0:
        hot = np.flatnonzero(x_ok & (norms > NORM_OUTLIER_X * med))
        if len(hot):
            out.append(Finding("input_norm", "problem",
                               f"layer {layer}: {len(hot)} sampled tokens have router-input norms above "
                               f"{NORM_OUTLIER_X:g}× the median ({med:.3g}); largest {float(norms[hot].max()):.3g}: "
                               f"{_where(d, layer, hot[np.argsort(-norms[hot])])}",
                               {"tokens": int(len(hot)), "median_norm": med, "max_norm": float(norms[hot].max())}))
    # 3. logit magnitude against the dtype's range and resolution
    dtype = str(info.get("param_dtype") or info.get("logits_dtype") or "torch.float32")
    if has_logits:
        ok = np.isfinite(logits).all(-1)  # [R]
        fin = np.abs(logits[ok])
        mmax = float(fin.max()) if fin.size else 0.0
        srt = np.sort(logits[ok], -1)  # [R', E]
        gap = srt[:, -k] - srt[:, -k - 1] if n > k else np.full(len(srt), np.inf)  # the margin deciding the top-k
        row_max = fin.max(-1) if fin.size else np.zeros(0)
        bits = MANTISSA.get(dtype)
        row_res = _resolution(row_max, dtype)  # [R']: the dtype's spacing at each row's largest logit
        if row_res is None:
            row_res = np.zeros_like(row_max)
        # the probabilities the top-k is taken from, in float32 as a router computes them: a saturated softmax
        # (or sigmoid) leaves the k-th and (k+1)-th equal (both 0, or both 1), and the pick between them arbitrary
        z = srt.astype(np.float32)  # [R', E] sorted logits
        if info.get("probs") == "sigmoid":
            pr = (1.0 / (1.0 + np.exp(-z))).astype(np.float32)
        else:
            with np.errstate(under="ignore", over="ignore"):
                ez = np.exp(z - z[:, -1:])
                pr = (ez / ez.sum(-1, keepdims=True)).astype(np.float32)
        saturated = (pr[:, -k] == pr[:, -k - 1]) if n > k else np.zeros(len(srt), dtype=bool)  # [R']
        ties = int(((gap <= row_res) | saturated).sum())
        r = _resolution(mmax, dtype)
        res = float(r) if r is not None and mmax > 0 else None
        limit = FMAX.get(dtype)
        name = dtype.split(".")[-1]
        nums = {"max_abs_logit": mmax, "dtype": dtype, "resolution": res, "rounding_ties": ties,
                "saturated": int(saturated.sum()), "median_topk_gap": float(np.median(gap)) if len(gap) else None}
        if ties and bits is not None:
            out.append(Finding("logit_range", "problem",
                               f"layer {layer}: router logits reach {mmax:.4g}, where {name} resolves steps of "
                               f"{res:.3g}; for {ties} of {len(gap)} sampled tokens the top-{k} is decided by rounding "
                               f"({int(saturated.sum())} with probabilities #{k} and #{k + 1} equal: a saturated "
                               f"{info.get('probs') or 'softmax'}; the rest with a logit gap at or below the resolution). "
                               "A router temperature or logit scale that saturates the dtype", nums))
        elif limit is not None and mmax > 0.01 * limit:
            out.append(Finding("logit_range", "problem", f"layer {layer}: router logits reach {mmax:.4g}, "
                               f"{mmax / limit:.1%} of the largest {name} value", nums))
        else:
            out.append(Finding("logit_range", "note", f"layer {layer}: router logits up to {mmax:.4g} in {name}"
                               + (f" (resolution there {res:.3g}; no top-{k} decided by rounding)" if res else ""),
                               nums))
    # 4. precision: experts in the model's dtype vs float32
    nat, f32 = d.layer(layer, "ids_native"), d.layer(layer, "ids_fp32")
    if nat is not None and f32 is not None and len(nat):
        flips = int((np.sort(nat, -1) != np.sort(f32, -1)).any(-1).sum())
        share = flips / len(nat)
        name = dtype.split(".")[-1]
        if name in ("float32", "float64"):
            text = f"layer {layer}: the router runs in {name} already (no lower-precision rounding to measure)"
        elif flips:
            text = (f"layer {layer}: {flips} of {len(nat)} sampled tokens ({share:.1%}) would route to other experts "
                    f"if the router ran in float32 instead of {name}")
        else:
            text = f"layer {layer}: running the router in float32 instead of {name} changes no sampled token's experts"
        out.append(Finding("precision", "problem" if flips else "note", text,
                           {"flipped": flips, "sampled": int(len(nat)), "share": share, "dtype": dtype}))
    # 5. which experts took the load (share of the sampled tokens routed to each; fair share k/N), and a bias
    valid = (ids >= 0) & (ids < n)
    counts = np.bincount(ids[valid].astype(np.int64), minlength=n)[:n]  # [E] assignments
    total = int(counts.sum())
    if total:
        fair = k / n
        share = counts / n_rows  # [E]: share of the sampled tokens that went to each expert
        hot = np.flatnonzero(share > min(HOT_SHARE_X * fair, (1 + fair) / 2))
        order = hot[np.argsort(-share[hot])]
        dead = np.flatnonzero(counts == 0)
        if len(order):
            listed = ", ".join(f"expert {int(e)} {share[e]:.0%}" for e in order[:4])
            text = (f"layer {layer}: {len(order)} of {n} experts took far more than their fair share of the sampled "
                    f"tokens ({listed} of the tokens; fair share k/N = {fair:.1%})"
                    + (f"; {len(dead)} expert(s) took none: {', '.join(map(str, dead[:8].tolist()))}" if len(dead) else ""))
            out.append(Finding("load", "problem", text, {"experts": order.tolist(), "shares": share[order].tolist(),
                                                         "fair": fair, "dead": dead.tolist()}))
        else:
            out.append(Finding("load", "note", f"layer {layer}: no expert took more than {HOT_SHARE_X:g}× its fair share "
                               f"(k/N = {fair:.1%}) of the sampled tokens"
                               + (f"; {len(dead)} took none" if len(dead) else ""), {"dead": dead.tolist()}))
        for pname, val in d.params(layer).items():
            v = np.asarray(val).reshape(-1)
            if "bias" not in pname.lower() or v.shape[0] != n:
                continue
            top = int(np.argmax(v))
            rest = np.delete(v, top)
            spread = float(np.median(np.abs(rest - np.median(rest)))) or float(np.std(rest)) or 1e-12
            lead = float(v[top] - np.median(rest))
            if len(order) and top == int(order[0]) and lead > 3 * spread:
                out.append(Finding("bias", "problem",
                                   f"layer {layer}: the router's {pname}[{top}] = {v[top]:+.3g} leads the other "
                                   f"experts' median by {lead:.3g} ({lead / spread:.0f}× their spread), and expert {top} "
                                   f"takes {share[top]:.0%} of the sampled tokens: a hot bias",
                                   {"param": pname, "expert": top, "value": float(v[top]), "lead": lead}))
    settings = info.get("settings") or {}
    if settings:
        out.append(Finding("settings", "note", f"layer {layer}: router settings " +
                           ", ".join(f"{k_}={v_:g}" for k_, v_ in settings.items()), dict(settings)))
    return sorted(out, key=lambda f: f.severity != "problem")


def explain(d: Dump, layer: int | None = None) -> list[Finding]:
    """Every layer's findings of one dump (or one layer's); a layer the dump lacks is a ValueError."""
    infos = [i for i in d.meta["layers"] if layer is None or int(i["layer"]) == int(layer)]
    if not infos:
        have = sorted(int(i["layer"]) for i in d.meta["layers"])
        raise ValueError(f"layer {layer} is not in flight dump {d.path.name} (layers {have})")
    return [f for info in infos for f in explain_layer(d, info)]


def render(d: Dump, findings: list[Finding]) -> str:
    """A dump's findings as text: a heading (why and when it was written), then one line per finding."""
    why = d.meta.get("reason", "?")
    alerts = d.meta.get("alerts") or []
    head = f"flight dump {d.path.name}: written at step {d.step} ({why}" + (
        f": {alerts[0].get('message')}" if alerts else "") + ")"
    lines = [head]
    for f in findings:
        lines.append(f"  {'!' if f.severity == 'problem' else '-'} {f.text}")
    return "\n".join(lines)


__all__ = ["Dump", "FLIGHT_DIR", "Finding", "explain", "explain_layer", "find_dumps", "read_dump", "render"]


def select_dumps(root: str | Path, run: str | None = None, step: int | None = None) -> list[Dump]:
    """The dumps to explain under a trace root: per run its latest, or the one written at (or covering) `step`.

    A root without dumps, or a run/step that matches none, is a ValueError naming what exists (a usage error).
    """
    from .trace import discover

    infos = discover([root])
    if run is not None:
        names = [i.run for i in infos]
        infos = [i for i in infos if i.run == run]
        if not infos:
            raise ValueError(f"run {run!r} is not in {root} (runs: {', '.join(sorted(names)[:10])})")
    out: list[Dump] = []
    seen: list[str] = []
    for info in infos:
        paths = find_dumps([info.path])
        if not paths:
            continue
        dumps = [read_dump(p) for p in paths]
        seen += [f"{info.run}@{d.step}" for d in dumps]
        if step is None:
            out.append(max(dumps, key=lambda d: (d.step, d.path.name)))
            continue
        exact = [d for d in dumps if d.step == step]
        covering = [d for d in dumps if any(step in (ly.get("steps") or []) for ly in d.meta["layers"])]
        if exact or covering:
            out.append((exact or covering)[-1])
    if not seen:
        raise ValueError(f"no flight dump under {root}: record with moescope.record(..., flight_steps=N) "
                         "(dumped when an alert fires, or by rec.dump_flight())")
    if not out:
        raise ValueError(f"no flight dump at or covering step {step} (dumps: {', '.join(seen[:10])})")
    return out
