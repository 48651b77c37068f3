"""Every Triton launch compiles for an H100 (sm_90a) without a GPU: tools/compile_kernels.py.

The CPU interpreter that the other kernel tests use accepts programs the GPU compiler rejects; these tests
compile the real launch records down to a cubin with Triton's bundled ptxas and check the card's limits.
Compiling needs a process where triton was imported without TRITON_INTERPRET, so the tool runs in a
subprocess of its own (the test process may interpret) and reports its records as JSON.
"""
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="needs the PyPI package triton")
pytestmark = pytest.mark.timeout(600)
ROOT = Path(__file__).resolve().parents[1]

from megatron_cmbert.kernels.triton_compile_only import global_access_widths  # noqa: E402 (no triton import)

# A plain float global: the interpreter reads it, the GPU compiler refuses it.
NOT_CONSTEXPR_KERNEL = """
import torch, triton, triton.language as tl
from megatron_cmbert.kernels.triton_compile_only import Compiler
from megatron_cmbert.kernels.triton_utils import Launch
NOT_CONSTEXPR = 2.0
@triton.jit
def scale_by_global(X, Y, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(Y + offs, tl.load(X + offs, mask=offs < n) * NOT_CONSTEXPR, mask=offs < n)
x = torch.arange(8, dtype=torch.float32)
y = torch.empty_like(x)
launch = Launch(scale_by_global, (1,), (x, y, 8), dict(BLOCK=8))
if {interpret}:
    scale_by_global[launch.grid](*launch.args, **launch.kwargs)
    assert torch.equal(y, 2 * x), y
    print("interpreter ran it")
else:
    Compiler(capability=90).compile(launch)
"""


def _python(code: str, interpret: bool, timeout: int = 300):
    """Run code in a new Python process with TRITON_INTERPRET fixed (from a file: @triton.jit needs one)."""
    env = {**os.environ, "TRITON_INTERPRET": "1" if interpret else "0", "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "script.py"
        script.write_text(code)
        return subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout)


def _nvidia_backend_reason():
    done = _python("from triton.backends.nvidia.compiler import get_ptxas; get_ptxas(90).path", interpret=False)
    if done.returncode:
        return f"needs a Triton that can compile for NVIDIA GPUs (nvidia backend + ptxas): {done.stderr[-300:]}"
    return None


@pytest.fixture(scope="module")
def compile_report():
    reason = _nvidia_backend_reason()
    if reason:
        pytest.skip(reason)
    code = ("import dataclasses, json, sys\nfrom tools import compile_kernels\n"
            "records, failures = compile_kernels.compile_all(capability=90, report=lambda _: None)\n"
            "print(json.dumps({'records': [dataclasses.asdict(r) | {'ptxas_log': ''} for r in records], "
            "'failures': failures}))\n")
    done = _python(code, interpret=False, timeout=580)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_interpreter_accepts_what_the_gpu_compiler_rejects():
    if _nvidia_backend_reason():
        pytest.skip(_nvidia_backend_reason())
    interpreted = _python(NOT_CONSTEXPR_KERNEL.format(interpret=True), interpret=True)
    assert interpreted.returncode == 0 and "interpreter ran it" in interpreted.stdout, interpreted.stderr[-2000:]
    compiled = _python(NOT_CONSTEXPR_KERNEL.format(interpret=False), interpret=False)
    assert compiled.returncode != 0 and "NOT_CONSTEXPR" in compiled.stderr


def test_every_launch_compiles_for_h100_within_its_limits(compile_report):
    records, failures = compile_report["records"], compile_report["failures"]
    assert failures == []
    assert {r["kernel"] for r in records} == {"_fwd_kernel", "_bwd_delta_kernel", "_bwd_dkdv_kernel",
                                             "_bwd_dq_kernel", "_rope_kernel", "_geglu_kernel", "_rms_fwd_kernel",
                                             "_rms_bwd_kernel"}
    for r in records:
        assert r["registers"] is not None and 0 < r["registers"] <= 255, r
        assert r["shared_bytes"] <= 232448, r  # sm_90 opt-in shared memory per block
    # The model's attention (bf16, head_dim 64) must reach Hopper's tensor cores and spill no registers:
    # spills in the inner loop are what attention_triton.AttentionConfig's defaults are tuned away from.
    model = [r for r in records if r["constexprs"].get("HEAD_DIM") == 64
             and r["constexprs"].get("PRECISION") == "tf32" and r["kernel"] != "_bwd_delta_kernel"]
    assert len({r["kernel"] for r in model}) == 3
    for r in model:
        assert r["matmul"] == "wgmma" and r["spilled_bytes"] == 0, r
    # GeGLU is bandwidth-bound: both layouts (the model's interleaved one included) must move every element
    # in 16-byte accesses, not 2-byte loads at stride 2.
    geglu = [r for r in records if r["kernel"] == "_geglu_kernel"]
    assert len(geglu) == 4
    for r in geglu:
        assert set(r["global_access_bytes"]) == {"16"}, r  # JSON keys are strings


def test_global_access_widths_are_read_from_ptx():
    ptx = """
    @%p1 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];
    ld.global.nc.b32 %r5, [ %rd2 + 0 ];
    @%p2 st.global.b16 [ %rd3 + 0 ], { %rs1 };
    st.global.v2.b64 [ %rd4 + 0 ], { %rd5, %rd6 };
    ld.shared.v4.b32 { %r6, %r7, %r8, %r9 }, [ %r10 + 0 ];
    """
    assert global_access_widths(ptx) == {2: 1, 4: 1, 16: 2}


def test_tool_refuses_the_interpreter_mode():
    done = _python("import sys\nfrom tools import compile_kernels\nsys.exit(compile_kernels.main([]))", interpret=True)
    assert done.returncode == 2 and "TRITON_INTERPRET is set" in done.stderr
