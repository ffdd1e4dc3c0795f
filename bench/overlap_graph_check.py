"""GPU check: every prefill EC structure, the side-stream ``overlap`` ones included, inside
``torch.compile(mode="reduce-overhead")`` (CUDA-graph trees) vs a float64 reference, over several replays with
fresh inputs. The tuner and ``bench/kernels.py`` only capture with plain ``torch.cuda.graph``.

    python3 bench/overlap_graph_check.py
"""
from __future__ import annotations

import sys

import torch

from spear_compile.lowering import dispatch, runtime  # noqa: E402
from spear_compile.lowering.tuner import linear_key  # noqa: E402
from spear_compile.lowering.fused_linear import fused_linear  # noqa: E402
from spear_compile.quant.packing import pack  # noqa: E402


def main():
    torch.manual_seed(0)
    dev, dt, r = "cuda", torch.bfloat16, 32
    bad = 0
    for m, k, n, group in ((256, 2048, 512, 128), (2048, 2048, 2048, 2048)):
        q = torch.randint(0, 16, (n, k), device=dev)
        qdata = pack(q.cpu(), 4).to(dev)
        g = k // group
        scale = (torch.rand(n, g, device=dev) * 0.01 + 0.002).to(dt)
        zero = torch.randint(0, 16, (n, g), device=dev).to(dt)
        bias = (torch.randn(n, device=dev) * 0.1).to(dt)
        A, B = (torch.randn(r, k, device=dev) * 0.05).to(dt), (torch.randn(n, r, device=dev) * 0.05).to(dt)
        gw, gb = (torch.randn(r, r, device=dev) * 0.3).to(dt), (torch.randn(r, device=dev) * 0.1).to(dt)
        w64 = ((q.double().reshape(n, g, -1) - zero.double()[..., None]) * scale.double()[..., None]).reshape(n, k)

        def ref(x):
            x = x.double()
            u = x @ A.double().T
            u = u * 2 * torch.sigmoid(u @ gw.double().T + gb.double())
            return x @ w64.T + bias.double() + u @ B.double().T

        key = linear_key(m, k, n, group, dt, True, True, r)
        for cfg in [dispatch.DequantCublasConfig(ec=e, pad=p, overlap=o, split=s)
                    for e in ("after", "c_in", "kcat") for o in (False, True) for s in (False, True)
                    for p in ((0, 64) if e == "kcat" else (0,))]:
            runtime.TUNER.pin(key, cfg)
            torch._dynamo.reset()
            f = torch.compile(lambda x: fused_linear(x, qdata, scale, zero, bias, group, A, B, gw, gb) * 1.0,
                              mode="reduce-overhead", fullgraph=True, dynamic=False)
            errs = []
            for i in range(5):
                x = torch.randn(m, k, device=dev).to(dt)
                torch.compiler.cudagraph_mark_step_begin()
                y = f(x).clone()
                torch.cuda.synchronize()
                e = ((y.double() - ref(x)).norm() / ref(x).norm()).item()
                errs.append(e)
            ok = max(errs) < 1e-2
            bad += not ok
            print(f"M={m} K={k} N={n} g={group} {cfg.name}: max rel err over 5 graph-tree calls {max(errs):.2e}"
                  f"{'' if ok else '  FAIL'}", flush=True)
        runtime.TUNER.picks.pop(key, None)
    print("overlap graph-tree check:", "FAIL" if bad else "all ok")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
