"""Random W4 (+ EC) problems and their float64 references, shared by the kernel tests. Independent of the package's
own dequantize: codes, scales and zeros are drawn here and dequantized in float64 here (only ``pack``, the storage
layout under test, comes from the package)."""
import torch

from spear_compile.quant.packing import pack


def member(n, k, group, dtype, bias, g):
    """One W4 linear: codes ``q [n, k]``, packed ``qdata``, ``scale``/``zero`` ``[n, k / group]``, optional bias."""
    q = torch.randint(0, 16, (n, k), generator=g)
    groups = k // group
    return dict(q=q, qdata=pack(q, 4), scale=(torch.rand(n, groups, generator=g) * 0.02 + 0.005).to(dtype),
                zero=torch.randint(0, 16, (n, groups), generator=g).to(dtype),
                bias=(torch.randn(n, generator=g) * 0.1).to(dtype) if bias else None)


def problem(m, group, dtype, ec, gated, bias, seed, k, n, r, ec_std=0.05):
    """A W4 linear (``member``), ``x [m, k]`` and, with ``ec``, an EC of rank ``r`` (``ec_A``, ``ec_B`` of std
    ``ec_std``; gate ``gate_w``/``gate_b`` when ``gated``); absent parts are None."""
    g = torch.Generator().manual_seed(seed)
    t = member(n, k, group, dtype, bias, g)
    t["x"] = torch.randn(m, k, generator=g).to(dtype)
    t["ec_A"] = (torch.randn(r, k, generator=g) * ec_std).to(dtype) if ec else None
    t["ec_B"] = (torch.randn(n, r, generator=g) * ec_std).to(dtype) if ec else None
    t["gate_w"] = (torch.randn(r, r, generator=g) * 0.3).to(dtype) if ec and gated else None
    t["gate_b"] = (torch.randn(r, generator=g) * 0.1).to(dtype) if ec and gated else None
    return t


def w64(t, group):
    """``(q - zero) * scale`` in float64, ``[n, k]``."""
    d = torch.float64
    n, k = t["q"].shape
    w = (t["q"].to(d).reshape(n, -1, group) - t["zero"].to(d)[..., None]) * t["scale"].to(d)[..., None]
    return w.reshape(n, k)


def v64(t, u=None):
    """The gated low-rank coordinates ``g(u) ⊙ u`` in float64 (``u = x A^T`` unless given)."""
    u = t["x"].double() @ t["ec_A"].double().T if u is None else u.double()
    if t["gate_w"] is not None:
        u = u * 2 * torch.sigmoid(u @ t["gate_w"].double().T + t["gate_b"].double())
    return u


def reference(t, group, with_ec=True):
    """float64 dequantize-then-matmul (+ bias) (+ the EC when present and ``with_ec``)."""
    y = t["x"].double() @ w64(t, group).T
    if t["bias"] is not None:
        y = y + t["bias"].double()
    if with_ec and t.get("ec_A") is not None:
        y = y + v64(t) @ t["ec_B"].double().T
    return y


def members_reference(x, members, group):
    """float64 ``[x W_1^T (+ b_1) | x W_2^T (+ b_2) | ...]`` of several members of one x."""
    return torch.cat([reference(dict(t, x=x), group) for t in members], -1)


def rel(out, ref):
    """Relative error of ``out`` against the float64 ``ref``; unwritten (NaN) outputs fail loudly."""
    assert not torch.isnan(out).any(), "unwritten (NaN) outputs"
    return ((out.double() - ref).norm() / ref.norm()).item()
