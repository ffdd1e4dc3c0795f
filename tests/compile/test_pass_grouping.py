"""The grouping pass (sibling quantized linears of one input -> spear::grouped_linear + slices), CPU Inductor."""

import pytest
import torch
import torch.nn as nn

import spear_compile.compile.backend  # noqa: F401  (registers backend="spear")
from spear_compile.compile import records
from spear_compile.quant.config import QuantConfig
from spear_compile.ec.module import CompensatedLinear
from spear_compile.compile.inspection import inspect
from spear_compile.compile.passes.fuse_quantized_linear import FUSED
from spear_compile.compile.passes.group_sibling_linears import GROUPED, GROUPED_EC
from spear_compile.compile.pass_manager import SpearPassManager
from spear_compile.quant.api import quantize_linear_

torch.set_num_threads(1)
pytestmark = pytest.mark.usefixtures("fresh_compile")


def qlin(k, n, bias=False, dtype=torch.bfloat16, spec="w4-g32-rtn", seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    lin.weight.data = torch.randn(n, k, generator=g) * 0.1
    if bias:
        lin.bias.data = torch.randn(n, generator=g) * 0.1
    lin = lin.to(dtype)
    quantize_linear_(lin, QuantConfig.from_spec(spec))
    return lin


class Block(nn.Module):
    """q|k|v (attention-like views of the outputs), gate|up (SiLU product), o and down on their own inputs;
    ``ec`` wraps k in an EC (stays ungrouped); ``e``: a biased sibling of q (its own group of one: ungrouped)."""

    def __init__(self, ec=False, biased_sibling=False, dtype=torch.bfloat16, k=64, ec_all=False):
        super().__init__()
        self.q, self.k, self.v = qlin(k, 64, dtype=dtype, seed=1), qlin(k, 32, dtype=dtype, seed=2), qlin(k, 32, dtype=dtype, seed=3)
        self.gate, self.up = qlin(k, 96, dtype=dtype, seed=4), qlin(k, 96, dtype=dtype, seed=5)
        self.down = qlin(96, k, dtype=dtype, seed=6)
        self.e = qlin(k, 16, bias=True, dtype=dtype, seed=7) if biased_sibling else None
        g = torch.Generator().manual_seed(8)
        # ``ec``: k alone; ``ec_all``: every linear but down (siblings that all carry one: grouped_linear_ec)
        for name in ("q", "k", "v", "gate", "up") if ec_all else ("k",) if ec else ():
            wrapped = CompensatedLinear.wrap(getattr(self, name), 8, gate="sigmoid")
            for p in wrapped.ec_parameters():
                p.data = (torch.randn(p.shape, generator=g) * 0.2).to(dtype)
            setattr(self, name, wrapped)

    def forward(self, x):
        q = self.q(x).unflatten(-1, (4, 16))
        k = self.k(x).unflatten(-1, (2, 16)).repeat_interleave(2, -2)
        v = self.v(x)
        att = (q * k).sum(-1).softmax(-1)  # [..., 4]
        x2 = x * att.sum(-1, keepdim=True).sigmoid()  # the MLP's input is another node (as after a norm)
        h = torch.nn.functional.silu(self.gate(x2)) * self.up(x2)
        y = self.down(h) + att.sum(-1, keepdim=True) * v.sum(-1, keepdim=True)
        return y + self.e(x).sum(-1, keepdim=True) if self.e is not None else y


def compile_run(m, x, **options):
    seen = []
    opts = {"post_grad_custom_post_pass": lambda g: seen.append([n.target for n in g.nodes if n.op == "call_function"])}
    opts.update(options)
    with torch.no_grad():
        out = torch.compile(m, backend="spear", options=opts)(x)
    return out, seen[0]


@pytest.mark.parametrize("shape", [(1, 64), (1, 1, 64), (2, 3, 64)])
def test_siblings_grouped_and_output_matches_eager(shape):
    m = Block()
    x = torch.randn(*shape, dtype=torch.bfloat16)
    with torch.no_grad():
        eager = m(x)
    out, targets = compile_run(m, x)
    assert targets.count(GROUPED) == 2 and targets.count(FUSED) == 1  # q|k|v, gate|up; down alone
    groups = [(g.modules, g.ns) for g in records.active().groups]
    assert groups == [(("q", "k", "v"), (64, 32, 32)), (("gate", "up"), (96, 96))]
    rec = {r.module: r.group for r in records.active().matches}
    assert rec == {"q": 0, "k": 0, "v": 0, "gate": 1, "up": 1, "down": None}
    assert len(records.active().matches) == 6 and all(r.matched for r in records.active().matches)
    assert (out.float() - eager.float()).norm() / eager.float().norm() < 2e-2


def test_ec_member_and_bias_mismatch_stay_ungrouped():
    m = Block(ec=True, biased_sibling=True, dtype=torch.float32)
    x = torch.randn(2, 64)
    with torch.no_grad():
        eager = m(x)
    out, targets = compile_run(m, x)
    assert [g.modules for g in records.active().groups] == [("q", "v"), ("gate", "up")]
    assert targets.count(GROUPED) == 2 and targets.count(FUSED) == 3  # k (EC), e (bias), down
    kinds = {r.module: (r.kind, r.group) for r in records.active().matches}
    assert kinds["k"] == ("ec-gated", None) and kinds["e"] == ("plain", None)
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(3, 64), (1, 2, 64)])
def test_ec_siblings_grouped_with_their_ecs(shape):
    m = Block(ec_all=True, dtype=torch.float32)
    x = torch.randn(*shape)
    with torch.no_grad():
        eager = m(x)
    out, targets = compile_run(m, x)
    assert targets.count(GROUPED_EC) == 2 and GROUPED not in targets and targets.count(FUSED) == 1
    groups = [(g.modules, g.ns, g.ec_rank) for g in records.active().groups]
    assert groups == [(("q", "k", "v"), (64, 32, 32), 8), (("gate", "up"), (96, 96), 8)]
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)
    if shape == (3, 64):
        text = inspect(m, example_input=x).table()
        assert "q | k | v  (N 64+32+32, K 64, EC r=8 each)" in text and "3 launches for 6 fused linears" in text


def test_ec_siblings_left_to_the_prefill_decomposition_and_off_by_env(monkeypatch):
    m = Block(ec_all=True, dtype=torch.float32)
    x = torch.randn(70, 64)  # a static M the decomposition takes (no CUDA graphs)
    with torch.no_grad():
        eager = m(x)
    out, targets = compile_run(m, x)
    assert GROUPED_EC not in targets and not records.active().groups
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)
    with_ec = SpearPassManager().uuid()
    monkeypatch.setenv("SPEAR_GROUP_EC_LINEARS", "0")
    assert SpearPassManager().uuid() != with_ec  # the FX graph cache is keyed on it
    torch._dynamo.reset()
    _, targets = compile_run(m, torch.randn(3, 64))
    assert GROUPED_EC not in targets and targets.count(FUSED) == 6


def test_grouping_off_by_option_and_env(monkeypatch):
    m = Block()
    x = torch.randn(1, 64, dtype=torch.bfloat16)
    _, targets = compile_run(m, x, spear_group_linears=False)
    assert GROUPED not in targets and targets.count(FUSED) == 6 and not records.active().groups
    monkeypatch.setenv("SPEAR_GROUP_LINEARS", "0")
    assert not SpearPassManager().grouping.enabled
    assert SpearPassManager().uuid() != SpearPassManager(group_linears=True).uuid()  # FX cache keyed on it
    torch._dynamo.reset()
    _, targets = compile_run(m, x)
    assert GROUPED not in targets


def test_more_than_four_siblings_split_into_groups():
    class Wide(nn.Module):
        def __init__(self):
            super().__init__()
            self.ls = nn.ModuleList(qlin(32, 16 + 8 * i, dtype=torch.float32, seed=i) for i in range(6))

        def forward(self, x):
            return torch.cat([lin(x) for lin in self.ls], -1)

    m = Wide()
    x = torch.randn(3, 32)
    with torch.no_grad():
        eager = m(x)
    out, targets = compile_run(m, x)
    assert [len(g.members) for g in records.active().groups] == [3, 3] and targets.count(FUSED) == 0
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)


def test_inspect_shows_groups():
    m = Block()
    rep = inspect(m, example_input=torch.randn(1, 64, dtype=torch.bfloat16))
    assert {r.module: r.group for r in rep.rows} == {
        "q": "g0", "k": "g0", "v": "g0", "gate": "g1", "up": "g1", "down": ""}
    text = rep.table()
    assert "2 sibling groups (5 linears), 3 launches for 6 fused linears" in text and "q | k | v" in text
