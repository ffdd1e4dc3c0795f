#!/usr/bin/env bash
# Smoke test of `spear-compile serve` on a GPU: start the server on 127.0.0.1 in the background (bundled
# spear-ref-16m, W4), send streaming and non-streaming completions and chat requests with curl, one bad request,
# check /metrics, replay a short trace through bench/serving_http.py, stop the server. Under 3 minutes (start-up compiles and captures the graphs).
#   usage (repository root, CUDA machine):  bash bench/serve_smoke.sh
#   on the lent H200, whose Python lacks the server's packages (wheels: .whl, from bench/device_wheels.sh; one
#   directory only: the same wheel twice stops the install):
#     WHEEL_DIRS=.whl OUT=$OUT bash bench/serve_smoke.sh
#   env: PYTHON (default python3), PORT (default 8123), DEVICE (default cuda), QUANT (default w4-pc-rtn),
#        OUT (log directory, default /tmp), START_TIMEOUT_S (default 170), WHEEL_DIRS (directories of wheels to
#        install first, --no-deps, into /tmp/serve_site, prepended to PYTHONPATH)
set -uo pipefail
PY=${PYTHON:-python3}
PORT=${PORT:-8123}
DEVICE=${DEVICE:-cuda}
QUANT=${QUANT:-w4-pc-rtn}
OUT=${OUT:-/tmp}
START_TIMEOUT_S=${START_TIMEOUT_S:-170}
BASE=http://127.0.0.1:$PORT
LOG=$OUT/serve_smoke_server.log
SCRATCH=$(mktemp -d)   # per-check bodies: $OUT keeps the log, /metrics and serving_http.json (a device call returns 8 files)
MODEL=spear-ref-16m
mkdir -p "$OUT"
command -v curl >/dev/null || { echo "serve_smoke: curl is not installed here"; exit 1; }

if [ -n "${WHEEL_DIRS:-}" ]; then
  wheels=()
  for d in $WHEEL_DIRS; do wheels+=("$d"/*.whl); done
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/serve_site \
      "${wheels[@]}" || { echo "serve_smoke: installing the wheels failed"; exit 1; }
  export PYTHONPATH=/tmp/serve_site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}   # this checkout's spear_compile

if ! $PY -c "import fastapi, uvicorn, prometheus_client, h11, click, anyio" 2>/dev/null; then
  echo "serve_smoke: missing a server dependency: $($PY -c 'import fastapi, uvicorn, prometheus_client, h11, click, anyio' 2>&1 | tail -1)"
  exit 1
fi

t0=$(date +%s)
$PY -m spear_compile.cli serve --device "$DEVICE" --quant "$QUANT" --host 127.0.0.1 --port "$PORT" \
    --max-batch 8 --max-num-tokens 256 --log-level warning >"$LOG" 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null; wait $PID 2>/dev/null' EXIT

up=0
for _ in $(seq 1 $((START_TIMEOUT_S * 2))); do
  if curl -sf "$BASE/health" >/dev/null; then up=1; break; fi
  if ! kill -0 $PID 2>/dev/null; then break; fi
  sleep 0.5
done
t_start=$(( $(date +%s) - t0 ))
if [ $up -ne 1 ]; then
  echo "serve_smoke: the server did not come up in ${START_TIMEOUT_S}s; its log:"; tail -40 "$LOG"; exit 1
fi

declare -a RESULTS
fails=0
check() {  # name, command (exit 0 = pass)
  local name=$1; shift
  local t=$(date +%s%N)
  if out=$("$@" 2>&1); then RESULTS+=("PASS  $name  $(( ($(date +%s%N) - t) / 1000000 ))ms  ${out:0:100}")
  else RESULTS+=("FAIL  $name  ${out:0:300}"); fails=$((fails + 1)); fi
}

completion() {
  curl -sf "$BASE/v1/completions" -H 'Content-Type: application/json' \
    -d "{\"model\": \"$MODEL\", \"prompt\": \"The history of the city\", \"max_tokens\": 32, \"temperature\": 0}" |
  $PY -c 'import json,sys; r=json.load(sys.stdin); c=r["choices"][0]; assert r["usage"]["completion_tokens"]>0 and c["finish_reason"] in ("length","stop"), r; print(repr(c["text"][:60]))'
}
completion_stream() {
  curl -sfN "$BASE/v1/completions" -H 'Content-Type: application/json' \
    -d "{\"model\": \"$MODEL\", \"prompt\": \"Once upon a time\", \"max_tokens\": 32, \"stream\": true, \"stream_options\": {\"include_usage\": true}}" |
  $PY -c '
import json, sys
lines = [l.strip() for l in sys.stdin if l.strip()]
assert lines[-1] == "data: [DONE]", lines[-3:]
chunks = [json.loads(l[6:]) for l in lines[:-1]]
assert chunks[-1]["usage"]["completion_tokens"] > 0 and chunks[-1]["choices"] == [], chunks[-1]
print(len(chunks), "chunks", repr("".join(c["choices"][0]["text"] for c in chunks[:-1])[:60]))'
}
chat() {
  curl -sf "$BASE/v1/chat/completions" -H 'Content-Type: application/json' \
    -d "{\"model\": \"$MODEL\", \"messages\": [{\"role\": \"user\", \"content\": \"Tell me about rivers.\"}], \"max_tokens\": 24}" |
  $PY -c 'import json,sys; r=json.load(sys.stdin); m=r["choices"][0]["message"]; assert m["role"]=="assistant", r; print(repr(m["content"][:60]))'
}
chat_stream() {
  curl -sfN "$BASE/v1/chat/completions" -H 'Content-Type: application/json' \
    -d "{\"model\": \"$MODEL\", \"messages\": [{\"role\": \"user\", \"content\": \"Hello\"}], \"max_tokens\": 24, \"stream\": true}" |
  $PY -c '
import json, sys
lines = [l.strip() for l in sys.stdin if l.strip()]
assert lines[-1] == "data: [DONE]", lines[-3:]
chunks = [json.loads(l[6:]) for l in lines[:-1]]
assert chunks[0]["choices"][0]["delta"]["role"] == "assistant" and chunks[-1]["choices"][0]["finish_reason"]
print(len(chunks), "chunks")'
}
concurrent() {  # 8 streaming requests at once; all end with [DONE]
  local pids=() i
  for i in $(seq 1 8); do
    curl -sfN "$BASE/v1/completions" -H 'Content-Type: application/json' \
      -d "{\"model\": \"$MODEL\", \"prompt\": \"Request $i says\", \"max_tokens\": 48, \"stream\": true}" \
      >"$SCRATCH/c$i.txt" & pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p" || return 1; done
  for i in $(seq 1 8); do tail -2 "$SCRATCH/c$i.txt" | grep -q '^data: \[DONE\]' || return 1; done
  echo "8/8 streams ended with [DONE]"
}
bad_request() {
  local code
  code=$(curl -s -o "$SCRATCH/bad.json" -w '%{http_code}' "$BASE/v1/completions" \
    -H 'Content-Type: application/json' -d '{"prompt": "x", "max_tokens": -5}')
  [ "$code" = 400 ] && $PY -c 'import json,sys; e=json.load(open(sys.argv[1]))["error"]; assert e["param"]=="max_tokens", e; print(e["code"])' "$SCRATCH/bad.json"
}
metrics() {
  curl -sf "$BASE/metrics" >"$OUT/serve_smoke_metrics.txt" &&
  $PY -c '
import sys
from prometheus_client.parser import text_string_to_metric_families
fams = {f.name: f for f in text_string_to_metric_families(open(sys.argv[1]).read())}
need = ["spear_time_to_first_token_seconds", "spear_inter_token_latency_seconds", "spear_kv_cache_blocks_used",
        "spear_num_requests_running", "spear_recompiles"]
missing = [n for n in need if n not in fams]
assert not missing, missing
v = lambda n, suffix="": next(s.value for s in fams[n].samples if s.name == n + suffix)
assert v("spear_time_to_first_token_seconds", "_count") >= 12, "TTFT count"
assert v("spear_kv_cache_blocks_used") == 0, "blocks still held after every request finished"
assert v("spear_recompiles", "_total") == 0, "the engine recompiled while serving"
print("ttft_count", v("spear_time_to_first_token_seconds", "_count"), "recompiles", v("spear_recompiles", "_total"))' "$OUT/serve_smoke_metrics.txt"
}
http_bench() {  # a 5 s Poisson trace at 8 req/s through bench/serving_http.py: every request completes
  $PY -m bench.serving_http --url "$BASE" --rate 8 --duration 5 --max-prompt 256 --max-output 64 --prompt-median 64 \
      --output-median 32 --vocab 8000 --ttft-slo-ms 1000 --tpot-slo-ms 100 --json "$OUT/serving_http.json" &&
  $PY -c 'import json,sys; m=json.load(open(sys.argv[1])); assert m["completed"]==m["num_requests"]>0 and not m["failed"], m; print(m["completed"], "requests, TTFT p99", m["ttft_ms_p99"], "ms, TPOT p99", m["tpot_ms_p99"], "ms")' "$OUT/serving_http.json"
}

check completion completion
check completion_stream completion_stream
check chat chat
check chat_stream chat_stream
check concurrent_8_streams concurrent
check bad_request_400 bad_request
sleep 0.5
check metrics metrics
check http_bench http_bench

echo "server log: $LOG (last lines)"; tail -5 "$LOG"
echo
echo "spear-compile serve smoke ($DEVICE, $QUANT): start-up ${t_start}s, total $(( $(date +%s) - t0 ))s"
printf '%s\n' "${RESULTS[@]}"
[ $fails -eq 0 ] && echo "ALL PASS" || { echo "$fails FAILED"; exit 1; }
