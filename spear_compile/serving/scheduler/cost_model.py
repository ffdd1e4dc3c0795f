"""Step cost model: predicted time of one engine step from its batch mix and the active EC set.

A step runs ``d`` decode tokens and ``p`` prefill tokens over ``ctx`` summed decode context, padded by the engine
to a graph bucket of ``T`` tokens (decode-only steps: the decode batch buckets; mixed steps: the token buckets).
Its time is modelled piecewise-linearly, one linear model per bin of ``T`` at the kernel dispatch boundaries
(M = 1, 2-16, 17-64, 65-512, > 512: the W4 GEMV, split-K, small-M and dequantize + GEMM regimes):

    t(T, d, p, A, ctx, ECs) = a_b + m_b [p > 0] + b_b T + c_b p + q_b A + e_b ctx
                              + sum over module types j of (f_bj r_j + g_bj r_j T)

with ``[p > 0]`` marking a mixed step (it runs the mixed graph, not a decode bucket's CUDA graph: on a GPU its fixed
cost is several times a replay's, so a bin holding both kinds needs its own intercept for each), ``r_j`` the total
rank of the active ECs on module type ``j`` (``q_proj``, ``down_proj``, ...), ``A`` the prefill attention's work at
the sizes the mixed graph runs (``buckets.prefill_attention_cells``: chunk rows x chunk length x block-table tokens,
each padded; so a chunk after a long context, or several chunks, cost more than one chunk from a prompt's start;
session 22's H100 serving steps replayed (``bench/step_error.py --replay``): mixed steps' p90 error 21-25 % with
``p^2`` in its place, 12-15 % with ``A``, both with one online correction per bin), and
``ctx`` the decode attention's KV reads: the summed context, or, when the model
knows the engine's KV layout (``kv_layout``), the tokens its decode attention gathers (rows x the table-width
bucket of the longest context x block size: the paged gather reads the padded table of every row). The EC-blind
model is the same without the EC terms, fitted on EC-free steps only. Fits minimise the relative error (rows
weighted by 1 / measured time), which is what the SLO check needs.

Online, ``observe`` corrects each graph bucket (the padded token count; and, EC-aware, each EC signature) by an
exponentially weighted multiplicative factor, the running geometric mean of measured / predicted. Per bucket rather
than per bin (session 22, replayed on that session's H100 steps, all steps: p90 9.1-9.4 % -> 7.9-8.3 % at 102-205
req/s): a bin spans buckets whose graphs differ in more than the linear terms see.

``StepTimer`` measures steps with CUDA events recorded around them and read one step later (``query``, never a
synchronise inside the step); on CPU it uses the wall clock.
"""
from __future__ import annotations

import bisect
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Optional

from ...errors import SpearError
from ..buckets import mixed_decode_rows, prefill_attention_cells
from .ec_signature import ECSignature

#: upper ends of the token-count bins (the last bin is open): M = 1, 2-16, 17-64, 65-512, > 512
DEFAULT_BIN_EDGES = (1, 16, 64, 512)
BASE_FEATURES = ("intercept", "tokens", "prefill_tokens", "prefill_attention", "context", "mixed")


# ----------------------------------------------------------------------------------------------- samples
@dataclass(frozen=True)
class StepShape:
    """One step's batch mix: decode tokens, prefill tokens, summed decode context, the tokens the graph ran (after
    padding to its bucket; 0 = unpadded, ``d + p``), and the prefill attention's work (``prefill_cells``, the
    model's ``A``; None = one chunk from a prompt's start, as in profiles before session 22)."""
    num_decodes: int
    num_prefill_tokens: int
    sum_context: int
    num_padded_tokens: int = 0
    prefill_cells: Optional[int] = None

    @property
    def num_tokens(self) -> int:
        return self.num_padded_tokens or (self.num_decodes + self.num_prefill_tokens)


@dataclass(frozen=True)
class StepSample:
    shape: StepShape
    signature: ECSignature
    seconds: float

    def to_json(self) -> list:
        s = self.shape
        return [s.num_decodes, s.num_prefill_tokens, s.sum_context, s.num_padded_tokens,
                [list(x) for x in self.signature.per_type], self.seconds, s.prefill_cells]

    @classmethod
    def from_json(cls, row) -> "StepSample":
        """From ``to_json``'s list; the 6-entry form of earlier profiles (no ``prefill_cells``) reads as None."""
        if not (isinstance(row, list) and len(row) in (6, 7) and all(isinstance(v, int) for v in row[:4])
                and isinstance(row[4], list) and isinstance(row[5], (int, float))
                and (len(row) == 6 or row[6] is None or (isinstance(row[6], int) and row[6] >= 0))):
            raise ValueError(f"sample {row!r} is not [decodes, prefill, context, padded, signature, seconds, "
                             f"prefill cells]")
        sig = []
        for x in row[4]:
            if not (isinstance(x, list) and len(x) == 3 and isinstance(x[0], str) and isinstance(x[1], int)
                    and isinstance(x[2], int)):
                raise ValueError(f"signature entry {x!r} is not [type, count, rank]")
            sig.append(tuple(x))
        if not (row[5] > 0 and math.isfinite(row[5])):
            raise ValueError(f"sample time {row[5]!r} is not a positive number")
        cells = row[6] if len(row) == 7 else None
        return cls(StepShape(*row[:4], prefill_cells=cells), ECSignature(tuple(sorted(sig))), float(row[5]))


def pad_tokens(num_decodes: int, num_prefill_tokens: int, decode_buckets=(), token_buckets=(),
               mixed_min_rows: int = 0) -> int:
    """Tokens the engine's graph computes for this mix: decode-only steps pad to a decode bucket, mixed ones to a
    token bucket (unpadded past the largest bucket or without buckets). ``mixed_min_rows`` > 0: the engine's mixed
    steps pad their decode rows (``buckets.mixed_decode_rows``: at least that many, a power of two when it fits)."""
    n = (mixed_rows(num_decodes, num_prefill_tokens, decode_buckets, token_buckets, mixed_min_rows)
         if num_prefill_tokens else num_decodes) + num_prefill_tokens
    buckets = decode_buckets if num_prefill_tokens == 0 and decode_buckets else token_buckets
    if buckets:
        i = bisect.bisect_left(buckets, n)
        if i < len(buckets):
            return buckets[i]
    return n


def mixed_rows(num_decodes: int, num_prefill_tokens: int, decode_buckets=(), token_buckets=(),
               mixed_min_rows: int = 0) -> int:
    """Decode rows of a mixed step as the engine runs it (``mixed_min_rows`` 0: unpadded)."""
    if not mixed_min_rows:
        return num_decodes
    if not decode_buckets or not token_buckets:
        return max(num_decodes, mixed_min_rows)
    return mixed_decode_rows(num_decodes, num_prefill_tokens, max(decode_buckets), max(token_buckets))


# ----------------------------------------------------------------------------------------------- the model
class StepCostModel:
    """Piecewise-linear step time (seconds); see the module docstring. ``ec_terms=False`` is the EC-blind model.

    ``decode_buckets`` / ``token_buckets``: the engine's graph buckets, so a prediction pads like the engine does.
    """

    def __init__(self, ec_types: Iterable[str] = (), ec_terms: bool = True, bin_edges=DEFAULT_BIN_EDGES,
                 decode_buckets=(), token_buckets=(), correction_alpha: float = 0.1, ridge: float = 1e-6,
                 kv_layout: Optional[tuple] = None, mixed_min_rows: int = 0):
        edges = tuple(int(e) for e in bin_edges)
        if list(edges) != sorted(set(edges)) or not edges or edges[0] < 1:
            raise SpearError(f"StepCostModel: bin_edges={bin_edges!r} must be increasing positive integers")
        if not 0.0 <= correction_alpha <= 1.0:
            raise SpearError(f"StepCostModel: correction_alpha={correction_alpha!r} must be in [0, 1]")
        self.ec_terms = bool(ec_terms)
        self.ec_types = tuple(sorted(set(ec_types))) if ec_terms else ()
        self.bin_edges = edges
        self.decode_buckets = tuple(sorted(decode_buckets))
        self.token_buckets = tuple(sorted(token_buckets))
        self.correction_alpha = float(correction_alpha)
        self.ridge = float(ridge)
        self.kv_layout = (int(kv_layout[0]), tuple(sorted(kv_layout[1]))) if kv_layout else None  # (block, widths)
        self.mixed_min_rows = int(mixed_min_rows)
        nb = len(edges) + 1
        self.coef = [[0.0] * self.num_features for _ in range(nb)]  # per bin
        self.fitted = False
        self.floor: dict = {}             # per bin: half the fastest step measured in it
                                          # (a prediction never goes below)
        self.fit_error: dict = {}
        self._log_correction: dict = {}   # (bin, mixed, signature or None) -> log of the multiplicative correction
        self._ec_cache: dict = {}         # signature -> per bin (f . r, g . r)
        self._rows_cache: dict = {}       # (decodes, prefill tokens) -> mixed decode rows (the scheduler asks often)
        self._cells_cache: dict = {}      # prefill tokens -> attention cells of one chunk from a prompt's start
        self._bucket_set = frozenset(self.decode_buckets) | frozenset(self.token_buckets)

    # features -------------------------------------------------------------------------------------------------
    @property
    def num_features(self) -> int:
        return len(BASE_FEATURES) + 2 * len(self.ec_types)

    @property
    def feature_names(self) -> tuple:
        return BASE_FEATURES + tuple(f"ec_rank:{t}" for t in self.ec_types) + \
            tuple(f"ec_rank_x_tokens:{t}" for t in self.ec_types)

    def bin_of(self, num_tokens: int) -> int:
        return bisect.bisect_left(self.bin_edges, num_tokens)

    def features(self, shape: StepShape, sig: ECSignature) -> list:
        t = shape.num_tokens
        ranks = [sig.rank_of(ty) for ty in self.ec_types]
        p = shape.num_prefill_tokens
        cells = self.cells(p, shape.prefill_cells)
        return [1.0, float(t), float(p), float(cells), float(shape.sum_context), float(p > 0)] + \
            [float(r) for r in ranks] + [float(r * t) for r in ranks]

    def prefill_cells(self, chunks) -> int:
        """The ``A`` feature of a step's prefill ``chunks`` (``(tokens before, chunk length)`` pairs): the attention
        work at the engine's padded sizes with ``kv_layout``, else unpadded (sum of length x (before + length))."""
        chunks = list(chunks)
        if self.kv_layout is None:
            return sum(n * (c + n) for c, n in chunks)
        block, widths = self.kv_layout
        return prefill_attention_cells(chunks, block, max(self.token_buckets, default=0) or
                                       max((n for _, n in chunks), default=0), widths)

    def cells(self, num_prefill_tokens: int, prefill_cells: Optional[int] = None) -> int:
        """``prefill_cells``, or when None those of one chunk of ``num_prefill_tokens`` from a prompt's start."""
        if prefill_cells is not None:
            return prefill_cells
        if not num_prefill_tokens:
            return 0
        c = self._cells_cache.get(num_prefill_tokens)
        if c is None:
            c = self.prefill_cells([(0, num_prefill_tokens)])
            if len(self._cells_cache) < 65536:
                self._cells_cache[num_prefill_tokens] = c
        return c

    # fitting -------------------------------------------------------------------------------------------------
    def fit(self, samples: Iterable[StepSample]) -> "StepCostModel":
        """Least squares per bin on relative error, slopes other than the prefill tokens' kept non-negative. EC-blind:
        only EC-free samples. A bin without samples borrows the nearest fitted bin's coefficients. Raises SpearError
        when nothing can be fitted."""
        import numpy as np
        samples = [s for s in samples if self.ec_terms or s.signature.is_empty]
        if not samples:
            raise SpearError("StepCostModel.fit: no samples" + ("" if self.ec_terms else " without ECs (EC-blind)"))
        by_bin: dict = {}
        for s in samples:
            by_bin.setdefault(self.bin_of(s.shape.num_tokens), []).append(s)
        fitted = {}
        for b, rows in by_bin.items():
            x = np.array([self.features(s.shape, s.signature) for s in rows], dtype=np.float64)
            y = np.array([s.seconds for s in rows], dtype=np.float64)
            w = 1.0 / y
            xw, yw = x * w[:, None], y * w
            scale = np.maximum(np.abs(xw).max(axis=0), 1e-30)  # column scaling: features span 1 .. 1e6
            xs = xw / scale
            # slopes a step's time cannot have negative (tokens, chunk attention, context, EC ranks): a column
            # fitted negative is dropped and the rest refitted, so extrapolation stays monotone
            free = {0, 2, 5}  # intercept, prefill tokens (a prefill row may cost less than a decode row), mixed
            # a column constant over the bin (e.g. "mixed" where every step is mixed) is the intercept's: dropped
            active = [j for j in range(xs.shape[1]) if j == 0 or np.ptp(x[:, j]) > 0]
            for _ in range(xs.shape[1]):
                sub = xs[:, active]
                # ridge as extra rows (keeps unidentified EC columns at zero instead of huge opposite pairs)
                a = np.vstack([sub, math.sqrt(self.ridge) * np.eye(len(active))])
                rhs = np.concatenate([yw, np.zeros(len(active))])
                part, *_ = np.linalg.lstsq(a, rhs, rcond=None)
                neg = [j for j, v in zip(active, part) if v < 0 and j not in free]
                if not neg:
                    break
                active = [j for j in active if j not in neg]
            sol = np.zeros(xs.shape[1])
            sol[active] = part
            fitted[b] = list(sol / scale)
            self.floor[b] = 0.5 * float(y.min())
            pred = np.maximum(x @ (sol / scale), self.floor[b])
            rel = np.abs(pred - y) / y
            self.fit_error[b] = {"n": len(rows), "p50": float(np.percentile(rel, 50)),
                                 "p90": float(np.percentile(rel, 90))}
        for b in range(len(self.coef)):
            near = min(fitted, key=lambda k: (abs(k - b), k))
            self.coef[b] = list(fitted[near])
            self.floor[b] = self.floor.get(near, 0.0) if b not in fitted else self.floor[b]
        self.fitted = True
        self._ec_cache.clear()
        self._log_correction.clear()
        return self

    # prediction ------------------------------------------------------------------------------------------------
    def context_feature(self, num_decodes: int, sum_context: int, max_context: int, mixed: bool,
                        num_prefill_tokens: int = 0) -> int:
        """The ``ctx`` feature of a step: with ``kv_layout`` the KV tokens decode attention gathers (decode-only steps
        pad the rows to the decode bucket; mixed steps as ``mixed_rows`` pads them beside ``num_prefill_tokens``),
        else ``sum_context``."""
        if self.kv_layout is None or num_decodes == 0:
            return sum_context if self.kv_layout is None else 0
        block, widths = self.kv_layout
        blocks = -(-max_context // block)
        i = bisect.bisect_left(widths, blocks)
        width = widths[i] if i < len(widths) else blocks
        rows = self.mixed_rows(num_decodes, num_prefill_tokens) if mixed else self.pad(num_decodes, 0)
        return rows * width * block

    def pad(self, num_decodes: int, num_prefill_tokens: int) -> int:
        return pad_tokens(num_decodes, num_prefill_tokens, self.decode_buckets, self.token_buckets, self.mixed_min_rows)

    def mixed_rows(self, num_decodes: int, num_prefill_tokens: int) -> int:
        key = (num_decodes, num_prefill_tokens)
        rows = self._rows_cache.get(key)
        if rows is None:
            rows = mixed_rows(num_decodes, num_prefill_tokens, self.decode_buckets, self.token_buckets,
                              self.mixed_min_rows)
            if len(self._rows_cache) < 65536:   # bounded: a scheduler asks about few (decodes, bucket) pairs
                self._rows_cache[key] = rows
        return rows

    def prefill_room(self, num_decodes: int, num_tokens: int) -> int:
        """Prefill tokens that fit a mixed step of ``num_tokens`` beside ``num_decodes`` decodes (padded as the
        engine pads them: the step then runs exactly the ``num_tokens`` bucket)."""
        rows = self.mixed_rows(num_decodes, max(0, num_tokens - num_decodes))
        return num_tokens - rows

    def _ec_terms(self, sig: ECSignature) -> list:
        terms = self._ec_cache.get(sig)
        if terms is None:
            ranks = [sig.rank_of(t) for t in self.ec_types]
            k, nt = len(BASE_FEATURES), len(self.ec_types)
            terms = [(sum(c[k + j] * r for j, r in enumerate(ranks)),
                      sum(c[k + nt + j] * r for j, r in enumerate(ranks))) for c in self.coef]
            if len(self._ec_cache) > 64:  # a handful of EC sets are ever live; bound it anyway
                self._ec_cache.clear()
            self._ec_cache[sig] = terms
        return terms

    def correction_key(self, num_tokens: int, mixed: bool, sig: ECSignature):
        """One correction per graph bucket (``num_tokens`` padded; a step past the buckets, or a model without them,
        shares its bin's, keyed ``-1 - bin``) and step kind (decode-only or mixed: a graph replay or not) and,
        EC-aware, per EC set (EC-blind: it cannot tell EC sets apart)."""
        bucket = num_tokens if num_tokens in self._bucket_set else -1 - self.bin_of(num_tokens)
        return (bucket, bool(mixed), sig if self.ec_terms else None)

    def predict_raw(self, num_decodes: int, num_prefill_tokens: int, sum_context: int,
                    sig: ECSignature = ECSignature(), num_tokens: int = 0,
                    prefill_cells: Optional[int] = None) -> float:
        """Fitted time, without the online correction. ``num_tokens``: padded tokens if known (else padded here).
        ``prefill_cells``: the chunks' ``prefill_cells`` (None: one chunk from a prompt's start)."""
        t = num_tokens or self.pad(num_decodes, num_prefill_tokens)
        b = self.bin_of(t)
        c = self.coef[b]
        p = num_prefill_tokens
        y = c[0] + c[1] * t + c[2] * p + c[4] * sum_context
        if p:
            y += c[3] * self.cells(p, prefill_cells) + c[5]
        if self.ec_types and not sig.is_empty:
            f, g = self._ec_terms(sig)[b]
            y += f + g * t
        return max(y, self.floor.get(b, 0.0), 1e-6)

    def predict_shape(self, shape: StepShape, sig: ECSignature = ECSignature()) -> float:
        """``predict_raw`` of a sample's shape."""
        return self.predict_raw(shape.num_decodes, shape.num_prefill_tokens, shape.sum_context, sig,
                                shape.num_padded_tokens, shape.prefill_cells)

    def predict(self, num_decodes: int, num_prefill_tokens: int, sum_context: int,
                sig: ECSignature = ECSignature(), num_tokens: int = 0, prefill_cells: Optional[int] = None) -> float:
        """Predicted step time in seconds (fitted model times the bucket's online correction)."""
        t = num_tokens or self.pad(num_decodes, num_prefill_tokens)
        y = self.predict_raw(num_decodes, num_prefill_tokens, sum_context, sig, t, prefill_cells)
        lc = self._log_correction.get(self.correction_key(t, num_prefill_tokens > 0, sig))
        return y if lc is None else y * math.exp(lc)

    def observe(self, num_decodes: int, num_prefill_tokens: int, sum_context: int, sig: ECSignature,
                measured_s: float, num_tokens: int = 0, prefill_cells: Optional[int] = None) -> None:
        """Move the bucket's correction toward measured / fitted (exponentially weighted, in log space)."""
        if not (measured_s > 0 and math.isfinite(measured_s)) or self.correction_alpha == 0.0:
            return
        t = num_tokens or self.pad(num_decodes, num_prefill_tokens)
        raw = self.predict_raw(num_decodes, num_prefill_tokens, sum_context, sig, t, prefill_cells)
        ratio = min(max(measured_s / raw, 0.2), 5.0)
        key = self.correction_key(t, num_prefill_tokens > 0, sig)
        old = self._log_correction.get(key, 0.0)
        self._log_correction[key] = old + self.correction_alpha * (math.log(ratio) - old)

    def corrections(self) -> dict:
        """``{"bucket[m]|EC set": factor}`` of the online corrections so far (``m``: mixed steps; ``binN``: a step
        past the buckets), for logs and reports."""
        return {f"{b if b >= 0 else f'bin{-1 - b}'}{'m' if mixed else ''}|{k.key if k is not None else 'any'}":
                math.exp(v)
                for (b, mixed, k), v in sorted(self._log_correction.items(),
                                               key=lambda kv: (kv[0][0], kv[0][1], str(kv[0][2])))}

    # serialisation ---------------------------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {"ec_terms": self.ec_terms, "ec_types": list(self.ec_types), "bin_edges": list(self.bin_edges),
                "decode_buckets": list(self.decode_buckets), "token_buckets": list(self.token_buckets),
                "kv_layout": [self.kv_layout[0], list(self.kv_layout[1])] if self.kv_layout else None,
                "mixed_min_rows": self.mixed_min_rows,
                "feature_names": list(self.feature_names), "coef": self.coef,
                "floor": [self.floor.get(b, 0.0) for b in range(len(self.coef))],
                "fit_error": {str(k): v for k, v in self.fit_error.items()}}


def model_from_json(doc: dict) -> StepCostModel:
    """A fitted model back from ``StepCostModel.to_json`` (for reports and plots; the fit is not repeated)."""
    kv = doc.get("kv_layout")
    m = StepCostModel(doc["ec_types"], ec_terms=doc["ec_terms"], bin_edges=doc["bin_edges"],
                      decode_buckets=doc["decode_buckets"], token_buckets=doc["token_buckets"],
                      kv_layout=(kv[0], kv[1]) if kv else None, mixed_min_rows=doc.get("mixed_min_rows", 0))
    if len(doc["coef"]) != len(m.coef) or any(len(c) != m.num_features for c in doc["coef"]):
        raise SpearError("StepCostModel: stored coefficients do not match the model's bins and features")
    if "feature_names" in doc and list(doc["feature_names"]) != list(m.feature_names):
        raise SpearError(f"StepCostModel: stored features {doc['feature_names']} are not this model's "
                         f"{list(m.feature_names)} (a model saved before session 22's prefill-attention feature)")
    m.coef = [[float(x) for x in c] for c in doc["coef"]]
    m.floor = {b: float(v) for b, v in enumerate(doc.get("floor") or [])}
    m.fitted = True
    return m


def fit_models(samples, decode_buckets=(), token_buckets=(), bin_edges=DEFAULT_BIN_EDGES,
               correction_alpha: float = 0.1, kv_layout=None, mixed_min_rows: int = 0) -> tuple:
    """(EC-aware model fitted on every sample, EC-blind model fitted on the EC-free samples). The samples'
    ``sum_context`` must be the feature the models use (see ``context_feature``)."""
    samples = list(samples)
    types = sorted({t for s in samples for t, _, _ in s.signature.per_type})
    common = dict(bin_edges=bin_edges, decode_buckets=decode_buckets, token_buckets=token_buckets,
                  correction_alpha=correction_alpha, kv_layout=kv_layout, mixed_min_rows=mixed_min_rows)
    aware = StepCostModel(types, ec_terms=True, **common).fit(samples)
    blind = StepCostModel((), ec_terms=False, **common).fit(samples)
    return aware, blind


# ----------------------------------------------------------------------------------------------- step timing
class StepTimer:
    """Times engine steps without a host sync inside them: CUDA events recorded before and after each step,
    read one step (or more) later when ``query()`` says they are done; on CPU, the wall clock.

    ``start()`` before launching a step's work, ``stop(tag)`` after; ``stop`` returns the ``(tag, seconds)`` of
    every earlier step whose events have completed by now (CPU: this step's own time at once).
    """

    def __init__(self, device=None, max_pending: int = 64):
        import torch
        dev = torch.device(device) if device is not None else torch.device("cpu")
        self.cuda = dev.type == "cuda" and torch.cuda.is_available()
        self._torch = torch
        self._pending: deque = deque()
        self._begin = None
        self.max_pending = max_pending

    def start(self) -> None:
        if self.cuda:
            ev = self._torch.cuda.Event(enable_timing=True)
            ev.record()
            self._begin = ev
        else:
            self._begin = time.perf_counter()

    def stop(self, tag=None) -> list:
        if self._begin is None:
            raise SpearError("StepTimer.stop without start")
        begin, self._begin = self._begin, None
        if not self.cuda:
            return [(tag, time.perf_counter() - begin)]
        end = self._torch.cuda.Event(enable_timing=True)
        end.record()
        self._pending.append((tag, begin, end))
        done = []
        # the oldest first; stop at the first still running (events complete in stream order)
        while self._pending and (self._pending[0][2].query() or len(self._pending) > self.max_pending):
            t, b, e = self._pending.popleft()
            if not e.query():
                e.synchronize()  # only when far behind: bounded memory
            done.append((t, b.elapsed_time(e) / 1e3))
        return done

    def drain(self) -> list:
        """Every pending measurement (synchronises: for the end of a run, not inside serving)."""
        out = []
        while self._pending:
            t, b, e = self._pending.popleft()
            e.synchronize()
            out.append((t, b.elapsed_time(e) / 1e3))
        return out


@dataclass
class PredictionLog:
    """Bounded record of (predicted, measured) step times, for the predicted-vs-measured error."""
    maxlen: int = 100000
    pairs: deque = field(default_factory=deque)

    def add(self, predicted_s: Optional[float], measured_s: float) -> None:
        if predicted_s is None or not measured_s > 0:
            return
        self.pairs.append((predicted_s, measured_s))
        while len(self.pairs) > self.maxlen:
            self.pairs.popleft()

    def abs_pct_errors(self) -> list:
        return [abs(p - m) / m * 100.0 for p, m in self.pairs]
