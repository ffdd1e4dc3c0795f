"""One rank of the tensor-parallel CPU checks (``tests/distributed/test_tp_distributed.py`` launches it with torchrun on gloo).

Writes ``<out>/rank<r>.json`` with what it measured; the test asserts on those. Every rank builds the same
full model and layers from the same seeds, so the single-process reference is computed in each rank
before it is parallelized.
"""
from __future__ import annotations

import argparse
import json
import os
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed import _functional_collectives as funcol
from torch.distributed.device_mesh import init_device_mesh

import spear_compile
from spear_compile import CompensatedLinear, QuantizedWeight, SpearError
from spear_compile.distributed import load_sharded, parallelize, save_sharded
from spear_compile.distributed.layers import make_row_parallel
from spear_compile.distributed.sharding import shard_column_, shard_row_, split_range

MODEL = Path(spear_compile.__file__).parent / "assets" / "spear-ref-16m"
EC_MODULES = {  # module: (rank, gate)
    "model.layers.0.self_attn.q_proj": (8, "sigmoid"), "model.layers.0.self_attn.k_proj": (8, "sigmoid"),
    "model.layers.0.self_attn.o_proj": (8, "sigmoid"), "model.layers.1.mlp.gate_proj": (8, "none"),
    "model.layers.1.mlp.down_proj": (8, "sigmoid"), "model.layers.2.self_attn.v_proj": (4, "sigmoid"),
    "model.layers.2.mlp.up_proj": (8, "sigmoid"), "model.layers.4.self_attn.o_proj": (8, "none"),
    "model.layers.6.mlp.down_proj": (16, "sigmoid"),
}
NEW_TOKENS = 10


def gather_columns(y: torch.Tensor, sizes: list, group) -> torch.Tensor:
    """Concatenate each rank's output columns (uneven widths: padded to the widest, then trimmed)."""
    width = max(sizes)
    padded = F.pad(y, (0, width - y.shape[-1])).contiguous()
    full = funcol.all_gather_tensor(padded, 0, group)
    if isinstance(full, funcol.AsyncCollectiveTensor):
        full = full.wait()
    parts = full.reshape(len(sizes), *y.shape[:-1], width)
    return torch.cat([parts[r, ..., :s] for r, s in enumerate(sizes)], -1)


def random_ec_layer(n, k, group_size, rank, gate, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(k, n, bias=False)
    w = torch.randn(n, k, generator=g) / k ** 0.5
    lin.weight = torch.nn.Parameter(QuantizedWeight.from_float(w.to(dtype), 4, group_size), requires_grad=False)
    mod = CompensatedLinear.wrap(lin, rank, gate, dtype=dtype)
    with torch.no_grad():
        for p in mod.ec_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return mod


def reference64(mod, x):
    x = x.double()
    u = x @ mod.ec_A.double().T
    if mod.gate == "sigmoid":
        u = u * 2 * torch.sigmoid(u @ mod.ec_gate_w.double().T + mod.ec_gate_b.double())
    return x @ mod.weight.dequantize(torch.float64).T + u @ mod.ec_B.double().T


def layer_checks(rank, world, group, device, seed=1234):
    """Random W4 + EC shapes (uneven at TP = 3), column- and row-parallel, bf16, vs the unsharded layer."""
    out = []
    gen = torch.Generator().manual_seed(seed)
    for case in range(4):
        n = 64 * int(torch.randint(3, 9, (), generator=gen))
        k = 64 * int(torch.randint(3, 9, (), generator=gen))
        group_size = [None, 32, 64, 128][case]
        if group_size:  # a multiple of the group, with a group per rank at least (5 over 3 ranks: uneven)
            k = group_size * max(5, -(-k // group_size))
        gate = ("sigmoid", "none")[case % 2]
        m = int(torch.randint(1, 6, (), generator=gen))
        full = random_ec_layer(n, k, group_size or k, 8, gate, seed + case, torch.bfloat16).to(device)
        x = torch.randn(m, k, generator=gen).to(device, torch.bfloat16)
        ref = reference64(full, x)
        y_full = full(x).double()
        for style in ("column", "row"):
            mod = random_ec_layer(n, k, group_size or k, 8, gate, seed + case, torch.bfloat16).to(device)
            if style == "column":
                a, b = split_range(n, 64, rank, world)
                shard_column_(mod, torch.arange(a, b, device=device))
                sizes = [split_range(n, 64, r, world)[1] - split_range(n, 64, r, world)[0] for r in range(world)]
                y = gather_columns(mod(x), sizes, group).double()
                local = b - a
            else:
                unit = group_size or 64
                k0, k1 = split_range(k, unit, rank, world)
                shard_row_(mod, k0, k1)
                make_row_parallel(mod, group, rank, world)
                y = mod(x[:, k0:k1]).double()
                local = k1 - k0
                # what the check must catch: the EC term added on every rank before the y reduction
                doubled = y + (world - 1) * mod.compensation(x[:, k0:k1]).double()
            scale = ref.abs().max().item()
            extra = {"err_ec_added_per_rank": (doubled - ref).abs().max().item() / scale} if style == "row" else {}
            out.append(dict(**extra, case=case, style=style, n=n, k=k, m=m, group_size=group_size, gate=gate, local=local,
                            err_tp_vs_unsharded=(y - y_full).abs().max().item() / scale,
                            err_tp_vs_fp64=(y - ref).abs().max().item() / scale,
                            err_unsharded_vs_fp64=(y_full - ref).abs().max().item() / scale))
    return out


def load_model(dtype, device):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(MODEL), dtype=dtype).eval().to(device)


def quantize_with_ecs(model, seed=7):
    spear_compile.quantize(model, "w4-pc-rtn", progress=False)
    g = torch.Generator().manual_seed(seed)
    for name, (r, gate) in EC_MODULES.items():
        parent, _, leaf = name.rpartition(".")
        owner = model.get_submodule(parent)
        ec = CompensatedLinear.wrap(getattr(owner, leaf), r, gate)
        with torch.no_grad():
            k, n = ec.in_features, ec.out_features
            ec.ec_A.copy_(torch.randn(r, k, generator=g) / k ** 0.5)
            ec.ec_B.copy_(torch.randn(n, r, generator=g) * 0.05)
            if gate == "sigmoid":
                ec.ec_gate_w.copy_(torch.randn(r, r, generator=g) * 0.3)
                ec.ec_gate_b.copy_(torch.randn(r, generator=g) * 0.3)
        setattr(owner, leaf, ec)
    return model


@torch.no_grad()
def greedy(model, ids, **kw):
    out = model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                         pad_token_id=0, **kw)
    return out[0, ids.shape[1]:].tolist()


@torch.no_grad()
def logits(model, ids):
    return model(ids, use_cache=False).logits.float()


def prompt_ids(n=24):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(MODEL))
    text = (MODEL.parent / "calib.txt").read_text()[:400]
    return tok(text, return_tensors="pt").input_ids[:, :n]


def expect_refusal(fn, pattern):
    try:
        fn()
    except SpearError as e:
        return pattern.lower() in str(e).lower(), str(e)
    return False, "not refused"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--foreign-ckpt", default=None, help="shards of another TP size: loading them must be refused")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (nccl, one GPU per rank)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        device = torch.device("cuda", torch.cuda.current_device())
    mesh = init_device_mesh(device.type, (int(os.environ["WORLD_SIZE"]),))
    rank, world, group = mesh.get_local_rank(), mesh.size(), mesh.get_group().group_name
    res = dict(rank=rank, world=world, times={})
    try:
        t = time.time()
        res["layers"] = layer_checks(rank, world, group, device)
        res["times"]["layers"] = time.time() - t

        t = time.time()
        ids = prompt_ids().to(device)
        base = load_model(torch.float32, device)
        spear_compile.quantize(base, "w4-pc-rtn", progress=False)
        base_logits = logits(base, ids)
        del base
        model = quantize_with_ecs(load_model(torch.float32, device))
        ref_tokens, ref_logits = greedy(model, ids), logits(model, ids)
        res["ec_effect"] = (ref_logits - base_logits).abs().max().item()
        parallelize(model, mesh)
        tp_tokens, tp_logits = greedy(model, ids), logits(model, ids)
        static_tokens = greedy(model, ids, cache_implementation="static")  # sized from the local head counts
        from spear_compile.distributed import describe
        res["describe"] = [r for r in describe(model) if r["ec_rank"]]
        res.update(ref_tokens=ref_tokens, tp_tokens=tp_tokens, static_cache_tokens=static_tokens,
                   logits_err=(tp_logits - ref_logits).abs().max().item(),
                   local_heads=[model.config.num_attention_heads, model.config.num_key_value_heads],
                   local_mlp=model.config.intermediate_size)
        res["times"]["model"] = time.time() - t

        t = time.time()
        save_sharded(model, args.ckpt, "w4-pc-rtn")
        dist.barrier()
        fresh = load_sharded(load_model(torch.float32, device), args.ckpt, mesh)
        res["loaded_tokens"] = greedy(fresh, ids)
        res["loaded_logits_equal"] = bool(torch.equal(logits(fresh, ids), tp_logits))
        other = Path(args.ckpt) / f"tp{world}-rank{(rank + 1) % world}.safetensors"
        res["refuse_rank"] = expect_refusal(lambda: load_sharded(load_model(torch.float32, device), other, mesh), "rank")
        own = Path(args.ckpt) / f"tp{world}-rank{rank}.safetensors"
        damaged = own.with_name(f"damaged-rank{rank}.safetensors")
        raw = bytearray(own.read_bytes())
        raw[-5] ^= 0xFF  # a byte of the last tensor's data
        damaged.write_bytes(bytes(raw))
        untouched = load_model(torch.float32, device)
        res["refuse_corrupt"] = expect_refusal(lambda: load_sharded(untouched, damaged, mesh), "corrupt")
        res["corrupt_left_model_whole"] = untouched.model.layers[0].mlp.down_proj.in_features == 1024
        if args.foreign_ckpt:
            res["refuse_tp_size_dir"] = expect_refusal(
                lambda: load_sharded(load_model(torch.float32, device), args.foreign_ckpt, mesh), "TP=")
            foreign = sorted(Path(args.foreign_ckpt).glob("tp*-rank0.safetensors"))[0]
            res["refuse_tp_size_file"] = expect_refusal(
                lambda: load_sharded(load_model(torch.float32, device), foreign, mesh), "written for TP=")
        res["times"]["checkpoint"] = time.time() - t

        if args.compile:  # on the first 2 decoder layers (Inductor's CPU compile time grows with the graph)
            t = time.time()
            fresh.model.layers = fresh.model.layers[:2]
            fresh.config.num_hidden_layers = 2
            eager = logits(fresh, ids)
            spear_compile.optimize(fresh, quant=None)   # unwrap + torch.compile(backend="spear")
            records = fresh.spear_records               # what this compile's passes matched
            with torch._inductor.config.patch(fx_graph_cache=False), \
                    torch._functorch.config.patch(enable_autograd_cache=False):  # the pass runs (and records)
                compiled = logits(fresh, ids)
            res["compiled_logits_err"] = (compiled - eager).abs().max().item()
            res["compiled_argmax_equal"] = bool(torch.equal(compiled.argmax(-1), eager.argmax(-1)))
            res["compiled_fused"] = sum(r.matched for r in records.matches)
            res["compiled_unfused"] = sum(not r.matched for r in records.matches)
            res["times"]["compile"] = time.time() - t
    except Exception:  # noqa: BLE001  (reported to the test, which fails on it)
        res["error"] = traceback.format_exc()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"rank{rank}.json").write_text(json.dumps(res, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
