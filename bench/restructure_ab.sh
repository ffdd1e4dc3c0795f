#!/usr/bin/env bash
# Restructure A/B on the GPU machine, from the repository root (the new tree), the old tree at bench/scratch/old:
#   mkdir -p bench/scratch/old && git archive e44cd3e | tar -x -C bench/scratch/old --exclude spear_compile/assets
#   (on the lead's machine; the old assets would push the call past the 64 MiB that travels)
#   run: bash bench/restructure_ab.sh        carry=["bench/scratch/old", ".whl"]         (< 540 s)
set -u
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
python3 -m bench.restructure_ab --out "${OUT:-ab_out}" --budget "${AB_BUDGET:-470}" "$@"
