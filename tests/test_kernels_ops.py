"""RoPE, GeGLU, RMSNorm Triton kernels (forward + backward) against fp64 references; the kernel registry; custom
op registration (opcheck, torch.compile tracing); the model built with triton kernels against the same model
built with the reference ones.

On CPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1, tests/kernel_env.py); with CUDA they
run compiled on the GPU. Tolerance: the
kernel's max error against fp64 is at most 2x PyTorch's own error in the same dtype, plus a few ulps of slack
(in fp32 both errors are rounding-level; a summed gradient like RMSNorm's dw gets rows x ulp of slack).
"""
import logging
import math

from kernel_env import DEVICE, MODE_OK, fresh_process_only  # first: sets TRITON_INTERPRET before triton loads

import pytest
import torch
import torch.nn.functional as F

from megatron_cmbert.kernels.reference import geglu_reference, inverse_frequencies, rms_norm_reference, rope_reference
from megatron_cmbert.kernels.registry import KernelChoice, KernelError, KernelSet, resolve
from megatron_cmbert.kernels.varlen import PackedLayout
from megatron_cmbert.model.padding import cu_seqlens_from_lengths

if MODE_OK:
    from megatron_cmbert.kernels.geglu_triton import geglu_forward, geglu_triton
    from megatron_cmbert.kernels.rms_norm_triton import rms_norm_forward, rms_norm_triton
    from megatron_cmbert.kernels.rope_triton import rope_op, rope_triton

pytestmark = pytest.mark.timeout(600)
GPU = DEVICE == "cuda"
DTYPES = [torch.float32, torch.bfloat16] + ([torch.float16] if GPU else [])
EPS = {torch.float32: 2e-6, torch.bfloat16: 1e-6, torch.float16: 1e-6}
needs_cuda = pytest.mark.skipif(not GPU, reason="needs CUDA (shape too large for Triton's CPU interpreter)")


def compare(fn_kernel, fn_reference, inputs, grad_seed=0, slack=None):
    """Run forward+backward of kernel, reference in the inputs' dtype, and reference in fp64; assert the rule."""
    def run(fn, tensors):
        leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in tensors]
        outs = fn(*leaves)
        outs = outs if isinstance(outs, tuple) else (outs,)
        g = torch.Generator().manual_seed(grad_seed)
        grads = [torch.randn(o.shape, generator=g).to(o.device, o.dtype) for o in outs]
        torch.autograd.backward(outs, grads)
        return [o.detach() for o in outs] + [t.grad for t in leaves if t.requires_grad]

    dtype = inputs[0].dtype
    exact = run(fn_reference, [t.double() if t.is_floating_point() else t for t in inputs])
    mine, low = run(fn_kernel, inputs), run(fn_reference, inputs)
    for i, (m, t, e) in enumerate(zip(mine, low, exact)):
        assert torch.isfinite(m).all()
        err, torch_err = (m.double() - e).abs().max().item(), (t.double() - e).abs().max().item()
        bound = 2 * torch_err + (slack or EPS[dtype]) * max(1.0, e.abs().max().item())
        assert err <= bound, f"output/grad {i}: kernel error {err:.3g} > {bound:.3g} (torch {torch_err:.3g})"


# ---- RoPE -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim,theta", [(32, 10_000.0), (64, 80_000.0)])
def test_rope(dtype, head_dim, theta):
    lengths = [1, 7, 130, 257]
    cu = cu_seqlens_from_lengths(lengths, device=DEVICE)
    positions = PackedLayout.from_cu_seqlens(cu).positions
    qkv = torch.randn(sum(lengths), 3, 3, head_dim).to(DEVICE, dtype)  # the model's strided q, k views
    compare(lambda q, k: rope_triton(q, k, positions, theta), lambda q, k: rope_reference(q, k, positions, theta),
            [qkv[:, :, 0], qkv[:, :, 1]])


def test_rope_reference_rotates_each_half_pair_by_the_formula():
    # Hand-written rotation: pair (x_i, x_{i+d/2}) turns by angle p / theta^(2i/d), in fp64.
    positions = torch.tensor([0, 1, 2, 0, 1, 5000])
    q, k = torch.randn(2, 6, 2, 16).unbind(0)
    q_ref, _ = rope_reference(q, k, positions, 80_000.0)
    expected = torch.empty(6, 2, 16, dtype=torch.float64)
    for t, p in enumerate(positions.tolist()):
        for i in range(8):
            angle = p / 80_000.0 ** (2 * i / 16)
            c, s_ = math.cos(angle), math.sin(angle)
            x1, x2 = q[t, :, i].double(), q[t, :, i + 8].double()
            expected[t, :, i], expected[t, :, i + 8] = x1 * c - x2 * s_, x2 * c + x1 * s_
    # fp32 angles, as HF computes them: rounding-level error at small positions; at p = 5000 the angle itself
    # carries ~5000 x 2^-24 of rounding, so the rotated value may move by |x| times that.
    torch.testing.assert_close(q_ref[:5].double(), expected[:5], atol=2e-6, rtol=0)
    torch.testing.assert_close(q_ref[5:].double(), expected[5:], atol=2e-3, rtol=0)


@needs_cuda
def test_rope_long_positions_cuda():
    positions = torch.arange(8192, device=DEVICE)
    q, k = torch.randn(2, 8192, 16, 64, device=DEVICE, dtype=torch.bfloat16).unbind(0)
    compare(lambda q, k: rope_triton(q, k, positions, 80_000.0),
            lambda q, k: rope_reference(q, k, positions, 80_000.0), [q, k])


# ---- GeGLU ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("shape", [(5, 123, 246), (3, 2 * 2624)])  # odd widths; the model's FFN width
def test_geglu(dtype, interleaved, shape):
    x = (2 * torch.randn(shape)).to(DEVICE, dtype)
    compare(lambda t: geglu_triton(t, interleaved), lambda t: geglu_reference(t, interleaved), [x])


def test_geglu_halves_is_gelu_times_gate():
    x = torch.randn(4, 10)
    torch.testing.assert_close(geglu_reference(x), F.gelu(x[:, :5]) * x[:, 5:], rtol=0, atol=0)


# ---- RMSNorm --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 123, 123), (37, 1000)])
def test_rms_norm(dtype, shape):
    x = (3 * torch.randn(shape) + 0.5).to(DEVICE, dtype)
    weight = (1 + 0.1 * torch.randn(shape[-1])).to(DEVICE)  # fp32 master weight, as in the model
    rows = x.numel() // shape[-1]
    # dw sums `rows` products: its fp32 error grows with rows whatever the order, so the slack scales too.
    compare(lambda t, w: rms_norm_triton(t, w, 1e-5), lambda t, w: rms_norm_reference(t, w, 1e-5), [x, weight],
            slack=EPS[dtype] * rows ** 0.5 * 4)


@needs_cuda
def test_rms_norm_model_shape_cuda():
    x = torch.randn(65536, 1024, device=DEVICE, dtype=torch.bfloat16)
    w = torch.ones(1024, device=DEVICE, dtype=torch.bfloat16)
    compare(lambda t, w: rms_norm_triton(t, w, 1e-5), lambda t, w: rms_norm_reference(t, w, 1e-5), [x, w],
            slack=1e-2)  # bf16 weight: dw over 64k rows is rounded to bf16 once; 1e-2 ~ 2 bf16 ulps at |dw|~1


# ---- registry ------------------------------------------------------------------------------------------
def test_registry_names_and_errors(monkeypatch):
    monkeypatch.delenv("CMBERT_KERNEL_BACKEND", raising=False)
    assert KernelSet("reference,attention=flex").names == {"attention": "flex", "rope": "reference",
                                                           "geglu": "reference", "rms_norm": "reference"}
    assert KernelChoice.parse("attention=triton, rms_norm=reference") == KernelChoice(attention="triton",
                                                                                      rms_norm="reference")
    assert KernelChoice.from_legacy("reference", "attention=flex") == KernelChoice.parse("reference,attention=flex")
    with pytest.raises(KernelError, match="'flex' is neither op=backend"):
        KernelSet("flex")  # attention-only: it belongs in attention=flex
    with pytest.raises(KernelError, match="unknown geglu backend 'flex'"):
        KernelChoice.parse("geglu=flex")
    with pytest.raises(KernelError, match="unknown op 'attn'"):
        KernelChoice.parse("attn=flex")
    monkeypatch.setenv("CMBERT_KERNEL_BACKEND", "reference")  # replaces auto, not an explicit name
    cpu = torch.device("cpu")
    assert set(KernelChoice().resolved(cpu, torch.float32).as_dict().values()) == {"reference"}
    assert set(KernelChoice.parse("triton").resolved(cpu, torch.float32).as_dict().values()) == {"triton"}


def test_triton_on_cpu_without_the_interpreter_says_why(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(KernelError, match="'triton' cannot run on cpu torch.float32: needs CUDA tensors"):
        resolve("geglu", "triton", torch.device("cpu"), torch.float32)


def test_auto_picks_reference_on_cpu_and_logs_once(caplog):
    kernels = KernelSet("auto")
    x, w = torch.randn(3, 8), torch.ones(8)
    with caplog.at_level(logging.INFO, logger="megatron_cmbert.kernels.registry"):
        for _ in range(2):
            assert torch.equal(kernels.rms_norm(x, w), rms_norm_reference(x, w))
    messages = [r.getMessage() for r in caplog.records if "kernel auto" in r.getMessage()]
    assert len(messages) == 1 and messages[0].startswith("kernel auto for rms_norm on cpu torch.float32: reference")
    assert "triton: " in messages[0]  # names why the faster one was skipped


def test_kernel_set_runs_triton():
    x = torch.randn(3, 10, device=DEVICE)
    torch.testing.assert_close(KernelSet("triton").geglu(x), geglu_reference(x), rtol=1e-6, atol=1e-6)


# ---- custom ops: schema / fake / autograd registration, torch.compile tracing -----------------------------
def test_opcheck_custom_ops():
    positions = torch.tensor([0, 1, 2, 0, 1], device=DEVICE)
    q, k = torch.randn(2, 5, 2, 16, device=DEVICE, requires_grad=True).unbind(0)
    torch.library.opcheck(rope_op, (q, k, positions, inverse_frequencies(1e4, 16, str(q.device)), False))
    torch.library.opcheck(geglu_forward, (torch.randn(3, 10, device=DEVICE, requires_grad=True), True))
    torch.library.opcheck(rms_norm_forward, (torch.randn(3, 10, device=DEVICE, requires_grad=True),
                                             torch.ones(10, device=DEVICE, requires_grad=True), 1e-5))


def test_torch_compile_traces_all_kernels():
    from megatron_cmbert.kernels import attention_triton
    lengths = [3, 20]
    layout = PackedLayout.from_lengths(lengths, DEVICE)
    plan = attention_triton.plan(layout, (4, 4))  # plans are made outside compiled regions, as the model does
    w = torch.ones(32, device=DEVICE, requires_grad=True)

    def block(x):
        q, k = rope_triton(x[..., :16], x[..., 16:], layout.positions, 1e4)
        h = attention_triton.attend(q, k, q, plan)
        return rms_norm_triton(geglu_triton(torch.cat([h, h], -1).flatten(1), True), w, 1e-5)

    x = torch.randn(23, 2, 32, device=DEVICE, requires_grad=True)
    # aot_eager: dynamo + AOT autograd trace the ops through their fake and autograd registrations with no
    # C++/CUDA code generation, so the check is the same on a CPU machine and a GPU one.
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    out.sum().backward()
    grad = x.grad.clone()
    x.grad = None
    block(x).sum().backward()
    torch.testing.assert_close(grad, x.grad)


# ---- the model: every kernel triton vs every kernel reference ----------------------------------------------
def test_model_built_with_triton_kernels_matches_reference_model():
    from megatron_cmbert.model import CMBertForMaskedLM
    from megatron_cmbert.model.config import get_preset

    torch.manual_seed(0)
    lengths = [5, 19]
    ids = torch.randint(0, 1000, (sum(lengths),), device=DEVICE)
    labels = ids.masked_fill(torch.rand(ids.shape, device=DEVICE) < 0.5, -100)
    cu = cu_seqlens_from_lengths(lengths, device=DEVICE)
    reference = CMBertForMaskedLM(get_preset("tiny", num_layers=2, kernels="reference")).to(DEVICE)
    triton_model = CMBertForMaskedLM(get_preset("tiny", num_layers=2, kernels="triton")).to(DEVICE)
    triton_model.load_state_dict(reference.state_dict())

    def loss_and_grads(model):
        loss = model(ids, cu, max(lengths), labels=labels).loss
        loss.backward()
        return loss.detach(), [p.grad for p in model.parameters()]

    loss_t, grads_t = loss_and_grads(triton_model)
    loss_r, grads_r = loss_and_grads(reference)
    # the triton model really ran Triton for each op (the functions it resolved), the reference model did not
    resolved = {key[0]: entry.module for key, entry in triton_model.kernels._kernels.items()}
    assert resolved == {op: f"megatron_cmbert.kernels.{op}_triton" for op in ("attention", "rope", "geglu",
                                                                              "rms_norm")}
    assert all("triton" not in entry.module for entry in reference.kernels._kernels.values())
    torch.testing.assert_close(loss_t, loss_r, rtol=1e-5, atol=1e-5)
    for gt, gr in zip(grads_t, grads_r):
        torch.testing.assert_close(gt, gr, rtol=1e-4, atol=1e-5)  # fp32, different summation orders


fresh_process_only(globals(), __file__)


def test_rope_tables_made_under_inference_mode_still_train():
    """The cached RoPE frequencies are saved for backward; a first call under inference_mode (a throughput
    benchmark earlier in the same process) must not leave an inference tensor in the cache."""
    from megatron_cmbert.kernels.rope_triton import rope_triton

    theta = 12_345.0  # a value no other test caches
    with torch.inference_mode():
        inverse_frequencies(theta, 16, str(DEVICE))
    q = torch.randn(5, 2, 16, device=DEVICE, requires_grad=True)
    qr, kr = rope_triton(q, q.detach().clone(), torch.arange(5, device=DEVICE), theta)  # saves them for backward
    qr.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
