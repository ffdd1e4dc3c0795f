"""One rank of the tensor-parallel serving check (``test_tp_serving.py`` runs it under torchrun, gloo, CPU).

Every rank calls ``start_engine`` (the EC directory and the prompts come from the test); rank 0 gets the engine and
writes ``<out>/rank0.json``: greedy tokens per request (ECs on), the same with ECs switched off mid-run, and the
engine's counters; the other ranks serve its steps and write ``<out>/rank<r>.json`` when released.

On GPUs (``--device cuda``: compiled, CUDA graphs, bf16, NCCL; ``--decode-rate``: decode tokens/s at batch 1 and 16
as well), e.g. ``torchrun --nproc-per-node 2 tests/distributed/tp_engine_worker.py --device cuda --decode-rate ...``;
``--nproc-per-node 1`` gives the single-GPU reference of the same command (``bench/GPU_RUNS.md`` #8).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
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
                max_model_len=128, ec_switch=True)
    base.update(kw)
    return EngineConfig(**base)


SHAPES = {  # Llama-2-13B / -70B decoder layers (random weights); fewer layers than the real models
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_attention_heads=40, num_key_value_heads=40, head_dim=128),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8, head_dim=128),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64),
}
DEFAULT_PROMPT_LENGTHS = (5, 23, 40, 9, 17)


def synthetic_checkpoint(shape: str, layers: int, out: Path, device: str, dtype: torch.dtype, ec_fraction: float = 0.1):
    """Rank 0: a random-weight Llama-2 ``shape`` checkpoint of ``layers`` layers under ``out`` (spear-ref-16m's
    tokenizer beside it: prompts are token ids, nothing is detokenized) and gated r=32 ECs on ``ec_fraction`` of
    its linears for its w4-pc-rtn weights. Returns (model dir, EC dir)."""
    import random
    import shutil

    import spear_compile
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
    from spear_compile.ec.io import model_identity, save_ecs
    from spear_compile.ec.module import CompensatedLinear
    from spear_compile.quant.config import QuantConfig
    model_dir, ec_dir = out / f"synthetic-{shape}-{layers}l", out / f"synthetic-{shape}-{layers}l-ecs"
    cfg = LlamaConfig(**SHAPES[shape], num_hidden_layers=layers, vocab_size=32000, max_position_embeddings=4096,
                      bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    with torch.device(device):
        LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(model_dir)
    ref = Path(spear_compile.__file__).parent / "assets" / "spear-ref-16m"
    for f in ref.iterdir():
        if "token" in f.name:
            shutil.copy(f, model_dir / f.name)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)   # as the engine will load it
    spear_compile.quantize(model, "w4-pc-rtn", progress=False)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")]
    gen = torch.Generator().manual_seed(2)
    for name in sorted(random.Random(2).sample(names, max(1, round(ec_fraction * len(names))))):
        parent, attr = name.rsplit(".", 1)
        par = model.get_submodule(parent)
        ec = CompensatedLinear.wrap(getattr(par, attr), 32, gate="sigmoid")
        for p in ec.ec_parameters():
            p.data = (torch.randn(p.shape, generator=gen) * 0.02).to(p.device, p.dtype)
        setattr(par, attr, ec)
    save_ecs(model, ec_dir, {"quant": QuantConfig.from_spec("w4-pc-rtn").to_dict(), "base_model": model_identity(model)})
    return model_dir, ec_dir


def decode_rate(engine, batch: int, new: int = 128) -> float:
    """Decode tokens/s of ``batch`` requests (prompt 32) decoding together, wall clock over decode-only steps."""
    for i in range(batch):
        engine.add_request([10 + (7 * i + j) % 900 for j in range(32)],
                           SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True))
    while engine.has_unfinished():   # until every request decodes
        engine.step()
        if engine.scheduler.running and all(r.num_tokens_to_compute == 1 for r in engine.scheduler.running) \
                and not engine.scheduler.waiting:
            break
    t0, tokens = time.perf_counter(), 0
    while engine.has_unfinished():
        tokens += sum(len(o.new_token_ids) for o in engine.step())
    return tokens / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="a Hugging Face model directory")
    ap.add_argument("--synthetic", choices=sorted(SHAPES), help="in place of --model: a random-weight checkpoint of "
                    "this shape (and its ECs: --ec is set) written under --out by rank 0")
    ap.add_argument("--layers", type=int, default=4, help="--synthetic: decoder layers")
    ap.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "spear_synthetic"),
                    help="--synthetic: where rank 0 writes the checkpoint (not under --out: it is gigabytes)")
    ap.add_argument("--ec", default=None)
    ap.add_argument("--prompts", default=None, help="a JSON file: a list of token-id lists (default: 5 seeded)")
    ap.add_argument("--new", type=int, default=12)
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--quant", default="w4-pc-rtn", help="quant spec, or none (the bf16 TP baseline)")
    ap.add_argument("--decode-rate", action="store_true", help="also decode tokens/s at batch 1 and 16")
    ap.add_argument("--inject-failure", action="store_true",
                    help="rank 0's first decode forward raises after the step went to the other ranks")
    args = ap.parse_args()
    quant = None if args.quant == "none" else args.quant
    config = engine_config() if args.device == "cpu" else engine_config(
        device="cuda", compile=True, cuda_graphs=True, cuda_graphs_stand_in=False, dtype=torch.bfloat16,
        max_num_seqs=16, num_blocks=None, max_model_len=512)
    if args.synthetic:
        config = dataclasses.replace(config, detokenize=False)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rank = None
    try:
        model_path, ec_dir = args.model, args.ec
        if args.synthetic:   # rank 0 writes it; the others wait (the process group is up first)
            from spear_compile.serving.tensor_parallel import _init_distributed
            rank, _, device = _init_distributed(args.device)
            work = Path(args.work_dir) / str(config.dtype).replace("torch.", "")
            model_path, ec_dir = work / f"synthetic-{args.synthetic}-{args.layers}l", None
            done = work / f".done-{args.synthetic}-{args.layers}l"   # a later run (other TP size) reuses it
            if rank == 0 and not done.exists():
                work.mkdir(parents=True, exist_ok=True)
                synthetic_checkpoint(args.synthetic, args.layers, work, str(device), config.dtype)
                done.touch()
            torch.distributed.barrier()
            if quant is not None:
                ec_dir = work / f"synthetic-{args.synthetic}-{args.layers}l-ecs"
        elif model_path is None:
            raise SystemExit("tp_engine_worker: --model or --synthetic")
        engine = start_engine(str(model_path), quant, str(ec_dir) if ec_dir else None, config)
        rank = torch.distributed.get_rank()
        if engine is None:
            (out / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "done": True}))
            return
        if args.inject_failure:
            def broken(*a, **k):
                raise RuntimeError("injected forward failure")
            engine.runner.run_decode = broken
        if args.prompts:
            prompts = json.loads(Path(args.prompts).read_text())
        else:
            g = torch.Generator().manual_seed(0)
            prompts = [torch.randint(3, 8000, (n,), generator=g).tolist() for n in DEFAULT_PROMPT_LENGTHS]
        greedy = SamplingParams(max_tokens=args.new, temperature=0.0, ignore_eos=True)
        with_ec = [o.output_token_ids for o in engine.generate(prompts, greedy)]
        if engine.runner.net.has_ecs:
            engine.set_ec_enabled(False)
        without_ec = [o.output_token_ids for o in engine.generate(prompts, greedy)]
        st = engine.stats()
        result = {"rank": 0, "with_ec": with_ec, "without_ec": without_ec, "steps": engine.num_steps,
                  "blocks_free": engine.blocks.num_free_blocks == engine.blocks.num_usable_blocks,
                  "graphs": len(engine.runner.graphs), "num_blocks": engine.runner.num_blocks,
                  "local_heads": engine.runner.net.num_heads, "local_kv_heads": engine.runner.net.num_kv_heads,
                  "recompiles": st.recompiles, "world": torch.distributed.get_world_size()}
        if args.decode_rate:
            engine.set_ec_enabled(engine.runner.net.has_ecs)
            result["decode_tok_per_s"] = {b: round(decode_rate(engine, b), 1) for b in (1, 16)}
        engine.close()
        (out / "rank0.json").write_text(json.dumps(result))
    except Exception:  # noqa: BLE001
        (out / f"rank{rank if rank is not None else 'X'}.json").write_text(json.dumps({"error": traceback.format_exc()}))
        raise


if __name__ == "__main__":
    main()
