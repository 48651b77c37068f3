"""The reference kernels' layouts and hand-written backwards against independent computations: attention in both
plan layouts (documents, blocks) against the fp64 dense oracle (tests/dense_attention.py) with gradients, on
skewed lengths, one-token and zero-length sequences (thousands of them), runs of equal lengths, windows of
every kind; RoPE against HF ModernBERT's own formula (rotate_half with cat, autograd) bitwise and by
gradcheck; the interleaved GeGLU against HF's chunked GeGLU on the de-interleaved numbers (to fp32 ulps) and
by gradcheck."""
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megatron_cmbert.kernels import attention_reference as ref
from megatron_cmbert.kernels.reference import geglu_reference, inverse_frequencies, rope_reference
from megatron_cmbert.kernels.varlen import PackedLayout

from dense_attention import dense_fp64

WINDOWS = [(-1, -1), (4, 4), (0, 0), (3, 1), (-1, 2), (5, -1), (64, 64)]
LAYOUTS = {
    "skewed": [1, 300, 2, 2, 57, 1],
    "one token": [1],
    "zero-length": [0, 9, 0, 0, 33, 1, 0],
    "runs": [16, 16, 16, 5, 5, 40, 16],
    "static tail": [48, 30, 18] + [0] * 3000,  # a padding sequence's share of the budget, then empty slots
}


@pytest.fixture(params=["documents", "blocks"])
def layout_kind(request, monkeypatch):
    """Force one plan layout (the plan picks by pair counts otherwise; blocks exist for two-sided windows)."""
    monkeypatch.setattr(ref, "BLOCKS_PAIR_SHARE", float("inf") if request.param == "blocks" else 0.0)
    return request.param


def qkv(lengths, heads=2, head_dim=8, seed=0, dtype=torch.float32):
    """q, k, v as the model has them: views into one (tokens, heads, 3, head_dim) projection."""
    g = torch.Generator().manual_seed(seed)
    fused = torch.randn(sum(lengths), heads, 3, head_dim, generator=g, dtype=dtype)
    return fused, torch.randn(sum(lengths), heads, head_dim, generator=g, dtype=dtype)


def run_reference(fused, grad, lengths, window, scale=None):
    leaf = fused.detach().clone().requires_grad_()
    layout = PackedLayout.from_lengths(lengths)
    plan = ref.plan(layout, window)
    out = ref.attend(*leaf.unbind(2), plan, softmax_scale=scale)
    out.backward(grad)
    return plan, out.detach(), leaf.grad


def run_dense(fused, grad, lengths, window, scale=None):
    leaf = fused.detach().double().requires_grad_()
    out = dense_fp64(*leaf.unbind(2), [n for n in lengths if n], window, scale)
    out.backward(grad.double())
    return out.detach(), leaf.grad


@pytest.mark.parametrize("name", LAYOUTS)
@pytest.mark.parametrize("window", WINDOWS)
def test_layouts_match_dense_fp64_with_gradients(layout_kind, name, window):
    lengths = LAYOUTS[name]
    fused, grad = qkv(lengths)
    plan, out, dqkv = run_reference(fused, grad, lengths, window)
    expected, dexpected = run_dense(fused, grad, lengths, window)
    two_sided = window[0] >= 0 and window[1] >= 0
    assert plan.kind == (layout_kind if two_sided else "documents")
    assert torch.isfinite(out).all() and torch.isfinite(dqkv).all()
    # fp32 matmuls + fp32 softmax against fp64: rounding level at O(1) values (as test_model_attention)
    torch.testing.assert_close(out.double(), expected, atol=2e-6, rtol=0)
    torch.testing.assert_close(dqkv.double(), dexpected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("window", [(-1, -1), (3, 1), (6, 6)])
def test_fp64_inputs_are_exact(layout_kind, window):
    lengths = [7, 0, 40, 1, 23]
    fused, grad = qkv(lengths, dtype=torch.float64, seed=3)
    _, out, dqkv = run_reference(fused, grad, lengths, window, scale=0.3)
    expected, dexpected = run_dense(fused, grad, lengths, window, scale=0.3)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(dqkv, dexpected, atol=1e-12, rtol=0)


def test_plan_picks_the_layout_with_fewer_pairs():
    long = PackedLayout.from_lengths([512, 512, 300, 212])
    assert ref.plan(long, (64, 64)).kind == "blocks"  # 1,536 x 192 pairs against 659,232
    assert ref.plan(long, (-1, -1)).kind == "documents"  # no blocks for a global window
    assert ref.plan(PackedLayout.from_lengths([30, 20, 9]), (64, 64)).kind == "documents"  # shorter than a block
    runs = ref.plan(PackedLayout.from_lengths([5, 5, 0, 5, 7, 7, 0, 0, 5]), (-1, -1)).runs
    assert runs == ((3, 5), (2, 7), (1, 5))  # zero-length sequences join nothing and cost nothing


def test_thousands_of_empty_sequences_plan_in_numpy():
    lengths = np.zeros(200_000, dtype=np.int64)
    lengths[[3, 70_000]] = [100, 60]
    layout = PackedLayout.from_lengths(lengths)
    start = time.perf_counter()
    documents, blocks = ref.plan(layout, (-1, -1)), ref.plan(layout, (8, 8))
    assert time.perf_counter() - start < 2.0  # no Python work per sequence (about 0.01 s here)
    assert documents.runs == ((1, 100), (1, 60)) and blocks.kind == "blocks"
    fused, _ = qkv([160])
    for p in (documents, blocks):
        out = ref.attend(*fused.unbind(2), p)
        torch.testing.assert_close(out.double(), dense_fp64(*fused.unbind(2), [100, 60], p.window),
                                   atol=2e-6, rtol=0)


def test_all_empty_batch_gives_an_empty_output():
    plan = ref.plan(PackedLayout.from_lengths([0, 0, 0]), (4, 4))
    q = torch.randn(0, 2, 8)
    assert ref.attend(q, q, q, plan).shape == (0, 2, 8)


def test_masks_are_made_once_per_dtype():
    plan = ref.plan(PackedLayout.from_lengths([9, 30]), (2, 2))
    assert plan.mask(torch.float32) is plan.mask(torch.float32)
    assert plan.mask(torch.bfloat16).dtype == torch.bfloat16


# ---- RoPE ---------------------------------------------------------------------------------------------------
def hf_rope(q, k, positions, theta):
    """transformers' ModernBERT rotary embedding and apply_rotary_pos_emb, written out (fp32)."""
    inv_freq = inverse_frequencies(theta, q.shape[-1], "cpu")
    freqs = positions[:, None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos()[:, None], emb.sin()[:, None]

    def rotate_half(x):
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    return (q.float() * cos + rotate_half(q.float()) * sin).to(q.dtype), \
        (k.float() * cos + rotate_half(k.float()) * sin).to(k.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_equals_hf_formula_forward_and_backward(dtype):
    torch.manual_seed(0)
    positions = torch.tensor([0, 1, 2, 3, 0, 1, 0, 700])
    fused = torch.randn(8, 3, 3, 16).to(dtype)  # q, k: strided views, as in the model
    grads = torch.randn(2, 8, 3, 16).to(dtype)

    def run(fn):
        leaf = fused.clone().requires_grad_()
        q, k = fn(leaf[:, :, 0], leaf[:, :, 1], positions, 10_000.0)
        torch.autograd.backward((q, k), (grads[0], grads[1]))
        return q.detach(), k.detach(), leaf.grad

    for mine, theirs in zip(run(rope_reference), run(hf_rope)):
        assert mine.dtype == theirs.dtype
        if dtype == torch.float32:
            assert torch.equal(mine, theirs)  # the same products and sums
        else:  # backward: our fp32 rotation by -angle vs autograd's bf16 rounding of each term
            torch.testing.assert_close(mine.float(), theirs.float(), atol=3e-2, rtol=2e-2)


def test_rope_backward_by_gradcheck():
    torch.manual_seed(1)
    positions = torch.tensor([0, 3, 1, 9])
    q, k = (torch.randn(4, 2, 6, dtype=torch.float64, requires_grad=True) for _ in range(2))
    # the math is fp32 (HF's): gradcheck the linear map with fp32-level tolerance
    assert torch.autograd.gradcheck(lambda a, b: rope_reference(a, b, positions, 100.0), (q, k), eps=1e-3,
                                    atol=1e-4, rtol=1e-3)


# ---- GeGLU --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(5, 2 * 7), (2, 3, 2 * 96), (4, 2 * 1152)])
def test_interleaved_geglu_equals_hf_chunk_on_deinterleaved_numbers(shape):
    gen = torch.Generator().manual_seed(sum(shape))
    x = 2 * torch.randn(shape, generator=gen)
    g = torch.randn(*shape[:-1], shape[-1] // 2, generator=gen)
    halves = x.unflatten(-1, (-1, 2)).transpose(-1, -2).flatten(-2)  # [all inputs; all gates], HF's layout
    mine, theirs = x.clone().requires_grad_(), halves.clone().requires_grad_()
    out = geglu_reference(mine, interleaved=True)
    a, gate = theirs.chunk(2, dim=-1)
    expected = F.gelu(a) * gate  # ModernBertMLP's forward
    out.backward(g)
    expected.backward(g)
    grad = theirs.grad.unflatten(-1, (2, -1)).transpose(-1, -2).flatten(-2)
    # The same per-element ops, but torch's CPU GELU rounds a contiguous tensor and a strided view (HF's
    # chunk) differently in the last bit (the erf tail near -1 cancels): a few fp32 ulps at the output's scale
    # (at most 3.5 over 300 random draws; 8 allowed).
    ulps = lambda t: 8 * torch.finfo(torch.float32).eps * t.abs().max().item()  # noqa: E731
    torch.testing.assert_close(out, expected, atol=ulps(expected), rtol=0)
    torch.testing.assert_close(mine.grad, grad, atol=ulps(grad), rtol=0)


def test_interleaved_geglu_backward_by_gradcheck():
    torch.manual_seed(2)
    x = torch.randn(3, 10, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: geglu_reference(t, interleaved=True), (x,))
    naive = F.gelu(x[..., 0::2]) * x[..., 1::2]
    torch.testing.assert_close(geglu_reference(x, interleaved=True), naive, rtol=0, atol=1e-15)


def test_rope_and_geglu_trace_whole_under_torch_compile():
    """--compile wraps encoder layers in torch.compile: both Functions must trace without a graph break,
    forward and backward (aot_eager: the same tracing, no C++ compiler needed)."""
    torch.manual_seed(3)
    positions = torch.arange(6)

    def layer_ops(x, q, k):
        qr, kr = rope_reference(q, k, positions, 1e4)
        return geglu_reference(x, interleaved=True).square().sum() + (qr * kr).sum()

    leaves = [torch.randn(6, 32), torch.randn(6, 2, 8), torch.randn(6, 2, 8)]
    eager = [t.clone().requires_grad_() for t in leaves]
    traced = [t.clone().requires_grad_() for t in leaves]
    layer_ops(*eager).backward()
    torch._dynamo.reset()
    torch.compile(layer_ops, backend="aot_eager", fullgraph=True)(*traced).backward()
    for a, b in zip(eager, traced):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-6)


def test_attention_runs_eagerly_inside_a_compiled_layer():
    """attend's shapes follow the data, so the registry hands it out torch.compiler.disable'd: a compiled
    caller breaks the graph around it and gets the eager result and gradients."""
    from megatron_cmbert.kernels.registry import REGISTRY

    attend = REGISTRY["attention", "reference"].load()
    plan = ref.plan(PackedLayout.from_lengths([5, 0, 11, 3]), (2, 2))
    fused, grad = qkv([5, 11, 3])

    def layer(t):
        return (attend(*(2 * t).unbind(2), plan) * grad).sum()

    eager, traced = fused.clone().requires_grad_(), fused.clone().requires_grad_()
    layer(eager).backward()
    torch._dynamo.reset()
    torch.compile(layer, backend="aot_eager")(traced).backward()
    torch.testing.assert_close(eager.grad, traced.grad, atol=1e-6, rtol=1e-6)
