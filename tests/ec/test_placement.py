import pytest

from spear_compile import SpearError
from spear_compile.ec.placement import check_budget, ec_params, place

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


def _capture(alpha):
    # a share of the error cancelled by rank r: 1 - alpha^r (steeper for small alpha)
    return [1 - alpha ** r for r in range(0, 65)]


def test_capture_allocation_respects_budget_and_spends_where_gain_per_byte_is_highest():
    scores = {n: 1.0 for n in SHAPES}
    scores["l1.down"] = 50.0
    capture = {n: _capture(0.5) for n in SHAPES}
    for budget in (2000, 8000, 30000):
        ranks = place(SHAPES, budget, "diagnostic", scores, rank=16, gate="sigmoid", capture=capture)
        assert ranks and _bytes(ranks) <= budget
        assert set(ranks.values()) <= {1, 2, 4, 8, 16}
        assert "l1.down" in ranks and ranks["l1.down"] == max(ranks.values())
    # equal scores and a steep spectrum (rank 1 cancels half the error): the budget goes to more
    # modules at low ranks than a fixed rank 8 reaches
    flat = {n: 1.0 for n in SHAPES}
    ranks = place(SHAPES, 8000, "diagnostic", flat, rank=16, capture=capture)
    fixed = place(SHAPES, 8000, "diagnostic", flat, rank=8)
    assert len(ranks) > len(fixed) and min(ranks.values()) <= 2
    # rank_choices and the largest rank are honoured
    ranks = place(SHAPES, 30000, "diagnostic", scores, rank=4, capture=capture, rank_choices=(2, 4))
    assert set(ranks.values()) <= {2, 4}


def test_capture_allocation_matches_brute_force_on_a_small_case():
    import itertools
    shapes = {"a": (16, 16), "b": (16, 32), "c": (32, 32)}
    scores = {"a": 3.0, "b": 1.0, "c": 2.0}
    capture = {"a": _capture(0.3), "b": _capture(0.6), "c": _capture(0.8)}
    budget = 2 * ec_params(16, 32, 4, "none") * 2
    ranks = place(shapes, budget, "diagnostic", scores, rank=8, gate="none", capture=capture, rank_choices=(1, 2, 4, 8))
    gain = lambda rs: sum(scores[n] * capture[n][r] for n, r in rs.items())  # noqa: E731
    cost = lambda rs: sum(ec_params(*shapes[n], r, "none") * 2 for n, r in rs.items())  # noqa: E731
    best = max((dict(zip(shapes, c)) for c in itertools.product((0, 1, 2, 4, 8), repeat=3)
                if cost(dict(zip(shapes, c))) <= budget), key=gain)
    assert cost(ranks) <= budget
    assert gain(ranks) >= 0.97 * gain(best)


def test_local_mode_and_missing_capture_fail_or_work():
    scores = {n: float(i) for i, n in enumerate(SHAPES)}
    assert place(SHAPES, 8000, "local", scores, rank=4) == place(SHAPES, 8000, "diagnostic", scores, rank=4)
    with pytest.raises(SpearError, match="captured-error"):
        place(SHAPES, 8000, "diagnostic", scores, rank=4, capture={"l0.q": _capture(0.5)})
    with pytest.raises(SpearError, match="score"):
        place(SHAPES, 8000, "local", None)
