import math

import pytest
import torch
import torch.nn as nn

from spear_compile import SpearError
from spear_compile.config import QuantConfig
from spear_compile.diagnostic import diagnose, entropy_unevenness, linear_cka, save_report
from spear_compile.quantize import quantize_linear_


def test_cka_identity_scaling_orthogonal_invariance():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 16, generator=g)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, 3.7 * x) == pytest.approx(1.0, abs=1e-12)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))
    assert linear_cka(x, (x.double() @ q).float()) == pytest.approx(1.0, abs=1e-5)
    y = torch.randn(200, 16, generator=g)
    c = linear_cka(x, y)
    assert 0 <= c < 0.5
    assert linear_cka(x, y) == pytest.approx(linear_cka(2 * x @ q.float(), y), abs=1e-5)
    with pytest.raises(SpearError):
        linear_cka(x, y[:10])


def test_entropy_unevenness_bounds():
    assert entropy_unevenness(torch.ones(100)) == pytest.approx(0.0, abs=1e-12)
    one_hot = torch.zeros(100)
    one_hot[3] = 1.0
    assert entropy_unevenness(one_hot) == pytest.approx(1.0, abs=1e-9)
    mid = entropy_unevenness(torch.rand(100, generator=torch.Generator().manual_seed(1)))
    assert 0 < mid < 1


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(40, 32)
        self.a = nn.Linear(32, 32, bias=False)
        self.b = nn.Linear(32, 16, bias=False)

    def forward(self, ids):
        return self.b(torch.relu(self.a(self.emb(ids))))


def test_diagnose_ranks_the_damaged_module_and_writes_report(tmp_path):
    import copy
    torch.manual_seed(2)
    fp = _Tiny()
    q = copy.deepcopy(fp)
    quantize_linear_(q.a, QuantConfig(bits=8))
    quantize_linear_(q.b, QuantConfig(bits=2))
    wins = torch.randint(0, 40, (4, 16))
    scores = diagnose(fp, q, wins)
    assert set(scores) == {"a", "b"}
    assert scores["b"]["damage"] > scores["a"]["damage"] > 0
    # independent reference for module b: FP inputs through the dequantized weight
    h = torch.relu(fp.a(fp.emb(wins))).reshape(-1, 32)
    ref = linear_cka(h @ fp.b.weight.T, h @ q.b.weight.dequantize(torch.float32).T)
    assert scores["b"]["cka"] == pytest.approx(ref, abs=1e-6)
    s = scores["b"]
    assert s["score"] == pytest.approx(s["damage"] * (1 + s["unevenness"] * math.log(64)))
    paths = save_report(scores, tmp_path, title="test")
    for p in paths.values():
        assert (tmp_path / p.split("/")[-1]).stat().st_size > 0
    with pytest.raises(SpearError, match="empty calibration"):
        diagnose(fp, q, torch.zeros(0, 16, dtype=torch.long))
