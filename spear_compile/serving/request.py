"""Requests and their sampling parameters: the engine's unit of work."""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Optional

from ..errors import SpearError

MAX_STOP_STRINGS = 16
MAX_LOGPROBS = 20  # top alternatives a token may report (OpenAI's chat limit; vLLM's default)


@dataclass
class SamplingParams:
    """Per-request sampling. ``temperature == 0`` is greedy; ``top_k = -1`` (or 0) is off; ``seed`` makes the
    request's sampling reproducible (its own ``torch.Generator``). Validated on construction: a bad value raises
    ``SpearError`` naming the field."""
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: Optional[int] = None
    stop: list = field(default_factory=list)
    stop_token_ids: list = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: Optional[int] = None  # None: none; k: each sampled token's log-probability and the k most likely
    presence_penalty: float = 0.0   # OpenAI's: minus this from every token already in the output
    frequency_penalty: float = 0.0  # OpenAI's: minus this times the token's count in the output
    repetition_penalty: float = 1.0  # HF's / vLLM's: a token of the prompt or output has its logit divided by this
    # if positive, multiplied if negative

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        _check(isinstance(self.max_tokens, int) and not isinstance(self.max_tokens, bool) and self.max_tokens >= 1,
               "max_tokens", self.max_tokens, "an integer >= 1")
        _check(_real(self.temperature) and 0.0 <= self.temperature <= 100.0, "temperature", self.temperature,
               "a number in [0, 100] (0 = greedy)")
        _check(_real(self.top_p) and 0.0 < self.top_p <= 1.0, "top_p", self.top_p, "a number in (0, 1]")
        _check(isinstance(self.top_k, int) and not isinstance(self.top_k, bool) and self.top_k >= -1, "top_k",
               self.top_k, "an integer >= 1, or -1 / 0 for off")
        _check(self.seed is None or (isinstance(self.seed, int) and not isinstance(self.seed, bool)
                                     and 0 <= self.seed < 2 ** 63),
               "seed", self.seed, "None or an integer in [0, 2**63)")
        _check(len(self.stop) <= MAX_STOP_STRINGS and all(isinstance(s, str) and s for s in self.stop), "stop",
               self.stop, f"at most {MAX_STOP_STRINGS} non-empty strings")
        _check(all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids),
               "stop_token_ids", self.stop_token_ids, "non-negative integers")
        _check(isinstance(self.ignore_eos, bool), "ignore_eos", self.ignore_eos, "a bool")
        _check(self.logprobs is None or (isinstance(self.logprobs, int) and not isinstance(self.logprobs, bool)
                                         and 0 <= self.logprobs <= MAX_LOGPROBS), "logprobs", self.logprobs,
               f"None or an integer in [0, {MAX_LOGPROBS}]")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(_real(value) and -2.0 <= value <= 2.0, name, value, "a number in [-2, 2] (0 = off)")
        _check(_real(self.repetition_penalty) and 0.0 < self.repetition_penalty <= 10.0, "repetition_penalty",
               self.repetition_penalty, "a number in (0, 10] (1 = off)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    @property
    def device_argmax(self) -> bool:
        """The token is the logits' argmax and nothing else is read back (what an overlapped step can launch on)."""
        return self.greedy and self.logprobs is None and not self.penalized


def _real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check(ok: bool, name: str, value, expected: str):
    if not ok:
        raise SpearError(f"SamplingParams: {name}={value!r} is invalid; expected {expected}")


@dataclass(frozen=True)
class TokenLogprobs:
    """A sampled token's log-probability under the model (the raw logits' log-softmax: before temperature, top-k
    and top-p, as vLLM reports by default) and the ``k`` most likely tokens, most likely first."""
    token_id: int
    logprob: float
    top: tuple = ()  # ((token_id, logprob), ...)


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"

    @property
    def finished(self) -> bool:
        return self.value in _FINISHED_VALUES   # (asked for every request every step: no string scan)

    @property
    def finish_reason(self) -> Optional[str]:
        return self.value if self.value in _FINISHED_VALUES else None


_FINISHED_VALUES = frozenset(s.value for s in RequestStatus if s.name.startswith("FINISHED"))


@dataclass(eq=False)  # identity equality: the scheduler tests membership in its lists every step
class Request:
    """One generation request. ``num_computed_tokens`` counts the tokens whose KV is in the cache."""
    request_id: str
    prompt_token_ids: list
    sampling: SamplingParams
    arrival_time: float
    ttft_slo_s: Optional[float] = None
    tpot_slo_s: Optional[float] = None
    output_token_ids: list = field(default_factory=list)
    output_logprobs: list = field(default_factory=list)  # a TokenLogprobs per output token (sampling.logprobs set)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    block_ids: list = field(default_factory=list)
    block_hashes: list = field(default_factory=list)  # prefix caching: the chain hashes of its named full blocks
    cache_epoch: int = -1  # prefix caching: the cache epoch it was admitted in (it names blocks only in that one)
    first_token_time: Optional[float] = None
    last_token_time: Optional[float] = None
    finish_time: Optional[float] = None
    num_preemptions: int = 0

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list:
        return self.prompt_token_ids + self.output_token_ids

    def token_at(self, i: int) -> int:
        """Token ``i`` of prompt + output, without building the concatenation."""
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[i] if i < n else self.output_token_ids[i - n]

    @property
    def num_tokens_to_compute(self) -> int:
        """Tokens not yet in the cache (1 for a running decode: the last sampled token)."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_prefilling(self) -> bool:
        """More than one token to compute: a (re)prefill, possibly chunked."""
        return self.num_tokens_to_compute > 1

    @property
    def is_finished(self) -> bool:
        return self.status.finished
