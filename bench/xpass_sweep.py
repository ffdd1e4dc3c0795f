"""Sweep of the EC prologue's x pass (``ec_xpass_kernel`` + gate) at prefill M, the shapes the merged ECs give:
µs per call (CUDA-graph replays) and achieved read bandwidth, per (BLOCK_M, BLOCK_K, stages, warps, programs/SM).

    python bench/xpass_sweep.py [--m 2048]

Each config is first checked against float64 (v rel err < 5e-3), then timed. ``[x | 0]`` is read in place
(``x_in_out``), as the compiled decoder layer does.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
import kernels  # noqa: E402
from spear_compile.lowering import dispatch  # noqa: E402

SHAPES = {  # (K, [rank per stacked EC]): 1B q|k|v, 1B gate|up, 1B down, 7B q|k|v, 7B down
    "1B qkv": (2048, [32, 32, 32]), "1B gate|up": (2048, [32, 32]), "1B down": (8192, [32]),
    "7B qkv": (4096, [32, 32, 32]), "7B down": (11008, [32])}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, default=2048)
    args = ap.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    bw = kernels.copy_bandwidth()
    print(json.dumps({"copy_bw_TBs": round(bw / 1e12, 3)}), flush=True)
    cfgs = list(itertools.product((64, 128), (128, 256), (2, 3), (4, 8), (1, 2, 4)))
    best = {}
    for name, (k, ranks) in SHAPES.items():
        r = sum(ranks)
        m = args.m
        out = torch.zeros(m, k + r, device="cuda", dtype=torch.bfloat16)
        out[:, :k] = torch.randn(m, k, device="cuda", generator=g).to(torch.bfloat16)
        a = (torch.randn(r, k, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
        gates = [(ri, (torch.randn(ri, ri, device="cuda", generator=g) * 0.3).to(torch.bfloat16),
                  (torch.randn(ri, device="cuda", generator=g) * 0.1).to(torch.bfloat16)) for ri in ranks]
        u = out[:, :k].double() @ a.double().t()
        v64 = torch.cat([uu * 2 * torch.sigmoid(uu @ gw.double().t() + gb.double())
                         for uu, (_, gw, gb) in zip(u.split(ranks, 1), gates)], 1)
        rows = []
        for cfg in cfgs:
            one = len(gates) == 1

            def call(c=None, cfg=cfg, one=one):
                return dispatch.ec_prologue(out[:, :k], a, None, gates[0][1] if one else None,
                                            gates[0][2] if one else None, r, out=out, col0=k, width=r, split=True,
                                            x_in_out=True, gates=None if one else gates, xpass=cfg)
            try:
                call()
                err = ((out[:, k:].double() - v64).norm() / v64.norm()).item()
                if not err < 5e-3:
                    print(json.dumps({"shape": name, "cfg": cfg, "BAD": err}), flush=True)
                    continue
                us = kernels.time_graph(call, 1, reps=30)
            except Exception as e:  # noqa: BLE001
                print(json.dumps({"shape": name, "cfg": cfg, "error": f"{type(e).__name__}: {e}"[:200]}), flush=True)
                continue
            rows.append((us, cfg))
        rows.sort()
        default = [us for us, c in rows if c == dispatch.XPASS_CONFIG_IN_PLACE]
        gbs = m * k * 2 / 1e3
        print(json.dumps({"shape": name, "K": k, "R": r, "default_us": round(default[0], 2) if default else None,
                          "best": [(round(us, 2), c, round(gbs / us, 2)) for us, c in rows[:5]]}), flush=True)
        best[name] = rows
    # the configs with the least total time over the shapes
    tot = {}
    for name in SHAPES:
        for us, c in best.get(name, []):
            tot.setdefault(c, []).append(us)
    ranked = sorted((sum(v), c) for c, v in tot.items() if len(v) == len(SHAPES))
    print(json.dumps({"total_us_over_shapes": [(round(t, 2), c) for t, c in ranked[:8]],
                      "default": [(round(t, 2), c) for t, c in ranked if c == dispatch.XPASS_CONFIG_IN_PLACE]}))


if __name__ == "__main__":
    main()
