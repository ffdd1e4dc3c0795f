# Here, after a device call: keep what it sent back for the next call (bench/GPU_RUNS.md).
#   bash bench/device_ingest.sh <files_at>
set -e
mkdir -p .tune_cache .compile_cache
cp "$1"/tune-*.json "$1"/stepcost-*.json .tune_cache/ 2>/dev/null || true
if [ -f "$1/compile_cache.tgz" ]; then cp "$1/compile_cache.tgz" .compile_cache/cache.tgz; fi
ls -la .tune_cache .compile_cache
