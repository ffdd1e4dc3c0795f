"""Hugging Face ``save_pretrained`` / ``from_pretrained`` for spear-quantized models (with ECs).

A registered HF quantization method ``"spear"`` (``register_quantization_config`` +
``register_quantizer``, the route transformers offers for third-party formats):

* Saving: ``spear_compile.quantize`` marks a transformers model as quantized with this method
  (``model.hf_quantizer``, ``config.quantization_config``), so ``model.save_pretrained(dir)`` writes
  each quantized linear as ``<module>.weight_qdata/_scale/_zero`` and each EC as ``<module>.ec_A``...
  in ``model.safetensors``, and ``config.json`` holds ``quantization_config`` with the spec, the
  per-module quantization parameters and the EC modules (rank, gate).
* Loading: ``AutoModelForCausalLM.from_pretrained(dir)`` (with ``import spear_compile`` done) rebuilds
  those modules before the weights load and turns them back into ``QuantizedWeight`` linears and
  ``CompensatedLinear`` ECs: bit-exact. ``from_pretrained(fp_dir, quantization_config=SpearHfConfig("w4-pc-rtn"))``
  quantizes a float checkpoint on load (RTN).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .config import QuantConfig
from ..ec.module import CompensatedLinear, ec_shapes
from ..errors import SpearError
from .io import own_storage
from .rtn import zeros_problem
from .weight import QuantizedWeight

METHOD = "spear"
QUANT_PARTS = ("qdata", "scale", "zero")


@register_quantization_config(METHOD)
class SpearHfConfig(QuantizationConfigMixin):
    """``quantization_config`` of a spear-quantized checkpoint: ``spec`` (e.g. ``"w4-pc-rtn"``),
    ``modules`` ``{name: {bits, group_size, symmetric, shape, dtype}}``, ``ec_modules`` ``{name: {rank, gate}}``."""

    def __init__(self, spec: str = "w4-pc-rtn", modules: Optional[dict] = None, ec_modules: Optional[dict] = None,
                 skip: Optional[list] = None, **kwargs):
        self.quant_method = METHOD
        self.spec = QuantConfig.from_spec(spec).spec if QuantConfig.from_spec(spec) is not None else "none"
        self.modules = dict(modules or {})
        self.ec_modules = dict(ec_modules or {})
        self.skip = list(skip) if skip is not None else ["lm_head"]

    def to_dict(self) -> dict:
        return {"quant_method": METHOD, "spec": self.spec, "modules": self.modules, "ec_modules": self.ec_modules,
                "skip": self.skip}


def describe_modules(model: nn.Module):
    """``(modules, ec_modules)`` metadata of ``model``'s quantized linears and ECs."""
    modules, ecs = {}, {}
    for name, m in model.named_modules():
        w = getattr(m, "weight", None)
        if isinstance(m, nn.Linear) and isinstance(w, QuantizedWeight):
            modules[name] = dict(bits=w.bits, group_size=w.group_size, symmetric=bool(w.symmetric),
                                 shape=list(w.shape), dtype=str(w.dtype).replace("torch.", ""))
        if isinstance(m, CompensatedLinear):
            ecs[name] = dict(rank=m.rank, gate=m.gate)
    return modules, ecs


class _Serialized(nn.Module):
    """What a quantized linear (and its EC) looks like while ``from_pretrained`` loads it: plain
    parameters under the names the checkpoint uses, made on the meta device."""

    def __init__(self, info: dict, ec: Optional[dict], bias: bool):
        super().__init__()
        n, k = info["shape"]
        dtype = getattr(torch, info["dtype"])
        cols = k // 2 if info["bits"] <= 4 else k
        groups = k // info["group_size"]
        self.in_features, self.out_features, self.info, self.ec = k, n, info, ec
        for part, shape, dt in (("qdata", (n, cols), torch.uint8), ("scale", (n, groups), dtype),
                                ("zero", (n, groups), dtype)):
            self.register_parameter(f"weight_{part}", nn.Parameter(torch.empty(shape, dtype=dt), requires_grad=False))
        self.bias = nn.Parameter(torch.empty(n, dtype=dtype)) if bias else None
        if ec is not None:
            for pname, shape in ec_shapes(n, k, ec["rank"], ec["gate"]).items():
                self.register_parameter(pname, nn.Parameter(torch.empty(shape, dtype=dtype)))

    def rebuild(self) -> nn.Linear:
        info = self.info
        qw = QuantizedWeight(self.weight_qdata.data, self.weight_scale.data, self.weight_zero.data, info["bits"],
                             info["group_size"], info["symmetric"], torch.Size(info["shape"]))
        lin = nn.Linear.__new__(nn.Linear)
        nn.Module.__init__(lin)
        lin.in_features, lin.out_features = self.in_features, self.out_features
        lin.weight = nn.Parameter(qw, requires_grad=False)
        lin.bias = self.bias
        if self.ec is None:
            return lin
        new = CompensatedLinear.wrap(lin, self.ec["rank"], self.ec["gate"])
        for pname in ec_shapes(self.out_features, self.in_features, self.ec["rank"], self.ec["gate"]):
            setattr(new, pname, nn.Parameter(getattr(self, pname).data))
        return new


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


@register_quantizer(METHOD)
class SpearHfQuantizer(HfQuantizer):
    """Loads (pre-quantized) and saves spear checkpoints; quantizes a float checkpoint with RTN on load."""

    requires_calibration = False

    def __init__(self, quantization_config, **kwargs):
        super().__init__(quantization_config, **kwargs)

    def validate_environment(self, *args, **kwargs):
        cfg = QuantConfig.from_spec(self.quantization_config.spec)
        if not self.pre_quantized and (cfg is None or cfg.method != "rtn"):
            raise SpearError("from_pretrained: quantizing on load supports RTN specs only, "
                             f"got {self.quantization_config.spec!r}; "
                             "use spear_compile.quantize(model, spec, calib=...) for GPTQ")

    def update_dtype(self, dtype):
        """A pre-quantized checkpoint loads in the dtype its scales were saved in (a float32 model around
        bf16 quantized linears would fail at its first forward): refused here, naming the dtype to use."""
        saved = ({info.get("dtype") for info in self.quantization_config.modules.values()} if self.pre_quantized
                 else set())
        if dtype is not None and saved and saved != {str(dtype).replace("torch.", "")}:
            raise SpearError(f"from_pretrained: this spear checkpoint is {'/'.join(sorted(saved))}; load it with "
                             f"dtype=torch.{sorted(saved)[0]} (got {dtype})")
        return dtype

    def _process_model_before_weight_loading(self, model, **kwargs):
        if not self.pre_quantized:
            return model
        cfg = self.quantization_config
        modules = dict(model.named_modules())
        for name, info in cfg.modules.items():
            m = modules.get(name)
            if not isinstance(m, nn.Linear):
                raise SpearError(f"from_pretrained: quantized module {name!r} of the checkpoint is not an nn.Linear "
                                 f"of {type(model).__name__}")
            if [m.out_features, m.in_features] != list(info["shape"]):
                raise SpearError(f"from_pretrained: {name!r} is [{m.out_features}, {m.in_features}] in the model, "
                                 f"{info['shape']} in the checkpoint")
            with torch.device("meta"):
                _set(model, name, _Serialized(info, cfg.ec_modules.get(name), m.bias is not None))
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        if not self.pre_quantized:
            from .api import quantize
            quantize(model, self.quantization_config.spec, skip=self.quantization_config.skip, progress=False)
            return model
        for name, m in list(model.named_modules()):
            if isinstance(m, _Serialized):
                if m.weight_qdata.is_meta:
                    raise SpearError(f"from_pretrained: the checkpoint lacks the tensors of quantized module {name!r}")
                problem = zeros_problem(m.weight_zero.data, m.info["bits"])
                if problem:
                    raise SpearError(f"from_pretrained: {name}.weight_zero of the checkpoint {problem}")
                _set(model, name, m.rebuild())
        return model

    def get_state_dict_and_metadata(self, model):
        modules, ecs = describe_modules(model)
        self.quantization_config.modules, self.quantization_config.ec_modules = modules, ecs
        model.config.quantization_config = self.quantization_config
        state = {}
        for key, t in model.state_dict().items():
            owner, _, leaf = key.rpartition(".")
            if isinstance(t, QuantizedWeight):
                for part in QUANT_PARTS:
                    state[f"{owner}.weight_{part}"] = own_storage(getattr(t, part))
            else:
                state[key] = own_storage(t)  # biases of packed siblings
        return state, {}

    def is_serializable(self, *args, **kwargs):
        return True

    @property
    def is_trainable(self):
        return False

    @property
    def is_compileable(self) -> bool:
        return True


def mark_hf_quantized(model: nn.Module, config: QuantConfig, skip) -> None:
    """Make a transformers model quantized by ``spear_compile.quantize`` saveable with ``save_pretrained``
    (as if it had been loaded with ``quantization_config=SpearHfConfig(spec)``). No-op for other modules."""
    if not (hasattr(model, "save_pretrained") and hasattr(model, "config")):
        return
    hf_cfg = SpearHfConfig(config.spec, skip=list(skip))
    model.hf_quantizer = SpearHfQuantizer(hf_cfg, pre_quantized=True)
    model.config.quantization_config = hf_cfg
    model.is_quantized = True
    model.quantization_method = METHOD
