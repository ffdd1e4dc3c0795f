"""The Gluon Hopper W4A16 GEMM (``lowering/gluon_w4.py``) against bf16 cuBLAS and dequantize + cuBLAS, large M.

For Llama-3.2-1B and Llama-2-7B (the 7 linears of a decoder layer), M in {128, 256, 512, 1024, 2048}, per-channel
and g128: (a) every Gluon candidate config (``gluon_candidates`` plus an fp32-dequantize control) is checked against
a float64 dequantize-then-matmul reference at that M, with bias at M = 77 (row masking) on the first M; a config
that fails (error, or max |err| / max |ref| > 2e-2, or norm-relative > 3e-3) is printed and excluded; (b) times, as
CUDA-event-timed CUDA-graph replays with the linear's weights cycled over enough copies to exceed L2 (50 MB): the
best passing Gluon config, bf16 ``F.linear``, ``dequantize_w4`` + ``F.linear`` and, with ``--dispatch``, the tuned
``dispatch.launch`` ("ours W4"); (c) a markdown table per (model, M, quant), a summary and a JSON under ``--out``.

    python3 -m bench.gluon_w4 --out DIR            # full run (~3 min on an H100)
    python3 -m bench.gluon_w4 --out DIR --quick    # Llama-3.2-1B, M = 256, per-channel
    python3 -m bench.gluon_w4 --sass               # no GPU: sm_90 SASS facts of the candidate tiles (Triton 3.6)
    python3 -m bench.gluon_w4 --compile-check 128,256,64,8,4,ws   # no GPU: compile one config (exit status)
    python3 -m bench.gluon_w4 --swap-sass          # no GPU: the swap kernel's SASS table only

The warp-specialized configs (``gluon_w4.WS_CONFIGS``, ``variant="ws"``; ``--no-ws`` drops them) are checked and
timed beside the others, in their own ``ws`` columns (best ws config per linear). Each is first compiled in a child
process (``--compile-check``; a failed assertion in Triton's C++ aborts the process instead of raising); one that
fails there is logged and skipped, as is one that raises or misses the float64 bounds in the run.

The swapped-operand configs (``gluon_w4.SWAP_CONFIGS``, ``variant="swap"``: yᵀ tiles with W dequantized in registers
as the wgmma A operand, split-K by fp32 slots + arrival counters; ``--no-swap`` drops them) go through the same child
process precheck and get their own ``swap`` columns (best swap config per linear; token tiles larger than max(64, M),
and the 64-token tile above M = 128, are not tried). ``--swap-sass`` (no GPU) prints only the swap kernel's SASS
table (bf16 and fp16).

    python3 -m bench.gluon_w4 --out DIR --models Llama-2-7B,Llama-3.2-1B --ms 128,256,512 --budget 240
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import subprocess
import sys
import time
import traceback

from bench.kernels import L2_BYTES, MODELS, layer_shapes, time_graph  # the per-layer kernels bench's

MS = (128, 256, 512, 1024, 2048)
G = 128
MAX_REL, NORM_REL = 2e-2, 3e-3
MAX_COPIES = 32


class Log:
    def __init__(self, path):
        self.fh = open(path, "w") if path else None

    def __call__(self, *a):
        s = " ".join(str(x) for x in a)
        print(s, flush=True)
        if self.fh:
            self.fh.write(s + "\n")
            self.fh.flush()


# ------------------------------------------------------------------ offline SASS (no GPU)
def _compile_sm90(cfg, pc, dtype="bf16", accumulate=False, ec_rank=0):
    """Compile ``cfg`` (the ws kernel for ``variant="ws"``, the swap kernel for ``"swap"``, adding into y with
    ``accumulate``, with an EC of rank ``ec_rank`` in its epilogue) offline for sm_90 with this Triton: per-channel (``pc``) or g128, bias, ``dtype`` activations;
    returns triton's compiled kernel. Needs no GPU."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource

    from spear_compile.kernels import w4_gluon
    from spear_compile.lowering import gluon_w4
    from spear_compile.lowering.configs import block_r

    ws = cfg.variant == "ws"
    swap = cfg.variant == "swap"
    kern = w4_gluon.w4_gluon_ws_kernel if ws else w4_gluon.w4_gluon_swap_kernel if swap else w4_gluon.w4_gluon_kernel
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    gdt = gl.bfloat16 if dtype == "bf16" else gl.float16
    xl = gl.NVMMASharedLayout.get_default_for([bm, bk], gdt)
    ql = gl.NVMMASharedLayout.get_default_for([bn, bk // 8], gl.int32)
    types = dict(x_desc=f"tensordesc<{dtype}[{bm}, {bk}],{xl!r}>",
                 q_desc=f"tensordesc<i32[{bn}, {bk // 8}],{ql!r}>",
                 s_ptr=f"*{dtype}", z_ptr=f"*{dtype}", bias_ptr=f"*{dtype}", y_ptr=f"*{dtype}", M="i32", N="i32",
                 K="i32", n_groups="i32", stride_ym="i32", ws_ptr="*fp32", cnt_ptr="*i32", K_TILES="i32",
                 v_ptr=f"*{dtype}", eb_ptr=f"*{dtype}", R="i32", EC_LD="i32")
    consts = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, NUM_STAGES=cfg.num_stages,
                  GROUP_TILES=1 if pc else G // bk, PER_CHANNEL=pc, HAS_BIAS=True, num_warps=cfg.num_warps)
    options = {"num_warps": cfg.num_warps}
    if ws:
        load_part, _, maxnreg = gluon_w4.ws_layout(cfg)
        consts.update(W_STAGES=gluon_w4.WS_W_STAGES, LOAD_PART=load_part, DQ_REGS=gluon_w4.WS_DQ_REGS,
                      GROUP_M=gluon_w4.GROUP_M)
        options["maxnreg"] = maxnreg
    elif swap:
        consts.update(SPLIT_K=cfg.split_k, ACCUMULATE=accumulate, EC=ec_rank > 0,
                      BLOCK_R=block_r(ec_rank), GDC=ec_rank > 0)
    else:
        consts.update(DQ2=cfg.variant == "dq2", GROUP_M=gluon_w4.GROUP_M)
    sig, attrs = {}, {}
    for i, name in enumerate(kern.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        else:
            sig[name] = types[name]
            if types[name].startswith("*") or name in ("N", "K", "stride_ym"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = GluonASTSource(fn=kern, signature=sig, attrs=attrs,
                         constexprs={(kern.arg_names.index(n),): v for n, v in consts.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def _cfg_arg(cfg):
    return f"{cfg.block_m},{cfg.block_n},{cfg.block_k},{cfg.num_warps},{cfg.num_stages},{cfg.variant}" \
        + (f",{cfg.split_k}" if cfg.split_k != 1 else "")


def compile_check(arg):
    """``--compile-check BM,BN,BK,WARPS,STAGES,VARIANT[,SPLIT_K]``: compile that config offline for sm_90 (pc and
    g128, bf16 and fp16); exit status 0 when all compiled. Run in a subprocess by the GPU bench, because a failed
    assertion in Triton's C++ aborts the whole process instead of raising."""
    from spear_compile.lowering.gluon_w4 import GluonW4Config
    f = arg.split(",")
    cfg = GluonW4Config(int(f[0]), int(f[1]), int(f[2]), int(f[3]), int(f[4]), f[5],
                        *([int(f[6])] if len(f) > 6 else []))
    for pc in (True, False):
        for dt in ("bf16", "fp16"):
            _compile_sm90(cfg, pc, dt)
    print(f"compiled {cfg.name}")


def ws_precheck(cfgs, log, timeout=900, what="ws"):
    """The configs of ``cfgs`` that compile in child processes (``compile_check``, all at once); the others are
    logged and left out."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    t = time.time()
    procs = [(cfg, subprocess.Popen([sys.executable, "-m", "bench.gluon_w4", "--compile-check", _cfg_arg(cfg)],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=root))
             for cfg in cfgs]
    ok = []
    for cfg, p in procs:
        try:
            out = p.communicate(timeout=max(1.0, timeout - (time.time() - t)))[0] or ""
            good, why = p.returncode == 0, f"exit {p.returncode}: {out[-600:]}"
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
            good, why = False, f"compile timed out after {timeout} s"
        if good:
            ok.append(cfg)
            log(f"{what} precheck: {cfg.name} compiles ({time.time() - t:.0f} s)")
        else:
            log(f"{what} precheck: SKIP {cfg.name}: {why}")
    return ok


def sass_report(log):
    """Compile every candidate tile and every ws config for sm_90 (per-channel and g128, bias, bf16) and report
    registers, spills, shared memory and the K loop's wgmma wait (``DEPBAR.LE gsb0, 0x1``: one MMA in flight across
    the dequantize); for ws, per partition loop: HGMMAs, the waits, mbarrier (``SYNCS``) ops, ``BAR.SYNC``s (a
    partition's own named barrier is ``BAR.SYNC 0xID, 0xTHREADS``) and the highest register the loop touches."""
    import triton

    from spear_compile.lowering.gluon_w4 import _TILES, WS_CONFIGS, GluonW4Config, ws_layout

    cfgs = [c for c, _ in _TILES] + [GluonW4Config(128, 128, 64, 8, 4, "f32")] + list(WS_CONFIGS)
    log(f"triton {triton.__version__}: sm_90 SASS of w4_gluon_kernel / w4_gluon_ws_kernel (bf16, bias)")
    log("| config | quant | regs | spill instrs | smem B | loop instrs | loop wgmma wait |")
    log("|---|---|---|---|---|---|---|")
    ws_rows = []
    for cfg in cfgs:
        for pc in (True, False):
            facts = _sass_facts(cfg, pc, "bf16", log, f"| {cfg.name} | {'pc' if pc else 'g128'} |")
            if facts is None:
                continue
            c, rows3, rows, labels, reg, spill, loop = facts
            waits = sorted({re.sub(r".*DEPBAR\.LE\s+", "", t) for t in loop if "WARPGROUP.DEPBAR" in t})
            log(f"| {cfg.name} | {'pc' if pc else 'g128'} | {reg if reg is not None else '?'} | {spill} | "
                f"{c.metadata.shared} | {len(loop)} | {', '.join(waits) or 'none'} |")
            if cfg.variant == "ws":
                load_part, warps, maxnreg = ws_layout(cfg)
                budgets = sorted({int(v, 16) for _, t in rows
                                  for v in re.findall(r"USETMAXREG\.\S+\s+(?:UP\d,\s*)?(0x[0-9a-f]+)", t)})
                parts = []
                for what, anchor in (("mma", r"\bHGMMA\b"), ("dequant", r"\bSTS\.128\b"),
                                     ("load", r"\bUTMALDG\b")):
                    lp = _loop_of(rows, labels, anchor)
                    if not lp or (what == "load" and not load_part and any("STS.128" in t for t in lp)):
                        continue
                    syncs = {}
                    for t in lp:
                        m = re.search(r"\b(SYNCS\.[A-Z0-9.]+)", t)
                        if m:
                            syncs[m.group(1)] = syncs.get(m.group(1), 0) + 1
                    bars = [re.sub(r"^.*?BAR\.SYNC\.DEFER_BLOCKING\s*", "", t) for t in lp if "BAR.SYNC" in t]
                    regs = [int(r) for t in lp for r in re.findall(r"\bR(\d+)\b", t)]
                    for t in lp:  # an HGMMA names only the first of its N / 2 fp32 accumulator registers
                        hm = re.search(r"HGMMA\.64x(\d+)x\d+\.F32\S*\s+R(\d+)", t)
                        if hm:
                            regs.append(int(hm.group(2)) + int(hm.group(1)) // 2 - 1)
                    waits = sorted({re.sub(r".*DEPBAR\.LE\s+", "", t) for t in lp if "WARPGROUP.DEPBAR" in t})
                    parts.append(f"{what}: {len(lp)} instrs, {sum('HGMMA' in t for t in lp)} HGMMA, "
                                 f"depbar {','.join(waits) or '-'}, {sum(syncs.values())} SYNCS "
                                 f"({', '.join(f'{k} x{v}' for k, v in sorted(syncs.items()))}), "
                                 f"BAR.SYNC [{'; '.join(bars)}], max reg R{max(regs) if regs else '-'}")
                ws_rows.append(f"- {cfg.name} {'pc' if pc else 'g128'}: {warps} warps (load partition: "
                               f"{'1 warp' if load_part else 'none, in the dequantize warpgroup'}), maxnreg {maxnreg}, "
                               f"setmaxnreg values {budgets}; " + " | ".join(parts))
    if ws_rows:
        log("\nws partitions (loops found from their anchor instruction: HGMMA, STS.128 W store, UTMALDG):")
        for row in ws_rows:
            log(row)
    swap_sass_report(log)


_DQ_OPS = ("PRMT", "IMAD", "LOP3.LUT", "HADD2.BF16_V2", "HMUL2.BF16_V2", "HADD2", "HMUL2", "HFMA2", "HFMA2.BF16_V2")


def swap_sass_report(log, cfgs=None, dtypes=("bf16",)):
    """The swap kernel (``SWAP_CONFIGS``) for sm_90: registers, spills, shared memory and its K loop (unrolled by 2:
    per K tile below): HGMMAs, their operand (``R`` = A from registers), shared-memory loads / stores and CTA barriers
    in the loop, the wgmma wait depth, and the dequantize instructions (PRMT, IMAD, LOP3, packed HADD2/HMUL2) per
    int32 word a thread handles."""
    from spear_compile.lowering.gluon_w4 import SWAP_CONFIGS

    cfgs = SWAP_CONFIGS if cfgs is None else cfgs
    log("\nswap kernel (w4_gluon_swap_kernel), K loop per 64-wide K tile (the loop body holds 2)")
    log("| config | quant | dtype | regs | spill instrs | smem B | loop instrs / tile | HGMMA / tile | A operand | "
        "LDS / tile | STS in loop | BAR.SYNC / tile | loop wgmma wait | dequant instrs / word-thread | serialized |")
    log("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for cfg in cfgs:
        for dt in dtypes:
            for pc in (True, False):
                facts = _sass_facts(cfg, pc, dt, log, f"| {cfg.name} | {'pc' if pc else 'g128'} | {dt} |")
                if facts is None:
                    continue
                c, rows3, rows, labels, reg, spill, loop = facts
                ops = [re.sub(r"^\s*(@!?U?P\w+\s+)?", "", t).split()[0] if t.strip() else "" for t in loop]
                tiles = 2
                hg = [t for t in loop if "HGMMA" in t]
                a_reg = sorted({("R" if re.search(r"HGMMA\S*\s+R\d+,\s*R\d+", t) else "smem") for t in hg})
                lds = [o for o in ops if o.startswith("LDS")]
                sts = sum(o.startswith("STS") for o in ops)
                bars = sum(o.startswith("BAR.SYNC") for o in ops)
                waits = sorted({re.sub(r".*DEPBAR\.LE\s+", "", t) for t in loop if "WARPGROUP.DEPBAR" in t})
                dq = sum(o in _DQ_OPS for o in ops)
                words = cfg.block_n * (cfg.block_k // 8) * 4 // (cfg.num_warps * 32)  # per thread per tile
                # ptxas serializes wgmma (DEPBAR 0x0 after every HGMMA) when it cannot keep operands in flight
                serial = sum("gsb0" in t for t in hg) >= len(hg) > 0 and len(hg) > 2
                log(f"| {cfg.name} | {'pc' if pc else 'g128'} | {dt} | {reg} | {spill} | {c.metadata.shared} | "
                    f"{len(loop) / tiles:.0f} | {len(hg) / tiles:.0f} | {','.join(a_reg) or '-'} | "
                    f"{len(lds) / tiles:.0f} ({','.join(sorted(set(lds)))}) | {sts} | {bars / tiles:.0f} | "
                    f"{', '.join(waits) or 'none'} | {dq / tiles / max(words, 1):.2f} | {'YES' if serial else 'no'} |")


def _sass_facts(cfg, pc, dt, log, row_head):
    """Compile ``cfg`` offline for sm_90 and disassemble it: (compiled, SASS rows (address, opcode, text), (address,
    text) rows, labels, registers, spill instructions, the MMA loop's lines); None (logged as a table row starting
    ``row_head``) when the compile fails."""
    from bench.sass_loop import disassemble, resource
    try:
        c = _compile_sm90(cfg, pc, dt)
    except Exception as e:  # noqa: BLE001
        log(f"{row_head} compile failed: {type(e).__name__}: {str(e).splitlines()[-1][:200] if str(e) else ''} |")
        return None
    rows3, labels = disassemble(c.asm["cubin"])
    rows = [(a, t) for a, _, t in rows3]
    spill = sum(1 for _, op, _ in rows3 if op.split(".")[0] in ("LDL", "STL"))
    return c, rows3, rows, labels, resource(c.asm["cubin"], "REG"), spill, _mma_loop(rows, labels)


def _loop_of(rows, labels, anchor):
    """SASS lines of the innermost loop around the first instruction matching ``anchor`` (regex); ``rows``:
    (address, text) of ``sass_loop.parse_sass``."""
    hits = [a for a, t in rows if re.search(anchor, t)]
    if not hits:
        return []
    best = None
    for a, t in rows:
        if a > hits[0] and re.search(r"\bBRA\b", t):
            tgt = re.search(r"(\.L_x_\d+)", t)
            start = labels.get(tgt.group(1), 1 << 62) if tgt else 1 << 62
            if start <= hits[0] and (best is None or a - start < best[1] - best[0]):
                best = (start, a)
    return [r for b, r in rows if best[0] <= b <= best[1]] if best else []


def _mma_loop(rows, labels):
    """SASS lines of the loop that holds the first HGMMA (from its backward branch's target to the branch)."""
    hg = [a for a, t in rows if "HGMMA" in t]
    if not hg:
        return []
    for a, t in rows:
        if a > hg[0] and re.search(r"\bBRA\b", t):
            tgt = re.search(r"(\.L_x_\d+)", t)
            if tgt and labels.get(tgt.group(1), 1 << 62) < hg[0]:
                return [r for b, r in rows if labels[tgt.group(1)] <= b <= a]
    return []


# ------------------------------------------------------------------ GPU bench
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true", help="Llama-3.2-1B, M = 256, per-channel only")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--quants", default="pc,g128")
    ap.add_argument("--dispatch", action="store_true", help="also time the tuned dispatch.launch (tunes: slow)")
    ap.add_argument("--budget", type=float, default=190.0, help="seconds; later (model, M) steps are skipped")
    ap.add_argument("--sass", action="store_true", help="no GPU: offline sm_90 SASS facts of the tiles")
    ap.add_argument("--no-ws", action="store_true", help="leave out the warp-specialized configs (WS_CONFIGS)")
    ap.add_argument("--no-swap", action="store_true", help="leave out the swapped-operand configs (SWAP_CONFIGS)")
    ap.add_argument("--swap-sass", action="store_true",
                    help="no GPU: only the swap kernel's SASS table (bf16 and fp16, pc and g128)")
    ap.add_argument("--compile-check", default=None, metavar="BM,BN,BK,WARPS,STAGES,VARIANT[,SPLIT_K]",
                    help="no GPU: compile one config offline (what the ws/swap precheck runs in a child process)")
    args = ap.parse_args()
    if args.compile_check:
        compile_check(args.compile_check)
        return
    if args.swap_sass:
        if args.out:
            os.makedirs(args.out, exist_ok=True)
        swap_sass_report(Log(os.path.join(args.out, "gluon_w4_swap_sass.md") if args.out else None),
                         dtypes=("bf16", "fp16"))
        return
    if args.sass:
        if args.out:
            os.makedirs(args.out, exist_ok=True)
        sass_report(Log(os.path.join(args.out, "gluon_w4_sass.md") if args.out else None))
        return
    if not args.out:
        ap.error("--out is required")
    if args.quick:
        args.models, args.ms, args.quants = "Llama-3.2-1B", "256", "pc"
    os.makedirs(args.out, exist_ok=True)
    log = Log(os.path.join(args.out, "gluon_w4_log.txt"))
    t0 = time.time()

    import torch
    import torch.nn.functional as F
    import triton

    from spear_compile.lowering import gluon_w4, prefill
    from spear_compile.quant.packing import pack

    os.environ.setdefault("SPEAR_TUNE_CACHE", "0")
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    info = dict(device=props.name, sms=props.multi_processor_count, capability=list(torch.cuda.get_device_capability()),
                torch=torch.__version__, triton=triton.__version__,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                command="python3 -m bench.gluon_w4 " + " ".join(sys.argv[1:]))
    log(json.dumps(info))
    from spear_compile.kernels import w4_gluon
    log(f"gluon available: {w4_gluon.AVAILABLE}")
    gen = torch.Generator(device=dev).manual_seed(1234)

    def make_linear(k, n):
        codes = torch.randint(0, 16, (n, k), device=dev, dtype=torch.uint8, generator=gen)
        L = dict(k=k, n=n, q=pack(codes, 4))
        for tag, groups in (("pc", 1), ("g128", k // G)):
            L["s_" + tag] = (torch.rand(n, groups, device=dev, generator=gen) * 0.01 + 0.002).to(torch.bfloat16)
            L["z_" + tag] = torch.randint(0, 16, (n, groups), device=dev, generator=gen).to(torch.bfloat16)
        L["bias"] = (torch.randn(n, device=dev, generator=gen) * 0.1).to(torch.bfloat16)
        return L

    def w64(L, tag):
        n, k = L["n"], L["k"]
        b = L["q"]
        q = torch.stack([b & 0xF, b >> 4], -1).reshape(n, k).double()  # low nibble = even k
        gs = k if tag == "pc" else G
        w = (q.reshape(n, k // gs, gs) - L["z_" + tag].double()[..., None]) * L["s_" + tag].double()[..., None]
        return w.reshape(n, k)

    def errors(y, ref):
        if not torch.isfinite(y).all():
            return float("inf"), float("inf")
        d = y.double() - ref
        return (d.abs().max() / ref.abs().max()).item(), (d.norm() / ref.norm()).item()

    quants = args.quants.split(",")
    ms = [int(v) for v in args.ms.split(",")]
    control = gluon_w4.GluonW4Config(128, 128, 64, 8, 4, "f32")
    # the warp-specialized configs: compiled first in child processes (a C++ assertion in Triton would abort this
    # one); only those that compiled are run here, and any error of theirs is logged and the config skipped
    # the swapped-operand configs likewise (one batch of child processes for both)
    pre = ([] if args.no_ws else list(gluon_w4.WS_CONFIGS)) + ([] if args.no_swap else [
        c for c in gluon_w4.SWAP_CONFIGS if any(gluon_w4.swap_tile_fits(c, m) for m in ms)])  # those these M use
    compiled = ws_precheck(pre, log, what="ws/swap") if pre else []
    ws_cfgs = [c for c in compiled if c.variant == "ws"]
    swap_cfgs = [c for c in compiled if c.variant == "swap"]
    results, tables, failures = [], [], []
    compile_note = {}
    for model in args.models.split(","):
        shapes = layer_shapes(MODELS[model])
        int4_bytes = sum(k * n // 2 for _, k, n in shapes)
        # per linear: copies whose int4 weights exceed 4 x L2 (at most MAX_COPIES: the smallest stay under it)
        ncopies = [min(MAX_COPIES, max(2, math.ceil(4 * L2_BYTES / (k * n // 2)))) for _, k, n in shapes]
        lins = [[make_linear(k, n) for _ in range(nc)] for (_, k, n), nc in zip(shapes, ncopies)]
        wbf = [[prefill.dequantize_w4(L["q"], L["s_g128"], L["z_g128"], G, torch.bfloat16) for L in Ls]
               for Ls in lins]  # bf16 weights for cuBLAS (values don't matter for timing)
        log(f"== {model}: weight copies per linear {ncopies}, int4 layer {int4_bytes / 1e6:.1f} MB "
            f"({time.time() - t0:.0f} s)")
        for tag in quants:
            refs_w = {li: w64(lins[li][0], tag) for li in range(len(shapes))}
            checked_mask = set()
            for m in ms:
                if time.time() - t0 > args.budget:
                    log(f"budget {args.budget:.0f} s spent: skipping {model} {tag} M={m}")
                    continue
                x = (torch.randn(m, shapes[0][1], device=dev, generator=gen)).to(torch.bfloat16)
                rows = []
                for li, (name, k, n) in enumerate(shapes):
                    L0, Ls, copies = lins[li][0], lins[li], ncopies[li]
                    gs = k if tag == "pc" else G
                    xs = x if x.shape[1] == k else torch.randn(m, k, device=dev, generator=gen).to(torch.bfloat16)
                    ref = xs.double() @ refs_w[li].T
                    cands = gluon_w4.gluon_candidates(m, k, n, gs, props.multi_processor_count)
                    if control not in cands:
                        cands.append(control)
                    cands += [c for c in ws_cfgs if gluon_w4.tiles_shape(c, k, n, gs)]
                    # swap: token tiles that suit M (``swap_tile_fits``: no 256-token tile at M = 128, which only
                    # reads padding; no tile that re-dequantizes every weight more than 2-4 times)
                    cands += [c for c in swap_cfgs
                              if gluon_w4.tiles_shape(c, k, n, gs) and gluon_w4.swap_tile_fits(c, m)]
                    passing = []
                    for cfg in cands:
                        try:
                            tc = time.time()
                            y = torch.full((m, n), float("nan"), device=dev, dtype=torch.bfloat16)
                            gluon_w4.run_gluon_w4(xs, L0["q"], L0["s_" + tag], L0["z_" + tag], None, gs, y, cfg)
                            torch.cuda.synchronize()
                            compile_note.setdefault(cfg.name, round(time.time() - tc, 1))
                            e_max, e_norm = errors(y, ref)
                            ok = e_max <= MAX_REL and e_norm <= NORM_REL
                            where = f"M={m}"
                            if ok and (cfg, tag, k, n) not in checked_mask:  # masking (M = 77) + bias, once
                                checked_mask.add((cfg, tag, k, n))
                                x77 = xs[:77].contiguous()
                                y77 = torch.full((77, n), float("nan"), device=dev, dtype=torch.bfloat16)
                                gluon_w4.run_gluon_w4(x77, L0["q"], L0["s_" + tag], L0["z_" + tag], L0["bias"], gs,
                                                      y77, cfg)
                                torch.cuda.synchronize()
                                e2 = errors(y77, ref[:77] + L0["bias"].double())
                                if not (e2[0] <= MAX_REL and e2[1] <= NORM_REL):
                                    ok, e_max, e_norm, where = False, e2[0], e2[1], "M=77+bias"
                            if ok:
                                passing.append(cfg)
                            else:
                                failures.append(dict(model=model, quant=tag, linear=name, m=where, config=cfg.name,
                                                     max_rel=e_max, norm_rel=e_norm))
                                log(f"FAIL {model} {tag} {name} {where} {cfg.name}: max {e_max:.2e} "
                                    f"norm {e_norm:.2e}")
                        except Exception as e:  # noqa: BLE001
                            failures.append(dict(model=model, quant=tag, linear=name, m=m, config=cfg.name,
                                                 error=f"{type(e).__name__}: {e}"))
                            log(f"ERROR {model} {tag} {name} M={m} {cfg.name}: {type(e).__name__}: "
                                f"{str(e)[:300]}")
                            if len([f for f in failures if "error" in f]) <= 2:
                                log(traceback.format_exc()[-2000:])
                    ys = torch.empty(m, n, device=dev, dtype=torch.bfloat16)
                    t_bf16 = time_graph(lambda c: F.linear(xs, wbf[li][c]), copies)
                    t_deq = time_graph(lambda c: F.linear(xs, prefill.dequantize_w4(
                        Ls[c]["q"], Ls[c]["s_" + tag], Ls[c]["z_" + tag], gs, torch.bfloat16)), copies)
                    t_disp = None
                    if args.dispatch:
                        from spear_compile.lowering import dispatch
                        try:
                            t_disp = time_graph(lambda c: dispatch.launch(
                                xs, Ls[c]["q"], Ls[c]["s_" + tag], Ls[c]["z_" + tag], None, gs), copies)
                        except Exception as e:  # noqa: BLE001
                            log(f"dispatch {name}: {type(e).__name__}: {e}")
                    per_cfg = {}
                    for cfg in passing:
                        try:
                            per_cfg[cfg.name] = time_graph(lambda c: gluon_w4.run_gluon_w4(
                                xs, Ls[c]["q"], Ls[c]["s_" + tag], Ls[c]["z_" + tag], None, gs, ys, cfg), copies)
                        except Exception as e:  # noqa: BLE001
                            log(f"ERROR timing {name} {cfg.name}: {type(e).__name__}: {str(e)[:300]}")
                    plain = {c: t for c, t in per_cfg.items() if not c.endswith((",ws]", ",swap]"))}
                    wsd = {c: t for c, t in per_cfg.items() if c.endswith(",ws]")}
                    swd = {c: t for c, t in per_cfg.items() if c.endswith(",swap]")}
                    best = min(plain, key=plain.get) if plain else None
                    best_ws = min(wsd, key=wsd.get) if wsd else None
                    best_sw = min(swd, key=swd.get) if swd else None
                    rows.append(dict(linear=name, k=k, n=n, bf16=t_bf16, deq_cublas=t_deq, dispatch=t_disp,
                                     gluon=plain.get(best), gluon_cfg=best, ws=wsd.get(best_ws), ws_cfg=best_ws,
                                     swap=swd.get(best_sw), swap_cfg=best_sw, gluon_all=per_cfg))
                results.append(dict(model=model, m=m, quant=tag, rows=rows))
                tables.append(_table(model, m, tag, rows, args.dispatch, bool(ws_cfgs), bool(swap_cfgs)))
                log(tables[-1])
    summary = _summary(results, args.dispatch, bool(ws_cfgs), bool(swap_cfgs))
    log(summary)
    log(f"failures: {len(failures)}; compile+first-run seconds per config: {json.dumps(compile_note)}")
    log(f"total {time.time() - t0:.0f} s")
    with open(os.path.join(args.out, "gluon_w4.md"), "w") as fh:
        fh.write(f"# Gluon W4A16 GEMM vs cuBLAS ({info['device']}, torch {info['torch']}, triton {info['triton']})\n\n")
        fh.write(f"Command: `{info['command']}`. µs per linear: median of CUDA-event-timed CUDA-graph replays "
                 "with the "
                 "weights cycled over copies beyond L2. `deq+cuBLAS`: `dequantize_w4` + `F.linear`.\n\n")
        fh.write(summary + "\n\n" + "\n\n".join(tables) + "\n")
        if failures:
            fh.write("\n## Failures\n\n" + "\n".join(f"- {json.dumps(f)}" for f in failures) + "\n")
    with open(os.path.join(args.out, "gluon_w4.json"), "w") as fh:
        json.dump(dict(info=info, results=results, failures=failures, compile_s=compile_note), fh, indent=1)


def _fmt(v):
    return "-" if v is None else f"{v:.1f}"


def _ratio(a, b):
    return "-" if a is None or b is None or not b else f"{a / b:.2f}"


def _cells(r, with_disp, with_ws, cfg_cols, with_swap=False):
    """A row's timing cells from bf16 on: µs, the dispatch's, gluon's ratios, ws's, swap's; ``cfg_cols``: the gluon,
    ws and swap config columns (a table's rows), empty cells (its sum row) or none (the summary)."""
    cells = f" {_fmt(r['bf16'])} | {_fmt(r['deq_cublas'])} |" + (f" {_fmt(r.get('dispatch'))} |" if with_disp else "") \
        + f" {_fmt(r['gluon'])} | {_ratio(r['gluon'], r['bf16'])} | {_ratio(r['gluon'], r['deq_cublas'])} |"
    if cfg_cols is not None:
        cells += f" `{r['gluon_cfg']}` |" if cfg_cols else " |"
    if with_ws:
        cells += f" {_fmt(r.get('ws'))} | {_ratio(r.get('ws'), r['bf16'])} | {_ratio(r.get('ws'), r['gluon'])} |"
        if cfg_cols is not None:
            cells += f" `{r.get('ws_cfg')}` |" if cfg_cols else " |"
    if with_swap:
        cells += f" {_fmt(r.get('swap'))} | {_ratio(r.get('swap'), r['bf16'])} | " \
            f"{_ratio(r.get('swap'), r['gluon'])} |"
        if cfg_cols is not None:
            cells += f" `{r.get('swap_cfg')}` |" if cfg_cols else " |"
    return cells


def _table(model, m, tag, rows, with_disp, with_ws=False, with_swap=False):
    head = "| linear | K | N | bf16 µs | deq+cuBLAS µs |" + (" ours W4 µs |" if with_disp else "") + \
        " gluon µs | gluon/bf16 | gluon/deq | gluon config |" + \
        (" ws µs | ws/bf16 | ws/gluon | ws config |" if with_ws else "") + \
        (" swap µs | swap/bf16 | swap/gluon | swap config |" if with_swap else "")
    out = [f"### {model}, M={m}, {tag}", "", head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        out.append(f"| {r['linear']} | {r['k']} | {r['n']} |" + _cells(r, with_disp, with_ws, True, with_swap))
    out.append("| **sum** | | |" + _cells(_sums(rows), with_disp, with_ws, False, with_swap))
    return "\n".join(out)


def _sums(rows):
    s = {}
    for key in ("bf16", "deq_cublas", "dispatch", "gluon", "ws", "swap"):
        vals = [r.get(key) for r in rows]
        s[key] = None if any(v is None for v in vals) else sum(vals)
    return s


def _summary(results, with_disp, with_ws=False, with_swap=False):
    head = "| model | M | quant | bf16 µs | deq+cuBLAS µs |" + (" ours W4 µs |" if with_disp else "") + \
        " gluon µs | gluon/bf16 | gluon/deq+cuBLAS |" + (" ws µs | ws/bf16 | ws/gluon |" if with_ws else "") + \
        (" swap µs | swap/bf16 | swap/gluon |" if with_swap else "")
    out = ["## Per layer (sum of the 7 linears)", "", head, "|" + "---|" * (head.count("|") - 1)]
    for res in results:
        out.append(f"| {res['model']} | {res['m']} | {res['quant']} |"
                   + _cells(_sums(res["rows"]), with_disp, with_ws, None, with_swap))
    return "\n".join(out)


if __name__ == "__main__":
    main()
