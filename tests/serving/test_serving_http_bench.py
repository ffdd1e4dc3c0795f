"""``bench/serving_http.py`` against the real server on CPU (the bundled model): a seeded trace sent at its arrival
times over HTTP; every request's tokens counted from its stream; failures (a prompt past the context) counted, not
dropped; an unreachable server is a clear exit, not a traceback."""
import asyncio
import json
import os
import socket
import sys
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("httpx")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the repo: bench/

from bench.serving_http import main, make_trace, run_http  # noqa: E402
from spear_compile.evaluate import DEFAULT_MODEL  # noqa: E402
from spear_compile.serving.async_engine import AsyncEngine  # noqa: E402
from spear_compile.serving.config import EngineConfig  # noqa: E402
from spear_compile.serving.engine import Engine  # noqa: E402
from spear_compile.serving.server import build_app  # noqa: E402

from .server_thread import ServerThread  # noqa: E402


@pytest.fixture(scope="module")
def server():
    config = EngineConfig(compile=False, cuda_graphs=False, device="cpu", max_num_seqs=16, max_num_tokens=128,
                          progress=False)
    engine = Engine.from_pretrained(str(DEFAULT_MODEL), quant="w4-pc-rtn", config=config)
    srv = ServerThread(build_app(AsyncEngine(engine), "ref"))
    try:
        yield srv.base_url, engine
    finally:
        srv.stop()


def test_trace_over_http(server):
    url, engine = server
    trace = make_trace(6.0, 1.5, 3, 24, 6, 8000, prompt_median=12, output_median=4)
    too_long = (0.1, [5] * (engine.max_model_len + 10), 4)
    m = asyncio.run(run_http(url, "ref", trace + [too_long], ttft_slo_s=60.0, tpot_slo_s=60.0))
    assert len(trace) >= 3
    assert m["num_requests"] == len(trace) + 1 and m["completed"] == len(trace)
    assert [rid for rid, _ in m["failed"]] == [f"http-{len(trace)}"] and "HTTP 400" in m["failed"][0][1]
    assert m["short_requests"] == []
    assert m["output_tokens"] == sum(o for _, _, o in trace)  # every token of every stream counted, none twice
    assert 0 < m["ttft_ms_p50"] <= m["e2el_ms_p99"]
    assert m["slo_attainment"] == len(trace) / (len(trace) + 1)
    deadline = time.monotonic() + 30
    while engine.stats().num_running and time.monotonic() < deadline:  # the last streams' requests settle
        time.sleep(0.05)
    assert engine.stats().kv_blocks_used == 0


def test_cli_writes_its_json(server, tmp_path):
    url, _ = server
    out = tmp_path / "m.json"
    m = main(["--url", url, "--rate", "5", "--duration", "0.6", "--max-prompt", "16", "--max-output", "4",
              "--prompt-median", "8", "--output-median", "3", "--vocab", "8000", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["model"] == "ref" and saved["completed"] == saved["num_requests"] == m["num_requests"] > 0
    assert saved["failed"] == []


def test_unreachable_server_is_a_clear_exit(capsys):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(SystemExit, match=f"cannot reach http://127.0.0.1:{port}/v1/models"):
        main(["--url", f"http://127.0.0.1:{port}", "--duration", "0.1"])
