"""Prefill (M = 2048) per decoder layer through ``torch.compile``: bf16 vs spear W4 vs W4 + ECs on all 7 linears.

    python bench/prefill_layer.py [--models Llama-3.2-1B,Llama-2-7B] [--m 2048] [--out DIR]

Two units per model shape (random weights, bf16, default compile mode, timed as CUDA-graph replays of the compiled
callables over weight copies, µs per layer):

* ``linears``: the 7 linears of a layer as a decoder layer feeds them (q|k|v read one input, o one, gate|up one,
  down one; the four inputs are given), i.e. ``kernels.py``'s per-layer unit with the siblings visible to the
  compiler;
* ``layer``: a transformers ``LlamaDecoderLayer`` (RMSNorm, RoPE, causal SDPA, SiLU MLP, residuals), where x's
  producers are in the same graph.

Variants: ``bf16`` (Inductor), ``w4`` (spear, g128 RTN), ``ec`` (+ gated r = 32 ECs on all 7 linears: EC siblings
merged into one GEMM, ``[x | 0]`` from a pointwise producer), ``ec_nomerge`` (``SPEAR_EC_MERGE=0``: one GEMM per EC
node, session 7's graph), ``ec_nopad`` (``SPEAR_EC_PAD_X=0``: the prologue copies x).
Correctness before timing: each compiled output vs the same module run eagerly (our runtime op) and, for
``linears``, vs float64 dequantize-then-matmul (+ float64 EC).
The linears' cost inside the layer is read as ``(layer − layer bf16) / linears bf16 + 1`` (the rest of the layer
is the same code in both).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys
import time

import torch
import torch.nn as nn
import triton

from spear_compile.compile import records  # noqa: E402
from spear_compile.quant.config import QuantConfig  # noqa: E402
from spear_compile.ec.module import CompensatedLinear  # noqa: E402
from spear_compile.quant.api import quantize_linear_  # noqa: E402

from bench import kernels  # noqa: E402  (its CUDA-graph timer)

MODELS = {
    "Llama-3.2-1B": dict(hidden=2048, inter=8192, heads=32, kv=8, head_dim=64),
    "Llama-2-7B": dict(hidden=4096, inter=11008, heads=32, kv=32, head_dim=128),
}
RANK = 32
NAMES = ("q", "k", "v", "o", "gate", "up", "down")
VARIANTS = {"bf16": {}, "w4": {}, "ec": {}, "ec_nomerge": {"SPEAR_EC_MERGE": "0"},
            "ec_nopad": {"SPEAR_EC_PAD_X": "0"}}


def shapes(c):
    h, q, kv, i = c["hidden"], c["heads"] * c["head_dim"], c["kv"] * c["head_dim"], c["inter"]
    return dict(q=(h, q), k=(h, kv), v=(h, kv), o=(q, h), gate=(h, i), up=(h, i), down=(i, h))


class Linears(nn.Module):
    def __init__(self, c):
        super().__init__()
        for name, (k, n) in shapes(c).items():
            setattr(self, name, nn.Linear(k, n, bias=False))

    def forward(self, xa, xo, xm, xd):
        return (self.q(xa), self.k(xa), self.v(xa), self.o(xo), self.gate(xm), self.up(xm), self.down(xd))


ATTRS = {"q": ("self_attn", "q_proj"), "k": ("self_attn", "k_proj"), "v": ("self_attn", "v_proj"),
         "o": ("self_attn", "o_proj"), "gate": ("mlp", "gate_proj"), "up": ("mlp", "up_proj"),
         "down": ("mlp", "down_proj")}


def linear_slots(unit):
    """{name: (parent module, attribute)} of the unit's 7 linears."""
    if isinstance(unit, Linears):
        return {n: (unit, n) for n in NAMES}
    return {n: (getattr(unit, p), a) for n, (p, a) in ATTRS.items()}


def make_unit(kind, c, variant, gen):
    if kind == "linears":
        unit = Linears(c)
    else:
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer
        cfg = LlamaConfig(hidden_size=c["hidden"], intermediate_size=c["inter"], num_attention_heads=c["heads"],
                          num_key_value_heads=c["kv"], head_dim=c["head_dim"], num_hidden_layers=1)
        cfg._attn_implementation = "sdpa"
        unit = LlamaDecoderLayer(cfg, layer_idx=0)
    unit = unit.to("cuda", torch.bfloat16).eval()
    with torch.no_grad():
        for p in unit.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, device="cuda", generator=gen) * p.shape[1] ** -0.5)
    if variant == "bf16":
        return unit
    qcfg = QuantConfig.from_spec("w4-g128-rtn")
    for name, (parent, attr) in linear_slots(unit).items():
        lin = quantize_linear_(getattr(parent, attr), qcfg, name=name)
        if variant.startswith("ec"):
            lin = CompensatedLinear.wrap(lin, RANK, gate="sigmoid")
            with torch.no_grad():
                for p in lin.ec_parameters():
                    p.copy_(torch.randn(p.shape, device="cuda", generator=gen) * 0.02)
        setattr(parent, attr, lin)
    return unit


def inputs(kind, c, m, gen, unit):
    if kind == "linears":
        ks = [c["hidden"], c["heads"] * c["head_dim"], c["hidden"], c["inter"]]
        return tuple(torch.randn(m, k, device="cuda", generator=gen).to(torch.bfloat16) for k in ks), {}
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    h = torch.randn(1, m, c["hidden"], device="cuda", generator=gen).to(torch.bfloat16)
    pos = torch.arange(m, device="cuda")[None]
    rope = LlamaRotaryEmbedding(unit.self_attn.config).to("cuda")
    cos, sin = rope(h, pos)
    return (h,), dict(attention_mask=None, position_ids=pos, position_embeddings=(cos, sin))


@torch.no_grad()
def reference64(unit, args):
    """float64 dequantize-then-matmul (+ float64 EC) of the linears unit."""
    outs = []
    for name, x in zip(NAMES, (args[0], args[0], args[0], args[1], args[2], args[2], args[3])):
        lin = getattr(unit, name)
        x = x.double()
        y = x @ lin.weight.dequantize(torch.float64).t()
        if isinstance(lin, CompensatedLinear):
            u = x @ lin.ec_A.double().t()
            u = u * (2.0 * torch.sigmoid(u @ lin.ec_gate_w.double().t() + lin.ec_gate_b.double()))
            y = y + u @ lin.ec_B.double().t()
        outs.append(y)
    return outs


def rel(a, b):
    a, b = a.double(), b.double()
    return float("nan") if torch.isnan(a).any() else ((a - b).norm() / b.norm()).item()


def time_graph(fns, reps=20):
    """µs per call: one CUDA graph calls every copy's compiled callable once (``kernels.time_graph``)."""
    return kernels.time_graph(lambda c: fns[c](), len(fns), reps=reps)


@contextlib.contextmanager
def env(values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run(kind, model, variant, m, copies, log, dump=None, profile=False):
    c = MODELS[model]
    gen = torch.Generator(device="cuda").manual_seed(7)
    units = [make_unit(kind, c, variant, gen) for _ in range(copies)]
    args, kwargs = inputs(kind, c, m, gen, units[0])
    torch._dynamo.reset()
    rec = records.CompileRecords()
    t0 = time.perf_counter()
    with env(VARIANTS[variant]), torch.no_grad(), records.recording(rec):
        backend = "inductor" if variant == "bf16" else "spear"
        compiled = [torch.compile(u, backend=backend, dynamic=False, fullgraph=True) for u in units]
        if dump:
            from torch._inductor.utils import run_and_get_code
            outs, codes = run_and_get_code(compiled[0], *args, **kwargs)
            with open(dump, "w") as f:
                f.write("\n\n# ----\n".join(codes))
        else:
            outs = compiled[0](*args, **kwargs)
        compile_s = time.perf_counter() - t0
        eager = units[0](*args, **kwargs)
        if kind == "linears":
            errs = [rel(o, e) for o, e in zip(outs, eager)]
            errs64 = [rel(o, r) for o, r in zip(outs, reference64(units[0], args))] if variant != "bf16" else []
        else:
            o, e = (outs[0], eager[0]) if isinstance(outs, tuple) else (outs, eager)
            errs, errs64 = [rel(o - args[0], e - args[0])], []  # the layer's update to the residual stream
        recs = list(rec.matches)
        res = dict(unit=kind, model=model, variant=variant, m=m, compile_s=round(compile_s, 1),
                   rel_err_vs_eager=max(errs), rel_err_vs_f64=max(errs64) if errs64 else None,
                   decomposed=sum(r.decomposed for r in recs), merged=sum(bool(r.decomposed_merged) for r in recs),
                   pad_x=sum(r.decomposed_pad_x for r in recs),
                   structures=sorted({r.decomposed_ec for r in recs if r.decomposed_ec}))
        ok = res["rel_err_vs_eager"] < 2e-2 and (res["rel_err_vs_f64"] is None or res["rel_err_vs_f64"] < 1e-2)
        res["ok"] = ok
        if ok:
            res["us"] = round(time_graph([lambda u=u: u(*args, **kwargs) for u in compiled]), 1)
        if ok and profile:
            from torch.profiler import ProfilerActivity
            with torch.profiler.profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    compiled[0](*args, **kwargs)
                torch.cuda.synchronize()
            log(f"--- kernels, {model} {kind} {variant} (5 calls) ---")
            log(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))
    log(res)
    del units, compiled
    torch.cuda.empty_cache()
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--m", type=int, default=2048)
    ap.add_argument("--units", default="linears,layer")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--budget", type=float, default=540.0)
    ap.add_argument("--dump-code", default="", help="comma list of unit:variant whose Inductor code is saved")
    ap.add_argument("--profile", default="", help="comma list of unit:variant whose kernels are profiled")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    fh = open(os.path.join(args.out, "prefill_layer_log.txt"), "w")
    t_start = time.time()

    def log(obj):
        line = json.dumps(obj) if not isinstance(obj, str) else obj
        print(line, flush=True)
        fh.write(line + "\n")
        fh.flush()

    info = dict(device=torch.cuda.get_device_name(), date=datetime.datetime.utcnow().isoformat(timespec="seconds"),
                torch=torch.__version__, triton=triton.__version__, command="python3 " + " ".join(sys.argv))
    log(info)
    rows = []
    for model in args.models.split(","):
        copies = 3 if model == "Llama-3.2-1B" else 2
        for kind in args.units.split(","):
            for variant in args.variants.split(","):
                if time.time() - t_start > args.budget:
                    log(f"budget reached: skip {model} {kind} {variant}")
                    continue
                try:
                    dump = (os.path.join(args.out, f"code_{model}_{kind}_{variant}.py")
                            if f"{kind}:{variant}" in args.dump_code.split(",") else None)
                    rows.append(run(kind, model, variant, args.m, copies, log, dump,
                                    f"{kind}:{variant}" in args.profile.split(",")))
                except Exception as e:  # noqa: BLE001
                    log(f"ERROR {model} {kind} {variant}: {type(e).__name__}: {e}")
    table(rows, info, os.path.join(args.out, "prefill_layer.md"), log)


def table(rows, info, path, log):
    lines = [f"# Prefill per decoder layer, compiled ({info['device']}, {info['date']})", "",
             f"torch {info['torch']}, triton {info['triton']}. Command: `{info['command']}`", "",
             "| model | M | unit | variant | µs | / bf16 | linears-equivalent / bf16 | rel err vs eager | vs f64 | "
             "GEMMs merged / pad_x | compile s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    by = {(r["model"], r["unit"], r["variant"]): r for r in rows}
    for r in rows:
        base = by.get((r["model"], r["unit"], "bf16"), {}).get("us")
        lin_bf16 = by.get((r["model"], "linears", "bf16"), {}).get("us")
        us = r.get("us")
        ratio = f"{us / base:.3f}" if us and base else "-"
        equiv = "-"
        if r["unit"] == "layer" and us and base and lin_bf16:
            equiv = f"{(us - base) / lin_bf16 + 1:.3f}"
        elif r["unit"] == "linears" and us and base:
            equiv = ratio
        f64 = "-" if r["rel_err_vs_f64"] is None else f"{r['rel_err_vs_f64']:.2e}"
        lines.append(f"| {r['model']} | {r['m']} | {r['unit']} | {r['variant']} | {us if us else 'not timed'} | "
                     f"{ratio} | {equiv} | {r['rel_err_vs_eager']:.2e} | {f64} | {r['merged']} / {r['pad_x']} | "
                     f"{r['compile_s']} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    log("\n".join(lines))


if __name__ == "__main__":
    main()
