"""``spear::paged_decode_attention`` (the Triton kernel under the interpreter, and the torch fallback) against a
float64 attention over each sequence's own positions, gathered position by position from its block table: random
GQA shapes, scattered block tables, context lengths across block and chunk boundaries, poisoned unused blocks."""
import math

import pytest
import torch

from spear_compile import SpearError
from spear_compile.lowering.attention import paged_decode_attention, reference_paged_decode_attention


def float64_attention(q, kc, vc, tables, ctx_lens, scale):
    b, h, d = q.shape
    bs, kvh = kc.shape[1], kc.shape[2]
    group = h // kvh
    out = torch.empty(b, h, d, dtype=torch.float64)
    for i in range(b):
        n = int(ctx_lens[i])
        rows = [(int(tables[i, p // bs]), p % bs) for p in range(n)]
        k = torch.stack([kc[blk, off] for blk, off in rows]).double()   # [n, kvh, d]
        v = torch.stack([vc[blk, off] for blk, off in rows]).double()
        for head in range(h):
            s = (k[:, head // group] @ q[i, head].double()) * scale
            out[i, head] = torch.softmax(s, 0) @ v[:, head // group]
    return out


def case(seed, b, h, kvh, d, bs, num_blocks, width, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, d, generator=g).to(dtype)
    kc = torch.randn(num_blocks, bs, kvh, d, generator=g).to(dtype)
    vc = torch.randn(num_blocks, bs, kvh, d, generator=g).to(dtype)
    perm = torch.randperm(num_blocks - 1, generator=g) + 1
    tables = perm[:b * width].view(b, width).clone()
    ctx = torch.randint(1, width * bs + 1, (b,), generator=g)
    ctx[0] = 1
    ctx[-1] = width * bs
    for i in range(b):   # blocks past a sequence's context: the padding block, poisoned
        used = -(-int(ctx[i]) // bs)
        tables[i, used:] = 0
    kc[0] = float("nan")
    vc[0] = float("nan")
    return q, kc, vc, tables, ctx, 1.0 / math.sqrt(d)


@pytest.mark.parametrize("seed,b,h,kvh,d,bs,width", [
    (0, 3, 8, 2, 32, 16, 6),     # GQA group 4, contexts over 1-96 (chunk of 64 crossed)
    (1, 2, 4, 4, 16, 8, 20),     # MHA, 8-token blocks, 160 positions
    (2, 4, 12, 3, 64, 16, 3),    # group 4, head dim 64
    (3, 1, 32, 1, 16, 4, 40),    # one KV head for 32 query heads (group padded to 32)
])
def test_kernel_matches_float64(monkeypatch, seed, b, h, kvh, d, bs, width):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q, kc, vc, tables, ctx, scale = case(seed, b, h, kvh, d, bs, 2 + b * width, width)
    want = float64_attention(q, kc, vc, tables, ctx, scale)
    got = paged_decode_attention(q, kc, vc, tables, ctx, scale)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def test_torch_fallback_matches_float64(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)   # CPU, no interpreter: the torch ops
    q, kc, vc, tables, ctx, scale = case(5, 3, 8, 2, 32, 16, 2 + 3 * 4, 4)
    kc[0] = 0.0   # the torch path gathers the padding block too (masked after the product): no NaN there
    vc[0] = 0.0
    want = float64_attention(q, kc, vc, tables, ctx, scale)
    torch.testing.assert_close(paged_decode_attention(q, kc, vc, tables, ctx, scale).double(), want, rtol=1e-5,
                               atol=1e-5)
    torch.testing.assert_close(reference_paged_decode_attention(q, kc, vc, tables, ctx, scale).double(), want,
                               rtol=1e-5, atol=1e-5)


def test_bad_shapes_are_refused():
    q, kc, vc, tables, ctx, scale = case(6, 2, 8, 2, 16, 8, 8, 3)
    with pytest.raises(SpearError, match="tables must be"):
        paged_decode_attention(q, kc, vc, tables[:1], ctx, scale)
    with pytest.raises(SpearError, match="does not fit caches"):
        paged_decode_attention(q[:, :7], kc, vc, tables, ctx, scale)


@pytest.mark.gpu
@pytest.mark.parametrize("h,kvh,d", [(32, 8, 64), (40, 40, 128), (64, 8, 128)])   # Llama-3.2-1B, -2-13B, -2-70B
def test_kernel_on_gpu_bf16(h, kvh, d):
    """The compiled kernel in bf16 on the GPU vs float64, and vs the engine's torch path in bf16."""
    q, kc, vc, tables, ctx, scale = case(7, 5, h, kvh, d, 16, 2 + 5 * 70, 70, dtype=torch.bfloat16)
    kc[0] = 0.0
    vc[0] = 0.0
    want = float64_attention(q, kc, vc, tables, ctx, scale)
    dev = [t.cuda() for t in (q, kc, vc, tables, ctx)]
    got = paged_decode_attention(*dev, scale).cpu()
    torch_path = reference_paged_decode_attention(*dev, scale).cpu()
    err = (got.double() - want).abs().max().item()
    err_torch = (torch_path.double() - want).abs().max().item()
    assert err <= max(2 * err_torch, 2e-2), (err, err_torch)
