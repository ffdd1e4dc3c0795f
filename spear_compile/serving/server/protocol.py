"""OpenAI wire format: request models, response builders, and the error type every handler raises.

Requests are validated strictly (a string where an integer belongs is a 400, not a coercion) and unknown fields
are accepted and ignored, as OpenAI clients send extras (``user``, ...). Options this server does not implement
(``n > 1``, ``echo``, ``logit_bias``, tools, ...) are refused with a 400 naming the parameter rather than silently
ignored. Log-probabilities are served in OpenAI's two shapes: completions' ``logprobs: k`` (``tokens``,
``token_logprobs``, ``top_logprobs``, ``text_offset``) and chat's ``logprobs: true`` + ``top_logprobs: k``
(``content``: token, logprob, bytes, top_logprobs); values are the model's raw log-softmax, as vLLM reports.
Penalties: OpenAI's ``presence_penalty`` / ``frequency_penalty`` and vLLM's ``repetition_penalty``. Error bodies
have OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.
"""
from __future__ import annotations

import math
import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ...errors import SpearError
from ..request import MAX_LOGPROBS, SamplingParams

# The largest completion a request may ask for before the context check (which is usually tighter).
MAX_TOKENS_LIMIT = 1 << 20


class APIError(Exception):
    """An error answered as an OpenAI error body. 4xx: the request's fault; 5xx: ours."""

    def __init__(self, message: str, status: int = 400, param: Optional[str] = None, code: Optional[str] = None,
                 type: Optional[str] = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code
        self.type = type or error_type(status)

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_type(status: int) -> str:
    """OpenAI's error ``type`` for an HTTP status."""
    if status == 404:
        return "not_found_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def error_body(message: str, type: str, param: Optional[str] = None, code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class StreamOptions(_Strict):
    include_usage: bool = False


class _SamplingFields(_Strict):
    """Fields shared by completions and chat completions."""
    model: Optional[str] = None
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: Optional[int] = None
    logprobs: Any = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    repetition_penalty: Optional[float] = None  # vLLM extension (HF's repetition penalty over prompt and output)
    logit_bias: Optional[dict] = None
    ignore_eos: bool = False  # vLLM extension, handy for benchmarks
    ttft_slo_ms: Optional[float] = None   # extensions: this request's latency targets for the SLO-aware scheduler
    tpot_slo_ms: Optional[float] = None


class CompletionRequest(_SamplingFields):
    prompt: Union[str, list[int], list[str], list[list[int]]]
    echo: bool = False
    best_of: Optional[int] = None
    suffix: Optional[str] = None


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "developer"]
    content: Union[str, list[dict]]
    name: Optional[str] = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = None
    tools: Optional[list] = None
    functions: Optional[list] = None
    response_format: Optional[dict] = None
    top_logprobs: Optional[int] = None


def parse_request(model_cls: type[BaseModel], data: Any) -> BaseModel:
    """``data`` (decoded JSON) as ``model_cls``; a validation failure becomes a 400 naming the first bad field."""
    if not isinstance(data, dict):
        raise APIError(f"the request body must be a JSON object, got {type(data).__name__}", code="invalid_type")
    try:
        return model_cls.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = [str(p) for p in err.get("loc", ()) if not _is_type_tag(p)]
        param = ".".join(loc) or None
        if err.get("type") == "missing":
            raise APIError(f"missing required parameter '{param}'", param=param, code="missing_required_parameter")
        raise APIError(f"invalid value for '{param}': {err.get('msg')} (got {_short(err.get('input'))})",
                       param=param, code="invalid_type" if err.get("type", "").endswith("_type") else "invalid_value")


def _is_type_tag(p) -> bool:
    # pydantic puts the union member's type name into the location (e.g. ("prompt", "str")); drop it
    return isinstance(p, str) and (p in ("str", "int", "float", "bool") or p.startswith(("list[", "dict[")))


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _refuse_unsupported(req: _SamplingFields) -> None:
    if req.n is not None and req.n != 1:
        raise APIError(f"n={req.n} is not supported: this server returns one choice per request (n=1)", param="n",
                       code="unsupported_value")
    if req.logit_bias:
        raise APIError("logit_bias is not supported by this server", param="logit_bias", code="unsupported_value")
    for name in ("ttft_slo_ms", "tpot_slo_ms"):
        value = getattr(req, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise APIError(f"{name}={value} is invalid; it must be a positive number of milliseconds", param=name,
                           code="invalid_value")
    if req.stream_options is not None and not req.stream:
        raise APIError("stream_options can only be given with stream=true", param="stream_options",
                       code="invalid_value")


def _count_of_logprobs(value, param: str) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_LOGPROBS):
        raise APIError(f"{param}={_short(value)} is invalid; it must be an integer in [0, {MAX_LOGPROBS}]", param=param,
                       code="invalid_value")


def logprobs_of(req: _SamplingFields) -> Optional[int]:
    """How many top alternatives each token reports (None: no logprobs): completions' ``logprobs``, chat's
    ``top_logprobs`` when ``logprobs`` is true. Call after the request's check."""
    if isinstance(req, ChatCompletionRequest):
        return (req.top_logprobs or 0) if req.logprobs else None
    return req.logprobs


def check_completion_request(req: CompletionRequest) -> None:
    _refuse_unsupported(req)
    if req.logprobs is not None:
        _count_of_logprobs(req.logprobs, "logprobs")
    if req.echo:
        raise APIError("echo=true is not supported by this server", param="echo", code="unsupported_value")
    if req.best_of not in (None, 1):
        raise APIError(f"best_of={req.best_of} is not supported (only 1)", param="best_of", code="unsupported_value")
    if req.suffix:
        raise APIError("suffix is not supported by this server", param="suffix", code="unsupported_value")


def check_chat_request(req: ChatCompletionRequest) -> None:
    _refuse_unsupported(req)
    if req.tools or req.functions:
        param = "tools" if req.tools else "functions"
        raise APIError("tool and function calling are not supported by this server", param=param,
                       code="unsupported_value")
    if req.response_format and req.response_format.get("type", "text") != "text":
        raise APIError("only response_format {'type': 'text'} is supported", param="response_format",
                       code="unsupported_value")
    if req.logprobs is not None and not isinstance(req.logprobs, bool):
        raise APIError(f"logprobs={_short(req.logprobs)} is invalid; chat completions take true or false (the count "
                       f"of alternatives is top_logprobs)", param="logprobs", code="invalid_value")
    if req.top_logprobs is not None:
        _count_of_logprobs(req.top_logprobs, "top_logprobs")
        if req.top_logprobs and not req.logprobs:
            raise APIError("top_logprobs needs logprobs=true", param="top_logprobs", code="invalid_value")


def single_prompt(prompt) -> Union[str, list[int]]:
    """The one prompt of a completion request (a string or token ids); a batch of several is a 400."""
    if isinstance(prompt, str):
        return prompt
    if not prompt:
        raise APIError("prompt must not be empty", param="prompt", code="invalid_value")
    if isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise APIError(f"a batch of {len(prompt)} prompts is not supported; send one prompt per request",
                           param="prompt", code="unsupported_value")
        return single_prompt(prompt[0])
    return prompt


def sampling_params(req: _SamplingFields, max_tokens: Optional[int], num_prompt_tokens: int,
                    max_model_len: int, prompt_param: str = "prompt", logprobs: Optional[int] = None) -> SamplingParams:
    """The engine's ``SamplingParams`` for ``req``; every bad value is a 400 naming its parameter.

    ``max_tokens=None``: the rest of the context. ``prompt_param``: the field a too-long prompt is blamed on. The prompt
    plus ``max_tokens`` must fit the context (as OpenAI answers: ``context_length_exceeded``)."""
    if num_prompt_tokens >= max_model_len:
        raise APIError(f"this model's maximum context length is {max_model_len} tokens; the prompt has "
                       f"{num_prompt_tokens} tokens, leaving no room for a completion", param=prompt_param,
                       code="context_length_exceeded")
    param = "max_tokens"
    if max_tokens is None:
        max_tokens = max_model_len - num_prompt_tokens
    elif max_tokens < 1 or max_tokens > MAX_TOKENS_LIMIT:
        raise APIError(f"max_tokens={max_tokens} is invalid; it must be an integer in [1, {max_model_len - 1}]",
                       param=param, code="invalid_value")
    elif num_prompt_tokens + max_tokens > max_model_len:
        raise APIError(f"this model's maximum context length is {max_model_len} tokens; you requested "
                       f"{num_prompt_tokens + max_tokens} ({num_prompt_tokens} in the prompt, {max_tokens} in the "
                       f"completion); reduce the prompt or max_tokens", param=param, code="context_length_exceeded")
    temperature = 1.0 if req.temperature is None else req.temperature
    top_p = 1.0 if req.top_p is None else req.top_p
    top_k = -1 if req.top_k in (None, 0) else req.top_k
    if not math.isfinite(temperature) or temperature < 0:
        raise APIError(f"temperature={temperature} is invalid; it must be >= 0 (0 = greedy)", param="temperature",
                       code="invalid_value")
    if not math.isfinite(top_p) or not 0 < top_p <= 1:
        raise APIError(f"top_p={top_p} is invalid; it must be in (0, 1]", param="top_p", code="invalid_value")
    if top_k < -1:
        raise APIError(f"top_k={top_k} is invalid; it must be >= 1, or 0 / -1 for off", param="top_k",
                       code="invalid_value")
    if req.seed is not None and not 0 <= req.seed < 2 ** 63:
        raise APIError(f"seed={req.seed} is invalid; it must be in [0, 2**63)", param="seed", code="invalid_value")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    penalties = {name: getattr(req, name) for name in ("presence_penalty", "frequency_penalty", "repetition_penalty")
                 if getattr(req, name) is not None}
    try:
        return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                              seed=req.seed, stop=stop, ignore_eos=req.ignore_eos, logprobs=logprobs, **penalties)
    except SpearError as e:  # the engine's own checks (e.g. the stop-string limit)
        field = str(e).split("=", 1)[0].rsplit(" ", 1)[-1]
        raise APIError(str(e), param=field if field in SamplingParams.__dataclass_fields__ else None,
                       code="invalid_value") from e


# --- responses -------------------------------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(num_prompt_tokens: int, num_output_tokens: int) -> dict:
    return {"prompt_tokens": num_prompt_tokens, "completion_tokens": num_output_tokens,
            "total_tokens": num_prompt_tokens + num_output_tokens}


def completion_logprobs(pieces: list, offset: int = 0) -> dict:
    """Completions' ``logprobs`` object for ``pieces`` (``(text, TokenLogprobs, {alternative text: logprob})`` per
    token); ``offset``: the first token's position in the completion text (a stream's later chunks)."""
    offsets = []
    for text, _, _ in pieces:
        offsets.append(offset)
        offset += len(text)
    return {"tokens": [t for t, _, _ in pieces], "token_logprobs": [lp.logprob for _, lp, _ in pieces],
            "top_logprobs": [top for _, _, top in pieces], "text_offset": offsets}


def chat_logprobs(pieces: list) -> dict:
    """Chat's ``logprobs`` object for ``pieces`` (``(text, TokenLogprobs, [(alternative text, logprob)])``)."""
    def entry(text, logprob):
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}
    return {"content": [dict(entry(t, lp.logprob), top_logprobs=[entry(a, v) for a, v in top])
                        for t, lp, top in pieces]}


def completion_response(request_id: str, model: str, created: int, text: str, finish_reason: Optional[str],
                        num_prompt_tokens: int, num_output_tokens: int, logprobs: Optional[dict] = None) -> dict:
    return {"id": request_id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}],
            "usage": usage(num_prompt_tokens, num_output_tokens)}


def completion_chunk(request_id: str, model: str, created: int, text: str, finish_reason: Optional[str],
                     with_usage_field: bool, logprobs: Optional[dict] = None) -> dict:
    chunk = {"id": request_id, "object": "text_completion", "created": created, "model": model,
             "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}]}
    if with_usage_field:
        chunk["usage"] = None
    return chunk


def chat_response(request_id: str, model: str, created: int, text: str, finish_reason: Optional[str],
                  num_prompt_tokens: int, num_output_tokens: int, logprobs: Optional[dict] = None) -> dict:
    return {"id": request_id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                         "finish_reason": finish_reason}],
            "usage": usage(num_prompt_tokens, num_output_tokens)}


def chat_chunk(request_id: str, model: str, created: int, delta: dict, finish_reason: Optional[str],
               with_usage_field: bool, logprobs: Optional[dict] = None) -> dict:
    chunk = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
             "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}
    if with_usage_field:
        chunk["usage"] = None
    return chunk


def usage_chunk(request_id: str, model: str, created: int, object_name: str, num_prompt_tokens: int,
                num_output_tokens: int) -> dict:
    """The last chunk of a stream with ``stream_options.include_usage``: no choices, the usage."""
    return {"id": request_id, "object": object_name, "created": created, "model": model, "choices": [],
            "usage": usage(num_prompt_tokens, num_output_tokens)}


def model_list(model: str, max_model_len: int) -> dict:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": int(time.time()),
                                        "owned_by": "spear_compile", "max_model_len": max_model_len}]}
