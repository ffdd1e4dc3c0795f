"""``spear-compile serve``: user errors exit 2 with one line and no traceback, before any model is loaded; the
real command serves the bundled model on CPU (a subprocess on 127.0.0.1, stopped by the test)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from spear_compile.cli import main  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("args, words", [
    (["--model", "/no/such/model"], "--model /no/such/model"),
    (["--quant", "w9-zz"], "w9-zz"),
    (["--ec", "/no/such/ecs"], "--ec /no/such/ecs"),
    (["--device", "tpu"], "--device"),
    (["--port", "70000"], "--port 70000"),
    (["--max-batch", "0"], "--max-batch 0"),
    (["--ttft-slo-ms", "-1"], "--ttft-slo-ms"),
    (["--policy", "lottery"], "lottery"),
    (["--tp", "0"], "--tp 0"),
    (["--quant", "none", "--quant-lm-head"], "--quant-lm-head"),
    (["--mixed-cuda-graphs", "-1"], "--mixed-cuda-graphs -1"),
    (["--mixed-graph-padding", "0.5"], "--mixed-graph-padding 0.5"),
    (["--mixed-graph-bucket-padding", "0.5"], "--mixed-graph-bucket-padding 0.5"),
    (["--compile-regions", "--tp", "2"], "--compile-regions"),
])
def test_serve_user_errors_exit_2(capsys, args, words):
    assert main(["serve", "--device", "cpu", *args] if "--device" not in args else ["serve", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("spear-compile: error: ") and words in err and "Traceback" not in err


@pytest.mark.parametrize("flag", ["--decode-attention", "--dtype"])
def test_serve_bad_choice_exits_2(capsys, flag):
    """A value outside an option's choices: argparse's usage error (exit status 2, no traceback)."""
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--device", "cpu", flag, "flash"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"argument {flag}: invalid choice: 'flash'" in err and "Traceback" not in err


def test_serve_port_in_use_exits_2(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--device", "cpu", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("spear-compile: error: ") and f"127.0.0.1:{port}" in err


def test_serve_command_serves_on_cpu(tmp_path):
    """The real command in a subprocess: comes up, serves a completion, and shuts down cleanly on Ctrl-C."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "spear_compile.cli", "serve", "--device", "cpu", "--port",
                             str(port), "--max-batch", "4", "--max-num-tokens", "64", "--log-level", "warning"],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "spear-compile serve did not come up"
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        assert httpx.get(base + "/v1/models").json()["data"][0]["id"] == "spear-ref-16m"
        r = httpx.post(base + "/v1/completions", timeout=120,
                       json={"model": "spear-ref-16m", "prompt": "The river", "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] >= 1
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    output = (tmp_path / "serve.log").read_text()
    assert proc.returncode == 0 and "Traceback" not in output, output[-3000:]   # Ctrl-C: a clean shutdown


def test_serve_tp_relaunches_with_the_arguments_given(monkeypatch):
    """``main([...])`` called from another program: the ranks get the arguments passed in, not that program's
    ``sys.argv``."""
    import torch.distributed.launcher.api as launcher
    got = {}

    class FakeLaunch:
        def __init__(self, config, entrypoint):
            got["nproc"] = config.nproc_per_node

        def __call__(self, *args):
            got["args"] = args
    monkeypatch.setattr(launcher, "elastic_launch", FakeLaunch)
    monkeypatch.setattr(sys, "argv", ["host_app.py", "--host-flag"])
    argv = ["serve", "--device", "cpu", "--tp", "2", "--port", str(_free_port())]
    assert main(argv) == 0
    assert got["nproc"] == 2 and list(got["args"]) == ["-m", "spear_compile.cli", *argv]


def test_serve_tp_refuses_overlap(capsys):
    assert main(["serve", "--device", "cpu", "--tp", "2", "--overlap-decode"]) == 2
    assert "--overlap-decode with --tp" in capsys.readouterr().err
