"""Engine configuration."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from ..errors import SpearError


def powers_of_two_up_to(n: int, start: int = 1) -> tuple:
    out, b = [], start
    while b < n:
        out.append(b)
        b *= 2
    out.append(n)
    return tuple(out)


@dataclass
class EngineConfig:
    """``max_num_seqs``: most requests running at once (the largest decode bucket). ``max_model_len``: most tokens
    (prompt + output) per request (None: the model's ``max_position_embeddings``, capped by the KV cache).
    ``block_size``: tokens per KV block. ``num_blocks``: KV blocks (None: from ``gpu_memory_utilization`` on CUDA,
    ``cpu_num_blocks`` on CPU). ``max_num_tokens``: most tokens in one step (the largest token bucket).
    ``policy``: a scheduler policy name (``make_policy``). ``cuda_graphs``: decode-only steps replay CUDA graphs
    per batch bucket (1, 2, 4, ..., max_num_seqs), captured at start-up, and mixed steps per input-shape key,
    captured at the key's first step, up to ``mixed_cuda_graphs`` of them (CUDA only). ``compile``:
    compile the step function with the ``spear`` backend (all buckets at start-up)."""
    max_num_seqs: int = 64
    max_model_len: Optional[int] = None
    block_size: int = 16
    num_blocks: Optional[int] = None
    max_num_tokens: int = 2048
    policy: str = "budget-512"
    ttft_slo_ms: Optional[float] = None
    tpot_slo_ms: Optional[float] = None
    cuda_graphs: bool = True
    mixed_cuda_graphs: int = 1024           # most mixed-step graphs (0: mixed steps uncaptured); the graphs share
    #   the decode graphs' memory pool and one logits buffer, so each adds little memory; a step beyond runs uncaptured,
    #   as every new key does once a capture leaves the device under 1 GiB free (GraphCapture.MIN_FREE_BYTES). 256
    #   was reached in the first measured run of session 20's serving bench (243 graphs after one warm-up run of a
    #   1B model at 16.7 req/s), and the uncaptured steps that followed (30-45 ms) decided every probe's p99 ITL
    mixed_graph_padding: float = 2.0        # a mixed step whose input shapes have no graph replays a captured one
    #   of larger shapes that covers them (the same tokens and decode rows; its prefill attention work and decode
    #   tables at most this many times the step's own: buckets.MixedDims.covers) instead of running uncaptured and
    #   capturing its own (0: off). In a simulation on session 21's H100 step costs, 2.0 cut the shapes first met in
    #   the measured runs by a third (serving_sim --graph-padding); on the H100 (session 22's serving bench) the
    #   measured runs met 0-9 first-time shapes instead of 7-12, and budget-512's capacity rose 16.64 -> 46.95 req/s
    mixed_graph_bucket_padding: float = 2.0  # > 1: the covering graph may also have up to this many times the
    #   step's tokens and decode rows (a larger token bucket: more linear work, priced by the SLO policy; 1: off).
    #   Each capture stalls every running request for 50-120 ms. At 1.0 session 24's H100 runs captured 4-19 graphs
    #   per measured run after warm-ups; at 2.0 session 25's (results/serving_slo_h100_s25.md) `slo` captured 0-1 per
    #   run, with p99 per-token latency inside a 10 ms SLO
    mixed_shape_cache: bool = True          # keep the mixed-step shapes this engine captures beside the tuning cache
    #   and capture them at the next start-up of the same engine, before serving (shape_cache.py; a new shape's
    #   first step costs an eager run and a capture: 15-50 ms on an H100). Off with the on-disk cache
    #   (SPEAR_TUNE_CACHE=0) or without mixed-step graphs
    mixed_capture_first: bool = True        # a new mixed-step shape whose token count and logits rows already ran
    #   eagerly is captured at once and replayed, skipping its eager run (MixedGraphs.first_step): one host pass
    #   over the step instead of two. Session 34, one H200, 256 requests: W4 + EC captures 36 ms median instead of
    #   60, the fresh engine 14,671 tok/s instead of 12,009 (bf16: 17,003 instead of 15,570)
    compile: bool = True
    compile_regions: bool = False           # compile one decoder layer (once per distinct layer structure) and the
    #   LM head instead of the whole model per phase: a fraction of the start-up compile time; the layers then run
    #   as separate graphs (no fusion across a layer boundary: 6-9 % slower replays on an H200), hence off by default
    device: Optional[str] = None
    dtype: torch.dtype = torch.bfloat16
    seed: int = 0
    gpu_memory_utilization: float = 0.5   # share of the free GPU memory (after weights) given to the KV cache
    cpu_num_blocks: int = 512
    min_token_bucket: int = 16
    decode_buckets: Optional[tuple] = None  # None: powers of two up to max_num_seqs
    token_buckets: Optional[tuple] = None   # None: powers of two from min_token_bucket up to max_num_tokens
    detokenize: bool = True                 # incremental text per request (requests with stop strings always)
    cuda_graphs_stand_in: bool = False      # tests: off CUDA, decode "graphs" re-run the function on static buffers
    progress: bool = True                   # a progress bar (stderr) while compiling / capturing at start-up
    step_log_size: int = 4096
    profile_points: Optional[int] = None    # policy "slo*": grid points of the start-up step-cost profile (None: all)
    overlap_decode: bool = False            # launch decode step N+1 before reading step N's tokens (overlap.py)
    static_decode_rows: Optional[int] = None  # compile decode batches up to this size per batch size (None: 16 when
    #                                          tensor parallelism's peer-reduction epilogue is on, else 0)
    decode_attention: str = "torch"          # decode rows' attention: "torch" (gather K/V, two matmuls, softmax) or
    #   "triton" (one paged kernel per layer: lowering/attention.py; off by default until measured on a GPU)
    enable_prefix_caching: bool = False     # reuse the KV blocks of cached prompt prefixes (kv_cache.py; off by
    #   default until measured on a GPU)
    freeze_gc: Optional[bool] = None        # after start-up, collect once and move every object alive into the
    #   collector's permanent generation (gc.freeze), so no full collection walks the compiler's millions of objects
    #   in the middle of a step (None: on CUDA only)
    ec_switch: Optional[bool] = None        # compile + capture the steps without ECs too, so set_ec_enabled(False)
    #   can switch them off while serving (None: on for the "slo" policies, whose EC-aware cost model is fitted on
    #   steps with and without ECs; off otherwise: start-up compiles, tunes and captures half as much)

    def __post_init__(self):
        def pos_int(name, lo=1):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise SpearError(f"EngineConfig: {name}={v!r} must be an integer >= {lo}")
        for name in ("max_num_seqs", "block_size", "max_num_tokens", "cpu_num_blocks", "min_token_bucket",
                     "step_log_size"):
            pos_int(name)
        if self.num_blocks is not None:
            pos_int("num_blocks", 2)
        if self.profile_points is not None:
            pos_int("profile_points", 2)
        if self.max_model_len is not None:
            pos_int("max_model_len", 2)
        if self.static_decode_rows is not None:
            pos_int("static_decode_rows", 0)
        pos_int("mixed_cuda_graphs", 0)
        p = self.mixed_graph_padding
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not (p == 0 or 1 <= p <= 64):
            raise SpearError(f"EngineConfig: mixed_graph_padding={p!r} must be 0 (off) or a number in [1, 64]")
        b = self.mixed_graph_bucket_padding
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not 1 <= b <= 64:
            raise SpearError(f"EngineConfig: mixed_graph_bucket_padding={b!r} must be a number in [1, 64] (1: off)")
        if self.max_num_tokens < self.max_num_seqs:
            raise SpearError(f"EngineConfig: max_num_tokens={self.max_num_tokens} must be >= max_num_seqs="
                             f"{self.max_num_seqs} (a step holds one token per running decode)")
        if not 0.0 < self.gpu_memory_utilization <= 0.95:
            raise SpearError(f"EngineConfig: gpu_memory_utilization={self.gpu_memory_utilization} must be in (0, 0.95]")
        for name in ("ttft_slo_ms", "tpot_slo_ms"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and v > 0):
                raise SpearError(f"EngineConfig: {name}={v!r} must be a positive number of milliseconds or None")
        if self.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise SpearError(f"EngineConfig: dtype={self.dtype} must be bfloat16, float16 or float32")
        for name in ("mixed_capture_first", "mixed_shape_cache", "enable_prefix_caching", "compile_regions"):
            if not isinstance(getattr(self, name), bool):
                raise SpearError(f"EngineConfig: {name}={getattr(self, name)!r} must be True or False")
        if self.freeze_gc is not None and not isinstance(self.freeze_gc, bool):
            raise SpearError(f"EngineConfig: freeze_gc={self.freeze_gc!r} must be True, False or None")
        if self.decode_attention not in ("torch", "triton"):
            raise SpearError(f"EngineConfig: decode_attention={self.decode_attention!r} must be 'torch' or 'triton'")
        slo = isinstance(self.policy, str) and self.policy.startswith("slo")
        if self.ec_switch is None:
            self.ec_switch = slo
        elif not isinstance(self.ec_switch, bool):
            raise SpearError(f"EngineConfig: ec_switch={self.ec_switch!r} must be True, False or None")
        elif slo and not self.ec_switch:
            raise SpearError(f"EngineConfig: policy={self.policy!r} needs ec_switch=True (its EC-aware step cost model "
                             "is fitted on steps with and without ECs)")
        if self.decode_buckets is None:
            self.decode_buckets = powers_of_two_up_to(self.max_num_seqs)
        if self.token_buckets is None:
            self.token_buckets = powers_of_two_up_to(self.max_num_tokens,
                                                     min(self.min_token_bucket, self.max_num_tokens))
        self.decode_buckets = tuple(sorted(set(self.decode_buckets)))
        self.token_buckets = tuple(sorted(set(self.token_buckets)))
        if self.decode_buckets[-1] != self.max_num_seqs or self.decode_buckets[0] < 1:
            raise SpearError(f"EngineConfig: decode_buckets={self.decode_buckets} must end at "
                             f"max_num_seqs={self.max_num_seqs}")
        if self.token_buckets[-1] != self.max_num_tokens or self.token_buckets[0] < 1:
            raise SpearError(f"EngineConfig: token_buckets={self.token_buckets} must end at "
                             f"max_num_tokens={self.max_num_tokens}")
