"""Tensor-parallel shard math in one process (no process group): split sizes, head assignment, and a
simulated TP forward of a W4 + EC linear (column: outputs concatenated; row: partial y and u summed,
then gate, B, add once) against a float64 dequantize-then-matmul reference of the unsharded layer."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from spear_compile import CompensatedLinear, QuantizedWeight, SpearError
from spear_compile.distributed.sharding import (
    head_shard, shard_column_, shard_row_, slice_columns, split_counts, split_range,
)


@pytest.mark.parametrize("units,world", [(16, 3), (6, 3), (40, 3), (7, 4), (2, 2), (224, 3)])
def test_split_counts_differ_by_at_most_one(units, world):
    counts = split_counts(units, world)
    assert sum(counts) == units and max(counts) - min(counts) <= 1 and len(counts) == world
    ranges = [split_range(units * 64, 64, r, world) for r in range(world)]
    assert ranges[0][0] == 0 and ranges[-1][1] == units * 64
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))


def test_split_refuses_too_few_units():
    with pytest.raises(SpearError, match="fewer than the 4 ranks"):
        split_counts(3, 4, "KV heads")


@pytest.mark.parametrize("heads,kv,world", [(6, 2, 2), (6, 2, 3), (6, 2, 4), (40, 40, 3), (64, 8, 3), (32, 8, 4),
                                           (10, 2, 3), (12, 4, 3), (6, 6, 4), (8, 1, 3)])
def test_head_shard_covers_heads_and_maps_each_query_head_to_its_kv_head(heads, kv, world):
    group = heads // kv
    shards = [head_shard(heads, kv, r, world) for r in range(world)]
    assert [s.q0 for s in shards] == [0] + [s.q1 for s in shards[:-1]] and shards[-1].q1 == heads
    sizes = [s.num_heads for s in shards]
    unit = group if kv >= world else 1
    assert max(sizes) - min(sizes) <= unit
    for s in shards:
        assert s.num_heads % s.num_kv_heads == 0
        for local, q in enumerate(range(s.q0, s.q1)):  # HF repeat_kv: local query head i reads KV head i // groups
            assert s.kv_heads[local // s.kv_groups] == q // group


def _random_layer(n, k, group_size, rank, gate, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) / k ** 0.5
    lin = torch.nn.Linear(k, n, bias=False)
    lin.weight = torch.nn.Parameter(QuantizedWeight.from_float(w.to(dtype), 4, group_size), requires_grad=False)
    mod = CompensatedLinear.wrap(lin, rank, gate)
    with torch.no_grad():
        for p in mod.ec_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return mod


def _reference(mod, x):
    """float64 dequantize-then-matmul of the unsharded layer."""
    x = x.double()
    y = x @ mod.weight.dequantize(torch.float64).T
    u = x @ mod.ec_A.double().T
    if mod.gate == "sigmoid":
        u = u * 2 * torch.sigmoid(u @ mod.ec_gate_w.double().T + mod.ec_gate_b.double())
    return y + u @ mod.ec_B.double().T


def _copy(mod):
    new = CompensatedLinear.__new__(CompensatedLinear)
    torch.nn.Module.__init__(new)
    new.in_features, new.out_features, new.rank, new.gate = mod.in_features, mod.out_features, mod.rank, mod.gate
    new.weight, new.bias = mod.weight, None
    for name in ("ec_A", "ec_B", "ec_gate_w", "ec_gate_b"):
        setattr(new, name, getattr(mod, name))
    return new


CASES = list(itertools.product([2, 3], [None, 32, 64], ["sigmoid", "none"]))


@pytest.mark.parametrize("world,group_size,gate", CASES)
def test_simulated_tp_layer_matches_unsharded(world, group_size, gate):
    torch.manual_seed(world * 7 + (group_size or 0))
    n = 64 * int(torch.randint(3, 7, ()))        # 192..384 rows: uneven over 3 ranks in 64-row units
    k = 64 * int(torch.randint(3, 7, ()))
    mod = _random_layer(n, k, group_size or k, 8, gate, seed=n + k)
    x = torch.randn(5, k)
    ref = _reference(mod, x)
    full = mod(x).double()
    tol = dict(rtol=0, atol=1e-4 * ref.abs().max().item())
    torch.testing.assert_close(full, ref, **tol)

    # column-parallel: each rank's rows, concatenated
    cols = []
    for r in range(world):
        a, b = split_range(n, 64, r, world)
        cols.append(shard_column_(_copy(mod), torch.arange(a, b))(x))
    torch.testing.assert_close(torch.cat(cols, -1).double(), ref, **tol)

    # row-parallel: partial y and partial u summed over ranks, then gate and B once
    unit = group_size or 64
    ys, us, shards = [], [], []
    for r in range(world):
        k0, k1 = split_range(k, unit, r, world)
        s = shard_row_(_copy(mod), k0, k1)
        xs = x[:, k0:k1]
        ys.append(F.linear(xs, s.weight))
        us.append(F.linear(xs, s.ec_A))
        shards.append(s)
    u = sum(us)
    if gate == "sigmoid":
        u = u * 2 * torch.sigmoid(F.linear(u, mod.ec_gate_w, mod.ec_gate_b))
    v = F.linear(u, mod.ec_B)
    torch.testing.assert_close((sum(ys) + v).double(), ref, **tol)
    # the bar can fail: the EC term added on every rank is off by (world - 1) v
    wrong = sum(y + v for y in ys).double()
    assert (wrong - ref).abs().max() > 100 * tol["atol"]
    sizes = {s.in_features for s in shards}
    assert world == 2 or len(sizes) > 1 or k % (unit * world) == 0  # uneven cuts do occur


def test_row_cut_off_group_boundary_is_refused():
    w = QuantizedWeight.from_float(torch.randn(8, 256), 4, 128)
    with pytest.raises(SpearError, match="quantization group of 128"):
        slice_columns(w, 0, 192, "layers.0.self_attn.o_proj")
    pc = QuantizedWeight.from_float(torch.randn(8, 256), 4, None)
    assert slice_columns(pc, 0, 192).group_size == 192
    with pytest.raises(SpearError, match="packed byte"):
        slice_columns(pc, 0, 63)


def _ref_model():
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    import spear_compile
    path = Path(spear_compile.__file__).parent / "assets" / "spear-ref-16m"
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)


def test_layouts_of_the_reference_model_and_refusals():
    """spear-ref-16m (6 heads, 2 KV heads, head_dim 64, MLP 1024): the layouts at TP 2 / 3 / 4, a g128 cut
    inside a group refused, and parallelize refused without a process group, all before any change."""
    import spear_compile
    from spear_compile.distributed import parallelize, plan_layout

    model = _ref_model()
    lay2 = [plan_layout(model, r, 2) for r in range(2)]
    assert [(l.heads.q0, l.heads.q1, l.heads.kv_heads) for l in lay2] == [(0, 3, (0,)), (3, 6, (1,))]
    lay3 = [plan_layout(model, r, 3) for r in range(3)]
    assert [l.heads.kv_heads for l in lay3] == [(0,), (0, 1), (1,)]
    assert [l.mlp for l in lay3] == [(0, 384), (384, 768), (768, 1024)] and lay3[0].mlp_unit == 128
    assert sum(plan_layout(model, r, 4).heads.num_heads for r in range(4)) == 6
    with pytest.raises(SpearError, match="fewer than the 7 ranks"):
        plan_layout(model, 0, 7)
    spear_compile.quantize(model, "w4-g128-rtn", progress=False)
    with pytest.raises(SpearError, match=r"o_proj: the row-parallel cut \[0, 192\)"):
        plan_layout(model, 0, 2)   # 3 heads x 64 columns: inside a group of 128
    plan_layout(model, 0, 3)       # 2 heads x 64 = 128: on the group boundary
    with pytest.raises(SpearError, match="torch.distributed is not initialized"):
        parallelize(model, mesh=None)
    assert model.model.layers[0].self_attn.o_proj.in_features == 384 and model.config.num_attention_heads == 6


@pytest.mark.parametrize("shape,world,heads,mlp", [
    ("13b", 2, [20, 20], [6912, 6912]), ("13b", 3, [14, 13, 13], [4608, 4608, 4608]),
    ("13b", 4, [10] * 4, [3456] * 4), ("70b", 3, [24, 24, 16], [9600, 9600, 9472]), ("70b", 4, [16] * 4, [7168] * 4)])
def test_llama2_13b_70b_layouts(shape, world, heads, mlp):
    """The paper's models at TP = 2 / 3 / 4 (on the meta device): query heads on KV-group boundaries, MLP cut on
    multiples of 128 (so g128 weights cut on group boundaries), sizes differing by one unit."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from spear_compile.distributed import plan_layout
    dims = {"13b": dict(hidden_size=5120, intermediate_size=13824, num_attention_heads=40, num_key_value_heads=40),
            "70b": dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8)}[shape]
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**dims, num_hidden_layers=1, vocab_size=128, head_dim=128))
    layouts = [plan_layout(model, r, world) for r in range(world)]
    assert [l.heads.num_heads for l in layouts] == heads
    assert [l.mlp[1] - l.mlp[0] for l in layouts] == mlp
    group = dims["num_attention_heads"] // dims["num_key_value_heads"]
    assert all(l.heads.kv_groups == group for l in layouts)   # whole KV groups: no repeated KV heads
