"""Decode / prefill Triton kernels under the interpreter (CPU) vs a float64 reference."""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import pytest
import torch

from spear_compile.errors import SpearError
from spear_compile.lowering import candidates, configs, dispatch, runtime
from tests.w4_problems import problem, reference, rel

K, N, R = 256, 64, 8


def _problem(m, group, dtype, ec, gated, bias, seed, k=K, n=N, r=R):
    return problem(m, group, dtype, ec, gated, bias, seed, k, n, r)


_reference = reference  # float64 dequantize-then-matmul, float64 EC (tests/w4_problems.py)


def _run(t, group, config=None, u=None):
    return dispatch.launch(t["x"], t["qdata"], t["scale"], t["zero"], t["bias"], group,
                           t["ec_A"], t["ec_B"], t["gate_w"], t["gate_b"], u=u, config=config)


_rel = rel


CASES = [  # (M, group, dtype, ec, gated, bias)
    (1, K, torch.bfloat16, False, False, False),
    (1, 128, torch.float16, True, True, True),
    (1, 32, torch.bfloat16, True, False, False),
    (3, 128, torch.bfloat16, True, True, False),
    (3, K, torch.float16, False, False, True),
    (16, K, torch.bfloat16, True, True, True),
    (16, 32, torch.float16, True, False, True),
]


@pytest.mark.parametrize("m,group,dtype,ec,gated,bias", CASES)
def test_decode_kernel(m, group, dtype, ec, gated, bias):
    t = _problem(m, group, dtype, ec, gated, bias, seed=71066)
    split = configs.DecodeConfig(block_n=32, block_k=min(64, group), split_k=2, num_warps=4)
    assert _rel(_run(t, group, split), _reference(t, group)) < 1e-2
    # The kernel leaves its workspace clean: a second call must give the same answer.
    assert _rel(_run(t, group, split), _reference(t, group)) < 1e-2
    ws = runtime.WORKSPACES.get(t["x"].device)
    assert int(ws.sync.abs().sum()) == 0 and float(ws.u.abs().sum()) == 0.0
    assert float(ws.for_n(N)[0].abs().sum()) == 0.0


def test_decode_precomputed_u_and_no_split():
    t = _problem(2, 64, torch.bfloat16, True, True, True, seed=78985)
    u = t["x"].double() @ t["ec_A"].double().T
    cfg = configs.DecodeConfig(block_n=16, block_k=64, split_k=1, num_warps=4)
    assert _rel(_run(t, 64, cfg, u=u.to(torch.bfloat16)), _reference(t, 64)) < 1e-2


@pytest.mark.parametrize("m,group,dtype,ec,gated,bias", [
    (33, K, torch.bfloat16, True, True, True),
    (64, 128, torch.float16, True, False, False),
    (33, 32, torch.bfloat16, False, False, True),
])
def test_prefill_kernel(m, group, dtype, ec, gated, bias):
    t = _problem(m, group, dtype, ec, gated, bias, seed=86904)
    cfg = configs.PrefillConfig(block_m=32, block_n=32, block_k=min(64, group), num_warps=4, num_stages=2)
    assert _rel(_run(t, group, cfg), _reference(t, group)) < 1e-2


def test_dequant_cublas_path_and_3d_input():
    t = _problem(40, 128, torch.bfloat16, True, True, True, seed=94823)
    ref = _reference(t, 128)
    t["x"] = t["x"].reshape(4, 10, K)
    out = _run(t, 128, configs.DequantCublasConfig())
    assert out.shape == (4, 10, N)
    assert _rel(out.reshape(40, N), ref) < 1e-2


def test_default_dispatch_by_phase():
    for m in (1, 16):
        assert dispatch.choose(m, 4096, 4096, 128, torch.bfloat16, 32, True).startswith("decode")
    assert dispatch.choose(33, 4096, 4096, 128).startswith("prefill")
    assert dispatch.choose(2048, 4096, 4096, 128).startswith("dequant+cublas")
    t = _problem(5, K, torch.bfloat16, True, True, False, seed=2739)
    assert _rel(_run(t, K), _reference(t, K)) < 1e-2


def test_bad_inputs_raise_spear_error():
    t = _problem(1, 128, torch.bfloat16, True, True, False, seed=0)
    with pytest.raises(SpearError, match="group_size"):
        _run(t, 96)
    with pytest.raises(SpearError, match="scale"):
        dispatch.launch(t["x"], t["qdata"], t["scale"][:, :1], t["zero"], None, 128)
    with pytest.raises(SpearError, match="ec_A"):
        dispatch.launch(t["x"], t["qdata"], t["scale"], t["zero"], None, 128, t["ec_A"][:, :8], t["ec_B"])
    with pytest.raises(SpearError, match="bf16/fp16"):
        dispatch.launch(t["x"].float(), t["qdata"], t["scale"], t["zero"], None, 128)


GEMV_CASES = [  # (M, group, dtype, ec, gated, bias, config)
    (1, K, torch.bfloat16, False, False, True, configs.DecodeConfig(8, 256, 1, 2)),            # FMA, per-channel
    (1, 64, torch.float16, True, True, False, configs.DecodeConfig(16, 64, 2, 4)),             # FMA, one group per block
    (1, 32, torch.bfloat16, True, False, True, configs.DecodeConfig(8, 128, 2, 2)),            # FMA, block spans groups
    (1, 128, torch.bfloat16, True, True, True, configs.DecodeConfig(16, 128, 2, 4, dynamic_ids=True)),
    (1, 32, torch.bfloat16, False, False, True, configs.DecodeConfig(16, 128, 2, 2, seg=True)),  # 4 groups a block
    (1, 64, torch.float16, True, True, False, configs.DecodeConfig(8, 256, 1, 2, seg=True)),
    (1, 128, torch.bfloat16, True, True, False, configs.DecodeConfig(32, 128, 1, 4, tc=True)),  # tensor cores, M=1
    (5, K, torch.float16, True, True, True, configs.DecodeConfig(16, 128, 1, 4, tc=True)),     # fp16 magic 1024
    (16, 128, torch.bfloat16, False, False, False, configs.DecodeConfig(32, 128, 1, 4, tc=True)),
]


@pytest.mark.parametrize("m,group,dtype,ec,gated,bias,cfg", GEMV_CASES, ids=lambda v: getattr(v, "name", None))
def test_gemv_kernel_paths(m, group, dtype, ec, gated, bias, cfg):
    t = _problem(m, group, dtype, ec, gated, bias, seed=10658)
    for _ in range(2):  # the second call checks the kernel left its counters and u clean
        assert _rel(_run(t, group, cfg), _reference(t, group)) < 1e-2
    ws = runtime.WORKSPACES.get(t["x"].device)
    assert int(ws.sync.abs().sum()) == 0 and float(ws.u.abs().sum()) == 0.0
    acc, arrive = ws.for_n(N)
    assert float(acc.abs().sum()) == 0.0 and int(arrive.abs().sum()) == 0


def test_byte_kernel_refuses_block_across_groups():
    t = _problem(3, 64, torch.bfloat16, False, False, False, seed=0)
    with pytest.raises(SpearError, match="BLOCK_K"):
        _run(t, 64, configs.DecodeConfig(16, 128, 1, 4))  # M > 1 without tc runs the byte kernel


def test_decode_candidates_cover_both_kernels():
    c1 = candidates.decode_candidates(4096, 4096, 128, 132, m=1)
    c16 = candidates.decode_candidates(4096, 4096, 128, 132, m=16)
    assert any(c.kernel == "gemv" and not c.tc for c in c1) and any(c.tc for c in c1)
    assert all(c.tc or c.kernel == "v3" for c in c16) and any(c.kernel == "v3" for c in c16)
    assert all(c.split_k == 1 for c in c1 + c16 if c.tc)
