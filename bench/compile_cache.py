"""What a warm compile cache saves at engine start-up (why device calls carry Inductor's cache: GPU_RUNS.md).

Starts the same compiled engine (a 2-layer toy Llama, W4 + one gated EC, the ``spear`` backend through the CPU
Inductor, stand-in decode graphs) in two fresh processes sharing one empty ``TORCHINDUCTOR_CACHE_DIR`` /
``TRITON_CACHE_DIR``: the first compiles cold, the second reads the FX graph cache.

    python -m bench.compile_cache [--out DIR]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import json, time, torch
from tests.serving.conftest import make_engine, toy_model
from torch._dynamo.utils import counters
t0 = time.perf_counter()
make_engine(toy_model(ecs=True), compile=True, cuda_graphs=True, cuda_graphs_stand_in=True, max_num_seqs=4,
            max_num_tokens=32)
print(json.dumps(dict(startup_s=round(time.perf_counter() - t0, 1), hits=counters["inductor"]["fxgraph_cache_hit"],
                      misses=counters["inductor"]["fxgraph_cache_miss"])))
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="write compile_cache.json here")
    args = ap.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=os.path.join(cache, "inductor"),
                   TRITON_CACHE_DIR=os.path.join(cache, "triton"), PYTHONPATH=root)
        for run in ("cold", "warm"):
            res = subprocess.run([sys.executable, "-c", CHILD], env=env, cwd=root, capture_output=True, text=True,
                                 check=True)
            rows.append(dict(run=run, **json.loads(res.stdout.strip().splitlines()[-1])))
            print(json.dumps(rows[-1]), flush=True)
    import torch
    info = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                torch=torch.__version__, device="cpu", command="python -m bench.compile_cache", rows=rows)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "compile_cache.json"), "w") as fh:
            json.dump(info, fh, indent=1)


if __name__ == "__main__":
    main()
