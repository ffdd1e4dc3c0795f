"""The OpenAI-compatible HTTP server: ``build_app(async_engine, served_model_name)`` returns a FastAPI app.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true`` answers server-sent events
ending in ``data: [DONE]``), ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text).

Every request is validated before it reaches the engine; a bad one is answered with a 4xx OpenAI error body and
never touches the engine. A client that disconnects cancels its request: the stream (or the non-streaming
handler, which watches the connection) stops, the engine aborts the request and frees its KV blocks.
"""
from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator, Callable, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ...errors import SpearError
from ..metrics import CONTENT_TYPE, RequestTimer, ServingMetrics
from . import protocol as P
from .chat import chat_prompt_ids

logger = logging.getLogger("spear_compile.serving.server")

MAX_BODY_BYTES = 16 << 20
DEFAULT_COMPLETION_MAX_TOKENS = 16   # OpenAI's default for /v1/completions; chat defaults to the rest of the context
CONTEXT_TOKENS = 6  # tokens decoded before one whose text a logprobs entry reports (vLLM's incremental offset is 5)


def build_app(async_engine, served_model_name: str, *, metrics: Optional[ServingMetrics] = None,
              manage_engine: bool = True) -> FastAPI:
    """A FastAPI app serving ``async_engine`` (an ``AsyncEngine``) under the model name ``served_model_name``.

    ``manage_engine``: the app's lifespan starts the engine's loop and shuts it down. ``metrics``: default, a new
    ``ServingMetrics`` with its own registry reading ``async_engine.engine.stats()``."""
    if not isinstance(served_model_name, str) or not served_model_name:
        raise SpearError(f"build_app: served_model_name must be a non-empty string, got {served_model_name!r}")
    engine = async_engine.engine
    if not getattr(getattr(engine, "config", None), "detokenize", True):
        raise SpearError("build_app: the engine must detokenize (EngineConfig(detokenize=True)) to serve text")
    state = _ServerState(async_engine, served_model_name,
                         metrics or ServingMetrics(served_model_name, engine_stats=engine.stats))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if manage_engine:
            await async_engine.start()
        try:
            yield
        finally:
            state.close()
            if manage_engine:
                await async_engine.shutdown()

    app = FastAPI(title="spear_compile", lifespan=lifespan)
    app.state.serving = state

    @app.exception_handler(P.APIError)
    async def _api_error(request: Request, exc: P.APIError):
        state.metrics.rejected(exc.status)
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        state.metrics.rejected(exc.status_code)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return JSONResponse(P.error_body(str(exc.detail), P.error_type(exc.status_code), None, code),
                            status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):
        logger.exception("internal error while serving %s", request.url.path)
        state.metrics.rejected(500)
        return JSONResponse(P.error_body(f"internal server error: {type(exc).__name__}", "server_error", None,
                                         "internal_error"), status_code=500)

    @app.get("/health")
    async def health():
        if manage_engine and not getattr(async_engine, "running", True):
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return P.model_list(served_model_name, state.max_model_len)

    @app.get("/metrics")
    async def metrics_endpoint():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await state.completion(request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await state.chat_completion(request)

    return app


class _ServerState:
    """The handlers' shared state: the engine, a tokenizer of the server's own, the metrics."""

    def __init__(self, async_engine, model_name: str, metrics: ServingMetrics):
        engine = async_engine.engine
        self.async_engine = async_engine
        self.model_name = model_name
        self.metrics = metrics
        self.max_model_len = int(engine.max_model_len)
        # The engine thread detokenizes with its tokenizer; a Rust tokenizer used from two threads at once can
        # fail ("Already borrowed"), so the handlers tokenize with a copy, in one thread of their own (a long prompt
        # does not stall the event loop, and so everyone else's streams).
        self._tokenize_thread = ThreadPoolExecutor(1, thread_name_prefix="spear-tokenize")
        try:
            self.tokenizer = copy.deepcopy(engine.tokenizer)
        except Exception:  # a tokenizer that cannot be copied: share it
            self.tokenizer = engine.tokenizer
        else:  # the context check is ours; no "sequence longer than model_max_length" warning per long prompt
            self.tokenizer.model_max_length = 1 << 62
        config = getattr(getattr(engine, "model", None), "config", None)
        self.vocab_size = int(getattr(config, "vocab_size", None) or len(self.tokenizer))

    def close(self) -> None:
        self._tokenize_thread.shutdown(wait=False)

    async def _in_tokenize_thread(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._tokenize_thread, fn, *args)

    # --- request decoding -------------------------------------------------------------------------------------

    async def _read_json(self, request: Request):
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            raise P.APIError(f"request body of {declared} bytes exceeds the limit of {MAX_BODY_BYTES}", status=413,
                             code="request_too_large")
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            raise P.APIError(f"request body of {len(body)} bytes exceeds the limit of {MAX_BODY_BYTES}", status=413,
                             code="request_too_large")
        try:
            return json.loads(body, parse_constant=_reject_constant)
        except (ValueError, UnicodeDecodeError) as e:
            raise P.APIError(f"the request body is not valid JSON: {e}", code="invalid_json") from e

    def _check_model(self, model: Optional[str]) -> None:
        if model is not None and model != self.model_name:
            raise P.APIError(f"the model '{model}' does not exist; this server serves '{self.model_name}'",
                             status=404, param="model", code="model_not_found")

    async def _prompt_ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            return list(await self._in_tokenize_thread(self.tokenizer.encode, prompt))
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise P.APIError(f"prompt token ids must be in [0, {self.vocab_size}); got {bad[:5]}", param="prompt",
                             code="invalid_value")
        return list(prompt)

    # --- endpoints --------------------------------------------------------------------------------------------

    async def completion(self, request: Request):
        arrival = self.metrics.clock()
        req = P.parse_request(P.CompletionRequest, await self._read_json(request))
        self._check_model(req.model)
        P.check_completion_request(req)
        prompt_ids = await self._prompt_ids(P.single_prompt(req.prompt))
        max_tokens = req.max_tokens
        if max_tokens is None:
            max_tokens = max(1, min(DEFAULT_COMPLETION_MAX_TOKENS, self.max_model_len - len(prompt_ids)))
        sampling = P.sampling_params(req, max_tokens, len(prompt_ids), self.max_model_len, logprobs=P.logprobs_of(req))
        return await self._serve(request, "cmpl", prompt_ids, sampling, req, arrival, chat=False)

    async def chat_completion(self, request: Request):
        arrival = self.metrics.clock()
        req = P.parse_request(P.ChatCompletionRequest, await self._read_json(request))
        self._check_model(req.model)
        P.check_chat_request(req)
        prompt_ids = await self._in_tokenize_thread(chat_prompt_ids, self.tokenizer, req.messages)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        sampling = P.sampling_params(req, max_tokens, len(prompt_ids), self.max_model_len, prompt_param="messages",
                                     logprobs=P.logprobs_of(req))
        return await self._serve(request, "chatcmpl", prompt_ids, sampling, req, arrival, chat=True)

    async def _serve(self, request: Request, prefix: str, prompt_ids: list[int], sampling, req, arrival: float,
                     chat: bool):
        request_id = P.new_id(prefix)
        timer = self.metrics.track(len(prompt_ids), arrival)
        slo_s = {f"{name}_slo_s": getattr(req, f"{name}_slo_ms") / 1e3 for name in ("ttft", "tpot")
                 if getattr(req, f"{name}_slo_ms") is not None}
        outputs = self.async_engine.generate(prompt_ids, sampling, request_id=request_id, **slo_s)
        created = int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            events = self._events(chat, outputs, timer, request_id, created, prompt_ids, include_usage)
            return _EventStream(events, on_close=lambda: self._abort_unfinished(request_id, timer))
        collect = self._collect(outputs, timer)
        try:
            result = await _until_disconnect(request, collect)
        except SpearError as e:  # the engine refused the request
            raise P.APIError(str(e), code="invalid_value") from e
        if result is None:  # the client went away: nobody to answer
            self._abort_unfinished(request_id, timer)
            return Response(status_code=499)
        text, finish_reason, num_output_tokens, token_logprobs = result
        if finish_reason == "error":  # the engine's step failed: our fault, not the request's
            raise P.APIError("the engine failed while generating this request", status=500, code="internal_error")
        logprobs = None
        if sampling.logprobs is not None:
            logprobs = await self._logprobs_object(token_logprobs, chat, prompt_ids)
        build = P.chat_response if chat else P.completion_response
        return JSONResponse(build(request_id, self.model_name, created, text, finish_reason, len(prompt_ids),
                                  num_output_tokens, logprobs))

    async def _logprobs_object(self, token_logprobs: list, chat: bool, context: list, offset: int = 0) -> dict:
        """The response's ``logprobs`` for these tokens (``context``: the token ids before the first), their texts
        decoded on the tokenizer's thread."""
        pieces = await self._in_tokenize_thread(self._pieces, token_logprobs, chat, context)
        return P.chat_logprobs(pieces) if chat else P.completion_logprobs(pieces, offset)

    def _pieces(self, token_logprobs: list, chat: bool, context: list) -> list:
        """``(text, TokenLogprobs, alternatives)`` per token: chat's alternatives a list of (text, logprob);
        completions' a {text: logprob} dict that always holds the sampled token (up to k + 1 entries, as vLLM).
        A token's text is what it adds after the few tokens before it (a word-initial piece keeps its space), so a
        completion's token texts join into its text."""
        window = list(context[-CONTEXT_TOKENS:])
        pieces = []
        for lp in token_logprobs:
            before = self.tokenizer.decode(window)

            def text_of(token_id):
                return self.tokenizer.decode(window + [token_id])[len(before):]
            text = text_of(lp.token_id)
            if chat:
                top = [(text_of(t), v) for t, v in lp.top]
            else:
                top = {text_of(t): v for t, v in lp.top}
                top.setdefault(text, lp.logprob)
            pieces.append((text, lp, top))
            window = (window + [lp.token_id])[-CONTEXT_TOKENS:]
        return pieces

    def _abort_unfinished(self, request_id: str, timer: RequestTimer) -> None:
        if not timer.finished:
            timer.on_finish("abort")
            with contextlib.suppress(Exception):
                self.async_engine.abort(request_id)

    # --- output streams ---------------------------------------------------------------------------------------

    async def _collect(self, outputs, timer: RequestTimer):
        text, finish_reason, num_output_tokens, logprobs = "", None, 0, []
        async with _closing(outputs, timer):
            async for out in outputs:
                timer.on_tokens(len(out.new_token_ids))
                text, num_output_tokens, logprobs = out.text, out.num_output_tokens, out.output_logprobs
                if out.finished:
                    finish_reason = out.finish_reason
                    timer.on_finish(finish_reason)
        return text, finish_reason, num_output_tokens, logprobs

    async def _events(self, chat: bool, outputs, timer, request_id, created, prompt_ids, include_usage):
        """The SSE stream of one request: a chunk per piece of new text (chat: after a first role chunk), the usage
        chunk when asked for, ``[DONE]``; an engine error after the headers went out is reported in the stream. With
        logprobs, a chunk carries those of the tokens since the last chunk (a token whose text is held back, e.g. by
        a possible stop string, reports with the next one)."""
        def chunk(text, finish_reason, logprobs):
            if chat:
                return P.chat_chunk(request_id, self.model_name, created, {"content": text} if text else {},
                                    finish_reason, include_usage, logprobs)
            return P.completion_chunk(request_id, self.model_name, created, text, finish_reason, include_usage,
                                      logprobs)

        num_output_tokens = 0
        pending, offset = [], 0  # token logprobs not yet sent; the next one's offset in the completion text
        context = list(prompt_ids)  # the token ids before the first pending one
        async with _closing(outputs, timer):
            if chat:
                yield _sse(P.chat_chunk(request_id, self.model_name, created, {"role": "assistant", "content": ""},
                                        None, include_usage))
            try:
                async for out in outputs:
                    timer.on_tokens(len(out.new_token_ids))
                    num_output_tokens = out.num_output_tokens
                    if out.finished:
                        timer.on_finish(out.finish_reason)
                    pending += out.new_logprobs
                    if out.new_text or out.finished:
                        logprobs = None
                        if pending:
                            logprobs = await self._logprobs_object(pending, chat, context, offset)
                            offset += 0 if chat else sum(len(t) for t in logprobs["tokens"])
                            context = (context + [lp.token_id for lp in pending])[-CONTEXT_TOKENS:]
                            pending = []
                        yield _sse(chunk(out.new_text, out.finish_reason if out.finished else None, logprobs))
            except Exception as e:  # noqa: BLE001 - the headers are sent: report in the stream
                timer.on_finish("error")
                yield _sse(self._stream_error(e))
                yield "data: [DONE]\n\n"
                return
        if include_usage:
            yield _sse(P.usage_chunk(request_id, self.model_name, created,
                                     "chat.completion.chunk" if chat else "text_completion",
                                     len(prompt_ids), num_output_tokens))
        yield "data: [DONE]\n\n"

    def _stream_error(self, e: Exception) -> dict:
        if isinstance(e, SpearError):
            self.metrics.rejected(400)
            return P.error_body(str(e), "invalid_request_error", None, "invalid_value")
        logger.exception("engine error while streaming")
        self.metrics.rejected(500)
        return P.error_body(f"internal server error: {type(e).__name__}", "server_error", None, "internal_error")


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


@contextlib.asynccontextmanager
async def _closing(outputs, timer: RequestTimer):
    """Close the engine's output stream on the way out, however we leave (its close aborts an unfinished
    request); a request left unfinished counts as aborted, in the same step as the engine hears of it."""
    try:
        yield outputs
    except Exception:
        if not timer.finished:
            timer.on_finish("error")
        raise
    finally:
        if not timer.finished:  # cancelled (client gone) or closed early
            timer.on_finish("abort")
        close = getattr(outputs, "aclose", None)
        if close is not None:
            await close()


async def _until_disconnect(request: Request, work):
    """Run the coroutine ``work``; if the client disconnects first, cancel it and return None."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return None
    finally:
        for t in (task, watcher):
            if not t.done():
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class _EventStream(StreamingResponse):
    """``text/event-stream`` whose generator is closed, and ``on_close`` called, however the response ends
    (finished, or the client disconnected: Starlette then cancels the sending task, possibly while the generator
    waits at a ``yield`` where the cancellation does not reach it)."""

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            with contextlib.suppress(Exception):
                await self.body_iterator.aclose()
            self._on_close()
