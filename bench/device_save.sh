# Run at the end of every device call (bench/GPU_RUNS.md): the tuning cache and the compile caches back into $OUT
# (a returned file may hold 16 MiB: the Triton cache is left out when both do not fit, then the Inductor one too).
# a call returns at most 8 files: drop a finished run's checkpoint (bench.serving's .partial) to make room
for f in "$OUT"/*.partial; do [ -f "$f" ] && [ -f "${f%.partial}" ] && rm -f "$f"; done
# the tuning / step-cost files that differ from the tree's (tuned by this call or an earlier one on this machine)
for f in "${SPEAR_TUNE_CACHE:-/nonexistent}"/*.json; do
    [ -f "$f" ] && ! cmp -s "$f" "bench/tune_cache/${f##*/}" && cp "$f" "$OUT"/
done
# still more than 8 files: everything but the caches goes into one results.tar (device_ingest.sh unpacks it), so the
# limit never drops a tuning cache (session 27 lost one to a 9th file)
if [ "$(find "$OUT" -type f | wc -l)" -gt 7 ]; then
    (cd "$OUT" && find . -type f ! -name 'tune-*.json' ! -name 'stepcost-*.json' ! -name 'compile_cache.txz' \
        ! -name results.tar -print0 | tar --null -cf results.tar --remove-files -T - && find . -mindepth 1 -type d \
        -empty -delete) && echo "results bundled: $OUT/results.tar"
fi
[ -n "$SPEAR_COMPILE_CACHE" ] && cd "$SPEAR_COMPILE_CACHE" 2>/dev/null || exit 0
for parts in "inductor triton" "inductor"; do
    tar -I "xz -T0 -6" -cf "$OUT/compile_cache.txz" $parts 2>/dev/null
    if [ "$(stat -c %s "$OUT/compile_cache.txz")" -le 15728640 ]; then echo "compile cache saved: $parts"; exit 0; fi
done
rm -f "$OUT/compile_cache.txz"; echo "compile cache too large to return"
