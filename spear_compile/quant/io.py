"""Save and load a quantized model (with its ECs) as one safetensors file.

Layout: every quantized linear as plain tensors ``<name>.weight.qdata/.scale/.zero``; every other
state-dict entry under its own name (shared tensors once; aliases in the metadata); the JSON
metadata under the key ``"spear"``: format version, QuantConfig, per-module bits/group_size/
symmetric/shape, EC rank/gate per CompensatedLinear, and a sha256 per tensor.

Loading validates the whole file against the target model before touching it, so a corrupt,
truncated or mismatched file never half-loads.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Union

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from .config import QuantConfig
from ..ec.module import CompensatedLinear, ec_shapes
from ..errors import SpearError
from ..modules import replace_submodule
from ..transaction import model_transaction
from .api import as_config
from .rtn import zeros_problem
from .weight import QuantizedWeight

FORMAT = "spear-quantized"
FORMAT_VERSION = 1
QUANT_PARTS = ("qdata", "scale", "zero")


def _sha256(t: torch.Tensor) -> str:
    raw = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8)
    return hashlib.sha256(raw.numpy().tobytes()).hexdigest()


def own_storage(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a CPU copy of it when it views part of a larger buffer (sibling weights packed into one by
    ``compile.siblings``): a saved tensor never shares memory (safetensors 0.8 writes disjoint views, older
    releases may refuse them)."""
    if t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    return t.detach().to("cpu", copy=True)


def _quantized_modules(model: nn.Module):
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and isinstance(m.weight, QuantizedWeight)}


def save_quantized(model: nn.Module, path: Union[str, Path], config: Union[QuantConfig, str, None] = None) -> Path:
    """Write ``model`` (quantized linears, ECs, everything else) to ``path`` (one .safetensors)."""
    config = as_config(config) if config is not None else None
    quantized = _quantized_modules(model)
    if not quantized:
        raise SpearError(f"save_quantized: {type(model).__name__} has no quantized linear; quantize it first")
    tensors, modules, ecs, aliases, seen = {}, {}, {}, {}, {}
    for name, m in quantized.items():
        w = m.weight
        modules[name] = dict(bits=w.bits, group_size=w.group_size, symmetric=w.symmetric,
                             shape=list(w.shape), dtype=str(w.dtype).replace("torch.", ""))
        for part in QUANT_PARTS:
            tensors[f"{name}.weight.{part}"] = getattr(w, part)
        seen[id(w)] = f"{name}.weight"
    for name, m in model.named_modules():
        if isinstance(m, CompensatedLinear):
            ecs[name] = dict(rank=m.rank, gate=m.gate)
    for key, t in model.state_dict(keep_vars=True).items():
        if isinstance(t, QuantizedWeight):
            if id(t) not in seen:
                raise SpearError(f"save_quantized: state-dict entry {key!r} is a QuantizedWeight outside an nn.Linear")
            if seen[id(t)] != key:
                aliases[key] = seen[id(t)]
            continue
        if id(t) in seen:
            aliases[key] = seen[id(t)]
            continue
        seen[id(t)] = key
        tensors[key] = t
    tensors = {k: own_storage(v.detach().contiguous().cpu()) for k, v in tensors.items()}
    meta = dict(format=FORMAT, format_version=FORMAT_VERSION, model_class=type(model).__name__,
                config=config.to_dict() if config else None, modules=modules, ec_modules=ecs, aliases=aliases,
                sha256={k: _sha256(v) for k, v in tensors.items()})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"spear": json.dumps(meta)})
    return path


def read_metadata(path, key: str, where: str, writer: str, fmt: str, version: int, tensors: bool = False):
    """A safetensors file's JSON metadata under ``key`` (and, ``tensors``, its tensors: ``(meta, tensors or None)``),
    refused with a ``SpearError`` naming ``where`` and the file when it is missing, unreadable, without that
    metadata (not written by ``writer``), corrupt, or of another format than ``fmt`` v``version``."""
    path = Path(path)
    if not path.is_file():
        raise SpearError(f"{where}: {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(key)
            loaded = {k: f.get_tensor(k) for k in f.keys()} if tensors else None
    except Exception as e:  # safetensors raises its own error types for truncated/garbled files
        raise SpearError(f"{where}: {str(path)!r} is not a readable safetensors file "
                         f"({type(e).__name__}: {e})") from e
    if raw is None:
        raise SpearError(f"{where}: {str(path)!r} has no {key} metadata; was it written by {writer}?")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise SpearError(f"{where}: {str(path)!r} has corrupt metadata ({key}: {e})") from e
    if not isinstance(meta, dict):
        raise SpearError(f"{where}: {str(path)!r} has corrupt metadata ({key}: a {type(meta).__name__}, not an "
                         f"object)")
    if meta.get("format") != fmt or meta.get("format_version") != version:
        raise SpearError(f"{where}: {str(path)!r} has format {meta.get('format')!r} v{meta.get('format_version')}; "
                         f"expected {fmt!r} v{version}")
    return meta, loaded


def _read(path: Path):
    meta, tensors = read_metadata(path, "spear", "load_quantized", "save_quantized", FORMAT, FORMAT_VERSION, True)
    for key in ("modules", "ec_modules", "aliases", "sha256"):
        if not isinstance(meta.get(key), dict):
            raise SpearError(f"load_quantized: {str(path)!r} metadata lacks {key!r}: corrupt file")
    return meta, tensors


def _require(tensors: dict, want: dict, where: str, what: str) -> None:
    """Every ``{key: shape}`` of ``want`` is in ``tensors`` with that shape."""
    for key, shape in want.items():
        if key not in tensors:
            raise SpearError(f"{where}: missing {what} {key!r}")
        if tuple(tensors[key].shape) != shape:
            raise SpearError(f"{where}: {what} {key!r} has shape {tuple(tensors[key].shape)}, expected {shape}")


def _check_module_meta(name: str, info, tensors: dict, where: str) -> None:
    """A quantized module's metadata is well-formed and agrees with its tensors (dtypes, code range,
    symmetric zeros), so a hand-edited or mismatched file is refused rather than loaded wrong."""
    from .config import SUPPORTED_BITS
    if not isinstance(info, dict) or not {"bits", "group_size", "symmetric", "shape", "dtype"} <= set(info):
        raise SpearError(f"{where}: metadata of module {name!r} is malformed: {info!r}")
    shape, bits, gs = info["shape"], info["bits"], info["group_size"]
    if (not isinstance(shape, list) or len(shape) != 2 or not all(isinstance(d, int) and d > 0 for d in shape)
            or bits not in SUPPORTED_BITS or not isinstance(gs, int) or gs < 1 or shape[1] % gs
            or not isinstance(info["symmetric"], bool)):
        raise SpearError(f"{where}: metadata of module {name!r} is inconsistent (shape {shape}, bits {bits}, "
                         f"group_size {gs}, symmetric {info['symmetric']})")
    parts = {p: tensors.get(f"{name}.weight.{p}") for p in QUANT_PARTS}
    if any(t is None for t in parts.values()):
        return  # reported by the shape checks with the missing key's name
    if parts["qdata"].dtype != torch.uint8:
        raise SpearError(f"{where}: {name}.weight.qdata is {parts['qdata'].dtype}, expected torch.uint8")
    for p in ("scale", "zero"):
        if str(parts[p].dtype).replace("torch.", "") != info["dtype"]:
            raise SpearError(f"{where}: {name}.weight.{p} is {parts[p].dtype}, the metadata says {info['dtype']}")
        if not torch.isfinite(parts[p]).all():
            raise SpearError(f"{where}: {name}.weight.{p} holds NaN/inf values")
    q = parts["qdata"]
    if bits < 8:
        codes_max = (int(torch.maximum(q & 0xF, q >> 4).max()) if bits <= 4 and q.numel()
                     else int(q.max()) if q.numel() else 0)
        if codes_max > 2 ** bits - 1:
            raise SpearError(f"{where}: {name}.weight.qdata holds code {codes_max}, beyond {bits}-bit codes "
                             f"(metadata says bits={bits})")
    problem = zeros_problem(parts["zero"], bits)
    if problem:
        raise SpearError(f"{where}: {name}.weight.zero {problem}")
    if info["symmetric"] and parts["zero"].numel() and not bool((parts["zero"].float() == 2 ** (bits - 1)).all()):
        raise SpearError(f"{where}: {name} is marked symmetric but its zeros are not all {2 ** (bits - 1)}")


def _validate(model: nn.Module, meta: dict, tensors: dict, path: Path) -> None:
    where = f"load_quantized({path.name})"
    sums = meta.get("sha256", {})
    if set(sums) != set(tensors):
        missing = sorted(set(sums) - set(tensors))
        extra = sorted(set(tensors) - set(sums))
        raise SpearError(f"{where}: tensors do not match the checksum list "
                         f"(missing: {missing[:5]}, unlisted: {extra[:5]})")
    for k, t in tensors.items():
        if _sha256(t) != sums[k]:
            raise SpearError(f"{where}: checksum mismatch for tensor {k!r}: the file is corrupt")

    modules = dict(model.named_modules())
    for name, info in meta["modules"].items():
        _check_module_meta(name, info, tensors, where)
        m = modules.get(name)
        if not isinstance(m, nn.Linear):
            raise SpearError(f"{where}: quantized module {name!r} is not an nn.Linear of {type(model).__name__} "
                             f"(found {type(m).__name__ if m is not None else 'nothing'}): "
                             "file is for another architecture")
        n, k = info["shape"]
        if (m.out_features, m.in_features) != (n, k):
            raise SpearError(f"{where}: module {name!r} has shape [{m.out_features}, {m.in_features}] in the model, "
                             f"[{n}, {k}] in the file")
        gs = info["group_size"]
        cols = k // 2 if info["bits"] <= 4 else k
        want = {"qdata": (n, cols), "scale": (n, k // gs), "zero": (n, k // gs)}
        _require(tensors, {f"{name}.weight.{part}": shape for part, shape in want.items()}, where, "tensor")
    for name, info in meta["ec_modules"].items():
        m = modules.get(name)
        if not isinstance(m, nn.Linear):
            raise SpearError(f"{where}: EC module {name!r} is not an nn.Linear of {type(model).__name__}")
        want = ec_shapes(m.out_features, m.in_features, info["rank"], info["gate"])
        _require(tensors, {f"{name}.{part}": shape for part, shape in want.items()}, where, "EC tensor")

    # every entry of the model's state dict must be covered, and nothing extra may be in the file
    expected = set()
    for key, t in model.state_dict(keep_vars=True).items():
        owner, _, leaf = key.rpartition(".")
        if owner in meta["modules"] and leaf == "weight":
            continue
        if key in meta["aliases"]:
            continue
        expected.add(key)
        if key not in tensors:
            raise SpearError(f"{where}: missing tensor {key!r} for {type(model).__name__}")
        if tuple(tensors[key].shape) != tuple(t.shape):
            raise SpearError(f"{where}: tensor {key!r} has shape {tuple(tensors[key].shape)} in the file, "
                             f"{tuple(t.shape)} in the model: file is for another architecture/size")
        if tensors[key].dtype != t.dtype:
            raise SpearError(f"{where}: tensor {key!r} is {tensors[key].dtype} in the file, {t.dtype} in the model; "
                             f"load the model with dtype={tensors[key].dtype} (from_pretrained(..., dtype=...))")
    for name, info in meta["modules"].items():
        m = modules[name]
        if not isinstance(m.weight, QuantizedWeight) and str(m.weight.dtype).replace("torch.", "") != info["dtype"]:
            raise SpearError(f"{where}: module {name!r} is {m.weight.dtype} in the model, {info['dtype']} in the file; "
                             f"load the model with dtype=torch.{info['dtype']}")
        if isinstance(m.weight, QuantizedWeight):
            raise SpearError(f"{where}: module {name!r} of the model is already quantized; load into a fresh "
                             f"floating-point model")
    for name in meta["ec_modules"]:
        for part in ("ec_A", "ec_B", "ec_gate_w", "ec_gate_b"):
            t = tensors.get(f"{name}.{part}")
            if t is not None and (not t.dtype.is_floating_point or not torch.isfinite(t).all()):
                raise SpearError(f"{where}: EC tensor {name}.{part} is {t.dtype} with NaN/inf or non-float values")
    ec_keys = {f"{n}.{p}" for n, i in meta["ec_modules"].items()
               for p in (("ec_A", "ec_B", "ec_gate_w", "ec_gate_b") if i["gate"] == "sigmoid" else ("ec_A", "ec_B"))}
    quant_keys = {f"{n}.weight.{p}" for n in meta["modules"] for p in QUANT_PARTS}
    extra = set(tensors) - expected - ec_keys - quant_keys
    if extra:
        raise SpearError(f"{where}: the file has tensors the model does not: {sorted(extra)[:5]}: "
                         "file is for another architecture")


@torch.no_grad()
def load_quantized(model: nn.Module, path: Union[str, Path]) -> nn.Module:
    """Load a file written by :func:`save_quantized` into ``model`` (a freshly loaded FP model of the
    same architecture) in place and return it. Bit-exact; validates everything before mutating."""
    if not isinstance(model, nn.Module):
        raise SpearError(f"load_quantized: expected an nn.Module, got {type(model).__name__}")
    if not isinstance(path, (str, Path)):
        raise SpearError(f"load_quantized: path must be a file path, got {type(path).__name__}")
    path = Path(path)
    meta, tensors = _read(path)
    _validate(model, meta, tensors, path)
    with model_transaction(model):
        return _load_validated(model, meta, tensors)


def _load_validated(model: nn.Module, meta: dict, tensors: dict) -> nn.Module:
    modules = dict(model.named_modules())
    for name, info in meta["modules"].items():
        m = modules[name]
        dev = m.weight.device
        qw = QuantizedWeight(*(tensors[f"{name}.weight.{p}"].to(dev) for p in QUANT_PARTS), info["bits"],
                             info["group_size"], info["symmetric"], torch.Size(info["shape"]))
        m.weight = nn.Parameter(qw, requires_grad=False)
    state = model.state_dict(keep_vars=True)
    ec_keys = set()
    for name, info in meta["ec_modules"].items():
        m = modules[name]
        if isinstance(m, CompensatedLinear):
            m = m.unwrap()
        ec = CompensatedLinear.wrap(m, info["rank"], info["gate"])
        for part in ("ec_A", "ec_B", "ec_gate_w", "ec_gate_b"):
            if getattr(ec, part) is not None:
                t = tensors[f"{name}.{part}"]
                setattr(ec, part, nn.Parameter(t.to(ec.ec_A.device), requires_grad=getattr(ec, part).requires_grad))
                ec_keys.add(f"{name}.{part}")
        replace_submodule(model, name, ec)
    for key, t in state.items():
        if key in tensors and key not in ec_keys:
            t.data = tensors[key].to(t.device)
    for key, target in meta["aliases"].items():  # a model that does not tie these gets its own copy
        if key in state and target in tensors and state[key] is not state.get(target):
            state[key].data = tensors[target].to(state[key].device)
    return model
