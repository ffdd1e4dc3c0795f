"""Stacked training: F fits of one model in one step behave as F separate fits."""
import pytest
import torch
import torch.nn as nn

from spear_compile import CompensatedLinear, SpearError
from spear_compile.ec_train import StackedEC, densify_, stack_ecs_, teacher_topk, train_stacked
from spear_compile.quantize import quantize

from test_ec_helpers import tiny_llama


def _setup():
    fp = tiny_llama(dtype=torch.float32)
    q = densify_(quantize(tiny_llama(dtype=torch.float32), "w3-pc-rtn"))
    wins = torch.randint(0, 8192, (6, 12), generator=torch.Generator().manual_seed(0))
    return fp, q, wins, teacher_topk(fp, wins, 16)


PLANS = [{"model.layers.0.self_attn.v_proj": 4, "model.layers.1.mlp.down_proj": 2},
         {"model.layers.0.self_attn.v_proj": 2, "model.layers.0.mlp.up_proj": 3},
         {"model.layers.1.mlp.down_proj": 4}]
GATES = ["sigmoid", "none", "sigmoid"]


def _init(stacked, f, plan, seed):
    g = torch.Generator().manual_seed(seed)
    for name, r in plan.items():
        m = stacked[name]
        m.set_ec(f, torch.randn(r, m.in_features, generator=g) * 0.05, torch.randn(m.out_features, r, generator=g) * 0.05)


def _train(q, wins, teacher, plans, gates, seeds, lrs):
    import copy
    model = copy.deepcopy(q)
    stacked = stack_ecs_(model, plans, gates)
    for f, plan in enumerate(plans):
        _init(stacked, f, plan, 100 + seeds[f])
    losses = train_stacked(model, wins, teacher, seeds, steps=4, lr=lrs, batch_size=2, progress=False)
    return stacked, losses


def test_stacked_fits_equal_separate_fits():
    _, q, wins, teacher = _setup()
    seeds, lrs = [0, 1, 2], [3e-3, 1e-3, 2e-3]
    stacked, losses = _train(q, wins, teacher, PLANS, GATES, seeds, lrs)
    assert all(ls[-1] != ls[0] for ls in losses)
    for f in range(3):
        alone, alone_losses = _train(q, wins, teacher, [PLANS[f]], [GATES[f]], [seeds[f]], [lrs[f]])
        torch.testing.assert_close(torch.tensor(losses[f]), torch.tensor(alone_losses[0]), rtol=1e-4, atol=1e-6)
        for name in PLANS[f]:
            a, b = stacked[name].ec_state(f), alone[name].ec_state(0)
            assert a.keys() == b.keys()
            for k in a:
                torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_masks_keep_unused_ranks_and_static_gates_exact():
    _, q, wins, teacher = _setup()
    stacked, _ = _train(q, wins, teacher, PLANS, GATES, [0, 1, 2], [1e-2] * 3)
    v = stacked["model.layers.0.self_attn.v_proj"]  # ranks 4 / 2 / 0
    assert v.A.shape[:2] == (3, 4)
    assert torch.all(v.A[1, 2:] == 0) and torch.all(v.B[1, :, 2:] == 0)   # fit 1: rank 2 of 4
    assert torch.all(v.A[2] == 0) and torch.all(v.B[2] == 0)              # fit 2: no EC here
    assert torch.all(v.Wg[1] == 0) and torch.all(v.bg[1] == 0)            # fit 1 is static
    assert v.Wg[0].abs().sum() > 0                                        # fit 0's gate trained
    assert v.ec_state(2) == {} and set(v.ec_state(1)) == {"ec_A", "ec_B"}


def test_exported_ec_computes_what_the_stack_computed():
    _, q, wins, teacher = _setup()
    stacked, _ = _train(q, wins, teacher, PLANS, GATES, [0, 1, 2], [1e-2] * 3)
    name = "model.layers.0.self_attn.v_proj"
    m = stacked[name]
    x = torch.randn(3 * 2, 5, m.in_features)
    with torch.no_grad():
        y = m(x).reshape(3, 2, 5, -1)
        for f in range(2):
            ec = CompensatedLinear.wrap(m.linear, PLANS[f][name], GATES[f])
            for k, t in m.ec_state(f).items():
                getattr(ec, k).copy_(t)
            torch.testing.assert_close(ec(x.reshape(3, 2, 5, -1)[f]), y[f], rtol=1e-5, atol=1e-5)


def test_bad_input_fails_clearly():
    _, q, wins, teacher = _setup()
    lin = nn.Linear(8, 4)
    with pytest.raises(SpearError, match="ranks"):
        StackedEC(lin, [5], ["none"])
    with pytest.raises(SpearError, match="gates"):
        StackedEC(lin, [2], ["tanh"])
    with pytest.raises(SpearError, match="no EC"):
        train_stacked(q, wins, teacher, [0])
    import copy
    model = copy.deepcopy(q)
    stack_ecs_(model, PLANS[:2], GATES[:2])
    with pytest.raises(SpearError, match="2 fits, 3 seeds"):
        train_stacked(model, wins, teacher, [0, 1, 2])
    with pytest.raises(SpearError, match="do not match"):
        train_stacked(model, wins[:3], teacher, [0, 1])
    with pytest.raises(SpearError, match="no module named"):
        stack_ecs_(copy.deepcopy(q), [{"nope": 2}], ["none"])
