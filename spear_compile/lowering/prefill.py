"""Prefill runners (M > 16): the Triton W4 GEMM (``w4_prefill_kernel``) with the EC in its epilogue, and
dequantize + cuBLAS with the EC joined as ``EcStructure`` says; the dequantize and EC prologue launchers the
compiler's prefill decomposition also traces into graphs (``dequantize_w4``, ``ec_prologue``, ``ec_prologue_in_place``).
"""
from __future__ import annotations

import torch

from .. import options
from ..errors import SpearError
from ..kernels.ec_prologue import (ec_gate_blocks_kernel, ec_gate_kernel, ec_prologue_kernel, ec_xpass_blocks_kernel,
                                   ec_xpass_kernel)
from ..kernels.w4_dequantize import w4_dequant_words_kernel, w4_dequantize_kernel
from ..kernels.w4_prefill import w4_prefill_kernel
from .candidates import num_sms
from .configs import (COPY_X_MAX_BLOCK_R, MAX_IN_PLACE_BLOCKS, MAX_IN_PLACE_SPLITS, XPASS_CONFIG, block_r, cdiv,
                      next_pow2, valid_block_k)
from .decode import project_u
from .precompile import launcher
from .runtime import WORKSPACES
from .workspace import Fork


def gemv_ok(k, qdata) -> bool:
    """The int32-word kernels need K % 8 == 0 and 4-byte aligned rows."""
    return k % 8 == 0 and qdata.data_ptr() % 4 == 0 and qdata.is_contiguous()


def gate(u, gate_w, gate_b):
    """``g(u) ⊙ u`` in fp32 (the EC formula: ``spear_compile.ec.module.gated``)."""
    from ..ec.module import gated
    return gated(u.float(), gate_w.float(), gate_b.float())


def run_prefill(cfg, x2, qdata, scale, zero, bias, group_size, ec_A, ec_B, gate_w, gate_b, u, y):
    m, k = x2.shape
    n = qdata.shape[0]
    if not valid_block_k(cfg.block_k, k, group_size):
        raise SpearError(f"spear_compile.lowering: {cfg.name} needs BLOCK_K within one group "
                         f"(K={k}, group {group_size})")
    has_ec = ec_B is not None
    if has_ec and u is None:
        u = project_u(x2, ec_A)
    r = ec_B.shape[1] if has_ec else 0
    grid = (cdiv(m, cfg.block_m) * cdiv(n, cfg.block_n),)
    launcher(w4_prefill_kernel, grid)(
        x2, qdata, scale, zero, bias if bias is not None else y, y,
        u.contiguous() if has_ec else y, ec_B if has_ec else y,
        gate_w if gate_w is not None else y, gate_b if gate_w is not None else y,
        m, n, k, r, group_size, k // group_size, x2.stride(0), y.stride(0),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=8, BLOCK_R=block_r(r),
        HAS_BIAS=bias is not None, HAS_EC=has_ec, GATED=gate_w is not None, PER_CHANNEL=group_size == k,
        INTERPRET=options.interpret(), SWAP=cfg.swap, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return y


def _dequant_block(k, group_size):
    """(BLOCK_N, BLOCK_W words, per-word scales) of ``w4_dequant_words_kernel``: 1024-word (4 KB) tiles; a tile
    inside one group (one scale per row) unless the group is under 128 (then scales per word)."""
    k8 = k // 8
    if group_size >= k:  # per-channel: long rows
        bw = min(64, next_pow2(k8))
    else:
        bw = min(16, next_pow2(k8))
    per_word = group_size < k and group_size < 8 * bw
    return max(16, 1024 // bw), bw, per_word


def _launcher(kernel, traceable, grid):
    """``launcher(kernel, grid)``, or ``torch.library.wrap_triton(kernel)[grid]`` when ``traceable``: a call traced
    into an FX graph (``passes.decompose_prefill_linears``) then records the launch itself, which Inductor emits from
    its wrapper."""
    if not traceable:
        return launcher(kernel, grid)
    from torch.library import wrap_triton
    return wrap_triton(kernel)[grid]


def dequantize_w4(qdata, scale, zero, group_size, dtype, *, tail=None, tail_width=0, tail_col0=0, fold=None,
                  block=None, out=None, row0=0, traceable=False):
    """``(q - zero) * scale`` as a ``[N, K]`` ``dtype`` matrix, or ``[N, K + tail_width]`` ``[W | tail]``
    (``tail``: ``[N, r]`` in tail columns ``tail_col0 .. tail_col0 + r``, zeros in the others; ``tail=None``
    with ``tail_width > 0``: all zeros), or ``W + B A`` (``fold=(A, B)``). int32-word kernel where the rows
    allow it (``gemv_ok``), else the byte kernel (plain W only). ``block``: force (BLOCK_N, BLOCK_W, per-word).
    ``out``: write rows ``row0 .. row0 + N`` of this ``[*, K + tail_width]`` tensor instead (and return it).
    ``traceable``: launched through ``wrap_triton`` (the caller has checked the rows: fake tensors have no
    data pointer)."""
    n, k = qdata.shape[0], qdata.shape[1] * 2
    where = "spear_compile.lowering.prefill.dequantize_w4"
    r_tail = tail.shape[1] if tail is not None else 0
    if tail_width < 0 or not 0 <= tail_col0 <= tail_width - r_tail:
        raise SpearError(f"{where}: tail of width {r_tail} at column {tail_col0} does not fit tail_width={tail_width}")
    has_tail = tail_width > 0
    if out is not None and (out.dim() != 2 or out.shape[1] != k + tail_width or out.stride(1) != 1
                            or not 0 <= row0 <= out.shape[0] - n or out.dtype != dtype):
        raise SpearError(f"{where}: out must be {dtype} [>= row0 + {n}, {k + tail_width}] with unit column stride, "
                         f"got {out.dtype} {tuple(out.shape)} stride {out.stride()} and row0={row0}")
    if not (traceable or gemv_ok(k, qdata)):
        if has_tail or fold is not None or out is not None:
            raise SpearError(f"{where}: [W | B] / W + BA / out= need K % 8 == 0 and 4-byte aligned packed rows")
        w = torch.empty(n, k, dtype=dtype, device=qdata.device)
        block_k = min(128, group_size) if group_size < k else 128  # in one group: one (scale, zero) per row
        launcher(w4_dequantize_kernel, (cdiv(n, 32), cdiv(k, block_k)))(
            qdata, scale, zero, w, n, k, group_size, k // group_size, BLOCK_N=32, BLOCK_K=block_k, num_warps=4)
        return w
    w = torch.empty(n, k + tail_width, dtype=dtype, device=qdata.device) if out is None else out
    bn, bw, per_word = block or _dequant_block(k, group_size)
    if group_size < k and group_size < 8 * bw:
        per_word = True
    ab = fold if fold is not None else (None, None)
    extra = tail if tail is not None else ab[1]
    r = extra.shape[1] if extra is not None else 0
    dummy = scale  # never read; the activation dtype, like B and A
    grid = (cdiv(n, bn), cdiv(k // 8, bw) + (1 if has_tail else 0))
    _launcher(w4_dequant_words_kernel, traceable, grid)(
        qdata.view(torch.int32), scale, zero, w, extra if extra is not None else dummy,
        ab[0] if fold is not None else dummy,
        n, k, k // 8, r, tail_width, group_size, k // group_size, w.stride(0), row0, tail_col0,
        BLOCK_N=bn, BLOCK_W=bw, PER_WORD_SCALE=per_word, TAIL=has_tail,
        BLOCK_T=next_pow2(max(tail_width, 16)), FOLD=fold is not None, BLOCK_R=block_r(r),
        INTERPRET=options.interpret(), num_warps=4,
    )
    return w


def _xpass_grid(m, k, cfg, device, max_splits=None):
    """A split-K x pass's geometry from its config ``(BLOCK_M, BLOCK_K, stages, warps, programs per SM)``: 16-row
    tiles below M = 1024, K split so that there are about ``programs per SM`` programs per SM (at most
    ``max_splits`` splits). Returns (BLOCK_M, BLOCK_K, stages, warps, M tiles, K blocks per split, splits)."""
    bm, bk, stages, warps, per_sm = cfg
    bm = bm if m >= 1024 else 16
    bk = min(bk, max(16, next_pow2(k)))
    m_tiles, n_kb = cdiv(m, bm), cdiv(k, bk)
    splits = min(n_kb, max_splits or n_kb, max(1, cdiv(per_sm * num_sms(device), m_tiles)))
    per = cdiv(n_kb, splits)
    return bm, bk, stages, warps, m_tiles, per, cdiv(n_kb, per)


def ec_prologue(x2, ec_A, u, gate_w, gate_b, r, out=None, col0=0, width=None, copy_x=False, split=False,
                traceable=False, gdc=False):
    """``v = g(u) ⊙ u`` (u = x Aᵀ in fp32, or the given ``u``) into columns ``col0 .. col0 + width`` of ``out``
    (zeros past r; a new ``[M, r]`` tensor by default); ``copy_x``: x into columns ``0 .. K`` too.
    ``split=False``: one launch, one program per 16 rows (``ec_prologue_kernel``); ``split=True``: a split-K
    pass over x with ~2 programs per SM (``ec_xpass_kernel``: copy + fp32 partials) and the gate
    (``ec_gate_kernel``) in a second launch. ``traceable``: launched through ``wrap_triton`` (``_launcher``).
    (``[x | 0]`` already in ``out``, written by x's producer: ``ec_prologue_in_place``.) ``gdc`` (one launch only):
    the next launch may start at once under programmatic dependent launch and must wait for v itself
    (``griddepcontrol.wait``: the Gluon swap kernel's EC epilogue)."""
    if gdc and split:
        raise SpearError("spear_compile.lowering.prefill.ec_prologue: gdc needs the one-launch prologue (split=False)")
    m, k = x2.shape
    width = r if width is None else width
    if out is None:
        out = torch.empty(m, width, dtype=x2.dtype, device=x2.device)
    x_in_out = False  # x read from columns 0 .. K of out (X_IN_OUT)
    if copy_x and u is None and block_r(r) > COPY_X_MAX_BLOCK_R:
        # measured on H100 / Triton 3.6 (bench/NOTES_kernels.md, session 8): with the copy in the same loop as the
        # x Aᵀ dot, u came out wrong at BLOCK_R >= 64 (rel err 1e-2 at 64, 0.2 at 96 and 128; x copied exactly).
        # Copy first, then the projection without the copy, which is right at every rank.
        out[:, :k].copy_(x2)
        x2, copy_x, x_in_out = out[:, :k], False, True
    if u is not None:
        u = u.reshape(m, r)
        if u.stride(-1) != 1:
            u = u.contiguous()
    br = block_r(r)
    pad = next_pow2(width - br) if width > br else 0
    dummy = ec_A if ec_A is not None else x2  # never read (not x: x may be a view of ``out``, written here)
    gw, gb = (gate_w, gate_b) if gate_w is not None else (dummy, dummy)
    if not split:
        _launcher(ec_prologue_kernel, traceable, (cdiv(m, 16),))(
            dummy if x_in_out else x2, ec_A if ec_A is not None else dummy, u if u is not None else dummy, gw, gb, out,
            m, k, r, width, 0 if x_in_out else x2.stride(0), u.stride(0) if u is not None else 0, out.stride(0), col0,
            BLOCK_M=16, BLOCK_K=min(256, max(16, next_pow2(k))), BLOCK_R=br,
            COPY_X=copy_x, U_GIVEN=u is not None, GATED=gate_w is not None, LOOP=copy_x or u is None,
            INTERPRET=options.interpret(), BLOCK_PAD=pad, X_IN_OUT=x_in_out, GDC=gdc, num_warps=4, num_stages=3,
        )
        return out
    part = None
    if copy_x or u is None:
        bm, bk, stages, warps, m_tiles, per, n_split = _xpass_grid(
            m, k, options.XPASS_IN_PLACE_DEFAULT if x_in_out else XPASS_CONFIG, x2.device)
        if u is None:
            part = torch.empty(n_split, m, br, dtype=torch.float32, device=x2.device)
        _launcher(ec_xpass_kernel, traceable, (m_tiles, n_split))(
            dummy if x_in_out else x2, ec_A if ec_A is not None else dummy, part if part is not None else out,
            out if copy_x or x_in_out else part, m, k, r, 0 if x_in_out else x2.stride(0), out.stride(0), per * bk,
            BLOCK_M=bm, BLOCK_K=bk, BLOCK_R=br, COPY_X=copy_x, PROJECT=u is None, X_IN_OUT=x_in_out,
            INTERPRET=options.interpret(), num_warps=warps, num_stages=stages,
        )
    _launcher(ec_gate_kernel, traceable, (cdiv(m, 16),))(
        part if part is not None else out, u if u is not None else dummy, gw, gb, out,
        m, r, width, part.shape[0] if part is not None else 0, u.stride(0) if u is not None else 0,
        out.stride(0), col0,
        BLOCK_M=16, BLOCK_R=br, U_GIVEN=u is not None, GATED=gate_w is not None, BLOCK_PAD=pad, num_warps=4,
    )
    return out


def ec_prologue_in_place(out, k, blocks, traceable=False, xpass=None):
    """``out = [x | 0]`` (``[M, K + width]``, written by x's producer) becomes ``[x | v_1 | v_2 | ... | 0]``:
    ``blocks`` = ``[(A_b, gate_w_b or None, gate_b_b or None), ...]``, up to ``MAX_IN_PLACE_BLOCKS`` ECs of x
    (merged siblings), each read from its own tensors (no stacked copies), ``v_b = g(u_b) ⊙ u_b``,
    ``u_b = x A_bᵀ`` in fp32, in columns ``K + r_1 + ... + r_(b-1) ..``. Two launches: the split-K x pass
    (``ec_xpass_blocks_kernel``) and the gates (``ec_gate_blocks_kernel``). ``xpass``: the x pass's (BLOCK_M,
    BLOCK_K, stages, warps, programs per SM), default ``options.current().xpass_in_place`` (``SPEAR_XPASS_IN_PLACE``)."""
    where = "spear_compile.lowering.prefill.ec_prologue_in_place"
    m = out.shape[0]
    ranks = [a.shape[0] for a, _, _ in blocks]
    if not 1 <= len(blocks) <= MAX_IN_PLACE_BLOCKS:
        raise SpearError(f"{where}: 1 to {MAX_IN_PLACE_BLOCKS} ECs, got {len(blocks)}")
    if out.dim() != 2 or out.stride(1) != 1 or out.shape[1] < k + sum(ranks):
        raise SpearError(f"{where}: out must be [M, >= K + R] = [*, >= {k + sum(ranks)}] with unit column stride, "
                         f"got {tuple(out.shape)} stride {out.stride()}")
    if any(a.shape[1] != k or a.dtype != out.dtype or not a.is_contiguous() for a, _, _ in blocks):
        raise SpearError(f"{where}: each A must be a contiguous {out.dtype} [r, K={k}], got "
                         f"{[(a.dtype, tuple(a.shape), a.stride()) for a, _, _ in blocks]}")
    for (a, gw, gb), r in zip(blocks, ranks):
        if (gw is None) != (gb is None) or (gw is not None and (tuple(gw.shape) != (r, r) or tuple(gb.shape) != (r,)
                                                                or not (gw.is_contiguous() and gb.is_contiguous()))):
            raise SpearError(f"{where}: a gate needs contiguous W_g [r, r] and b_g [r] with r = {r}, got "
                             f"{None if gw is None else tuple(gw.shape)} and {None if gb is None else tuple(gb.shape)}")
    bm, bk, stages, warps, m_tiles, per, n_split = _xpass_grid(m, k, xpass or options.current().xpass_in_place, out.device,
                                                               MAX_IN_PLACE_SPLITS)
    br = block_r(max(ranks))
    part = torch.empty(n_split, m, len(blocks) * br, dtype=torch.float32, device=out.device)
    pad = [blocks[0][0]] * (MAX_IN_PLACE_BLOCKS - len(blocks))  # never read
    a_s = [a for a, _, _ in blocks] + pad
    gw_s = [gw if gw is not None else a for a, gw, _ in blocks] + pad
    gb_s = [gb if gb is not None else a for a, _, gb in blocks] + pad
    r_s = ranks + [0] * (MAX_IN_PLACE_BLOCKS - len(blocks))
    _launcher(ec_xpass_blocks_kernel, traceable, (m_tiles, n_split))(
        out, part, *a_s, m, k, *r_s, out.stride(0), per * bk, 0,
        BLOCK_M=bm, BLOCK_K=bk, BLOCK_R=br, N_BLK=len(blocks), INTERPRET=options.interpret(),
        num_warps=warps, num_stages=stages,
    )
    _launcher(ec_gate_blocks_kernel, traceable, (cdiv(m, 16),))(
        part, out, *gw_s, *gb_s, m, k, *r_s, out.stride(0),
        BLOCK_M=16, BLOCK_R=br, N_BLK=len(blocks), N_SPLIT=n_split,
        GATE_MASK=sum(1 << i for i, (_, gw, _) in enumerate(blocks) if gw is not None), num_warps=4,
    )
    return out


def contiguous_ec(*ec):
    """The EC operands (ec_A, ec_B, gate_w, gate_b; None entries kept) contiguous, as the kernels read them: a
    member of a merged EC (``grouped.merged_ec``) holds views into its block-diagonal B and gate weight, copied
    for the paths that launch it alone."""
    return tuple(t if t is None or t.is_contiguous() else t.contiguous() for t in ec)


def mm_into(a, b, bias, y):
    """``y = a bᵀ (+ bias)`` by cuBLAS, written into ``y`` (which may be a column slice)."""
    return torch.addmm(bias, a, b.t(), out=y) if bias is not None else torch.mm(a, b.t(), out=y)


def reference_linear(x2, qdata, scale, zero, bias, group_size, ec_A, ec_B, gate_w, gate_b, u, y):
    """The tuner's reference: torch dequantize (independent of every Triton kernel), cuBLAS, EC by torch ops."""
    from ..quant.qlinear import dequantize_packed

    w = dequantize_packed(qdata, scale, zero, x2.shape[1], x2.dtype)
    mm_into(x2, w, bias, y)
    if ec_B is not None:
        if u is None:
            u = project_u(x2, ec_A)
        if gate_w is not None:
            u = gate(u, gate_w, gate_b)
        y.addmm_(u.to(x2.dtype), ec_B.t())
    return y


def run_dequant_cublas(cfg, x2, qdata, scale, zero, bias, group_size, ec_A, ec_B, gate_w, gate_b, u, y):
    """Dequantize + cuBLAS with the EC joined as ``cfg.ec`` says (``DequantCublasConfig``); ``cfg=None``: the
    tuner's reference (``_reference_linear``)."""
    if cfg is None:
        return reference_linear(x2, qdata, scale, zero, bias, group_size, ec_A, ec_B, gate_w, gate_b, u, y)
    m, k = x2.shape
    dt = x2.dtype
    ec = cfg.ec if ec_B is not None else "none"
    if ec == "fold" and (u is not None or gate_w is not None):
        ec = "kcat"
    if ec in ("kcat", "fold") and not gemv_ok(k, qdata):
        ec = "after"
    if ec == "none":
        return mm_into(x2, dequantize_w4(qdata, scale, zero, group_size, dt), bias, y)
    r = ec_B.shape[1]
    if ec == "fold":
        return mm_into(x2, dequantize_w4(qdata, scale, zero, group_size, dt, fold=(ec_A, ec_B)), bias, y)
    overlap = cfg.overlap and x2.is_cuda
    if ec == "kcat":
        rp = -(-r // (cfg.pad or 8)) * (cfg.pad or 8)
        xv = torch.empty(m, k + rp, dtype=dt, device=x2.device)  # [x | v]
    else:
        xv = torch.empty(m, r, dtype=dt, device=x2.device)  # v
    if u is not None:
        u = u.reshape(m, r)
        u = u if u.stride(-1) == 1 else u.contiguous()
    with Fork(overlap, x2.device, WORKSPACES) as fork:  # the prologue (on the side stream when overlapping) ...
        if ec == "kcat":
            ec_prologue(x2, ec_A, u, gate_w, gate_b, r, out=xv, col0=k, width=rp, copy_x=True, split=cfg.split)
        else:
            ec_prologue(x2, ec_A, u, gate_w, gate_b, r, out=xv, split=cfg.split)
    if ec == "kcat":  # ... and the dequantize (current stream) run concurrently
        wc = dequantize_w4(qdata, scale, zero, group_size, dt, tail=ec_B, tail_width=rp)
    else:
        w = dequantize_w4(qdata, scale, zero, group_size, dt)
    fork.join()
    if ec == "kcat":
        return mm_into(xv, wc, bias, y)
    v = xv
    if ec == "c_in":
        mm_into(v, ec_B, bias, y)
        y.addmm_(x2, w.t())
    else:  # after
        mm_into(x2, w, bias, y)
        y.addmm_(v, ec_B.t())
    return y


