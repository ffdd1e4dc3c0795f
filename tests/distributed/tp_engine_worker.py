"""One rank of the tensor-parallel serving check (``test_tp_serving.py`` runs it under torchrun, gloo, CPU).

Every rank calls ``start_engine`` (the EC directory and the prompts come from the test); rank 0 gets the engine and
writes ``<out>/tokens.json``: greedy tokens per request (ECs on), the same with ECs switched off mid-run, and the
engine's counters; the other ranks serve its steps and write ``<out>/rank<r>.json`` with how many they ran.
"""
from __future__ import annotations

import argparse
import json
import traceback
from pathlib import Path

import torch

from spear_compile.serving import EngineConfig, SamplingParams
from spear_compile.serving.tensor_parallel import start_engine


def engine_config(**kw) -> EngineConfig:
    """The test's engine: eager on CPU, float32, decode "graphs" as stand-ins (static buffers re-run), 32-token
    prefill chunks (so a 40-token prompt is chunked alongside running decodes)."""
    base = dict(compile=False, cuda_graphs=True, cuda_graphs_stand_in=True, device="cpu", dtype=torch.float32,
                max_num_seqs=4, max_num_tokens=64, num_blocks=96, block_size=8, policy="budget-32", progress=False,
                max_model_len=128)
    base.update(kw)
    return EngineConfig(**base)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--ec", default=None)
    ap.add_argument("--prompts", required=True, help="a JSON file: a list of token-id lists")
    ap.add_argument("--new", type=int, default=12)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else None
    try:
        engine = start_engine(args.model, "w4-pc-rtn", args.ec, engine_config())
        rank = torch.distributed.get_rank()
        if engine is None:
            (out / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "done": True}))
            return
        prompts = json.loads(Path(args.prompts).read_text())
        greedy = SamplingParams(max_tokens=args.new, temperature=0.0, ignore_eos=True)
        with_ec = [o.output_token_ids for o in engine.generate(prompts, greedy)]
        if engine.runner.net.has_ecs:
            engine.set_ec_enabled(False)
        without_ec = [o.output_token_ids for o in engine.generate(prompts, greedy)]
        st = engine.stats()
        result = {"rank": 0, "with_ec": with_ec, "without_ec": without_ec, "steps": engine.num_steps,
                  "blocks_free": engine.blocks.num_free_blocks == engine.blocks.num_usable_blocks,
                  "graphs": len(engine.runner.graphs), "num_blocks": engine.runner.num_blocks,
                  "local_heads": engine.runner.net.num_heads, "local_kv_heads": engine.runner.net.num_kv_heads}
        engine.close()
        (out / "rank0.json").write_text(json.dumps(result))
    except Exception:  # noqa: BLE001
        (out / f"rank{rank if rank is not None else 'X'}.json").write_text(json.dumps({"error": traceback.format_exc()}))
        raise


if __name__ == "__main__":
    main()
