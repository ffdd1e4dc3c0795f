"""Small Triton helpers shared by the kernels."""
import triton
import triton.language as tl


@triton.jit
def dot(a, b, acc, INTERPRET: tl.constexpr):
    """``acc + a @ b``, fp32 accumulation; under the CPU interpreter (whose bf16 tl.dot returns
    garbage in Triton 3.9) the operands go to fp32 first."""
    if INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)
