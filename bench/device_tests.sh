#!/usr/bin/env bash
# The whole pytest suite against the GPU machine's own versions (torch 2.11+cu130, Triton 3.6,
# transformers 5.17, Python 3.12), from the repo root there:
#   bash bench/device_tests.sh            (carry ".whl"; prints the versions, then pytest's summary last)
# The machine lacks torchao/depyf/fastapi/uvicorn/pydantic: the carried wheels in .whl/ are installed
# into $SITE (no index, no deps). Test files whose imports are still missing there are listed first.
set -uo pipefail
cd "$(dirname "$0")/.."
SITE="${SITE:-/tmp/site}"
LIMIT="${LIMIT:-545}"   # seconds for pytest (+15 s to stop): one device call is at most 600 s
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
fi
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 SPEAR_TUNE_CACHE=0
python3 - <<'PY'
import importlib, sys
import torch, triton, transformers
print(f"device_tests: python {sys.version.split()[0]}, torch {torch.__version__} (cuda {torch.version.cuda}), "
      f"triton {triton.__version__}, transformers {transformers.__version__}, "
      f"gpu {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
missing = []
for mod in ("pytest", "hypothesis", "torchao", "depyf", "safetensors", "matplotlib", "fastapi", "uvicorn",
            "httpx", "openai", "prometheus_client"):
    try:
        importlib.import_module(mod)
    except ImportError:
        missing.append(mod)
print("device_tests: modules missing here:", ", ".join(missing) or "none")
PY
OUT_DIR="${OUT:-/tmp}"
timeout -s INT -k 15 "$LIMIT" python3 -m pytest -q -p no:cacheprovider tests -rfE --durations=10 \
  --junitxml="$OUT_DIR/device_tests.xml" 2>&1 | tee "$OUT_DIR/device_tests.log" | tail -60
status=${PIPESTATUS[0]}
[ "$status" = 124 ] && echo "device_tests: pytest ran past ${LIMIT}s and was stopped (SIGINT: its summary above)"
exit "$status"
