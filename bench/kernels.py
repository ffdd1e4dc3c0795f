"""Per-layer timings of the W4 (+EC) kernels on one GPU, side by side with the baselines.

For each model (the 7 linears of one decoder layer: q, k, v, o, gate, up, down) and each M:
bf16 cuBLAS (F.linear), tinygemm (``aten._weight_int4pack_mm``, g128), gemlite A16W4 g128 (when
importable), ours W4-only (per-channel and g128), ours W4+EC r=32 gated fused, and the naive
unfused W4+EC (our W4 + torch ops for A x, gate, B, add), eager (sync per layer) and graph; at a prefill
M (> 64) also the op as ``torch.compile(backend="spear")`` writes it into the graph (``compiled W4`` /
``compiled EC``: ``DecomposePrefillLinearsPass``'s dequantize (our kernel traced in) + mm with the EC as
K-concat or addmm C input, launched from Inductor's wrapper, captured into the same timing graph).
Timing: CUDA events over CUDA-graph replays of one graph holding the layer's linears for enough
weight copies that the weight set exceeds L2. Correctness of every kernel vs a float64 reference
first. Writes markdown + logs to --out; prints a compact table last.

    PYTHONUNBUFFERED=1 python3 bench/kernels.py --out $OUT
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

import triton  # noqa: E402

from spear_compile.lowering import configs, dispatch, prefill, runtime  # noqa: E402
from spear_compile.quant.packing import pack  # noqa: E402
from spear_compile.compile.passes.decompose_prefill_linears import MIN_M as DECOMPOSE_MIN_M  # noqa: E402

os.environ.setdefault("SPEAR_TUNE_CACHE", "0")  # a timing bench re-times every key (no on-disk tuning cache)

MODELS = {
    "Llama-3.2-1B": dict(hidden=2048, inter=8192, heads=32, kv=8, head_dim=64),
    "Llama-2-7B": dict(hidden=4096, inter=11008, heads=32, kv=32, head_dim=128),
}
MS = (1, 4, 16, 256, 2048)
RANK = 32
G = 128
L2_BYTES = 50e6
T0 = time.time()


def layer_shapes(c):
    """(name, K, N) of the 7 linears of a decoder layer."""
    h, q, kv, i = c["hidden"], c["heads"] * c["head_dim"], c["kv"] * c["head_dim"], c["inter"]
    return [("q", h, q), ("k", h, kv), ("v", h, kv), ("o", q, h), ("gate", h, i), ("up", h, i), ("down", i, h)]


def log(fh, *a):
    s = " ".join(str(x) for x in a)
    print(s)
    fh.write(s + "\n")
    fh.flush()


# ------------------------------------------------------------------ weights
def make_linear(k, n, dev, gen):
    codes = torch.randint(0, 16, (n, k), device=dev, dtype=torch.uint8, generator=gen)
    def qp(groups):
        scale = (torch.rand(n, groups, device=dev, generator=gen) * 0.01 + 0.002).to(torch.bfloat16)
        zero = torch.randint(4, 12, (n, groups), device=dev, generator=gen).to(torch.bfloat16)
        return scale, zero
    s_g, z_g = qp(k // G)
    s_c, z_c = qp(1)
    bf = lambda *shape, sc=0.02: (torch.randn(*shape, device=dev, generator=gen) * sc).to(torch.bfloat16)  # noqa: E731
    lin = dict(k=k, n=n, codes=codes, q=pack(codes, 4), s_g=s_g, z_g=z_g, s_c=s_c, z_c=z_c,
               A=bf(RANK, k), B=bf(n, RANK), gw=bf(RANK, RANK, sc=0.3), gb=bf(RANK, sc=0.1))
    lin["w_bf16"] = prefill.dequantize_w4(lin["q"], s_g, z_g, G, torch.bfloat16)
    return lin


def add_tinygemm(lin):
    try:
        c = lin["codes"]
        packed = ((c[:, ::2] << 4) | c[:, 1::2]).contiguous()
        lin["tg_w"] = torch.ops.aten._convert_weight_to_int4pack(packed, 8)
        s, z = lin["s_g"], lin["z_g"]
        zf = (8.0 - z.float()) * s.float()  # (q - z) s == (q - 8) s + (8 - z) s
        lin["tg_sz"] = torch.stack([s.float(), zf], 2).transpose(0, 1).contiguous().to(torch.bfloat16)
        return None
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"


def add_gemlite(lin):
    from gemlite.helper import A16Wn

    lin["gl"] = A16Wn(device="cuda", dtype=torch.bfloat16).from_weights(
        lin["codes"], lin["s_g"], lin["z_g"], 4, G)


# ------------------------------------------------------------------ the ops compared
def op_bf16(x, L):
    return F.linear(x, L["w_bf16"])


def op_tinygemm(x, L):
    return torch.ops.aten._weight_int4pack_mm(x, L["tg_w"], G, L["tg_sz"])


def op_gemlite(x, L):
    return L["gl"](x)


def op_ours_pc(x, L):
    return dispatch.launch(x, L["q"], L["s_c"], L["z_c"], None, L["k"])


def op_ours_g128(x, L):
    return dispatch.launch(x, L["q"], L["s_g"], L["z_g"], None, G)


def op_fused(x, L):
    return dispatch.launch(x, L["q"], L["s_g"], L["z_g"], None, G, L["A"], L["B"], L["gw"], L["gb"])


def op_fused_pc(x, L):
    return dispatch.launch(x, L["q"], L["s_c"], L["z_c"], None, L["k"], L["A"], L["B"], L["gw"], L["gb"])


def op_fused_2launch(x, L):
    return dispatch.launch(x, L["q"], L["s_g"], L["z_g"], None, G, L["A"], L["B"], L["gw"], L["gb"],
                           u=dispatch.project_u(x, L["A"]))


def op_naive(x, L):
    y = dispatch.launch(x, L["q"], L["s_g"], L["z_g"], None, G)
    u = F.linear(x, L["A"])
    u = u * (2.0 * torch.sigmoid(F.linear(u, L["gw"], L["gb"])))
    return y + F.linear(u, L["B"])


_COMPILED = {}


def _compiled(ec):
    """``spear::fused_linear`` (g128, + gated EC when ``ec``) through ``torch.compile(backend="spear")`` in the
    default mode: at M > 64 the decomposition pass writes it into the graph as our dequantize (+ EC prologue)
    kernels, traced in, + cuBLAS, launched from Inductor's wrapper."""
    if ec not in _COMPILED:
        def with_ec(x, q, s, z, A, B, gw, gb):
            return torch.ops.spear.fused_linear(x, q, s, z, None, G, A, B, gw, gb)

        def w4(x, q, s, z):
            return torch.ops.spear.fused_linear(x, q, s, z, None, G, None, None, None, None)

        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        _COMPILED[ec] = torch.compile(with_ec if ec else w4, backend="spear", dynamic=False)
    return _COMPILED[ec]


def op_compiled(x, L):
    return _compiled(True)(x, L["q"], L["s_g"], L["z_g"], L["A"], L["B"], L["gw"], L["gb"])


def op_compiled_w4(x, L):
    return _compiled(False)(x, L["q"], L["s_g"], L["z_g"])




def reference(x, L, pc=False, ec=False, bias=None, gated=True):
    d = torch.float64
    n, k = L["n"], L["k"]
    s, z = (L["s_c"], L["z_c"]) if pc else (L["s_g"], L["z_g"])
    groups = s.shape[1]
    w = (L["codes"].to(d).reshape(n, groups, -1) - z.to(d)[..., None]) * s.to(d)[..., None]
    x64 = x.to(d)
    y = x64 @ w.reshape(n, k).T
    if bias is not None:
        y = y + bias.to(d)
    if ec:
        u = x64 @ L["A"].to(d).T
        if gated:
            u = u * 2 * torch.sigmoid(u @ L["gw"].to(d).T + L["gb"].to(d))
        y = y + u @ L["B"].to(d).T
    return y


def rel_err(out, ref):
    out = out.to(torch.float64)
    if torch.isnan(out).any():
        return float("nan")
    return ((out - ref).norm() / ref.norm()).item()


# ------------------------------------------------------------------ timing
_STREAMS = []


def _capture_stream():
    """One stream for every warm-up and capture of this bench (the decode workspaces are per stream)."""
    if not _STREAMS:
        _STREAMS.append(torch.cuda.Stream())
    return _STREAMS[0]


def time_graph(layer_fn, copies, reps=30):
    """µs per layer: one graph replays the layer for every weight copy."""
    for c in range(copies):
        layer_fn(c)
    torch.cuda.synchronize()
    s = _capture_stream()  # warm up on the stream that captures: its kernel workspaces exist before capture
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        layer_fn(0)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=s):
        for c in range(copies):
            layer_fn(c)
    g.replay()
    torch.cuda.synchronize()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for a, b in ev:
        a.record()
        g.replay()
        b.record()
    torch.cuda.synchronize()
    ts = sorted(a.elapsed_time(b) for a, b in ev)
    del g
    return ts[len(ts) // 2] * 1e3 / copies


def time_eager_sync(layer_fn, copies, reps=10):
    """µs per layer, launched eagerly with a device sync after every layer."""
    for c in range(copies):
        layer_fn(c)
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        for c in range(copies):
            t = time.perf_counter()
            layer_fn(c)
            torch.cuda.synchronize()
            ts.append(time.perf_counter() - t)
    ts.sort()
    return ts[len(ts) // 2] * 1e6


def copy_bandwidth():
    a = torch.empty(2 * 1024**3 // 2, dtype=torch.bfloat16, device="cuda").normal_()
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(10):
        b.copy_(a)
    e1.record()
    torch.cuda.synchronize()
    bw = 2 * a.numel() * a.element_size() * 10 / (e0.elapsed_time(e1) * 1e-3)
    del a, b
    return bw


def matmul_rate():
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(10):
        a @ a
    e1.record()
    torch.cuda.synchronize()
    return 2 * 8192**3 * 10 / (e0.elapsed_time(e1) * 1e-3)


def layer_bytes(shapes, m, kind):
    tot = 0
    for _, k, n in shapes:
        io = 2 * m * (k + n)
        if kind == "bf16":
            tot += 2 * n * k + io
            continue
        groups = 1 if kind == "pc" else k // G
        tot += n * k // 2 + 2 * 2 * n * groups + io
        if kind == "ec":
            tot += 2 * (RANK * k + n * RANK + RANK * RANK + RANK)
    return tot


# ------------------------------------------------------------------ main
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--budget", type=float, default=420.0, help="seconds; later timings are skipped past it")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--ops", default="", help="comma list of the ops to run (default: all)")
    ap.add_argument("--detail", action="store_true",
                    help="prefill M (> 64): every EC structure forced, per linear; dequantize TB/s; structure checks")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    fh = open(os.path.join(args.out, "kernels_log.txt"), "w")
    torch.manual_seed(0)
    dev = torch.device("cuda")
    ms_list = [int(v) for v in args.ms.split(",")]
    props = torch.cuda.get_device_properties(dev)
    info = dict(device=props.name, sms=props.multi_processor_count, date=datetime.datetime.utcnow().isoformat(timespec="seconds"),
                torch=torch.__version__, triton=triton.__version__, command="PYTHONUNBUFFERED=1 python3 -m bench.kernels " + " ".join(sys.argv[1:]))
    log(fh, json.dumps(info))
    bw = copy_bandwidth()
    rate = matmul_rate()
    log(fh, f"copy bandwidth {bw / 1e12:.3f} TB/s (read+write); bf16 8192^3 matmul {rate / 1e12:.0f} TFLOP/s")

    gemlite_note = "not tried"
    try:
        import gemlite  # noqa: F401
        gemlite_note = "ok"
    except Exception as e:  # noqa: BLE001
        gemlite_note = f"import failed: {type(e).__name__}: {e}"
    log(fh, "gemlite:", gemlite_note)

    gen = torch.Generator(device=dev).manual_seed(1234)
    rows, errs, choices, details = [], [], [], []
    for model in args.models.split(","):
        shapes = layer_shapes(MODELS[model])
        int4_bytes = layer_bytes(shapes, 1, "g128")
        copies = max(2, math.ceil(4 * L2_BYTES / int4_bytes))
        layers = [[make_linear(k, n, dev, gen) for _, k, n in shapes] for _ in range(copies)]
        wanted = set(args.ops.split(",")) if args.ops else None
        tg_note = None if wanted is None or "tinygemm" in wanted else "not requested (--ops)"
        for Ls in (layers if tg_note is None else []):
            for L in Ls:
                tg_note = tg_note or add_tinygemm(L)
        use_gl = gemlite_note == "ok" and (wanted is None or "gemlite" in wanted)
        if use_gl:
            try:
                for Ls in layers:
                    for L in Ls:
                        add_gemlite(L)
            except Exception as e:  # noqa: BLE001
                use_gl = False
                gemlite_note = f"pack failed: {type(e).__name__}: {e}"
                log(fh, "gemlite:", gemlite_note)
        log(fh, f"== {model}: {copies} weight copies, int4 layer {int4_bytes / 1e6:.1f} MB; tinygemm: {tg_note or 'ok'}")

        ops = {"bf16": op_bf16, "ours_pc": op_ours_pc, "ours_g128": op_ours_g128, "fused": op_fused,
               "fused_pc": op_fused_pc, "fused_2launch": op_fused_2launch, "naive": op_naive,
               "compiled_w4": op_compiled_w4, "compiled": op_compiled}
        if tg_note is None:
            ops["tinygemm"] = op_tinygemm
        if use_gl:
            ops["gemlite"] = op_gemlite
        if args.ops:
            keep = set(args.ops.split(","))
            ops = {k_: v for k_, v in ops.items() if k_ in keep}
        if "bf16" in ops:
            ops["bf16_again"] = op_bf16  # timed last: the baseline's run-to-run spread within this run
        ops_all = dict(ops)

        for m in ms_list:
            ops = dict(ops_all)  # a kernel found wrong at one M is dropped for that M only
            if m < DECOMPOSE_MIN_M:  # below it the compiled graph keeps our op (= ours / fused)
                ops = {k_: v for k_, v in ops.items() if not k_.startswith("compiled")}
            if time.time() - T0 > args.budget:
                log(fh, f"budget reached: skip {model} M={m}")
                continue
            xs = {k: torch.randn(m, k, device=dev, generator=gen).to(torch.bfloat16) for k in {k for _, k, _ in shapes}}
            # ---- correctness (also tunes the dispatch for this M) ----
            for (name, k, n), L in zip(shapes, layers[0]):
                x = xs[k]
                ref_g, ref_c, ref_e = reference(x, L), reference(x, L, pc=True), reference(x, L, ec=True)
                ref_ce = reference(x, L, pc=True, ec=True)
                for opname, ref in (("ours_pc", ref_c), ("ours_g128", ref_g), ("fused", ref_e), ("fused_2launch", ref_e),
                                    ("fused_pc", ref_ce), ("naive", ref_e), ("compiled_w4", ref_g), ("compiled", ref_e),
                                    ("bf16", ref_g), ("tinygemm", ref_g), ("gemlite", ref_g)):
                    if opname not in ops:
                        continue
                    try:
                        out = ops[opname](x, L)  # NaN/unwritten outputs fail rel_err
                        e = rel_err(out, ref)
                    except Exception as ex:  # noqa: BLE001
                        e = float("nan")
                        log(fh, f"ERROR {model} {name} M={m} {opname}: {type(ex).__name__}: {ex}")
                    errs.append((model, name, m, opname, e))
                    if not e < 2e-2:
                        log(fh, f"BAD {model} {name} M={m} {opname}: rel err {e}")
                        if opname.startswith(("ours", "fused", "compiled")):
                            ops.pop(opname, None)  # never time a wrong kernel
                choices.append((model, name, m, dispatch.choose(m, k, n, G, torch.bfloat16, RANK, True),
                                dispatch.choose(m, k, n, k, torch.bfloat16)))
                del ref_g, ref_c, ref_e, ref_ce
            # ---- graph-replay correctness of the fused kernel (counters reset between replays) ----
            if "fused" in ops:
                L = layers[0][0]
                xin = torch.empty(m, L["k"], device=dev, dtype=torch.bfloat16).normal_()
                op_fused(xin, L)
                torch.cuda.synchronize()
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    yg = op_fused(xin, L)
                worst = 0.0
                for _ in range(3):
                    xin.normal_()
                    g.replay()
                    torch.cuda.synchronize()
                    worst = max(worst, rel_err(yg, reference(xin, L, ec=True)))
                errs.append((model, "q(graph x3)", m, "fused", worst))
                del g
            # ---- timing ----
            res = dict(model=model, m=m)
            for opname, fn in ops.items():
                if time.time() - T0 > args.budget:
                    log(fh, f"budget reached: skip {model} M={m} {opname}")
                    continue
                layer_fn = lambda c, fn=fn: [fn(xs[k], L) for (_, k, _), L in zip(shapes, layers[c])]  # noqa: E731
                try:
                    res[opname] = time_graph(layer_fn, copies)
                    if opname == "naive":
                        res["naive_eager"] = time_eager_sync(layer_fn, copies)
                    if opname == "fused":
                        res["fused_eager"] = time_eager_sync(layer_fn, copies)
                except Exception as ex:  # noqa: BLE001
                    log(fh, f"ERROR timing {model} M={m} {opname}: {type(ex).__name__}: {ex}")
            for kind in ("pc", "g128", "ec", "bf16"):
                res[f"roof_{kind}"] = layer_bytes(shapes, m, kind) / bw * 1e6
            res["flop_floor"] = sum(2 * m * k * n for _, k, n in shapes) / rate * 1e6
            rows.append(res)
            log(fh, json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in res.items()}))
            if args.detail and m > 64 and time.time() - T0 < args.budget:
                try:
                    check_structures(fh, model, shapes, layers[0], xs, m, errs, dev, gen)
                    details.extend(prefill_detail(fh, model, shapes, layers, xs, m, copies, bw, args.budget))
                except Exception as ex:  # noqa: BLE001
                    log(fh, f"ERROR detail {model} M={m}: {type(ex).__name__}: {ex}")
            if m > 64:
                log_tune(fh, m)
            # written after every (model, M): a killed run still leaves its results
            with open(os.path.join(args.out, "kernels_tune.json"), "w") as f:
                json.dump([[list(map(str, k)), r] for k, r in runtime.TUNER.timings.items()], f, indent=0)
            write_markdown(os.path.join(args.out, "kernels.md"), info, bw, rate, gemlite_note, rows, errs, choices,
                           details)
        del layers
        torch.cuda.empty_cache()
    print_table(rows, errs)


# ------------------------------------------------------------------ prefill detail (--detail)
STRUCTS = {  # forced configs of the prefill EC paths (g128 gated unless noted); _s: split prologue, _ov: overlapped
    "after": dispatch.DequantCublasConfig("after"),
    "after_s_ov": dispatch.DequantCublasConfig("after", overlap=True, split=True),
    "c_in": dispatch.DequantCublasConfig("c_in"),
    "c_in_s": dispatch.DequantCublasConfig("c_in", split=True),
    "c_in_s_ov": dispatch.DequantCublasConfig("c_in", overlap=True, split=True),
    "kcat": dispatch.DequantCublasConfig("kcat"),
    "kcat64": dispatch.DequantCublasConfig("kcat", pad=64),
    "kcat64_s": dispatch.DequantCublasConfig("kcat", pad=64, split=True),
    "kcat64_s_ov": dispatch.DequantCublasConfig("kcat", pad=64, overlap=True, split=True),
    "tri": dispatch.PrefillConfig(128, 128, 128, 8, 3),
    "tri_swap": dispatch.PrefillConfig(128, 128, 64, 8, 3, swap=True),
}


def _lin_op(L, struct=None, pc=False, ec=True, gated=True, bias=None, u=None, L_=None):
    cfg = STRUCTS[struct] if isinstance(struct, str) else struct
    s, z, g = (L["s_c"], L["z_c"], L["k"]) if pc else (L["s_g"], L["z_g"], G)

    def f(x):
        return dispatch.launch(x, L["q"], s, z, bias, g, L["A"] if ec else None, L["B"] if ec else None,
                               L["gw"] if ec and gated else None, L["gb"] if ec and gated else None, u=u, config=cfg)
    return f


def check_structures(fh, model, shapes, Ls, xs, m, errs, dev, gen):
    """Every prefill path forced on the real shapes vs float64: g128/pc, gated/static EC, bias, given u; fp16 on q."""
    worst = {}
    for (name, k, n), L in zip(shapes, Ls):
        x = xs[k]
        bias = (torch.randn(n, device=dev, generator=gen) * 0.1).to(torch.bfloat16)
        u = (x.double() @ L["A"].double().T).to(torch.bfloat16)
        cases = [(f"{st}+bias", _lin_op(L, st, bias=bias), dict(ec=True, bias=bias)) for st in STRUCTS]
        cases += [(f"{st}+u", _lin_op(L, st, u=u), dict(ec=True)) for st in ("after", "c_in_s", "kcat64_s_ov",
                                                                               "kcat64", "tri_swap")]
        cases += [("kcat64_s pc", _lin_op(L, "kcat64_s", pc=True), dict(ec=True, pc=True)),
                  ("c_in_s_ov pc", _lin_op(L, "c_in_s_ov", pc=True), dict(ec=True, pc=True)),
                  ("tri_swap pc", _lin_op(L, "tri_swap", pc=True), dict(ec=True, pc=True)),
                  ("fold static", _lin_op(L, dispatch.DequantCublasConfig("fold"), gated=False),
                   dict(ec=True, gated=False)),
                  ("kcat static", _lin_op(L, "kcat", gated=False), dict(ec=True, gated=False)),
                  ("kcat64_s static", _lin_op(L, "kcat64_s", gated=False), dict(ec=True, gated=False)),
                  ("w4 g128", _lin_op(L, dispatch.DequantCublasConfig(), ec=False), dict()),
                  ("w4 pc", _lin_op(L, dispatch.DequantCublasConfig(), pc=True, ec=False), dict(pc=True))]
        refs = {}
        for cname, f, rk in cases:
            rkey = tuple(sorted((a, b is not None if a == "bias" else b) for a, b in rk.items()))
            try:
                if rkey not in refs:
                    refs[rkey] = reference(x, L, **rk)
                e = rel_err(f(x), refs[rkey])
            except Exception as ex:  # noqa: BLE001
                e = float("nan")
                log(fh, f"ERROR structure {model} {name} M={m} {cname}: {type(ex).__name__}: {ex}")
            errs.append((model, name, m, "s:" + cname, e))
            worst[cname] = max(worst.get(cname, 0.0), e) if e == e else float("nan")
            if not e < 1e-2:
                log(fh, f"BAD structure {model} {name} M={m} {cname}: rel err {e}")
    # fp16 activations / scales (q linear)
    (name, k, n), L = shapes[0], Ls[0]
    L16 = dict(L)
    for key in ("s_g", "z_g", "s_c", "z_c", "A", "B", "gw", "gb"):
        L16[key] = L[key].to(torch.float16)
    x16 = xs[k].to(torch.float16)
    for st in ("after", "c_in_s_ov", "kcat64_s_ov", "tri_swap"):
        for pc in (False, True):
            try:
                e = rel_err(_lin_op(L16, st, pc=pc)(x16), reference(x16, L16, pc=pc, ec=True))
            except Exception as ex:  # noqa: BLE001
                e = float("nan")
                log(fh, f"ERROR structure fp16 {model} {name} M={m} {st}: {type(ex).__name__}: {ex}")
            errs.append((model, name, m, f"s:{st} fp16{' pc' if pc else ''}", e))
            worst[f"{st} fp16"] = max(worst.get(f"{st} fp16", 0.0), e) if e == e else float("nan")
    log(fh, f"structures {model} M={m} worst rel err: " + ", ".join(f"{k_} {v:.2e}" for k_, v in worst.items()))


def _dequant_bytes(k, n, groups):
    return n * k // 2 + 2 * 2 * n * groups + 2 * n * k


def prefill_detail(fh, model, shapes, layers, xs, m, copies, bw, budget):
    """Per linear µs (graph replays over the weight copies) of bf16, W4 (tuned), fused (tuned), every forced EC
    structure, and the dequantize alone (with its TB/s); the layer sums; dequantize tile sweep over the layer."""
    out = []
    per_lin = {
        "bf16": lambda L: (lambda x: op_bf16(x, L)),
        "w4 g128": lambda L: (lambda x: op_ours_g128(x, L)),
        "w4 pc": lambda L: (lambda x: op_ours_pc(x, L)),
        "fused g128": lambda L: (lambda x: op_fused(x, L)),
        "fused pc": lambda L: (lambda x: op_fused_pc(x, L)),
        "naive": lambda L: (lambda x: op_naive(x, L)),
        **{f"ec {st}": (lambda L, st=st: _lin_op(L, st)) for st in STRUCTS},
        "ec kcat64_s pc": lambda L: _lin_op(L, "kcat64_s", pc=True),
        "dequant g128": lambda L: (lambda x: prefill.dequantize_w4(L["q"], L["s_g"], L["z_g"], G, torch.bfloat16)),
        "dequant pc": lambda L: (lambda x: prefill.dequantize_w4(L["q"], L["s_c"], L["z_c"], L["k"], torch.bfloat16)),
        **{f"prologue {'kcat' if cx else 'v'}{' split' if sp else ''}": (
            lambda L, cx=cx, sp=sp: (lambda x: prefill.ec_prologue(
                x, L["A"], None, L["gw"], L["gb"], RANK,
                out=torch.empty(x.shape[0], x.shape[1] + 64 if cx else RANK, dtype=x.dtype, device=x.device),
                col0=x.shape[1] if cx else 0, width=64 if cx else RANK, copy_x=cx, split=sp)))
           for cx in (True, False) for sp in (False, True)},
    }
    table = {}
    for i, (name, k, n) in enumerate(shapes):
        if time.time() - T0 > budget:
            log(fh, f"budget reached: detail {model} M={m} stops at {name}")
            break
        x = xs[k]
        for op, mk in per_lin.items():
            fns = [mk(layers[c][i]) for c in range(copies)]
            try:
                table[(name, op)] = time_graph(lambda c: fns[c](x), copies, reps=15)
            except Exception as ex:  # noqa: BLE001
                log(fh, f"ERROR detail timing {model} {name} M={m} {op}: {type(ex).__name__}: {ex}")
    ops = list(per_lin)
    names = [nm for nm, _, _ in shapes]
    lines = [f"### {model}, M={m}: µs per linear (graph replays over {copies} weight copies)", "",
             "| linear | " + " | ".join(ops) + " | dequant g128 TB/s | dequant pc TB/s |",
             "|---|" + "---|" * (len(ops) + 2)]
    for name, k, n in shapes:
        tg, tp = table.get((name, "dequant g128")), table.get((name, "dequant pc"))
        lines.append(f"| {name} {k}->{n} | " + " | ".join(fmt(table.get((name, op))) for op in ops)
                     + f" | {fmt(_dequant_bytes(k, n, k // G) / tg / 1e6 if tg else None, 2)}"
                     + f" | {fmt(_dequant_bytes(k, n, 1) / tp / 1e6 if tp else None, 2)} |")
    sums = {op: sum(table[(nm, op)] for nm in names) if all((nm, op) in table for nm in names) else None for op in ops}
    lines.append("| **layer (sum)** | " + " | ".join(fmt(sums[op]) for op in ops) + " | | |")
    if sums.get("bf16"):
        lines.append("| **/ bf16** | " + " | ".join(fmt(sums[op] / sums["bf16"] if sums[op] else None, 2) for op in ops)
                     + " | | |")
    # the dequantize over the whole layer (7 launches per copy: weights beyond L2), tile sweep
    sweep = []
    for pc, blocks in ((False, ((64, 16, False), (128, 16, False), (32, 16, False))),
                       (True, ((16, 64, False), (32, 64, False), (16, 128, False), (8, 128, False)))):
        nbytes = sum(_dequant_bytes(k, n, 1 if pc else k // G) for _, k, n in shapes)
        for blk in blocks:
            def layer_fn(c, blk=blk, pc=pc):
                for (_, k, n), L in zip(shapes, layers[c]):
                    s, z, g = (L["s_c"], L["z_c"], k) if pc else (L["s_g"], L["z_g"], G)
                    prefill.dequantize_w4(L["q"], s, z, g, torch.bfloat16, block=blk)
            try:
                t = time_graph(layer_fn, copies, reps=15)
                sweep.append(f"dequantize layer {'pc' if pc else 'g128'} block(BN,BW)={blk[:2]}: {t:.1f} µs, "
                             f"{nbytes / t / 1e6:.2f} TB/s ({nbytes / 1e6:.1f} MB; copy bw {bw / 1e12:.2f} TB/s)")
            except Exception as ex:  # noqa: BLE001
                sweep.append(f"dequantize sweep {blk}: ERROR {type(ex).__name__}: {ex}")
    lines += [""] + sweep + [""]
    for ln in lines:
        log(fh, ln)
    out += lines
    return out


_LOGGED = set()


def log_tune(fh, m):
    """The tuner's per-candidate times (graph replay, µs) for this M bucket's new keys, fastest first."""
    b = configs.m_bucket(m)
    for key, res in runtime.TUNER.timings.items():
        if key.m_bucket != b or key in _LOGGED:
            continue
        _LOGGED.add(key)
        timed = sorted((t, nm) for nm, t in res if isinstance(t, float))
        bad = [f"{nm}: {t}" for nm, t in res if not isinstance(t, float)]
        log(fh, f"tune {key}: " + ", ".join(f"{nm} {t * 1e3:.1f}" for t, nm in timed) + (f" | {bad}" if bad else ""))


def fmt(v, nd=1):
    return "-" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def summary_lines(rows):
    hdr = ("model", "M", "bf16", "tinygemm", "gemlite", "ours pc", "ours g128", "fused EC", "fused 2-launch",
           "naive graph", "naive eager",
           "fused eager", "roof g128", "%roof g128", "%roof pc", "fused/g128", "naive_eager/fused", "fused/bf16",
           "fused EC pc", "g128/bf16", "pc/bf16", "fused pc/bf16", "compiled W4", "compiled EC", "compiled W4/bf16",
           "compiled EC/bf16", "bf16 again")
    out = ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    for r in rows:
        g = r.get
        ratio = lambda a, b: (g(a) / g(b)) if g(a) and g(b) else None  # noqa: E731
        pct = lambda roof, t: (100 * g(roof) / g(t)) if g(t) else None  # noqa: E731
        out.append("| " + " | ".join([r["model"], str(r["m"])] + [fmt(g(k)) for k in (
            "bf16", "tinygemm", "gemlite", "ours_pc", "ours_g128", "fused", "fused_2launch", "naive", "naive_eager",
            "fused_eager", "roof_g128")]
            + [fmt(pct("roof_g128", "ours_g128"), 0), fmt(pct("roof_pc", "ours_pc"), 0),
               fmt(ratio("fused", "ours_g128"), 2), fmt(ratio("naive_eager", "fused"), 1), fmt(ratio("fused", "bf16"), 2),
               fmt(g("fused_pc")), fmt(ratio("ours_g128", "bf16"), 2), fmt(ratio("ours_pc", "bf16"), 2),
               fmt(ratio("fused_pc", "bf16"), 2), fmt(g("compiled_w4")), fmt(g("compiled")),
               fmt(ratio("compiled_w4", "bf16"), 2), fmt(ratio("compiled", "bf16"), 2), fmt(g("bf16_again"))]) + " |")
    return out


def err_lines(errs):
    worst = {}
    for model, _, m, op, e in errs:
        key = (op, "decode" if m <= 16 else "prefill")
        worst[key] = max(worst.get(key, 0.0), e) if e == e else float("nan")
    return [f"max rel err {op:10s} {ph:8s} {v:.2e}" for (op, ph), v in sorted(worst.items())]


def write_markdown(path, info, bw, rate, gemlite_note, rows, errs, choices, details=()):
    lines = [f"# Kernel benchmark ({info['device']}, {info['date']} UTC)", "",
             f"torch {info['torch']}, triton {info['triton']}, {info['sms']} SMs. Command: `{info['command']}`", "",
             f"Measured copy bandwidth {bw / 1e12:.3f} TB/s (read+write), bf16 matmul {rate / 1e12:.0f} TFLOP/s. "
             f"gemlite: {gemlite_note}.", "",
             "Times: µs per decoder layer (7 linears), median of CUDA-event-timed CUDA-graph replays, weights rotated "
             "over copies exceeding L2; `naive eager`/`fused eager`: launched eagerly with a sync per layer. "
             f"`roof g128` = (int4 weights + bf16 scale/zero g128 + x/y bytes) / copy bandwidth. EC: r={RANK}, gated.", ""]
    lines += summary_lines(rows)
    lines += ["", "## Correctness (‖out − ref‖/‖ref‖ vs float64 dequantize-then-matmul (+ float64 EC))", "", "```"]
    lines += err_lines(errs) + ["```", "", "<details><summary>all errors</summary>", "", "```"]
    lines += [f"{m_} {n_} M={mm} {op}: {e:.2e}" for m_, n_, mm, op, e in errs] + ["```", "</details>", ""]
    lines += ["## Dispatch choices (fused g128 gated r=32 | W4 per-channel)", "", "```"]
    lines += [f"{m_} {n_} M={mm}: {a} | {b}" for m_, n_, mm, a, b in choices] + ["```"]
    if details:
        lines += ["", "## Prefill detail (--detail)", ""] + list(details)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def print_table(rows, errs):
    print("\n".join(err_lines(errs)))
    print("\n".join(summary_lines(rows)))
    print(f"total {time.time() - T0:.0f} s")


if __name__ == "__main__":
    main()
