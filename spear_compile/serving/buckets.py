"""Graph buckets: the padded sizes the engine's compiled graphs and CUDA graphs run at. One home for the padding
rules, which the model runner pads each step by and the step cost model predicts with (pure Python: the scheduler
imports it without torch)."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import SpearError

MIN_DIM = 2  # every dynamic size is padded to at least this (no 0/1 specialization, no extra graphs)


def next_bucket(n: int, buckets) -> int:
    for b in buckets:
        if b >= n:
            return b
    raise SpearError(f"model runner: {n} exceeds the largest bucket {buckets[-1]}")


def pow2_buckets(lo: int, hi: int) -> tuple:
    """``lo``, ``2 lo``, ``4 lo``, ... below ``hi``, then ``hi``."""
    out, b = [], lo
    while b < hi:
        out.append(b)
        b *= 2
    out.append(max(hi, lo))
    return tuple(sorted(set(out)))


def pow2_bucket(n: int, lo: int, hi: int) -> int:
    """``next_bucket(n, pow2_buckets(lo, hi))`` for ``n <= max(hi, lo)``, without building the buckets (the step cost
    model pads with it several times a scheduling step)."""
    b = lo
    while b < n:
        b *= 2
    return b if b < hi else max(hi, lo)


def mixed_decode_rows(num_decodes: int, num_prefill_tokens: int, max_decode_rows: int, max_tokens: int) -> int:
    """Decode rows a mixed step runs: at least ``MIN_DIM`` (dummies), padded to a power of two up to
    ``max_decode_rows`` (fewer graph keys), unless the padded rows and the prefill tokens would overflow
    ``max_tokens`` (the largest token bucket)."""
    rows = max(num_decodes, MIN_DIM)
    padded = pow2_bucket(rows, MIN_DIM, max(MIN_DIM, max_decode_rows, rows))
    return padded if padded + num_prefill_tokens <= max_tokens else rows


def table_width(max_blocks: int, table_buckets) -> int:
    """The block-table bucket holding a step's longest block list (``max_blocks`` blocks; 0 when none)."""
    return next_bucket(max(max_blocks, 1, MIN_DIM), table_buckets)


def pow2_dim(n: int) -> int:
    """``n`` padded to a power of two, at least ``MIN_DIM`` (chunk rows, logits rows, the mixed logits buffer)."""
    return 1 << (max(n, MIN_DIM) - 1).bit_length()


@dataclass(frozen=True)
class MixedDims:
    """A mixed step's padded sizes: the input shapes of its graph (``shapes``), hence its CUDA-graph key."""
    tokens: int          # token bucket (decode rows first, then the chunks, then padding)
    decode_rows: int
    decode_width: int    # decode block-table width
    prefills: int        # chunk rows
    chunk_len: int
    prefill_width: int
    logits_rows: int

    def shapes(self) -> tuple:
        """``ModelRunner.mixed_inputs``' argument shapes: ids, positions, slot blocks, slot offsets, decode tables,
        decode context lengths, prefill tables, query index, query positions, logits rows."""
        t, nd, np_, ql = self.tokens, self.decode_rows, self.prefills, self.chunk_len
        return ((t,), (t,), (t,), (t,), (nd, self.decode_width), (nd,), (np_, self.prefill_width), (np_, ql),
                (np_, ql), (self.logits_rows,))

    @classmethod
    def from_shapes(cls, shapes) -> "MixedDims":
        """The dims whose ``shapes()`` are ``shapes`` (a mixed-step graph's key)."""
        (t,), _, _, _, (nd, dw), _, (np_, pw), (_, ql), _, (s,) = shapes
        return cls(t, nd, dw, np_, ql, pw, s)

    def attention_cells(self) -> int:
        """Chunk query rows x prefill block-table width: the prefill attention's work at these dims."""
        return self.prefills * self.chunk_len * self.prefill_width

    def covers(self, other: "MixedDims", max_padding: float, bucket_padding: float = 1.0) -> bool:
        """Whether a step of dims ``other`` may run padded to these: tokens and decode rows at least ``other``'s
        and at most ``bucket_padding`` times them (1: the same, the linears' work unchanged) with room for its
        chunks beside the decode rows, every other dim at least ``other``'s, the prefill attention's work and the
        decode tables' width at most ``max_padding`` times ``other``'s."""
        return (other.tokens <= self.tokens <= bucket_padding * other.tokens
                and other.decode_rows <= self.decode_rows <= bucket_padding * other.decode_rows   # >= MIN_DIM rows
                and self.tokens - self.decode_rows >= other.tokens - other.decode_rows
                and other.decode_width <= self.decode_width <= max_padding * other.decode_width
                and self.prefills >= other.prefills and self.chunk_len >= other.chunk_len
                and self.prefill_width >= other.prefill_width and self.logits_rows >= other.logits_rows
                and self.attention_cells() <= max_padding * other.attention_cells())


def prefill_dims(chunk_lens, prefill_blocks: int, max_tokens: int, table_buckets) -> tuple:
    """(chunk rows, chunk length, block-table width) a mixed step pads its prefill chunks of ``chunk_lens`` tokens
    to (their longest block list ``prefill_blocks``): rows and length to powers of two, the table to its bucket."""
    chunks = list(chunk_lens)
    return (pow2_dim(len(chunks)), pow2_bucket(max(max(chunks, default=0), MIN_DIM), MIN_DIM, max(MIN_DIM, max_tokens)),
            table_width(prefill_blocks, table_buckets))


def attention_cells_at(rows: int, length: int, width: int, blocks: int, block_size: int) -> int:
    """Prefill attention work of a graph of ``rows`` chunk rows x ``length`` x a ``width``-block table, in tokens:
    a block list of ``blocks`` past the table counts unpadded (as the step cost model extrapolates)."""
    return rows * length * max(width, blocks) * block_size


def prefill_attention_cells(chunks, block_size: int, max_tokens: int, table_buckets) -> int:
    """The prefill attention's work in a mixed step of ``chunks`` = ``(tokens before, chunk length)`` pairs, at the
    sizes the step's graph runs: chunk rows x chunk length x the block table's tokens (``MixedDims.attention_cells``
    times the block size; a block list past the largest table bucket counts unpadded, as the step cost model
    extrapolates). 0 without chunks."""
    chunks = list(chunks)
    if not chunks:
        return 0
    longest = max(-(-(c + n) // block_size) for c, n in chunks)
    rows, length, width = prefill_dims([n for _, n in chunks], min(longest, table_buckets[-1]), max_tokens,
                                       table_buckets)
    return attention_cells_at(rows, length, width, longest, block_size)


def mixed_step_dims(num_decodes: int, decode_blocks: int, chunk_lens, prefill_blocks: int, num_completing: int,
                    max_decode_rows: int, token_buckets, table_buckets, full_decode_tables: bool = False) -> MixedDims:
    """The padding of a mixed step of ``num_decodes`` decodes (their longest block list ``decode_blocks``) and
    prefill chunks of ``chunk_lens`` tokens (longest block list ``prefill_blocks``), ``num_completing`` of which end
    their prompts (a logits row each): tokens to a token bucket, decode rows as ``mixed_decode_rows``, chunk rows,
    chunk length and logits rows to powers of two, block tables to their buckets. ``full_decode_tables``: the decode
    tables at the largest width (for a decode attention that reads only each row's context, whose cost the width
    does not change: one graph key instead of one per width)."""
    chunks = list(chunk_lens)
    max_tokens = token_buckets[-1]
    nd = mixed_decode_rows(num_decodes, sum(chunks), max_decode_rows, max_tokens)
    used = nd + sum(chunks)
    decode_width = table_buckets[-1] if full_decode_tables else table_width(decode_blocks, table_buckets)
    rows, length, width = prefill_dims(chunks, prefill_blocks, max_tokens, table_buckets)
    return MixedDims(tokens=next_bucket(used, token_buckets) if used <= max_tokens else used, decode_rows=nd,
                     decode_width=decode_width, prefills=rows, chunk_len=length, prefill_width=width,
                     logits_rows=pow2_dim(num_decodes + num_completing))


def mixed_step_dims_for(decodes, prefills, max_decode_rows: int, token_buckets, table_buckets,
                        full_decode_tables: bool = False) -> MixedDims:
    """``mixed_step_dims`` of a step's requests: ``decodes`` and ``(request, chunk length)`` ``prefills``, as
    scheduled (their ``block_ids`` already hold the step's tokens)."""
    return mixed_step_dims(len(decodes), max((len(r.block_ids) for r in decodes), default=0),
                           [n for _, n in prefills], max((len(r.block_ids) for r, _ in prefills), default=0),
                           sum(r.num_computed_tokens + n == r.num_tokens for r, n in prefills),
                           max_decode_rows, token_buckets, table_buckets, full_decode_tables)
