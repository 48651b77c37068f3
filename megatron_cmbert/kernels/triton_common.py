"""@triton.jit helpers shared by the kernel files (imported only by them, so Triton loads on first use)."""
import triton
import triton.language as tl


@triton.jit
def cast(x, dtype: tl.constexpr, INTERP: tl.constexpr):
    """x.to(dtype) with round-to-nearest-even everywhere. Triton 3.9's interpreter truncates fp32 -> bf16
    (a 1-ulp bias that would double the error the tests measure); under it (INTERP) we round the fp32 bits
    ourselves so the truncation is exact. Compiled kernels already round to nearest even."""
    if INTERP:
        if dtype == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _runtime_loop_probe(OUT, n):
    """A loop whose bound is a runtime value: under Triton's interpreter the bound reaches Python's range()."""
    count = 0
    for _ in range(n):
        count += 1
    tl.store(OUT, count)


def interpreter_loop_problem() -> str | None:
    """Why Triton's interpreter cannot run this package's kernels here (None when it can), found by running
    the pattern they all use: `for i in range(runtime_value)`. Triton 3.6's interpreter converts the bound,
    a 1-element numpy array, with int(), which numpy >= 2.4 refuses ("only 0-dimensional arrays can be
    converted to Python scalars"); Triton 3.9 squeezes it first. Probed rather than version-matched, so a
    fixed Triton or numpy is accepted as soon as it works."""
    import numpy as np
    import torch

    out = torch.zeros(1, dtype=torch.int32)
    try:
        _runtime_loop_probe[(1,)](out, 3)
    except Exception as error:  # noqa: BLE001 - the interpreter wraps the TypeError in its own error
        return (f"Triton {triton.__version__}'s interpreter cannot run a loop with a runtime bound under numpy "
                f"{np.__version__} ({type(error).__name__}: {str(error)[:120]}); install numpy<2.4 beside this "
                f"Triton (tools/gpu_image_env.sh does) or a Triton whose interpreter squeezes loop bounds")
    if int(out[0]) != 3:
        return f"Triton {triton.__version__}'s interpreter ran a 3-step loop {int(out[0])} times"
    return None
