"""The peer-reduction EC epilogue kernel (``spear_compile/distributed/peer_reduce.py``) on CPU, under the
Triton interpreter, with simulated ranks: every rank's "symmetric" buffer and signal pad are CPU tensors of
this process, reached through device-style pointer arrays, and each call runs every rank's u programs
(phase 1) before any rank's N tiles (phase 2), since the interpreter runs programs one after another.

Checks: the sum over ranks of the kernel's y (what the y all-reduce computes) equals a float64
dequantize-then-matmul reference of the unsharded W4 + EC layer, for TP = 1, 2, 3 (uneven K cuts), gated /
static ECs, per-channel / grouped weights; three calls in a row with new inputs (epoch and parity advance,
counters are left reset), with rank 0 lagging a call behind the others, so the partials of call t+1 land in
its buffer before it reads those of call t (what the parity of the u slots is for).
This tests the math and the flag protocol, not the memory model of real peers (multi-GPU: not run)."""
import pytest
import torch

from spear_compile.distributed.peer_reduce import MAX_M, PeerReduceWorkspace, peer_reduce_row_ec
from spear_compile.distributed.sharding import shard_row_, split_range
from tp_worker import random_ec_layer, reference64  # the W4 + EC layer and its float64 reference, shared


def simulated_workspaces(world, slots, r_split, max_rank):
    block_r, floats, pad_bytes = PeerReduceWorkspace.sizes(world, slots, r_split, max_rank)
    bufs = [torch.zeros(floats) for _ in range(world)]
    pads = [torch.zeros(pad_bytes // 4, dtype=torch.int32) for _ in range(world)]
    buf_ptrs = torch.tensor([b.data_ptr() for b in bufs], dtype=torch.int64)
    pad_ptrs = torch.tensor([p.data_ptr() for p in pads], dtype=torch.int64)
    return [PeerReduceWorkspace(buf_ptrs.data_ptr(), pad_ptrs.data_ptr(), rank, world, slots, r_split, block_r,
                                torch.zeros(slots, dtype=torch.int32), torch.zeros(slots, dtype=torch.int32),
                                keepalive=(bufs, pads, buf_ptrs, pad_ptrs)) for rank in range(world)]


def shards(world, n, k, unit, group_size, rank, gate, seed, dtype):
    out = []
    for r in range(world):
        k0, k1 = split_range(k, unit, r, world)
        out.append((k0, k1, shard_row_(random_ec_layer(n, k, group_size, rank, gate, seed, dtype), k0, k1)))
    return out


CASES = [  # world, N, K, unit, group_size (None: per-channel), EC rank, gate, dtype, M
    (1, 96, 256, 64, 64, 8, "sigmoid", torch.float32, 1),
    (2, 96, 320, 64, None, 8, "sigmoid", torch.float32, 3),
    (3, 130, 320, 64, 64, 12, "sigmoid", torch.bfloat16, 1),
    (3, 64, 448, 64, 32, 8, "none", torch.float32, MAX_M),
]


@pytest.mark.parametrize("world,n,k,unit,group_size,rank,gate,dtype,m", CASES)
def test_peer_reduce_epilogue_sums_to_the_unsharded_layer(world, n, k, unit, group_size, rank, gate, dtype, m):
    seed = world * 100 + n + k
    full = random_ec_layer(n, k, group_size or k, rank, gate, seed, dtype)
    parts = shards(world, n, k, unit, group_size or k, rank, gate, seed, dtype)
    assert world == 1 or len({k1 - k0 for k0, k1, _ in parts}) > 1 or k % (unit * world) == 0
    slots, slot, calls = 3, 1, 3
    wss = simulated_workspaces(world, slots, r_split=2, max_rank=rank)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(m, k, generator=gen).to(dtype) for _ in range(calls)]
    ys = [[torch.full((m, n), float("nan"), dtype=dtype) for _ in range(world)] for _ in range(calls)]  # poisoned

    def run(call, phase, ranks):
        for r in ranks:
            k0, k1, mod = parts[r]
            w = mod.weight
            peer_reduce_row_ec(xs[call][:, k0:k1], w.qdata, w.scale, w.zero, w.group_size, mod.ec_A, mod.ec_B,
                               mod.ec_gate_w, mod.ec_gate_b, wss[r], slot, phase=phase, out=ys[call][r])

    # rank 0 lags: the others finish call t and write call t+1's partials into its buffer before it reads call t's
    others = range(1, world)
    for call in range(calls):
        if call == 0:
            run(call, 1, range(world))
        else:
            run(call, 1, others)
            run(call - 1, 2, [0])
            run(call, 1, [0])
        run(call, 2, others)
    run(calls - 1, 2, [0])
    for ws in wss:
        assert ws.epoch.tolist() == [0, calls, 0] and ws.done.tolist() == [0, 0, 0]
    for call in range(calls):
        ref = reference64(full, xs[call])
        got = sum(y.double() for y in ys[call])
        err = (got - ref).abs().max().item() / ref.abs().max().item()
        assert err < tol, (call, err)
        no_ec = sum((xs[call][:, k0:k1].double() @ mod.weight.dequantize(torch.float64).T) for k0, k1, mod in parts)
        assert (no_ec - ref).abs().max().item() / ref.abs().max().item() > 10 * tol   # the EC term matters


def test_op_single_launch_matches_reference_and_passes_opcheck():
    """``spear::peer_reduce_row_ec`` (what a row-parallel module calls) as one launch (phase 0; TP = 1 is the
    only size a sequential interpreter can run in one launch) on a 3-D input, and torch.library.opcheck
    (schema with the counters' mutation, fake tensor, dispatch)."""
    n, k, rank = 96, 256, 8
    mod = random_ec_layer(n, k, 64, rank, "sigmoid", 5, torch.float32)
    (ws,) = simulated_workspaces(1, 2, r_split=2, max_rank=rank)
    slot = 1
    w = mod.weight
    x = torch.randn(1, 3, k)
    args = (x, w.qdata, w.scale, w.zero, w.group_size, mod.ec_A, mod.ec_B, mod.ec_gate_w, mod.ec_gate_b,
            ws.epoch[slot:slot + 1], ws.done[slot:slot + 1])
    y = torch.ops.spear.peer_reduce_row_ec(*args, **ws.slot_args(slot))
    ref = reference64(mod, x)
    assert y.shape == (1, 3, n)
    assert (y.double() - ref).abs().max().item() < 1e-4 * ref.abs().max().item()
    assert ws.epoch.tolist() == [0, 1] and ws.done.tolist() == [0, 0]
    torch.library.opcheck(torch.ops.spear.peer_reduce_row_ec.default, args, ws.slot_args(slot),
                          test_utils=("test_schema", "test_faketensor"))


def _compile_for_sm90(world: int, gated: bool) -> str:
    """PTX of the kernel for an H100/H200 (sm_90), compiled ahead of time on this machine (no GPU needed)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from spear_compile.distributed.peer_reduce import peer_reduce_row_ec_kernel as kernel
    sig = {name: "*bf16" for name in ("x_ptr", "s_ptr", "z_ptr", "a_ptr", "b_ptr", "gw_ptr", "gb_ptr", "y_ptr")}
    sig.update(q_ptr="*u8", buf_ptrs="i64", flag_ptrs="i64", epoch_ptr="*i32", done_ptr="*i32")
    sig.update({n: "i32" for n in ("buf_offset", "flag_offset", "M", "N", "K", "R", "GROUPS", "K_CHUNK", "TOTAL_PROGRAMS")})
    consts = dict(GROUP_SIZE=128, RANK=world - 1, WORLD=world, R_SPLIT=4, BLOCK_M=16, BLOCK_N=64, BLOCK_K=64,
                  BLOCK_R=32, GATED=gated, HAS_GATE_BIAS=gated, PHASE=0, INTERPRET=False)
    sig.update({n: "constexpr" for n in consts})
    src = ASTSource(fn=kernel, signature={n: sig[n] for n in kernel.arg_names},
                    constexprs={(kernel.arg_names.index(n),): v for n, v in consts.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ptx"]


def test_kernel_compiles_for_sm90_with_system_scope_release_and_acquire():
    """Compiled for sm_90 in a subprocess without the interpreter: the flags are raised with one system-scope
    release exchange per peer and read with system-scope acquire loads; partials are read volatile."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    if not (Path(__import__("triton").__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this Triton has no bundled ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, __file__, "--ptx-stats"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = [line.split() for line in proc.stdout.splitlines() if line.startswith("stats")]
    assert len(stats) == 3
    for _, world, release, acquire, volatile in stats:
        assert int(release) == int(world)          # one flag per peer (own rank included) per u program
        assert int(acquire) >= 1 and int(volatile) >= 1


if __name__ == "__main__":
    import re
    import sys
    if "--ptx-stats" in sys.argv:
        for world, gated in ((2, True), (3, False), (4, True)):
            ptx = _compile_for_sm90(world, gated)
            print("stats", world, len(re.findall(r"atom\.global\.sys\.release\.exch", ptx)),
                  len(re.findall(r"ld\.global\.sys\.acquire", ptx)), len(re.findall(r"ld\.volatile", ptx)))
