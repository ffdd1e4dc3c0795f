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


def rope_case(seed, b, h, kvh, d, bs, width, dtype=torch.float32):
    q, kc, vc, tables, ctx, scale = case(seed, b, h, kvh, d, bs, 2 + b * width, width, dtype)
    g = torch.Generator().manual_seed(seed + 100)
    k_new = torch.randn(b, kvh, d, generator=g).to(dtype)
    v_new = torch.randn(b, kvh, d, generator=g).to(dtype)
    pos = ctx - 1                                             # the new token's position
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).double() / d))
    ang = pos.double()[:, None] * inv[None, :]
    cos = torch.cat([ang.cos(), ang.cos()], -1).to(dtype)
    sin = torch.cat([ang.sin(), ang.sin()], -1).to(dtype)
    slot_block = tables.gather(1, (pos // bs)[:, None])[:, 0]
    slot_off = pos % bs
    return q, k_new, v_new, kc, vc, cos, sin, slot_block, slot_off, tables, ctx, scale


@pytest.mark.parametrize("seed,b,h,kvh,d,bs,width", [(10, 3, 8, 2, 32, 16, 6), (11, 4, 12, 3, 64, 8, 9),
                                                     (12, 2, 4, 4, 32, 4, 30)])
def test_rope_kernel_matches_write_then_attend(monkeypatch, seed, b, h, kvh, d, bs, width):
    """The one-launch decode step (RoPE, cache writes, attention with the new token from registers) vs the torch
    path run on copies of the caches: the same caches after, the same output (float64 reference of the attention)."""
    from spear_compile.lowering.attention import paged_decode_rope_attention, reference_paged_decode_rope_attention, rope
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q, k, v, kc, vc, cos, sin, sb, so, tables, ctx, scale = rope_case(seed, b, h, kvh, d, bs, width)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    kc_ref[0] = 0.0
    vc_ref[0] = 0.0
    want_out = reference_paged_decode_rope_attention(q, k, v, kc_ref, vc_ref, cos, sin, sb, so, tables, ctx, scale)
    want64 = float64_attention(rope(q.double(), cos.double(), sin.double()), kc_ref, vc_ref, tables, ctx, scale)
    got = paged_decode_rope_attention(q, k, v, kc, vc, cos, sin, sb, so, tables, ctx, scale)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want64, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got, want_out, rtol=1e-4, atol=1e-4)
    for i in range(b):   # the new token's key (after RoPE) and value are in the cache
        torch.testing.assert_close(kc[sb[i], so[i]], kc_ref[sb[i], so[i]], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(vc[sb[i], so[i]], vc_ref[sb[i], so[i]])
    untouched = torch.ones(kc.shape[:2], dtype=torch.bool)
    untouched[0] = False
    untouched[sb, so] = False
    assert torch.equal(kc[untouched], kc_ref[untouched]) and torch.equal(vc[untouched], vc_ref[untouched])


@pytest.mark.gpu
@pytest.mark.parametrize("h,kvh,d", [(32, 8, 64), (40, 40, 128)])
def test_rope_kernel_on_gpu_bf16(h, kvh, d):
    """The one-launch decode step compiled for the GPU in bf16 vs the torch path on copies of the caches."""
    from spear_compile.lowering.attention import paged_decode_rope_attention, reference_paged_decode_rope_attention, rope
    args = [t.cuda() if isinstance(t, torch.Tensor) else t for t in rope_case(13, 5, h, kvh, d, 16, 70, torch.bfloat16)]
    q, k, v, kc, vc, cos, sin, sb, so, tables, ctx, scale = args
    kc[0] = 0.0
    vc[0] = 0.0
    kc_ref, vc_ref = kc.clone(), vc.clone()
    want = reference_paged_decode_rope_attention(q, k, v, kc_ref, vc_ref, cos, sin, sb, so, tables, ctx, scale)
    want64 = float64_attention(rope(q.double(), cos.double(), sin.double()).cpu(), kc_ref.cpu(), vc_ref.cpu(),
                               tables.cpu(), ctx.cpu(), scale)
    got = paged_decode_rope_attention(q, k, v, kc, vc, cos, sin, sb, so, tables, ctx, scale)
    err = (got.double().cpu() - want64).abs().max().item()
    err_torch = (want.double().cpu() - want64).abs().max().item()
    assert err <= max(2 * err_torch, 2e-2), (err, err_torch)
    torch.testing.assert_close(kc, kc_ref, rtol=2e-2, atol=2e-2)   # RoPE'd keys: fp32 once vs bf16 per op
    assert torch.equal(vc, vc_ref)


_SM90_SCRIPT = r"""
import json, sys
from spear_compile.kernels import paged_decode_attention as mod
from spear_compile.kernels.aot import compile_for

def compile_ptx(kernel, types, consts):
    values = {n: 64 for n in kernel.arg_names if n not in types and n not in consts}  # strides: multiples of 16
    return compile_for(kernel, consts, types, values, num_warps=4).asm["ptx"]

out = {}
for group, d in ((4, 64), (1, 128), (8, 128)):   # Llama-3.2-1B, -2-13B, -2-70B
    consts = dict(GROUP=group, GROUP_PAD=16, HEAD_DIM=d, BLOCK_SIZE=16, BLOCK_N=64 if d <= 64 else 32, INTERPRET=False)
    plain = {n: "*bf16" for n in ("q_ptr", "k_cache", "v_cache", "out_ptr")}
    plain.update(tables="*i64", ctx_lens="*i64", scale="fp32")
    fused = dict(plain, k_ptr="*bf16", v_ptr="*bf16", cos_ptr="*bf16", sin_ptr="*bf16", slot_block="*i64",
                 slot_off="*i64")
    for name, kernel, types in (("plain", mod.paged_decode_attention_kernel, plain),
                                ("rope", mod.paged_decode_rope_attention_kernel, fused)):
        ptx = compile_ptx(kernel, types, consts)
        out[f"{name}-{group}-{d}"] = {"mma": ptx.count("mma."), "bytes": len(ptx)}
print(json.dumps(out))
"""


def test_kernels_compile_for_sm90():
    """Both kernels compiled ahead of time for an H100/H200 (sm_90, bf16, the 1B / 13B / 70B head shapes) in a
    subprocess without the interpreter: they compile, and both products run on tensor cores (mma)."""
    from tests.sm90_aot import run_sm90_script
    got = run_sm90_script(_SM90_SCRIPT)
    assert len(got) == 6 and all(v["mma"] >= 2 for v in got.values()), got
