"""Capture overhead, measured side by side in one run: no recording vs counts only vs every token vs
transformers' own `output_router_logits=True`, on a training loop (forward + backward + optimizer step)
including flush and close. Also the trace size per token × layer.

    python bench/capture_overhead.py              # tiny HF Mixtral on CPU (~2 min)
    python bench/capture_overhead.py --model reference
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


def loop(model: torch.nn.Module, batches: list[torch.Tensor], train: bool, router_logits: bool) -> None:
    """The user's loop: forward (+ backward + step when training)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.0) if train else None  # lr 0: every config sees the same weights
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


def timed(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["hf-mixtral", "reference"], default="hf-mixtral")
    ap.add_argument("--mode", choices=["train", "infer"], default="train")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--flush-every", type=int, default=10)
    args = ap.parse_args()
    vocab = 256
    model = build(args.model, args.hidden, args.layers, args.experts, args.top_k, vocab)
    model.train(args.mode == "train")
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, vocab, (args.batch, args.seq), generator=g) for _ in range(args.steps)]
    train = args.mode == "train"
    tmp = tempfile.mkdtemp(prefix="moescope-bench-")

    def recorded(tokens: float, tag: str) -> Callable[[], None]:
        def fn() -> None:
            out = os.path.join(tmp, f"{tag}-{time.perf_counter_ns()}")
            with moescope.record(model, out, tokens=tokens, flush_every=args.flush_every) as rec:
                for i, x in enumerate(batches):
                    rec.step = i
                    loop(model, [x], train, False)
        return fn

    configs: dict[str, Callable[[], None]] = {
        "no recording": lambda: loop(model, batches, train, False),
        "counts only (tokens=0)": recorded(0.0, "counts"),
        "every token (tokens=1)": recorded(1.0, "tokens"),
    }
    if args.model == "hf-mixtral":
        configs["output_router_logits=True"] = lambda: loop(model, batches, train, True)
    loop(model, batches[:2], train, False)  # warm-up
    times: dict[str, list[float]] = {k: [] for k in configs}
    for r in range(args.rounds):
        names = list(configs) if r % 2 == 0 else list(reversed(configs))  # interleaved: drift hits all configs
        for name in names:
            times[name].append(timed(configs[name]))
            print(f"  round {r + 1}/{args.rounds} {name}: {1000 * times[name][-1] / args.steps:.1f} ms/step", flush=True)
    base = statistics.median(times["no recording"])
    print(f"model={args.model} mode={args.mode} batch={args.batch}x{args.seq} hidden={args.hidden} "
          f"layers={args.layers} experts={args.experts} top-{args.top_k} steps={args.steps} rounds={args.rounds} "
          f"threads={torch.get_num_threads()}")
    print(f"{'config':<28}{'ms/step (median)':>18}{'overhead':>10}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<28}{1000 * med / args.steps:>18.1f}{100 * (med / base - 1):>9.1f}%")

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
