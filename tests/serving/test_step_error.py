"""``bench/step_error.py``: a serving run's steps grouped by what they did, with the cost model's error per group."""
from bench import step_error

FIELDS = ["num_decodes", "num_prefills", "num_prefill_tokens", "sum_context", "prefill_context", "mixed_dims (...)",
          "ec_enabled", "captured_graph", "uncaptured_mixed", "predicted_s", "measured_s"]


def step(decodes, prefills, ctx, captured=False, predicted=1.0, measured=1.0):
    return [decodes, prefills, 8 * prefills, 0, ctx, None, True, captured, False, predicted, measured]


def test_groups_and_errors():
    raw = {"step_fields": FIELDS, "steps": [
        {"label": "slo", "rate": 10.0, "steps": [step(4, 0, 0, predicted=0.9), step(4, 1, 0), step(4, 1, 16, predicted=0.5),
                                                 step(4, 2, 0, predicted=1.2), step(4, 1, 0, captured=True),
                                                 step(4, 1, 0, predicted=None)]},
        {"label": "fifo", "rate": 10.0, "steps": [step(1, 0, 0, predicted=3.0)]}]}
    got = step_error.rows(raw, {"slo"})
    assert [(k, round(e, 3)) for _, k, e in got] == [
        ("decode only", -0.1), ("one prefill from the start", 0.0), ("one chunk after context", -0.5),
        ("several prefills", 0.2), ("captured (first of its shape)", 0.0)]
    text = step_error.table(got)
    assert "| all runs | one chunk after context | 1 | 50.0 / 50.0 | -50.0 |" in text
    assert len(step_error.rows(raw, set())) == 6   # every run, the unpredicted step left out
