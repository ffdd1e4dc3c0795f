"""Stacked training: F fits of one model in one step behave as F separate fits."""
import pytest
import torch
import torch.nn as nn

from spear_compile import CompensatedLinear, SpearError
from spear_compile.ec.train import StackedEC, densify_, stack_ecs_, teacher_topk, train_stacked
from spear_compile.quant.api import quantize

from tests.test_ec_helpers import tiny_llama


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


def test_online_teacher_full_and_topk_losses_stack_like_separate_fits():
    fp, q, wins, _ = _setup()
    import copy

    def run(plans, gates, seeds, topks):
        model = copy.deepcopy(q)
        stacked = stack_ecs_(model, plans, gates)
        for f, plan in enumerate(plans):
            _init(stacked, f, plan, 100 + seeds[f])
        return stacked, train_stacked(model, wins, None, seeds, steps=3, lr=3e-3, batch_size=2, progress=False,
                                      fp_model=fp, topks=topks)
    topks = [0, 16, 0]
    stacked, losses = run(PLANS, GATES, [0, 1, 2], topks)
    for f in range(3):
        alone, alone_losses = run([PLANS[f]], [GATES[f]], [f], [topks[f]])
        torch.testing.assert_close(torch.tensor(losses[f]), torch.tensor(alone_losses[0]), rtol=1e-4, atol=1e-6)
    # the full KL exceeds the top-16 coarse-grained one at the same (initial) parameters
    from spear_compile.ec.train import kl_full_per_token, kl_per_token
    with torch.no_grad():
        lq, lp = q(wins).logits, torch.log_softmax(fp(wins).logits.float(), -1)
        top = lp.topk(16, -1)
        assert kl_full_per_token(lq, lp).mean() >= kl_per_token(lq, top.values, top.indices).mean() - 1e-6


def test_cached_teacher_keeps_the_first_k_per_fit():
    fp, q, wins, _ = _setup()
    import copy
    teacher = teacher_topk(fp, wins, 16)
    ref = teacher_topk(fp, wins, 4)
    assert torch.equal(teacher[1][..., :4], ref[1])  # sorted: the top-4 are the cache's first 4

    def run(plans, gates, seeds, teach, topks):
        model = copy.deepcopy(q)
        stacked = stack_ecs_(model, plans, gates)
        for f, plan in enumerate(plans):
            _init(stacked, f, plan, 100 + seeds[f])
        return train_stacked(model, wins, teach, seeds, steps=3, lr=3e-3, batch_size=2, progress=False, topks=topks)
    losses = run(PLANS[:2], GATES[:2], [0, 1], teacher, [4, None])
    torch.testing.assert_close(torch.tensor(losses[0]), torch.tensor(run(PLANS[:1], GATES[:1], [0], ref, None)[0]),
                               rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(run(PLANS[1:2], GATES[1:2], [1], teacher, None)[0]),
                               rtol=1e-4, atol=1e-6)
    with pytest.raises(SpearError, match="topks"):
        run(PLANS[:1], GATES[:1], [0], teacher, [32])


def test_gate_stats_are_recorded_and_only_exportable_gates_exist():
    fp, q, wins, teacher = _setup()
    import copy
    from spear_compile.ec.train import gate_stats
    model = copy.deepcopy(q)
    with pytest.raises(SpearError, match="gates must be among"):
        stack_ecs_(copy.deepcopy(q), PLANS, ["xgate", "none", "sigmoid"])
    stacked = stack_ecs_(model, PLANS, ["sigmoid", "none", "sigmoid"])
    for f, plan in enumerate(PLANS):
        _init(stacked, f, plan, 100 + f)
    train_stacked(model, wins, teacher, [0, 1, 2], steps=3, lr=1e-2, batch_size=2, progress=False)
    for m in stacked.values():
        m.stats = {}
    with torch.no_grad():
        model(wins.repeat(3, 1))
    st = gate_stats(list(stacked.values()), 3)
    assert st[1] is None                                   # static: no gate
    assert st[0]["gate_abs_dev"] > 0 and st[0]["rho_mean"] > 0 and st[0]["rho_cv"] >= 0
    assert st[2]["gate_abs_dev"] > 0