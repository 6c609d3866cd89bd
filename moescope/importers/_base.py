"""What every importer shares: options, the table accumulator, id mapping, source listing and the run writer.

An importer reads a producer's files and fills `Tables` (expert_load, router_stats, routing) through two calls:
`add_routes` for per-token routing (loads, token counts and routing rows all come from the same ids, so the
tables always agree), `add_counts` for per-expert load counts without tokens. `write_import`
turns the batches into parts with `moescope.format.writer.write_part` (the trace schema is the writer's, never
redeclared here) and writes the manifest last, in a temporary directory renamed into place, so a failed import
leaves no half run behind.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from ..errors import CLIError
from ..format.manifest import TraceError, now_utc
from ..format.writer import write_manifest, write_part

#: Rows per batch (one Parquet part per table): large sources become a few large parts, not one per pass.
BATCH_ROWS = 1_000_000

#: Options an importer may read; the command refuses the ones a format does not use.
OPTION_HELP = {
    "num_experts": "--num-experts N",
    "top_k": "--top-k K",
    "micro_batch_size": "--micro-batch-size B",
    "physical_to_logical": "--physical-to-logical FILE",
}


@dataclass
class ImportOptions:
    """What the user told `moescope import` beyond the source files."""

    num_experts: int | None = None
    top_k: int | None = None
    #: source layer numbers to keep (None: all)
    layers: frozenset[int] | None = None
    micro_batch_size: int | None = None
    physical_to_logical: Path | None = None
    tag: str = ""


@dataclass
class Importer:
    """One source format: its name, the producer, what it reads (for --help) and the function that reads it."""

    name: str
    producer: str
    reads: str
    #: (source files, options, notes list to append to, progress) -> batches of (rank, Tables)
    read: Callable[[list[Path], ImportOptions, list[str], Progress], Iterator[tuple[int, Tables]]]
    #: which ImportOptions fields (beyond layers and tag) this format uses
    options: tuple[str, ...] = ()
    #: file name patterns of the format, used when SRC is a directory
    patterns: tuple[str, ...] = ("*.pt",)


@dataclass
class LayerSeen:
    """What the import learned about one trace layer: its expert count and the largest routes per token."""

    n_experts: int
    top_k: int | None = None
    assignments: int = 0


class Progress:
    """Progress lines on stderr for long imports: the first and last file, and at most one line a second between."""

    def __init__(self, total_files: int, quiet: bool = False, stream: Any = None) -> None:
        self.total = total_files
        self.quiet = quiet
        self.stream = stream if stream is not None else sys.stderr
        self.done = 0
        self.rows = 0
        self._last = 0.0
        self._t0 = time.monotonic()

    def file(self, path: Path) -> None:
        """A source file is about to be read: the first and last always shown, the others once a second."""
        self.done += 1
        self._say(f"[{self.done}/{self.total}] {path}", force=self.done in (1, self.total))

    def tick(self, what: str) -> None:
        """Work inside a file; printed when a second has passed since the last line."""
        self._say(f"[{self.done}/{self.total}] {what}", force=False)

    def _say(self, text: str, force: bool) -> None:
        now = time.monotonic()
        if self.quiet or (not force and now - self._last < 1.0):
            return
        self._last = now
        self.stream.write(f"moescope import: {text} ({now - self._t0:.1f} s)\n")
        self.stream.flush()


@dataclass
class Tables:
    """Rows of one batch for expert_load, router_stats and routing, kept as numpy columns until `build`."""

    tag: str
    keep_layers: frozenset[int] | None = None
    seen: dict[int, LayerSeen] = field(default_factory=dict)
    #: (step, layer) -> [assignments [E], weight sums [E] or None]; one row per key, summed within a batch
    _load: dict[tuple[int, int], list[Any]] = field(default_factory=dict)
    #: (step, layer) -> tokens with at least one route
    _stats: dict[tuple[int, int], int] = field(default_factory=dict)
    _routes: list[dict[str, Any]] = field(default_factory=list)

    def wants(self, layer: int) -> bool:
        """Whether `layer` is kept (--layers)."""
        return self.keep_layers is None or layer in self.keep_layers

    def _see(self, layer: int, n_experts: int, top_k: int | None, assignments: int) -> None:
        s = self.seen.get(layer)
        if s is None:
            s = self.seen[layer] = LayerSeen(n_experts, top_k)
        s.n_experts = max(s.n_experts, n_experts)
        if top_k is not None:
            s.top_k = max(s.top_k or 0, top_k)
        s.assignments += assignments

    def add_counts(self, step: int, layer: int, counts: np.ndarray, where: str, top_k: int | None = None) -> bool:
        """Per-expert assignment counts [E] of one (step, layer) without per-token data; False if nothing to add.

        A (step, layer) with no assignments adds nothing: it says no token passed, not that experts were idle.
        """
        if not self.wants(layer):
            return False
        c = np.asarray(counts)
        if c.ndim != 1:
            raise TraceError(f"{where}: expected per-expert counts [E], got shape {list(c.shape)}")
        if c.size and (not np.all(np.isfinite(c)) or c.min() < 0 or not np.all(c == np.round(c))):
            raise TraceError(f"{where}: counts must be non-negative integers (layer {layer})")
        c = c.astype(np.int64)
        total = int(c.sum())
        if total == 0:
            return False
        self._add_load(step, layer, c, None, where)
        self._see(layer, c.shape[0], top_k, total)
        return True

    def add_routes(
        self,
        step: int,
        layer: int,
        ids: np.ndarray,
        n_experts: int,
        where: str,
        *,
        seq: np.ndarray,
        pos: np.ndarray,
        token_id: np.ndarray | None = None,
        weights: np.ndarray | None = None,
        top_k: int | None = None,
    ) -> int:
        """Per-token expert ids [T, k] of one (step, layer) (-1: no route in that slot); returns tokens added.

        Loads, token counts and routing rows all come from these ids, so every table agrees. A token with no
        route adds nothing anywhere; an id outside [0, n_experts) is a TraceError naming `where` (never clamped).
        """
        if not self.wants(layer):
            return 0
        ids = np.asarray(ids)
        if ids.ndim != 2:
            raise TraceError(f"{where}: expected expert ids [tokens, k], got shape {list(ids.shape)}")
        ids = ids.astype(np.int64)
        valid = ids >= 0  # [T, k]
        bad = ids[valid & (ids >= n_experts)]
        if bad.size:
            raise TraceError(f"{where}: expert id {int(bad.max())} at layer {layer} is outside [0, {n_experts})")
        if np.any(ids < -1):
            raise TraceError(f"{where}: expert id {int(ids.min())} at layer {layer} is negative")
        routed = valid.any(axis=1)  # [T]
        n_tok = int(routed.sum())
        if n_tok == 0:
            return 0
        counts = np.bincount(ids[valid], minlength=n_experts).astype(np.int64)  # [E]
        wsum = None
        if weights is not None:
            w = np.asarray(weights, dtype=np.float64)  # [T, k]
            if w.shape != ids.shape:
                raise TraceError(f"{where}: weights {list(w.shape)} do not match ids {list(ids.shape)}")
            if not np.all(np.isfinite(w[valid])):
                raise TraceError(f"{where}: non-finite routing weight at layer {layer}")
            wsum = np.bincount(ids[valid], weights=w[valid], minlength=n_experts)  # [E]
        self._add_load(step, layer, counts, wsum, where)
        self._stats[(step, layer)] = self._stats.get((step, layer), 0) + n_tok
        # Routing rows keep each token's valid ids in slot order.
        rows = np.nonzero(routed)[0]
        sub_ids, sub_valid = ids[rows], valid[rows]
        lens = sub_valid.sum(axis=1)
        flat = sub_ids[sub_valid]
        offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
        experts = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat.astype(np.int16)))
        if weights is not None:
            wf = np.asarray(weights, dtype=np.float32)[rows][sub_valid].astype(np.float16)
            wl = pa.ListArray.from_arrays(pa.array(offsets), pa.array(wf, pa.float16()))
        else:
            wl = pa.nulls(len(rows), pa.list_(pa.float16()))
        self._routes.append({
            "step": np.full(len(rows), step, np.int64), "layer": np.full(len(rows), layer, np.int16),
            "seq": np.asarray(seq)[rows].astype(np.int32), "pos": np.asarray(pos)[rows].astype(np.int32),
            "token_id": (pa.nulls(len(rows), pa.int32()) if token_id is None
                         else pa.array(np.asarray(token_id)[rows].astype(np.int32))),
            "experts": experts, "weights": wl,
        })
        self._see(layer, n_experts, top_k if top_k is not None else int(lens.max()), int(counts.sum()))
        return n_tok

    def _add_load(self, step: int, layer: int, counts: np.ndarray, wsum: np.ndarray | None, where: str) -> None:
        """Sum into the (step, layer) row: several requests of one step, or one pass's layers split by rank."""
        have = self._load.get((step, layer))
        if have is None:
            self._load[(step, layer)] = [counts, wsum]
            return
        if have[0].shape != counts.shape:
            raise TraceError(f"{where}: layer {layer} has {counts.shape[0]} experts here and {have[0].shape[0]} "
                             "earlier in the same step")
        have[0] = have[0] + counts
        have[1] = None if have[1] is None or wsum is None else have[1] + wsum

    def take_routes(self) -> Tables:
        """Move the routing rows into a new batch, keeping the loads here (a step spread over many batches)."""
        moved = Tables(self.tag, self.keep_layers)
        moved._routes, self._routes = self._routes, []
        return moved

    @property
    def rows(self) -> int:
        """Rows held so far (expert_load plus routing): readers start a new batch past `BATCH_ROWS`."""
        return sum(c.shape[0] for c, _ in self._load.values()) + sum(len(r["step"]) for r in self._routes)

    def build(self, run: str, rank: int) -> dict[str, pa.Table]:
        """Arrow tables of this batch (columns the source does not measure are NULL, never 0)."""
        out: dict[str, pa.Table] = {}
        if self._load:
            keys = sorted(self._load)
            loads = [self._load[k] for k in keys]
            sizes = [c.shape[0] for c, _ in loads]
            n = int(sum(sizes))
            wcol = np.concatenate([w if w is not None else np.full(c.shape[0], np.nan) for c, w in loads])
            out["expert_load"] = pa.table({
                "run": pa.array([run] * n, pa.string()), "rank": np.full(n, rank, np.int16),
                "step": np.concatenate([np.full(k, s, np.int64) for (s, _), k in zip(keys, sizes)]),
                "tag": pa.array([self.tag] * n, pa.string()),
                "layer": np.concatenate([np.full(k, ly, np.int16) for (_, ly), k in zip(keys, sizes)]),
                "expert": np.concatenate([np.arange(k, dtype=np.int16) for k in sizes]),
                "tokens": np.concatenate([c for c, _ in loads]),
                "prob_sum": pa.nulls(n, pa.float64()),  # the full router distribution is not in these sources
                "weight_sum": pa.array(wcol, pa.float64(), mask=np.isnan(wcol)),
            })
        if self._stats:
            skeys = sorted(self._stats)
            m = len(skeys)
            nulls = {c: pa.nulls(m, pa.float64()) for c in
                     ("entropy_sum", "lse_sq_sum", "lse_sum", "lse_max", "margin_sum")}
            out["router_stats"] = pa.table({
                "run": pa.array([run] * m, pa.string()), "rank": np.full(m, rank, np.int16),
                "step": np.array([s for s, _ in skeys], np.int64),
                "tag": pa.array([self.tag] * m, pa.string()),
                "layer": np.array([ly for _, ly in skeys], np.int16),
                "tokens": np.array([self._stats[k] for k in skeys], np.int64),
                **nulls,
                "nonfinite": pa.nulls(m, pa.int64()),  # logits are not in these sources: not measured
                "dropped": np.zeros(m, np.int64),
            })
        if self._routes:
            cols: dict[str, Any] = {}
            for name in ("step", "layer", "seq", "pos"):
                cols[name] = np.concatenate([r[name] for r in self._routes])
            n = len(cols["step"])
            cols["token_id"] = pa.concat_arrays([pa.array(r["token_id"], pa.int32()) for r in self._routes])
            cols["experts"] = pa.concat_arrays([r["experts"] for r in self._routes])
            cols["weights"] = pa.concat_arrays([r["weights"] for r in self._routes])
            out["routing"] = pa.table({
                "run": pa.array([run] * n, pa.string()), "rank": np.full(n, rank, np.int16),
                "step": cols["step"], "tag": pa.array([self.tag] * n, pa.string()), "layer": cols["layer"],
                "seq": cols["seq"], "pos": cols["pos"], "token_id": cols["token_id"],
                "experts": cols["experts"], "weights": cols["weights"],
                "entropy": pa.nulls(n, pa.float16()), "lse": pa.nulls(n, pa.float16()),
                "margin": pa.nulls(n, pa.float16()),
            })
        return out


# -- helpers the format modules share --------------------------------------------------------------------------


def list_sources(src: Path, patterns: tuple[str, ...]) -> list[Path]:
    """SRC as a sorted list of files: the file itself, or the files of a directory matching the format's patterns."""
    if not src.exists():
        raise TraceError(f"{src}: no such file or directory")
    if src.is_file():
        return [src]
    files = sorted({p for pat in patterns for p in src.glob(pat) if p.is_file()})
    if not files:
        raise TraceError(f"{src}: no {' or '.join(patterns)} files in this directory")
    return files


def steps_from_names(files: list[Path]) -> tuple[list[int], str]:
    """One step per file: the last number in each file name when every name has a distinct one, else the order."""
    nums = []
    for p in files:
        found = re.findall(r"\d+", p.stem)
        nums.append(int(found[-1]) if found else None)
    if all(n is not None for n in nums) and len(set(nums)) == len(nums):
        return [int(n) for n in nums if n is not None], "the number in each file name"
    return list(range(len(files))), "the files' order (names without distinct numbers)"


def load_torch(path: Path) -> Any:
    """A `torch.save` file, read with weights_only=True (tensors, lists, dicts, numbers: no code runs)."""
    try:
        import torch
    except ImportError:
        raise ImportError(f"{path}: reading torch.save files needs torch: pip install 'moescope[torch]'") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and unpickling errors all mean the same to the user: unreadable
        raise TraceError(f"{path}: not a readable torch.save file ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:160]})") from None


def as_array(x: Any, where: str) -> np.ndarray:
    """A tensor, numpy array or nested list as a numpy array; anything else is a TraceError naming `where`."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor, without importing torch here
        return x.detach().cpu().numpy()
    if isinstance(x, np.ndarray):
        return x
    if isinstance(x, (list, tuple)):
        try:
            return np.asarray(x)
        except ValueError:
            pass
    raise TraceError(f"{where}: expected a tensor, got {type(x).__name__}")


def load_map(path: Path) -> np.ndarray:
    """A physical→logical expert map [layers, physical] or [physical] from .npy, .npz or a torch.save file."""
    if not path.exists():
        raise CLIError(f"{path}: no such file (--physical-to-logical)")
    if path.suffix == ".npy":
        try:
            m = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise TraceError(f"{path}: not a readable .npy file ({' '.join(str(e).split())[:120]})") from None
    else:
        obj = load_torch(path)
        if isinstance(obj, dict):
            obj = obj.get("physical_to_logical_map", obj.get("last_physical_to_logical_map"))
        m = as_array(obj, str(path))
    return np.atleast_2d(m)


def check_map(p2l: np.ndarray, n_layers: int, where: str, num_experts: int | None) -> tuple[np.ndarray, int]:
    """Validate a physical→logical map [L or 1, P]; returns it as int64 and the logical expert count.

    Without --num-experts the count is max(map) + 1: every logical expert has at least one physical slot in
    both SGLang's and vLLM's maps (a logical expert without a slot could receive no token anyway).
    """
    p2l = np.asarray(p2l)
    if p2l.ndim != 2 or p2l.shape[0] not in (1, n_layers):
        raise TraceError(f"{where}: physical-to-logical map of shape {list(p2l.shape)} does not fit "
                         f"{n_layers} layers")
    p2l = p2l.astype(np.int64)
    if p2l.size and p2l.min() < 0:
        raise TraceError(f"{where}: physical-to-logical map holds {int(p2l.min())}, not a logical expert")
    n = int(p2l.max()) + 1 if p2l.size else 0
    if num_experts is not None:
        if n > num_experts:
            raise TraceError(f"{where}: physical-to-logical map names logical expert {n - 1}, but "
                             f"--num-experts is {num_experts}")
        n = num_experts
    return p2l, n


def logical_counts(phys: np.ndarray, p2l_row: np.ndarray, n_logical: int, where: str) -> np.ndarray:
    """Per-logical-expert counts [E] from per-physical-slot counts [P]: each slot's load added to its expert."""
    if phys.shape[-1] != p2l_row.shape[-1]:
        raise TraceError(f"{where}: {phys.shape[-1]} physical slots, but the map has {p2l_row.shape[-1]}")
    return np.bincount(p2l_row, weights=phys.astype(np.float64), minlength=n_logical).round().astype(np.int64)


def logical_ids(ids: np.ndarray, p2l_row: np.ndarray, where: str) -> np.ndarray:
    """Per-token physical slot ids [T, k] (-1: none) as logical expert ids through the map."""
    ids = ids.astype(np.int64)
    bad = ids[ids >= p2l_row.shape[0]]
    if bad.size:
        raise TraceError(f"{where}: physical expert slot {int(bad.max())} is outside the map's "
                         f"{p2l_row.shape[0]} slots")
    return np.where(ids >= 0, p2l_row[np.clip(ids, 0, None)], -1)


def parse_layers(spec: str) -> frozenset[int]:
    """'3-5,7' -> {3, 4, 5, 7}; anything else is a usage error."""
    out: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise CLIError(f"--layers {spec!r}: expected numbers and ranges like '3-5,7'")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise CLIError(f"--layers {spec!r}: range {part} runs backwards")
        out.update(range(lo, hi + 1))
    return frozenset(out)


def ranges_text(values: Iterable[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    vs = sorted(set(values))
    out: list[str] = []
    i = 0
    while i < len(vs):
        j = i
        while j + 1 < len(vs) and vs[j + 1] == vs[j] + 1:
            j += 1
        out.append(str(vs[i]) if i == j else f"{vs[i]}-{vs[j]}")
        i = j + 1
    return ", ".join(out)


# -- writing ------------------------------------------------------------------------------------------------------


@dataclass
class ImportSummary:
    """What an import wrote: the run directory, ranks, steps, layers and assignments, plus notes for the user."""

    run_dir: Path
    ranks: list[int]
    steps: int
    layers: dict[int, LayerSeen]
    notes: list[str]
    sources: list[Path]

    def text(self) -> str:
        """The lines `moescope import` prints."""
        total = sum(s.assignments for s in self.layers.values())
        lines = [f"imported {self.steps} step(s) x {len(self.layers)} layer(s), {total:,} expert assignments "
                 f"from {len(self.sources)} file(s) into {self.run_dir}"]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def write_import(
    importer: Importer,
    sources: list[Path],
    dst: Path,
    run: str,
    opts: ImportOptions,
    progress: Progress,
) -> ImportSummary:
    """Read `sources` with `importer` and write run `run` under trace root `dst` (all or nothing)."""
    final = dst / run
    if final.exists():
        raise CLIError(f"{final} already exists: choose another --run or remove it (an import never merges)")
    dst.mkdir(parents=True, exist_ok=True)
    tmp = dst / f".{run}.import-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    notes: list[str] = []
    seqs: dict[int, int] = {}
    seen: dict[int, LayerSeen] = {}
    steps: set[int] = set()
    written: set[tuple[int, int, int]] = set()
    try:
        for rank, batch in importer.read(sources, opts, notes, progress):
            for layer, s in batch.seen.items():
                mine = seen.setdefault(layer, LayerSeen(s.n_experts, s.top_k))
                mine.n_experts = max(mine.n_experts, s.n_experts)
                if s.top_k is not None:
                    mine.top_k = max(mine.top_k or 0, s.top_k)
                mine.assignments += s.assignments
            if not batch.rows:
                continue
            for key in batch._load:
                if (rank, *key) in written:  # a second batch with the same key would double its counts
                    raise TraceError(f"{sources[0].parent if len(sources) > 1 else sources[0]}: step {key[0]} of "
                                     f"layer {key[1]} (rank {rank}) appears twice in the source")
                written.add((rank, *key))
            for name, tbl in batch.build(run, rank).items():
                if tbl.num_rows:
                    write_part(tmp, name, rank, seqs.setdefault(rank, 0), tbl)
                    if name == "expert_load":
                        steps.update(tbl.column("step").to_pylist())
            seqs[rank] = seqs.get(rank, 0) + 1
        if not seen:
            raise TraceError(f"{sources[0] if len(sources) == 1 else sources[0].parent}: no expert assignments "
                             f"found{' in the selected --layers' if opts.layers is not None else ''}")
        if opts.layers is not None and (missing := sorted(opts.layers - set(seen))):
            notes.append(f"--layers {ranges_text(missing)}: no routed tokens in the source")
        layers = []
        for layer in sorted(seen):
            s = seen[layer]
            if opts.top_k is not None and s.top_k is not None and s.top_k > opts.top_k:
                raise CLIError(f"--top-k {opts.top_k}: layer {layer} of the source routes a token to up to "
                               f"{s.top_k} experts")
            top_k = opts.top_k if opts.top_k is not None else s.top_k
            layers.append({"layer": layer, "module": f"{importer.name}:layer{layer}", "n_experts": s.n_experts,
                           "top_k": top_k, "router_kind": None, "family": importer.name})
        for rank in sorted(set(seqs) | {0}):  # rank 0's manifest is the run's primary one, even without its data
            body = {"run": run, "created": now_utc(), "updated": now_utc(), "closed": True,
                    "moescope_version": _version(), "rank": rank,
                    "model": {"class": f"imported from {importer.producer}", "n_params": None},
                    "layers": layers,
                    # No logits in these sources: like a stats=False recording, router statistics stay NULL.
                    "capture": {"stats": False},
                    "meta": {"imported": {"format": importer.name, "sources": [str(p) for p in sources],
                                          "notes": notes}}}
            write_manifest(tmp, body, rank)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ImportSummary(final, sorted(seqs), len(steps), seen, notes, sources)


def _version() -> str:
    from .. import __version__

    return __version__
