"""``bench/serving.py`` end to end on CPU (its ``--smoke`` settings: the bundled 16M model, two short traces), with
``--overlap``: every step of every run is launched ahead of the previous one's read-back, and every request still
gets all its tokens."""
import json

from bench import serving


def test_smoke_with_overlapped_steps(tmp_path):
    out = tmp_path / "smoke.json"
    serving.main(["--smoke", "--overlap", "--json", str(out)])   # --smoke sets its own sections
    runs = json.loads(out.read_text())["runs"]
    assert {r["policy"] for r in runs} == {"fifo", "slo"}
    for r in runs:
        assert r["num_requests"] > 0 and r["completed"] == r["num_requests"] and r["unfinished"] == 0, r
        assert r["overlapped_steps"] == r["num_steps"] > 0, r   # greedy trace: no step falls back to one at a time
        assert r["recompiles"] == 0
