"""Save / load trained ECs: ``ecs.safetensors`` (``{module}.ec_A`` ...) + ``manifest.json``.

``load_ecs`` validates everything (quant config, base model identity, module names and shapes,
file checksum, tensor names and shapes) before it changes the model.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Union

import torch
import torch.nn as nn

from ..errors import SpearError
from ..modules import replace_submodule
from ..quant.api import describe_weight, weight_matches
from ..quant.config import QuantConfig
from ..quant.weight import QuantizedWeight
from ..transaction import model_transaction
from .module import GATES, CompensatedLinear, ec_shapes

FORMAT = "spear-ec-v1"
TENSORS, MANIFEST = "ecs.safetensors", "manifest.json"
_IGNORED_CONFIG_KEYS = {"dtype", "torch_dtype", "transformers_version", "_name_or_path", "architectures",
                        "use_cache", "_attn_implementation_autoset", "output_attentions", "output_hidden_states",
                        "quantization_config"}  # set by quantize on transformers models: not the architecture


def model_identity(model: nn.Module) -> dict:
    """``{"name", "config_hash"}``: a hash of the architecture fields of an HF config (dtype
    and version fields left out), or of the linear shapes for a plain module."""
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "to_dict"):
        d = {k: v for k, v in cfg.to_dict().items() if k not in _IGNORED_CONFIG_KEYS}
        name = getattr(cfg, "_name_or_path", "") or type(model).__name__
    else:
        d = {n: list(m.weight.shape) for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        name = type(model).__name__
    blob = json.dumps(d, sort_keys=True, default=str).encode()
    return {"name": Path(str(name)).name, "config_hash": hashlib.sha256(blob).hexdigest()[:16]}


def weight_fingerprint(weight: QuantizedWeight) -> str:
    """sha256 of a quantized weight's codes, scales and zeros: ECs are fitted to one exact W_q
    (GPTQ on other samples or another device can round differently)."""
    h = hashlib.sha256()
    for t in (weight.qdata, weight.scale, weight.zero):
        h.update(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_ecs(model: nn.Module, out_dir: Union[str, Path], manifest: dict) -> dict:
    """Write every ``CompensatedLinear``'s EC of ``model`` and ``manifest`` (completed with
    ``format``, ``modules``, ``file_sha256``) to ``out_dir``; returns the manifest written."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors, modules = {}, {}
    for name, m in model.named_modules():
        if isinstance(m, CompensatedLinear):
            modules[name] = {"rank": m.rank, "gate": m.gate, "shape": [m.out_features, m.in_features]}
            if isinstance(m.weight, QuantizedWeight):
                modules[name]["weight_sha256"] = weight_fingerprint(m.weight)
            for pname in ("ec_A", "ec_B", "ec_gate_w", "ec_gate_b"):
                p = getattr(m, pname)
                if p is not None:
                    # (a contiguous copy of its own: merged sibling ECs, ``compile.siblings``, share buffers)
                    tensors[f"{name}.{pname}"] = p.detach().to("cpu", memory_format=torch.contiguous_format,
                                                               copy=True)
    if not modules:
        raise SpearError("save_ecs: the model has no CompensatedLinear")
    save_file(tensors, str(out_dir / TENSORS))
    manifest = dict(manifest, format=FORMAT, modules=modules, file_sha256=_sha256(out_dir / TENSORS),
                    ec_dtype=str(next(iter(tensors.values())).dtype).replace("torch.", ""))
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
    return manifest


def read_manifest(ec_dir: Union[str, Path]) -> dict:
    ec_dir = Path(ec_dir)
    path = ec_dir / MANIFEST
    if not path.is_file():
        raise SpearError(f"load_ecs: {str(path)!r} does not exist")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SpearError(f"load_ecs: {str(path)!r} is not valid UTF-8 JSON ({e})") from None
    except OSError as e:
        raise SpearError(f"load_ecs: cannot read {str(path)!r} ({e.strerror or e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or \
            not isinstance(manifest.get("modules"), dict):
        raise SpearError(f"load_ecs: {str(path)!r} is not a {FORMAT} manifest")
    for key in ("quant", "base_model"):
        if key in manifest and not isinstance(manifest[key], dict):
            raise SpearError(f"load_ecs: {str(path)!r}: entry {key!r} is a {type(manifest[key]).__name__}, "
                             "not an object: corrupt manifest")
    bad = [n for n, info in manifest["modules"].items() if not isinstance(info, dict)]
    if bad:
        raise SpearError(f"load_ecs: {str(path)!r}: module entry {bad[0]!r} is not an object: corrupt manifest")
    return manifest


def _check_config(manifest: dict, config) -> QuantConfig:
    cfg = QuantConfig.from_spec(config) if isinstance(config, str) else config
    if not isinstance(cfg, QuantConfig):
        raise SpearError(f"load_ecs: config must be a QuantConfig or a spec string, got {config!r}")
    saved = manifest.get("quant", {})
    if not isinstance(saved, dict):
        raise SpearError(f"load_ecs: the manifest's 'quant' entry is {type(saved).__name__}, "
                         "not an object: corrupt manifest")
    mine = cfg.to_dict()
    diff = [k for k in ("bits", "group_size", "symmetric", "method") if saved.get(k) != mine[k]]
    if diff:
        what = "granularity (per-channel vs group size)" if diff == ["group_size"] else f"{diff}"
        raise SpearError(f"load_ecs: ECs were calibrated for {saved.get('spec')!r}, the model is {cfg.spec!r} "
                         f"(differs in {what}); load ECs calibrated for {cfg.spec!r} or re-run calibrate")
    return cfg


def check_ec_dir(ec_dir: Union[str, Path], config) -> dict:
    """The checks on an EC directory that need no model: manifest, its quant config vs ``config``,
    the tensor file's presence and checksum. Returns the manifest. Run before minutes of work."""
    if not isinstance(ec_dir, (str, Path)):
        raise SpearError(f"load_ecs: ec_dir must be a directory path, got {type(ec_dir).__name__}")
    ec_dir = Path(ec_dir)
    if not ec_dir.is_dir():
        raise SpearError(f"load_ecs: EC directory {str(ec_dir)!r} does not exist or is not a directory")
    manifest = read_manifest(ec_dir)
    _check_config(manifest, config)
    tpath = ec_dir / TENSORS
    if not tpath.is_file():
        raise SpearError(f"load_ecs: {str(tpath)!r} does not exist")
    if manifest.get("file_sha256") != _sha256(tpath):
        raise SpearError(f"load_ecs: {str(tpath)!r} is corrupt (checksum does not match the manifest)")
    return manifest


def load_ecs(model: nn.Module, ec_dir: Union[str, Path], config) -> dict:
    """Wrap the manifest's modules of the already-quantized ``model`` with ``CompensatedLinear``
    and load their EC weights (cast to the module weight's dtype; exact when it matches the
    saved ``ec_dtype``). Returns the manifest. Raises ``SpearError`` before changing anything
    if the files, the quant config or the model do not match."""
    manifest, tensors, plan = _plan(model, ec_dir, config, before_quantizing=False)
    modules = dict(model.named_modules())
    built = []  # every new module before any swap
    for name, rank, gate, want in plan:
        new = CompensatedLinear.wrap(modules[name], rank, gate)
        with torch.no_grad():
            for pname in want:
                getattr(new, pname).copy_(tensors[f"{name}.{pname}"])
        built.append((name, new))
    with model_transaction(model):
        for name, new in built:
            replace_submodule(model, name, new)
    return manifest


def check_ecs_before_quantizing(model: nn.Module, ec_dir: Union[str, Path], config) -> dict:
    """Every check ``load_ecs`` makes, on the floating-point ``model`` it will later be given once
    quantized with ``config`` (for RTN the quantized weights' fingerprints are computed from the FP
    weights; GPTQ's are only known after quantizing). Changes nothing; returns the manifest."""
    return _plan(model, ec_dir, config, before_quantizing=True)[0]


def read_ecs_for_swap(model: nn.Module, ec_dir: Union[str, Path], config=None) -> dict:
    """Another calibration's EC weights for the ``CompensatedLinear`` modules ``model`` already has, checked as
    ``load_ecs`` checks them (manifest, checksum, base model, quantized-weight fingerprints, shapes, finite values)
    and refused unless the manifest names exactly those modules with their ranks and gates. ``config``: the quant
    config (default: the manifest's own; the fingerprints tie the ECs to these weights either way). Returns
    ``{module name: {parameter name: tensor}}``; changes nothing (a server swaps them in between steps)."""
    if not isinstance(ec_dir, (str, Path)):
        raise SpearError(f"load_ecs: ec_dir must be a directory path, got {type(ec_dir).__name__}")
    if config is None:
        spec = read_manifest(Path(ec_dir)).get("quant", {}).get("spec") if Path(ec_dir).is_dir() else None
        config = spec if isinstance(spec, str) else "none"
    _, tensors, plan = _plan(model, ec_dir, config, before_quantizing=False, swap=True)
    return {name: {p: tensors[f"{name}.{p}"] for p in shapes} for name, _, _, shapes in plan}


def _check_same_ec_set(model: nn.Module, manifest: dict, ec_dir) -> None:
    have = {n: (m.rank, m.gate) for n, m in model.named_modules() if isinstance(m, CompensatedLinear)}
    want = {name: (info.get("rank"), info.get("gate")) for name, info in manifest["modules"].items()}
    if have != want:
        diff = sorted(set(have.items()) ^ set(want.items()))
        raise SpearError(f"load_ecs: {str(ec_dir)!r} holds another EC set than the model's ({len(want)} vs {len(have)} "
                         f"modules; first difference {diff[0] if diff else None}): only the same modules, ranks and "
                         f"gates swap in place (another set needs new compiled graphs and step-cost profile)")


def _plan(model: nn.Module, ec_dir, config, before_quantizing: bool, swap: bool = False):
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not isinstance(model, nn.Module):
        raise SpearError(f"load_ecs: expected an nn.Module, got {type(model).__name__}")
    manifest = check_ec_dir(ec_dir, config)
    if swap:   # before the tensors are read: another set is refused by its manifest alone
        _check_same_ec_set(model, manifest, ec_dir)
    ec_dir = Path(ec_dir)
    cfg = _check_config(manifest, config)
    saved_id = manifest.get("base_model", {}).get("config_hash")
    if saved_id is not None and saved_id != model_identity(model)["config_hash"]:
        raise SpearError(f"load_ecs: ECs were calibrated on base model {manifest['base_model']} but this model is "
                         f"{model_identity(model)}")
    tpath = ec_dir / TENSORS
    try:
        tensors = load_file(str(tpath))
    except (SafetensorError, OSError, ValueError) as e:
        raise SpearError(f"load_ecs: cannot read {str(tpath)!r}: {e}") from None

    modules = dict(model.named_modules())
    plan, expected = [], set()
    for name, info in manifest["modules"].items():
        mod = modules.get(name)
        if mod is None:
            raise SpearError(f"load_ecs: module {name!r} of the manifest is not in {type(model).__name__}")
        if (isinstance(mod, CompensatedLinear) != swap) or not isinstance(mod, nn.Linear):
            kind = "a CompensatedLinear (its EC swapped in place)" if swap else "a plain quantized nn.Linear"
            raise SpearError(f"load_ecs: {name!r} is a {type(mod).__name__}, expected {kind}")
        weight = mod.weight
        if before_quantizing:
            if isinstance(weight, QuantizedWeight):
                raise SpearError(f"load_ecs: {name!r} is already quantized; expected the floating-point model")
            weight = None
            if cfg.method == "rtn" and info.get("weight_sha256") is not None:
                weight = QuantizedWeight.from_float(mod.weight.data, cfg.bits, cfg.group_size, cfg.symmetric,
                                                    name=f"{name}.weight")
        else:
            if not isinstance(weight, QuantizedWeight):
                raise SpearError(f"load_ecs: {name!r} is not quantized; "
                                 "quantize the model with the manifest's config first")
            if not weight_matches(weight, cfg):
                raise SpearError(f"load_ecs: {name!r} is quantized as {describe_weight(weight)}, but the ECs (and "
                                 f"config) are for {cfg.spec!r}: quantize the model with {cfg.spec!r}")
        n, k = mod.out_features, mod.in_features
        if list(info.get("shape", [])) != [n, k]:
            raise SpearError(f"load_ecs: {name!r} has shape [{n}, {k}], the manifest says {info.get('shape')}")
        want_fp = info.get("weight_sha256")
        if want_fp is not None and weight is not None and want_fp != weight_fingerprint(weight):
            raise SpearError(f"load_ecs: {name!r}: the ECs were fitted on different quantized weights (same config "
                             f"{manifest.get('quant', {}).get('spec')!r}, other codes: e.g. GPTQ on other calibration "
                             f"samples, another device or another dtype); re-run calibrate for this model")
        rank, gate = info.get("rank"), info.get("gate")
        if gate not in GATES or isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank <= min(n, k):
            raise SpearError(f"load_ecs: {name!r}: bad rank {rank!r} or gate {gate!r} in the manifest")
        want = ec_shapes(n, k, rank, gate)
        for pname, shape in want.items():
            t = tensors.get(f"{name}.{pname}")
            if t is None or tuple(t.shape) != shape:
                got = None if t is None else tuple(t.shape)
                raise SpearError(f"load_ecs: tensor {name}.{pname} should have shape {shape}, file has {got}")
            if not t.dtype.is_floating_point:
                raise SpearError(f"load_ecs: tensor {name}.{pname} has dtype {t.dtype}, expected a floating-point EC")
            if not torch.isfinite(t).all():
                raise SpearError(f"load_ecs: tensor {name}.{pname} holds {int((~torch.isfinite(t)).sum())} NaN/inf "
                                 f"values: the ECs in {str(tpath)!r} are unusable (diverged training?)")
            if t.numel() and not torch.isfinite(t.to(mod.weight.dtype)).all():
                raise SpearError(f"load_ecs: tensor {name}.{pname} overflows the model's dtype {mod.weight.dtype}")
            expected.add(f"{name}.{pname}")
        plan.append((name, rank, gate, want))
    extra = set(tensors) - expected
    if extra:
        raise SpearError(f"load_ecs: {len(extra)} tensors in {TENSORS} not described by the manifest, "
                         f"e.g. {sorted(extra)[0]!r}")
    return manifest, tensors, plan
