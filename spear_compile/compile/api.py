"""``spear_compile.optimize``: quantize, attach ECs, compile with the ``spear`` backend.

For a Hugging Face model the module's ``forward`` is compiled in place (the HF static-cache recipe,
``model.forward = torch.compile(model.forward, ...)``) so ``generate`` and hand decode loops keep
working, and HF's own auto-compile is turned off so it does not wrap our compiled forward in a
plain-inductor one. Any other module is returned as ``torch.compile(module, backend="spear")``.
"""
from __future__ import annotations

from typing import Iterable, Optional, Union

import torch
import torch.nn as nn

from . import backend as _backend
from .records import active
from ..errors import SpearError
from ..modules import CACHE_KWARGS
from ..quant.api import DEFAULT_SKIP, as_config, quantize
from ..quant.config import QuantConfig
from ..quant.weight import QuantizedWeight
from ..transaction import model_transaction
from .siblings import pack_siblings
from .unwrap import unwrap_quantized


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(p, QuantizedWeight) for p in model.parameters())


def check_quantized_as(model: nn.Module, config: QuantConfig, where: str) -> None:
    """Every quantized linear of an already-quantized ``model`` was made with ``config`` (else the
    caller's ``quant=`` would be silently ignored)."""
    from ..quant.api import describe_weight, weight_matches
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if isinstance(w, QuantizedWeight) and not weight_matches(w, config):
            raise SpearError(f"{where}: the model is already quantized ({name!r} is {describe_weight(w)}), which "
                             f"conflicts with quant={config.spec!r}; pass quant=None to keep its weights, or start "
                             f"from the floating-point model")


def _is_hf(model: nn.Module) -> bool:
    return hasattr(model, "generation_config") and hasattr(model, "config")


def optimize(model: nn.Module, quant: Union[str, QuantConfig, None] = "w4-pc-rtn", ec: Optional[str] = None,
             mode: Optional[str] = None, fullgraph: bool = False, dynamic: Optional[bool] = None,
             options: Optional[dict] = None, calib: Optional[torch.Tensor] = None,
             skip: Iterable[str] = DEFAULT_SKIP, unwrap: bool = True, skip_module_guards: bool = False):
    """Quantize ``model`` (skipped when already quantized or ``quant=None``), load the ECs in
    ``ec`` (a directory written by ``save_ecs``) and compile with the ``spear`` backend.

    ``mode``: None/"default", "reduce-overhead" (CUDA graphs; use with a static KV cache for
    decode; the decode kernels are warmed up first, see ``warm_kernels``), "max-autotune".
    Compilation is lazy: it happens on the first call (wrap that call in ``spear_compile.debug(dir)``
    to dump the graphs). ``options``: Inductor config patches (not together with ``mode``).
    ``skip``: names of linears left unquantized (default ``("lm_head",)``; ``()`` quantizes the LM
    head too, as gpt-fast and torchao do; a tied embedding keeps its float weight).
    ``unwrap``: compile a forward that reads the quantized weights' inner tensors rather than the
    ``QuantizedWeight`` subclass (see ``compile/unwrap.py``: per-call host overhead); same graph, same pass.
    ``skip_module_guards``: Dynamo does not guard the model's module attributes and parameters
    (``torch.compiler.skip_guard_on_all_nn_modules_unsafe``, as serving engines do): less host
    time per call (the guard checks are a large part of a CUDA-graph decode step's host time), but
    changing a module attribute after compiling is not detected. Off by default.
    Returns the compiled module (HF models: the same object with a compiled ``forward``); its ``spear_records``
    (``compile.records.CompileRecords``) fill as graphs compile: what the passes matched, grouped, decomposed.
    """
    if not isinstance(model, nn.Module):
        raise SpearError(f"optimize: expected an nn.Module, got {type(model).__name__}")
    if mode not in _backend.MODES:
        raise SpearError(f"optimize: unknown mode {mode!r}; supported: {_backend.MODES}")
    if mode not in (None, "default") and options:
        raise SpearError("optimize: give either mode= or options=, not both (as torch.compile)")
    if quant is not None and not isinstance(quant, (str, QuantConfig)):
        raise SpearError(f"optimize: quant must be a spec string like 'w4-pc-rtn', a QuantConfig or None, "
                         f"got {type(quant).__name__}")
    config = as_config(quant) if quant is not None else None
    if ec is not None:  # every check on the ECs before the model is quantized
        if config is None:
            raise SpearError("optimize: ec= needs quant= (the quantization config the ECs were calibrated for)")
        from ..ec.io import check_ec_dir, check_ecs_before_quantizing
        check_ec_dir(ec, config)
        if not is_quantized(model):
            check_ecs_before_quantizing(model, ec, config)
    if config is not None and is_quantized(model):
        check_quantized_as(model, config, "optimize")
    with model_transaction(model):  # a failure below leaves the model as it was given
        if config is not None and not is_quantized(model):
            quantize(model, config, calib=calib, skip=skip, progress=False)
        if ec is not None:
            if not is_quantized(model):
                raise SpearError("optimize: ec= needs a quantized model")
            from ..ec.io import load_ecs
            load_ecs(model, ec, config)
        # sibling weights as one buffer: a grouped linear runs as one GEMM at M > 16
        pack_siblings(model, group_linears=(options or {}).get(_backend.GROUP_OPTION))
        if unwrap:
            unwrap_quantized(model)
        if mode in ("reduce-overhead", "max-autotune"):
            warm_kernels(model, ms=(1,))  # tune + allocate kernel workspaces before CUDA-graph capture
    backend = _backend.SpearBackend(records=active())  # what the passes saw: ``compiled.spear_records``
    kw = dict(backend=backend, fullgraph=fullgraph, dynamic=dynamic)
    if skip_module_guards:  # the guard filter is an option, and torch.compile takes mode or options
        kw["options"] = {**module_guard_free_options(mode), **(options or {})}
    elif mode not in (None, "default"):
        kw["mode"] = mode
    elif options:
        kw["options"] = options
    if _is_hf(model):
        model.generation_config.disable_compile = True
        if cudagraphs_mode(mode, options) and getattr(model.generation_config, "cache_implementation", None) is None:
            model.generation_config.cache_implementation = "static"  # CUDA graphs need fixed cache shapes
        compiled = torch.compile(model.forward, **kw)
        model.forward = _decode_only(model.forward, compiled) if cudagraphs_mode(mode, options) else compiled
        model.spear_records = backend.records
        return model
    compiled = torch.compile(model, **kw)
    compiled.spear_records = backend.records
    return compiled


def cudagraphs_mode(mode, options) -> bool:
    return mode in ("reduce-overhead", "max-autotune") or bool((options or {}).get("triton.cudagraphs"))


def _decode_only(eager_forward, compiled_forward):
    """An HF forward for CUDA-graph modes: one new token per row (decode) runs ``compiled_forward``, anything else
    (prefill) runs ``eager_forward``, as HF's own compiled ``generate`` does.

    Why: transformers allocates a static cache's tensors lazily, inside the first forward that updates them (the
    prefill). Compiled under CUDA graphs, that forward allocates them from the graph's private memory pool: they are
    graph outputs, and the next replay overwrites them ("accessing tensor output of CUDAGraphs that has been
    overwritten by a subsequent run", raised from the cache's ``index_copy_``). Run eagerly, the prefill allocates
    them as ordinary tensors (marked static by transformers) that the decode graph updates in place. It also keeps
    every prompt length from compiling and recording a graph of its own. ``torch.compiler.cudagraph_mark_step_begin``
    before each decode call: the previous step's outputs (logits) may be overwritten, as generate copies them first.

    Supported path: ``optimize(model, mode="reduce-overhead")`` then ``model.generate(..., cache_implementation=
    "static")`` (``optimize`` makes the static cache the default when none is set); with and without ECs."""
    import functools

    @functools.wraps(eager_forward)
    def forward(*args, **kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
            new_tokens = ids.shape[1] if ids is not None and ids.dim() == 3 else None
        else:
            new_tokens = ids.shape[-1]
        cache = next((kwargs[k] for k in CACHE_KWARGS if kwargs.get(k) is not None), None)
        fresh = any(not getattr(layer, "is_initialized", True) for layer in getattr(cache, "layers", ()))
        if new_tokens != 1 or fresh:  # prefill, or a one-token prompt whose cache is not allocated yet
            return eager_forward(*args, **kwargs)
        torch.compiler.cudagraph_mark_step_begin()
        return compiled_forward(*args, **kwargs)
    forward._spear_compiled = compiled_forward
    return forward


def module_guard_free_options(mode: Optional[str] = None) -> dict:
    """``torch.compile`` options equal to ``mode`` plus a guard filter that drops the guards on
    nn-module state (``torch.compile`` takes either ``mode`` or ``options``, and the filter is an option)."""
    fn = getattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe", None)
    if fn is None:
        raise SpearError("skip_module_guards: this torch has no torch.compiler.skip_guard_on_all_nn_modules_unsafe")
    opts = dict(torch._inductor.list_mode_options(mode)) if mode not in (None, "default") else {}
    opts["guard_filter_fn"] = fn
    return opts


@torch.no_grad()
def warm_kernels(model: nn.Module, ms=(1,), example: Optional[dict] = None) -> int:
    """Run ``spear::fused_linear`` once eagerly per distinct (shape, EC, M) of ``model``'s quantized
    linears, and ``spear::grouped_linear`` once per distinct group of sibling linears (those reading
    the same input, which the grouping pass fuses into one launch), so kernel tuning and the kernels'
    persistent workspaces happen before CUDA-graph capture (``mode="reduce-overhead"``) rather than
    inside the graph's memory pool. Siblings are found by one eager forward of ``example`` (keyword
    inputs; for a Hugging Face causal LM a one-token ``input_ids`` is made up) with hooks that see
    which linears receive the same input tensor. Returns the number of distinct calls made.
    A no-op off CUDA."""
    from ..ec.module import CompensatedLinear
    seen = set()
    for mod in model.modules():
        w = getattr(mod, "weight", None)
        if not isinstance(mod, nn.Linear) or not isinstance(w, QuantizedWeight) or not w.qdata.is_cuda:
            continue
        ec = mod if isinstance(mod, CompensatedLinear) and mod.rank > 0 else None
        tensors = (ec.ec_A, ec.ec_B, ec.ec_gate_w, ec.ec_gate_b) if ec is not None else (None,) * 4
        for m in ms:
            key = (tuple(w.shape), w.group_size, w.dtype, m, mod.bias is not None,
                   ec.rank if ec else 0, ec is not None and ec.gate)
            if key in seen:
                continue
            seen.add(key)
            x = torch.randn(m, w.shape[1], dtype=w.dtype, device=w.qdata.device)
            torch.ops.spear.fused_linear(x, w.qdata, w.scale, w.zero, mod.bias, w.group_size, *tensors)
    if not seen:
        return 0
    from .. import options
    from ..lowering.grouped import warm_grouped
    groups = sibling_groups(model, example) if options.current().group_linears else []
    for members in groups:
        w = members[0].weight
        key = (w.shape[1], tuple(m.weight.shape[0] for m in members), w.group_size, w.dtype,
               members[0].bias is not None)
        if key not in seen:
            seen.add(key)
            warm_grouped(key[0], key[1], key[2], key[3], key[4], ms, device=w.qdata.device)
    torch.cuda.synchronize()
    return len(seen)


@torch.no_grad()
def sibling_groups(model: nn.Module, example: Optional[dict] = None, with_ec: bool = False) -> list:
    """The groups of quantized, EC-free linears the grouping pass would fuse: those that read the same
    input tensor (same K, group size, dtype and bias-ness), in call order, split like the pass does
    (``balanced_chunks``). ``with_ec``: also those that all carry an EC of one rank and gate (the pass's
    ``spear::grouped_linear_ec``). Found by one eager forward with input hooks;
    ``[]`` when no example can be made (not a Hugging Face model and no ``example`` given)."""
    from ..ec.module import CompensatedLinear
    from .passes.group_sibling_linears import balanced_chunks
    if example is None:
        if not _is_hf(model):
            return []
        dev = next(model.parameters()).device
        example = {"input_ids": torch.zeros(1, 1, dtype=torch.long, device=dev), "use_cache": False}
    calls = []  # (id of input tensor, module) in call order
    hooks = []
    for mod in model.modules():
        w = getattr(mod, "weight", None)
        if isinstance(mod, nn.Linear) and isinstance(w, QuantizedWeight) and (with_ec or not (
                isinstance(mod, CompensatedLinear) and mod.rank > 0)):
            hooks.append(mod.register_forward_pre_hook(lambda m, args: calls.append((args[0], m))))
    try:
        model(**example)
    except Exception as e:  # noqa: BLE001  (warm-up is best effort: the compiled model still works)
        import warnings
        warnings.warn(f"warm_kernels: could not run {type(model).__name__} on a made-up example to find sibling "
                      f"linears ({type(e).__name__}: {e}); grouped launches will be tuned on first use")
        return []
    finally:
        for h in hooks:
            h.remove()
    buckets: dict = {}
    for x, mod in calls:
        w = mod.weight
        ec = (mod.rank, mod.gate) if isinstance(mod, CompensatedLinear) and mod.rank > 0 else None
        key = (id(x), w.shape[1], w.group_size, w.dtype, mod.bias is not None, ec)
        if mod not in buckets.setdefault(key, []):
            buckets[key].append(mod)
    return [chunk for mods in buckets.values() for chunk in balanced_chunks(mods) if len(chunk) >= 2]
