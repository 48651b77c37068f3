"""Attention dispatch and backends against an independent fp64 dense computation over the whole packed
tensor (document mask x window mask built from scratch in tests/dense_attention.py)."""
import logging

import pytest
import torch

from megatron_cmbert.kernels.attention import BACKENDS, attention
from megatron_cmbert.kernels.attention_reference import attention_reference
from megatron_cmbert.kernels.registry import REGISTRY, KernelChoice, KernelError, KernelSet
from megatron_cmbert.kernels.varlen import PackedLayout
from megatron_cmbert.model.padding import cu_seqlens_from_lengths

from dense_attention import dense_fp64

WINDOWS = [(-1, -1), (4, 4), (0, 0), (3, 1), (-1, 2), (5, -1)]


def packed_qkv(lengths, heads=3, head_dim=10, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    return [torch.randn(total, heads, head_dim, generator=g, dtype=dtype) for _ in range(3)]


@pytest.mark.parametrize("window", WINDOWS)
def test_reference_matches_dense_fp64_forward_and_backward(window):
    lengths = [1, 7, 13, 5, 19]  # odd shapes, a length-1 sequence, sequences shorter than the window
    q, k, v = packed_qkv(lengths)
    cu = cu_seqlens_from_lengths(lengths)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    dense_leaves = [t.double().clone().requires_grad_() for t in (q, k, v)]
    out = attention_reference(*leaves, cu, max(lengths), window=window)
    expected = dense_fp64(*dense_leaves, lengths, window)
    # fp32 matmuls + fp32 softmax vs fp64: a few ulp of fp32 at O(1) values
    torch.testing.assert_close(out.double(), expected, atol=2e-6, rtol=0)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    expected.backward(grad_out.double())
    for mine, ref in zip(leaves, dense_leaves):
        torch.testing.assert_close(mine.grad.double(), ref.grad, atol=1e-5, rtol=0)


def test_custom_softmax_scale_is_used():
    lengths = [6, 9]
    q, k, v = packed_qkv(lengths)
    out = attention(q, k, v, cu_seqlens_from_lengths(lengths), 9, window=(2, 2), softmax_scale=0.37,
                    backend="reference")
    torch.testing.assert_close(out.double(), dense_fp64(q, k, v, lengths, (2, 2), scale=0.37),
                               atol=2e-6, rtol=0)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("window", [(-1, -1), (4, 4), (3, 1)])
def test_flex_forward_on_cpu_matches_dense(window):
    # FlexAttention's forward runs uncompiled on CPU (its backward does not), which checks the block mask.
    pytest.importorskip("torch.nn.attention.flex_attention", reason="needs torch with FlexAttention")
    lengths = [5, 17, 1, 9]
    q, k, v = packed_qkv(lengths, head_dim=16)
    entry = REGISTRY["attention", "flex"]
    plan = entry.load_plan()(PackedLayout.from_lengths(lengths, max_seqlen=17), window)
    out = entry.load()(q, k, v, plan)
    torch.testing.assert_close(out.double(), dense_fp64(q, k, v, lengths, window), atol=2e-6, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (GPU backends)")
@pytest.mark.parametrize("name", ["flex", "flash_attn", "triton"])
@pytest.mark.parametrize("window", [(-1, -1), (64, 64)])
def test_gpu_backends_match_reference(name, window):
    lengths = [100, 300, 37]
    q, k, v = (t.cuda().bfloat16() for t in packed_qkv(lengths, heads=4, head_dim=64))
    reason = REGISTRY["attention", name].unavailable_reason(q.device, q.dtype)
    if reason:
        pytest.skip(f"{name}: {reason}")
    cu = cu_seqlens_from_lengths(lengths, device="cuda")
    expected = dense_fp64(q.cpu(), k.cpu(), v.cpu(), lengths, window)
    bf16_error = (attention_reference(q, k, v, cu, 300, window=window).double().cpu() - expected).abs().max()
    error = (attention(q, k, v, cu, 300, window=window, backend=name).double().cpu() - expected).abs().max()
    assert error <= 2 * bf16_error + 1e-6  # flash-attention's rule: at most 2x PyTorch's own bf16 error


def test_backends_are_the_registrys_in_auto_order():
    assert BACKENDS == ("flash_attn", "triton", "flex", "reference")


def test_config_names_the_attention_backend(monkeypatch):
    import dataclasses

    from megatron_cmbert.model import CMBertForMaskedLM, get_preset

    monkeypatch.delenv("CMBERT_KERNEL_BACKEND", raising=False)
    model = CMBertForMaskedLM(get_preset("tiny", kernels="attention=flex"))
    assert [layer.attn.backend for layer in model.model.layers] == ["flex"] * 3
    # fixed when built: no switch on a built model, and the choice itself is frozen
    assert not hasattr(model, "set_attention_backend") and not hasattr(model.kernels, "set_backend")
    with pytest.raises(dataclasses.FrozenInstanceError):
        model.kernels.choice.attention = "reference"
    with pytest.raises(ValueError, match="unknown attention backend 'nonsense'"):
        get_preset("tiny", kernels="attention=nonsense")


def test_unavailable_backend_says_why(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # as on a CPU machine outside the kernel tests
    q, k, v = packed_qkv([4])
    with pytest.raises(KernelError, match="'flex' cannot run on cpu torch.float32: needs CUDA tensors"):
        KernelSet("reference,attention=flex").attention_plan(PackedLayout.from_lengths([4]))
    with pytest.raises(KernelError, match="'triton' cannot run on cpu"):
        attention(q, k, v, cu_seqlens_from_lengths([4]), 4, backend="triton")
    with pytest.raises(KernelError, match="attention backend 'flex' cannot run on cpu"):
        KernelChoice.parse("attention=flex").resolved("cpu", torch.float32)  # what a launch check calls


def test_auto_picks_reference_on_cpu_and_logs_once(monkeypatch, caplog):
    monkeypatch.delenv("CMBERT_KERNEL_BACKEND", raising=False)
    kernels = KernelSet()
    q, k, v = packed_qkv([3, 4])
    with caplog.at_level(logging.INFO, logger="megatron_cmbert.kernels.registry"):
        plan = kernels.attention_plan(PackedLayout.from_lengths([3, 4]))
        kernels.attention(q, k, v, plan)
        kernels.attention(q, k, v, plan)
    messages = [r.getMessage() for r in caplog.records if "kernel auto for attention" in r.getMessage()]
    assert len(messages) == 1 and ": reference (skipped" in messages[0]
    assert "flex: needs CUDA tensors" in messages[0]


def test_token_count_must_match_cu_seqlens():
    q, k, v = packed_qkv([3, 4])
    with pytest.raises(ValueError, match="cu_seqlens ends at 6 but there are 7 tokens"):
        attention(q, k, v, cu_seqlens_from_lengths([3, 3]), 3, backend="reference")
