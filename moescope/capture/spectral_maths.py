"""Expert-weight similarity without torch: layouts, the shared math, trace rows, and the offline checkpoint path.

Everything here works on numpy arrays; the layout helpers and `overlap_matrix` also accept torch tensors
(they use only slicing, ``swapaxes``, ``reshape``, ``@`` and ``sum(axis=...)``), so the in-model path in
`moescope.spectral` runs the very same code on the device where the weights live.

Canonical form of one expert (whatever the storage layout): ``gate [I, H]``, ``up [I, H]``, ``down [H, I]``
and the input matrix ``w_in [2I, H]`` (gate and up rows stacked in storage order; ``up`` alone for
non-gated experts). H is the hidden size d, I the expert intermediate size.

Metrics (one value per expert pair a < b and layer):

- ``subspace_overlap``: ||V_a V_bᵀ||²_F / r where V_e [r, H] spans the top-r right (input-side) singular
  subspace of ``w_in`` of expert e. 1 = same subspace, 0 = orthogonal. Chance level for independent random
  subspaces is r/d (d = H): 0.25 for r=8, d=32; 0.0039 for r=8, d=2048.
- ``subspace_overlap_centered``: the same on w_in,e − mean_e(w_in): what is left after removing the component
  all experts share, so upcycled experts (one dense FFN + noise) score near chance instead of near 1. Needs at
  least 3 experts (with 2, the deviations are negatives of each other and the overlap is 1 by construction).
  Its chance level sits a little above r/d because the E deviations sum to zero (observed 0.072 against
  r/d = 0.0625 for 8 random experts, d = 128).
- ``cka`` (in-model only, `moescope.spectral`): linear CKA of expert outputs on a probe batch, debiased
  estimator by default (unrelated experts ≈ 0, clones ≈ 1).

Row order within w_in does not change its row space, so the overlap metrics do not depend on whether gate
and up rows are concatenated or interleaved; only the gate/up split of the spectra does.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from ..format.manifest import Manifest, TraceError, manifest_name, now_utc
from ..format.schema import EXPERT_SIMILARITY, EXPERT_SPECTRA
from ..format.writer import next_part_seq, write_manifest, write_part

WEIGHT_METRICS = ("subspace_overlap", "subspace_overlap_centered")
ALL_METRICS = (*WEIGHT_METRICS, "cka")
#: (gate, up, down) attribute names of per-expert MLP modules; gate None = non-gated MLP.
MLP_NAMES: tuple[tuple[str | None, str, str], ...] = (
    ("gate_proj", "up_proj", "down_proj"),  # Qwen/OLMoE/DeepSeek/Llama-style MLPs
    ("w1", "w3", "w2"),  # transformers v4 Mixtral (w1 gate, w3 up, w2 down)
    (None, "fc1", "fc2"),
    (None, "wi", "wo"),  # Switch / T5 style
    (None, "c_fc", "c_proj"),
)
#: model_type values (config.json) whose fused gate_up_proj interleaves gate and up columns.
INTERLEAVED_MODEL_TYPES = frozenset({"gpt_oss"})
#: Expert-slice conversion budget: experts are converted to float32 this many bytes at a time.
CHUNK_BYTES = 256 << 20


class SpectralError(ValueError):
    """Expert weights could not be found or read; the message is one line meant for a person."""


def chance_overlap(r: int, d: int) -> float:
    """Expected subspace_overlap of two independent random r-dim subspaces of R^d: r/d."""
    return min(r, d) / d


# ----------------------------------------------------------------------------------------------- layouts


def fused_transposed(gate_up_shape: Sequence[int], down_shape: Sequence[int], gated: bool = True) -> bool:
    """Whether fused expert weights are stored transposed ([E, H, 2I] / [E, I, H]) rather than [E, 2I, H] / [E, H, I].

    The two layouts cannot both fit a gated pair of shapes, so the shapes decide; a non-gated square pair
    (I = H) is ambiguous and read as the standard layout.
    """
    _, a, b = gate_up_shape
    _, c, d = down_shape
    m = 2 if gated else 1
    standard = b == c and a == m * d  # gate_up [E, 2I, H], down [E, H, I]
    transposed = a == d and b == m * c  # gate_up [E, H, 2I], down [E, I, H]
    if standard:
        return False
    if transposed:
        return True
    raise SpectralError(
        f"fused expert shapes gate_up {tuple(gate_up_shape)} and down {tuple(down_shape)} match no known layout"
    )


def split_gate_up(w_in: Any, interleaved: bool) -> tuple[Any, Any]:
    """Split canonical w_in [c, 2I, H] into gate and up [c, I, H] (numpy or torch)."""
    if interleaved:
        return w_in[:, 0::2], w_in[:, 1::2]  # GPT-OSS: gate, up, gate, up, ...
    inter = w_in.shape[1] // 2
    return w_in[:, :inter], w_in[:, inter:]  # v5 / reference: all gate rows, then all up rows


def canonical_in(gate_up: Any, transposed: bool) -> Any:
    """Fused gate_up (or up) slice → w_in [c, 2I, H], rows in storage order (numpy or torch)."""
    return gate_up.swapaxes(1, 2) if transposed else gate_up


def canonical_down(down: Any, transposed: bool) -> Any:
    """Fused down slice → [c, H, I] (numpy or torch)."""
    return down.swapaxes(1, 2) if transposed else down


def _natural_key(path: str) -> tuple[Any, ...]:
    """Sort key that orders 'layers.10' after 'layers.9' (module order for numbered blocks)."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in path.split("."))


def assign_layer_numbers(paths: Sequence[str], run_dir: str | Path | None = None) -> list[int]:
    """Layer numbers for expert modules listed in module order, matching the recorder's numbering.

    The recorder numbers MoE layers 0, 1, … in module order and writes each layer's `experts_module` path to
    the manifest; when the run already has such a manifest covering these paths its numbers are used, so
    similarity rows join expert_load rows on `layer` even when some blocks are dense (DeepSeek-V3).
    """
    known: dict[str, int] = {}
    if run_dir is not None and (Path(run_dir) / "manifest.json").is_file():
        try:
            m = Manifest.read(Path(run_dir) / "manifest.json")
            known = {ly.experts_module: ly.layer for ly in m.layers if ly.experts_module}
        except TraceError:  # an unreadable manifest numbers layers in module order, like a run without one
            known = {}
    if paths and all(p in known for p in paths):
        return [known[p] for p in paths]
    return list(range(len(paths)))


# ----------------------------------------------------------------------------------------------- math


def overlap_matrix(v: Any) -> Any:
    """Pairwise ||V_a V_bᵀ||²_F / r for stacked orthonormal bases v [E, r, H] → [E, E] (numpy or torch)."""
    e, r, h = v.shape
    flat = v.reshape(e * r, h)  # [E·r, H]
    g = flat @ flat.T  # [E·r, E·r] all cosines between basis vectors
    return (g**2).reshape(e, r, e, r).sum(axis=(1, 3)) / r  # [E, E]


def top_right_np(w: np.ndarray, r: int) -> np.ndarray:
    """Top-r right singular vectors of each w [c, m, H] → [c, r, H]."""
    _, _, vh = np.linalg.svd(w, full_matrices=False)  # vh [c, min(m, H), H], descending σ
    return vh[:, :r]


def svdvals_np(w: np.ndarray) -> np.ndarray:
    """Singular values of each w [c, m, n] → [c, min(m, n)], descending."""
    return np.linalg.svd(w, compute_uv=False)


@dataclass
class ExpertWeights:
    """A slice of experts in canonical form; arrays are numpy or torch, float32."""

    w_in: Any  # [c, 2I, H] (gated, storage row order) or [c, I, H] (non-gated: up only)
    gate: Any | None  # [c, I, H]
    up: Any  # [c, I, H]
    down: Any  # [c, H, I]
    b_in: Any | None = None  # [c, 2I] bias of w_in, storage order
    b_down: Any | None = None  # [c, H]


@dataclass
class Backend:
    """The few array operations the shared driver needs, for numpy or torch."""

    svdvals: Callable[[Any], Any]
    top_right: Callable[[Any, int], Any]
    cat: Callable[[list[Any]], Any]  # along axis 0
    to_numpy: Callable[[Any], np.ndarray]


NUMPY = Backend(svdvals_np, top_right_np, lambda xs: np.concatenate(xs, axis=0), np.asarray)


@dataclass
class WeightResults:
    """Weight-based results of one layer, on the host."""

    spectra: dict[str, np.ndarray] = field(default_factory=dict)  # matrix name → [E, k] singular values
    similarity: dict[str, np.ndarray] = field(default_factory=dict)  # metric → [E, E]
    hidden: int = 0
    rank_r: int = 0


def weight_metrics(
    load: Callable[[int, int], ExpertWeights],
    n_experts: int,
    chunk: int,
    be: Backend,
    rank_r: int = 8,
    metrics: Iterable[str] = WEIGHT_METRICS,
    spectra: bool = True,
    max_sigma: int | None = None,
) -> WeightResults:
    """Spectra and subspace overlaps of one layer, loading `chunk` experts at a time through `load(e0, e1)`."""
    metrics = set(metrics)
    out = WeightResults()
    sig: dict[str, list[np.ndarray]] = {}
    bases: list[Any] = []
    total = None  # Σ_e w_in,e [2I, H], for the centered metric
    for e0 in range(0, n_experts, chunk):
        w = load(e0, min(n_experts, e0 + chunk))
        out.hidden = int(w.w_in.shape[-1])
        if spectra:
            for name, m in (("gate", w.gate), ("up", w.up), ("down", w.down)):
                if m is not None:
                    sig.setdefault(name, []).append(be.to_numpy(be.svdvals(m)[:, :max_sigma]))
        r = min(rank_r, *w.w_in.shape[1:])
        out.rank_r = r
        if "subspace_overlap" in metrics:
            bases.append(be.top_right(w.w_in, r))  # [c, r, H]
        if "subspace_overlap_centered" in metrics:
            s = w.w_in.sum(axis=0)  # [2I, H]
            total = s if total is None else total + s
    out.spectra = {k: np.concatenate(v, axis=0).astype(np.float64) for k, v in sig.items()}
    if bases:
        out.similarity["subspace_overlap"] = be.to_numpy(overlap_matrix(be.cat(bases))).astype(np.float64)
    # With 2 experts the deviations from their mean are ±(W_a − W_b)/2: the overlap is 1 by construction.
    if "subspace_overlap_centered" in metrics and total is not None and n_experts >= 3:
        mean = total / n_experts  # [2I, H]
        centered = []
        for e0 in range(0, n_experts, chunk):
            w = load(e0, min(n_experts, e0 + chunk))
            centered.append(be.top_right(w.w_in - mean, out.rank_r))  # second pass: deviations [c, r, H]
        sim = be.to_numpy(overlap_matrix(be.cat(centered))).astype(np.float64)
        out.similarity["subspace_overlap_centered"] = sim
    return out


def chunk_size(n_experts: int, per_expert_elems: int, budget: int = CHUNK_BYTES) -> int:
    """How many experts to convert to float32 at once within `budget` bytes (at least 1)."""
    return max(1, min(n_experts, budget // max(1, 4 * per_expert_elems)))


# ----------------------------------------------------------------------------------------------- rows


def similarity_frame(run: str, rank: int, step: int, layer: int, sims: dict[str, np.ndarray]) -> pd.DataFrame:
    """Rows of expert_similarity for one layer: every pair a < b of every metric."""
    frames = []
    for metric, m in sims.items():
        a, b = np.triu_indices(m.shape[0], k=1)
        frames.append(
            pd.DataFrame(
                {
                    "run": run,
                    "rank": np.int16(rank),
                    "step": np.int64(step),
                    "layer": np.int16(layer),
                    "expert_a": a.astype(np.int16),
                    "expert_b": b.astype(np.int16),
                    "metric": metric,
                    "value": m[a, b].astype(np.float64),
                }
            )
        )
    return pd.concat(frames, ignore_index=True) if frames else empty_frame(EXPERT_SIMILARITY)


def spectra_frame(run: str, rank: int, step: int, layer: int, spectra: dict[str, np.ndarray]) -> pd.DataFrame:
    """Rows of expert_spectra for one layer: expert × matrix × singular value index."""
    frames = []
    for matrix, s in spectra.items():
        e, k = s.shape
        frames.append(
            pd.DataFrame(
                {
                    "run": run,
                    "rank": np.int16(rank),
                    "step": np.int64(step),
                    "layer": np.int16(layer),
                    "expert": np.repeat(np.arange(e), k).astype(np.int16),
                    "matrix": matrix,
                    "idx": np.tile(np.arange(k), e).astype(np.int32),
                    "sigma": s.reshape(-1),
                }
            )
        )
    return pd.concat(frames, ignore_index=True) if frames else empty_frame(EXPERT_SPECTRA)


def empty_frame(schema: pa.Schema) -> pd.DataFrame:
    """An empty DataFrame with the columns (and dtypes) of a trace table."""
    return schema.empty_table().to_pandas()


def write_snapshot(
    run_dir: str | Path,
    rank: int,
    similarity: pd.DataFrame,
    spectra: pd.DataFrame,
    manifest: dict[str, Any],
) -> None:
    """Write one part of each table (same part number) and a minimal manifest when the run has none."""
    run_dir = Path(run_dir)
    seq = next_part_seq(run_dir, rank)
    if len(spectra):
        write_part(run_dir, "expert_spectra", rank, seq, pa.Table.from_pandas(spectra, preserve_index=False))
    if len(similarity):
        write_part(run_dir, "expert_similarity", rank, seq, pa.Table.from_pandas(similarity, preserve_index=False))
    if not (run_dir / manifest_name(rank)).exists():
        from .. import __version__

        body = {
            "run": run_dir.name,
            "created": now_utc(),
            "moescope_version": __version__,
            "model": {},
            "layers": [],
            "capture": {},
            "counters": {},
            **manifest,
        }
        write_manifest(run_dir, body, rank)  # validated through the Manifest dataclass


# ----------------------------------------------------------------------------------------------- offline reading

_ST_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,  # numpy has no bfloat16: read the bits, widen to float32 on the fly
}  # quantized experts (int8/uint8 packs, FP8 + scales) would need their dequantisation first: refused


class _Safetensors:
    """Lazy reader of one .safetensors file: memory-mapped, bf16-capable, no torch.

    `safetensors.numpy` cannot return bfloat16 tensors (numpy has no such dtype) and most MoE checkpoints are
    bf16, so tensors are memory-mapped straight from the documented file layout (8-byte header length, JSON
    header, raw little-endian data); only the expert slices asked for are read.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        self.base = 8 + n
        self.meta = {k: v for k, v in header.items() if k != "__metadata__"}
        self._mm = np.memmap(path, dtype=np.uint8, mode="r")

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v["shape"]) for k, v in self.meta.items()}

    def get(self, name: str) -> np.ndarray:
        info = self.meta[name]
        if info["dtype"] not in _ST_DTYPES:
            raise SpectralError(
                f"{self.path.name}: tensor {name} has dtype {info['dtype']}; only float experts are supported"
                " (dequantize quantized checkpoints first)"
            )
        start, end = info["data_offsets"]
        raw = self._mm[self.base + start : self.base + end]
        return raw.view(_ST_DTYPES[info["dtype"]]).reshape(info["shape"])

    def is_bf16(self, name: str) -> bool:
        return self.meta[name]["dtype"] == "BF16"


class _Source:
    """Tensors of a checkpoint (one or more safetensors / torch files), read lazily as float32 slices."""

    def __init__(self, path: str | Path) -> None:
        p = Path(path)
        if p.is_dir():
            files = sorted(p.glob("*.safetensors")) or sorted([*p.glob("*.pt"), *p.glob("*.bin"), *p.glob("*.pth")])
        elif p.name.endswith(".index.json"):
            index = json.loads(p.read_text())
            files = sorted({p.parent / f for f in index.get("weight_map", {}).values()})
        else:
            files = [p]
        if not files or not all(f.is_file() for f in files):
            raise SpectralError(f"{path}: no checkpoint file found (expected .safetensors, .pt or a folder of them)")
        self.root = p if p.is_dir() else p.parent
        self._where: dict[str, Any] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self.n_params = 0
        for f in files:
            if f.suffix == ".safetensors":
                st = _Safetensors(f)
                for k, s in st.shapes().items():
                    self._where[k] = st
                    self._shapes[k] = s
            else:
                for k, t in _torch_state_dict(f).items():
                    self._where[k] = t
                    self._shapes[k] = tuple(t.shape)
        self.n_params = int(sum(int(np.prod(s)) for s in self._shapes.values()))

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return self._shapes

    def get(self, name: str, index: Any = slice(None)) -> np.ndarray:
        """Tensor `name` indexed by `index` along its first axis, as float32."""
        src = self._where[name]
        if isinstance(src, _Safetensors):
            a = src.get(name)[index]
            if src.is_bf16(name):
                return (a.astype(np.uint32) << 16).view(np.float32)  # bf16 is the top half of a float32
            return np.asarray(a, dtype=np.float32)
        return src[index].float().numpy()  # a torch tensor from a .pt file

    def model_type(self) -> str | None:
        cfg = self.root / "config.json"
        try:
            return json.loads(cfg.read_text()).get("model_type") if cfg.is_file() else None
        except (OSError, ValueError):
            return None


def _torch_state_dict(path: Path) -> dict[str, Any]:
    """A torch checkpoint's state dict (plain, or under 'state_dict' / 'model'), tensors only."""
    try:
        import torch
    except ImportError:  # pragma: no cover - depends on the install
        raise SpectralError(
            f"{path.name}: reading torch checkpoints needs torch (pip install moescope[torch])"
        ) from None
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # files in torch's legacy (non-zip) format cannot be memory-mapped
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for unreadable files
        first = (str(e).splitlines() or [""])[0][:200]  # one line for a person, not torch's essay
        raise SpectralError(f"{path}: unreadable torch checkpoint ({e.__class__.__name__}: {first})") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise SpectralError(f"{path}: not a state dict")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


@dataclass
class _OfflineLayer:
    """One MoE layer found by parameter names."""

    path: str  # experts module path
    kind: str  # "fused" or "list"
    n_experts: int
    names: dict[str, Any]  # fused: {"in", "down", "b_in", "b_down"}; list: {"gate", "up", "down"} → [names]
    transposed: bool = False
    interleaved: bool = False
    gated: bool = True


_LIST_RE = re.compile(r"^(?P<prefix>.+)\.(?P<e>\d+)\.(?P<mat>[A-Za-z0-9_]+)\.weight$")


def find_offline_layers(shapes: dict[str, tuple[int, ...]], interleaved: bool = False) -> list[_OfflineLayer]:
    """Recognise MoE expert weights in a state dict by parameter names and shapes."""
    layers: list[_OfflineLayer] = []
    for name, shape in shapes.items():
        for up_name, gated in (("gate_up_proj", True), ("up_proj", False)):
            if not name.endswith("." + up_name) or len(shape) != 3:
                continue
            prefix = name[: -len(up_name) - 1]
            down = prefix + ".down_proj"
            if down not in shapes or len(shapes[down]) != 3:
                continue
            if not gated and prefix + ".gate_up_proj" in shapes:
                continue
            tr = fused_transposed(shape, shapes[down], gated)
            names = {"in": name, "down": down}
            for b, key in (("b_in", name + "_bias"), ("b_down", down + "_bias")):
                if key in shapes:
                    names[b] = key
            layers.append(_OfflineLayer(prefix, "fused", shape[0], names, tr, interleaved and gated, gated))
    groups: dict[str, dict[str, dict[int, str]]] = {}
    below: dict[str, set[str]] = {}  # "prefix.e." → every key suffix under that expert
    for name in shapes:
        m = _LIST_RE.match(name)
        if m:
            groups.setdefault(m["prefix"], {}).setdefault(m["mat"], {})[int(m["e"])] = name
        parts = name.split(".")
        for i, p in enumerate(parts[:-1]):
            if p.isdigit():
                below.setdefault(".".join(parts[: i + 1]) + ".", set()).add(".".join(parts[i + 1 :]))
    for prefix, mats in groups.items():
        for g, u, d in MLP_NAMES:
            if u not in mats or d not in mats or (g is not None and g not in mats):
                continue
            ids = set(mats[u])
            if len(ids) < 2 or ids != set(range(len(ids))) or set(mats[d]) != ids or (g and set(mats[g]) != ids):
                continue
            n = len(ids)
            # an expert holds its projections and nothing else; a decoder layer with fc1/fc2 also holds attention
            allowed = {f"{x}.{k}" for x in (g, u, d) if x is not None for k in ("weight", "bias")}
            if any(not below.get(f"{prefix}.{e}.", set()) <= allowed for e in range(n)):
                continue
            names = {"up": [mats[u][e] for e in range(n)], "down": [mats[d][e] for e in range(n)]}
            if g is not None:
                names["gate"] = [mats[g][e] for e in range(n)]
            layers.append(_OfflineLayer(prefix, "list", n, names, gated=g is not None))
            break
    layers.sort(key=lambda ly: _natural_key(ly.path))
    return layers


def _offline_loader(src: _Source, ly: _OfflineLayer) -> Callable[[int, int], ExpertWeights]:
    def load(e0: int, e1: int) -> ExpertWeights:
        if ly.kind == "fused":
            w_in = canonical_in(src.get(ly.names["in"], slice(e0, e1)), ly.transposed)  # [c, 2I, H]
            down = canonical_down(src.get(ly.names["down"], slice(e0, e1)), ly.transposed)  # [c, H, I]
            gate, up = split_gate_up(w_in, ly.interleaved) if ly.gated else (None, w_in)
            return ExpertWeights(w_in, gate, up, down)
        up = np.stack([src.get(n) for n in ly.names["up"][e0:e1]])  # [c, I, H]
        down = np.stack([src.get(n) for n in ly.names["down"][e0:e1]])  # [c, H, I]
        if not ly.gated:
            return ExpertWeights(up, None, up, down)
        gate = np.stack([src.get(n) for n in ly.names["gate"][e0:e1]])  # [c, I, H]
        return ExpertWeights(np.concatenate([gate, up], axis=1), gate, up, down)

    return load


def snapshot_state_dict(
    path: str | Path,
    out_run_dir: str | Path,
    step: int = 0,
    rank_r: int = 8,
    metrics: Sequence[str] = WEIGHT_METRICS,
    spectra: bool = True,
    max_sigma: int | None = None,
    interleaved: bool | None = None,
    rank: int = 0,
) -> pd.DataFrame:
    """Weight spectra and subspace overlaps of every MoE layer of a saved checkpoint, written to a run directory.

    `path` is a .safetensors file, a torch .pt/.bin state dict, a sharded checkpoint's index.json, or a folder of
    them. Layers are recognised by parameter names: fused ``…gate_up_proj``/``…down_proj`` 3-D tensors (either
    orientation) and per-expert ``….<e>.{gate_proj,up_proj,down_proj | w1,w3,w2}.weight`` modules.
    `interleaved` says whether fused gate/up rows alternate (GPT-OSS); None reads config.json beside the file.
    CKA needs the model's forward pass and is not available here. Returns the similarity rows written.
    """
    metrics = (metrics,) if isinstance(metrics, str) else tuple(metrics)
    if rank_r < 1:
        raise SpectralError(f"rank_r must be >= 1 (got {rank_r})")
    bad = sorted(set(metrics) - set(WEIGHT_METRICS))
    if bad:
        raise SpectralError(f"metric(s) {bad} need the model; offline metrics are {list(WEIGHT_METRICS)}")
    src = _Source(path)
    if interleaved is None:
        interleaved = src.model_type() in INTERLEAVED_MODEL_TYPES
    layers = find_offline_layers(src.shapes(), interleaved)
    if not layers:
        raise SpectralError(f"{path}: no MoE expert weights recognised (fused gate_up_proj/down_proj or expert lists)")
    run = Path(out_run_dir).name
    numbers = assign_layer_numbers([ly.path for ly in layers], out_run_dir)
    sims, specs, info, chance = [], [], [], {}
    for ly, num in zip(layers, numbers):
        first = _offline_loader(src, ly)(0, 1)
        per_expert = int(first.w_in[0].size + first.down[0].size)
        res = weight_metrics(
            _offline_loader(src, ly),
            ly.n_experts,
            chunk_size(ly.n_experts, per_expert),
            NUMPY,
            rank_r,
            metrics,
            spectra,
            max_sigma,
        )
        sims.append(similarity_frame(run, rank, step, num, res.similarity))
        specs.append(spectra_frame(run, rank, step, num, res.spectra))
        chance[num] = chance_overlap(res.rank_r, res.hidden)
        info.append({"layer": num, "module": ly.path, "n_experts": ly.n_experts, "top_k": None, "router_kind": None})
    sim = pd.concat(sims, ignore_index=True)
    spec = pd.concat(specs, ignore_index=True)
    manifest = {"model": {"class": f"state_dict:{Path(path).name}", "n_params": src.n_params}, "layers": info}
    write_snapshot(out_run_dir, rank, sim, spec, manifest)
    sim.attrs["chance"] = chance
    return sim
