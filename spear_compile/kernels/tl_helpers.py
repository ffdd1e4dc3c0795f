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


@triton.jit
def half_bits(t, HIGH: tl.constexpr, X_DT: tl.constexpr):
    """The low / high 16 bits of int32 ``t`` reinterpreted as bf16/fp16 (two packed activations or magic-number
    dequantized weights per word)."""
    if HIGH:
        h = (t >> 16).to(tl.int16)
    else:
        h = (t & 0xFFFF).to(tl.int16)
    return h.to(X_DT, bitcast=True)
