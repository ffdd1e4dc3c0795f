"""The serving engine: requests in, tokens out, one scheduler step at a time.

``Engine.step()`` drains the requests added / aborted since the last step (thread-safe queues), asks the
``Scheduler`` for a ``StepPlan`` (every running decode plus prefill chunks within the policy's budget; preemption by
recompute when KV blocks run out), runs it through the ``ModelRunner`` (a CUDA-graph replay for decode-only steps, the
compiled mixed graph otherwise), samples, detokenizes incrementally and finishes requests on EOS / stop tokens /
stop strings / max_tokens / max_model_len, freeing their blocks. ``generate`` is the offline loop;
``AsyncEngine`` (async_engine.py) runs ``step`` in a background thread for streaming.
"""
from __future__ import annotations

import dataclasses
import gc
import os
import queue
import threading
import time
import uuid
import warnings
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
import torch.nn as nn

from ..errors import SpearError
from .config import EngineConfig
from .detokenizer import IncrementalDetokenizer
from .kv_cache import KVBlockManager
from .model_runner import ModelRunner
from .overlap import PENDING, OverlappedSteps
from .request import Request, RequestStatus, SamplingParams, TokenLogprobs
from .sampling import Sampler
from .scheduler.base import Policy, Scheduler
from .scheduler.policies import make_policy


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list
    new_token_ids: list
    output_token_ids: list
    new_text: str
    text: str
    finished: bool
    finish_reason: Optional[str]          # "stop" | "length" | "abort" | "error" | None
    first_token_time: Optional[float]
    arrival_time: Optional[float]
    finish_time: Optional[float]
    num_prompt_tokens: int
    num_output_tokens: int
    new_logprobs: list = field(default_factory=list)   # a TokenLogprobs per new token (SamplingParams.logprobs)
    output_logprobs: list = field(default_factory=list)  # ... per output token so far


@dataclass
class StepRecord:
    time: float
    num_decodes: int
    num_prefill_tokens: int
    sum_context: int
    ec_signature: Any
    predicted_s: Optional[float]
    measured_s: float
    host_s: float
    num_prefills: int = 0
    ec_enabled: bool = False
    captured_graph: bool = False   # the step ran eagerly to capture its mixed-step CUDA graph (once per shape key)
    uncaptured_mixed: bool = False  # a mixed step run without a graph (the limit reached, or its capture failed)
    prefill_context: int = 0       # tokens cached before the step's prefill chunks (what the chunks attend to besides
    #                                themselves)
    mixed_dims: Optional[tuple] = None  # a mixed step's padded sizes (buckets.MixedDims as a tuple), as it ran


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    num_steps: int
    recompiles: int
    last_predicted_s: Optional[float]
    last_measured_s: Optional[float]
    num_preemptions: int
    ec_enabled: bool
    warmup_s: float
    step_log: list = field(default_factory=list)
    prefix_cache_hit_tokens: int = 0   # prompt tokens taken from cached KV blocks instead of computed
    mixed_graphs: int = 0              # mixed-step CUDA graphs captured (one per input-shape key)
    uncaptured_mixed_steps: int = 0    # mixed steps run without a graph while serving
                                       # (limit reached, capture failed, TP)
    padded_mixed_steps: int = 0        # mixed steps replayed in a captured graph of larger shapes (mixed_graph_padding)
    captured_first_steps: int = 0      # mixed-step keys captured without an eager run first (mixed_capture_first)
    graph_capture_mib: float = 0.0     # device memory the CUDA-graph captures took (decode and mixed graphs)


def load_model(model_path: str, quant: Optional[str] = "w4-pc-rtn", ec: Optional[str] = None,
               config: Optional[EngineConfig] = None, quantize_lm_head: bool = False, device=None):
    """``(model, tokenizer, config)`` for an engine: every argument checked before loading, then the checkpoint loaded
    on ``device`` (default: ``config.device``, else CUDA when available), quantized, its ECs loaded. The returned
    config names the device; the caller's is left as it was."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    config = config or EngineConfig()
    if not isinstance(config, EngineConfig):
        raise SpearError(f"Engine: config must be an EngineConfig, got {type(config).__name__}")
    if not os.path.isdir(str(model_path)):
        raise SpearError(f"Engine.from_pretrained: model directory {model_path!r} not found")
    if ec is not None and quant is None:
        raise SpearError("Engine.from_pretrained: ec= needs quant= (the quantization the ECs were calibrated for)")
    if ec is not None and not os.path.isdir(str(ec)):
        raise SpearError(f"Engine.from_pretrained: EC directory {ec!r} not found")
    if quantize_lm_head and quant is None:
        raise SpearError("Engine.from_pretrained: quantize_lm_head needs quant=")
    from ..quant.api import DEFAULT_SKIP, as_config, quantize
    qconfig = as_config(quant) if quant is not None else None  # validates the spec before loading
    device = str(device or config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    config = dataclasses.replace(config, device=device)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=config.dtype).to(device).eval()
    if qconfig is not None:
        quantize(model, qconfig, skip=() if quantize_lm_head else DEFAULT_SKIP, progress=False)
    if ec is not None:
        from ..ec.io import load_ecs
        load_ecs(model, ec, qconfig)
    return model, AutoTokenizer.from_pretrained(model_path), config


def _ec_signature(model: nn.Module, enabled: bool):
    try:
        from .scheduler.ec_signature import ec_signature
    except ImportError:  # the SLO scheduler's module is optional
        return ()
    return ec_signature(model, enabled)


class Engine:
    def __init__(self, model: nn.Module, tokenizer, config: Optional[EngineConfig] = None,
                 model_name: Optional[str] = None, step_channel=None):
        """``step_channel``: tensor parallelism only (``tensor_parallel.start_engine`` passes it): rank 0's runner
        hands it every step's inputs, which the other ranks' runners replay."""
        config = config or EngineConfig()
        if not isinstance(config, EngineConfig):
            raise SpearError(f"Engine: config must be an EngineConfig, got {type(config).__name__}")
        if not isinstance(model, nn.Module) or not hasattr(model, "config"):
            raise SpearError(f"Engine: expected a Hugging Face causal LM, got {type(model).__name__}")
        self.config = config
        self.tokenizer = tokenizer
        self.model = model.eval()
        self.model_name = model_name or os.path.basename(
            str(getattr(model.config, "_name_or_path", "") or "model").rstrip("/")) or "model"
        dev = torch.device(config.device) if config.device else model.model.embed_tokens.weight.device
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        if model.model.embed_tokens.weight.device != dev:
            raise SpearError(f"Engine: the model is on {model.model.embed_tokens.weight.device}, "
                             f"config.device is {dev}; "
                             "move the model first")
        self.device = dev
        self.runner = ModelRunner.start(model, config, dev)  # compiled and captured here (a progress bar)
        self.max_model_len = self.runner.max_model_len
        self.blocks = KVBlockManager(self.runner.num_blocks, config.block_size, config.enable_prefix_caching)
        # an SLO policy needs this engine's step cost model, profiled once it is warm (below): until then, a budget
        slo_policy = config.policy if isinstance(config.policy, str) and config.policy.startswith("slo") else None
        self.policy = make_policy("budget-512" if slo_policy else config.policy)
        # a mixed step's chunks leave room for its decode rows padded to their bucket (at least MIN_DIM dummies)
        self.scheduler = Scheduler(self.blocks, self.policy, config.max_num_seqs, config.max_num_tokens,
                                   config.token_buckets, max_decode_rows=self.runner.decode_buckets[-1])
        self.scheduler.run_dims = self._run_dims
        self.sampler = Sampler(dev, config.seed)
        self.eos_token_ids = self._eos_ids(model, tokenizer)
        self.vocab_size = int(model.config.vocab_size)
        self.sampler.warm_up(self.vocab_size, model.model.embed_tokens.weight.dtype)
        self._ec_enabled = self.runner.net.has_ecs
        self._ec_signatures = {True: _ec_signature(model, True), False: _ec_signature(model, False)}
        self._inputs: queue.SimpleQueue = queue.SimpleQueue()
        self._live_ids: set = set()
        self._ids_lock = threading.Lock()
        self._detok: dict = {}
        self.step_log: deque = deque(maxlen=config.step_log_size)
        self.num_steps = 0
        self.num_preemptions = 0
        self.last_error: Optional[BaseException] = None
        self.runner.step_sink = step_channel  # (after warm-up: every rank warms up by itself)
        # the other ranks replay rank 0's host inputs: a token that stays on the device cannot reach them
        if config.overlap_decode and step_channel is not None:
            warnings.warn("Engine: overlap_decode is ignored under tensor parallelism (the other ranks replay host "
                          "inputs; a sampled token stays on rank 0's device)")
        self.overlap = OverlappedSteps(self) if config.overlap_decode and step_channel is None else None
        if slo_policy is not None:  # profiled on the real step function, cached on disk beside the tuning cache
            from .scheduler.profile import cost_models_for
            aware, blind = cost_models_for(self, max_points=config.profile_points, progress=config.progress)
            self.set_policy(slo_policy, cost_model=aware, blind_cost_model=blind)
        self.gc_frozen = self._freeze_gc(config.freeze_gc if config.freeze_gc is not None else dev.type == "cuda")

    def _run_dims(self, num_decodes: int, decode_tokens: int, chunks) -> Optional[tuple]:
        """``StepContext.run_dims``: a mixed step's tokens and prefill attention work at the captured graph it would
        replay padded (None: at its own dims)."""
        return self.runner.padded_step(self._ec_enabled, num_decodes, decode_tokens, chunks)

    @staticmethod
    def _freeze_gc(enabled: bool) -> Optional[dict]:
        """Start-up leaves millions of long-lived objects (Dynamo, Inductor, Triton, the tuner); a full collection
        walking them inside a step stalls it for a second or more. Collect once now and freeze what survives, as
        vLLM's engine core does: those objects are then never scanned again (still freed by reference counting)."""
        if not enabled:
            return None
        t0 = time.perf_counter()
        gc.collect()
        gc.freeze()
        return {"collect_s": time.perf_counter() - t0, "frozen": gc.get_freeze_count()}

    @classmethod
    def from_pretrained(cls, model_path: str, quant: Optional[str] = "w4-pc-rtn", ec: Optional[str] = None,
                        config: Optional[EngineConfig] = None, quantize_lm_head: bool = False) -> "Engine":
        """Load an HF Llama-family checkpoint, quantize it (``quant=None``: the unquantized baseline; the LM head too
        with ``quantize_lm_head``), load the ECs in ``ec`` (a directory written by ``save_ecs``), build the engine
        (compiling and capturing at start-up). Tensor parallelism: ``serving.tensor_parallel.start_engine``."""
        model, tokenizer, config = load_model(model_path, quant, ec, config, quantize_lm_head)
        return cls(model, tokenizer, config, model_name=os.path.basename(os.path.normpath(str(model_path))))

    @staticmethod
    def _eos_ids(model, tokenizer) -> frozenset:
        ids = set()
        for src in (getattr(tokenizer, "eos_token_id", None),
                    getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
            if isinstance(src, int):
                ids.add(src)
            elif isinstance(src, (list, tuple)):
                ids.update(int(i) for i in src)
        return frozenset(ids)

    # ---- requests -----------------------------------------------------------------------------------------------
    def tokenize(self, prompt: Union[str, list]) -> list:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise SpearError("Engine: a text prompt needs a tokenizer")
            ids = self.tokenizer(prompt).input_ids
        elif isinstance(prompt, (list, tuple)):
            ids = list(prompt)
            if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < self.vocab_size for t in ids):
                raise SpearError(f"Engine: prompt token ids must be integers in [0, {self.vocab_size})")
        else:
            raise SpearError(f"Engine: prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            raise SpearError("Engine: empty prompt")
        return ids

    def add_request(self, prompt: Union[str, list], sampling: Optional[SamplingParams] = None,
                    request_id: Optional[str] = None, ttft_slo_s: Optional[float] = None,
                    tpot_slo_s: Optional[float] = None, arrival_time: Optional[float] = None) -> str:
        """Queue a request (it joins at the next step); returns its id. Raises ``SpearError`` for a bad prompt,
        sampling or id, or a prompt that leaves no room for a token within ``max_model_len``."""
        sampling = sampling if sampling is not None else SamplingParams()
        if not isinstance(sampling, SamplingParams):
            raise SpearError(f"Engine: sampling must be a SamplingParams, got {type(sampling).__name__}")
        ids = self.tokenize(prompt)
        if len(ids) >= self.max_model_len:
            raise SpearError(f"Engine: the prompt has {len(ids)} tokens; max_model_len is {self.max_model_len} "
                             "(prompt + at least one new token)")
        for name, v in (("ttft_slo_s", ttft_slo_s), ("tpot_slo_s", tpot_slo_s)):
            if v is not None and not (isinstance(v, (int, float)) and v > 0):
                raise SpearError(f"Engine: {name}={v!r} must be a positive number of seconds or None")
        if ttft_slo_s is None and self.config.ttft_slo_ms is not None:
            ttft_slo_s = self.config.ttft_slo_ms / 1e3
        if tpot_slo_s is None and self.config.tpot_slo_ms is not None:
            tpot_slo_s = self.config.tpot_slo_ms / 1e3
        request_id = str(request_id) if request_id is not None else uuid.uuid4().hex
        with self._ids_lock:
            if request_id in self._live_ids:
                raise SpearError(f"Engine: request id {request_id!r} is already in use")
            self._live_ids.add(request_id)
        req = Request(request_id=request_id, prompt_token_ids=ids, sampling=sampling,
                      arrival_time=arrival_time if arrival_time is not None else self.scheduler.clock(),
                      ttft_slo_s=ttft_slo_s, tpot_slo_s=tpot_slo_s)
        self._inputs.put(("add", req))
        return request_id

    def abort_request(self, request_id: str) -> None:
        """Abort (at the next step) and free everything the request holds; unknown / finished ids are ignored."""
        self._inputs.put(("abort", str(request_id)))

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or not self._inputs.empty() or \
            (self.overlap is not None and self.overlap.in_flight)

    def set_policy(self, policy: Union[Policy, str], **kwargs) -> None:
        self.policy = make_policy(policy, **kwargs)
        self.scheduler.policy = self.policy

    def set_ec_enabled(self, enabled: bool) -> None:
        """Serve with or without the ECs from the next step on (each state has its own compiled graphs: switching
        them off needs ``EngineConfig(ec_switch=True)``)."""
        if enabled and not self.runner.net.has_ecs:
            raise SpearError("Engine.set_ec_enabled(True): the model has no ECs")
        if not enabled and False not in self.runner.ec_states():
            raise SpearError("Engine.set_ec_enabled(False): this engine compiled its steps with ECs only; start it "
                             "with EngineConfig(ec_switch=True) to switch them off while serving")
        if bool(enabled) != self._ec_enabled:
            self.blocks.reset_prefix_cache()   # cached KV was computed by the other model
        self._ec_enabled = bool(enabled)

    def load_ecs(self, ec_dir, quant=None) -> None:
        """Serve another calibration's ECs from the next step on: the same modules, ranks and gates as the model's
        (checked here, before anything changes, as ``load_ecs`` checks a directory; another set is refused, since
        it needs other compiled graphs and another step-cost profile). The new weights are copied into the EC
        parameters in place between steps, so the captured graphs read them. Not under tensor parallelism."""
        if self.runner.step_sink is not None or getattr(self.model, "_spear_tp", None) is not None:
            raise SpearError("Engine.load_ecs: not supported under tensor parallelism (the ECs are sharded)")
        if not self.runner.net.has_ecs:
            raise SpearError("Engine.load_ecs: the model has no ECs to swap")
        from ..ec.io import read_ecs_for_swap
        self._inputs.put(("ecs", read_ecs_for_swap(self.model, ec_dir, quant)))

    @property
    def ec_enabled(self) -> bool:
        return self._ec_enabled

    @property
    def ec_signature(self):
        return self._ec_signatures[self._ec_enabled]

    # ---- one step -----------------------------------------------------------------------------------------------
    def _drain_inputs(self, outputs: list) -> None:
        while True:
            try:
                kind, item = self._inputs.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                self.scheduler.add(item)
                if self.config.detokenize or item.sampling.stop:
                    self._detok[item.request_id] = IncrementalDetokenizer(self.tokenizer, item.prompt_token_ids,
                                                                          item.sampling.stop)
            elif kind == "ecs":   # in stream order: after any step in flight, before the next one
                modules = dict(self.model.named_modules())
                with torch.no_grad():
                    for name, params in item.items():
                        for pname, t in params.items():
                            getattr(modules[name], pname).copy_(t)
                self.blocks.reset_prefix_cache()
            else:
                req = self.scheduler.abort(item)
                if req is not None:
                    outputs.append(self._finished(req, RequestStatus.FINISHED_ABORTED))

    def _finished(self, req: Request, status: RequestStatus) -> RequestOutput:
        while req.output_token_ids and req.output_token_ids[-1] == PENDING:  # a launched step's token, now unwanted
            req.output_token_ids.pop()
        if not req.is_finished:
            self.scheduler.finish(req, status)
        self.sampler.release(req.request_id)
        detok = self._detok.pop(req.request_id, None)
        with self._ids_lock:
            self._live_ids.discard(req.request_id)
        return self._output(req, [], "", detok)

    def _output(self, req: Request, new_ids: list, new_text: str, detok, new_logprobs=()) -> RequestOutput:
        ids = req.output_token_ids
        if ids and ids[-1] == PENDING:  # the step in flight's token is not known yet
            ids = ids[:-1]
        return RequestOutput(
            request_id=req.request_id, prompt_token_ids=req.prompt_token_ids, new_token_ids=new_ids,
            output_token_ids=list(ids), new_text=new_text, text=detok.text if detok else "",
            finished=req.is_finished, finish_reason=req.status.finish_reason, first_token_time=req.first_token_time,
            arrival_time=req.arrival_time, finish_time=req.finish_time, num_prompt_tokens=req.num_prompt_tokens,
            num_output_tokens=len(ids), new_logprobs=list(new_logprobs), output_logprobs=list(req.output_logprobs))

    def step(self) -> list:
        """One scheduler step; returns a RequestOutput for each request that got a token or finished. With
        ``config.overlap_decode`` a decode-only step may return the previous step's tokens instead (``overlap.py``)."""
        outputs: list = []
        self._drain_inputs(outputs)
        if self.overlap is not None:
            if self.overlap.eligible():
                return outputs + self.overlap.step()
            outputs += self.overlap.drain()   # back to one step at a time: the step in flight's tokens first
        t0 = time.perf_counter()
        ec = self._ec_enabled
        plan = self.scheduler.schedule(self.ec_signature)
        self.num_preemptions += len(plan.preempted)
        if plan.is_empty:
            return outputs
        sum_context = sum(r.num_computed_tokens + 1 for r in plan.decodes)
        prefill_context = sum(r.num_computed_tokens for r, _ in plan.prefills)
        sampled = list(plan.decodes) + [r for r, n in plan.prefills if r.num_computed_tokens + n == r.num_tokens]
        sink = self.runner.step_sink
        sent = sink.steps_sent if sink is not None else 0
        first_steps, uncaptured = self.runner.mixed.first_steps, self.runner.mixed.uncaptured
        try:
            logits, rows = self.runner.execute(plan.decodes, plan.prefills, ec)
            t_host = time.perf_counter() - t0
            tokens = self.sampler.sample(logits[:rows], sampled)
            logprobs = self.sampler.logprobs(logits[:rows], sampled, tokens)
        except Exception as e:  # noqa: BLE001  (the requests of this step fail; the engine keeps serving the rest)
            if sink is not None and sink.steps_sent != sent:
                sink.fail(e)   # tensor parallelism, after the broadcast: the other ranks ran this step (exits)
            return outputs + self._fail_step(plan, e)
        measured = time.perf_counter() - t0
        now = self.scheduler.clock()
        for req in plan.decodes:
            req.num_computed_tokens += 1
        for req, n in plan.prefills:
            req.num_computed_tokens += n
        for req, tok, lp in zip(sampled, tokens, logprobs):
            outputs.append(self._append_token(req, tok, now, logprobs=lp))
        captured = self.runner.mixed.first_steps != first_steps
        self.policy.observe(plan, measured, captured=captured)
        self.num_steps += 1
        self.step_log.append(StepRecord(time=now, num_decodes=len(plan.decodes),
                                        num_prefill_tokens=plan.num_prefill_tokens,
                                        sum_context=sum_context, ec_signature=self.ec_signature,
                                        predicted_s=plan.predicted_s, measured_s=measured, host_s=t_host,
                                        num_prefills=len(plan.prefills), ec_enabled=ec, captured_graph=captured,
                                        uncaptured_mixed=self.runner.mixed.uncaptured != uncaptured,
                                        prefill_context=prefill_context,
                                        mixed_dims=self.runner.last_mixed_dims if plan.prefills else None))
        return outputs

    def _fail_step(self, plan, error: Exception) -> list:
        """A step raised: its requests finish with 'error' (their blocks freed), the engine serves the rest."""
        self.last_error = error
        warnings.warn(f"serving engine: step failed ({type(error).__name__}: {error}); "
                      "its requests finish with 'error'")
        return [self._finished(req, RequestStatus.FINISHED_ERROR)
                for req in list(plan.decodes) + [r for r, _ in plan.prefills] if not req.is_finished]

    def _append_token(self, req: Request, tok: int, now: float, index: Optional[int] = None,
                      logprobs: Optional[TokenLogprobs] = None) -> RequestOutput:
        """Give ``req`` its next token (at ``index`` of its outputs: a launched step's placeholder; ``logprobs`` if it
        asked for them), then finish it on EOS, a stop token or string, max_tokens or max_model_len."""
        if logprobs is not None:
            req.output_logprobs.append(logprobs)
        if index is None:
            req.output_token_ids.append(tok)
            count = len(req.output_token_ids)
        else:
            req.output_token_ids[index] = tok
            count = index + 1
        if req.first_token_time is None:
            req.first_token_time = now
        req.last_token_time = now
        sp = req.sampling
        detok = self._detok.get(req.request_id)
        status = None
        new_text = ""
        if (tok in self.eos_token_ids and not sp.ignore_eos) or tok in sp.stop_token_ids:
            status = RequestStatus.FINISHED_STOPPED
        elif detok is not None:
            new_text, stopped = detok.add(tok)
            if stopped:
                status = RequestStatus.FINISHED_STOPPED
        if status is None and (count >= sp.max_tokens or req.num_prompt_tokens + count >= self.max_model_len):
            status = RequestStatus.FINISHED_LENGTH
        new_lp = [logprobs] if logprobs is not None else []
        if status is None:
            return self._output(req, [tok], new_text, detok, new_lp)
        out = self._finished(req, status)
        out.new_token_ids, out.new_text, out.new_logprobs = [tok], new_text, new_lp
        return out

    # ---- offline ------------------------------------------------------------------------------------------------
    def generate(self, prompts: list, sampling: Union[SamplingParams, list, None] = None) -> list:
        """Run ``prompts`` to completion (continuous batching); returns each one's final RequestOutput, in order."""
        if isinstance(prompts, (str,)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if isinstance(sampling, list):
            if len(sampling) != len(prompts):
                raise SpearError(f"Engine.generate: {len(sampling)} SamplingParams for {len(prompts)} prompts")
            samplings = sampling
        else:
            samplings = [sampling if sampling is not None else SamplingParams()] * len(prompts)
        ids = [self.add_request(p, s) for p, s in zip(prompts, samplings)]
        final: dict = {}
        pending = set(ids)
        while pending:
            if not self.has_unfinished():
                raise SpearError("Engine.generate: requests left unfinished with nothing scheduled")  # pragma: no cover
            for out in self.step():
                if out.finished and out.request_id in pending:
                    final[out.request_id] = out
                    pending.discard(out.request_id)
        return [final[i] for i in ids]

    def close(self) -> None:
        """Release the other tensor-parallel ranks (they leave their step loop; a later step fails its requests
        instead of running a forward they would not join); a no-op otherwise. Idempotent."""
        if self.runner.step_sink is not None:
            self.runner.step_sink.stop()

    def stats(self) -> EngineStats:
        last = self.step_log[-1] if self.step_log else None
        return EngineStats(num_running=self.scheduler.num_running, num_waiting=self.scheduler.num_waiting,
                           kv_blocks_used=self.blocks.num_used_blocks, kv_blocks_total=self.blocks.num_usable_blocks,
                           num_steps=self.num_steps, recompiles=self.runner.recompiles,
                           last_predicted_s=last.predicted_s if last else None,
                           last_measured_s=last.measured_s if last else None,
                           num_preemptions=self.num_preemptions, ec_enabled=self._ec_enabled,
                           warmup_s=self.runner.warmup_s, step_log=list(self.step_log),
                           prefix_cache_hit_tokens=self.blocks.num_cached_tokens,
                           mixed_graphs=len(self.runner.mixed.graphs),
                           uncaptured_mixed_steps=self.runner.mixed.uncaptured,
                           padded_mixed_steps=self.runner.mixed.padded_replays,
                           captured_first_steps=self.runner.mixed.captured_first,
                           graph_capture_mib=round(self.runner.capture.capture_bytes / 2 ** 20, 1))
