import pytest

from spear_compile import SpearError
from spear_compile.placement import check_budget, ec_params, place

SHAPES = {f"l{i}.{t}": s for i in range(4) for t, s in (("q", (64, 64)), ("v", (16, 64)), ("down", (64, 128)))}


def _bytes(ranks, gate="sigmoid"):
    return sum(ec_params(*SHAPES[n], r, gate) * 2 for n, r in ranks.items())


@pytest.mark.parametrize("gate", ["sigmoid", "none"])
@pytest.mark.parametrize("budget", [3000, 10000, 40000])
def test_every_mode_respects_the_budget(gate, budget):
    scores = {n: float(i) for i, n in enumerate(SHAPES)}
    for mode in ("diagnostic", "random", "all"):
        if mode == "all" and budget < _bytes({n: 1 for n in SHAPES}, gate):
            continue
        ranks = place(SHAPES, budget, mode, scores, rank=4, gate=gate, seed=1)
        assert ranks and _bytes(ranks, gate) <= budget


def test_diagnostic_takes_top_scores_and_random_is_seeded():
    scores = {n: (10.0 if n.startswith("l2") else 1.0) for n in SHAPES}
    ranks = place(SHAPES, _bytes({"l2.q": 4, "l2.v": 4, "l2.down": 4}), "diagnostic", scores, rank=4)
    assert set(ranks) == {"l2.q", "l2.v", "l2.down"}
    a = place(SHAPES, 8000, "random", rank=4, seed=3)
    assert a == place(SHAPES, 8000, "random", rank=4, seed=3)
    assert any(place(SHAPES, 8000, "random", rank=4, seed=s) != a for s in range(4, 10))


def test_all_mode_uses_the_largest_uniform_rank():
    ranks = place(SHAPES, 30000, "all", gate="none")
    r = next(iter(ranks.values()))
    assert set(ranks.values()) == {r} and len(ranks) == len(SHAPES)
    assert _bytes({n: r + 1 for n in SHAPES}, "none") > 30000 >= _bytes(ranks, "none")


def test_bad_input_fails_clearly():
    for b in (0, -0.1, 1, 1.5, "x"):
        with pytest.raises(SpearError, match="budget"):
            check_budget(b)
    with pytest.raises(SpearError, match="rank=65"):
        place(SHAPES, 10**6, "random", rank=65)
    with pytest.raises(SpearError, match="unknown mode"):
        place(SHAPES, 10**6, "best")
    with pytest.raises(SpearError, match="score"):
        place(SHAPES, 10**6, "diagnostic", {"l0.q": 1.0})
    with pytest.raises(SpearError, match="fits no module"):
        place(SHAPES, 10, "random")
    with pytest.raises(SpearError, match="rank 1 on all"):
        place(SHAPES, 100, "all")
