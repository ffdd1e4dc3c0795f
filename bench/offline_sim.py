"""The offline throughput run (``bench/throughput.py``'s requests, all arriving at once) on simulated step costs, with
the mixed-step graph keys' one-off costs: what a fresh engine pays for its captures (no GPU needed).

``bench/serving_sim.py``'s machinery (the real ``Scheduler`` and ``MixedGraphs`` rules on a simulated clock, each
step costing the fit of a GPU's start-up profile times its residual noise), run over two passes of the requests as
the GPU bench runs them (a fresh engine, then the same engine on new requests of the same distribution), for each
capture cost and each scheduler rule: the engine's (a mixed step's chunks leave room for its decode rows padded to
their bucket) and the old one (room for the decodes themselves less two dummy rows, so that a step filling the
largest token bucket ran at its exact decode count: one graph key per count).

    python -m bench.offline_sim --stepcost \
        bench/tune_cache/stepcost-8c3881410172c3bf.json,bench/tune_cache/stepcost-f240af304a0111c7.json
"""
from __future__ import annotations

import argparse
import datetime
import platform
import sys

import bench.serving_sim as sim
from bench.throughput import make_requests
from spear_compile.serving.buckets import MIN_DIM
from spear_compile.serving.scheduler import make_policy


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stepcost", required=True, help="comma list of stepcost-*.json files of one engine (ECs on/off)")
    ap.add_argument("--capture-ms", default="0,18,30,56", help="comma list: a new mixed-step shape's one-off cost "
                    "(its uncaptured run and its capture; session 33's H100: bf16 about 18, W4 + EC 54-56)")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--token-buckets", default="16,32,64,128,256,512", help="bench/throughput.py's engine")
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--graph-padding", type=float, default=2.0, help="EngineConfig.mixed_graph_padding")
    ap.add_argument("--graph-bucket-padding", type=float, default=2.0, help="EngineConfig.mixed_graph_bucket_padding")
    ap.add_argument("--rules", default="padded,exact", help="scheduler rules to run: padded (the engine's), exact")
    args = ap.parse_args(argv)
    samples, layout, gpu = sim.load_profile(args.stepcost.split(","), args.max_num_seqs)
    layout = dict(layout, token_buckets=[int(x) for x in args.token_buckets.split(",")])
    aware, _ = sim.fit(samples, layout)
    truth = sim.TrueCost(aware, samples, 0)
    sig = sorted({s.signature for s in samples}, key=lambda s: s.total_rank)[-1]   # ECs on
    buckets = tuple(layout["token_buckets"])
    print(f"# Offline throughput with one-off capture costs, simulated ({gpu} step costs)\n\n{datetime.date.today()}, "
          f"{platform.machine()} CPU. Command: `python -m bench.offline_sim {' '.join(argv or sys.argv[1:])}`\n\n"
          f"{args.requests} requests (bench/throughput.py's, seeds 0 and 1), max_num_seqs {args.max_num_seqs}, "
          f"token buckets {buckets}, budget-{args.budget}, graph padding {args.graph_padding:g} (bucket "
          f"{args.graph_bucket_padding:g}).\n")
    print("| scheduler | capture ms | pass 1 tok/s | captures | pass 2 tok/s | captures |")
    print("|---|---|---|---|---|---|")
    for padded in [r == "padded" for r in args.rules.split(",")]:
        for capture_ms in [float(x) for x in args.capture_ms.split(",")]:
            run = argparse.Namespace(num_blocks=16384, block_size=layout["block_size"], max_num_seqs=args.max_num_seqs,
                                     max_num_tokens=buckets[-1] - (0 if padded else MIN_DIM), token_buckets=buckets,
                                     drain_s=1e9, host_ms=0.0,
                                     max_decode_rows=layout["decode_buckets"][-1] if padded else None)
            graphs = sim.GraphKeys(1024, capture_ms / 2e3, capture_ms / 2e3, layout, args.max_num_seqs,
                                   full_decode_tables=True, max_padding=args.graph_padding,
                                   bucket_padding=args.graph_bucket_padding, truth=truth)
            cells = []
            for seed in (0, 1):
                trace = [(0.0, p, o) for p, o in make_requests(args.requests, seed, 32000)]
                before = graphs.captures
                m = sim.simulate(make_policy(f"budget-{args.budget}"), trace, truth, sig, run, 1e9, 1e9, graphs)
                cells += [f"{m['output_tok_s']:.0f}", str(graphs.captures - before)]
            name = "padded decode rows (engine)" if padded else "exact decode rows (before session 33)"
            print(f"| {name} | {capture_ms:g} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
