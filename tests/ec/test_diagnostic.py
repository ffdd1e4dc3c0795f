import math

import pytest
import torch
import torch.nn as nn

from spear_compile import SpearError
from spear_compile.quant.config import QuantConfig
from spear_compile.ec.diagnostic import diagnose, entropy_unevenness, linear_cka, save_report
from spear_compile.quant.api import quantize_linear_


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


class _Chain(nn.Module):
    """emb -> a -> relu -> b -> head: a tiny model with an output embedding (lm_head)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(40, 32)
        self.a = nn.Linear(32, 32, bias=False)
        self.b = nn.Linear(32, 32, bias=False)
        self.head = nn.Linear(32, 40, bias=False)

    def get_output_embeddings(self):
        return self.head

    def forward(self, ids):
        class Out:
            pass
        out = Out()
        out.logits = self.head(self.b(torch.relu(self.a(self.emb(ids)))))
        return out


def _chain_pair():
    import copy
    from spear_compile.ec.train import densify_
    torch.manual_seed(4)
    fp = _Chain()
    q = copy.deepcopy(fp)
    quantize_linear_(q.a, QuantConfig(bits=8))
    quantize_linear_(q.b, QuantConfig(bits=2))
    return fp, densify_(q)


def test_model_level_scores_downstream_damage():
    from spear_compile.ec.diagnostic import model_level
    fp, q = _chain_pair()
    wins = torch.randint(0, 40, (3, 20), generator=torch.Generator().manual_seed(0))
    before = {n: p.clone() for n, p in q.state_dict().items()}
    s = model_level(fp, q, wins, ["a", "b"])
    assert all(torch.equal(before[n], p) for n, p in q.state_dict().items())  # weights swapped back
    # b (2 bits) does far more damage than a (8 bits), in every view
    for key in ("cka_gain", "model_score", "kl_gain", "solo_damage", "solo_score", "kl_solo"):
        assert s["b"][key] > s["a"][key] and s["b"][key] > 0, key
    assert s["a"]["model_score"] >= 0  # a negative gain (restoring a alone) is clipped to 0
    allq = s["_all"]
    assert allq["damage"] > 0 and allq["kl"] > 0 and allq["tokens"] == 60
    # independent reference for "restore b": the quantized model with b's FP weight
    with torch.no_grad():
        h_fp = fp.b(torch.relu(fp.a(fp.emb(wins)))).reshape(-1, 32)
        h_rb = fp.b(torch.relu(q.a(fp.emb(wins)))).reshape(-1, 32)
        h_q = q.b(torch.relu(q.a(fp.emb(wins)))).reshape(-1, 32)
    assert s["b"]["restore_cka"] == pytest.approx(linear_cka(h_fp, h_rb), abs=1e-6)
    assert allq["damage"] == pytest.approx(1 - linear_cka(h_fp, h_q), abs=1e-6)
    assert s["b"]["cka_gain"] == pytest.approx(allq["damage"] - (1 - linear_cka(h_fp, h_rb)), abs=1e-6)
    d = (h_q - h_rb).norm(dim=-1)
    u = entropy_unevenness(d)
    assert s["b"]["model_score"] == pytest.approx(s["b"]["cka_gain"] * (1 + u * math.log(60)), rel=1e-5)
    only = model_level(fp, q, wins, ["b"], variants=("restore",))
    assert "solo_score" not in only["b"] and only["b"]["kl_gain"] == pytest.approx(s["b"]["kl_gain"], rel=1e-6)


def test_model_level_bad_input_fails_clearly():
    from spear_compile.ec.diagnostic import model_level
    fp, q = _chain_pair()
    wins = torch.randint(0, 40, (2, 8))
    with pytest.raises(SpearError, match="empty calibration"):
        model_level(fp, q, wins[:0], ["a"])
    with pytest.raises(SpearError, match="variants"):
        model_level(fp, q, wins, ["a"], variants=("both",))
    with pytest.raises(SpearError, match="missing"):
        model_level(fp, q, wins, ["zz"])
    import copy
    qq = copy.deepcopy(fp)
    quantize_linear_(qq.a, QuantConfig(bits=4))
    with pytest.raises(SpearError, match="dense"):
        model_level(fp, qq, wins, ["a"])
