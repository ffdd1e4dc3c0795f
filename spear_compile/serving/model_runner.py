"""The model side of the engine: ``PagedLlama`` (``paged_llama.py``, the paged-KV forward over the HF model's own
modules) compiled per phase, decode steps replayed from CUDA graphs, and each step's requests turned into tensors.

Two entry points, each compiled once with dynamic sizes (every dynamic size padded to >= 2, so Dynamo's 0/1
specialization never adds graphs): ``decode_forward`` (decode-only steps; on CUDA captured as one CUDA graph per
(batch bucket, block-table bucket), per EC state) and ``mixed_forward`` (steps with prefill chunks, decodes riding
along; padded to token buckets; on CUDA captured lazily, one graph per input-shape key at its first step, up to
``config.mixed_cuda_graphs``). ``use_ec`` is a Python bool argument: each EC state gets its own graphs.
"""
from __future__ import annotations

import array
import dataclasses
import functools
import sys
import time
from typing import Optional

import torch
import torch.nn as nn

from ..errors import SpearError
from .buckets import (MIN_DIM, MixedDims, attention_cells_at, mixed_step_dims, mixed_step_dims_for, next_bucket,
                      pow2_buckets, pow2_dim, table_width)
from .config import EngineConfig
from .cuda_graphs import (DecodeGraph, GraphCapture, MixedGraphs, StandInGraph, multi_rank, pack_flat,
                          unpack_flat)
from .kv_cache import PAD_BLOCK
from .shape_cache import MixedShapeCache
from .paged_llama import PagedLlama

def int64_tensor(values: list) -> torch.Tensor:
    """A CPU int64 tensor of a flat list of ints (through ``array``: several times faster than ``torch.tensor``)."""
    return (torch.frombuffer(array.array("q", values), dtype=torch.int64) if values
            else torch.zeros(0, dtype=torch.int64))


def patch_ids(ids: torch.Tensor, device_ids) -> None:
    """Overlapped steps: ``ids[dst[i]] = tokens[src[i]]`` on the device (``device_ids = (tokens, src, dst)``, the
    index lists on the host); a slice copy when the rows are the previous step's, in order."""
    tokens, src, dst = device_ids
    if src == dst == list(range(len(src))):
        ids[:len(src)].copy_(tokens[:len(src)])
        return
    index = int64_tensor(src + dst)
    if ids.is_cuda:   # pinned: the copy queues behind the step in flight instead of making the host wait for it
        index = index.pin_memory()
    index = index.to(ids.device, non_blocking=True)
    ids.index_copy_(0, index[len(src):], tokens.index_select(0, index[:len(src)]))


def kv_blocks_that_fit(model: nn.Module, config: EngineConfig, device: torch.device) -> int:
    """KV blocks for ``model`` (its config's sizes: local ones after ``parallelize``): ``config.num_blocks``, else
    ``gpu_memory_utilization`` of the free memory on CUDA, else ``cpu_num_blocks``."""
    if config.num_blocks is not None:
        return config.num_blocks
    if device.type != "cuda":
        return config.cpu_num_blocks
    cfg = model.config
    num_kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    dtype = model.model.embed_tokens.weight.dtype
    block_bytes = 2 * cfg.num_hidden_layers * config.block_size * num_kv * head_dim * torch.finfo(dtype).bits // 8
    free, _ = torch.cuda.mem_get_info(device)
    return int(free * config.gpu_memory_utilization) // block_bytes


def static_decode_rows(model: nn.Module, config: EngineConfig) -> int:
    """Decode batches up to this many rows compile with a static batch size: ``config.static_decode_rows``, else
    ``distributed.peer_reduce.MAX_M`` when a row-parallel EC layer has a peer-reduction slot (its pass rewrites only
    static M <= MAX_M), else 0 (one dynamic graph for every batch)."""
    if config.static_decode_rows is not None:
        return config.static_decode_rows
    if any(getattr(m, "peer_args", None) for m in model.modules()):
        from ..distributed.peer_reduce import MAX_M
        return MAX_M
    return 0


class ModelRunner:
    """Owns the paged model, its compiled entry points and CUDA graphs; turns a step's requests into tensors."""

    def __init__(self, model: nn.Module, config: EngineConfig, device: torch.device):
        self.config = config
        self.device = device
        cfg = model.config
        self.block_size = config.block_size
        num_blocks = kv_blocks_that_fit(model, config, device)
        if num_blocks < 2:
            raise SpearError(f"serving engine: only {num_blocks} KV blocks fit; lower max_num_seqs/block_size or raise "
                             "gpu_memory_utilization")
        self.num_blocks = num_blocks
        model_max = getattr(cfg, "max_position_embeddings", None) or 2048
        want = config.max_model_len or model_max
        if want > model_max:
            raise SpearError(f"EngineConfig: max_model_len={want} exceeds the model's "
                             f"max_position_embeddings={model_max}")
        self.max_model_len = min(want, (num_blocks - 1) * config.block_size)
        self.max_blocks_per_seq = -(-self.max_model_len // config.block_size)
        self.table_buckets = pow2_buckets(MIN_DIM, max(MIN_DIM, self.max_blocks_per_seq))
        self.decode_buckets = config.decode_buckets
        self.token_buckets = tuple(b for b in config.token_buckets)
        self.net = PagedLlama(model, num_blocks, config.block_size, self.max_model_len, config.decode_attention)
        self.vocab_size = self.net.lm_head.weight.shape[0] if hasattr(self.net.lm_head, "weight") else cfg.vocab_size
        self.use_cuda_graphs = config.cuda_graphs and (device.type == "cuda" or config.cuda_graphs_stand_in)
        self._decode_fn = self.net.decode_forward
        self._mixed_fn = self.net.mixed_forward
        self.static_rows = static_decode_rows(model, config)
        self._decode_static_fn = self.net.decode_forward_static_rows
        if config.compile:
            from ..compile import backend  # noqa: F401  (registers "spear")

            def compiled(fn):
                return torch.compile(fn, backend="spear", dynamic=True, fullgraph=True)
            if config.compile_regions:   # (start() refused it with static decode rows)
                head = compiled(self.net.logits)
                self._decode_fn = functools.partial(self.net.decode_loop, compiled(self.net.decode_layer), head)
                self._mixed_fn = functools.partial(self.net.mixed_loop, compiled(self.net.mixed_layer), head)
            else:
                self._decode_fn = compiled(self.net.decode_forward)
                self._decode_static_fn = compiled(self.net.decode_forward_static_rows)
                self._mixed_fn = compiled(self.net.mixed_forward)
        self.graphs: dict = {}           # (use_ec, batch bucket, table bucket) -> DecodeGraph
        self.step_sink = None            # tensor parallelism, rank 0: gets every step's inputs before its forward
        self.capture = GraphCapture(device)
        self.mixed = MixedGraphs(self.capture, config.mixed_cuda_graphs if self.use_cuda_graphs and not multi_rank()
                                 else 0, max_rows=pow2_dim(config.max_num_seqs),
                                 capture_first=config.mixed_capture_first)
        self.shapes = None               # the mixed-step shapes kept on disk (shape_cache.py), captured at start-up
        if config.mixed_shape_cache and self.mixed.limit:
            self.shapes = MixedShapeCache.for_runner(self, model)
            self.mixed.on_capture = lambda key: self.shapes.add(key[0], MixedDims.from_shapes(key[1]))
        self.graphs_before_serving: Optional[int] = None
        self.last_mixed_dims: Optional[tuple] = None   # the padded sizes of the last mixed step served (MixedDims)
        self.warmup_s = 0.0
        self.warmup_breakdown: dict = {}   # warm_up's seconds: tuning (keys tuned), capture, compile + eager runs
        self.num_uncaptured_decodes = 0  # decode steps served without a captured graph (none once warmed up)

    @classmethod
    def start(cls, model: nn.Module, config: EngineConfig, device: torch.device) -> "ModelRunner":
        """The runner an engine (or a tensor-parallel follower rank) serves with: built, then compiled and captured
        for every bucket when ``config`` compiles or captures."""
        if config.compile and config.compile_regions and static_decode_rows(model, config):
            # before unwrapping: a refused start leaves the model as it was
            raise SpearError("EngineConfig: compile_regions=True cannot serve static decode rows (tensor "
                             "parallelism's peer-reduction epilogue, static_decode_rows); leave compile_regions off")
        if config.compile:
            from ..compile.siblings import pack_siblings
            from ..compile.unwrap import unwrap_quantized
            pack_siblings(model)  # sibling weights as one buffer: a grouped linear is one GEMM at M > 16
            unwrap_quantized(model)  # plain tensors at the compiled graph's inputs (see unwrap.py)
        runner = cls(model, config, device)
        if config.compile or runner.use_cuda_graphs:
            runner.warm_up()
        return runner

    # ---- compile counting ---------------------------------------------------------------------------------------
    @staticmethod
    def compiled_graphs() -> int:
        from torch._dynamo.utils import counters
        return int(counters["stats"]["unique_graphs"])

    @property
    def recompiles(self) -> int:
        """Graphs compiled since start-up finished (0 while serving is the contract)."""
        if self.graphs_before_serving is None:
            return 0
        return self.compiled_graphs() - self.graphs_before_serving

    # ---- inputs -------------------------------------------------------------------------------------------------
    def _slots(self, req, start: int, n: int):
        bs = self.block_size
        blocks = req.block_ids
        sb = [blocks[p // bs] for p in range(start, start + n)]
        so = [p % bs for p in range(start, start + n)]
        return sb, so

    def _table(self, reqs, width: int) -> list:
        out = []
        for r in reqs:
            out += r.block_ids
            out += [PAD_BLOCK] * (width - len(r.block_ids))
        return out

    @staticmethod
    def decode_layout(batch: int, width: int) -> tuple:
        """Offsets of ids[B], positions[B], slot_block[B], slot_off[B], tables[B*W], ctx_lens[B] in the flat input
        buffer (each segment starts 16 elements in: aligned views, so Inductor never copies a misaligned input)."""
        sizes = (batch, batch, batch, batch, batch * width, batch)
        offs, at = [], 0
        for n in sizes:
            offs.append(at)
            at += -(-n // 16) * 16
        return tuple(offs), sizes, at

    def decode_inputs(self, decodes, batch: int, width: int) -> list:
        """The flat int64 input of a decode step (``decode_layout``); padded rows: token 0 at position 0 written to
        the padding block, context 1."""
        n = len(decodes)
        pad = batch - n
        bs = self.block_size
        pos = [r.num_computed_tokens for r in decodes]
        ids = [r.token_at(p) for r, p in zip(decodes, pos)] + [0] * pad
        sb = [r.block_ids[p // bs] for r, p in zip(decodes, pos)] + [PAD_BLOCK] * pad
        so = [p % bs for p in pos] + [0] * pad
        ctx = [p + 1 for p in pos] + [1] * pad
        pos += [0] * pad
        tables = self._table(decodes, width) + [PAD_BLOCK] * (pad * width)
        offs, sizes, total = self.decode_layout(batch, width)
        flat = [0] * total
        for off, seg in zip(offs, (ids, pos, sb, so, tables, ctx)):
            flat[off:off + len(seg)] = seg
        return flat

    def split_decode(self, flat: torch.Tensor, batch: int, width: int):
        offs, sizes, _ = self.decode_layout(batch, width)
        views = [flat[o:o + n] for o, n in zip(offs, sizes)]
        views[4] = views[4].view(batch, width)
        return tuple(views)

    def _width(self, reqs) -> int:
        """The block-table bucket holding every request's blocks."""
        return table_width(max((len(r.block_ids) for r in reqs), default=0), self.table_buckets)

    # ---- execution ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def execute(self, decodes: list, prefills: list, use_ec: bool):
        """Run one step. ``decodes``: requests computing their last token; ``prefills``: (request, chunk length).
        Returns (logits [S, vocab] float32 on the device, rows): one row per decode, then one per prefill chunk that
        completes its request's tokens (its last position), in that order. With a ``step_sink`` (tensor-parallel
        rank 0) the step's inputs go to it first, so the other ranks run the same forward."""
        use_ec = use_ec and self.net.has_ecs
        if not prefills:
            return self.execute_decode(decodes, use_ec), len(decodes)
        args, rows = self.mixed_inputs(decodes, prefills, use_ec)
        if self.step_sink is not None:
            self.step_sink.mixed(use_ec, args)
        return self.run_mixed(use_ec, args), rows

    @torch.no_grad()
    def execute_decode(self, decodes: list, use_ec: bool, device_ids=None) -> torch.Tensor:
        """A decode-only step: logits [len(decodes), vocab]. ``device_ids`` (overlapped decode): ``(tokens, src,
        dst)``: row ``dst[i]``'s input id is ``tokens[src[i]]`` (``tokens`` on the device, not yet read back; ``src``
        and ``dst`` lists of ints)."""
        use_ec = use_ec and self.net.has_ecs
        n = len(decodes)
        batch = next_bucket(max(n, 1), self.decode_buckets)
        width = self._width(decodes)
        flat = int64_tensor(self.decode_inputs(decodes, batch, width))
        if self.step_sink is not None:
            self.step_sink.decode(use_ec, batch, width, flat)
        return self.run_decode(use_ec, batch, width, flat, device_ids)[:n]

    @torch.no_grad()
    def run_decode(self, use_ec: bool, batch: int, width: int, flat: torch.Tensor, device_ids=None) -> torch.Tensor:
        """A decode step's forward from its flat CPU int64 inputs (``decode_layout``: the ids come first), then
        ``device_ids`` written over the ids: a graph replay if one was captured for (use_ec, batch, width). Returns
        the bucket's logits [batch, vocab]."""
        g = self.graphs.get((use_ec, batch, width))
        flat = self._staged(flat, device_ids)
        buf = g.inputs if g is not None else flat.to(self.device, non_blocking=True)
        if g is not None:
            buf.copy_(flat, non_blocking=True)
        if device_ids is not None:   # after the host inputs: each copy here waits for the step in flight
            patch_ids(buf, device_ids)
        if g is not None:
            return g.replay()
        if self.use_cuda_graphs and self.graphs_before_serving is not None:
            self.num_uncaptured_decodes += 1
        return self._decode_call(batch, self.split_decode(buf, batch, width), use_ec)

    @torch.no_grad()
    def _decode_call(self, batch: int, views: tuple, use_ec: bool):
        """The compiled decode step for ``batch`` rows: batches up to ``static_rows`` (tensor parallelism with the
        peer-reduction epilogue) through the graph compiled per batch size, the others through the dynamic one.
        Grad mode off here, whoever calls: Dynamo guards on it, and a grad-mode graph would be a recompile whose
        training-form EC branch the fusion pass does not match (session 16's GPU test called this directly)."""
        if batch <= self.static_rows:
            for v in views:
                torch._dynamo.mark_static(v, 0)
            return self._decode_static_fn(*views, use_ec=use_ec)
        return self._decode_fn(*views, use_ec=use_ec)

    def _staged(self, t: torch.Tensor, device_ids) -> torch.Tensor:
        """A host input ready for its copy to the device: pinned when a step is in flight on CUDA (overlapped steps:
        the copy then queues behind that step instead of making the host wait for it; the caching host allocator
        keeps the pinned block until the copy has run), as it is otherwise (a pageable copy waits for the device)."""
        if device_ids is not None and self.device.type == "cuda":
            return t.pin_memory()
        return t

    @torch.no_grad()
    def run_mixed(self, use_ec: bool, args: tuple, device_ids=None, capture: bool = True) -> torch.Tensor:
        """A mixed step's forward from ``mixed_inputs``' CPU tensors (``device_ids`` as ``execute_decode``'s: the
        decode rows come first): a replay of the graph of its input shapes, captured now (after running the step
        eagerly) if it has none and ``capture`` and the limit allow, else uncaptured."""
        shapes = tuple(tuple(a.shape) for a in args)
        g = self.mixed.graphs.get((use_ec, shapes))
        fresh = g is None and capture and self.mixed.has_room(rows=shapes[-1][0])   # the last input: logits rows
        if g is None and not fresh:
            if self.graphs_before_serving is not None and self.use_cuda_graphs and self.config.mixed_cuda_graphs:
                self.mixed.uncaptured += 1
            args = [self._staged(a, device_ids).to(self.device, non_blocking=True) for a in args]
            if device_ids is not None:
                patch_ids(args[0], device_ids)
            return self._mixed_fn(*args, use_ec=use_ec)
        flat = self._staged(pack_flat(args), device_ids)
        if g is not None:
            g.inputs.copy_(flat, non_blocking=True)
            views = g.views
        else:
            flat = flat.to(self.device, non_blocking=True)
            views = unpack_flat(flat, shapes)
        if device_ids is not None:
            patch_ids(views[0], device_ids)
        if g is not None:
            return self.mixed.replay(g)
        return self.mixed.first_step((use_ec, shapes), flat, views, lambda: self._mixed_fn(*views, use_ec=use_ec))

    def padded_step(self, use_ec: bool, num_decodes: int, decode_tokens: int, chunks) -> Optional[tuple]:
        """``(tokens, prefill attention work)`` (the token bucket and ``buckets.prefill_attention_cells``' units) of
        the captured graph a mixed step would replay padded (``MixedGraphs.covering``), or None when it would run
        at its own dims. The step: ``num_decodes`` decodes (the longest ``decode_tokens`` long with this step's
        token) and ``chunks`` = ``(tokens before, chunk length, ends its prompt)``. The step cost model prices a
        step at what it runs."""
        if not chunks or not self.config.mixed_graph_padding or not self.mixed.graphs:
            return None
        bs = self.block_size
        prefill_blocks = max(-(-(c + n) // bs) for c, n, _ in chunks)
        dims = mixed_step_dims(num_decodes, -(-decode_tokens // bs), [n for _, n, _ in chunks], prefill_blocks,
                               sum(1 for *_, done in chunks if done), self.decode_buckets[-1], self.token_buckets,
                               self.table_buckets, full_decode_tables=self.config.decode_attention == "triton")
        cover = self.mixed.covering(use_ec and self.net.has_ecs, dims, self.config.mixed_graph_padding,
                                    self.config.mixed_graph_bucket_padding)
        if cover is None or cover == dims:
            return None
        cells = attention_cells_at(cover.prefills, cover.chunk_len, cover.prefill_width, prefill_blocks, bs)
        return cover.tokens, cells

    def mixed_inputs(self, decodes, prefills, use_ec: Optional[bool] = None):
        """CPU int64 tensors for ``mixed_forward`` (shapes ``buckets.mixed_step_dims_for``) and the number of logits
        rows that matter. With ``use_ec`` (a step to serve), padded to the dims of a captured graph that covers the
        step's when it has none of its own (``MixedGraphs.covering``, ``EngineConfig.mixed_graph_padding`` and
        ``mixed_graph_bucket_padding``)."""
        dims = mixed_step_dims_for(decodes, prefills, self.decode_buckets[-1], self.token_buckets, self.table_buckets,
                                   full_decode_tables=self.config.decode_attention == "triton")
        if use_ec is not None:
            graph_dims = self.mixed.covering(use_ec, dims, self.config.mixed_graph_padding,
                                             self.config.mixed_graph_bucket_padding)
            if graph_dims is not None and graph_dims != dims:
                self.mixed.padded_replays += 1
                dims = graph_dims
            self.last_mixed_dims = dataclasses.astuple(dims)   # the step log's record of what ran
        return self.inputs_at(dims, decodes, prefills)

    def inputs_at(self, dims: MixedDims, decodes, prefills):
        """``mixed_inputs``' tensors and logits rows for ``decodes`` and ``prefills`` at ``dims`` (which hold them):
        the rest of every row is padding (slots in the padding block, empty chunk rows). With neither, a step of
        padding only: what a recorded shape is captured with at start-up."""
        nd, d_width, p_width = dims.decode_rows, dims.decode_width, dims.prefill_width
        q_len, num_p, total, s = dims.chunk_len, dims.prefills, dims.tokens, dims.logits_rows
        ids, pos, sb, so = [], [], [], []
        for r in decodes:
            ids.append(r.token_at(r.num_computed_tokens))
            pos.append(r.num_computed_tokens)
            b, o = self._slots(r, r.num_computed_tokens, 1)
            sb += b
            so += o
        for _ in range(nd - len(decodes)):  # dummy decode rows (prefill-only step)
            ids.append(0), pos.append(0), sb.append(PAD_BLOCK), so.append(0)
        d_tables = self._table(decodes, d_width) + [PAD_BLOCK] * ((nd - len(decodes)) * d_width)
        d_ctx = [r.num_computed_tokens + 1 for r in decodes] + [1] * (nd - len(decodes))
        logits_rows = list(range(len(decodes)))
        q_index, q_pos = [], []
        for r, n in prefills:
            start = r.num_computed_tokens
            first = len(ids)
            all_ids = r.all_token_ids
            ids += all_ids[start:start + n]
            pos += list(range(start, start + n))
            b, o = self._slots(r, start, n)
            sb += b
            so += o
            q_index.append(list(range(first, first + n)))
            q_pos.append(list(range(start, start + n)))
            if start + n == r.num_tokens:
                logits_rows.append(first + n - 1)
        pad = total - len(ids)
        ids += [0] * pad
        pos += [0] * pad
        sb += [PAD_BLOCK] * pad
        so += [0] * pad
        q_index = [row + [total] * (q_len - len(row)) for row in q_index] + [[total] * q_len] * (num_p - len(prefills))
        q_pos = [row + [0] * (q_len - len(row)) for row in q_pos] + [[0] * q_len] * (num_p - len(prefills))
        p_tables = self._table([r for r, _ in prefills], p_width) + [PAD_BLOCK] * ((num_p - len(prefills)) * p_width)
        num_rows = len(logits_rows)
        logits_rows += [0] * (s - num_rows)
        def t(x, *shape):
            if x and isinstance(x[0], list):
                x = [v for row in x for v in row]
            return int64_tensor(x).view(*shape)
        args = (t(ids, -1), t(pos, -1), t(sb, -1), t(so, -1), t(d_tables, nd, d_width), t(d_ctx, -1),
                t(p_tables, num_p, p_width), t(q_index, num_p, q_len), t(q_pos, num_p, q_len), t(logits_rows, -1))
        return args, num_rows

    # ---- start-up -----------------------------------------------------------------------------------------------
    def ec_states(self) -> tuple:
        """The EC states compiled and captured: with ECs, and without them too when ``config.ec_switch``."""
        if not self.net.has_ecs:
            return (False,)
        return (True, False) if self.config.ec_switch else (True,)

    @torch.no_grad()
    def warm_up(self, compile_mixed: bool = True):
        """Compile every phase and capture every decode CUDA graph now (a progress bar on stderr), so serving never
        compiles. Runs dummy steps over the padding block only."""
        from ..lowering.runtime import TUNER
        t0, tune0, keys0, capture0 = time.perf_counter(), TUNER.tune_seconds, TUNER.tuned_keys, self.capture.capture_s
        # each bucket runs eagerly (compiled, not captured) before its capture: kernel tuning and workspaces happen
        # there, outside the graphs' memory pool (what optimize.warm_kernels does for optimize())
        jobs = []
        for use_ec in self.ec_states():
            for batch in sorted(self.decode_buckets, reverse=True):
                for width in sorted(self.table_buckets, reverse=True):
                    jobs.append(("decode", use_ec, batch, width))
            if compile_mixed:
                for total in self.token_buckets:
                    jobs.append(("mixed", use_ec, total, None))
        if self.shapes is not None:   # the mixed-step shapes an earlier run of this engine captured
            jobs += [("shape", use_ec, dims, None) for use_ec, dims in self.shapes.entries
                     if use_ec in self.ec_states()]
        bar = _progress(len(jobs), "spear serving: compile + capture", self.config.progress)
        # no duck sizing: two dims of equal size at trace time must not become one symbol (a guard that they stay
        # equal, i.e. a recompile when e.g. batch and block-table width differ later)
        # regional compilation: a graph per distinct layer structure (EC placement) x batch-1 specialization x EC state
        limit = max(64, 8 * len(self.net.layers), torch._dynamo.config.recompile_limit)
        with torch._dynamo.config.patch(recompile_limit=limit,
                                        accumulated_recompile_limit=max(
                                            4096, torch._dynamo.config.accumulated_recompile_limit)), \
                torch.fx.experimental._config.patch(use_duck_shape=False):
            for kind, use_ec, a, b in jobs:
                if kind == "decode":
                    self._warm_decode(use_ec, a, b)
                elif kind == "mixed":
                    self._warm_mixed(use_ec, a)
                elif self.mixed.has_room(a.logits_rows):
                    self.run_mixed(use_ec, self.inputs_at(a, [], [])[0])   # captured now (its first step)
                bar.update(1)
        bar.close()
        # overlapped steps move a step's tokens into the next one's rows on the device (patch_ids); its index path
        # first runs when a request finishes beside others. On CUDA its kernels' lazily loaded modules were the likely
        # cause of a 55-77 ms step there (H100, sessions 16-21: the W4 batch-16 outlier, in the process's first
        # engine only): run it once here. With this and ``Sampler.warm_up``, session 22's H100 run had none (slowest
        # step 3.98 ms; the two warm-ups were not tried apart)
        ids = torch.zeros(2, dtype=torch.int64, device=self.device)
        patch_ids(ids, (torch.ones(2, dtype=torch.int64, device=self.device), [1], [0]))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.graphs_before_serving = self.compiled_graphs()
        self.warmup_s = time.perf_counter() - t0
        tune_s, capture_s = TUNER.tune_seconds - tune0, self.capture.capture_s - capture0
        self.warmup_breakdown = {"total_s": self.warmup_s, "tune_s": tune_s, "tuned_keys": TUNER.tuned_keys - keys0,
                                 "capture_s": capture_s, "compile_and_eager_s": self.warmup_s - tune_s - capture_s,
                                 "mixed_graphs": len(self.mixed.graphs)}

    def _warm_decode(self, use_ec, batch, width):
        """Compile (and tune) the decode step for one bucket, then capture it. On CUDA both run on the runner's
        capture stream: the W4 kernels' persistent workspaces (split-K counters, EC epoch tags) are per stream, and
        must be allocated by the eager warm-up, outside the graphs' shared memory pool. Allocated inside a capture,
        they would come from that pool, where the other buckets' graphs, captured before, write their
        intermediates: a bucket switch would then find its EC epochs clobbered (spinning, then NaN)."""
        flat = torch.tensor(self.decode_inputs([], batch, width), dtype=torch.int64, device=self.device)
        views = self.split_decode(flat, batch, width)
        for _ in range(2):
            logits = self.capture.eager(lambda: self._decode_call(batch, views, use_ec))
        if not self.use_cuda_graphs:
            return
        if not self.capture.cuda:  # config.cuda_graphs_stand_in (tests)
            self.graphs[(use_ec, batch, width)] = DecodeGraph(
                StandInGraph(lambda: self._decode_call(batch, views, use_ec)), flat, views, logits)
            return
        graph, logits = self.capture.capture(lambda: self._decode_call(batch, views, use_ec),
                                             f"the decode step (batch {batch}, block-table width {width})")
        self.graphs[(use_ec, batch, width)] = DecodeGraph(graph, flat, views, logits)

    def _warm_mixed(self, use_ec, total):
        # a prefill-only step of `total` tokens spread over two padding "requests" (all slots in the padding block)
        class Fake:
            def __init__(self, n):
                self.block_ids = [PAD_BLOCK] * MIN_DIM
                self.num_computed_tokens = 0
                self.prompt_token_ids = [0] * n
                self.output_token_ids = []

            @property
            def all_token_ids(self):
                return self.prompt_token_ids

            @property
            def num_tokens(self):
                return len(self.prompt_token_ids)
        fakes, left = [], total - MIN_DIM  # MIN_DIM dummy decode rows come first
        while left > 0:
            n = min(left, self.max_model_len - 1)
            f = Fake(n)
            f.block_ids = [PAD_BLOCK] * max(MIN_DIM, -(-n // self.block_size))
            fakes.append((f, n))
            left -= n
        self.run_mixed(use_ec, self.mixed_inputs([], fakes)[0], capture=False)


def _progress(total: int, desc: str, enabled: bool):
    try:
        from tqdm.auto import tqdm
        return tqdm(total=total, desc=desc, file=sys.stderr, disable=not enabled, leave=False)
    except ImportError:  # pragma: no cover
        class _Null:
            def update(self, n):
                pass

            def close(self):
                pass
        return _Null()
