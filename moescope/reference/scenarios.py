"""Training scenarios of the reference MoE for `moescope demo`: real runs whose routing outcome comes from training.

All four train the same architecture (2 layers, d_model 64, 16 SwiGLU experts top-2, bytes, AdamW lr 1e-3,
batch 16 x 64 tokens) on the standard library's source; they differ only where the scenario says.

balanced   Switch aux loss 0.01 + z-loss 0.001, plus DeepSeek-V3 aux-loss-free bias balancing (u = 0.01), on
           English and code: every expert keeps a fair share. (Aux 0.01 alone, measured: one layer-0 expert ends
           near 0.2 of its fair share in the quick run — bytes' skewed frequencies drive the first router.)
collapse   no aux loss, no z-loss, a learned per-expert router logit bias (GPT-OSS routers have one), router LR
           100x the model's and router init std 0.3. Why it collapses: with renormalised top-k gates the router
           gradient of a token only compares the experts it picked (dL/dl_1 = -dL/dl_2 = w1 w2 <g, E_1(x) - E_2(x)>),
           so the expert that is better on average gains logit on *every* token through the shared bias, gets more
           tokens, trains more, and is better still: rich-get-richer. Nothing pulls a starved expert back: without
           an aux loss an expert nobody picks gets no router gradient at all, so it stays dead. The hot router LR
           turns thousands of steps into tens; the larger init makes early decisions sharper. Measured (seed 0,
           quick): at step 0 the busiest 4 of 16 experts carry ~40% of assignments (fair: 25%); within ~40 steps
           ~95% in layer 1, with 6-10 of the 16 experts dead. Without the learned bias the same settings level
           off at 60-85%: token identity in the router input keeps routing diverse.
shift      trained on English only (docstrings, comments); held-out English and code evaluated every few steps
           under rec.tag("english") / rec.tag("code"): the routing learned on prose misroutes code.
upcycled   a dense model (one expert) is trained first, then its FFN is copied into all 16 experts plus 1% noise
           (sparse upcycling): near-clones, snapshotted with moescope.snapshot_experts at checkpoints. Balanced
           with aux loss and bias balancing (u = 0.05), so its only finding is the clones WARN.

Every run records through `moescope.record` with its config and seeds in the manifest's `meta`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .data import Corpus, fixed_batch, get_batch, load_corpus
from .model import MoEConfig, MoEModel, upcycle

#: Scenario names in the order the demo runs them.
SCENARIO_NAMES = ("balanced", "collapse", "shift", "upcycled")


@dataclass
class Scenario:
    """One training run: model config, optimiser settings, data and what to evaluate."""

    name: str
    description: str
    config: MoEConfig
    steps: int
    lr: float = 1e-3
    router_lr_mult: float = 1.0  # the router's learning rate relative to the rest of the model
    batch_size: int = 16
    seq_len: int = 64
    train_domain: str = "mixed"  # "english", "code" or "mixed" (half of every batch from each)
    eval_domains: tuple[str, ...] = ()  # held-out slices evaluated under rec.tag(domain)
    eval_every: int = 0
    eval_batch_size: int = 16
    dense_steps: int = 0  # > 0: train a dense (1-expert) model first, then upcycle it
    upcycle_noise: float = 0.01
    snapshot_steps: tuple[int, ...] = ()  # steps at which snapshot_experts() runs (and once after the last step)
    extra_meta: dict[str, Any] = field(default_factory=dict)
    # what the demo should find (it prints expected vs found): the worst health status, the rules that must
    # reach it, whether other rules may reach it too, and whether drift between eval_domains must be flagged
    expect_worst: str = "PASS"
    expect_rules: tuple[str, ...] = ()
    expect_only: bool = True
    expect_drift: bool = False


def _base_config() -> MoEConfig:
    # small enough for 2 CPU cores: all four scenarios in a few minutes, --quick in well under a minute.
    # 16 experts top-2: the collapse rule's "busiest max(k, N/4) experts" is then 4 of 16
    return MoEConfig(d_model=64, n_layers=2, n_heads=4, n_experts=16, top_k=2, d_expert=128, max_seq_len=256)


def build_scenarios(quick: bool = False) -> dict[str, Scenario]:
    """The four demo scenarios (shorter runs with quick=True)."""
    base = _base_config()
    # quick: the collapse run is fully collapsed by ~40 steps; 80 leaves a clear second half
    steps = 80 if quick else 240
    evals = 10 if quick else 30
    return {
        "balanced": Scenario(
            name="balanced",
            description="Switch aux loss 0.01, z-loss 0.001 and aux-loss-free bias balancing: every expert keeps "
            "a fair share",
            # aux 0.01 alone leaves a layer-0 expert near a fifth of its fair share in 80 steps (byte identity
            # dominates the first router's input); the DeepSeek-V3 selection bias (u = 0.01) evens that out
            config=dataclasses.replace(
                base, aux_loss_coef=0.01, z_loss_coef=0.001, bias_balancing=True, bias_update_rate=0.01
            ),
            steps=steps,
        ),
        "collapse": Scenario(
            name="collapse",
            description="no aux loss, no z-loss, learned router bias, router LR x100, router init std 0.3",
            config=dataclasses.replace(base, aux_loss_coef=0.0, z_loss_coef=0.0, router_bias=True, router_init_std=0.3),
            steps=steps,
            router_lr_mult=100.0,
            expect_worst="FAIL",
            expect_rules=("collapse", "dead_expert"),
            expect_only=False,  # a collapsed router also breaks the imbalance rules
        ),
        "shift": Scenario(
            name="shift",
            description="trained on English (docstrings, comments), evaluated on held-out English and on code",
            config=dataclasses.replace(base, aux_loss_coef=0.01, z_loss_coef=0.001),
            steps=steps,
            train_domain="english",
            eval_domains=("english", "code"),
            eval_every=evals,
            # aux 0.01 alone leaves layer 0 uneven (load CV / MaxVio WARN); the story is the drift
            expect_worst="WARN",
            expect_only=False,
            expect_drift=True,
        ),
        "upcycled": Scenario(
            name="upcycled",
            description="experts copied from one trained dense FFN plus 1% noise, balanced as in the balanced run: "
            "near-clones that diverge slowly",
            # the story here is clones, not load: a fresh router over identical experts leaves one layer-0 expert
            # dead and MaxVio above 3 within 40 steps under aux 0.01 alone (measured, seed 0), so the run balances
            # like `balanced`, with a faster bias (u = 0.05: --quick has only 40 MoE steps to even out in)
            config=dataclasses.replace(
                base, aux_loss_coef=0.01, z_loss_coef=0.001, bias_balancing=True, bias_update_rate=0.05
            ),
            steps=steps // 2,
            dense_steps=steps // 2,
            upcycle_noise=0.01,
            snapshot_steps=(0, steps // 4),
            expect_worst="WARN",
            expect_rules=("clones",),
        ),
    }


class _NoRecorder:
    """Stands in for a recorder when a run is trained without recording (tests, benchmarks)."""

    step = 0

    @contextlib.contextmanager
    def tag(self, name: str) -> Iterator[None]:
        yield


def _recorder(model: MoEModel, run_dir: Path, record: bool, seed: int, meta: dict[str, Any]) -> Any:
    if not record:
        return contextlib.nullcontext(_NoRecorder())
    import moescope

    return moescope.record(model, run_dir, tokens=0.25, flush_every=10, seed=seed, meta=meta, tokenizer="bytes")


def _snapshot(model: MoEModel, run_dir: Path, step: int) -> bool:
    # snapshot_experts lives in moescope.spectral; tolerate its absence so training never depends on it
    try:
        import moescope

        moescope.snapshot_experts(model, run_dir, step=step)
        return True
    except (ImportError, AttributeError, NotImplementedError):
        return False


def _optimizer(model: MoEModel, sc: Scenario) -> torch.optim.Optimizer:
    router = [p for n, p in model.named_parameters() if ".router." in n]
    rest = [p for n, p in model.named_parameters() if ".router." not in n]
    groups = [{"params": rest, "lr": sc.lr}, {"params": router, "lr": sc.lr * sc.router_lr_mult}]
    # no weight decay: it would quietly pull a runaway router back, and the collapse run must show one
    # fused: one kernel per step for all parameters instead of a Python loop over them (CPU and CUDA)
    return torch.optim.AdamW(groups, betas=(0.9, 0.95), weight_decay=0.0, fused=True)


def _batch(corpus: Corpus, domain: str, sc: Scenario, gen: torch.Generator) -> torch.Tensor:
    if domain != "mixed":
        return get_batch(corpus.split(domain, "train"), sc.batch_size, sc.seq_len, gen)[0]
    # half the sequences from each domain, interleaved: the router sees both all the time
    half = sc.batch_size // 2
    eng = get_batch(corpus.english_train, half, sc.seq_len, gen)[0]
    code = get_batch(corpus.code_train, sc.batch_size - half, sc.seq_len, gen)[0]
    return torch.cat([eng, code], dim=0)


def _train_steps(
    model: MoEModel,
    sc: Scenario,
    steps: int,
    corpus: Corpus,
    device: torch.device,
    gen: torch.Generator,
    domain: str,
    on_step: Callable[[int, float], None] | None = None,
    before_step: Callable[[int], None] | None = None,
) -> float:
    opt = _optimizer(model, sc)
    amp = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    model.train()
    loss_value = float("nan")
    for step in range(steps):
        if before_step is not None:
            before_step(step)
        x = _batch(corpus, domain, sc, gen).to(device)  # [B, S]
        with amp:
            out = model(x, labels=x)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        model.update_router_bias()
        loss_value = float(out.lm_loss.detach())  # one host sync per step, for the progress bar
        if on_step is not None:
            on_step(step, loss_value)
    return loss_value


def run_scenario(
    sc: Scenario,
    out_dir: str | Path,
    device: str | torch.device = "cpu",
    seed: int = 0,
    corpus: Corpus | None = None,
    record: bool = True,
    progress: Callable[[int, float], None] | None = None,
) -> dict[str, Any]:
    """Train one scenario into out_dir/<name> (recording its routing) and return a small summary dict."""
    device = torch.device(device)
    corpus = corpus or load_corpus(seed=seed)
    run_dir = Path(out_dir) / sc.name
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    meta: dict[str, Any] = {
        "scenario": sc.name,
        "description": sc.description,
        "seed": seed,
        "data_seed": seed,
        "model_config": dataclasses.asdict(sc.config),
        "train": {
            k: v for k, v in dataclasses.asdict(sc).items() if k not in ("config", "description", "name")
        },
        "device": str(device),
        "torch": torch.__version__,
        **sc.extra_meta,
    }

    dense_loss = None
    if sc.dense_steps:
        dense = MoEModel(dataclasses.replace(sc.config, n_experts=1, top_k=1)).to(device)
        dense_loss = _train_steps(dense, sc, sc.dense_steps, corpus, device, gen, sc.train_domain, progress)
        model = upcycle(dense, sc.config.n_experts, sc.config.top_k, noise=sc.upcycle_noise, seed=seed).to(device)
        meta["upcycled_from"] = {"dense_steps": sc.dense_steps, "dense_lm_loss": dense_loss, "noise": sc.upcycle_noise}
    else:
        model = MoEModel(sc.config).to(device)

    evals = {d: fixed_batch(corpus.split(d, "eval"), sc.eval_batch_size, sc.seq_len).to(device) for d in sc.eval_domains}
    eval_losses: dict[str, list[tuple[int, float]]] = {d: [] for d in sc.eval_domains}
    snapshots = 0
    offset = sc.dense_steps  # the progress callback counts dense and MoE steps together

    with _recorder(model, run_dir, record, seed, meta) as rec:

        def before(step: int) -> None:
            nonlocal snapshots
            rec.step = step
            if step in sc.snapshot_steps:
                snapshots += _snapshot(model, run_dir, step)

        def after(step: int, loss: float) -> None:
            if sc.eval_domains and (step % sc.eval_every == sc.eval_every - 1 or step == sc.steps - 1):
                model.eval()
                with torch.no_grad():
                    for d, x in evals.items():
                        with rec.tag(d):
                            out = model(x, labels=x)
                        eval_losses[d].append((step, float(out.lm_loss)))
                model.train()
            if progress is not None:
                progress(step + offset, loss)

        final_loss = _train_steps(model, sc, sc.steps, corpus, device, gen, sc.train_domain, after, before)
        if sc.snapshot_steps:
            snapshots += _snapshot(model, run_dir, sc.steps)

    return {
        "name": sc.name,
        "run_dir": str(run_dir),
        "steps": sc.steps + sc.dense_steps,
        "final_lm_loss": final_loss,
        "dense_lm_loss": dense_loss,
        "eval_lm_loss": {d: v[-1][1] for d, v in eval_losses.items() if v},
        "snapshots": snapshots,
        "seconds": time.perf_counter() - t0,
    }


def total_steps(sc: Scenario) -> int:
    """Optimizer steps a scenario takes (dense pre-training included), for progress bars."""
    return sc.steps + sc.dense_steps
