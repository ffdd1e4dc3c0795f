"""Ahead-of-time compile of a Triton kernel for a GPU this machine need not have (sm_90 by default).

Used to read a kernel's PTX / SASS offline (``bench/sass_loop.py``) and by the tests that check a kernel compiles for
the device. ``values`` are a real launch's runtime arguments: they specialize as Triton's JIT would (an int equal to
1 becomes a constant; pointers and multiples of 16 get the divisibility hint; names in ``do_not_specialize`` stay
plain), so the code matches what the device compiles. Needs no GPU, only Triton's bundled ``ptxas``; import it with
``TRITON_INTERPRET`` unset.
"""
from __future__ import annotations

from typing import Dict


def compile_for(kernel, constexprs: Dict[str, object], types: Dict[str, str], values: Dict[str, int], arch: int = 90,
                num_warps: int = 4, num_stages: int = 3):
    """The compiled kernel (``.asm["ptx"]``, ``.asm["cubin"]``, ``.metadata``). ``types``: the Triton type of every
    pointer argument (``"*bf16"``) and float scalar (``"fp32"``); ``values``: every other (integer) argument's value."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    consts = dict(constexprs)
    sig, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name in types:
            sig[name] = types[name]
            if types[name].startswith("*"):
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif name not in kernel.do_not_specialize and values[name] == 1:
            sig[name] = "constexpr"
            consts[name] = 1
        else:
            sig[name] = "i32"
            if name not in kernel.do_not_specialize and values[name] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=kernel, signature=sig, constexprs={(kernel.arg_names.index(n),): v for n, v in consts.items()},
                    attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps,
                                                                           "num_stages": num_stages})
