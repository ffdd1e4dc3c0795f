"""unwrap_quantized(): quantized linears compiled on plain tensors (no subclass at the graph's inputs)."""
import random

import pytest
import torch
import torch.nn as nn

from spear_compile.compile import records
from spear_compile.ec.module import CompensatedLinear
from spear_compile.quant.weight import QuantizedWeight
from spear_compile.quant.api import quantize
from spear_compile.compile.unwrap import PlainCompensatedLinear, PlainQuantizedLinear, rewrap_quantized, unwrap_quantized

torch.set_num_threads(1)
pytestmark = pytest.mark.usefixtures("fresh_compile")


def model(seed):
    """Fresh random sizes: a quantized linear with bias, a gated EC, a static EC, and one float linear."""
    rng = random.Random(seed)
    k, h, n = (rng.choice((32, 64, 96)) for _ in range(3))
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(k, h), nn.ReLU(), nn.Linear(h, h, bias=False), nn.Linear(h, n, bias=False),
                      nn.Linear(n, 8))
    quantize(m, "w4-pc-rtn", targets=["0", "2", "3"], progress=False)
    m[2] = CompensatedLinear.wrap(m[2], 4, gate="sigmoid")
    m[3] = CompensatedLinear.wrap(m[3], 3, gate="none")
    for p in m[2].ec_parameters() + m[3].ec_parameters():
        nn.init.normal_(p, std=0.1)
    return m, k


def reference(m, x):
    """float64 dequantize-then-matmul, independent of the module forwards."""
    def lin(mod, h):
        w = mod.weight.dequantize(torch.float64) if isinstance(mod.weight, QuantizedWeight) else mod.weight.double()
        y = h @ w.T + (mod.bias.double() if mod.bias is not None else 0)
        if isinstance(mod, CompensatedLinear):
            u = h @ mod.ec_A.double().T
            if mod.gate == "sigmoid":
                u = u * 2 * torch.sigmoid(u @ mod.ec_gate_w.double().T + mod.ec_gate_b.double())
            y = y + u @ mod.ec_B.double().T
        return y
    h = torch.relu(lin(m[0], x.double()))
    return lin(m[4], lin(m[3], lin(m[2], h)))


@pytest.mark.parametrize("seed", [0, 1])
def test_unwrap_keeps_outputs_state_dict_and_rewraps(seed):
    m, k = model(seed)
    x = torch.randn(3, k)
    with torch.no_grad():
        before = m(x)
    sd = m.state_dict(keep_vars=True)
    assert unwrap_quantized(m) == 3
    assert [type(m[i]) for i in (0, 2, 3, 4)] == [PlainQuantizedLinear, PlainCompensatedLinear,
                                                 PlainCompensatedLinear, nn.Linear]
    assert m[0]._spear_qdata.data_ptr() == m[0].weight.qdata.data_ptr()  # same storage, no copy
    after_sd = m.state_dict(keep_vars=True)
    assert list(after_sd) == list(sd) and all(after_sd[n] is sd[n] for n in sd)
    with torch.no_grad():
        assert torch.equal(m(x), before)
        assert (m(x).double() - reference(m, x)).abs().max() < 1e-4
    assert unwrap_quantized(m) == 3  # idempotent
    assert rewrap_quantized(m) == 3
    assert type(m[0]) is nn.Linear and type(m[2]) is CompensatedLinear and "_spear_qdata" not in m[0]._buffers
    with torch.no_grad():
        assert torch.equal(m(x), before)


def test_unwrapped_compiles_to_the_same_fused_ops_without_subclass_inputs():
    m, k = model(2)
    unwrap_quantized(m)
    seen = []

    def backend(gm, example_inputs):
        seen.extend(type(t) for t in example_inputs)
        from spear_compile.compile.backend import spear
        return spear(gm, example_inputs)

    x = torch.randn(2, 5, k)
    with torch.no_grad():
        out = torch.compile(m, backend=backend)(x)
    assert QuantizedWeight not in seen and seen
    assert sorted(r.kind for r in records.active().matches) == ["ec-gated", "ec-static", "plain"]
    assert (out.double() - reference(m, x)).abs().max() < 1e-4


def test_unwrap_refuses_wrong_dtype_and_width_like_the_subclass():
    from spear_compile import SpearError
    m, k = model(3)
    unwrap_quantized(m)
    with pytest.raises(SpearError, match="dtype"):
        m(torch.randn(2, k, dtype=torch.float64))
    with pytest.raises(SpearError, match=f"input has {k + 8} features, weight expects K={k}"):
        m(torch.randn(2, k + 8))
