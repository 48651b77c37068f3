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
