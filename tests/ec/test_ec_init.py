import torch
import torch.nn as nn
import torch.nn.functional as F
import pytest

from spear_compile import CompensatedLinear, SpearError
from spear_compile.ec.initialization import input_second_moments, svd_factors, svd_init_
from spear_compile.quant.api import quantize_linear_
from spear_compile.quant.config import QuantConfig


def _quantized_linear(n, k, seed):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=False)
    w_fp = lin.weight.detach().clone()
    quantize_linear_(lin, QuantConfig(bits=3))
    return lin, w_fp


def _correlated_inputs(t, k, seed):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) * torch.logspace(0, -2, k)  # anisotropic inputs
    return torch.randn(t, k, generator=g) @ mix.T


def test_zero_rank_and_identity_gate_is_exactly_the_quantized_layer():
    lin, _ = _quantized_linear(24, 64, 0)
    x = torch.randn(5, 64)
    ref = F.linear(x.double(), lin.weight.dequantize(torch.float64)).float()
    for gate in ("none", "sigmoid"):
        ec = CompensatedLinear.wrap(lin, 0, gate)
        torch.testing.assert_close(ec(x), lin(x), rtol=0, atol=0)
        torch.testing.assert_close(ec(x), ref, rtol=1e-5, atol=1e-5)
    # rank > 0 with zero B and zero gate params: g == 1, output unchanged
    ec = CompensatedLinear.wrap(lin, 4, "sigmoid")
    with torch.no_grad():
        ec.ec_A.normal_()
    torch.testing.assert_close(ec(x), lin(x), rtol=0, atol=0)


@pytest.mark.parametrize("gate", ["none", "sigmoid"])
def test_svd_init_reduces_layer_output_error(gate):
    n, k = 48, 96
    lin, w_fp = _quantized_linear(n, k, 1)
    x = _correlated_inputs(512, k, 2)
    sigma = x.double().T @ x.double() / x.shape[0]
    y_fp = x @ w_fp.T
    err_plain = (lin(x) - y_fp).norm()
    errs = []
    for r in (2, 8, 24):
        ec = svd_init_(CompensatedLinear.wrap(lin, r, gate), w_fp, sigma)
        with torch.no_grad():
            errs.append((ec(x) - y_fp).norm())
    assert errs[0] < err_plain
    assert errs[0] > errs[1] > errs[2]


def test_activation_aware_beats_plain_svd_on_weighted_error():
    n, k, r = 32, 64, 4
    g = torch.Generator().manual_seed(3)
    err = torch.randn(n, k, generator=g, dtype=torch.float64)
    x = _correlated_inputs(1024, k, 4).double()
    sigma = x.T @ x / x.shape[0]
    a, b = svd_factors(err, sigma, r)
    u, s, vh = torch.linalg.svd(err)
    plain = (u[:, :r] * s[:r]) @ vh[:r]
    aware = (b.double() @ a.double())
    assert ((err - aware) @ x.T).norm() < ((err - plain) @ x.T).norm()
    # full rank reproduces the error exactly (Σ invertible)
    a, b = svd_factors(err, sigma, min(n, k))
    torch.testing.assert_close((b.double() @ a.double()) @ x.T, err @ x.T, rtol=1e-3, atol=1e-3)


def test_bad_rank_and_empty_calibration_fail_clearly():
    err = torch.randn(8, 16)
    with pytest.raises(SpearError, match="rank=9"):
        svd_factors(err, torch.eye(16), 9)
    with pytest.raises(SpearError, match="Σ shape"):
        svd_factors(err, torch.eye(8), 2)
    lin, _ = _quantized_linear(8, 32, 5)
    with pytest.raises(SpearError, match="rank=9"):
        CompensatedLinear.wrap(lin, 9)
    model = nn.Sequential(nn.Embedding(10, 32), nn.Linear(32, 8))
    with pytest.raises(SpearError, match="empty calibration"):
        input_second_moments(model, torch.zeros(0, 4, dtype=torch.long), ["1"])


def test_input_second_moments_matches_direct_computation():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 8))
    wins = torch.randint(0, 50, (5, 7))
    sig = input_second_moments(model, wins, ["1"], batch_size=2)["1"]
    x = model[0](wins).reshape(-1, 16).double()
    torch.testing.assert_close(sig, x.T @ x / x.shape[0])


def test_svd_factors_nest_by_rank_and_captured_fraction_is_a_cdf():
    from spear_compile.ec.initialization import captured_fraction
    err = torch.randn(24, 40, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    x = _correlated_inputs(512, 40, 7).double()
    sigma = x.T @ x / x.shape[0]
    a8, b8, s = svd_factors(err, sigma, 8, spectrum=True)
    a3, b3 = svd_factors(err, sigma, 3)
    torch.testing.assert_close(a8[:3], a3)
    torch.testing.assert_close(b8[:, :3], b3)
    c = captured_fraction(s)
    assert c.shape == (25,) and c[0] == 0 and c[-1] == pytest.approx(1.0)
    assert torch.all(c[1:] >= c[:-1])
    # c[r] is the share of ||E Σ^½||² the rank-r EC removes
    for r in (1, 3, 8):
        a, b = svd_factors(err, sigma, r)
        resid = ((err - b.double() @ a.double()) @ x.T).square().sum() / (err @ x.T).square().sum()
        assert 1 - float(resid) == pytest.approx(float(c[r]), abs=2e-3)
