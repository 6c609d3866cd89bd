"""Benchmark: forward+backward of the reference MoE layer, sorted dispatch vs the textbook boolean-mask loop.

Both dispatches run side by side in one process on the same weights and inputs, interleaved iteration by
iteration so a noisy machine slows both alike; the figure reported is the median per configuration.

    python bench/reference_moe.py                    # CPU, 8 and 64 experts
    python bench/reference_moe.py --experts 8 16 64 --tokens 4096 --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from moescope.reference.model import MoEBlock, MoEConfig


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fwd_bwd(block: MoEBlock, x: torch.Tensor, dispatch: str, amp: bool) -> tuple[float, torch.Tensor]:
    """One forward+backward of `block` with the given dispatch: (seconds, output)."""
    block.experts.dispatch = dispatch
    x = x.detach().requires_grad_(True)
    block.zero_grad(set_to_none=True)
    _sync(x.device)
    t0 = time.perf_counter()
    with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=amp):
        y, aux, z = block(x)
    (y.float().square().mean() + 0.01 * aux).backward()
    _sync(x.device)
    return time.perf_counter() - t0, y.detach()


def bench(n_experts: int, tokens: int, d_model: int, d_expert: int, top_k: int, iters: int,
          device: torch.device, seed: int = 0) -> dict[str, float]:
    """Median fwd+bwd seconds of both dispatches and the max abs difference of their outputs and grads."""
    torch.manual_seed(seed)
    cfg = MoEConfig(d_model=d_model, n_experts=n_experts, top_k=top_k, d_expert=d_expert)
    block = MoEBlock(cfg).to(device)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.02)
    x = torch.randn(1, tokens, d_model, device=device)  # [B=1, S=T, H]
    amp = device.type == "cuda"
    times: dict[str, list[float]] = {"sorted": [], "textbook": []}
    outs: dict[str, torch.Tensor] = {}
    grads: dict[str, list[torch.Tensor]] = {}
    for i in range(iters + 2):  # two warm-up rounds
        for name in ("sorted", "textbook") if i % 2 == 0 else ("textbook", "sorted"):
            dt, y = time_fwd_bwd(block, x, name, amp)
            if i >= 2:
                times[name].append(dt)
            outs[name] = y
            grads[name] = [p.grad.detach().clone() for p in block.parameters() if p.grad is not None]
    diff_out = (outs["sorted"].float() - outs["textbook"].float()).abs().max().item()
    diff_grad = max((a.float() - b.float()).abs().max().item() for a, b in zip(grads["sorted"], grads["textbook"]))
    ts, tt = statistics.median(times["sorted"]), statistics.median(times["textbook"])
    return {"sorted_s": ts, "textbook_s": tt, "speedup": tt / ts, "max_abs_diff": diff_out, "max_abs_grad_diff": diff_grad}


def main(argv: list[str] | None = None) -> None:
    """Run the side-by-side benchmark and print one line per expert count."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--experts", type=int, nargs="+", default=[8, 64])
    p.add_argument("--tokens", type=int, default=2048, help="tokens per forward (T = B*S)")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--d-expert", type=int, default=256)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    print(f"reference MoE layer fwd+bwd on {device} (torch {torch.__version__}, {torch.get_num_threads()} threads): "
          f"T={a.tokens} H={a.d_model} I={a.d_expert} top-{a.top_k}, median of {a.iters}")
    print(f"{'experts':>7}  {'sorted ms':>9}  {'textbook ms':>11}  {'speedup':>7}  {'max|dy|':>8}  {'max|dgrad|':>10}")
    row: Callable[[int, dict[str, float]], str] = lambda e, r: (  # noqa: E731
        f"{e:>7}  {r['sorted_s'] * 1e3:>9.2f}  {r['textbook_s'] * 1e3:>11.2f}  {r['speedup']:>6.2f}x  "
        f"{r['max_abs_diff']:>8.1e}  {r['max_abs_grad_diff']:>10.1e}"
    )
    for e in a.experts:
        r = bench(e, a.tokens, a.d_model, a.d_expert, a.top_k, a.iters, device)
        print(row(e, r), flush=True)


if __name__ == "__main__":
    main()
