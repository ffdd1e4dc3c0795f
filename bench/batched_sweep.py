"""Batched-decode W4 (+EC) kernels (issue 18): per decoder layer, grouped as compiled (q|k|v, o, gate|up, down).

Side by side in one run, CUDA-graph replay over enough weight copies to rotate past L2, median of replays:
bf16 cuBLAS (7 linears, and 4 on concatenated sibling weights), tinygemm (``aten._weight_int4pack_mm``, g128, 7
linears), the existing dispatch (``--existing``: its tuner with the batched hook off), and the batched kernel
(``lowering/batched.py``) with a config sweep per launch (``--sweep``) or through the real dispatch tuner with the hook
on (``--dispatch``), per-channel and g128, EC (r = 32, gated, on all 7 linears) off / on. Every variant is checked
against a float64 dequantize-then-matmul reference before it is timed (a wrong one is never timed).
All candidates are compiled first in parallel worker processes (shared on-disk Triton cache).

    PYTHONUNBUFFERED=1 python3 bench/batched_sweep.py --out $OUT --sweep --ms 16,64,256
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time

os.environ.setdefault("SPEAR_TUNE_CACHE", "0")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.kernels import copy_bandwidth, rel_err  # noqa: E402
from bench.kernels import time_graph as _time_graph  # noqa: E402
from spear_compile import options  # noqa: E402
from spear_compile.compile.siblings import merged_ec_views  # noqa: E402

MODELS = {
    "Llama-3.2-1B": dict(hidden=2048, inter=8192, heads=32, kv=8, head_dim=64),
    "Llama-2-7B": dict(hidden=4096, inter=11008, heads=32, kv=32, head_dim=128),
}
G = 128
RANK = 32
L2_BYTES = 60e6
T0 = time.time()
TOL = 3e-3  # the bar for every new kernel vs float64 (the interpreter's truncating bf16 stores: 6e-3)


def groups_of(c):
    """[(name, K, [member Ns])] of one decoder layer as compiled (siblings grouped)."""
    h, q, kv, i = c["hidden"], c["heads"] * c["head_dim"], c["kv"] * c["head_dim"], c["inter"]
    return [("qkv", h, [q, kv, kv]), ("o", q, [h]), ("gateup", h, [i, i]), ("down", i, [h])]


def log(fh, *a):
    s = " ".join(str(x) for x in a)
    print(s, flush=True)
    fh.write(s + "\n")
    fh.flush()


# ------------------------------------------------------------------ weights
def make_linear(k, n, dev, gen):
    from spear_compile.quant.packing import pack

    codes = torch.randint(0, 16, (n, k), device=dev, dtype=torch.uint8, generator=gen)

    def qp(groups):
        scale = (torch.rand(n, groups, device=dev, generator=gen) * 0.01 + 0.002).to(torch.bfloat16)
        zero = torch.randint(4, 12, (n, groups), device=dev, generator=gen).to(torch.bfloat16)
        return scale, zero

    s_g, z_g = qp(k // G)
    s_c, z_c = qp(1)
    bf = lambda *shape, sc=0.02: (torch.randn(*shape, device=dev, generator=gen) * sc).to(torch.bfloat16)  # noqa: E731
    return dict(k=k, n=n, codes=codes, q=pack(codes, 4), g128=(s_g, z_g), pc=(s_c, z_c),
                A=bf(RANK, k), B=bf(n, RANK), gw=bf(RANK, RANK, sc=0.3), gb=bf(RANK, sc=0.1))


def add_baselines(L, tinygemm=True):
    from spear_compile.lowering import dispatch, grouped, prefill, runtime

    s, z = L["g128"]
    L["w_bf16"] = prefill.dequantize_w4(L["q"], s, z, G, torch.bfloat16)
    if not tinygemm:
        return
    c = L["codes"]
    packed = ((c[:, ::2] << 4) | c[:, 1::2]).contiguous()
    L["tg_w"] = torch.ops.aten._convert_weight_to_int4pack(packed, 8)
    zf = (8.0 - z.float()) * s.float()  # (q - z) s == (q - 8) s + (8 - z) s
    L["tg_sz"] = torch.stack([s.float(), zf], 2).transpose(0, 1).contiguous().to(torch.bfloat16)


def members_of(Ls, quant, ec):
    from spear_compile.lowering import batched, grouped, prefill, runtime

    out = []
    for L in Ls:
        s, z = L[quant]
        out.append(batched.Member(L["q"], s, z, None, *((L["A"], L["B"], L["gw"], L["gb"]) if ec else ())))
    return out


def group_size(quant, k):
    return G if quant == "g128" else k


def reference(x, Ls, quant, ec):
    d = torch.float64
    outs = []
    x64 = x.to(d)
    for L in Ls:
        s, z = L[quant]
        n, k = L["n"], L["k"]
        w = (L["codes"].to(d).reshape(n, s.shape[1], -1) - z.to(d)[..., None]) * s.to(d)[..., None]
        y = x64 @ w.reshape(n, k).T
        del w
        if ec:
            u = x64 @ L["A"].to(d).T
            u = u * 2 * torch.sigmoid(u @ L["gw"].to(d).T + L["gb"].to(d))
            y = y + u @ L["B"].to(d).T
        outs.append(y)
    return torch.cat(outs, -1)


# ------------------------------------------------------------------ timing: bench/kernels.py's
def batched_kernel(on: bool):
    """The batched kernel as a tuner candidate (the dispatch's ``--dispatch``) or not (``--existing``), through the
    library's own switch ``SPEAR_BATCHED_KERNEL``."""
    os.environ["SPEAR_BATCHED_KERNEL"] = "1" if on else "0"


def time_graph(fn, copies):
    """µs per call of ``fn(c)`` (c = weight copy), one graph replaying it for every copy; median of 20 replays."""
    return _time_graph(fn, copies, reps=20)


def layer_bytes(groups, m, kind):
    tot = 0
    for _, k, ns in groups:
        for n in ns:
            tot += 2 * m * (k + n)
            if kind == "bf16":
                tot += 2 * n * k
                continue
            gr = 1 if kind == "pc" else k // G
            tot += n * k // 2 + 4 * n * gr
            if kind == "ec":
                tot += 2 * (RANK * k + n * RANK + RANK * RANK + RANK)
    return tot


# ------------------------------------------------------------------ parallel precompile
def _compile_task(task):
    """Worker: run one (K, Ns, quant, ec, M, cfg) launch on random weights of those shapes (fills the Triton cache)."""
    import torch as t_
    from spear_compile.lowering import batched, grouped, prefill, runtime

    k, ns, quant, ec, m, cfg = task
    try:
        gen = t_.Generator(device="cuda").manual_seed(0)
        Ls = [make_linear(k, n, "cuda", gen) for n in ns]
        x = t_.randn(m, k, device="cuda", dtype=t_.bfloat16)
        y = t_.empty(m, sum(ns), device="cuda", dtype=t_.bfloat16)
        batched.run_members(cfg, x, members_of(Ls, quant, ec), group_size(quant, k), y)
        t_.cuda.synchronize()
        return None
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {str(e)[:200]}"


def _dispatch_task(task):
    """Worker: tune one dispatch key (single or grouped) on random weights (compiles every candidate)."""
    import torch as t_
    from spear_compile.lowering import dispatch, grouped, prefill, runtime

    k, ns, quant, ec, m, packed = task
    try:
        gen = t_.Generator(device="cuda").manual_seed(0)
        Ls = [make_linear(k, n, "cuda", gen) for n in ns]
        x = t_.randn(m, k, device="cuda", dtype=t_.bfloat16)
        run_dispatch(x, Ls, quant, ec)
        if packed and len(ns) > 1:  # the adjacent-members key too (its concat candidate's single key)
            add_packed(Ls)
            run_dispatch(x, Ls, quant, ec, True)
        t_.cuda.synchronize()
        return None
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {str(e)[:200]}"


def precompile(fn, tasks, workers, fh, what):
    import multiprocessing as mp

    t = time.time()
    if not tasks:
        return
    with mp.get_context("spawn").Pool(workers) as pool:
        errs = [e for e in pool.map(fn, tasks, chunksize=1) if e]
    log(fh, f"precompile {what}: {len(tasks)} tasks in {time.time() - t:.1f} s, {len(errs)} failed"
        + (f" (first: {errs[0]})" if errs else ""))


# ------------------------------------------------------------------ the launches of one group
def add_packed(Ls):
    """Each member's codes, scales and zeros also as views of one buffer per part (``L["packed"]``), the layout
    ``compile.siblings.pack_siblings`` gives sibling weights (``--packed``)."""
    joined = {"q": torch.cat([L["q"] for L in Ls])}
    for quant in ("pc", "g128"):
        for i in (0, 1):
            joined[(quant, i)] = torch.cat([L[quant][i] for L in Ls])
    row = 0
    for L in Ls:
        rows = slice(row, row + L["n"])
        L["packed"] = {"q": joined["q"][rows], **{quant: (joined[(quant, 0)][rows], joined[(quant, 1)][rows])
                                                  for quant in ("pc", "g128")}}
        row += L["n"]
    if len(Ls) > 1:  # the ECs as one EC of rank g·r, as pack_siblings lays out EC'd siblings
        views = merged_ec_views(*([L[p] for L in Ls] for p in ("A", "B", "gw", "gb")))
        for L, (a, b, gw, gb) in zip(Ls, views):
            L["packed"].update(A=a, B=b, gw=gw, gb=gb)


def run_dispatch(x, Ls, quant, ec, packed=False):
    """The group as compiled through ``dispatch``: grouped linear without EC (``launch_grouped``; ``packed``: the
    members' weights adjacent in one buffer, ``add_packed``); siblings that all carry an EC as the grouping pass
    makes them since session 32 (``launch_grouped_ec``: the batched kernel over every member where it tunes faster),
    unless ``SPEAR_GROUP_EC_LINEARS=0`` (then one ``launch`` per member, the pass's earlier output)."""
    from spear_compile.lowering import dispatch, grouped, prefill, runtime

    gs = group_size(quant, Ls[0]["k"])
    if not ec:
        if len(Ls) == 1:
            return dispatch.launch(x, Ls[0]["q"], *Ls[0][quant], None, gs)
        Ws = [L["packed"] for L in Ls] if packed else Ls
        return grouped.launch_grouped(x, [W["q"] for W in Ws], [W[quant][0] for W in Ws], [W[quant][1] for W in Ws],
                                       None, gs)
    if len(Ls) > 1 and options.current().group_ec_linears:
        Ws = [L["packed"] for L in Ls] if packed else Ls   # packed: weights and ECs merged (pack_siblings)
        return grouped.launch_grouped_ec(x, [W["q"] for W in Ws], [W[quant][0] for W in Ws],
                                         [W[quant][1] for W in Ws], [None] * len(Ws), gs, [W["A"] for W in Ws],
                                         [W["B"] for W in Ws], [W["gw"] for W in Ws], [W["gb"] for W in Ws])
    return [dispatch.launch(x, L["q"], *L[quant], None, gs, L["A"], L["B"], L["gw"], L["gb"]) for L in Ls]


def run_batched(cfg, x, Ls, quant, ec, y):
    from spear_compile.lowering import batched, grouped, prefill, runtime

    return batched.run_members(cfg, x, members_of(Ls, quant, ec), group_size(quant, Ls[0]["k"]), y)


def _smoke_mode(args):
    """Tiny shapes on the CPU under the Triton interpreter, eager timing: exercises every code path of this script."""
    global time_graph, copy_bandwidth, precompile, TOL
    TOL = 6e-3
    MODELS.clear()
    MODELS["tiny"] = dict(hidden=256, inter=512, heads=4, kv=2, head_dim=64)
    args.models, args.workers = "tiny", 0

    def eager(fn, copies, reps=2):
        t = time.perf_counter()
        for _ in range(reps):
            for c in range(copies):
                fn(c)
        return (time.perf_counter() - t) / reps / copies * 1e6

    time_graph = eager
    copy_bandwidth = lambda: 3e12  # noqa: E731
    precompile = lambda *a: None  # noqa: E731


def _summarize(tune_log, model, m):
    """One line per tuned key that had batched candidates: its best batched and best other config (µs)."""
    out = []
    for key, results in tune_log:
        timed = [(ms, name) for name, ms in results if isinstance(ms, float)]
        new = [t for t in timed if t[1].startswith("batched")]
        old = [t for t in timed if not t[1].startswith("batched")]
        if new:
            bn, bo = min(new), min(old) if old else (float("nan"), "-")
            wrong = sum(1 for _, r in results if isinstance(r, str))
            out.append(f"  {model} M={m} {key}: batched {bn[0] * 1e3:.2f} ({bn[1]}) | other {bo[0] * 1e3:.2f} ({bo[1]})"
                       f" -> {bn[0] / bo[0]:.2f}x" + (f"; {wrong} refused/wrong" if wrong else ""))
    return out


# ------------------------------------------------------------------ main
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--ms", default="16,64,256")
    ap.add_argument("--sweep", action="store_true", help="time every batched candidate per group; best per group")
    ap.add_argument("--configs", default="", help="python list of BatchedConfig kwargs dicts replacing the candidates")
    ap.add_argument("--dispatch", action="store_true", help="the real dispatch tuner, batched hook on")
    ap.add_argument("--existing", action="store_true", help="the real dispatch tuner, batched hook off")
    ap.add_argument("--packed", action="store_true",
                    help="the real dispatch tuner (hook on) with sibling weights in one buffer and EC'd siblings' ECs "
                         "merged (pack_siblings with SPEAR_MERGE_SIBLING_ECS=1); --dispatch --dispatch-ecs 1: the "
                         "EC-on layer as compiled by default (unmerged) beside it")
    ap.add_argument("--dispatch-ecs", default="0,1", help="EC settings timed through dispatch / existing")
    ap.add_argument("--quants", default="pc,g128")
    ap.add_argument("--ecs", default="0,1")
    ap.add_argument("--workers", type=int, default=14)
    ap.add_argument("--budget", type=float, default=540.0)
    ap.add_argument("--smoke", action="store_true", help="CPU interpreter, tiny shapes, no graphs (checks the script)")
    args = ap.parse_args()
    if args.smoke:
        _smoke_mode(args)
    os.makedirs(args.out, exist_ok=True)
    fh = open(os.path.join(args.out, "batched_log.txt"), "a")
    import triton

    from spear_compile.lowering import batched, dispatch, grouped, prefill, runtime

    dev = torch.device("cpu" if args.smoke else "cuda")
    props = torch.cuda.get_device_properties(dev) if not args.smoke else type("P", (), dict(name="cpu", multi_processor_count=132))
    info = dict(device=props.name, sms=props.multi_processor_count,
                date=datetime.datetime.utcnow().isoformat(timespec="seconds"), torch=torch.__version__,
                triton=triton.__version__, command="PYTHONUNBUFFERED=1 python3 " + " ".join(sys.argv))
    log(fh, json.dumps(info))
    bw = copy_bandwidth()
    log(fh, f"copy bandwidth {bw / 1e12:.3f} TB/s")
    sms = props.multi_processor_count
    ms = [int(v) for v in args.ms.split(",")]
    quants = args.quants.split(",")
    ecs = [bool(int(v)) for v in args.ecs.split(",")]
    fixed = None
    if args.configs:
        fixed = [batched.BatchedConfig(**d) for d in eval(args.configs)]  # noqa: S307 (bench CLI)

    def cands_for(m, k, ns, quant, ec=False):
        if fixed is not None:
            return list(fixed)
        return batched.batched_candidates(m, k, ns, group_size(quant, k), sms, has_ec=ec)

    # ---- compile everything first, in parallel ----
    tasks, dtasks = [], []
    for model in args.models.split(","):
        for m in ms:
            for name, k, ns in groups_of(MODELS[model]):
                for quant in quants:
                    for ec in ecs:
                        if args.sweep and batched.MIN_M <= m <= batched.MAX_M:
                            tasks += [(k, ns, quant, ec, m, c) for c in cands_for(m, k, ns, quant, ec)]
                        if args.dispatch or args.existing or args.packed:
                            dtasks.append((k, ns, quant, ec, m, args.packed))
    precompile(_compile_task, tasks, args.workers, fh, "batched sweep")
    if args.dispatch or args.existing or args.packed:
        precompile(_dispatch_task, dtasks, args.workers, fh, "dispatch keys")

    gen = torch.Generator(device=dev).manual_seed(1234)
    rows, picks, errs, tune_summary = [], {}, [], []
    tuned_at = ("-", 0)  # (model, M) of the timings the tuner holds (summarized before they are cleared)
    for model in args.models.split(","):
        groups = groups_of(MODELS[model])
        int4 = layer_bytes(groups, 1, "g128")
        copies = 2 if args.smoke else max(2, math.ceil(3 * L2_BYTES / int4))
        layers = [[[make_linear(k, n, dev, gen) for n in ns] for _, k, ns in groups] for _ in range(copies)]
        for Lg in layers:
            for Ls in Lg:
                for L in Ls:
                    add_baselines(L, tinygemm=not args.smoke)
                if args.packed:
                    add_packed(Ls)
        cats = [[torch.cat([L["w_bf16"] for L in Ls]) for Ls in Lg] for Lg in layers]
        log(fh, f"== {model}: {copies} weight copies, int4 layer {int4 / 1e6:.1f} MB")
        for m in ms:
            if time.time() - T0 > args.budget:
                log(fh, f"budget reached: skip {model} M={m}")
                continue
            xs = {k: torch.randn(m, k, device=dev, generator=gen).to(torch.bfloat16) for _, k, _ in groups}
            outs = [torch.empty(m, sum(ns), device=dev, dtype=torch.bfloat16) for _, _, ns in groups]
            res = dict(model=model, m=m)
            # ---- baselines ----
            base = {
                "bf16": lambda c: [F.linear(xs[k], L["w_bf16"]) for (_, k, _), Ls in zip(groups, layers[c]) for L in Ls],
                "bf16_grp": lambda c: [F.linear(xs[k], w) for (_, k, _), w in zip(groups, cats[c])],
                "tinygemm": lambda c: [torch.ops.aten._weight_int4pack_mm(xs[k], L["tg_w"], G, L["tg_sz"])
                                       for (_, k, _), Ls in zip(groups, layers[c]) for L in Ls],
            }
            for name, fn in base.items():
                if name == "tinygemm" and (m > 256 or args.smoke):
                    continue
                res[name] = time_graph(fn, copies)
            # ---- per group: correctness then timing ----
            for quant in quants:
                for ec in ecs:
                    tag = f"{quant}{'_ec' if ec else ''}"
                    refs = [reference(xs[k], Ls, quant, ec) for (_, k, _), Ls in zip(groups, layers[0])]
                    variants = {}
                    if args.sweep and batched.MIN_M <= m <= batched.MAX_M:
                        variants["ours"] = None  # best per group of the sweep
                    dispatch_ecs = [bool(int(v)) for v in args.dispatch_ecs.split(",")]
                    if args.dispatch and ec in dispatch_ecs:
                        variants["dispatch"] = "on"
                    if args.existing and ec in dispatch_ecs:
                        variants["existing"] = "off"
                    if args.packed:  # as compiled after pack_siblings (weights, and ECs merged: merged_ec)
                        variants["packed"] = "packed"
                    for var, hook in variants.items():
                        best_cfgs, gtimes = [], []
                        if hook is not None:
                            tune_summary.extend(_summarize(runtime.TUNER.timings.items(), *tuned_at))
                            dispatch.clear_tuning()  # the picks are keyed by shape, not by the hook's state
                            tuned_at = (model, m)
                        for gi, ((gname, k, ns), ref) in enumerate(zip(groups, refs)):
                            if hook is None:
                                timed = []
                                for cfg in cands_for(m, k, ns, quant, ec):
                                    fn = lambda c, cfg=cfg, gi=gi: run_batched(cfg, xs[k], layers[c][gi], quant, ec,
                                                                                outs[gi])
                                    try:
                                        outs[gi].fill_(float("nan"))
                                        fn(0)
                                        e = rel_err(outs[gi], ref)
                                    except Exception as ex:  # noqa: BLE001
                                        log(fh, f"ERROR {model} M={m} {gname} {tag} {cfg.name}: {type(ex).__name__}: "
                                                f"{str(ex)[:300]}")
                                        continue
                                    errs.append((model, m, gname, tag, cfg.name, e))
                                    if not e < TOL:
                                        log(fh, f"BAD {model} M={m} {gname} {tag} {cfg.name}: rel err {e:.3e}")
                                        continue
                                    timed.append((time_graph(fn, copies), cfg))
                                timed.sort(key=lambda t: t[0])
                                log(fh, f"sweep {model} M={m} {gname} {tag}: " + "; ".join(
                                    f"{c.name} {t:.2f}" for t, c in timed[:6]))
                                if not timed:
                                    gtimes = None
                                    break
                                best_cfgs.append(timed[0][1])
                                gtimes.append(timed[0][0])
                            else:
                                try:
                                    batched_kernel(hook != "off")
                                    pk = hook == "packed"
                                    out = run_dispatch(xs[k], layers[0][gi], quant, ec, pk)
                                    out = torch.cat(out, -1) if isinstance(out, list) else out
                                    e = rel_err(out, ref)
                                    errs.append((model, m, gname, tag, var, e))
                                    fn = lambda c, gi=gi, pk=pk: run_dispatch(xs[k], layers[c][gi], quant, ec, pk)
                                    if not e < 1e-2:  # the existing kernels were held to 1e-2 (bench/kernels.py)
                                        log(fh, f"BAD {model} M={m} {gname} {tag} {var}: rel err {e:.3e}")
                                        gtimes = None
                                        break
                                    gtimes.append(time_graph(fn, copies))
                                    if not ec and len(ns) > 1:
                                        names = [grouped.choose_grouped(m, k, ns, group_size(quant, k), adjacent=pk)]
                                    elif len(ns) > 1 and options.current().group_ec_linears:
                                        names = [grouped.choose_grouped_ec(m, k, ns, group_size(quant, k), rank=RANK,
                                                                           merged=pk)]
                                    else:
                                        names = [dispatch.choose(m, k, n, group_size(quant, k),
                                                                 ec_rank=RANK if ec else 0, gated=ec) for n in ns]
                                    best_cfgs.append(" | ".join(names))
                                finally:
                                    batched_kernel(True)
                        if gtimes is None:
                            continue
                        picks[(model, m, var, tag)] = [getattr(c, "name", c) for c in best_cfgs]
                        res[f"{var}_{tag}_sum"] = sum(gtimes)
                        log(fh, f"{model} M={m} {var} {tag}: groups " + ", ".join(
                            f"{g[0]} {t:.2f}" for g, t in zip(groups, gtimes)) + f"; picks {picks[(model, m, var, tag)]}")
                        if hook is None:  # the whole layer in one graph with the picks
                            fn = lambda c, cfgs=best_cfgs: [run_batched(cfg, xs[k], layers[c][gi], quant, ec, outs[gi])
                                                            for gi, ((_, k, _), cfg) in enumerate(zip(groups, cfgs))]
                        else:
                            fn = lambda c, pk=hook == "packed": [run_dispatch(xs[k], layers[c][gi], quant, ec, pk)
                                                                 for gi, (_, k, _) in enumerate(groups)]
                            batched_kernel(hook != "off")
                        try:
                            res[f"{var}_{tag}"] = time_graph(fn, copies)
                        finally:
                            batched_kernel(True)
                    del refs
            for kind in ("pc", "g128", "ec", "bf16"):
                res[f"roof_{kind}"] = layer_bytes(groups, m, kind) / bw * 1e6
            rows.append(res)
            log(fh, "ROW " + json.dumps({k_: (round(v, 2) if isinstance(v, float) else v) for k_, v in res.items()}))
            del xs, outs
        del layers, cats
        torch.cuda.empty_cache()

    tune_summary.extend(_summarize(runtime.TUNER.timings.items(), *tuned_at))
    log(fh, "\ntuner keys (dispatch, hook on): best batched vs best other candidate, µs (graph replay, L2 flushed)")
    for line in tune_summary:
        log(fh, line)
    worst = max((e for *_, e in errs if e == e), default=float("nan"))
    log(fh, f"correctness: {len(errs)} checks, worst rel err {worst:.2e}, "
            f"{sum(1 for *_, e in errs if not e < TOL)} over {TOL:.0e}")
    for var in ("ours", "dispatch", "existing", "packed"):
        es = [e for _, _, _, _, name, e in errs if (name == var or (var == "ours" and name.startswith("batched")))]
        if es:
            log(fh, f"  {var}: {len(es)} checks, worst {max(es):.2e}")
    with open(os.path.join(args.out, "batched_rows.json"), "w") as f:
        json.dump(dict(info=info, bw=bw, rows=rows, picks={" ".join(map(str, k)): v for k, v in picks.items()},
                       errs=errs), f, indent=1)
    # ---- compact table ----
    cols = ["bf16", "bf16_grp", "tinygemm"] + sorted({k_ for r in rows for k_ in r
                                                      if k_.startswith(("ours_", "dispatch_", "existing_", "packed_"))
                                                      and not k_.endswith("_sum")})
    log(fh, "\n| model | M | " + " | ".join(cols) + " | roof g128 |")
    log(fh, "|---|---|" + "---|" * (len(cols) + 1))
    for r in rows:
        log(fh, f"| {r['model']} | {r['m']} | " + " | ".join(f"{r[c]:.1f}" if c in r else "–" for c in cols)
            + f" | {r['roof_g128']:.1f} |")
    log(fh, "\nratios vs bf16 (7 linears):")
    for r in rows:
        parts = [f"{c} {r[c] / r['bf16']:.2f}" for c in cols[1:] if c in r]
        ecr = [f"{c}/{c[:-3]} {r[c] / r[c[:-3]]:.2f}" for c in cols if c.endswith("_ec") and c in r and c[:-3] in r]
        log(fh, f"{r['model']} M={r['m']}: " + ", ".join(parts) + ("; EC/W4 " + ", ".join(ecr) if ecr else ""))
    log(fh, f"total {time.time() - T0:.0f} s")


if __name__ == "__main__":
    main()
