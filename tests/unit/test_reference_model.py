"""The bundled reference MoE: shapes, dispatch equivalence, router contract, losses, data splits."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from moescope.reference import data as D  # noqa: E402
from moescope.reference.model import (  # noqa: E402
    Experts,
    MoEBlock,
    MoEConfig,
    MoEModel,
    Router,
    balance_losses,
    sorted_dispatch,
    textbook_dispatch,
    upcycle,
)

TINY = MoEConfig(d_model=32, n_layers=2, n_heads=4, n_experts=8, top_k=2, d_expert=48)


def tiny(**kw: object) -> MoEModel:
    torch.manual_seed(0)
    cfg = MoEConfig(**{**TINY.__dict__, **kw})
    return MoEModel(cfg)


def test_shapes_and_losses():
    model = tiny()
    x = torch.randint(0, 256, (3, 17))
    out = model(x, labels=x)
    assert out.logits.shape == (3, 17, 256)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    expected = out.lm_loss + TINY.aux_loss_coef * out.aux_loss + TINY.z_loss_coef * out.z_loss
    assert torch.allclose(out.loss, expected)
    assert out.aux_loss.item() >= 1.0 - 1e-4  # N·Σ f P is 1 at best (uniform)
    out.loss.backward()
    assert model.layers[0].moe.router.weight.grad is not None
    assert model.layers[0].moe.experts.gate_up_proj.grad.abs().sum() > 0
    # no labels: logits only; attention mask and a position offset are accepted
    out2 = model(x, attention_mask=torch.ones_like(x), position_offset=5)
    assert out2.loss is None and out2.logits.shape == (3, 17, 256)


def test_fused_expert_layout_and_module_names():
    model = tiny()
    block = model.layers[1].moe
    assert isinstance(block, MoEBlock) and isinstance(block.router, Router) and isinstance(block.experts, Experts)
    assert block.experts.gate_up_proj.shape == (8, 2 * 48, 32)  # [E, 2I, H]
    assert block.experts.down_proj.shape == (8, 32, 48)  # [E, H, I]
    assert isinstance(block.router.n_experts, int) and isinstance(block.router.top_k, int)
    assert (block.router.n_experts, block.router.top_k) == (8, 2)


def test_padding_mask_ignores_padded_tokens_in_loss():
    model = tiny()
    x = torch.randint(0, 256, (2, 12))
    mask = torch.ones_like(x)
    mask[:, :4] = 0  # left padding
    out = model(x, attention_mask=mask, labels=x)
    assert torch.isfinite(out.loss) and torch.isfinite(out.logits).all()
    # the unpadded tail only sees itself: a prefix change under the mask leaves it unchanged
    x2 = x.clone()
    x2[:, :4] = (x2[:, :4] + 7) % 256
    out2 = model(x2, attention_mask=mask, labels=x2)
    assert torch.allclose(out.logits[:, 4:], out2.logits[:, 4:], atol=1e-5)


def test_position_offset_matches_longer_context_positions():
    model = tiny().eval()
    x = torch.randint(0, 256, (1, 10))
    a = model(x[:, 5:], position_offset=5).logits
    b = model(x[:, 5:], position_offset=0).logits
    assert torch.allclose(a, b, atol=1e-5)  # RoPE is relative: a shared offset does not change attention
    assert model.generate(x[:, :3], max_new_tokens=4).shape == (1, 7)


@pytest.mark.parametrize("bias", [False, True])
def test_router_contract(bias):
    torch.manual_seed(1)
    cfg = MoEConfig(**{**TINY.__dict__, "bias_balancing": bias})
    router = Router(cfg)
    torch.nn.init.normal_(router.weight, std=0.5)
    if bias:
        router.bias.copy_(torch.linspace(-2, 2, 8))
    x = torch.randn(50, 32)
    logits, weights, ids = router(x)
    assert logits.dtype == torch.float32 and logits.shape == (50, 8)
    assert weights.shape == (50, 2) and ids.shape == (50, 2) and ids.dtype == torch.int64
    scores = logits + router.bias if bias else logits
    assert torch.equal(ids, torch.topk(scores, 2, dim=-1).indices)
    assert torch.allclose(weights.sum(-1), torch.ones(50))
    # weights are the softmax over the selected logits (not over the biased scores)
    assert torch.allclose(weights, torch.softmax(logits.gather(-1, ids), dim=-1), atol=1e-6)


def test_router_is_float32_under_autocast():
    router = Router(TINY)
    torch.nn.init.normal_(router.weight, std=0.5)
    x = torch.randn(6, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, weights, ids = router(x.bfloat16())
    assert logits.dtype == torch.float32 and weights.dtype == torch.float32


def test_sorted_dispatch_equals_textbook_loop_forward_and_grads():
    torch.manual_seed(2)
    experts = Experts(TINY)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.1)
    torch.nn.init.normal_(experts.down_proj, std=0.1)
    x = torch.randn(40, 32, requires_grad=True)
    logits = torch.randn(40, 8, requires_grad=True)
    ids = torch.topk(logits, 2).indices
    ids[:, 0] = torch.where(ids[:, 0] == 7, ids[:, 1], ids[:, 0])  # expert 7 only ever second: one empty-ish case
    ids[:, 1] = torch.where(ids[:, 1] == 7, (ids[:, 0] + 1) % 7, ids[:, 1])  # expert 7 never chosen
    ids[:, 1] = torch.where(ids[:, 1] == ids[:, 0], (ids[:, 0] + 2) % 7, ids[:, 1])

    def run(fn):
        for p in (x, logits, experts.gate_up_proj, experts.down_proj):
            p.grad = None
        weights = torch.softmax(logits.gather(-1, ids), -1)
        y = fn(experts, x, weights, ids)
        (y * torch.linspace(-1, 1, 32)).sum().backward()
        return y.detach(), [p.grad.clone() for p in (x, logits, experts.gate_up_proj, experts.down_proj)]

    y1, g1 = run(sorted_dispatch)
    y2, g2 = run(textbook_dispatch)
    assert torch.allclose(y1, y2, atol=1e-6)
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, atol=1e-6)
    assert g1[2][7].abs().sum() == 0  # an unchosen expert gets no gradient, in both


def test_model_dispatch_modes_agree():
    a = tiny()
    b = tiny(dispatch="textbook")
    b.load_state_dict(a.state_dict())
    x = torch.randint(0, 256, (2, 16))
    oa, ob = a(x, labels=x), b(x, labels=x)
    assert torch.allclose(oa.logits, ob.logits, atol=1e-5)
    oa.loss.backward()
    ob.loss.backward()
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-5), n


def test_aux_loss_known_answer_on_hand_set_router():
    # 4 experts, top-1 for simplicity of the hand computation; logits chosen so probs are exact
    p = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.1, 0.7, 0.1, 0.1], [0.7, 0.1, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25]])
    logits = p.log()
    ids = torch.tensor([[0], [1], [0], [3]])
    aux, z = balance_losses(logits, ids, 4)
    f = torch.tensor([2, 1, 0, 1]) / 4.0
    P = p.mean(0)
    assert math.isclose(aux.item(), 4 * float((f * P).sum()), rel_tol=1e-6)
    assert math.isclose(aux.item(), 4 * (0.5 * 0.4375 + 0.25 * 0.2875 + 0.25 * 0.1375), rel_tol=1e-6)
    assert math.isclose(z.item(), 0.0, abs_tol=1e-10)  # log-probs: logsumexp = 0
    # uniform routing gives exactly 1; total collapse onto one expert gives N
    uni, _ = balance_losses(torch.zeros(8, 4), torch.arange(8)[:, None] % 4, 4)
    assert math.isclose(uni.item(), 1.0, rel_tol=1e-6)
    col, _ = balance_losses(torch.tensor([[100.0, 0, 0, 0]] * 8), torch.zeros(8, 1, dtype=torch.long), 4)
    assert math.isclose(col.item(), 4.0, rel_tol=1e-4)
    # top-2 on a hand-set router: f counts both slots
    router = Router(MoEConfig(d_model=2, n_experts=4, top_k=2))
    with torch.no_grad():
        router.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]))
    x = torch.tensor([[2.0, 1.0], [2.0, 1.0]])  # logits [2, 1, -2, -1]: picks experts 0 and 1
    logits, w, ids = router(x)
    aux2, z2 = balance_losses(logits, ids, 4)
    pr = torch.softmax(torch.tensor([2.0, 1.0, -2.0, -1.0]), 0)
    assert math.isclose(aux2.item(), 4 * (0.5 * pr[0] + 0.5 * pr[1]).item(), rel_tol=1e-6)
    assert math.isclose(z2.item(), torch.logsumexp(torch.tensor([2.0, 1.0, -2.0, -1.0]), 0).item() ** 2, rel_tol=1e-6)


def test_bias_balancing_moves_bias_toward_underloaded_experts():
    model = tiny(bias_balancing=True, bias_update_rate=0.1)
    x = torch.randint(0, 256, (2, 16))
    model(x, labels=x)
    block = model.layers[0].moe
    load = block.load.clone()
    assert load.sum() == 2 * 16 * 2
    model.update_router_bias()
    expected = 0.1 * torch.sign(load.mean() - load)
    assert torch.allclose(block.router.bias, expected)
    assert block.load.sum() == 0
    assert not any("bias" in n and "logit" not in n for n, _ in model.named_parameters())  # a buffer, not a param


def test_upcycle_makes_near_clones():
    dense = tiny(n_experts=1, top_k=1)
    moe = upcycle(dense, n_experts=4, top_k=2, noise=0.01)
    gu = moe.layers[0].moe.experts.gate_up_proj
    base = dense.layers[0].moe.experts.gate_up_proj[0]
    rel = (gu - base).norm(dim=(1, 2)) / base.norm()
    assert (rel < 0.02).all() and (rel > 0).all()
    assert torch.equal(moe.embed.weight, dense.embed.weight)


def test_cuda_autocast_path_when_available():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    model = tiny().cuda()
    x = torch.randint(0, 256, (2, 32), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(x, labels=x)
    out.loss.backward()
    assert torch.isfinite(out.loss)


# ----------------------------------------------------------------------------------------------------- data


def test_split_source_separates_english_and_code():
    src = '''"""Module docstring here."""
import os  # trailing comment


def f(x):
    """Return x.

    >>> f(1)
    1
    """
    # a full-line comment
    return x + "# not a comment"
'''
    eng, code = D.split_source(src)
    assert "Module docstring here." in eng and "trailing comment" in eng and "a full-line comment" in eng
    assert "Return x." in eng and ">>>" not in eng
    assert "import os" in code and "def f(x):" in code and 'return x + "# not a comment"' in code
    assert "docstring" not in code and "trailing comment" not in code and "#" not in code.replace('"# not', "")


def test_corpus_splits_are_deterministic_and_disjoint():
    a = D.load_corpus(max_bytes=150_000, seed=3)
    D.load_corpus.cache_clear()
    b = D.load_corpus(max_bytes=150_000, seed=3)
    assert a.train_files == b.train_files and a.eval_files == b.eval_files
    assert torch.equal(a.english_train, b.english_train) and torch.equal(a.code_eval, b.code_eval)
    assert not set(a.train_files) & set(a.eval_files)
    c = D.load_corpus(max_bytes=150_000, seed=4)
    assert c.train_files != a.train_files
    for t in (a.english_train, a.english_eval, a.code_train, a.code_eval):
        assert t.dtype == torch.uint8 and t.numel() > 200
    files = D.stdlib_files()
    assert len(files) > 50 and files == sorted(files, key=lambda p: p.as_posix())
    assert not any("site-packages" in p.parts for p in files)


def test_english_looks_like_prose_and_code_like_code():
    corpus = D.load_corpus(max_bytes=150_000, seed=3)
    eng = bytes(corpus.english_train[:20_000].tolist()).decode("utf-8", "replace")
    code = bytes(corpus.code_train[:20_000].tolist()).decode("utf-8", "replace")

    def share(text: str, chars: str) -> float:
        return sum(text.count(ch) for ch in chars) / len(text)

    assert share(eng, "()=[]_:") < share(code, "()=[]_:") / 2  # code is punctuation-heavy
    assert eng.count(" the ") > 5 * max(code.count(" the "), 1)  # prose has function words
    assert "def " in code and "return" in code


def test_batches_are_seeded():
    data = torch.arange(1000, dtype=torch.int64).to(torch.uint8)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    x1, y1 = D.get_batch(data, 4, 16, g1)
    x2, _ = D.get_batch(data, 4, 16, g2)
    assert torch.equal(x1, x2) and x1.shape == (4, 16) and x1.dtype == torch.int64 and torch.equal(x1, y1)
    assert torch.equal(D.fixed_batch(data, 4, 16), D.fixed_batch(data, 4, 16))
