"""The OpenAI-compatible server on CPU: the real engine on the bundled spear-ref-16m (W4), a real uvicorn server on
127.0.0.1 (a port the OS picks), clients over httpx and the ``openai`` package.

References are independent of the server: the engine's offline greedy ``generate`` (run before the server starts)
for texts, ``prometheus_client``'s parser for ``/metrics``, the engine's own stats for KV blocks.
"""
from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

fastapi = pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from spear_compile.evaluate import DEFAULT_MODEL  # noqa: E402
from spear_compile.serving.async_engine import AsyncEngine  # noqa: E402
from spear_compile.serving.config import EngineConfig  # noqa: E402
from spear_compile.serving.engine import Engine  # noqa: E402
from spear_compile.serving.request import SamplingParams  # noqa: E402
from spear_compile.serving.server import build_app  # noqa: E402
from spear_compile.serving.server.chat import chat_prompt_ids  # noqa: E402
from spear_compile.serving.server.protocol import ChatMessage  # noqa: E402

from .server_thread import ServerThread  # noqa: E402

MODEL = "spear-ref-16m"
PROMPTS = ["The history of the city", "Once upon a time there was a", "In 1990, the band released"]
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Tell me about rivers."}]
MAX_TOKENS = 8
MAX_NUM_SEQS = 32        # below the 64 concurrent clients: some wait for a slot
LONG_MAX_TOKENS = 400   # the disconnecting clients' requests: far more steps than the whole test runs
PENALTIES = dict(presence_penalty=1.2, frequency_penalty=0.8, repetition_penalty=1.3)
BATCH_LOGPROB_TOL = 0.02  # |Δ logprob| from bf16 batching here: at most 0.0088 (any arrival order, 0-2 step gaps)


@pytest.fixture(scope="module", params=[False, True], ids=["one-step-at-a-time", "overlapped"])
def served(request):
    """The server over the bundled model, its engine one step at a time, then with overlapped steps (every test of
    this module runs against both: streaming, disconnects and aborts with a step in flight)."""
    config = EngineConfig(compile=False, cuda_graphs=False, device="cpu", max_num_seqs=MAX_NUM_SEQS,
                          max_num_tokens=256, progress=False, overlap_decode=request.param)
    engine = Engine.from_pretrained(str(DEFAULT_MODEL), quant="w4-pc-rtn", config=config)
    greedy = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=3)  # logprobs: test_logprobs' reference
    chat_ids = chat_prompt_ids(engine.tokenizer, [ChatMessage(**m) for m in CHAT])
    *offline, offline_chat = engine.generate(PROMPTS + [chat_ids], greedy)
    penalized = engine.generate([PROMPTS[1]], SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, **PENALTIES))[0]
    server = ServerThread(build_app(AsyncEngine(engine), MODEL))
    try:
        yield server.base_url, engine, offline, offline_chat, penalized
    finally:
        server.stop()


@pytest.fixture
def client(served):
    with httpx.Client(base_url=served[0], timeout=120) as c:
        yield c


def _concurrently(fn, *arg_lists):
    """``fn`` over the argument tuples at once (one thread each), so the engine batches them; results in order."""
    args = list(zip(*arg_lists))
    with ThreadPoolExecutor(len(args)) as pool:
        return list(pool.map(lambda a: fn(*a), args))


def _sse_events(lines) -> tuple[list[dict], bool]:
    """Decode ``data:`` lines: the JSON chunks, and whether the stream ended with ``data: [DONE]``."""
    chunks, done = [], False
    for line in lines:
        if not line:
            continue
        assert line.startswith("data: "), line
        assert not done, "data after [DONE]"
        if line == "data: [DONE]":
            done = True
        else:
            chunks.append(json.loads(line[len("data: "):]))
    return chunks, done


def _wait_idle(engine, timeout_s: float = 60.0):
    """Engine stats once nothing runs or waits (the abort of a disconnected request reaches the engine thread
    asynchronously); fails the test if that never happens."""
    deadline = time.monotonic() + timeout_s
    while True:
        s = engine.stats()
        if s.num_running == 0 and s.num_waiting == 0:
            return s
        if time.monotonic() > deadline:
            pytest.fail(f"the engine never went idle: {s}")
        time.sleep(0.05)


def test_health_and_models(client, served):
    assert client.get("/health").status_code == 200
    r = client.get("/v1/models")
    assert r.status_code == 200
    (card,) = r.json()["data"]
    assert card["id"] == MODEL and card["object"] == "model" and card["max_model_len"] == served[1].max_model_len


def test_completion_greedy_equals_offline(client, served):
    """Each prompt as text and as token ids, all at once: every text equals the offline greedy output."""
    _, _, offline, _, _ = served
    bodies = [{"model": MODEL, "prompt": list(ref.prompt_token_ids) if as_ids else prompt, "max_tokens": MAX_TOKENS,
               "temperature": 0} for as_ids in (False, True) for prompt, ref in zip(PROMPTS, offline)]
    responses = _concurrently(lambda body: client.post("/v1/completions", json=body), bodies)
    for r, ref in zip(responses, offline + offline):
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["object"] == "text_completion" and out["model"] == MODEL and out["id"].startswith("cmpl-")
        (choice,) = out["choices"]
        assert choice["text"] == ref.text
        assert choice["finish_reason"] == ref.finish_reason
        assert out["usage"] == {"prompt_tokens": ref.num_prompt_tokens, "completion_tokens": ref.num_output_tokens,
                                "total_tokens": ref.num_prompt_tokens + ref.num_output_tokens}


def test_completion_stream_equals_offline(client, served):
    ref = served[2][0]
    body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        chunks, done = _sse_events(r.iter_lines())
    assert done
    *text_chunks, usage = chunks
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == ref.num_output_tokens
    assert all(c["object"] == "text_completion" and c["usage"] is None for c in text_chunks)
    assert "".join(c["choices"][0]["text"] for c in text_chunks) == ref.text
    assert [c["choices"][0]["finish_reason"] for c in text_chunks][-1] == ref.finish_reason
    assert all(c["choices"][0]["finish_reason"] is None for c in text_chunks[:-1])
    assert len(text_chunks) >= 2   # tokens arrive as they are generated, not in one piece


def test_chat_greedy_equals_offline(client, served):
    ref = served[3]
    body = {"model": MODEL, "messages": CHAT, "max_tokens": MAX_TOKENS, "temperature": 0}

    def stream():
        with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
            assert r.status_code == 200
            return _sse_events(r.iter_lines())

    r, (chunks, done) = _concurrently(lambda f: f(), [lambda: client.post("/v1/chat/completions", json=body), stream])
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "chat.completion"
    msg = out["choices"][0]["message"]
    assert msg == {"role": "assistant", "content": ref.text}
    assert out["usage"]["prompt_tokens"] == ref.num_prompt_tokens
    assert done and all(c["object"] == "chat.completion.chunk" and "usage" not in c for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == ref.text
    assert chunks[-1]["choices"][0]["finish_reason"] == ref.finish_reason


def test_openai_client(served):
    base_url, _, offline, offline_chat, _ = served
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
    out, chunks = _concurrently(lambda f: f(), [
        lambda: client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=MAX_TOKENS, temperature=0),
        lambda: list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=MAX_TOKENS, temperature=0,
                                                    stream=True, stream_options={"include_usage": True}))])
    assert out.choices[0].text == offline[1].text and out.usage.completion_tokens == offline[1].num_output_tokens
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == offline_chat.text
    assert chunks[-1].usage.completion_tokens == offline_chat.num_output_tokens
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", max_tokens=4, n=2)
    assert e.value.status_code == 400 and e.value.body["param"] == "n"
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="x", max_tokens=4)
    assert e.value.body["code"] == "model_not_found"


def test_logprobs_completion_and_chat(client, served):
    """Greedy with logprobs: the same text as without; a token's log-probability is its top alternative's (it is the
    argmax), the alternatives come most likely first; completions' token texts join into the text and their
    offsets count it; chat's entries carry the UTF-8 bytes; a stream's chunks carry the same entries as the
    non-streaming answer; the values are the offline engine's (``SamplingParams.logprobs``)."""
    ref = served[2][0]
    body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0, "logprobs": 3}
    chat_body = {"model": MODEL, "messages": CHAT, "max_tokens": MAX_TOKENS, "temperature": 0, "logprobs": True,
                 "top_logprobs": 2}

    def stream(path, b):
        with client.stream("POST", path, json={**b, "stream": True}) as r:
            assert r.status_code == 200
            return _sse_events(r.iter_lines())[0]

    r, rc, chunks, chat_chunks = _concurrently(lambda f: f(), [
        lambda: client.post("/v1/completions", json=body), lambda: client.post("/v1/chat/completions", json=chat_body),
        lambda: stream("/v1/completions", body), lambda: stream("/v1/chat/completions", chat_body)])
    choice = r.json()["choices"][0]
    assert choice["text"] == ref.text
    lp = choice["logprobs"]
    n = ref.num_output_tokens
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == n
    assert "".join(lp["tokens"]) == ref.text
    assert lp["text_offset"] == [len("".join(lp["tokens"][:i])) for i in range(n)]
    for tok, value, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert value <= 0 and 3 <= len(top) <= 4 and top[tok] == value == max(top.values())
    # the offline engine's values up to bf16's dependence on the step's batch: the server batches these four requests
    # as they arrive, and the bf16 engine's logits move with what shares a prefill step (a 39-token prompt beside
    # PROMPTS[0] moves its first log-probability by 0.008; float32: 3e-6); the tokens above are exact
    assert lp["token_logprobs"] == pytest.approx([x.logprob for x in ref.output_logprobs], abs=BATCH_LOGPROB_TOL)
    streamed = [c["choices"][0]["logprobs"] for c in chunks if c["choices"] and c["choices"][0]["logprobs"]]
    assert sum((x["tokens"] for x in streamed), []) == lp["tokens"]
    assert sum((x["text_offset"] for x in streamed), []) == lp["text_offset"]

    chat = rc.json()["choices"][0]
    assert chat["message"]["content"] == served[3].text
    content = chat["logprobs"]["content"]
    assert len(content) == served[3].num_output_tokens
    for e in content:
        assert e["bytes"] == list(e["token"].encode("utf-8")) and len(e["top_logprobs"]) == 2
        assert e["top_logprobs"][0]["logprob"] == e["logprob"] >= e["top_logprobs"][1]["logprob"]
    streamed = sum((c["choices"][0]["logprobs"]["content"] for c in chat_chunks
                    if c["choices"] and c["choices"][0]["logprobs"]), [])
    assert _logprob_free(streamed) == _logprob_free(content)   # tokens, bytes, alternatives: exact
    assert [e["logprob"] for e in streamed] == pytest.approx([e["logprob"] for e in content], abs=BATCH_LOGPROB_TOL)


def _logprob_free(entries):
    """Chat log-probability entries without their values (which move with the batch, ``BATCH_LOGPROB_TOL``)."""
    return [(e["token"], e["bytes"], [t["token"] for t in e["top_logprobs"]]) for e in entries]


def test_penalties_equal_offline(client, served):
    """presence / frequency (OpenAI's) and repetition (vLLM's extension) penalties: the offline engine's text."""
    ref = served[4]
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": PROMPTS[1], "max_tokens": MAX_TOKENS,
                                             "temperature": 0, **PENALTIES})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == ref.text != served[2][1].text  # the penalties changed the text


def test_seeded_sampling_and_stop(client, served):
    """A seeded sampled request twice gives the same text (batched together); a stop string cuts the greedy text
    before its first occurrence."""
    ref = served[2][0].text
    stop = ref[len(ref) // 2:len(ref) // 2 + 2]
    assert stop.strip(), f"the greedy text {ref!r} is too short to take a stop string from"
    seeded = {"model": MODEL, "prompt": PROMPTS[2], "max_tokens": MAX_TOKENS, "temperature": 0.9, "top_p": 0.9,
              "top_k": 50, "seed": 1234, "ttft_slo_ms": 60000, "tpot_slo_ms": 10000}
    stopped = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0, "stop": [stop]}
    first, second, r = (x.json() for x in _concurrently(lambda b: client.post("/v1/completions", json=b),
                                                         [seeded, seeded, stopped]))
    assert first["choices"][0]["text"] == second["choices"][0]["text"]
    assert r["choices"][0]["text"] == ref[:ref.index(stop)]
    assert r["choices"][0]["finish_reason"] == "stop"


LONG_PROMPT = "the " * 1200   # ~1200 tokens, past the 1024-token context
BAD_REQUESTS = [
    # (id, endpoint, raw body, status, param)
    ("malformed_json", "/v1/completions", b'{"prompt": "x", "max_tokens": 4', 400, None),
    ("not_an_object", "/v1/completions", b'["x"]', 400, None),
    ("nan_literal", "/v1/completions", b'{"prompt": "x", "temperature": NaN}', 400, None),
    ("missing_prompt", "/v1/completions", {"max_tokens": 4}, 400, "prompt"),
    ("unknown_model", "/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "model"),
    ("unknown_model_chat", "/v1/chat/completions", {"model": "nope", "messages": CHAT}, 404, "model"),
    ("max_tokens_negative", "/v1/completions", {"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ("max_tokens_zero", "/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens_absurd", "/v1/completions", {"prompt": "x", "max_tokens": 10 ** 12}, 400, "max_tokens"),
    ("max_tokens_past_context", "/v1/completions", {"prompt": "x", "max_tokens": 1024}, 400, "max_tokens"),
    ("max_tokens_string", "/v1/completions", {"prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
    ("max_tokens_float", "/v1/completions", {"prompt": "x", "max_tokens": 4.5}, 400, "max_tokens"),
    ("prompt_too_long", "/v1/completions", {"prompt": LONG_PROMPT, "max_tokens": 4}, 400, "prompt"),
    ("chat_too_long", "/v1/chat/completions", {"messages": [{"role": "user", "content": LONG_PROMPT}]}, 400,
     "messages"),
    ("prompt_wrong_type", "/v1/completions", {"prompt": 42}, 400, "prompt"),
    ("prompt_bad_token_id", "/v1/completions", {"prompt": [1, 10 ** 6]}, 400, "prompt"),
    ("prompt_empty_ids", "/v1/completions", {"prompt": []}, 400, "prompt"),
    ("prompt_batch", "/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt"),
    ("temperature_negative", "/v1/completions", {"prompt": "x", "temperature": -0.5}, 400, "temperature"),
    ("temperature_string", "/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("top_p_zero", "/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("top_p_above_one", "/v1/completions", {"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ("top_k_negative", "/v1/completions", {"prompt": "x", "top_k": -3}, 400, "top_k"),
    ("seed_negative", "/v1/completions", {"prompt": "x", "seed": -1}, 400, "seed"),
    ("stop_empty", "/v1/completions", {"prompt": "x", "stop": [""]}, 400, "stop"),
    ("stop_wrong_type", "/v1/completions", {"prompt": "x", "stop": 3}, 400, "stop"),
    ("stream_not_bool", "/v1/completions", {"prompt": "x", "stream": "yes"}, 400, "stream"),
    ("ttft_slo_negative", "/v1/completions", {"prompt": "x", "ttft_slo_ms": -5}, 400, "ttft_slo_ms"),
    ("tpot_slo_zero", "/v1/chat/completions", {"messages": CHAT, "tpot_slo_ms": 0}, 400, "tpot_slo_ms"),
    ("n_two", "/v1/completions", {"prompt": "x", "n": 2}, 400, "n"),
    ("echo", "/v1/completions", {"prompt": "x", "echo": True}, 400, "echo"),
    ("presence_penalty_high", "/v1/completions", {"prompt": "x", "presence_penalty": 2.5}, 400, "presence_penalty"),
    ("frequency_penalty_string", "/v1/completions", {"prompt": "x", "frequency_penalty": "1"}, 400,
     "frequency_penalty"),
    ("repetition_penalty_zero", "/v1/chat/completions", {"messages": CHAT, "repetition_penalty": 0}, 400,
     "repetition_penalty"),
    ("logprobs_negative", "/v1/completions", {"prompt": "x", "logprobs": -1}, 400, "logprobs"),
    ("logprobs_too_many", "/v1/completions", {"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ("logprobs_string", "/v1/completions", {"prompt": "x", "logprobs": "3"}, 400, "logprobs"),
    ("logprobs_bool_completion", "/v1/completions", {"prompt": "x", "logprobs": True}, 400, "logprobs"),
    ("chat_logprobs_int", "/v1/chat/completions", {"messages": CHAT, "logprobs": 3}, 400, "logprobs"),
    ("chat_top_logprobs_alone", "/v1/chat/completions", {"messages": CHAT, "top_logprobs": 2}, 400, "top_logprobs"),
    ("chat_top_logprobs_too_many", "/v1/chat/completions", {"messages": CHAT, "logprobs": True, "top_logprobs": 21},
     400, "top_logprobs"),
    ("stream_options_without_stream", "/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}},
     400, "stream_options"),
    ("chat_no_messages", "/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("chat_bad_role", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400,
     "messages.0.role"),
    ("chat_tools", "/v1/chat/completions", {"messages": CHAT, "tools": [{"type": "function"}]}, 400, "tools"),
    ("chat_image_part", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "messages.0.content"),
]


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request_gets_openai_error(client, served, case):
    _, endpoint, body, status, param = case
    steps_before = served[1].stats().num_steps
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = client.post(endpoint, content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    assert error["param"] == param
    assert served[1].stats().num_steps == steps_before   # refused before it reached the engine


def test_engine_failure_is_a_500_and_serving_goes_on(client, served, monkeypatch):
    """A step that raises fails its requests (500, or finish_reason "error" in a stream), frees their blocks, and
    the next request is served normally."""
    engine, ref = served[1], served[2][0]
    _wait_idle(engine)

    def broken_execute(*args, **kwargs):
        raise RuntimeError("injected step failure")

    monkeypatch.setattr(engine.runner, "run_decode", broken_execute)   # the forward, in either mode
    monkeypatch.setattr(engine.runner, "run_mixed", broken_execute)
    body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0}
    with pytest.warns(UserWarning, match="injected step failure"):
        r = client.post("/v1/completions", json=body)
        with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as s:
            chunks, done = _sse_events(s.iter_lines())
    monkeypatch.undo()
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert done and chunks[-1]["choices"][0]["finish_reason"] == "error"
    assert _wait_idle(engine).kv_blocks_used == 0
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == ref.text


def test_oversized_body_gets_413(client):
    body = b'{"prompt": "' + b"a" * (16 << 20) + b'"}'
    r = client.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_wrong_method_and_path_get_openai_errors(client):
    for method, path, status in (("GET", "/v1/completions", 405), ("POST", "/v1/nothing", 404)):
        r = client.request(method, path)
        assert r.status_code == status and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_metrics_parse_as_prometheus(client, served):
    engine = served[1]
    client.post("/v1/completions", json={"model": MODEL, "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS})
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(r.text)}

    def value(family, sample_suffix="", **labels):
        return sum(s.value for s in families[family].samples if s.name == family + sample_suffix
                   and all(s.labels.get(k) == v for k, v in labels.items()))

    for name in ("spear_time_to_first_token_seconds", "spear_time_per_output_token_seconds",
                 "spear_inter_token_latency_seconds", "spear_e2e_request_latency_seconds"):
        assert families[name].type == "histogram"
        assert value(name, "_count") >= 1
    assert value("spear_prompt_tokens", "_total") >= len(engine.tokenizer.encode(PROMPTS[0]))
    assert value("spear_generation_tokens", "_total") >= MAX_TOKENS
    assert value("spear_requests_finished", "_total", finish_reason="length") >= 1
    assert value("spear_requests_rejected", "_total", status="400") >= 0
    stats = _wait_idle(engine)
    assert value("spear_kv_cache_blocks_total") == stats.kv_blocks_total > 0
    assert value("spear_kv_cache_blocks_used") == 0
    assert value("spear_num_requests_running") == 0 and value("spear_num_requests_waiting") == 0
    assert value("spear_recompiles", "_total") == stats.recompiles
    assert all(s.labels.get("model_name") == MODEL for f in families.values() for s in f.samples
               if s.name.startswith("spear_"))


async def _stream_client(base_url: str, prompt: str, max_tokens: int, disconnect_after: int | None) -> dict:
    """One streaming client with its own connection. ``disconnect_after``: close the connection after that many
    text chunks (mid-generation)."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": disconnect_after is not None}
    async with httpx.AsyncClient(base_url=base_url, timeout=300) as client:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = []
            async for line in r.aiter_lines():
                if line:
                    lines.append(line)
                if disconnect_after is not None and len(lines) >= disconnect_after:
                    return {"disconnected": True, "lines": lines}
    chunks, done = _sse_events(lines)
    return {"disconnected": False, "done": done, "text": "".join(c["choices"][0]["text"] for c in chunks),
            "finish_reason": chunks[-1]["choices"][0]["finish_reason"] if chunks else None}


def _metric(base_url: str, family: str, sample: str, **labels) -> float:
    text = httpx.get(base_url + "/metrics").text
    return sum(s.value for f in text_string_to_metric_families(text) if f.name == family for s in f.samples
               if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()))


def test_64_streams_a_quarter_disconnect(served):
    """64 concurrent streaming clients, every fourth closes its connection after 2 chunks of a 400-token request:
    every other request completes with the offline greedy text, the dropped ones are aborted (they never run to
    their length: fewer engine steps than that pass), and afterwards every KV block is free."""
    base_url, engine, offline, _, _ = served
    _wait_idle(engine)
    steps_before = engine.stats().num_steps
    aborts_before = _metric(base_url, "spear_requests_finished", "spear_requests_finished_total",
                            finish_reason="abort")
    clients = []
    for i in range(64):
        drop = i % 4 == 3
        clients.append((i % len(PROMPTS), drop))

    async def run_all():
        return await asyncio.gather(*(
            _stream_client(base_url, PROMPTS[p], LONG_MAX_TOKENS if drop else MAX_TOKENS, 2 if drop else None)
            for p, drop in clients))

    results = asyncio.run(asyncio.wait_for(run_all(), timeout=300))
    for (p, drop), res in zip(clients, results):
        if drop:
            assert res["disconnected"]
        else:
            assert res["done"] and res["text"] == offline[p].text and res["finish_reason"] == offline[p].finish_reason

    stats = _wait_idle(engine)
    assert stats.kv_blocks_used == 0, f"{stats.kv_blocks_used} KV blocks still held after every request ended"
    assert stats.num_steps - steps_before < LONG_MAX_TOKENS, "a disconnected request ran to its length"
    aborts = _metric(base_url, "spear_requests_finished", "spear_requests_finished_total", finish_reason="abort")
    assert aborts - aborts_before == 16
    # the server is still serving
    r = httpx.post(base_url + "/v1/completions", timeout=120,
                   json={"model": MODEL, "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == offline[0].text


def test_non_streaming_disconnect_aborts(served):
    """A non-streaming client that gives up (read timeout: httpx closes the connection) cancels its request."""
    base_url, engine, _, _, _ = served
    _wait_idle(engine)
    steps_before = engine.stats().num_steps
    body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": LONG_MAX_TOKENS, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(base_url + "/v1/completions", json=body, timeout=httpx.Timeout(30, read=1.0))
    stats = _wait_idle(engine)
    assert stats.kv_blocks_used == 0
    assert stats.num_steps - steps_before < LONG_MAX_TOKENS
