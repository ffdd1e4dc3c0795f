# Here, after a device call: keep what it sent back for the next call (bench/GPU_RUNS.md).
#   bash bench/device_ingest.sh <files_at>
set -e
mkdir -p bench/tune_cache .compile_cache
cp "$1"/tune-*.json "$1"/stepcost-*.json bench/tune_cache/ 2>/dev/null || true   # tracked: commit them
if [ -f "$1/compile_cache.tgz" ]; then cp "$1/compile_cache.tgz" .compile_cache/cache.tgz; fi
ls -la bench/tune_cache .compile_cache
