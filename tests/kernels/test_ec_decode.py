"""Decode kernels with the EC fused (M 1..16), every EC synchronisation mode, under the interpreter vs float64.

Modes (``DecodeConfig.ec``): "spin" (u tiles + spin + the last finisher resets the workspace), "epoch" (the last
u tile publishes the gated u as epoch-tagged words; nothing to reset), "pdl" / "2k" (``ec_u_kernel`` first, then
the W kernel; under the interpreter "pdl" runs without its grid-dependency calls), "slots" (M = 1 FMA
GEMV: each u tile stores its own tagged partial; the finishing programs sum the slots and gate; elsewhere it runs as
"epoch"), "ecterm" (slots' u tiles, then one EC program per N tile publishes its EC term as tagged words that the
W finisher adds). Each case runs twice, or more, so a counter or an epoch left wrong by one call
shows up in the next.
"""
import dataclasses
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import pytest
import torch

from spear_compile.errors import SpearError
from spear_compile.lowering import candidates, configs, decode, dispatch, runtime, tuner
from tests.w4_problems import problem, reference, rel

K, N = 256, 48


def _problem(m, group, dtype, gated, bias, seed, k=K, n=N, r=8):
    return problem(m, group, dtype, True, gated, bias, seed, k, n, r, ec_std=0.2)


_reference = reference  # float64, the EC included unless ``with_ec=False`` (tests/w4_problems.py)


def _run(t, group, cfg, u=None):
    return dispatch.launch(t["x"], t["qdata"], t["scale"], t["zero"], t["bias"], group,
                           t["ec_A"], t["ec_B"], t["gate_w"], t["gate_b"], u=u, config=cfg)


def _rel(out, ref):
    return rel(out, ref)  # unwritten or poisoned (NaN) outputs fail


def _assert_clean(t, cfg):
    """The workspace after a launch: counters and the u accumulator zero, every epoch phase equal to the epoch."""
    ws = runtime.WORKSPACES.get(t["x"].device)
    assert int(ws.sync.abs().sum()) == 0 and float(ws.u.abs().sum()) == 0.0
    acc, arrive = ws.for_n(N)
    assert float(acc.abs().sum()) == 0.0 and int(arrive.abs().sum()) == 0
    for phase, _ in ws.geo.values():
        assert bool((phase == phase[0]).all()), f"epoch/phase out of step after {cfg.name}: {phase.tolist()}"


D = configs.DecodeConfig
CASES = [  # (M, group, dtype, gated, bias, config)
    # M = 1, int32-word GEMV (FMA): per-channel and grouped, split-K (B late) and split 1 (B early)
    (1, K, torch.bfloat16, True, True, D(16, 128, 2, 2, ec="epoch")),
    (1, 64, torch.float16, False, False, D(8, 64, 1, 2, ec="epoch")),
    (1, 128, torch.bfloat16, True, False, D(16, 128, 2, 4, ec="pdl")),
    (1, K, torch.float16, True, True, D(8, 256, 1, 2, ec="pdl")),
    (1, 32, torch.bfloat16, False, True, D(16, 128, 2, 2, ec="2k", seg=True)),
    (1, 64, torch.bfloat16, True, False, D(16, 64, 2, 2, ec="epoch", ec_b="early")),
    (1, 128, torch.float16, True, True, D(16, 128, 2, 2, ec="pdl", ec_b="late")),
    (1, 128, torch.bfloat16, True, True, D(16, 128, 2, 4)),                          # spin (as before)
    # EC on the W4 key's load-path configs (the tuner derives EC candidates from them): cp.async stages, x as
    # int32 pairs, 128 + q nibbles (lean), grouped-scale seg tiles
    (1, K, torch.bfloat16, True, True, D(16, 128, 2, 2, ec="epoch", stages=3, xw=True, lean=2)),
    (1, 64, torch.bfloat16, True, False, D(16, 128, 1, 2, ec="pdl", seg=True, stages=3, xw=True, lean=2)),
    (1, 128, torch.float16, False, True, D(8, 128, 2, 2, ec="epoch", lean=1)),
    (1, 32, torch.bfloat16, True, True, D(16, 128, 2, 2, ec="epoch", seg=True, stages=3, xw=True, lean=3, rt=True)),
    (1, K, torch.float16, True, False, D(8, 128, 2, 2, ec="pdl", stages=3, xw=True, lean=3)),  # nibble pairs
    # slots (one u tile at K = 256, r = 8; several: SLOT_CASES)
    (1, K, torch.bfloat16, True, True, D(16, 128, 2, 2, ec="slots")),
    (1, 64, torch.float16, False, False, D(8, 64, 1, 2, ec="slots")),
    (1, 64, torch.bfloat16, True, False, D(16, 128, 1, 2, ec="slots", seg=True, stages=3, xw=True, lean=2)),
    (1, 64, torch.bfloat16, True, True, D(16, 128, 1, 2, ec="ecterm", seg=True, stages=3, xw=True, lean=2)),
    (1, 128, torch.float16, True, False, D(8, 128, 2, 2, ec="ecterm")),
    # M 2..16, tensor-core GEMV (split 1) and the byte kernel (v3, split-K)
    (3, 128, torch.bfloat16, True, False, D(16, 128, 1, 4, tc=True, ec="epoch")),
    (16, K, torch.float16, True, True, D(32, 128, 1, 4, tc=True, ec="pdl")),
    (7, 64, torch.bfloat16, False, True, D(32, 64, 2, 4, kernel="v3", ec="epoch")),
    (16, 128, torch.bfloat16, True, False, D(32, 64, 2, 4, kernel="v3", ec="pdl")),
    (2, K, torch.float16, True, True, D(16, 64, 1, 4, kernel="v3", ec="2k", ec_b="late")),
    (16, 64, torch.float16, True, False, D(16, 64, 2, 4, kernel="v3", ec="epoch", ec_b="early")),
    (12, 128, torch.bfloat16, True, True, D(32, 64, 2, 4, kernel="v3")),              # spin (as before)
    # slots at M > 1 (tensor cores, byte kernel): run as epoch
    (5, 128, torch.bfloat16, True, True, D(16, 128, 1, 4, tc=True, ec="slots")),
    (9, K, torch.float16, False, False, D(32, 64, 2, 4, kernel="v3", ec="slots")),
]

# mode slots with several u tiles (K = 1280, r = 32: BLOCK_KU 256, 5 tiles by default; ``u_tiles`` caps them, the
# launcher then gives each tile several sub-blocks of 128, the last tile partly past K)
KS, RS = 1280, 32
SLOT_CASES = [  # (M, group, dtype, gated, bias, config)
    (1, 128, torch.bfloat16, True, True, D(16, 128, 2, 2, ec="slots")),
    (1, KS, torch.float16, True, False, D(8, 256, 1, 2, ec="slots", u_tiles=2)),
    (1, 64, torch.bfloat16, False, True, D(16, 64, 4, 2, ec="slots", u_tiles=3)),
    (1, KS, torch.bfloat16, True, True, D(16, 256, 2, 2, ec="slots", stages=3, xw=True, lean=2)),
    (1, 128, torch.float16, True, True, D(8, 128, 2, 2, ec="slots")),
    (1, 64, torch.bfloat16, True, False, D(16, 64, 1, 2, ec="slots", u_tiles=2)),
    (1, KS, torch.bfloat16, True, True, D(16, 256, 1, 2, ec="ecterm")),
    (1, 64, torch.float16, False, True, D(8, 64, 4, 2, ec="ecterm", u_tiles=3)),
]


@pytest.mark.parametrize("m,group,dtype,gated,bias,cfg", CASES, ids=lambda v: getattr(v, "name", None))
def test_ec_decode_modes(m, group, dtype, gated, bias, cfg):
    t = _problem(m, group, dtype, gated, bias, seed=99798)
    ref = _reference(t, group)
    for _ in range(3):  # repeated calls: counters reset / epochs advance consistently
        assert _rel(_run(t, group, cfg), ref) < 1e-2
        _assert_clean(t, cfg)
    t2 = dict(t, x=torch.randn_like(t["x"].float()).to(dtype))  # new x, same launch geometry: no stale u
    assert _rel(_run(t2, group, cfg), _reference(t2, group)) < 1e-2


@pytest.mark.parametrize("m,group,dtype,gated,bias,cfg", SLOT_CASES, ids=lambda v: getattr(v, "name", None))
def test_slots_several_u_tiles(m, group, dtype, gated, bias, cfg):
    t = _problem(m, group, dtype, gated, bias, seed=7714, k=KS, r=RS)
    ref = _reference(t, group)
    for _ in range(3):
        assert _rel(_run(t, group, cfg), ref) < 1e-2
        _assert_clean(t, cfg)
    t2 = dict(t, x=torch.randn_like(t["x"].float()).to(dtype))
    assert _rel(_run(t2, group, cfg), _reference(t2, group)) < 1e-2


def _slot_state(t, cfg, group):
    """The (phases, words) of the slot geometry ``cfg`` runs on, and its u-tile count."""
    d = decode._decode_setup(cfg, t["x"], N, t["ec_A"], t["ec_B"], None, triton_cdiv(N, cfg.block_n),
                               min(cfg.split_k, triton_cdiv(t["x"].shape[1], cfg.block_k)), slots_ok=True)
    return d.phase, d.num_u_tiles


def triton_cdiv(a, b):
    return -(-a // b)


def test_slots_geometries_interleaved():
    """Two slot geometries, an epoch launch of the first's N tiles and an M = 3 call interleaved: each keeps its own
    phases, so a later launch never sums an earlier launch's partials."""
    seed = 15633
    t1 = _problem(1, 128, torch.bfloat16, True, False, seed, k=KS, r=RS)
    t3 = _problem(3, 128, torch.bfloat16, True, True, seed + 1, k=KS, r=RS)
    c_a, c_b = D(16, 128, 2, 2, ec="slots"), D(8, 128, 1, 2, ec="slots", u_tiles=2)
    c_e, c_w = D(16, 128, 2, 2, ec="epoch"), D(16, 128, 2, 2, ec="slots", u_tiles=3)  # c_a's N tiles, 3 slots
    c_tc = D(16, 128, 1, 4, tc=True, ec="slots")
    c_t = D(16, 128, 2, 2, ec="ecterm")  # same geometry, its own state (one more phase per N tile)
    for i in range(2):
        for t, cfg in ((t1, c_a), (t1, c_b), (t1, c_e), (t3, c_tc), (t1, c_w), (t1, c_t), (t1, c_a)):
            t = dict(t, x=torch.randn(t["x"].shape).to(t["x"].dtype))
            assert _rel(_run(t, 128, cfg), _reference(t, 128)) < 1e-2, (i, cfg.name)
            _assert_clean(t, cfg)


def test_slots_stale_tag_is_loud(monkeypatch):
    """A slot word whose tag never matches (a u tile's or an N tile's phase knocked out of step) makes the finishing
    program re-read up to the cap and poison its tile with NaN, never a wrong number; once the phases agree again the
    next launch is right."""
    monkeypatch.setattr(decode, "SLOT_SPINS", 3)
    t = _problem(1, 128, torch.bfloat16, True, True, seed=23552, k=KS, r=RS)
    cfg = D(16, 128, 2, 2, ec="slots")
    ref = _reference(t, 128)
    assert _rel(_run(t, 128, cfg), ref) < 1e-2
    phase, n_u = _slot_state(t, cfg, 128)
    assert n_u == 5 and phase.numel() == n_u + 3
    phase[n_u + 1] += 1  # N tile 1 expects an epoch no u tile writes: that tile only is poisoned
    out = _run(t, 128, cfg)
    assert torch.isnan(out[:, 16:32]).all() and not torch.isnan(out[:, :16]).any() and not torch.isnan(out[:, 32:]).any()
    phase[n_u + 1] -= 1
    phase[2] += 1  # u tile 2 tags one epoch ahead: every N tile sees a stale slot
    assert torch.isnan(_run(t, 128, cfg)).all()
    phase[2] -= 1
    assert _rel(_run(t, 128, cfg), ref) < 1e-2
    _assert_clean(t, cfg)


@pytest.mark.parametrize("ec", ["epoch", "pdl", "2k", "spin"])
def test_given_u_skips_the_projection(ec):
    """The tensor-parallel hook: a given (all-reduced) u is used as is, in every mode; no u is computed."""
    t = _problem(2, 64, torch.bfloat16, True, True, seed=31471)
    u = (t["x"].double() @ t["ec_A"].double().T).to(torch.bfloat16)
    for cfg in (D(16, 64, 1, 4, tc=True, ec=ec), D(16, 64, 2, 4, kernel="v3", ec=ec)):
        out = dispatch.launch(t["x"], t["qdata"], t["scale"], t["zero"], t["bias"], 64, None, t["ec_B"],
                              t["gate_w"], t["gate_b"], u=u, config=cfg)
        assert _rel(out, _reference(t, 64)) < 1e-2


def test_epoch_geometries_interleaved():
    """Two launch geometries (different N tiles) and M = 1 / M = 5 calls interleaved on one device: each geometry
    keeps its own epoch, so a later launch never takes an earlier launch's gated u for its own."""
    seed = 39390
    t1 = _problem(1, 128, torch.bfloat16, True, False, seed)
    t5 = _problem(5, 128, torch.bfloat16, True, True, seed + 1)
    c_a, c_b = D(16, 128, 2, 2, ec="epoch"), D(8, 128, 1, 2, ec="epoch")
    c_tc = D(16, 128, 1, 4, tc=True, ec="epoch")  # same geometry as c_a (N tiles 3): shares its epoch state
    for i in range(3):
        for t, cfg in ((t1, c_a), (t1, c_b), (t5, c_tc), (t1, c_a)):
            t = dict(t, x=torch.randn(t["x"].shape).to(t["x"].dtype))
            assert _rel(_run(t, 128, cfg), _reference(t, 128)) < 1e-2, (i, cfg.name)
            _assert_clean(t, cfg)


def test_mode_names_and_bad_mode():
    assert D(16, 128, 2, 2, ec="pdl").name.endswith(",ec=pdl]")
    assert D(16, 128, 2, 2).name == "decode[BN=16,BK=128,splitK=2,warps=2]"
    t = _problem(1, 128, torch.bfloat16, True, False, seed=0)
    with pytest.raises(SpearError, match="EC mode"):
        _run(t, 128, D(16, 128, 2, 2, ec="nope"))


def test_ec_candidates_ride_on_the_w4_ranking():
    """EC keys time the W4 key's fastest configs (and the fastest one-wave config) with the epoch/pdl modes, plus
    the fastest with the spin mode; ``Tuner.ranked`` orders a key's timed candidates by their timings."""
    ranked = [D(64, 128, 16, 2), D(8, 512, 2, 2, seg=True), D(16, 256, 4, 2), D(32, 256, 1, 4), D(8, 128, 1, 2)]
    cands = candidates.decode_ec_candidates(ranked, k=2048, n=2048, sms=132)
    assert {c.ec for c in cands} == {"epoch", "pdl", "slots", "ecterm", "spin"}
    assert {c.ec for c in cands if c.seg} == {"epoch", "pdl", "slots", "ecterm"}
    assert [c for c in cands if c.ec == "spin"] == [dataclasses.replace(ranked[0], ec="spin")]
    bases = {dataclasses.replace(c, ec="spin") for c in cands if c.ec != "spin"}
    assert bases == {ranked[0], ranked[1], ranked[2], ranked[3]}  # top 3 + the fastest with <= 132 programs
    key = ("test-key",)
    own = tuner.Tuner()
    own.timings[key] = [(ranked[2].name, 2e-3), (ranked[0].name, 1e-3), (ranked[1].name, "failed: X")]
    assert own.ranked(key, ranked) == [ranked[0], ranked[2]]
