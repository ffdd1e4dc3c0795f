# Here, after a device call: keep what it sent back for the next call (bench/GPU_RUNS.md).
#   bash bench/device_ingest.sh <files_at> [results dir]
# device_save.sh bundles a call's other files into results.tar when they would pass the 8-file limit: unpacked
# into the results dir (default: <files_at>.results, beside the read-only files_at).
set -e
mkdir -p bench/tune_cache .compile_cache
for f in "$1"/tune-*.json "$1"/stepcost-*.json; do [ -f "$f" ] && install -m 644 "$f" bench/tune_cache/; done   # tracked: commit them
if [ -f "$1/compile_cache.txz" ]; then rm -f .compile_cache/cache.tgz; install -m 644 "$1/compile_cache.txz" .compile_cache/cache.txz; fi
if [ -f "$1/results.tar" ]; then
    out="${2:-${1%/}.results}"
    mkdir -p "$out" && tar -xf "$1/results.tar" -C "$out" && echo "results unpacked: $out" && ls -la "$out"
fi
ls -la bench/tune_cache .compile_cache
