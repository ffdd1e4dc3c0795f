"""SamplingParams validation and the per-row sampler."""
import pytest
import torch

from spear_compile.errors import SpearError
from spear_compile.serving.request import Request, SamplingParams
from spear_compile.serving.sampling import Sampler, sample_row


@pytest.mark.parametrize("field,value", [
    ("max_tokens", 0), ("max_tokens", -3), ("max_tokens", 2.5), ("max_tokens", True),
    ("temperature", -0.1), ("temperature", float("nan")), ("temperature", 1e9), ("temperature", "1"),
    ("top_p", 0.0), ("top_p", 1.5), ("top_k", -2), ("top_k", 1.5), ("seed", -1), ("seed", "x"),
    ("stop", [""]), ("stop", [3]), ("stop_token_ids", [-1]), ("stop_token_ids", ["a"]), ("ignore_eos", "yes"),
])
def test_bad_values_name_the_field(field, value):
    with pytest.raises(SpearError, match=field):
        SamplingParams(**{field: value})


def test_defaults_and_normalisation():
    sp = SamplingParams(stop="###", temperature=0)
    assert sp.stop == ["###"] and sp.greedy and SamplingParams().top_k == -1


def test_top_k_1_and_tiny_top_p_are_argmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1000, generator=g)
    best = int(logits.argmax())
    for _ in range(5):
        assert sample_row(logits, 1.0, 1, 1.0, g) == best
        assert sample_row(logits, 1.0, -1, 1e-6, g) == best


def test_top_k_support_and_distribution():
    g = torch.Generator().manual_seed(1)
    logits = torch.tensor([0.0, 2.0, 1.0, -1.0, 1.5])
    draws = [sample_row(logits, 1.0, 3, 1.0, g) for _ in range(600)]
    assert set(draws) == {1, 2, 4}                      # the top 3 only, each drawn
    freq = torch.bincount(torch.tensor(draws), minlength=5).float() / len(draws)
    p = torch.softmax(torch.tensor([2.0, 1.0, 1.5]), 0)
    assert torch.allclose(freq[[1, 2, 4]], p, atol=0.07)


def test_top_p_keeps_the_smallest_prefix():
    g = torch.Generator().manual_seed(2)
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    draws = {sample_row(probs.log(), 1.0, -1, 0.7, g) for _ in range(300)}
    assert draws == {0, 1}                              # 0.5 < 0.7 <= 0.8


def test_sampler_seeded_rows_are_independent_of_batch():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(3))
    mk = lambda i, seed, t=1.0: Request(str(i), [1], SamplingParams(temperature=t, seed=seed), 0.0)  # noqa: E731
    a = [Sampler(torch.device("cpu")).sample(logits[1:2], [mk(0, 7)])[0] for _ in range(2)]
    s = Sampler(torch.device("cpu"))
    batch = s.sample(logits, [mk(1, None, 0.0), mk(2, 7), mk(3, 8)])
    assert batch[0] == int(logits[0].argmax()) and batch[1] == a[0] == a[1]


@pytest.mark.parametrize("value", [-1, 21, 1.5, True, "3"])
def test_bad_logprobs_name_the_field(value):
    with pytest.raises(SpearError, match="logprobs"):
        SamplingParams(logprobs=value)


def test_logprobs_rows_vs_float64():
    """Only the rows that asked get ``TokenLogprobs``: the raw logits' log-softmax (float64 reference) at the given
    token and the row's own top k, most likely first; temperature does not change them."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 50, generator=g) * 3
    reqs = [Request(str(i), [1, 2], SamplingParams(temperature=t, logprobs=k), 0.0)
            for i, (t, k) in enumerate([(0.0, None), (0.0, 0), (0.7, 3), (1.3, 5)])]
    tokens = [7, 11, 13, 17]
    got = Sampler(torch.device("cpu")).logprobs(logits, reqs, tokens)
    ref = torch.log_softmax(logits.double(), dim=-1)
    assert got[0] is None
    for i in (1, 2, 3):
        assert got[i].token_id == tokens[i]
        assert abs(got[i].logprob - ref[i, tokens[i]].item()) < 1e-5
        k = reqs[i].sampling.logprobs
        top = ref[i].topk(k)
        assert [t for t, _ in got[i].top] == top.indices.tolist()
        assert max(abs(a - b) for (_, a), b in zip(got[i].top, top.values.tolist())) < 1e-5 if k else got[i].top == ()
    assert Sampler(torch.device("cpu")).logprobs(logits, reqs[:1], tokens[:1]) == [None]


@pytest.mark.parametrize("field,value", [("presence_penalty", 2.5), ("frequency_penalty", -3),
                                         ("presence_penalty", "1"), ("repetition_penalty", 0),
                                         ("repetition_penalty", float("inf"))])
def test_bad_penalties_name_the_field(field, value):
    with pytest.raises(SpearError, match=field):
        SamplingParams(**{field: value})


def test_penalties_vs_a_loop_reference():
    """Repetition over prompt + output (positive logits divided, negative multiplied), then frequency x count and
    presence over the output only; a request without penalties is not ``penalized``."""
    from spear_compile.serving.sampling import penalized
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(30, generator=g) * 2
    req = Request("r", [3, 4, 4], SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=1.5),
                  0.0)
    req.output_token_ids = [4, 7, 7, 7]
    ref = logits.double().clone()
    for t in {3, 4, 7}:
        ref[t] = ref[t] / 1.5 if ref[t] > 0 else ref[t] * 1.5
    for t, c in ((4, 1), (7, 3)):
        ref[t] -= 0.25 * c + 0.5
    before = logits.clone()
    assert torch.allclose(penalized(logits, req).double(), ref, atol=1e-6)
    assert torch.equal(logits, before)  # the step's logits are left as they were
    assert not SamplingParams().penalized and SamplingParams(temperature=0).device_argmax
    assert not SamplingParams(temperature=0, frequency_penalty=0.1).device_argmax


def test_warm_up_leaves_no_state_behind():
    """The engine's start-up sampling warm-up keeps no generator and does not advance the shared one: the tokens of
    unseeded requests drawn after it are the ones drawn without it."""
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    reqs = [Request(f"r{i}", [1], SamplingParams(temperature=1.0), 0.0) for i in range(3)]
    cold, warm = Sampler(torch.device("cpu"), seed=7), Sampler(torch.device("cpu"), seed=7)
    warm.warm_up(50, torch.bfloat16)
    assert warm._generators == {}
    assert warm.sample(logits, reqs) == cold.sample(logits, reqs)


def test_patch_ids_moves_rows_as_the_index_says():
    from spear_compile.serving.model_runner import patch_ids
    ids = torch.full((5,), -1, dtype=torch.int64)
    tokens = torch.tensor([10, 11, 12, 13], dtype=torch.int64)
    patch_ids(ids, (tokens, [2, 0, 3], [0, 1, 4]))   # a request finished: rows move up
    assert ids.tolist() == [12, 10, -1, -1, 13]
    patch_ids(ids, (tokens, [0, 1], [0, 1]))          # the previous step's rows, in order: a slice copy
    assert ids.tolist() == [10, 11, -1, -1, 13]
