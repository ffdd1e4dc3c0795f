"""Sweep of the EC prologue's x pass at prefill M (``lowering.prefill.ec_prologue_in_place``, what the compiled decoder
layer runs on ``[x | 0]``), at the shapes the merged ECs give: µs per call and achieved read bandwidth per
(BLOCK_M, BLOCK_K, stages, warps, programs/SM).

    python bench/xpass_sweep.py [--m 2048] [--shapes "1B qkv,7B down"]

Each config is first checked against float64 (v rel err < 5e-3), then timed as CUDA-graph replays over ``COPIES``
buffers (so x is not L2-resident from the previous call). (Session 8 swept the x pass over the stacked A that
this replaced: ``results/xpass_sweep_s8_log.txt``; session 9's first version, one launch with the gates done by
each M tile's last split: ``results/xpass_sweep_s9_log.txt``.)
"""
from __future__ import annotations

import argparse
import itertools
import json

import torch

from bench import kernels  # noqa: E402
from spear_compile import options  # noqa: E402
from spear_compile.lowering import prefill  # noqa: E402

SHAPES = {  # (K, [rank per stacked EC]): 1B q|k|v, 1B gate|up, 1B down, 7B q|k|v, 7B down
    "1B qkv": (2048, [32, 32, 32]), "1B gate|up": (2048, [32, 32]), "1B down": (8192, [32]),
    "7B qkv": (4096, [32, 32, 32]), "7B down": (11008, [32])}
COPIES = 8  # buffers per timed graph


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, default=2048)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    args = ap.parse_args()
    default_cfg = options.current().xpass_in_place
    g = torch.Generator(device="cuda").manual_seed(0)
    bw = kernels.copy_bandwidth()
    print(json.dumps({"copy_bw_TBs": round(bw / 1e12, 3)}), flush=True)
    cfgs = list(itertools.product((32, 64), (128, 256), (2, 3, 4), (4, 8), (1, 2)))
    if default_cfg not in cfgs:
        cfgs.append(default_cfg)
    shapes = {n: SHAPES[n] for n in args.shapes.split(",")}
    best = {}
    for name, (k, ranks) in shapes.items():
        r, m = sum(ranks), args.m
        out = torch.zeros(m, k + r, device="cuda", dtype=torch.bfloat16)
        out[:, :k] = torch.randn(m, k, device="cuda", generator=g).to(torch.bfloat16)
        blocks = [((torch.randn(ri, k, device="cuda", generator=g) * 0.02).to(torch.bfloat16),
                   (torch.randn(ri, ri, device="cuda", generator=g) * 0.3).to(torch.bfloat16),
                   (torch.randn(ri, device="cuda", generator=g) * 0.1).to(torch.bfloat16)) for ri in ranks]
        v64 = []
        for a, gw, gb in blocks:
            u = out[:, :k].double() @ a.double().t()
            v64.append(u * 2 * torch.sigmoid(u @ gw.double().t() + gb.double()))
        v64 = torch.cat(v64, 1)
        bufs = [out] + [out.clone() for _ in range(COPIES - 1)]
        rows = []
        for cfg in cfgs:
            def call(c=0, cfg=cfg):
                return prefill.ec_prologue_in_place(bufs[c], k, blocks, xpass=cfg)
            try:
                out[:, k:].zero_()
                call()
                err = ((out[:, k:].double() - v64).norm() / v64.norm()).item()
                if not err < 5e-3:
                    print(json.dumps({"shape": name, "cfg": cfg, "BAD": err}), flush=True)
                    continue
                us = kernels.time_graph(call, COPIES, reps=30)
            except Exception as e:  # noqa: BLE001
                print(json.dumps({"shape": name, "cfg": cfg, "error": f"{type(e).__name__}: {e}"[:200]}), flush=True)
                continue
            rows.append((us, cfg))
        rows.sort()
        default = [us for us, c in rows if c == default_cfg]
        gbs = m * k * 2 / 1e3
        print(json.dumps({"shape": name, "K": k, "R": r, "default_us": round(default[0], 2) if default else None,
                          "best": [(round(us, 2), c, round(gbs / us, 2)) for us, c in rows[:5]]}), flush=True)
        best[name] = rows
    tot = {}  # the configs with the least total time over the shapes
    for name in shapes:
        for us, c in best.get(name, []):
            tot.setdefault(c, []).append(us)
    ranked = sorted((sum(v), c) for c, v in tot.items() if len(v) == len(shapes))
    print(json.dumps({"total_us_over_shapes": [(round(t, 2), c) for t, c in ranked[:8]],
                      "default": [(round(t, 2), c) for t, c in ranked if c == default_cfg]}))


if __name__ == "__main__":
    main()
