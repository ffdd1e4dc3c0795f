"""Offline SASS of the batched W4 kernel's K loop: instructions per int32 weight word, by class, for sm_90.

No GPU: Triton compiles ``w4_batched_kernel`` ahead of time for an H100/H200 (``GPUTarget("cuda", 90, 32)``), its
bundled ``nvdisasm`` disassembles the cubin, and the K loop is the longest basic-block range closed by a backward
branch. The loop holds ``BLOCK_N * BLOCK_K / 8`` words per iteration (``BLOCK_N`` rows x ``BLOCK_K / 8`` words, one
program), one thread handles that / (32 x warps) of them, so instructions / word = loop
instructions (a warp issues each once) / words a thread. Marlin's fragment-ordered loop issues about 9 a word;
an issue-bound loop's time scales with this number (``NOTES_kernels.md``, issue 18).

    python -m bench.sass_loop                       # the tuner's M <= 64 shapes and its M = 256-512 picks
    python -m bench.sass_loop --dump perm           # also print the loop's SASS of the variants named
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile
from pathlib import Path

# (name, BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, swap, planes, perm, xsum_mma[, zsub]): the tuner's M <= 64 shapes
VARIANTS = [
    ("swap", 16, 128, 128, 4, 4, True, False, False, False),
    ("swap-perm", 16, 128, 128, 4, 4, True, False, True, False),
    ("swap-perm-xsum", 16, 128, 128, 4, 4, True, False, True, True),
    ("swap-xsum", 16, 128, 128, 4, 4, True, False, False, True),
    ("noswap", 16, 64, 128, 4, 4, False, False, False, False),
    ("noswap-perm", 16, 64, 128, 4, 4, False, False, True, False),
    ("noswap-perm-xsum", 16, 64, 128, 4, 4, False, False, True, True),
    ("m64-noswap", 64, 128, 128, 8, 3, False, False, False, False),
    ("m64-noswap-xsum", 64, 128, 128, 8, 3, False, False, False, True),
    ("m64-swap-perm", 64, 128, 128, 8, 3, True, False, True, False),
    ("m32-swap-perm", 32, 128, 128, 4, 4, True, False, True, False),
    ("bn256-swap-perm", 16, 256, 128, 8, 3, True, False, True, False),
    ("swap-perm-w8", 16, 128, 128, 8, 3, True, False, True, False),
    # the tuner's M = 256-512 picks on the H100 (session 22's kernels table: 1.5-1.8x bf16 per layer there)
    ("m64-bk64-w4", 64, 128, 64, 4, 4, False, False, False, False),
    ("m128-bk64-w4", 128, 128, 64, 4, 4, False, False, False, False),
    ("m128-bk128-w8", 128, 128, 128, 8, 3, False, False, False, False),
    ("m128-bk64-w4-swap", 128, 128, 64, 4, 4, True, False, False, False),
    ("m128-bk64-w4-xsum", 128, 128, 64, 4, 4, False, False, False, True),
    # ``zsub`` (session 22): q - zero in the weight tile (one packed fma per word pair), no Σx term in the loop
    ("m64-bk64-w4-zsub", 64, 128, 64, 4, 4, False, False, False, False, True),
    ("m128-bk64-w4-zsub", 128, 128, 64, 4, 4, False, False, False, False, True),
    ("m128-bk128-w8-zsub", 128, 128, 128, 8, 3, False, False, False, False, True),
    ("m128-bk64-w4-swap-zsub", 128, 128, 64, 4, 4, True, False, False, False, True),
    ("m64-swap-perm-zsub", 64, 128, 128, 8, 3, True, False, True, False, True),
    ("swap-perm-zsub", 16, 128, 128, 4, 4, True, False, True, False, True),
]

CLASSES = [  # (class, opcode prefixes)
    ("mma", ("HGMMA", "HMMA", "WARPGROUP")),
    ("spill", ("LDL", "STL")),
    ("load", ("LDG", "LDGSTS", "LDGDEPBAR", "DEPBAR", "LDS", "LDSM", "UBLKCP", "UTMALDG")),
    ("store-shared", ("STS",)),
    ("barrier", ("BAR", "SYNCS", "WARPSYNC")),
    ("int-logic", ("LOP3", "SHF", "SHL", "SHR", "PRMT", "IADD3", "IMAD", "LEA", "ISETP", "SEL", "IABS", "MOV", "UMOV",
                   "ULOP3", "UIADD3", "USHF", "ULEA", "UISETP", "UIMAD", "USEL", "UPRMT", "VIADD", "IMNMX")),
    ("float", ("FADD", "FMUL", "FFMA", "HADD2", "HFMA2", "HMUL2", "F2F", "F2FP", "I2F", "FSETP", "FSEL")),
    ("branch", ("BRA", "BSYNC", "BSSY", "EXIT", "NOP", "YIELD")),
]


def classify(op):
    for name, prefixes in CLASSES:
        if op.startswith(prefixes):
            return name
    return "other"


def launch_args(variant, per_channel=True, has_ec=False, shape=(2048, 2048)):
    """(constexprs, pointer types, runtime values) of ``w4_batched_kernel`` for one variant at a real launch
    (Llama-3.2-1B q_proj by default, M = 16, split-K 2)."""
    from spear_compile.kernels import w4_batched as mod
    _, bm, bn, bk, warps, stages, swap, planes, perm, xsum = variant[:10]
    zsub = variant[10] if len(variant) > 10 else False
    kernel = mod.w4_batched_kernel
    pointers = kernel.arg_names[:kernel.arg_names.index("N0")]  # every argument before the sizes is a pointer
    types = {n: "*bf16" for n in pointers}
    types.update({f"q{i}": "*i32" for i in range(4)}, ws_ptr="*fp32", uws_ptr="*fp32", cnt_ptr="*i32")
    consts = dict(MEMBERS=1, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=32, USE_SPLIT=True, PER_CHANNEL=per_channel,
                  X_BF16=True, HAS_BIAS=False, HAS_EC=has_ec, GATED=has_ec, SWAP=swap, INTERPRET=False, PLANES=planes,
                  PERM=perm)
    for name, value in (("EVEN_K", True), ("XSUM_MMA", xsum), ("EC_PRE", False), ("GDC", False),
                        ("ZSUB", zsub), ("ACCUMULATE", False)):  # an older kernel may lack them
        if name in kernel.arg_names:
            consts[name] = value
        elif value and name in ("XSUM_MMA", "ZSUB"):
            return None
    k, n = shape
    values = dict(N0=n, N1=n, N2=n, N3=n, P1=0, P2=0, P3=0, C1=n, C2=n, C3=n, M=max(16, bm), K=k, K8=k // 8, R=32,
                  EC_LD=32, group_size=k if per_channel else 128, n_groups=1 if per_channel else k // 128, stride_xm=k,
                  stride_ym=n, N_TOTAL=n, N_TILES_TOTAL=n // bn, SPLIT_K=2)
    return consts, types, values


def compile_cubin(variant, per_channel=True, has_ec=False, shape=(2048, 2048)):
    from spear_compile.kernels import w4_batched as mod
    from spear_compile.kernels.aot import compile_for
    args = launch_args(variant, per_channel, has_ec, shape)
    if args is None:
        return None
    consts, types, values = args
    compiled = compile_for(mod.w4_batched_kernel, consts, types, values, num_warps=variant[4], num_stages=variant[5])
    return compiled.asm["cubin"], compiled.metadata


def disassemble(cubin):
    import triton
    nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        text = subprocess.run([str(nvdisasm), "-c", "-hex", f.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    return parse_sass(text)


def parse_sass(text):
    """nvdisasm's listing as ``rows`` of (address, opcode without its predicate, instruction text) and ``labels``
    (name -> address of the instruction after it)."""
    rows, labels, pending = [], {}, []
    for line in text.splitlines():
        lab = re.match(r"^(\.L_x_\d+):", line.strip())
        if lab:
            pending.append(lab.group(1))
            continue
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if not m:
            continue
        addr = int(m.group(1), 16)
        for name in pending:
            labels[name] = addr
        pending = []
        body = re.sub(r"^@!?U?P\w+\s+", "", m.group(2).strip())
        rows.append((addr, body.split()[0] if body else "", m.group(2).strip()))
    return rows, labels


def resource(cubin, what):
    """``REG`` (registers a thread) from ``cuobjdump -res-usage``."""
    import triton
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        text = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    m = re.search(what + r":(\d+)", text)
    return int(m.group(1)) if m else None


def main_loop(rows, labels):
    """The K loop: the longest [target, branch] address range closed by a backward branch that holds a tensor-core
    instruction (the split-K finisher's slot sum is a loop too, without one), else the longest such range."""
    loops = []
    for addr, op, text in rows:
        if op != "BRA":
            continue
        tgt = re.search(r"(\.L_x_\d+)", text)
        target = labels.get(tgt.group(1)) if tgt else None
        if target is not None and target < addr:
            body = [r for r in rows if target <= r[0] <= addr]
            loops.append((any(r[1].startswith(("HMMA", "HGMMA")) for r in body), addr - target, body))
    return max(loops, key=lambda t: t[:2])[2] if loops else []


def analyse(variant, per_channel=True, has_ec=False):
    out = compile_cubin(variant, per_channel, has_ec)
    if out is None:
        return None
    cubin, meta = out
    loop = main_loop(*disassemble(cubin))
    words = variant[2] * variant[3] // 8 // (32 * variant[4])  # int32 weight words a thread handles per iteration
    by_class = collections.Counter(classify(op) for _, op, _ in loop)
    by_op = collections.Counter(op for _, op, _ in loop)
    return dict(variant=variant[0], per_channel=per_channel, ec=has_ec, loop=len(loop),
                per_word=round(len(loop) / words, 1), regs=resource(cubin, "REG"),
                shared=getattr(meta, "shared", None),
                classes=dict(by_class), top=by_op.most_common(12), sass=loop)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default=",".join(v[0] for v in VARIANTS))
    ap.add_argument("--g128", action="store_true", help="grouped scales (g128) instead of per-channel")
    ap.add_argument("--ec", action="store_true", help="with a gated r=32 EC")
    ap.add_argument("--dump", default="", help="variants whose loop SASS to print")
    args = ap.parse_args()
    wanted = args.variants.split(",")
    dump = set(filter(None, args.dump.split(",")))
    print("| variant | loop instr | instr / word | regs | shared B | " +
          " | ".join(c for c, _ in CLASSES) + " | other | top opcodes |")
    print("|---" * (7 + len(CLASSES)) + "|")
    for v in VARIANTS:
        if v[0] not in wanted:
            continue
        r = analyse(v, not args.g128, args.ec)
        if r is None:
            print(f"| {v[0]} | (kernel has no such variant) |")
            continue
        cls = [str(r["classes"].get(c, 0)) for c, _ in CLASSES] + [str(r["classes"].get("other", 0))]
        top = ", ".join(f"{op} {n}" for op, n in r["top"])
        print(f"| {r['variant']} | {r['loop']} | {r['per_word']} | {r['regs']} | {r['shared']} | "
              + " | ".join(cls) + f" | {top} |", flush=True)
        if v[0] in dump:
            for _, _, text in r["sass"]:
                print("    " + text)


if __name__ == "__main__":
    main()
