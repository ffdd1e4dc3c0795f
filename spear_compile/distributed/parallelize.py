"""``parallelize(model, mesh)``: tensor parallelism for Hugging Face Llama-family models (Llama, Mistral,
Qwen2: ``model.model.layers[i].self_attn.{q,k,v,o}_proj`` and ``.mlp.{gate,up,down}_proj``), after
``quantize`` and the ECs, before ``optimize``.

The Megatron / gpt-fast plan: q/k/v/gate/up column-parallel (output rows), o/down row-parallel (input
columns, followed by the all-reduce of ``y``, and of the EC's ``u``: ``layers.py``); embeddings, norms and
the LM head replicated. Every rank keeps plain *local* shards (``QuantizedWeight`` of the local shape),
not DTensors: the cuts fall on head / KV-group / quantization-group boundaries with sizes that differ
by one unit (TP = 3 on 40 or 6 heads, 2 KV heads), KV heads are repeated on ranks that share them, and
the compiled graph keeps explicit functional all-reduces the compiler pass can find; DTensor's
``Shard(d)`` follows ``torch.chunk`` (1024 over 3 ranks: 342/342/340, through groups and heads) and
would put a DTensor around the quantized subclass in every compiled graph. ``docs/tensor_parallel.md``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn as nn

from ..ec.io import model_identity
from ..errors import SpearError
from ..quant.weight import QuantizedWeight
from .layers import make_row_parallel
from .sharding import HeadShard, check_column_cut, head_rows, head_shard, shard_column_, shard_row_, split_range

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
MLP_UNITS = (128, 64, 32, 16, 8, 4, 2)


@dataclass(frozen=True)
class TPLayout:
    """One rank's shard of every decoder layer (the same in each layer of a Llama-family model)."""

    world: int
    rank: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate: int
    mlp_unit: int
    heads: HeadShard
    mlp: tuple  # [i0, i1) of the intermediate channels

    def as_dict(self) -> dict:
        d = asdict(self)
        d["heads"] = {"q0": self.heads.q0, "q1": self.heads.q1, "kv_heads": list(self.heads.kv_heads)}
        d["mlp"] = list(self.mlp)
        return d


@dataclass(frozen=True)
class TPState:
    """What ``parallelize`` records on the model (``model._spear_tp``)."""

    layout: TPLayout
    group: str            # the process group's name (functional collectives take it)
    base_identity: dict   # ``ec_io.model_identity`` of the model before its config was made local


def decoder_layers(model: nn.Module):
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise SpearError(f"parallelize: {type(model).__name__} has no model.layers; a Hugging Face Llama-family "
                         f"causal LM is expected")
    for i, layer in enumerate(layers):
        for owner, names in (("self_attn", ATTN), ("mlp", MLP)):
            sub = getattr(layer, owner, None)
            for n in names:
                if not isinstance(getattr(sub, n, None), nn.Linear):
                    raise SpearError(f"parallelize: layer {i} has no nn.Linear {owner}.{n}; "
                                     "Llama-family layers expected")
    return layers


def _config_sizes(model: nn.Module) -> tuple:
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise SpearError(f"parallelize: {type(model).__name__} has no config; a Hugging Face model is expected")
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return heads, kv, head_dim, cfg.intermediate_size


def _mlp_unit(intermediate: int, world: int, down_weights) -> int:
    """The MLP shard unit: the largest of 128, 64, ... that divides the width into >= world units and is
    a multiple of every grouped down_proj's group size."""
    groups = [w.group_size for w in down_weights if isinstance(w, QuantizedWeight) and w.group_size != w.shape[1]]
    need = max(groups, default=2)
    for unit in (max(need, MLP_UNITS[0]),) + MLP_UNITS:
        if unit % need == 0 and intermediate % unit == 0 and intermediate // unit >= world:
            return unit
    raise SpearError(f"parallelize: the MLP width {intermediate} cannot be cut into {world} parts on multiples of "
                     f"{need} (the down_proj quantization group)")


def plan_layout(model: nn.Module, rank: int, world: int, mlp_unit: Optional[int] = None) -> TPLayout:
    """``rank``'s layout for ``model`` (unmodified, full size), validated against every layer's weights."""
    if not 0 <= rank < world:
        raise SpearError(f"parallelize: rank {rank} outside a world of {world}")
    layers = decoder_layers(model)
    heads, kv, head_dim, inter = _config_sizes(model)
    unit = mlp_unit or _mlp_unit(inter, world, [layer.mlp.down_proj.weight for layer in layers])
    layout = TPLayout(world, rank, heads, kv, head_dim, inter, unit, head_shard(heads, kv, rank, world),
                      split_range(inter, unit, rank, world, "MLP width"))
    want = {"q_proj": (heads * head_dim, None), "k_proj": (kv * head_dim, None), "v_proj": (kv * head_dim, None),
            "o_proj": (None, heads * head_dim), "gate_proj": (inter, None), "up_proj": (inter, None),
            "down_proj": (None, inter)}
    for i, layer in enumerate(layers):
        for owner, names in (("self_attn", ATTN), ("mlp", MLP)):
            for n in names:
                mod = getattr(getattr(layer, owner), n)
                n_want, k_want = want[n]
                if (n_want is not None and mod.out_features != n_want) or \
                        (k_want is not None and mod.in_features != k_want):
                    raise SpearError(f"parallelize: layers.{i}.{owner}.{n} is [{mod.out_features}, {mod.in_features}], "
                                     f"the config implies N={n_want or mod.out_features}, "
                                     f"K={k_want or mod.in_features}")
        h = layout.heads
        check_column_cut(layer.self_attn.o_proj.weight, h.q0 * head_dim, h.q1 * head_dim,
                         f"layers.{i}.self_attn.o_proj")
        check_column_cut(layer.mlp.down_proj.weight, *layout.mlp, f"layers.{i}.mlp.down_proj")
    return layout


def _mesh_coordinates(mesh) -> tuple:
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh
    if not dist.is_available() or not dist.is_initialized():
        raise SpearError("parallelize: torch.distributed is not initialized; launch with torchrun and build a "
                         "DeviceMesh (torch.distributed.device_mesh.init_device_mesh)")
    if not isinstance(mesh, DeviceMesh):
        raise SpearError(f"parallelize: mesh must be a torch DeviceMesh, got {type(mesh).__name__}")
    if mesh.ndim != 1:
        raise SpearError(f"parallelize: a 1-D tensor-parallel mesh is expected, got {mesh.ndim}-D "
                         f"(pass its TP dimension, e.g. mesh['tp'])")
    return mesh.get_local_rank(), mesh.size(), mesh.get_group().group_name


def _refuse_unsupported(model: nn.Module) -> None:
    from ..compile.unwrap import PlainCompensatedLinear, PlainQuantizedLinear
    if getattr(model, "_spear_tp", None) is not None:
        raise SpearError("parallelize: the model is already parallelized")
    for name, mod in model.named_modules():
        if isinstance(mod, (PlainQuantizedLinear, PlainCompensatedLinear)):
            raise SpearError(f"parallelize: {name} reads unwrapped weights (optimize/unwrap_quantized ran); "
                             f"parallelize before optimize")


@torch.no_grad()
def apply_layout(model: nn.Module, layout: TPLayout, group: str) -> nn.Module:
    """Cut every decoder layer of ``model`` to ``layout`` in place (no validation: see ``plan_layout``)."""
    identity = model_identity(model)
    hd, h = layout.head_dim, layout.heads
    q_rows = head_rows(range(h.q0, h.q1), hd)
    kv_rows = head_rows(h.kv_heads, hd)
    mlp_rows = torch.arange(*layout.mlp)
    for i, layer in enumerate(decoder_layers(model)):
        attn, mlp = layer.self_attn, layer.mlp
        shard_column_(attn.q_proj, q_rows)
        shard_column_(attn.k_proj, kv_rows)
        shard_column_(attn.v_proj, kv_rows)
        shard_row_(attn.o_proj, h.q0 * hd, h.q1 * hd, f"layers.{i}.self_attn.o_proj")
        make_row_parallel(attn.o_proj, group, layout.rank, layout.world)
        attn.num_key_value_groups = h.kv_groups
        for n in ("num_heads", "num_attention_heads"):
            if hasattr(attn, n):
                setattr(attn, n, h.num_heads)
        if hasattr(attn, "num_key_value_heads"):
            attn.num_key_value_heads = h.num_kv_heads
        shard_column_(mlp.gate_proj, mlp_rows)
        shard_column_(mlp.up_proj, mlp_rows)
        shard_row_(mlp.down_proj, *layout.mlp, f"layers.{i}.mlp.down_proj")
        make_row_parallel(mlp.down_proj, group, layout.rank, layout.world)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = layout.mlp[1] - layout.mlp[0]
    cfg = model.config  # local sizes: caches (StaticCache) are allocated from these
    cfg.head_dim = hd
    cfg.num_attention_heads, cfg.num_key_value_heads = h.num_heads, h.num_kv_heads
    cfg.intermediate_size = layout.mlp[1] - layout.mlp[0]
    model._spear_tp = TPState(layout, group, identity)
    return model


def parallelize(model: nn.Module, mesh, mlp_unit: Optional[int] = None) -> nn.Module:
    """Shard ``model`` (a Hugging Face Llama-family causal LM, quantized or not, with or without ECs) over
    the 1-D ``DeviceMesh`` ``mesh`` in place and return it. Every rank calls it on the same full model.

    q/k/v/gate/up keep this rank's output rows, o/down its input columns and all-reduce their outputs
    (and their ECs' ``u``) over ``mesh``. Heads are cut on KV-group boundaries (or head boundaries when
    there are fewer KV heads than ranks, repeating shared KV heads), the MLP on multiples of ``mlp_unit``
    (default: the largest of 128, 64, ... dividing the width and the down_proj quantization group);
    sizes differ by one unit. Refused (``SpearError``, before any change): an uninitialized process
    group, a non-1-D mesh, a non-Llama model, cuts off quantization groups, a model already
    parallelized or unwrapped by ``optimize``. Then ``spear_compile.optimize(model, quant=None)`` or
    ``torch.compile(..., backend="spear")`` compiles each rank's model.
    """
    rank, world, group = _mesh_coordinates(mesh)
    _refuse_unsupported(model)
    layout = plan_layout(model, rank, world, mlp_unit)
    return apply_layout(model, layout, group)


def tp_state(model: nn.Module) -> Optional[TPState]:
    return getattr(model, "_spear_tp", None)


def describe(model: nn.Module) -> list:
    """One row per sharded linear of a parallelized model: module, style, local ``[N, K]``, EC rank, and for
    row-parallel EC layers how ``u`` is reduced (after ``enable_peer_reduce``: a workspace slot, which the
    ``spear`` backend's pass turns into the peer-reduction epilogue in compiled decode graphs, M <= 16; otherwise
    the functional all-reduce fallback). What a compile actually did: ``spear_compile.inspect`` / records."""
    from ..ec.module import CompensatedLinear
    from .layers import RowParallelCompensatedLinear, RowParallelLinear
    if tp_state(model) is None:
        raise SpearError("describe: the model is not parallelized")
    rows = []
    for i, layer in enumerate(decoder_layers(model)):
        for owner, names in (("self_attn", ATTN), ("mlp", MLP)):
            for n in names:
                mod = getattr(getattr(layer, owner), n)
                row = isinstance(mod, (RowParallelLinear, RowParallelCompensatedLinear))
                ec = isinstance(mod, CompensatedLinear)
                u_path = ""
                if row and ec:
                    u_path = ("peer-reduce slot (compiled decode)" if getattr(mod, "peer_args", None)
                              else "all-reduce (fallback)")
                rows.append(dict(module=f"model.layers.{i}.{owner}.{n}", style="row" if row else "column",
                                 local_shape=(mod.out_features, mod.in_features),
                                 quantized=isinstance(mod.weight, QuantizedWeight), ec_rank=mod.rank if ec else 0,
                                 u_reduction=u_path))
    return rows
