"""Tensor-parallel decode bench and CUDA-graph replay check (issue 19). NOT YET RUN: it needs a multi-GPU
kind (nvidia-h200-x2 / -x4); no multi-GPU machine was lent when it was written, so expect to debug it on
the first call. ``docs/tensor_parallel.md`` lists the exact commands.

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 torchrun --nproc-per-node 2 bench/tp_decode_layer.py \
        --shape 13b --ms 1 16 --out $OUT/tp2_13b
    ... --check 1000        # replays of the peer-reduction model vs the fallback, fresh inputs each time
    torchrun --nproc-per-node 3 bench/tp_decode_layer.py --device cpu --shape tiny --layers 1 --check 3  # smoke

Models: a Llama with Llama-2-13B or -70B layer shapes, ``--layers`` decoder layers (default 4, so the
weights exceed the 50 MB L2 and each call streams them from HBM), vocabulary 256 (the LM head is
negligible), random weights, W4 g128 RTN; ECs rank 32, gated, on all 7 linears of each layer. Variants,
side by side: ``bf16`` (TP baseline), ``w4`` (no EC), ``ec-nccl`` (the functional all-reduce of u, NCCL),
``ec-symm`` (u through PyTorch's symmetric-memory one-shot all-reduce), ``ec-peer`` (the peer-reduction
epilogue). Each is compiled with the spear backend, mode="reduce-overhead" (CUDA graphs); a decode step is
one forward of ``[M, 1]`` tokens without a cache, timed with CUDA events over ``--iters`` calls, median;
per decoder layer = median / layers. Rank 0 prints the table and writes ``results.json`` to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# bench/kernels.py would shadow the `kernels` package transformers probes for; the repository root instead
sys.path = [str(HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != HERE]

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402

import spear_compile  # noqa: E402
from spear_compile import CompensatedLinear  # noqa: E402
from spear_compile.distributed import RowParallelCompensatedLinear, parallelize  # noqa: E402
from spear_compile.distributed.peer_reduce import MAX_M, enable_peer_reduce  # noqa: E402

SHAPES = {
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_attention_heads=40, num_key_value_heads=40),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8),
    "tiny": dict(hidden_size=512, intermediate_size=1536, num_attention_heads=8, num_key_value_heads=2),  # CPU smoke
}
VARIANTS = ("bf16", "w4", "ec-nccl", "ec-symm", "ec-peer")
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


class SymmOneShotRow(RowParallelCompensatedLinear):
    """The ec-symm variant: u all-reduced by ``symm_mem::one_shot_all_reduce_copy`` through a per-layer
    symmetric buffer (allocated and rendezvoused before capture)."""

    def compensation(self, x):
        u = torch.nn.functional.linear(x, self.ec_A)
        flat = u.reshape(-1, u.shape[-1])
        u = torch.ops.symm_mem.one_shot_all_reduce_copy(self._symm_u, flat.contiguous(), "sum",
                                                        self.tp_group).reshape(u.shape)  # (copies flat in)
        if self.gate == "sigmoid":
            u = u * (2.0 * torch.sigmoid(torch.nn.functional.linear(u, self.ec_gate_w, self.ec_gate_b)))
        return torch.nn.functional.linear(u, self.ec_B)


def use_symm_one_shot(model):
    import torch.distributed._symmetric_memory as symm_mem
    for mod in model.modules():
        if isinstance(mod, RowParallelCompensatedLinear):
            buf = symm_mem.empty(MAX_M, mod.rank, dtype=mod.ec_A.dtype, device=mod.ec_A.device)
            symm_mem.rendezvous(buf, mod.tp_group)
            mod.__class__ = SymmOneShotRow
            mod._symm_u = buf


def build(shape: str, variant: str, mesh, layers: int, ec_rank: int, device: str = "cuda"):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(**SHAPES[shape], num_hidden_layers=layers, vocab_size=256, head_dim=128,
                      max_position_embeddings=256, tie_word_embeddings=False)
    torch.manual_seed(0)  # the same weights on every rank and in every variant
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    if variant != "bf16":
        spear_compile.quantize(model, "w4-g128-rtn", progress=False)
    if variant.startswith("ec"):
        g = torch.Generator(device=device).manual_seed(1)
        for layer in model.model.layers:
            for path in LINEARS:
                owner_path, _, leaf = path.rpartition(".")
                owner = layer.get_submodule(owner_path)
                ec = CompensatedLinear.wrap(getattr(owner, leaf), ec_rank, "sigmoid")
                with torch.no_grad():
                    for p in ec.ec_parameters():
                        p.copy_(torch.randn(p.shape, generator=g, device=device, dtype=p.dtype) * 0.02)
                setattr(owner, leaf, ec)
    parallelize(model, mesh)
    if variant == "ec-peer":
        enable_peer_reduce(model)
    elif variant == "ec-symm":
        use_symm_one_shot(model)
    if device == "cpu":  # smoke run: eager (no CUDA graphs, no Triton kernels on CPU)
        return model
    # static shapes: with automatic dynamic shapes the second M would compile with a symbolic M, which the
    # peer-reduction pass (static M <= 16) leaves on the all-reduce fallback
    return spear_compile.optimize(model, quant=None, mode="reduce-overhead", dynamic=False, skip_module_guards=True)


@torch.no_grad()
def time_decode(model, m: int, iters: int, device: str = "cuda") -> float:
    ids = torch.randint(0, 256, (m, 1), device=device)
    for _ in range(5):
        model(ids, use_cache=False)
    if device == "cpu":
        return float("nan")  # smoke run: nothing to time
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        model(ids, use_cache=False)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


@torch.no_grad()
def replay_check(shape, mesh, layers, ec_rank, m, replays, device="cuda"):
    """Peer-reduction model vs the fallback, both under CUDA graphs, fresh inputs each replay (CPU smoke: the
    fallback against itself)."""
    fallback = build(shape, "ec-nccl", mesh, layers, ec_rank, device)
    peer = build(shape, "ec-peer" if device == "cuda" else "ec-nccl", mesh, layers, ec_rank, device)
    worst, stale, prev = 0.0, 0, None
    for i in range(replays):
        g = torch.Generator(device=device).manual_seed(1000 + i)  # the same tokens on every rank
        ids = torch.randint(0, 256, (m, 1), device=device, generator=g)
        a = fallback(ids, use_cache=False).logits.float()
        b = peer(ids, use_cache=False).logits.float()
        worst = max(worst, ((a - b).norm() / a.norm()).item())
        if prev is not None and torch.equal(prev, b):
            stale += 1
        prev = b.clone()
    return dict(replays=replays, m=m, worst_rel_err=worst, unchanged_outputs=stale)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=sorted(SHAPES), default="13b")
    ap.add_argument("--ms", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--ec-rank", type=int, default=32)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--check", type=int, default=0, help="replays for the peer-vs-fallback check (0: skip)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--device", default="cuda", help="cpu: a gloo smoke run of the code paths (no timing)")
    args = ap.parse_args()
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    mesh = init_device_mesh(args.device, (int(os.environ["WORLD_SIZE"]),))
    rank, world = mesh.get_local_rank(), mesh.size()
    rows, res = [], dict(shape=args.shape, world=world, layers=args.layers, torch=torch.__version__,
                         gpu=torch.cuda.get_device_name() if args.device == "cuda" else "cpu")
    for variant in args.variants:
        if args.device == "cpu" and variant in ("ec-symm", "ec-peer"):
            continue  # symmetric memory: CUDA only
        model = build(args.shape, variant, mesh, args.layers, args.ec_rank, args.device)
        for m in args.ms:
            us = time_decode(model, m, args.iters, args.device)
            rows.append(dict(variant=variant, m=m, step_us=us, layer_us=us / args.layers))
            if rank == 0:  # as measured: a later variant that fails still leaves these in the log
                print(json.dumps(rows[-1]), flush=True)
        del model
        if args.device == "cuda":
            torch.cuda.empty_cache()
    res["rows"] = rows
    if args.check:
        res["check"] = [replay_check(args.shape, mesh, args.layers, args.ec_rank, m, args.check, args.device)
                        for m in args.ms]
    if rank == 0:
        base = {r["m"]: r["layer_us"] for r in rows if r["variant"] == "w4"}
        nccl = {r["m"]: r["layer_us"] for r in rows if r["variant"] == "ec-nccl"}
        print(f"{args.shape} TP={world} ({res['gpu']}, torch {res['torch']}), per decoder layer:")
        print(f"{'variant':10} {'M':>3} {'us/layer':>9} {'vs w4':>7} {'vs ec-nccl':>10}")
        for r in rows:
            vs_w4 = r["layer_us"] / base[r["m"]] if r["m"] in base else float("nan")
            vs_nccl = nccl[r["m"]] / r["layer_us"] if r["m"] in nccl else float("nan")
            print(f"{r['variant']:10} {r['m']:>3} {r['layer_us']:9.1f} {vs_w4:7.3f} {vs_nccl:10.2f}x")
        for c in res.get("check", []):
            print(f"replay check M={c['m']}: {c['replays']} replays, worst rel err {c['worst_rel_err']:.2e}, "
                  f"unchanged outputs {c['unchanged_outputs']}")
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "results.json").write_text(json.dumps(res, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
