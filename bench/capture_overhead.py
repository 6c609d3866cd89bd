"""Capture overhead, measured side by side in one run: no recording vs counts only (with and without router
statistics) vs every token vs transformers' own `output_router_logits=True`, on a training loop (forward +
backward + optimizer step) or an inference loop, including flush and close. Also the aten ops one router hook
dispatches per call, torch.compile recompiles and graph breaks, and the trace size per token × layer.

    python bench/capture_overhead.py                       # tiny HF Mixtral on CPU, eager (~2 min)
    python bench/capture_overhead.py --model reference
    python bench/capture_overhead.py --compile             # the compiled loop (torch.compile), same configs
    python bench/capture_overhead.py --checkpointing       # activation checkpointing of every decoder layer
    python bench/capture_overhead.py --clock cpu --threads 1   # CPU time: steadier on a busy machine
"""

from __future__ import annotations

import argparse
import glob
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

import moescope
from moescope.capture.hotpath import ops_in_forwards


def build(model: str, hidden: int, layers: int, experts: int, top_k: int, vocab: int) -> torch.nn.Module:
    """A model with routers moescope knows."""
    torch.manual_seed(0)
    if model == "reference":
        from moescope.reference.model import MoEConfig, MoEModel

        return MoEModel(MoEConfig(vocab_size=vocab, d_model=hidden, n_layers=layers, n_experts=experts, top_k=top_k))
    from transformers import AutoModelForCausalLM, MixtralConfig

    cfg = MixtralConfig(
        hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=experts, num_experts_per_tok=top_k, vocab_size=vocab,
        max_position_embeddings=4096,
    )
    return AutoModelForCausalLM.from_config(cfg)


def checkpoint_layers(model: torch.nn.Module, kind: str) -> None:
    """Activation checkpointing of every decoder layer (non-reentrant), the way each model family offers it."""
    if kind == "hf-mixtral":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    model.layers = torch.nn.ModuleList(checkpoint_wrapper(layer) for layer in model.layers)


def loop(model: Callable[..., Any], params: Any, batches: list[torch.Tensor], train: bool, router_logits: bool) -> None:
    """The user's loop: forward (+ backward + step when training)."""
    opt = torch.optim.SGD(params, lr=0.0) if train else None  # lr 0: every config sees the same weights
    for x in batches:
        kw: dict[str, Any] = {"output_router_logits": True} if router_logits else {}
        if train:
            out = model(input_ids=x, labels=x, **kw)
            loss = out.loss
            if router_logits and getattr(out, "aux_loss", None) is not None:
                loss = loss + 0.01 * out.aux_loss
            loss.backward()
            assert opt is not None
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            with torch.no_grad():
                model(input_ids=x, **kw)


def dynamo_counts() -> tuple[int, int]:
    """(frames compiled, graph breaks) so far in this process."""
    from torch._dynamo.utils import counters

    return counters["frames"]["total"], sum(counters["graph_break"].values())


def hook_ops(model: torch.nn.Module, x: torch.Tensor, **record_kw: Any) -> int:
    """Top-level aten ops the first router's hook dispatches for one call, inside a no-grad forward of `x`."""
    with tempfile.TemporaryDirectory() as tmp, moescope.record(model, tmp, **record_kw) as rec, torch.no_grad():
        model(input_ids=x)  # warm: a router's first call also checks the spec's reading, once
        (ops,) = ops_in_forwards(model.get_submodule(rec.layers[0].module), lambda: model(input_ids=x))
        return ops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["hf-mixtral", "reference"], default="hf-mixtral")
    ap.add_argument("--mode", choices=["train", "infer"], default="train")
    ap.add_argument("--compile", action="store_true", help="run every config through torch.compile(model)")
    ap.add_argument("--checkpointing", action="store_true", help="activation-checkpoint every decoder layer")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per config and round")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation happens here)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--flush-every", type=int, default=10)
    ap.add_argument("--no-size", action="store_true", help="skip the trace-size measurement")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="wall time, or this process's CPU time (steadier on a machine shared with other work)")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    vocab = 256
    train = args.mode == "train"
    model = build(args.model, args.hidden, args.layers, args.experts, args.top_k, vocab)
    model.train(train)
    if args.checkpointing:
        checkpoint_layers(model, args.model)
    run_model: Callable[..., Any] = torch.compile(model) if args.compile else model
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, vocab, (args.batch, args.seq), generator=g) for _ in range(args.steps + args.warmup)]
    warm, timed_batches = batches[: args.warmup], batches[args.warmup :]
    tmp = tempfile.mkdtemp(prefix="moescope-bench-")
    dynamo: dict[str, tuple[int, int]] = {}

    def config(record_kw: dict[str, Any] | None, name: str, router_logits: bool = False) -> Callable[[], float]:
        """One config: warm-up untimed, then the timed steps (and, when recording, flush and close)."""
        def fn() -> float:
            rec_cm = moescope.record(run_model, os.path.join(tmp, f"{name}-{time.perf_counter_ns()}"),
                                     flush_every=args.flush_every, **record_kw) if record_kw is not None else None
            rec = rec_cm.start() if rec_cm is not None else None
            try:
                for i, x in enumerate(warm):
                    if rec is not None:
                        rec.step = i
                    loop(run_model, model.parameters(), [x], train, router_logits)
                before = dynamo_counts() if args.compile else (0, 0)
                t0 = clock()
                for i, x in enumerate(timed_batches):
                    if rec is not None:
                        rec.step = args.warmup + i
                    loop(run_model, model.parameters(), [x], train, router_logits)
                if rec_cm is not None:
                    rec_cm.close()
                elapsed = clock() - t0
                if args.compile:
                    after = dynamo_counts()
                    dynamo.setdefault(name, (after[0] - before[0], after[1] - before[1]))
                return elapsed
            finally:
                if rec_cm is not None:
                    rec_cm.close()
        return fn

    configs: dict[str, Callable[[], float]] = {
        "no recording": config(None, "none"),
        "counts only (stats=False)": config({"tokens": 0.0, "stats": False}, "bare"),
        "default: counts+stats": config({"tokens": 0.0}, "counts"),
        "every token (tokens=1)": config({"tokens": 1.0}, "tokens"),
    }
    if args.model == "hf-mixtral":
        configs["output_router_logits=True"] = config(None, "router-logits", router_logits=True)
    times: dict[str, list[float]] = {k: [] for k in configs}
    for r in range(args.rounds):
        names = list(configs) if r % 2 == 0 else list(reversed(configs))  # interleaved: drift hits all configs
        for name in names:
            times[name].append(configs[name]())
            print(f"  round {r + 1}/{args.rounds} {name}: {1000 * times[name][-1] / args.steps:.1f} ms/step", flush=True)
    base = statistics.median(times["no recording"])
    print(f"model={args.model} mode={args.mode} compile={args.compile} checkpointing={args.checkpointing} "
          f"batch={args.batch}x{args.seq} hidden={args.hidden} layers={args.layers} experts={args.experts} "
          f"top-{args.top_k} steps={args.steps} rounds={args.rounds} threads={torch.get_num_threads()} clock={args.clock}")
    print(f"{'config':<28}{'ms/step (median)':>18}{'overhead':>10}" + ("  recompiles  graph breaks" if args.compile else ""))
    names = {"no recording": "none", "counts only (stats=False)": "bare", "default: counts+stats": "counts",
             "every token (tokens=1)": "tokens", "output_router_logits=True": "router-logits"}
    for name, ts in times.items():
        med = statistics.median(ts)
        line = f"{name:<28}{1000 * med / args.steps:>18.1f}{100 * (med / base - 1):>9.1f}%"
        if args.compile:
            rc, gb = dynamo.get(names[name], (0, 0))
            line += f"{rc:>12}{gb:>14}"
        print(line)
    if args.compile:
        print("(recompiles and graph breaks: during the timed steps of the first round, after warm-up)")

    x = batches[0][:2]
    print("\naten ops per router call (eager, top-level ops the hook dispatches; torch.profiler):")
    for label, kw in (("counts only (stats=False)", {"tokens": 0.0, "stats": False}), ("default: counts+stats", {"tokens": 0.0}),
                      ("every token (tokens=1)", {"tokens": 1.0})):
        print(f"  {label:<26}{hook_ops(model, x, **kw):>4}")

    if args.no_size:
        return
    print("\ntrace size (routing table, every token recorded):")
    for experts, k in [(8, 2), (64, 8)]:
        m = build(args.model, 64, 2, experts, k, vocab).eval()
        out = os.path.join(tmp, f"size-{experts}")
        with moescope.record(m, out, tokens=1.0, flush_every=1000) as rec, torch.no_grad():
            for i in range(6):
                rec.step = i
                m(torch.randint(0, vocab, (16, 128), generator=g))
        size = sum(os.path.getsize(p) for p in glob.glob(os.path.join(out, "routing", "*.parquet")))
        per = size / (6 * 16 * 128 * 2)
        print(f"  top-{k} of {experts}: {per:.2f} bytes per token x layer; fp16 router logits would be "
              f"{2 * experts} bytes: ratio {per / (2 * experts):.3f}")


if __name__ == "__main__":
    main()
