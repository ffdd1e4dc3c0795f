"""The tuner: which config runs each key, picked once by CUDA-graph timing with a correctness check per candidate.

A key names what a pick depends on (``LinearKey``: K, N, group, dtype, M bucket, EC, gate; ``GroupKey`` for
sibling linears). ``Tuner`` holds this process's picks and their timings (and the on-disk ``TuneCache``): the one
``dispatch`` uses is ``dispatch.TUNER``; a bench reads its ``timings`` and may ``pin`` a config to a key.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch

from .. import options
from ..errors import SpearError
from .capture import capturing
from .configs import m_bucket
from .precompile import precompile
from .tune_cache import TuneCache
from .workspace import outside_graph_pools

Timings = List[Tuple[str, object]]  # (config name, ms or "failed: ..." / "wrong: ...")


class LinearKey(NamedTuple):
    k: int
    n: int
    group_size: int
    dtype: str
    m_bucket: str
    has_ec: bool
    gated: bool
    ec_rank: int = 0  # the EC's rank: a single linear's EC and a merged sibling EC (rank g·r, grouped.merged_ec)
    #                   of one (K, N) tune apart


class GroupKey(NamedTuple):
    tag: str  # "grouped"
    k: int
    n_total: int
    ns: tuple
    group_size: int
    dtype: str
    m_bucket: str
    bias: bool
    adjacent: bool = False  # the members' weights are one buffer's adjacent row blocks (a concat candidate)


def linear_key(m, k, n, group_size, dtype, has_ec, gated, ec_rank=0) -> LinearKey:
    return LinearKey(k, n, group_size, str(dtype), m_bucket(m), bool(has_ec), bool(gated),
                     int(ec_rank) if has_ec else 0)


def group_key(m, k, ns, group_size, dtype, has_bias, adjacent=False) -> GroupKey:
    return GroupKey("grouped", k, sum(ns), tuple(ns), group_size, str(dtype), m_bucket(m), bool(has_bias),
                    bool(adjacent))


class Tuner:
    MAX_REL_ERR = 2e-2  # a candidate further than this from the reference is dropped, never picked

    def __init__(self, cache: Optional[TuneCache] = None):
        self.picks: Dict[tuple, object] = {}
        self.timings: Dict[tuple, Timings] = {}
        self.cache = cache if cache is not None else TuneCache()
        self._flush = {}  # device -> 64 MB buffer written between timed calls (evicts L2)
        self._streams = {}  # device -> the stream candidates are warmed up on and captured on
        self.tuned_keys = 0        # keys timed in this process (not from a cache) ...
        self.tune_seconds = 0.0    # ... and the wall time that took (start-up reports split their time with it)

    def clear(self) -> None:
        """Forget this process's picks, timings and loaded cache files (the files on disk stay)."""
        self.picks.clear()
        self.timings.clear()
        self.cache.forget()
        self.tuned_keys, self.tune_seconds = 0, 0.0

    def pin(self, key, cfg) -> None:
        """Make ``cfg`` the pick of ``key`` (benches comparing configs under the compiler)."""
        self.picks[key] = cfg

    def can_tune(self, x: torch.Tensor) -> bool:
        return (x.is_cuda and options.current().autotune and not options.interpret()
                and not torch.cuda.is_current_stream_capturing())

    def ranked(self, key, cands) -> list:
        """``cands`` that ran for ``key`` in its last tuning, fastest first."""
        by_name = {c.name: c for c in cands}
        timed = sorted((ms, name) for name, ms in self.timings.get(key, []) if isinstance(ms, float) and name in by_name)
        return [by_name[name] for _, name in timed] or cands[:1]

    def pick(self, key, device, cands, run: Callable, reference: Callable, out: torch.Tensor):
        """``key``'s config: this process's pick, else the on-disk cache's (rebuilt by name from ``cands``), else
        the fastest correct of ``cands`` (``run(cfg)`` writes ``out``; ``reference()`` returns the exact result)."""
        if key in self.picks:
            return self.picks[key]
        hit = self.cache.lookup(key, cands, device)
        if hit is not None:
            cfg, self.timings[key] = hit
        else:
            t0 = time.perf_counter()
            # (on a thread of its own: inside a CUDA-graph tree's warm-up its buffers and timing captures would
            # draw from the tree's pool)
            cfg = outside_graph_pools(lambda: self.tune(key, cands, run, reference, out))
            self.tuned_keys += 1
            self.tune_seconds += time.perf_counter() - t0
            self.cache.store(key, cfg.name, self.timings[key], device)
        self.picks[key] = cfg
        return cfg

    def tune(self, key, cands, run: Callable, reference: Callable, out: torch.Tensor):
        """Time every candidate (CUDA-graph replay, L2 flushed; ``do_bench`` if capture fails) and return the
        fastest whose output matches the reference; the timings go to ``self.timings[key]``."""
        from triton.testing import do_bench

        precompile(cands, run, options.current().tune_compile_threads)  # every candidate's kernels, in parallel
        ref = reference().float()
        ref_norm = ref.norm().clamp_min(1e-30)
        results: Timings = []
        for cfg in cands:
            try:
                run(cfg)
                err = ((out.float() - ref).norm() / ref_norm).item()
                if not err < self.MAX_REL_ERR:
                    results.append((cfg.name, f"wrong: rel err {err:.2e}"))
                    continue
                fn = lambda: run(cfg)  # noqa: E731
                try:
                    ms = self.graph_ms(fn, out.device)
                except Exception:  # noqa: BLE001  (capture refused: time it eagerly)
                    ms = do_bench(fn, warmup=3, rep=10, return_mode="median")
            except Exception as e:  # a config the compiler refuses (shared memory, registers)
                results.append((cfg.name, f"failed: {type(e).__name__}"))
                continue
            results.append((cfg.name, ms))
        self.timings[key] = results
        timed = [(ms, i) for i, (_, ms) in enumerate(results) if isinstance(ms, float)]
        if not timed:
            raise SpearError(f"spear_compile.lowering: no kernel config ran for {key}")
        best = min(timed)[1]
        return next(c for c in cands if c.name == results[best][0])

    def graph_ms(self, fn, device, reps=5) -> float:
        """ms per call of ``fn`` as a CUDA-graph replay, each call after an in-graph 64 MB write that evicts
        L2 (minus a graph of the writes alone): no host launch time inside the measurement, unlike
        ``do_bench``, whose per-call timing let the launcher's Python time leak in (bench/results/decode_sweep.md).
        ``fn`` is warmed up on the stream that captures it (its workspaces are that stream's)."""
        if device not in self._flush:
            self._flush[device] = torch.empty(1 << 26, dtype=torch.uint8, device=device)
            self._streams[device] = torch.cuda.Stream(device)
        buf, stream = self._flush[device], self._streams[device]
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.synchronize(device)
        graphs = []
        for with_fn in (True, False):
            g = torch.cuda.CUDAGraph()
            with capturing(g, stream):
                for _ in range(reps):
                    buf.zero_()
                    if with_fn:
                        fn()
            graphs.append(g)
        times = []
        for g in graphs:
            best = float("inf")
            for _ in range(3):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                g.replay()
                b.record()
                b.synchronize()
                best = min(best, a.elapsed_time(b))
            times.append(best)
        return max(times[0] - times[1], 1e-6) / reps
