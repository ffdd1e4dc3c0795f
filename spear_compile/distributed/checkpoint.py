"""Sharded save / load: one ``tp{W}-rank{r}.safetensors`` per rank in a directory.

Each file is exactly what ``spear_compile.serialization.save_quantized`` writes for the rank's local
model (local ``QuantizedWeight`` shards, ECs, replicated tensors; checksums; metadata key ``"spear"``),
plus the metadata key ``"spear_tp"``: format, world size, rank, the layout (heads, MLP cut, unit) and the
base model's identity. ``load_sharded`` refuses, before changing the model, a file of another TP size,
another rank, another base model, another layout or a corrupt tensor, then cuts the fresh model to the saved
layout and loads the rank's file into it with ``load_quantized`` (which checks shapes and checksums again).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Union

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import SpearError
from ..quant.io import load_quantized, read_metadata, save_quantized
from .layers import make_row_parallel
from .parallelize import (ATTN, MLP, _mesh_coordinates, _refuse_unsupported, apply_layout, decoder_layers, plan_layout,
                          tp_state)

FORMAT = "spear-tp"
FORMAT_VERSION = 1
KEY = "spear_tp"


def shard_file(directory: Union[str, Path], world: int, rank: int) -> Path:
    return Path(directory) / f"tp{world}-rank{rank}.safetensors"


def save_sharded(model: nn.Module, directory: Union[str, Path], config=None) -> Path:
    """Write this rank's shard of a parallelized quantized ``model`` to ``directory``; returns the file.
    Every rank calls it (each writes its own file; no collective)."""
    state = tp_state(model)
    if state is None:
        raise SpearError("save_sharded: the model is not parallelized; call spear_compile.parallelize first")
    lay = state.layout
    path = shard_file(directory, lay.world, lay.rank)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_quantized(model, tmp, config)
    with safe_open(str(tmp), framework="pt") as f:
        meta = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta[KEY] = json.dumps(dict(format=FORMAT, format_version=FORMAT_VERSION, world_size=lay.world, rank=lay.rank,
                                layout=lay.as_dict(), base_model=state.base_identity))
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def read_tp_metadata(path: Union[str, Path]) -> dict:
    return read_metadata(path, KEY, "load_sharded", "save_sharded", FORMAT, FORMAT_VERSION)[0]


def check_shard_checksums(path: Path) -> None:
    """Every tensor of the shard against the checksum ``save_quantized`` recorded, before the model is cut
    (``load_quantized`` checks again while loading, after the cut)."""
    import hashlib
    with safe_open(str(path), framework="pt") as f:
        sums = json.loads((f.metadata() or {}).get("spear", "{}")).get("sha256")
        if not isinstance(sums, dict) or set(sums) != set(f.keys()):
            raise SpearError(f"load_sharded: {path.name}: the tensors do not match the checksum list: corrupt file")
        for key in f.keys():
            raw = f.get_tensor(key).contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            if hashlib.sha256(raw).hexdigest() != sums[key]:
                raise SpearError(f"load_sharded: {path.name}: checksum mismatch for tensor {key!r}: "
                                 "the file is corrupt")


def check_shard_metadata(meta: dict, path: Path, model: nn.Module, rank: int, world: int):
    """Refuse a shard written for another TP size, rank, base model or layout; returns the layout to cut."""
    from ..ec.io import model_identity
    if meta.get("world_size") != world:
        raise SpearError(f"load_sharded: {path.name} was written for TP={meta.get('world_size')}, the mesh has "
                         f"{world} ranks; re-shard from the full quantized model "
                         f"(parallelize + save_sharded at TP={world})")
    if meta.get("rank") != rank:
        raise SpearError(f"load_sharded: {path.name} holds rank {meta.get('rank')}'s shard, this is rank {rank}")
    mine = model_identity(model)
    if meta.get("base_model", {}).get("config_hash") != mine["config_hash"]:
        raise SpearError(f"load_sharded: {path.name} was cut from base model {meta.get('base_model')}, "
                         f"this model is {mine}")
    saved = meta.get("layout") or {}
    layout = plan_layout(model, rank, world, saved.get("mlp_unit"))
    if layout.as_dict() != saved:
        raise SpearError(f"load_sharded: {path.name}'s layout {saved} differs from this model's {layout.as_dict()}")
    return layout


def load_sharded(model: nn.Module, source: Union[str, Path], mesh) -> nn.Module:
    """Load this rank's shard into ``model`` (a freshly loaded full FP model of the same architecture; every
    rank calls it) in place and return it, parallelized over ``mesh``. ``source``: the directory
    ``save_sharded`` wrote, or one shard file (refused unless it is this rank's, for this TP size)."""
    rank, world, group = _mesh_coordinates(mesh)
    _refuse_unsupported(model)
    source = Path(source)
    path = shard_file(source, world, rank) if source.is_dir() else source
    if source.is_dir() and not path.is_file():
        others = sorted(p.name for p in source.glob("tp*-rank*.safetensors"))
        raise SpearError(f"load_sharded: {str(source)!r} has no shard for TP={world} rank {rank} "
                         f"(it has {others[:4] or 'no shards'}); shards load only at the TP size they were cut for")
    layout = check_shard_metadata(read_tp_metadata(path), path, model, rank, world)
    check_shard_checksums(path)
    apply_layout(model, layout, group)
    load_quantized(model, path)  # (validates shapes and checksums; rebuilds EC modules as CompensatedLinear)
    for layer in decoder_layers(model):
        for owner, names in (("self_attn", ATTN[3:]), ("mlp", MLP[2:])):
            for n in names:
                make_row_parallel(getattr(getattr(layer, owner), n), group, rank, world)
    return model
