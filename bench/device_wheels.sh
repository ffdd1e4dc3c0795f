#!/usr/bin/env bash
# Wheels the lent GPU machine lacks (its Python 3.12 image has torch 2.11, Triton 3.6, transformers 5.17 but no
# torchao, depyf, FastAPI/uvicorn/pydantic, httpx (bench/serving_http.py) and some of their needs), downloaded here
# into .whl/ (git-ignored) so a
# device call can carry them: run(carry=[".whl"], command="python3 -m pip install -q --no-index --no-deps
# --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=$PWD:/tmp/site && ...").
set -euo pipefail
cd "$(dirname "$0")/.."
# into a fresh folder, then swapped in: a re-run after a new release must not leave two versions of one wheel
# (the device call's `pip install .whl/*.whl` would refuse both)
rm -rf .whl.new
mkdir -p .whl.new
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl.new \
  torchao==0.18.0 depyf astor dill fastapi starlette uvicorn sse-starlette pydantic pydantic-core \
  typing-inspection annotated-types annotated-doc anyio sniffio idna h11 click opentelemetry-api \
  prometheus-client typing-extensions httpx httpcore certifi
rm -rf .whl
mv .whl.new .whl
ls .whl
