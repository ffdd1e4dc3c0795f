"""The ``spear`` torch.compile backend: Inductor with our fusion pass installed.

``torch.compile(model, backend="spear", mode=..., options=...)`` works like the inductor backend (what the
passes saw goes to the innermost ``records.recording()`` block, if any); ``torch.compile(model,
backend=SpearBackend(mode, options))`` keeps it in the backend's own ``records`` (``optimize``, ``inspect``).
``mode`` maps to Inductor config exactly as for ``backend="inductor"`` ("reduce-overhead" ->
CUDA graphs, "max-autotune" -> autotuning + CUDA graphs), ``options`` are Inductor config
patches, plus ``spear_group_linears`` (bool, default on unless ``SPEAR_GROUP_LINEARS=0``: merge
sibling quantized linears of one input, e.g. q|k|v, into one launch). Our ``SpearPassManager``
becomes ``post_grad_custom_pre_pass``, composed with one the user set (in ``options`` or globally;
ours runs first).

Why the *pre* slot of the post-grad passes: Inductor's own post-grad pattern passes, which run
between the pre and post slots, rewrite the very chains we match (``add`` folded into ``addmm``;
small ``mm`` such as the M=1 decode EC gate decomposed into ``mul``+``sum``), so the post slot
would see a different graph per shape and device. ``post_grad_custom_post_pass`` stays the user's.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch._dynamo import register_backend

from ..errors import SpearError
from .pass_manager import SpearPassManager
from .records import CompileRecords, active

SLOT = "post_grad_custom_pre_pass"
GROUP_OPTION = "spear_group_linears"  # options={GROUP_OPTION: False}: no horizontal fusion of sibling linears
DECOMPOSE_OPTION = "spear_decompose_prefill"  # options={DECOMPOSE_OPTION: False}: keep prefill linears as our op
MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def config_patches(mode: Optional[str] = None, options: Optional[dict] = None, dump_dir: Optional[str] = None,
                   records: Optional[CompileRecords] = None) -> dict:
    """The Inductor config patches for ``mode``/``options`` with our pass installed (recording into ``records``)."""
    if mode not in MODES:
        raise SpearError(f"spear backend: unknown mode {mode!r}; supported: {MODES}")
    options = {k.replace("-", "_"): v for k, v in (options or {}).items()}
    group_linears = options.pop(GROUP_OPTION, None)
    decompose = options.pop(DECOMPOSE_OPTION, None)
    known = torch._inductor.config.get_config_copy()
    unknown = sorted(k for k in options if k not in known)
    if unknown:
        raise SpearError(f"spear backend: unknown Inductor option(s) {unknown} in options=")
    patches = dict(torch._inductor.list_mode_options(mode)) if mode not in (None, "default") else {}
    # Inductor's CUDA pad_mm (a benchmark-driven joint-graph rewrite that runs before our pass)
    # can pad the EC's skinny matmuls into pad/mm/slice chains no pattern matches; off unless asked.
    patches["shape_padding"] = False
    patches.update(options)
    user_pass = options.get(SLOT, getattr(torch._inductor.config, SLOT))
    if isinstance(user_pass, SpearPassManager):  # already ours (nested compile): do not stack
        user_pass = user_pass.user_pass
    patches[SLOT] = SpearPassManager(user_pass=user_pass, dump_dir=dump_dir, group_linears=group_linears,
                                     decompose_prefill=decompose, records=records)
    return patches


class SpearBackend:
    """A ``torch.compile`` backend: Inductor + our passes, recording every graph it compiles into ``records``."""

    def __init__(self, mode: Optional[str] = None, options: Optional[dict] = None,
                 records: Optional[CompileRecords] = None):
        config_patches(mode, options)  # refuse a bad mode or option now, not at the first call
        self.mode, self.options = mode, dict(options or {})
        self.records = records if records is not None else CompileRecords()

    def __call__(self, gm: torch.fx.GraphModule, example_inputs, mode: Optional[str] = None,
                 options: Optional[dict] = None):
        """``mode``/``options``: what ``torch.compile(..., mode=, options=)`` passes (else the backend's own)."""
        from torch._inductor.compile_fx import compile_fx
        patches = config_patches(mode or self.mode, options if options is not None else self.options,
                                 records=self.records)
        return compile_fx(gm, example_inputs, config_patches=patches)


@register_backend
def spear(gm: torch.fx.GraphModule, example_inputs, mode: Optional[str] = None, options: Optional[dict] = None):
    """Inductor + the spear fusion pass (``torch.compile(m, backend="spear")``); records into ``records.active()``."""
    return SpearBackend(records=active())(gm, example_inputs, mode, options)
