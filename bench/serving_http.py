"""The serving benchmark against an HTTP server: the same seeded traces and metrics as ``bench/serving.py``, sent
to any OpenAI-compatible ``/v1/completions`` (``spear-compile serve``, or vLLM / SGLang for a side-by-side).

Each request of the trace (Poisson or gamma arrivals, ShareGPT-like lognormal lengths: ``serving.make_trace``) is
sent at its arrival time as a streaming completion of token ids (``temperature 0``, ``ignore_eos``, ``max_tokens`` its
output length) with ``logprobs: 0``, so each chunk says how many tokens it carries: a token's time is its chunk's
arrival at the client. The metrics are ``serving.metrics``'s (TTFT, TPOT, ITL, E2EL, goodput, SLO attainment),
measured where a user sees them: network, HTTP, SSE framing and detokenization included. Requests that fail (HTTP
error, a stream error event, fewer tokens than asked) are counted and listed, never silently dropped.

    spear-compile serve --model PATH --quant w4-pc-rtn --device cuda &
    python -m bench.serving_http --url http://127.0.0.1:8000 --rate 8 --duration 30 --json out.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

from bench.serving import add_length_args, make_trace, metrics


async def _one(client, url, model, ids, max_tokens, t_send, record, errors, rid):
    body = {"model": model, "prompt": ids, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "logprobs": 0}
    delay = t_send - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                errors.append((rid, f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"))
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    errors.append((rid, f"stream error: {chunk['error'].get('message')}"))
                    return
                now = time.perf_counter()
                for choice in chunk.get("choices", []):
                    lp = choice.get("logprobs")
                    n = len(lp["tokens"]) if lp else (1 if choice.get("text") else 0)
                    record.extend([now] * n)
    except Exception as e:  # noqa: BLE001  (a refused connection, a timeout: the request failed, the run goes on)
        errors.append((rid, f"{type(e).__name__}: {e}"))


async def run_http(url: str, model: str, trace: list, ttft_slo_s: float, tpot_slo_s: float, timeout_s: float = 600.0):
    """Send ``trace`` (``(arrival_s, prompt_ids, output_len)``) to the server at ``url``; return ``serving.metrics``
    plus ``failed`` (request id, why) and the count of requests that got fewer tokens than asked."""
    import httpx
    times, meta, errors = {}, {}, []
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        t0 = time.perf_counter()
        tasks = []
        for i, (arr, ids, out_len) in enumerate(trace):
            rid = f"http-{i}"
            times[rid], meta[rid] = [], (t0 + arr, len(ids), out_len)
            tasks.append(_one(client, url, model, ids, out_len, t0 + arr, times[rid], errors, rid))
        await asyncio.gather(*tasks)
    m = metrics(times, meta, ttft_slo_s, tpot_slo_s, t0)
    short = [rid for rid in times if len(times[rid]) != meta[rid][2] and rid not in dict(errors)]
    m.update(failed=errors, short_requests=short)
    return m


def served_model(url: str) -> str:
    """The first model ``GET /v1/models`` lists (the server's name for what it serves)."""
    import httpx
    r = httpx.get(url + "/v1/models", timeout=30)
    r.raise_for_status()
    return r.json()["data"][0]["id"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", required=True, help="the server's base URL, e.g. http://127.0.0.1:8000")
    ap.add_argument("--model", default=None, help="the model name to send (default: the first of /v1/models)")
    ap.add_argument("--rate", type=float, default=4.0, help="requests per second")
    ap.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the inter-arrival times (1: Poisson)")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds of arrivals")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab", type=int, default=32000, help="prompt token ids are drawn below this")
    add_length_args(ap)
    ap.add_argument("--ttft-slo-ms", type=float, default=1000.0)
    ap.add_argument("--tpot-slo-ms", type=float, default=100.0)
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds a request may take")
    ap.add_argument("--json", default=None, help="write the metrics here")
    args = ap.parse_args(argv)
    url = args.url.rstrip("/")
    try:
        model = args.model or served_model(url)
    except Exception as e:  # noqa: BLE001
        sys.exit(f"serving_http: cannot reach {url}/v1/models ({type(e).__name__}: {e})")
    trace = make_trace(args.rate, args.duration, args.seed, args.max_prompt, args.max_output, args.vocab,
                       args.burstiness, args.prompt_median, output_median=args.output_median)
    m = asyncio.run(run_http(url, model, trace, args.ttft_slo_ms / 1e3, args.tpot_slo_ms / 1e3, args.timeout))
    m.pop("_ttft"), m.pop("_itl")
    m.update(url=url, model=model, rate=args.rate, burstiness=args.burstiness, seed=args.seed,
             ttft_slo_ms=args.ttft_slo_ms, tpot_slo_ms=args.tpot_slo_ms)
    print(f"{m['completed']}/{m['num_requests']} completed ({len(m['failed'])} failed), TTFT p50/p99 "
          f"{m['ttft_ms_p50']}/{m['ttft_ms_p99']} ms, TPOT p50/p99 {m['tpot_ms_p50']}/{m['tpot_ms_p99']} ms, ITL p99 "
          f"{m['itl_ms_p99']} ms, goodput {m['goodput_rps']:.2f} req/s, {m['output_tok_s']:.0f} output tok/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(m, f, indent=1, default=str)
    return m


if __name__ == "__main__":
    main()
