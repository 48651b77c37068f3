"""RoPE, GeGLU, RMSNorm Triton kernels (forward + backward) against fp64 references; the kernel dispatch; custom
op registration (opcheck, torch.compile tracing); the model running its kernels through the dispatch.

On CPU the kernels run under Triton's interpreter; with CUDA they run compiled on the GPU. Tolerance: the
kernel's max error against fp64 is at most 2x PyTorch's own error in the same dtype, plus a few ulps of slack
(in fp32 both errors are rounding-level; a summed gradient like RMSNorm's dw gets rows x ulp of slack).
"""
import logging
import types

import pytest
import torch
import torch.nn.functional as F

from megatron_cmbert.kernels import dispatch
from megatron_cmbert.kernels.geglu_triton import geglu_forward, geglu_reference, geglu_triton
from megatron_cmbert.kernels.rms_norm_triton import rms_norm_forward, rms_norm_reference, rms_norm_triton
from megatron_cmbert.kernels.rope_triton import inverse_frequencies, rope_op, rope_reference, rope_triton
from megatron_cmbert.model.layers import positions_from_cu_seqlens
from megatron_cmbert.model.padding import cu_seqlens_from_lengths

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.bfloat16] + ([torch.float16] if CUDA else [])
EPS = {torch.float32: 2e-6, torch.bfloat16: 1e-6, torch.float16: 1e-6}
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA (shape too large for Triton's CPU interpreter)")


@pytest.fixture
def interpreter(monkeypatch):
    """The dispatch only routes CPU tensors to Triton when TRITON_INTERPRET=1 (Triton's own convention)."""
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


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
    positions = positions_from_cu_seqlens(cu, sum(lengths))
    qkv = torch.randn(sum(lengths), 3, 3, head_dim).to(DEVICE, dtype)  # the model's strided q, k views
    compare(lambda q, k: rope_triton(q, k, positions, theta), lambda q, k: rope_reference(q, k, positions, theta),
            [qkv[:, :, 0], qkv[:, :, 1]])


def test_rope_reference_is_the_models_rotation():
    from megatron_cmbert.model.layers import apply_rotary, rotary_cos_sin
    positions = torch.tensor([0, 1, 2, 0, 1, 5000])
    q, k = torch.randn(2, 6, 2, 16).unbind(0)
    cos, sin = rotary_cos_sin(positions, 16, 80_000.0)
    q_ref, k_ref = rope_reference(q, k, positions, 80_000.0)
    assert torch.equal(q_ref, apply_rotary(q, cos, sin)) and torch.equal(k_ref, apply_rotary(k, cos, sin))


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


# ---- dispatch ------------------------------------------------------------------------------------------
def test_dispatch_argument_env_and_errors(monkeypatch):
    x = torch.zeros(2, 4)
    monkeypatch.setenv("CMBERT_KERNEL_BACKEND", "reference")
    assert dispatch.select_kernel_backend("geglu", x) == "reference"
    assert dispatch.select_kernel_backend("geglu", x, backend="triton") == "triton"
    monkeypatch.setenv("CMBERT_KERNEL_BACKEND", "bogus")
    with pytest.raises(ValueError, match="unknown kernel backend 'bogus'"):
        dispatch.select_kernel_backend("geglu", x)
    monkeypatch.delenv("CMBERT_KERNEL_BACKEND")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="'triton' cannot run here: needs CUDA tensors"):
        dispatch.geglu(torch.zeros(2, 4), backend="triton")


def test_auto_picks_reference_on_cpu_and_logs_once(monkeypatch, caplog):
    monkeypatch.delenv("CMBERT_KERNEL_BACKEND", raising=False)
    dispatch.clear_auto_choice()
    x, w = torch.randn(3, 8), torch.ones(8)
    with caplog.at_level(logging.INFO, logger="megatron_cmbert.kernels.dispatch"):
        for _ in range(2):
            torch.testing.assert_close(dispatch.rms_norm(x, w), rms_norm_reference(x, w))
    messages = [r.getMessage() for r in caplog.records if "rms_norm backend" in r.getMessage()]
    assert messages == ["rms_norm backend for cpu torch.float32: reference (triton: needs CUDA tensors)"]


def test_dispatch_runs_triton(interpreter):
    x = torch.randn(3, 10, device=DEVICE)
    torch.testing.assert_close(dispatch.geglu(x, backend="triton"), geglu_reference(x), rtol=1e-6, atol=1e-6)


# ---- custom ops: schema / fake / autograd registration, torch.compile tracing -----------------------------
def test_opcheck_custom_ops():
    positions = torch.tensor([0, 1, 2, 0, 1], device=DEVICE)
    q, k = torch.randn(2, 5, 2, 16, device=DEVICE, requires_grad=True).unbind(0)
    torch.library.opcheck(rope_op, (q, k, positions, inverse_frequencies(1e4, 16, str(q.device)), False))
    torch.library.opcheck(geglu_forward, (torch.randn(3, 10, device=DEVICE, requires_grad=True), True))
    torch.library.opcheck(rms_norm_forward, (torch.randn(3, 10, device=DEVICE, requires_grad=True),
                                             torch.ones(10, device=DEVICE, requires_grad=True), 1e-5))


def test_torch_compile_traces_all_kernels():
    from megatron_cmbert.kernels.attention_triton import attention_triton
    lengths = [3, 20]
    cu = cu_seqlens_from_lengths(lengths, device=DEVICE)
    positions = positions_from_cu_seqlens(cu, 23)
    w = torch.ones(32, device=DEVICE, requires_grad=True)

    def block(x):
        q, k = rope_triton(x[..., :16], x[..., 16:], positions, 1e4)
        h = attention_triton(q, k, q, cu, 20, window=(4, 4))
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


@pytest.mark.skipif(CUDA, reason="checks the CPU interpreter path; CUDA tensors are compiled instead")
def test_interpreted_launches_leave_triton_language_unpatched():
    # Triton's interpreter patches triton.language on each device-function call (our kernels call `cast`,
    # tl.sum, ...) and never undoes it; triton_utils restores it, else a later GPU compile in the same process
    # fails (first seen as tests/test_kernels_compile.py failing after these tests with an empty Triton cache).
    from megatron_cmbert.kernels.triton_utils import _language_objects

    before = [dict(vars(obj)) for obj in _language_objects()]
    x = torch.randn(5, 48)
    rms_norm_triton(x.requires_grad_(), torch.ones(48), 1e-5).sum().backward()
    after = [dict(vars(obj)) for obj in _language_objects()]
    for obj, b, a in zip(_language_objects(), before, after):
        changed = sorted(n for n in set(b) | set(a) if b.get(n, None) is not a.get(n, None)
                         and not isinstance(a.get(n), types.ModuleType))  # submodules imported meanwhile
        assert not changed, f"{getattr(obj, '__name__', obj)}: {changed[:5]}"


# ---- the model through the dispatch -----------------------------------------------------------------------
def test_model_uses_triton_kernels_through_dispatch(monkeypatch, interpreter):
    from megatron_cmbert.model import CMBertForMaskedLM
    from megatron_cmbert.model.config import get_preset

    torch.manual_seed(0)
    model = CMBertForMaskedLM(get_preset("tiny", num_layers=2)).to(DEVICE)
    lengths = [5, 19]
    ids = torch.randint(0, 1000, (sum(lengths),), device=DEVICE)
    labels = ids.masked_fill(torch.rand(ids.shape, device=DEVICE) < 0.5, -100)
    cu = cu_seqlens_from_lengths(lengths, device=DEVICE)

    def loss_and_grads(backend):
        monkeypatch.setenv("CMBERT_KERNEL_BACKEND", backend)  # rope, geglu, rms_norm and attention
        model.zero_grad()
        loss = model(ids, cu, max(lengths), labels=labels).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    calls = []
    import megatron_cmbert.kernels.attention_triton as attention_module
    monkeypatch.setattr(attention_module, "attention_triton",
                        lambda *a, **k: calls.append(1) or attention_module.attention_forward(
                            *a[:5], *k["window"], a[0].shape[-1] ** -0.5)[0])
    loss_t, grads_t = loss_and_grads("triton")
    loss_r, grads_r = loss_and_grads("reference")
    assert len(calls) == 2  # one per layer: attention went through the triton backend
    torch.testing.assert_close(loss_t, loss_r, rtol=1e-5, atol=1e-5)
    for gt, gr in zip(grads_t, grads_r):
        torch.testing.assert_close(gt, gr, rtol=1e-4, atol=1e-5)  # fp32, different summation orders
