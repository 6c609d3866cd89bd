"""Flight recorder cost, side by side in one run: the default capture vs the default capture with the flight
ring on (and with the per-flush precision check), on an eager training loop of the reference MoE; plus the aten
ops one router hook dispatches (the first call of a step writes the ring, later calls of the step do not), the
ring's device memory, and a dump's size on disk and time.

    python bench/flight_overhead.py                     # reference MoE, 4 layers × 8 experts, ~1 min
    python bench/flight_overhead.py --clock cpu --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import moescope
from moescope.capture.hotpath import ops_in_forwards


def build(hidden: int, layers: int, experts: int, top_k: int) -> torch.nn.Module:
    """The reference MoE (byte vocabulary) at the given size."""
    from moescope.reference.model import MoEConfig, MoEModel

    torch.manual_seed(0)
    return MoEModel(MoEConfig(vocab_size=256, d_model=hidden, n_layers=layers, n_experts=experts, top_k=top_k))


def train(model: torch.nn.Module, batches: list[torch.Tensor], rec: Any | None) -> None:
    """Forward + backward + SGD step (lr 0: every config sees the same weights)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    for i, x in enumerate(batches):
        if rec is not None:
            rec.step = i
        out = model(input_ids=x, labels=x)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def hook_ops(model: torch.nn.Module, x: torch.Tensor, **kw: Any) -> tuple[int, int]:
    """Aten ops of the first router's hook inside real forwards: (first call of a step, a later call of it)."""
    with tempfile.TemporaryDirectory() as tmp, moescope.record(model, tmp, **kw) as rec, torch.no_grad():
        rec.step = 0
        model(input_ids=x)  # warm: the ring's buffers are made at the first call

        def two_forwards() -> None:
            rec.step = 1  # a new step: the ring's slot for each layer is written by its first call
            model(input_ids=x)
            model(input_ids=x)

        first, later = ops_in_forwards(model.get_submodule(rec.layers[0].module), two_forwards)
        return first, later


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--flight-steps", type=int, default=8)
    ap.add_argument("--flight-tokens", type=int, default=64)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    model = build(args.hidden, args.layers, args.experts, args.top_k)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (args.batch, args.seq), generator=g) for _ in range(args.steps)]
    flight = {"flight_steps": args.flight_steps, "flight_tokens": args.flight_tokens}
    configs: dict[str, dict[str, Any] | None] = {
        "no recording": None, "default capture": {}, "+ flight ring": flight,
        "+ flight ring + precision check": {**flight, "precision_check": True},
    }
    times: dict[str, list[float]] = {name: [] for name in configs}
    train(model, batches[:2], None)  # warm-up
    for _ in range(args.rounds):
        for name, kw in configs.items():
            with tempfile.TemporaryDirectory() as tmp:
                t0 = clock()
                if kw is None:
                    train(model, batches, None)
                else:
                    with moescope.record(model, tmp, flush_every=10, **kw) as rec:
                        train(model, batches, rec)
                times[name].append(clock() - t0)
    base = statistics.median(times["no recording"])
    default = statistics.median(times["default capture"])
    print(f"reference MoE d={args.hidden} L={args.layers} E={args.experts} k={args.top_k}, batch {args.batch}×{args.seq}, "
          f"{args.steps} train steps × {args.rounds} rounds ({args.clock} clock, median)")
    for name in configs:
        t = statistics.median(times[name])
        print(f"  {name:34s} {t:7.3f} s   ×{t / base:5.3f} of no recording   ×{t / default:5.3f} of default capture")
    x = batches[0]
    for name, kw in (("default capture", {}), ("+ flight ring", flight)):
        first, later = hook_ops(model, x, **kw)
        print(f"  aten ops per router call, {name:16s}: first call of a step {first:3d}, later calls {later:3d}")
    with tempfile.TemporaryDirectory() as tmp:
        with moescope.record(model, tmp, **flight) as rec:
            train(model, batches[: args.flight_steps], rec)
            ring = rec._flight  # noqa: SLF001
            assert ring is not None
            t0 = time.perf_counter()
            path = rec.dump_flight()
            dt = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in Path(path).iterdir())
        print(f"  ring: {ring.nbytes() / 2**20:.2f} MiB on the device ({args.flight_steps} steps × {args.flight_tokens} "
              f"tokens × {args.layers} layers); a dump: {size / 2**20:.2f} MiB on disk, written in {dt:.2f} s "
              "(incl. the float32 re-route)")


if __name__ == "__main__":
    main()
