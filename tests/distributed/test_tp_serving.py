"""Tensor-parallel serving on CPU (gloo): the engine under ``torchrun --nproc-per-node 2`` and ``3`` and
``spear-compile serve --tp 2``.

Reference: the single-process engine over the same checkpoint, quantization and saved ECs (gated, on column- and
row-parallel linears), float32. Bars: every request's greedy tokens equal the reference's, with ECs on and after
switching them off while serving (the ECs change the tokens, so mishandling them would show); prefill chunks ride
with running decodes; decode steps go through the (stand-in) graph path on every rank; all KV blocks free at the
end; the server answers completions (streaming too) with the reference's text, and shuts down cleanly on Ctrl-C.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import spear_compile
from spear_compile.ec.io import model_identity, save_ecs
from spear_compile.ec.module import CompensatedLinear
from spear_compile.quant.config import QuantConfig

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("tp_engine_worker.py")
MODEL = Path(spear_compile.__file__).parent / "assets" / "spear-ref-16m"
EC_MODULES = ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj", "model.layers.3.mlp.down_proj",
              "model.layers.5.self_attn.v_proj", "model.layers.6.mlp.up_proj")
PROMPT_LENGTHS = (5, 23, 40, 9, 17)   # 5 requests over 4 slots; 40 > the 32-token chunk
NEW = 12


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Saved ECs, prompts and the single-process engine's greedy tokens and texts."""
    from transformers import AutoModelForCausalLM
    sys.path.insert(0, str(Path(__file__).parent))
    from tp_engine_worker import engine_config
    from spear_compile.serving import Engine, SamplingParams
    base = tmp_path_factory.mktemp("tp_serving")
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    spear_compile.quantize(model, "w4-pc-rtn", progress=False)
    gen = torch.Generator().manual_seed(7)
    for name in EC_MODULES:
        parent, attr = name.rsplit(".", 1)
        par = model.get_submodule(parent)
        ec = CompensatedLinear.wrap(getattr(par, attr), 8, gate="sigmoid")
        for p in ec.ec_parameters():
            p.data = torch.randn(p.shape, generator=gen) * 0.15
        setattr(par, attr, ec)
    save_ecs(model, base / "ecs", {"quant": QuantConfig.from_spec("w4-pc-rtn").to_dict(),
                                   "base_model": model_identity(model)})
    prompts = [torch.randint(3, 8000, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]
    (base / "prompts.json").write_text(json.dumps(prompts))
    ref = Engine.from_pretrained(str(MODEL), "w4-pc-rtn", str(base / "ecs"), engine_config())
    greedy = SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True)
    with_ec = ref.generate(prompts, greedy)
    ref.set_ec_enabled(False)
    without_ec = [o.output_token_ids for o in ref.generate(prompts, greedy)]
    ref.set_ec_enabled(True)
    return dict(base=base, prompts=prompts, with_ec=[o.output_token_ids for o in with_ec],
                texts=[o.text for o in with_ec], without_ec=without_ec)


@pytest.mark.parametrize("world", [2, 3])
def test_tp_engine_greedy_equals_single_process(setup, world):
    out = setup["base"] / f"out{world}"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}", "--nnodes=1",
           "--master-addr=127.0.0.1", f"--master-port={_free_port()}", str(WORKER), "--model", str(MODEL),
           "--ec", str(setup["base"] / "ecs"), "--prompts", str(setup["base"] / "prompts.json"), "--new", str(NEW),
           "--out", str(out)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=400)
    results = {}
    for r in range(world):
        f = out / f"rank{r}.json"
        assert f.is_file(), f"rank {r} wrote nothing (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
        results[r] = json.loads(f.read_text())
        assert "error" not in results[r], f"rank {r} failed:\n{results[r]['error']}"
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert all(results[r]["done"] for r in range(1, world))   # the followers left their loop on close()
    res = results[0]
    assert setup["with_ec"] != setup["without_ec"]            # the ECs matter for these prompts
    assert res["with_ec"] == setup["with_ec"]
    assert res["without_ec"] == setup["without_ec"]           # switched off while serving: the other graph set
    assert res["blocks_free"] and res["graphs"] > 0
    assert res["local_heads"] < 6 and res["local_kv_heads"] <= 2   # spear-ref-16m: 6 heads, 2 KV heads, sharded


def test_tp_failure_after_the_broadcast_stops_every_rank(setup):
    """Rank 0's forward fails after the step's inputs went to the other ranks: no hang until a collective times out,
    no wrong tokens; rank 0 exits with one line naming the failure and the launcher stops the others."""
    out = setup["base"] / "fail"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--nnodes=1",
           "--master-addr=127.0.0.1", f"--master-port={_free_port()}", str(WORKER), "--model", str(MODEL),
           "--prompts", str(setup["base"] / "prompts.json"), "--out", str(out), "--inject-failure"]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "tensor-parallel step failed on rank 0" in proc.stderr and "injected forward failure" in proc.stderr
    assert time.monotonic() - t0 < 120, "a rank waited for a collective that never came"
    assert not (out / "rank0.json").exists() or "with_ec" not in json.loads((out / "rank0.json").read_text())


def _wait_up(proc, base_url, log_path, timeout=240):
    import httpx
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, Path(log_path).read_text()[-4000:]
        assert time.monotonic() < deadline, "spear-compile serve --tp did not come up"
        try:
            if httpx.get(base_url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)


def test_serve_tp2_on_cpu(setup, tmp_path):
    """``spear-compile serve --tp 2``: relaunches itself under torchrun; completions (plain and streaming) give the
    single-process engine's greedy text; a bad request gets a 4xx; Ctrl-C shuts every rank down."""
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("uvicorn")
    port = _free_port()
    log_path = tmp_path / "serve.log"
    log = open(log_path, "w+")
    proc = subprocess.Popen([sys.executable, "-m", "spear_compile.cli", "serve", "--tp", "2", "--device", "cpu",
                             "--port", str(port), "--ec", str(setup["base"] / "ecs"), "--max-batch", "4",
                             "--max-num-tokens", "64", "--max-model-len", "128", "--num-blocks", "96", "--dtype", "float32",
                             "--log-level", "warning"],
                            stdout=log, stderr=subprocess.STDOUT, env=_env(), cwd=ROOT, start_new_session=True)
    base_url = f"http://127.0.0.1:{port}"
    try:
        _wait_up(proc, base_url, log_path)
        for i in (0, 2):
            body = {"model": "spear-ref-16m", "prompt": setup["prompts"][i], "max_tokens": NEW, "temperature": 0,
                    "ignore_eos": True}
            r = httpx.post(base_url + "/v1/completions", json=body, timeout=120)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == setup["texts"][i]
        text = ""
        with httpx.stream("POST", base_url + "/v1/completions", timeout=120,
                          json={**body, "prompt": setup["prompts"][1], "stream": True}) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    text += json.loads(line[6:])["choices"][0]["text"]
        assert text == setup["texts"][1]
        bad = httpx.post(base_url + "/v1/completions", json={"model": "spear-ref-16m", "prompt": "x", "max_tokens": -3})
        assert 400 <= bad.status_code < 500
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    output = log_path.read_text()
    assert proc.returncode == 0 and "Traceback" not in output, output[-4000:]
