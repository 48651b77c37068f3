"""Every Triton launch compiles for an H100 (sm_90a) without a GPU: tools/compile_kernels.py.

The CPU interpreter that the other kernel tests use accepts programs the GPU compiler rejects; these tests
compile the real launch code down to a cubin with Triton's bundled ptxas and check the card's limits.
"""
import os

import pytest
import torch

triton = pytest.importorskip("triton")
compile_only_module = pytest.importorskip("megatron_cmbert.kernels.triton_compile_only")


def _nvidia_backend_reason():
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        get_ptxas(90).path
    except Exception as error:  # noqa: BLE001 - any failure means this Triton cannot compile for NVIDIA here
        return f"this Triton install cannot compile for NVIDIA GPUs (no nvidia backend / ptxas: {error})"
    return None


pytestmark = [
    pytest.mark.skipif(_nvidia_backend_reason() is not None, reason=str(_nvidia_backend_reason())),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes"),
                       reason="TRITON_INTERPRET=1 for the whole run: Triton then builds interpreter-only kernels "
                              "that cannot be compiled for a GPU"),
]

import triton.language as tl  # noqa: E402

from megatron_cmbert.kernels import triton_utils  # noqa: E402
from megatron_cmbert.kernels.triton_compile_only import compile_only  # noqa: E402
from tools import compile_kernels  # noqa: E402

NOT_CONSTEXPR = 2.0  # a plain float global: the interpreter reads it, the GPU compiler refuses it


@triton.jit
def _scale_by_global(X, Y, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(Y + offs, tl.load(X + offs, mask=offs < n) * NOT_CONSTEXPR, mask=offs < n)


def test_interpreter_accepts_what_the_gpu_compiler_rejects(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = torch.arange(8, dtype=torch.float32)
    y = torch.empty_like(x)
    triton_utils.launcher(_scale_by_global, x)[(1,)](x, y, 8, BLOCK=8)
    torch.testing.assert_close(y, 2 * x)  # the interpreter ran it
    with compile_only(capability=90), pytest.raises(Exception, match="NOT_CONSTEXPR"):
        triton_utils.launcher(_scale_by_global, x)[(1,)](x, y, 8, BLOCK=8)
    assert not compile_only_module.active()  # the mode ends with the block, even on error


def test_every_launch_compiles_for_h100_within_its_limits():
    records, failures = compile_kernels.compile_all(capability=90, report=lambda _: None)
    assert failures == []
    compiled = {r.kernel for r in records}
    assert compiled == {"_fwd_kernel", "_bwd_delta_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel", "_rope_kernel",
                        "_geglu_kernel", "_rms_fwd_kernel", "_rms_bwd_kernel"}
    for r in records:
        assert r.registers is not None and 0 < r.registers <= 255, r.describe()
        assert r.shared_bytes <= compile_only_module.SHARED_LIMIT_BYTES[90], r.describe()
    # The model's attention (bf16, head_dim 64) must reach Hopper's tensor cores and spill no registers:
    # spills in the inner loop are what the launch configuration in attention_triton._config is tuned away from.
    model = [r for r in records if r.constexprs.get("HEAD_DIM") == 64 and r.constexprs.get("PRECISION") == "tf32"
             and r.kernel != "_bwd_delta_kernel"]
    assert len({r.kernel for r in model}) == 3
    for r in model:
        assert r.matmul == "wgmma", r.describe()
        assert r.spilled_bytes == 0, f"{r.describe()} spills {r.spilled_bytes} B"
    # GeGLU is bandwidth-bound: both layouts (the model's interleaved one included) must move every element
    # in 16-byte accesses, not 2-byte loads at stride 2.
    geglu = [r for r in records if r.kernel == "_geglu_kernel"]
    assert len(geglu) == 4
    for r in geglu:
        assert set(r.global_access_bytes) == {16}, f"{r.describe()}: {r.global_access_bytes}"


def test_global_access_widths_are_read_from_ptx():
    ptx = """
    @%p1 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];
    ld.global.nc.b32 %r5, [ %rd2 + 0 ];
    @%p2 st.global.b16 [ %rd3 + 0 ], { %rs1 };
    st.global.v2.b64 [ %rd4 + 0 ], { %rd5, %rd6 };
    ld.shared.v4.b32 { %r6, %r7, %r8, %r9 }, [ %r10 + 0 ];
    """
    assert compile_only_module.global_access_widths(ptx) == {2: 1, 4: 1, 16: 2}


def test_launches_use_gpu_configuration_only_inside_compile_only():
    x = torch.zeros(4, 8)
    assert not triton_utils.gpu_path(x)
    with compile_only(capability=90, sm_count=7, ptxas_report=False):
        assert triton_utils.gpu_path(x)
        assert triton_utils.program_count(x) == 7
        assert isinstance(triton_utils.launcher(_scale_by_global, x), compile_only_module.CompileOnlyLauncher)
    assert not triton_utils.gpu_path(x)


def test_main_prints_table_and_exit_status(capsys):
    assert compile_kernels.main([]) == 0
    out = capsys.readouterr().out
    assert "_bwd_dkdv_kernel" in out and "wgmma" in out and "0 failures" in out
