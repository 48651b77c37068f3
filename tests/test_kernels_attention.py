"""Triton varlen sliding-window attention (kernels/attention_triton.py), forward and backward, against an fp64
dense computation whose document x window mask is built from scratch (tests/dense_attention.py). Runs on
the GPU when CUDA is available, else under Triton's interpreter (small shapes: the interpreter executes every
program in Python).

Tolerance (flash-attention's rule): the kernel's max error against fp64 is at most 2x the error of PyTorch's
own computation in the same dtype (kernels/attention_reference.py), plus a few fp32 ulps of slack because in
fp32 both errors are at rounding level and differ only by summation order.
"""
import dataclasses

from kernel_env import DEVICE, MODE_OK, fresh_process_only  # first: sets TRITON_INTERPRET before triton loads

import pytest
import torch

from megatron_cmbert.kernels.attention_reference import attention_reference
from megatron_cmbert.model.padding import cu_seqlens_from_lengths

from dense_attention import dense_fp64

if MODE_OK:
    from megatron_cmbert.kernels import attention_triton as triton_attention
    from megatron_cmbert.kernels.attention_triton import AttentionConfig, attention_flops, attention_triton

pytestmark = pytest.mark.timeout(600)
needs_cuda = pytest.mark.skipif(DEVICE != "cuda", reason="needs CUDA (shape too large for Triton's CPU interpreter)")
LENGTHS = [1, 7, 130, 257]  # a single token, shorter than a block, straddling blocks, odd
# Packed data: one long sequence among many short ones (blocks of the token stream span several of them),
# one-token and zero-length sequences, no length a multiple of a block, empty static-shape padding at the end.
SKEWED = [0, 200, 1, 0, 0, 5, 2, 3, 0, 37, 1, 3, 0, 70, 1, 9] + [0] * 40
FP32_SLACK = 2e-6  # ~16 fp32 ulps at O(1) outputs


def check(lengths, heads, head_dim, dtype, window, seed=0, scale=None, noncontiguous=False, config=None,
          dense=True):
    """dense=False: the fp64 oracle is the per-sequence reference in fp64 (itself checked against the dense one
    in test_model_attention.py), for micro-batches whose tokens x tokens matrix would not fit."""
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    if noncontiguous:  # the model's layout: views into one fused (T, H, 3, D) projection
        qkv = torch.randn(total, heads, 3, head_dim, generator=g).to(DEVICE, dtype)
        q, k, v = qkv.unbind(2)
    else:
        q, k, v = (torch.randn(total, heads, head_dim, generator=g).to(DEVICE, dtype) for _ in range(3))
    grad = torch.randn(total, heads, head_dim, generator=g).to(DEVICE, dtype)
    cu = cu_seqlens_from_lengths(lengths, device=DEVICE)
    scale = head_dim ** -0.5 if scale is None else scale

    def run(fn, tensors):
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        out = fn(*leaves)
        out.backward(grad.to(out.dtype))
        return [out.detach()] + [t.grad for t in leaves]

    oracle = (lambda *t: dense_fp64(*t, lengths, window, scale)) if dense else \
        (lambda *t: attention_reference(*t, cu, max(lengths), window=window, softmax_scale=scale))
    exact = run(oracle, [t.double() for t in (q, k, v)])
    torch_low = run(lambda *t: attention_reference(*t, cu, max(lengths), window=window, softmax_scale=scale),
                    (q, k, v))
    mine = run(lambda *t: attention_triton(*t, cu, max(lengths), window=window, softmax_scale=scale, config=config),
               (q, k, v))
    slack = FP32_SLACK if dtype == torch.float32 else 1e-6
    for name, m, t, e in zip(("out", "dq", "dk", "dv"), mine, torch_low, exact):
        assert m.dtype == dtype and torch.isfinite(m).all(), name
        err, torch_err = (m.double() - e).abs().max().item(), (t.double() - e).abs().max().item()
        assert err <= 2 * torch_err + slack, f"{name}: kernel error {err:.3g} > 2 x torch's {torch_err:.3g}"


@pytest.mark.parametrize("window", [(-1, -1), (0, 0), (1, 1), (64, 64), (5, 70), (-1, 3), (40, -1)])
def test_fp32_windows(window):
    check(LENGTHS, heads=3, head_dim=32, dtype=torch.float32, window=window)


@pytest.mark.parametrize("window", [(-1, -1), (64, 64), (1, 0)])
def test_bf16_head_dim_64(window):
    check(LENGTHS, heads=3, head_dim=64, dtype=torch.bfloat16, window=window, seed=1, noncontiguous=True)


@pytest.mark.parametrize("window", [(-1, -1), (64, 64), (5, 17), (0, 0), (-1, 3)])
def test_fp32_skewed_packed_lengths(window):
    check(SKEWED, heads=2, head_dim=32, dtype=torch.float32, window=window, seed=5)


@pytest.mark.parametrize("window", [(-1, -1), (64, 64)])
def test_bf16_skewed_packed_lengths(window):
    check(SKEWED, heads=2, head_dim=64, dtype=torch.bfloat16, window=window, seed=6, noncontiguous=True)


def test_grid_is_the_blocks_of_tokens_whatever_the_sequence_count():
    # Forward, dK/dV and dQ each launch cdiv(tokens, block) programs per head: no program per (sequence,
    # block of the longest sequence), none for the 1,000 empty sequences, every one with real rows.
    from megatron_cmbert.kernels.varlen import PackedLayout

    lengths = [200, 1, 5, 2, 3, 37, 1, 3, 70, 1, 9]
    total, heads, head_dim = sum(lengths), 2, 32
    config = AttentionConfig.for_inputs(torch.float32, head_dim)
    q = torch.zeros(total, heads, head_dim, device=DEVICE)
    grids = []
    for padded in (lengths, [0, *lengths[:4], 0, 0, *lengths[4:]] + [0] * 1000):
        plan = triton_attention.plan(PackedLayout.from_lengths(padded, DEVICE), (64, 64))
        bounds, fwd, dkdv, dq = triton_attention.op_arguments(plan, config)
        out, lse, forward = triton_attention.forward_launches(q, q, q, bounds, fwd, 1.0, config)
        *_, backward = triton_attention.backward_launches(out, q, q, q, out, lse, bounds, dkdv, dq, 1.0, config)
        grids.append([launch.grid for launch in forward + backward[1:]])
        assert bounds.shape == (2, total) and bounds.dtype == torch.int32
    cdiv = lambda b: -(-total // b)  # noqa: E731
    assert grids[0] == grids[1] == [(cdiv(config.fwd.BLOCK_M), heads), (cdiv(config.dkdv.BLOCK_N), heads),
                                    (cdiv(config.dq.BLOCK_M), heads)]


def test_plan_names_missing_block_sizes():
    from megatron_cmbert.kernels.varlen import PackedLayout

    plan = triton_attention.plan(PackedLayout.from_lengths([5, 3], DEVICE), (-1, -1), blocks=(64,))
    config = AttentionConfig.for_inputs(torch.float32, 32, gpu=True)  # owns 128 rows in the forward
    with pytest.raises(ValueError, match=r"work items for blocks \[64\], the launch settings need 128"):
        triton_attention.op_arguments(plan, dataclasses.replace(config, fwd=triton_attention.Blocks(128, 64)))


def test_custom_op_registration_and_one_compile_per_token_budget():
    # opcheck: schema, fake (meta) kernel and autograd registration of the custom op. Then torch.compile
    # (fullgraph, plans built outside as the model does) over three micro-batches of one budget with
    # different lengths, sequence counts and windows: the plan's shapes are the budget's, so one graph.
    from megatron_cmbert.kernels.varlen import PackedLayout

    total, config = 96, AttentionConfig.for_inputs(torch.float32, 16)
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(total, 2, 16, generator=g).to(DEVICE).requires_grad_() for _ in range(3))
    plan = triton_attention.plan(PackedLayout.from_lengths([40, 0, 1, 55], DEVICE), (4, 4))
    torch.library.opcheck(triton_attention.attention_forward,
                          (q, k, v, *triton_attention.op_arguments(plan, config), 0.25, config.to_list()))
    graphs = []

    def backend(gm, inputs):
        graphs.append(gm)
        return gm

    compiled = torch.compile(lambda q, k, v, p: triton_attention.attend(q, k, v, p), backend=backend,
                             fullgraph=True)
    for lengths, window in [([40, 0, 1, 55], (4, 4)), ([3] * 30 + [6] + [0] * 20, (-1, -1)), ([96], (0, 2))]:
        plan = triton_attention.plan(PackedLayout.from_lengths(lengths, DEVICE), window)
        out = compiled(q, k, v, plan)
        exact = dense_fp64(q.detach(), k.detach(), v.detach(), lengths, window)
        assert (out.detach().double() - exact).abs().max() < 1e-5
    assert len(graphs) == 1


def _sweep_options():
    from tools.bench_kernels import SWEEP

    from megatron_cmbert.kernels.attention_triton import Blocks

    return [(kind, Blocks(*option)) for kind, options in SWEEP.items() for option in options] if MODE_OK else []


@pytest.mark.parametrize("kind,option", _sweep_options(), ids=lambda x: x if isinstance(x, str) else x.describe())
def test_benchmark_sweep_settings_stay_correct(kind, option):
    # tools/bench_kernels.py --attention-sweep times these block shapes; each must still give right answers.
    config = dataclasses.replace(AttentionConfig.for_inputs(torch.bfloat16, 64), **{kind: option})
    check(LENGTHS, heads=2, head_dim=64, dtype=torch.bfloat16, window=(64, 64), seed=3, noncontiguous=True,
          config=config)


def test_launch_config_round_trips_through_the_custom_op_form():
    config = AttentionConfig.for_inputs(torch.bfloat16, 64, gpu=True)
    assert AttentionConfig.from_list(config.to_list()) == config
    assert config.fwd.BLOCK_M == 128 and config.dkdv.num_warps == 8  # the sweep's chosen H100 defaults


def test_odd_head_dim_and_custom_scale():
    # head_dim 24 is padded to a 32-wide tile; the padding must not leak into scores or outputs.
    check([5, 70, 33], heads=2, head_dim=24, dtype=torch.float32, window=(9, 4), seed=2, scale=0.3)


def test_window_cost_grows_with_window_not_sequence():
    # The FLOP model the benchmark uses: global is S^2 pairs, window (w, w) about S(2w+1).
    assert attention_flops([8], 1, 1) == 4 * 64
    assert attention_flops([8], 1, 1, window=(0, 0)) == 4 * 8
    assert attention_flops([8], 1, 1, window=(1, 1)) == 4 * (8 * 3 - 2)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [32, 64, 128])
@pytest.mark.parametrize("window", [(-1, -1), (64, 64), (128, 0)])
def test_cuda_large(dtype, head_dim, window):
    check([1000, 3000, 17, 513], heads=4, head_dim=head_dim, dtype=dtype, window=window, seed=3)


@needs_cuda
@pytest.mark.parametrize("seq", [8192, 1024])
@pytest.mark.parametrize("window", [(-1, -1), (64, 64)])
def test_cuda_packed_training_micro_batch(seq, window):
    # What training runs: the demo corpus packed into a 32k-token budget (hundreds of short documents, a long
    # one, the padding sequence, thousands of empty slots), the model's bf16 head_dim 64 in strided views.
    from tools.bench_kernels import DEMO_CORPUS, corpus_lengths, packed_lengths

    lengths, _ = packed_lengths(corpus_lengths(DEMO_CORPUS, None)[0], seq, 32768)
    check(lengths, heads=4, head_dim=64, dtype=torch.bfloat16, window=window, seed=8, noncontiguous=True,
          dense=False)


@needs_cuda
@pytest.mark.parametrize("window", [(-1, -1), (64, 64)])
def test_cuda_fp32_large(window):
    check([1000, 511], heads=2, head_dim=64, dtype=torch.float32, window=window, seed=4)


fresh_process_only(globals(), __file__)
