"""The mixed-step graph shapes an engine captured while serving, kept beside the tuning cache, so that the next
start-up of the same engine (model shapes and weight formats, buckets, device) captures them before serving.

A mixed step's graph is captured at the first step of its input shapes (``MixedGraphs.first_step``: an eager run,
then the capture), which costs that step 15-50 ms on an H100 with Llama-3.2-1B: 47 such steps took 0.8 s (bf16) to
1.8 s (W4) of a 2.3-3.8 s pass over 256 requests (``bench/results/serving_host_overhead_h100_s31.md``). The shapes
a workload produces repeat from one run to the next, as the tuning cache's keys do; with this file the start-up
pays for them instead of the first requests (``EngineConfig.mixed_shape_cache``; off with the on-disk cache,
``SPEAR_TUNE_CACHE=0``).
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Tuple

import torch

from . import json_cache
from .buckets import MixedDims

SCHEMA = 1
WHAT = "mixed-step shape cache"


def cache_fields(runner, model) -> dict:
    """What the recorded shapes are valid for: the device, the model's sizes and weight formats, the buckets and the
    mixed-step padding settings (which decide the shapes a trace captures)."""
    cfg = runner.config
    device = runner.device
    return dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
                model=json_cache.model_fingerprint(model), layout=json_cache.engine_layout(runner),
                ecs=bool(runner.net.has_ecs),
                max_num_seqs=cfg.max_num_seqs, max_num_tokens=cfg.max_num_tokens,
                decode_attention=cfg.decode_attention, mixed_graph_padding=cfg.mixed_graph_padding,
                mixed_graph_bucket_padding=cfg.mixed_graph_bucket_padding)


def _parse(rows) -> List[Tuple[bool, MixedDims]]:
    if not isinstance(rows, list):
        raise ValueError("no shape list")
    names = [f.name for f in dataclasses.fields(MixedDims)]
    out = []
    for row in rows:
        use_ec, dims = row
        if not isinstance(use_ec, bool) or not isinstance(dims, dict) or sorted(dims) != sorted(names) or \
                not all(isinstance(v, int) and v > 0 for v in dims.values()):
            raise ValueError(f"bad entry {row!r}")
        out.append((use_ec, MixedDims(**dims)))
    return out


class MixedShapeCache:
    """The recorded ``(use_ec, MixedDims)`` of one engine's file (``path`` None: not kept)."""

    def __init__(self, path: Optional[str], fields: dict):
        self.path = path
        self.fields = fields
        self.entries: List[Tuple[bool, MixedDims]] = json_cache.load(path, SCHEMA, fields, "shapes", _parse, WHAT,
                                                                      "rewritten as this engine captures") or []
        self._known = set(self.entries)

    @classmethod
    def for_runner(cls, runner, model) -> "MixedShapeCache":
        fields = cache_fields(runner, model)
        return cls(json_cache.path_for("mixed-shapes", fields), fields)

    def add(self, use_ec: bool, dims: MixedDims) -> None:
        """Record a captured shape (the file rewritten when it is new)."""
        if (use_ec, dims) in self._known or self.path is None:
            return
        self._known.add((use_ec, dims))
        self.entries.append((use_ec, dims))
        json_cache.save(self.path, SCHEMA, self.fields, "shapes",
                        [[ec, dataclasses.asdict(d)] for ec, d in self.entries], WHAT)
