"""The peer-reduction pass (``spear_compile/compile/passes/peer_reduce_row_ec.py``) on CPU, one process, gloo
at world size 1: row-parallel W4 + EC layers compiled with ``backend="spear"``.

A layer given a workspace slot (simulated: CPU buffers behind pointer arrays, as in ``test_tp_peer_reduce.py``)
is rewritten to ``spear::peer_reduce_row_ec``, which really runs (the Triton kernel under the interpreter; at
TP = 1 one launch needs no peer), and its output equals eager's; variants it does not handle (a max
reduction of u, M > 16, no workspace) keep the fallback, equal to eager, are recorded with the reason and,
but for "no workspace", warned about. What this cannot show: real peers, CUDA graphs, NCCL (multi-GPU: not run).
"""
import tempfile
import warnings

import pytest
import torch
import torch.distributed as dist
from torch.distributed import _functional_collectives as funcol

from spear_compile import CompensatedLinear, QuantizedWeight
from spear_compile.compile.inspection import inspect
from spear_compile.distributed.layers import RowParallelCompensatedLinear, make_row_parallel
from spear_compile.distributed.sharding import shard_row_
from test_tp_peer_reduce import simulated_workspaces

PEER = torch.ops.spear.peer_reduce_row_ec.default
WAIT = torch.ops._c10d_functional.wait_tensor.default


@pytest.fixture(scope="module")
def group():
    if dist.is_initialized():
        yield dist.group.WORLD.group_name
        return
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", rank=0, world_size=1, store=dist.FileStore(f"{tmp}/store", 1))
        try:
            yield dist.group.WORLD.group_name
        finally:
            dist.destroy_process_group()


def row_layer(group, n, k, rank, gate, bias, seed, cls=RowParallelCompensatedLinear, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(k, n, bias=bias, dtype=dtype)
    with torch.no_grad():
        if bias:
            lin.bias.copy_(torch.randn(n, generator=g))
    lin.weight = torch.nn.Parameter(QuantizedWeight.from_float((torch.randn(n, k, generator=g) / k ** 0.5).to(dtype),
                                                               4, 32), requires_grad=False)
    mod = CompensatedLinear.wrap(lin, rank, gate, dtype=dtype)
    with torch.no_grad():
        for p in mod.ec_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    make_row_parallel(shard_row_(mod, 0, k), group, 0, 1)
    mod.__class__ = cls
    return mod


def attach(mods, rank):
    (ws,) = simulated_workspaces(1, len(mods), r_split=2, max_rank=rank)
    for slot, mod in enumerate(mods):
        mod.attach_peer_reduce(ws.slot_args(slot), ws.epoch[slot:slot + 1], ws.done[slot:slot + 1])
    return ws


class Two(torch.nn.Module):
    """Two row-parallel EC layers in a row (o_proj-like then down_proj-like)."""

    def __init__(self, first, second):
        super().__init__()
        self.first, self.second = first, second

    def forward(self, x):
        return self.second(torch.relu(self.first(x)))


def targets(gm_records):
    return [(r.module, r.rewritten, r.reason) for r in gm_records.peer_reduce]


@pytest.mark.parametrize("shape,dtype", [((1, 3, 64), torch.float32), ((2, 64), torch.float32),
                                         ((1, 1, 64), torch.bfloat16)])
def test_pass_rewrites_the_fallback_to_the_peer_op_and_matches_eager(group, fresh_compile, shape, dtype):
    """Gated EC with bias and static EC without bias (Llama's o/down), 3-D / 2-D input, fp32 and bf16 decode
    (M = 1: Inductor's CPU form of the gate's addmm, with casts); the op really runs."""
    first = row_layer(group, 64, 64, 8, "sigmoid", True, 1, dtype=dtype)
    second = row_layer(group, 48, 64, 8, "none", False, 2, dtype=dtype)
    model = Two(first, second).eval()
    ws = attach([first, second], 8)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    with torch.no_grad():
        want = model(x)
        ref = second(torch.relu(first(x)))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = torch.compile(model, backend="spear")(x)
    assert not [w for w in caught if "spear_compile" in str(w.message)]  # all rewritten: no fallback warning
    assert torch.equal(want, ref)
    assert (got.float() - want.float()).abs().max().item() < tol * want.float().abs().max().item()
    recs = fresh_compile.peer_reduce
    assert [(r.module, r.rewritten, r.workspace, r.gated, r.bias, r.n, r.k, r.rank, r.m) for r in recs] == [
        ("first", True, True, True, True, 64, 64, 8, x.numel() // 64),
        ("second", True, True, False, False, 48, 64, 8, x.numel() // 64)], targets(fresh_compile)
    assert ws.epoch.tolist() == [1, 1] and ws.done.tolist() == [0, 0]  # the kernel ran once per layer
    peer_rows = [r for r in fresh_compile.matches if r.kind == "peer-reduce"]
    assert [r.module for r in peer_rows] == ["first", "second"]


def test_inspect_shows_rewritten_and_fallback_layers(group):
    torch._dynamo.reset()
    first = row_layer(group, 64, 64, 8, "sigmoid", False, 4)
    second = row_layer(group, 48, 64, 8, "sigmoid", False, 5)
    ws = attach([first], 8)  # only the first has a workspace slot (kept alive: the kernel writes its buffers)
    model = Two(first, second).eval()
    report = inspect(model, example_input=torch.randn(1, 64))
    assert [(r.module, r.rewritten) for r in report.peer_reduce] == [("first", True), ("second", False)]
    assert ws.epoch.tolist() == [1]
    assert "enable_peer_reduce was not called" in report.peer_reduce[1].reason
    table = report.table()
    assert "peer-reduce" in table and "all-reduce fallback" in table and "1/2 row-parallel EC linears" in table


class MaxReducedU(RowParallelCompensatedLinear):
    """A variant the pass does not handle: u all-reduced with max instead of sum."""

    def compensation(self, x):
        u = torch.ops.spear.peer_reduce_slot(torch.nn.functional.linear(x, self.ec_A), self._peer_epoch,
                                             self._peer_done, *self.peer_args.values())
        u = funcol.all_reduce(u, "max", self.tp_group)
        u = u * (2.0 * torch.sigmoid(torch.nn.functional.linear(u, self.ec_gate_w, self.ec_gate_b)))
        return torch.nn.functional.linear(u, self.ec_B)


@pytest.mark.parametrize("case", ["max-reduction", "prefill-m", "no-workspace"])
def test_unmatched_layers_keep_the_fallback_recorded_and_warned(group, fresh_compile, case):
    cls = MaxReducedU if case == "max-reduction" else RowParallelCompensatedLinear
    mod = row_layer(group, 64, 64, 8, "sigmoid", False, 6, cls=cls).eval()
    if case != "no-workspace":
        ws = attach([mod], 8)
    x = torch.randn((1, 32, 64) if case == "prefill-m" else (1, 1, 64), generator=torch.Generator().manual_seed(7))
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        want = mod(x)
        compiled = torch.compile(mod, backend="spear")
        got = compiled(x)
    assert (got - want).abs().max().item() < 1e-4 * want.abs().max().item()
    (rec,) = fresh_compile.peer_reduce
    assert not rec.rewritten and rec.workspace == (case != "no-workspace")
    expected = {"max-reduction": "reduced with 'max'", "prefill-m": "M = 32 rows > 16",
                "no-workspace": "enable_peer_reduce was not called"}[case]
    assert expected in rec.reason, rec.reason
    ours = [str(w.message) for w in caught if "keeps the u all-reduce fallback" in str(w.message)]
    assert len(ours) == (0 if case == "no-workspace" else 1) and all(expected in w for w in ours), ours
    if case != "no-workspace":
        assert ws.epoch.tolist() == [0]  # the epilogue never ran
    # the fallback's qlinear is fused as a plain linear by the next pass; no peer op, no mark left
    assert [r.kind for r in fresh_compile.matches] == ["plain"]
