"""Per-request sampling over a step's logits: greedy rows in one argmax, the others one by one with their own
temperature / top-k / top-p and ``torch.Generator`` (a seeded request draws from its own generator, so its tokens
do not depend on what else is in the batch)."""
from __future__ import annotations

from typing import Optional

import torch

from .request import Request, SamplingParams, TokenLogprobs


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0):
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)   # requests without a seed
        self._generators: dict = {}

    def _generator_for(self, req: Request) -> torch.Generator:
        if req.sampling.seed is None:
            return self.generator
        g = self._generators.get(req.request_id)
        if g is None:
            g = self._generators[req.request_id] = torch.Generator(device=self.device).manual_seed(req.sampling.seed)
        return g

    def release(self, request_id: str) -> None:
        self._generators.pop(request_id, None)

    @torch.no_grad()
    def warm_up(self, vocab_size: int, dtype: torch.dtype) -> None:
        """Run every sampling path once on dummy logits (penalties, top-k / top-p draws, log-probabilities), so that
        the first request that asks for one does not pay the one-off costs of its first kernels (on CUDA, lazily
        loaded modules: tens of ms, with the step's CUDA events around them)."""
        sp = SamplingParams(max_tokens=2, temperature=0.7, top_k=8, top_p=0.9, seed=0, logprobs=2,
                            presence_penalty=0.1, frequency_penalty=0.1, repetition_penalty=1.1)
        reqs = [Request(f"warm-up-{i}", [1, 2], sp if i else SamplingParams(temperature=0.0), 0.0,
                        output_token_ids=[3]) for i in range(2)]
        logits = torch.zeros(len(reqs), vocab_size, dtype=dtype, device=self.device)
        tokens = self.sample(logits, reqs)
        self.logprobs(logits, reqs, tokens)
        self.release(reqs[1].request_id)

    @torch.no_grad()
    def sample(self, logits: torch.Tensor, reqs: list) -> list:
        """One token per row of ``logits`` [len(reqs), vocab] for the request of that row."""
        if not reqs:
            return []
        out = logits.argmax(dim=-1).tolist()
        for i, req in enumerate(reqs):
            sp = req.sampling
            greedy, pen = sp.temperature == 0.0, sp.penalized
            if greedy and not pen:
                continue  # the argmax above (no per-row tensor: this loop runs for every request every step)
            row = penalized(logits[i], req) if pen else logits[i]
            out[i] = int(row.argmax()) if greedy else sample_row(row, sp.temperature, sp.top_k, sp.top_p,
                                                                 self._generator_for(req))
        return out

    @torch.no_grad()
    def logprobs(self, logits: torch.Tensor, reqs: list, tokens: list) -> list:
        """A ``TokenLogprobs`` per row whose request asked for them (``sampling.logprobs``), else None: the raw
        logits' log-softmax at the sampled token and the request's top k. One device round trip for the step."""
        rows = [i for i, r in enumerate(reqs) if r.sampling.logprobs is not None]
        out: list = [None] * len(reqs)
        if not rows:
            return out
        index = torch.tensor(rows, device=logits.device)
        lp = torch.log_softmax(logits.index_select(0, index).float(), dim=-1)
        chosen = lp.gather(1, torch.tensor([tokens[i] for i in rows], device=logits.device)[:, None])[:, 0]
        k = max(reqs[i].sampling.logprobs for i in rows)
        top_v, top_i = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
        chosen, top_v, top_i = chosen.tolist(), top_v.tolist(), top_i.tolist()
        for j, i in enumerate(rows):
            n = reqs[i].sampling.logprobs
            out[i] = TokenLogprobs(tokens[i], chosen[j], tuple(zip(top_i[j][:n], top_v[j][:n])))
        return out


def penalized(logits: torch.Tensor, req: Request) -> torch.Tensor:
    """``logits`` (one row) with ``req``'s penalties, as vLLM applies them: repetition (HF's
    ``RepetitionPenaltyLogitsProcessor``) over the prompt and output tokens, then frequency and presence (OpenAI's)
    over the output tokens."""
    sp = req.sampling
    row = logits.float().clone()
    if sp.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(req.prompt_token_ids) | set(req.output_token_ids)), device=row.device)
        picked = row[seen]
        row[seen] = torch.where(picked > 0, picked / sp.repetition_penalty, picked * sp.repetition_penalty)
    if (sp.frequency_penalty or sp.presence_penalty) and req.output_token_ids:
        counts = torch.bincount(torch.tensor(req.output_token_ids, device=row.device), minlength=row.shape[-1])
        row -= sp.frequency_penalty * counts[:row.shape[-1]] + sp.presence_penalty * (counts[:row.shape[-1]] > 0)
    return row


def sample_row(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
               generator: Optional[torch.Generator]) -> int:
    scores = logits.float() / temperature
    vocab = scores.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(scores, top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        probs = torch.softmax(sorted_scores, dim=-1)
        drop = probs.cumsum(-1) - probs > top_p          # keep the smallest prefix whose mass reaches top_p
        sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
        scores = torch.full_like(scores, float("-inf")).scatter(0, order, sorted_scores)
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator).item())
