"""Which EC-bearing linears the spear pass fused, and why not where it did not, on this device.

Session 15 saw the GPU test's 2-layer Llama-3.2-1B-shape model (bf16, gated r = 32 ECs) leave all three of its EC
linears unfused on an H100 ("plain: feeds an add with a low-rank branch ... that matches no EC pattern") while the same
model on CPU fuses them. This compiles that model through the engine's decode / mixed graphs and through a plain
``torch.compile(model, backend="spear")``, per dtype, and prints each EC linear's match record and, where unmatched,
the post-grad nodes between its qlinear and the add that should have closed the EC pattern.

    python -m bench.ec_fusion_probe [--device cuda] [--dtypes bfloat16,float32] [--paths module,engine]
"""
import argparse
import json
import sys

import torch


EC_MODULES = ("layers.0.self_attn.q_proj", "layers.1.mlp.down_proj", "layers.1.self_attn.o_proj")


def build(device, dtype, rank):
    import spear_compile
    from transformers import LlamaConfig, LlamaForCausalLM
    sys.path.insert(0, "tests/serving")
    from conftest import attach_ecs
    cfg = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=2, num_attention_heads=32,
                      num_key_value_heads=8, head_dim=64, vocab_size=8192, max_position_embeddings=512)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    spear_compile.quantize(model, "w4-pc-rtn", progress=False)
    attach_ecs(model, tuple("model." + m for m in EC_MODULES), rank=rank, std=0.02)
    return model.to(device)


def neighbourhood(q, depth=6):
    """The post-grad nodes on paths from the qlinear's users back towards its input, as text."""
    lines, seen, frontier = [], set(), list(q.users)
    for _ in range(depth):
        nxt = []
        for n in frontier:
            if n in seen:
                continue
            seen.add(n)
            v = n.meta.get("val")
            shape = f"{tuple(v.shape)} {v.dtype}" if isinstance(v, torch.Tensor) else ""
            lines.append(f"    {n.format_node()}  # {shape}")
            nxt += [a for a in n.all_input_nodes if a is not q.args[0]]
        frontier = nxt
    return lines


def probe(path, device, dtype, rank):
    from spear_compile.compile.records import recording
    model = build(device, dtype, rank)
    # a graph served from Inductor's FX graph cache runs no pass (and records nothing): compile afresh
    with recording() as rec, torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False):
        if path == "module":
            ids = torch.randint(3, 8000, (2, 5), device=device)
            torch.compile(model, backend="spear", dynamic=False)(ids)
        else:
            from spear_compile.serving import Engine, EngineConfig
            Engine(model, None, EngineConfig(device=device, dtype=dtype, max_num_seqs=4, max_num_tokens=32,
                                             token_buckets=(32,), max_model_len=128, num_blocks=64,
                                             compile=True, cuda_graphs=False, progress=False, detokenize=False))
    ec_recs = [r for r in rec.matches if r.module and r.module.endswith(EC_MODULES)]
    out = {"path": path, "dtype": str(dtype).replace("torch.", ""), "rank": rank, "qlinears": len(rec.matches),
           "records": [(r.graph, r.module, r.matched, r.kind, r.reason) for r in ec_recs]}
    print(json.dumps(out))
    for r in ec_recs:
        if not r.kind.startswith("ec"):
            print(f"  unmatched {r.module} (graph {r.graph}): {r.reason}")
            q = r.extra.get("node")
            if q is not None:
                print("\n".join(neighbourhood(q)))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--paths", default="module,engine")
    ap.add_argument("--rank", type=int, default=32)
    args = ap.parse_args(argv)
    for path in args.paths.split(","):
        for dt in args.dtypes.split(","):
            try:
                probe(path, args.device, getattr(torch, dt), args.rank)
            except Exception as e:  # noqa: BLE001  (one failing combination keeps the others)
                print(json.dumps({"path": path, "dtype": dt, "error": f"{type(e).__name__}: {e}"}))


if __name__ == "__main__":
    main()
