"""On the GPU (skipped elsewhere): the EC prologue's ``[x | v]`` at every rank class against float64. Triton 3.6 on
H100 computed u wrong at BLOCK_R >= 64 when x was copied in the projection loop (session 8); these cases pin the fix."""
import pytest
import torch

from spear_compile.lowering import prefill

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("r", [16, 32, 64, 96, 128])
@pytest.mark.parametrize("split", [False, True])
def test_gpu_prologue_copy_and_project(r, split):
    g = torch.Generator(device="cuda").manual_seed(r)
    m, k = 2048, 2048
    x = torch.randn(m, k, device="cuda", generator=g).to(torch.bfloat16)
    a = (torch.randn(r, k, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
    gw = (torch.randn(r, r, device="cuda", generator=g) * 0.3).to(torch.bfloat16)
    gb = (torch.randn(r, device="cuda", generator=g) * 0.1).to(torch.bfloat16)
    u = x.double() @ a.double().t()
    v64 = u * 2 * torch.sigmoid(u @ gw.double().t() + gb.double())
    out = torch.full((m, k + r), float("nan"), device="cuda", dtype=torch.bfloat16)
    prefill.ec_prologue(x, a, None, gw, gb, r, out=out, col0=k, width=r, copy_x=True, split=split)
    assert torch.equal(out[:, :k], x)
    assert ((out[:, k:].double() - v64).norm() / v64.norm()).item() < 5e-3


@pytest.mark.parametrize("k,ranks,gated", [(2048, [32, 32, 32], [True, True, False]), (2048, [32, 32], [True, True]),
                                           (8192, [32], [True]), (4096, [64, 16], [True, False])])
def test_gpu_prologue_in_place(k, ranks, gated):
    """``[x | 0]`` -> ``[x | v_1 | ...]`` at real prefill shapes (split-K x pass, then the gates)."""
    g = torch.Generator(device="cuda").manual_seed(k + len(ranks))
    m = 2048
    x = torch.randn(m, k, device="cuda", generator=g).to(torch.bfloat16)
    blocks, v64 = [], []
    for r, gt in zip(ranks, gated):
        a = (torch.randn(r, k, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
        gw = (torch.randn(r, r, device="cuda", generator=g) * 0.3).to(torch.bfloat16) if gt else None
        gb = (torch.randn(r, device="cuda", generator=g) * 0.1).to(torch.bfloat16) if gt else None
        u = x.double() @ a.double().t()
        v64.append(u * 2 * torch.sigmoid(u @ gw.double().t() + gb.double()) if gt else u)
        blocks.append((a, gw, gb))
    v64 = torch.cat(v64, 1)
    r = sum(ranks)
    out = torch.nn.functional.pad(x, (0, r + 8))
    for _ in range(2):  # a second call on a fresh [x | 0]: nothing carried over
        out = torch.nn.functional.pad(x, (0, r + 8))
        prefill.ec_prologue_in_place(out, k, blocks)
    assert torch.equal(out[:, :k], x) and not out[:, k + r:].any()
    assert ((out[:, k:k + r].double() - v64).norm() / v64.norm()).item() < 5e-3
