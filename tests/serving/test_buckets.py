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
