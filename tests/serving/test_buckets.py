"""Graph-bucket arithmetic: ``pow2_bucket`` (no tuple built) against the bucket list it stands for."""
from hypothesis import given, settings
from hypothesis import strategies as st

from spear_compile.serving.buckets import MIN_DIM, mixed_decode_rows, next_bucket, pow2_bucket, pow2_buckets


@settings(max_examples=400, deadline=None)
@given(lo=st.integers(1, 64), hi=st.integers(1, 5000), data=st.data())
def test_pow2_bucket_is_the_bucket_of_pow2_buckets(lo, hi, data):
    n = data.draw(st.integers(1, max(hi, lo)))
    assert pow2_bucket(n, lo, hi) == next_bucket(n, pow2_buckets(lo, hi))


@settings(max_examples=400, deadline=None)
@given(d=st.integers(0, 300), p=st.integers(0, 4096), max_rows=st.integers(1, 256), max_tokens=st.integers(16, 4096))
def test_mixed_decode_rows_pads_to_a_power_of_two_bucket_when_it_fits(d, p, max_rows, max_tokens):
    rows = max(d, MIN_DIM)
    want = next_bucket(rows, pow2_buckets(MIN_DIM, max(MIN_DIM, max_rows, rows)))
    assert mixed_decode_rows(d, p, max_rows, max_tokens) == (want if want + p <= max_tokens else rows)


def test_mixed_step_dims_full_decode_tables():
    from spear_compile.serving.buckets import mixed_step_dims
    args = (3, 5, [40], 2, 1, 64, (16, 32, 64, 128), (2, 4, 8, 16, 32))
    assert mixed_step_dims(*args).decode_width == 8
    full = mixed_step_dims(*args, full_decode_tables=True)
    assert full.decode_width == 32 and full.shapes()[4] == (full.decode_rows, 32)
    assert full.prefill_width == mixed_step_dims(*args).prefill_width == 2


def test_mixed_dims_round_trip_and_cover():
    """``MixedDims.from_shapes`` inverts ``shapes``; ``covers``: the same tokens and decode rows, every other dim at
    least as large, the prefill attention work and the decode tables' width at most ``max_padding`` times."""
    from spear_compile.serving.buckets import MixedDims
    small = MixedDims(tokens=64, decode_rows=8, decode_width=4, prefills=2, chunk_len=32, prefill_width=4, logits_rows=8)
    assert MixedDims.from_shapes(small.shapes()) == small and small.attention_cells() == 2 * 32 * 4
    wider = MixedDims(64, 8, 4, 2, 32, 8, 8)             # twice the attention
    assert wider.covers(small, 2.0) and not wider.covers(small, 1.5) and small.covers(small, 1.0)
    assert not small.covers(wider, 8.0)                   # smaller in a dim
    for other in (MixedDims(128, 8, 4, 2, 32, 4, 8), MixedDims(64, 16, 4, 2, 32, 4, 8)):
        assert not other.covers(small, 64.0)              # tokens or decode rows differ: the linears' work would
    assert not MixedDims(64, 8, 16, 2, 32, 4, 8).covers(small, 2.0)   # decode tables 4x wider
    assert MixedDims(64, 8, 4, 4, 64, 4, 16).covers(small, 4.0) and not MixedDims(64, 8, 4, 4, 64, 4, 16).covers(small, 3.9)


def test_prefill_attention_cells_are_the_mixed_dims_attention_work():
    """The step cost model's prefill attention feature is ``MixedDims.attention_cells`` x block size of the dims the
    runner pads the same chunks to, on random chunks (1-5, some after context)."""
    import random

    from spear_compile.serving.buckets import mixed_step_dims, pow2_buckets, prefill_attention_cells
    rng = random.Random(3)
    tokens, tables = pow2_buckets(16, 2048), pow2_buckets(2, 128)
    assert prefill_attention_cells([], 16, 2048, tables) == 0
    for _ in range(200):
        chunks = [(rng.choice((0, rng.randrange(0, 1500))), rng.randrange(1, 400)) for _ in range(rng.randrange(1, 6))]
        if sum(n for _, n in chunks) > 2000:
            continue
        blocks = max(-(-(c + n) // 16) for c, n in chunks)
        dims = mixed_step_dims(3, 4, [n for _, n in chunks], blocks, 1, 64, tokens, tables)
        assert prefill_attention_cells(chunks, 16, 2048, tables) == dims.attention_cells() * 16, (chunks, dims)
    # past the largest table bucket: unpadded, never an error (the cost model extrapolates)
    assert prefill_attention_cells([(2040, 8)], 16, 2048, (2, 4, 8)) == 2 * 8 * 128 * 16


def test_a_larger_token_bucket_or_more_decode_rows_cover_only_with_bucket_padding():
    from spear_compile.serving.buckets import MixedDims
    step = MixedDims(64, 8, 4, 2, 16, 8, 8)
    bigger = MixedDims(128, 8, 4, 2, 16, 8, 8)
    more_rows = MixedDims(128, 16, 4, 2, 16, 8, 16)
    assert not bigger.covers(step, 2.0) and not more_rows.covers(step, 2.0)
    assert bigger.covers(step, 2.0, 2.0) and more_rows.covers(step, 2.0, 2.0)
    assert not MixedDims(256, 8, 4, 2, 16, 8, 8).covers(step, 2.0, 2.0)       # over twice the tokens
    assert not MixedDims(128, 32, 4, 2, 16, 8, 32).covers(step, 2.0, 2.0)     # over twice the decode rows
    # the chunks need the tokens beside the decode rows: 64 - 8 = 56 here, 64 - 16 = 48 there
    assert not MixedDims(64, 16, 4, 2, 16, 8, 8).covers(step, 2.0, 2.0)
    assert not MixedDims(128, 8, 4, 1, 16, 8, 8).covers(step, 2.0, 2.0)       # fewer chunk rows never cover
    assert step.covers(step, 1.0) and step.covers(step, 1.0, 2.0)
