"""Prefill paths (M > 64) under the Triton interpreter vs float64 dequantize-then-matmul: the int32-word
dequantize (plain, ``[W | B]`` tail, ``W + B A`` fold, per-word scales), the EC prologue, every EC structure of
dequantize + cuBLAS (after / c_in / kcat / fold), and the swapped Triton GEMM; pc / g128, bf16 / fp16,
gated / static EC, bias, given u."""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import pytest
import torch

from spear_compile.errors import SpearError
from spear_compile import options
from spear_compile.lowering import candidates, configs, dispatch, prefill
from tests.w4_problems import problem, reference, rel, v64, w64

K, N, R = 256, 48, 8


def _problem(m, group, dtype, ec=True, gated=True, bias=False, seed=0, k=K, n=N, r=R):
    return problem(m, group, dtype, ec, gated, bias, seed, k, n, r)


_w64 = w64


def _u64(t):
    return t["x"].double() @ t["ec_A"].double().T


_v64 = v64


_reference = reference  # float64 dequantize-then-matmul (+ bias) (+ float64 EC) (tests/w4_problems.py)


_rel = rel


def _run(t, group, cfg, u=None):
    return dispatch.launch(t["x"], t["qdata"], t["scale"], t["zero"], t["bias"], group,
                           t["ec_A"], t["ec_B"], t["gate_w"], t["gate_b"], u=u, config=cfg)


STRUCTS = [configs.DequantCublasConfig(ec) for ec in configs.EC_STRUCTURES] + [
    configs.DequantCublasConfig("kcat", pad=64, overlap=True, split=True),  # overlap: a no-op off CUDA
    configs.DequantCublasConfig("c_in", split=True), configs.DequantCublasConfig("after", split=True)]

CASES = [  # (M, group, dtype, gated, bias)
    (80, K, torch.bfloat16, True, True),     # per-channel
    (72, 128, torch.float16, True, False),   # g128, one group per dequantize tile
    (65, 32, torch.bfloat16, False, True),   # small groups: per-word scales; static EC (fold applies)
    (70, 64, torch.float16, False, False),
]


@pytest.mark.parametrize("cfg", STRUCTS, ids=lambda c: c.name)
@pytest.mark.parametrize("m,group,dtype,gated,bias", CASES)
def test_dequant_cublas_ec_structures(cfg, m, group, dtype, gated, bias):
    t = _problem(m, group, dtype, gated=gated, bias=bias, seed=18577)
    ref = _reference(t, group)
    assert _rel(_run(t, group, cfg), ref) < 1e-2
    # the tensor-parallel hook: u given (e.g. all-reduced), every structure (fold falls back to kcat)
    u = _u64(t).to(dtype)
    assert _rel(_run(t, group, cfg, u=u), ref) < 1e-2


@pytest.mark.parametrize("m,group,dtype,gated,bias", [
    (80, K, torch.bfloat16, True, True), (72, 128, torch.float16, False, False), (66, 64, torch.bfloat16, True, False)])
def test_swapped_triton_prefill(m, group, dtype, gated, bias):
    t = _problem(m, group, dtype, gated=gated, bias=bias, seed=26496)
    cfg = configs.PrefillConfig(32, 32, min(64, group), 4, 2, swap=True)
    assert _rel(_run(t, group, cfg), _reference(t, group)) < 1e-2
    u = _u64(t).to(torch.float32)
    assert _rel(_run(t, group, cfg, u=u), _reference(t, group)) < 1e-2


def test_w4_only_and_3d_input():
    t = _problem(90, 128, torch.bfloat16, ec=False, bias=True, seed=34415)
    ref = _reference(t, 128)
    t["x"] = t["x"].reshape(3, 30, K)
    for cfg in (configs.DequantCublasConfig(), configs.DequantCublasConfig("kcat")):  # ec ignored without EC
        out = _run(t, 128, cfg)
        assert out.shape == (3, 30, N)
        assert _rel(out.reshape(90, N), ref) < 1e-2


@pytest.mark.parametrize("group,dtype", [(K, torch.bfloat16), (128, torch.float16), (32, torch.bfloat16),
                                         (16, torch.float16)])
def test_dequantize_words(group, dtype):
    t = _problem(1, group, dtype, seed=42334)
    w64 = _w64(t, group)
    w = prefill.dequantize_w4(t["qdata"], t["scale"], t["zero"], group, dtype)
    assert w.shape == (N, K) and w.dtype == dtype
    # within one bf16/fp16 ulp (the interpreter's cast truncates; the GPU's rounds to nearest)
    assert (w.double() - w64).abs().max().item() <= 2 ** -7 * w64.abs().max().item()
    # [W | B] with a zero pad, and W + B A
    wt = prefill.dequantize_w4(t["qdata"], t["scale"], t["zero"], group, dtype, tail=t["ec_B"], tail_width=16)
    assert wt.shape == (N, K + 16)
    assert torch.equal(wt[:, :K], w) and torch.equal(wt[:, K:K + R], t["ec_B"])
    assert not wt[:, K + R:].any()
    wf = prefill.dequantize_w4(t["qdata"], t["scale"], t["zero"], group, dtype, fold=(t["ec_A"], t["ec_B"]))
    ref = w64 + t["ec_B"].double() @ t["ec_A"].double()
    assert (wf.double() - ref).abs().max().item() <= 2 ** -6 * ref.abs().max().item()


def test_dequantize_tail_at_a_column_offset():
    """``tail_col0``: B in its own columns of a wider tail (merged siblings' ECs), zeros elsewhere; ``tail=None``
    with a width: an all-zero tail (a member without EC)."""
    t = _problem(1, 32, torch.bfloat16, seed=50253)
    w = prefill.dequantize_w4(t["qdata"], t["scale"], t["zero"], 32, torch.bfloat16)
    c0 = int(torch.randint(1, 9, ()))
    width = R + c0 + 8 * int(torch.randint(0, 3, ()))
    wt = prefill.dequantize_w4(t["qdata"], t["scale"], t["zero"], 32, torch.bfloat16, tail=t["ec_B"],
                                tail_width=width, tail_col0=c0)
    assert wt.shape == (N, K + width) and torch.equal(wt[:, :K], w)
    assert torch.equal(wt[:, K + c0:K + c0 + R], t["ec_B"])
    assert not wt[:, K:K + c0].any() and not wt[:, K + c0 + R:].any()
    buf = torch.full((N, K + width), float("nan"), dtype=torch.bfloat16)
    wz = prefill.dequantize_w4(t["qdata"], t["scale"], t["zero"], 32, torch.bfloat16, tail_width=width, out=buf)
    assert torch.equal(wz[:, :K], w) and not wz[:, K:].any()
    with pytest.raises(SpearError, match="does not fit"):
        prefill.dequantize_w4(t["qdata"], t["scale"], t["zero"], 32, torch.bfloat16, tail=t["ec_B"],
                               tail_width=R + 2, tail_col0=3)


def test_dequantize_into_rows_of_a_shared_buffer():
    """``out=``/``row0=``: members of a grouped weight dequantized side by side (the rows around them untouched)."""
    seed = 58172
    a = _problem(1, 32, torch.bfloat16, ec=False, seed=seed)
    b = _problem(1, 32, torch.bfloat16, ec=False, seed=seed + 1, n=24)
    buf = torch.full((3 + N + 24 + 2, K), float("nan"), dtype=torch.bfloat16)
    prefill.dequantize_w4(a["qdata"], a["scale"], a["zero"], 32, torch.bfloat16, out=buf, row0=3)
    out = prefill.dequantize_w4(b["qdata"], b["scale"], b["zero"], 32, torch.bfloat16, out=buf, row0=3 + N)
    assert out is buf and buf[:3].isnan().all() and buf[3 + N + 24:].isnan().all()
    for t, rows in ((a, slice(3, 3 + N)), (b, slice(3 + N, 3 + N + 24))):
        w64 = _w64(t, 32)
        assert (buf[rows].double() - w64).abs().max().item() <= 2 ** -7 * w64.abs().max().item()
    for bad in (dict(out=buf, row0=buf.shape[0] - N + 1), dict(out=buf[:, :K - 8], row0=0),
                dict(out=buf.float(), row0=0), dict(out=buf.t(), row0=0)):
        with pytest.raises(SpearError, match="out must be"):
            prefill.dequantize_w4(a["qdata"], a["scale"], a["zero"], 32, torch.bfloat16, **bad)


def test_dequantize_forced_blocks_and_byte_fallback():
    t = _problem(1, 64, torch.bfloat16, ec=False, seed=66091, k=192)  # K8 = 24: ragged word tiles
    w64 = _w64(t, 64)
    for blk in ((16, 16, False), (32, 8, False), (16, 32, False)):  # BW*8 > group: per-word scales forced on
        w = prefill.dequantize_w4(t["qdata"], t["scale"], t["zero"], 64, torch.bfloat16, block=blk)
        assert (w.double() - w64).abs().max().item() <= 2 ** -7 * w64.abs().max().item()
    # rows not 4-byte aligned (K % 8 != 0): the byte kernel, and no [W | B]
    t = _problem(1, 36, torch.bfloat16, seed=1, k=36, n=8, r=4)
    w = prefill.dequantize_w4(t["qdata"], t["scale"], t["zero"], 36, torch.bfloat16)
    assert (w.double() - _w64(t, 36)).abs().max().item() <= 2 ** -7 * _w64(t, 36).abs().max().item()
    with pytest.raises(SpearError, match="K % 8"):
        prefill.dequantize_w4(t["qdata"], t["scale"], t["zero"], 36, torch.bfloat16, tail=t["ec_B"], tail_width=8)


@pytest.mark.parametrize("gated,given,m,split", [(True, False, 40, False), (True, False, 40, True),
                                                 (False, False, 1030, True),  # M >= 1024: 64-row split programs
                                                 (True, True, 40, False), (True, True, 40, True)])
def test_ec_prologue(gated, given, m, split):
    """One launch or split-K + gate; u computed or given; v alone, or ``[x | v]`` with zero pad columns (the pad past
    the gate's power-of-two width included)."""
    t = _problem(m, K, torch.bfloat16, gated=gated, seed=74010)
    u = _u64(t).float() if given else None
    v64 = _v64(t, u)
    v = prefill.ec_prologue(t["x"], None if given else t["ec_A"], u, t["gate_w"], t["gate_b"], R, split=split)
    assert v.shape == (m, R) and _rel(v, v64) < 1e-2
    for width in (16, 40):  # R = 8: the gate is 16 wide; 40 adds a zero store of 32 (masked at 40)
        out = torch.full((m, K + width + 8), float("nan"), dtype=torch.bfloat16)
        prefill.ec_prologue(t["x"], t["ec_A"], u, t["gate_w"], t["gate_b"], R, out=out, col0=K, width=width,
                             copy_x=True, split=split)
        assert torch.equal(out[:, :K], t["x"]) and _rel(out[:, K:K + R], v64) < 1e-2
        assert not out[:, K + R:K + width].any()
        assert torch.isnan(out[:, K + width:].float()).all()  # nothing written past the width


@pytest.mark.parametrize("r,split", [(40, True), (96, False), (96, True)])
def test_ec_prologue_copy_at_wide_ranks(r, split):
    """``[x | v]`` at BLOCK_R > 32: x copied first, then the projection without the copy (``COPY_X_MAX_BLOCK_R``)."""
    t = _problem(70, K, torch.bfloat16, gated=True, seed=81929, r=r)
    v64 = _v64(t, None)
    out = torch.full((70, K + r + 8), float("nan"), dtype=torch.bfloat16)
    prefill.ec_prologue(t["x"], t["ec_A"], None, t["gate_w"], t["gate_b"], r, out=out, col0=K, width=r + 8,
                         copy_x=True, split=split)
    assert torch.equal(out[:, :K], t["x"]) and _rel(out[:, K:K + r], v64) < 1e-2 and not out[:, K + r:].any()


@pytest.mark.parametrize("m,xpass", [(70, (16, 32, 1, 4, 8)),  # 5 M tiles x 8 splits
                                     (70, None),                # default config: 16-row tiles, 2 splits
                                     (1030, (64, 64, 1, 4, 1))])  # M >= 1024: 64-row tiles, 4 splits
def test_ec_prologue_in_place(m, xpass):
    """``[x | 0]`` -> ``[x | v_1 | ... | 0]``: 1-4 ECs of fresh ranks, each gated or static, read from their own
    A / gate; a split-K x pass, then the gates. v's columns start as NaN: every one of them must be written."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    nb = int(torch.randint(1, configs.MAX_IN_PLACE_BLOCKS + 1, (), generator=g))
    ranks = [int(r) for r in torch.randint(1, 24, (nb,), generator=g)]
    gated = [bool(b) for b in torch.randint(0, 2, (nb,), generator=g)]
    x = torch.randn(m, K, generator=g).to(torch.bfloat16)
    blocks, v64 = [], []
    for r, gt in zip(ranks, gated):
        a = (torch.randn(r, K, generator=g) * 0.1).to(torch.bfloat16)
        gw = (torch.randn(r, r, generator=g) * 0.3).to(torch.bfloat16) if gt else None
        gb = (torch.randn(r, generator=g) * 0.1).to(torch.bfloat16) if gt else None
        u = x.double() @ a.double().T
        v64.append(u * 2 * torch.sigmoid(u @ gw.double().T + gb.double()) if gt else u)
        blocks.append((a, gw, gb))
    v64 = torch.cat(v64, 1)
    r = sum(ranks)
    rp = r + (-r % 8)
    out = torch.full((m, K + rp + 8), float("nan"), dtype=torch.bfloat16)  # NaN past [x | 0]: never written
    out[:, :K], out[:, K + r:K + rp] = x, 0
    prefill.ec_prologue_in_place(out, K, blocks, xpass=xpass)
    assert torch.equal(out[:, :K], x)
    assert _rel(out[:, K:K + r], v64) < 1e-2
    assert not out[:, K + r:K + rp].any()  # pad columns stay zero
    assert torch.isnan(out[:, K + rp:].float()).all()


def test_ec_prologue_in_place_rejects_bad_input():
    x = torch.zeros(70, K + 16, dtype=torch.bfloat16)
    a = torch.zeros(4, K, dtype=torch.bfloat16)
    with pytest.raises(SpearError, match="1 to 4 ECs"):
        prefill.ec_prologue_in_place(x, K, [(a, None, None)] * 5)
    with pytest.raises(SpearError, match=r"each A must be"):
        prefill.ec_prologue_in_place(x, K, [(a[:, :-8], None, None)])
    with pytest.raises(SpearError, match=r"each A must be a contiguous"):
        prefill.ec_prologue_in_place(x, K, [(torch.zeros(K, 4, dtype=torch.bfloat16).t(), None, None)])
    with pytest.raises(SpearError, match="W_g"):
        prefill.ec_prologue_in_place(x, K, [(a, torch.zeros(4, 4, dtype=torch.bfloat16), None)])
    with pytest.raises(SpearError, match=r"out must be \[M, >= K \+ R\]"):
        prefill.ec_prologue_in_place(x[:, :K + 2], K, [(a, None, None)])

def test_prefill_candidates_by_key():
    names = lambda cs: [c.name for c in cs]  # noqa: E731
    plain = candidates.prefill_candidates(2048, 4096, 128)
    gated = candidates.prefill_candidates(2048, 4096, 128, has_ec=True, gated=True)
    static = candidates.prefill_candidates(256, 4096, 128, has_ec=True, gated=False)
    for cs in (plain, gated, static):
        assert len(set(names(cs))) == len(cs)  # the tuner finds its pick by name
        assert any(isinstance(c, configs.PrefillConfig) and c.swap for c in cs)
    assert sum(isinstance(c, configs.DequantCublasConfig) for c in plain) == 1
    assert {c.ec for c in gated if isinstance(c, configs.DequantCublasConfig)} == {"after", "c_in", "kcat"}
    assert "fold" in {c.ec for c in static if isinstance(c, configs.DequantCublasConfig)}
    assert not any(isinstance(c, configs.DequantCublasConfig) for c in candidates.prefill_candidates(64, 4096, 128, True))
    assert configs.DequantCublasConfig().name == "dequant+cublas"


def test_bad_block_k_for_group_raises():
    t = _problem(70, 32, torch.bfloat16, seed=0)
    with pytest.raises(SpearError, match="BLOCK_K"):
        _run(t, 32, configs.PrefillConfig(32, 32, 64, 4, 2))


def test_bad_xpass_override_is_refused_at_use_not_import(monkeypatch):
    """``SPEAR_XPASS_IN_PLACE`` (a bench override) names its expected form where it is used; importing the package
    with it malformed still works (the environment is read in ``spear_compile.options``, lazily)."""
    import subprocess
    import sys
    env = dict(os.environ, SPEAR_XPASS_IN_PLACE="64,128,3")
    res = subprocess.run([sys.executable, "-c", "import spear_compile, spear_compile.lowering.dispatch"], env=env,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    monkeypatch.setenv("SPEAR_XPASS_IN_PLACE", "64,128,3")
    out = torch.zeros(16, K + 16, dtype=torch.bfloat16)
    a = torch.zeros(16, K, dtype=torch.bfloat16)
    with pytest.raises(SpearError, match="SPEAR_XPASS_IN_PLACE=.*expected five positive integers"):
        prefill.ec_prologue_in_place(out, K, [(a, None, None)])
    monkeypatch.setenv("SPEAR_XPASS_IN_PLACE", "64,128,3,4,1")
    assert options.current().xpass_in_place == (64, 128, 3, 4, 1)
