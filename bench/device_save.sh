# Run at the end of every device call (bench/GPU_RUNS.md): the tuning cache and the compile caches back into $OUT
# (a returned file may hold 16 MiB: the Triton cache is left out when both do not fit, then the Inductor one too).
# a call returns at most 8 files: drop a finished run's checkpoint (bench.serving's .partial) to make room
for f in "$OUT"/*.partial; do [ -f "$f" ] && [ -f "${f%.partial}" ] && rm -f "$f"; done
# the tuning / step-cost files that differ from the tree's (tuned by this call or an earlier one on this machine)
for f in "${SPEAR_TUNE_CACHE:-/nonexistent}"/*.json; do
    [ -f "$f" ] && ! cmp -s "$f" "bench/tune_cache/${f##*/}" && cp "$f" "$OUT"/
done
[ -n "$SPEAR_COMPILE_CACHE" ] && cd "$SPEAR_COMPILE_CACHE" 2>/dev/null || exit 0
for parts in "inductor triton" "inductor"; do
    tar -I "xz -T0 -6" -cf "$OUT/compile_cache.txz" $parts 2>/dev/null
    if [ "$(stat -c %s "$OUT/compile_cache.txz")" -le 15728640 ]; then echo "compile cache saved: $parts"; exit 0; fi
done
rm -f "$OUT/compile_cache.txz"; echo "compile cache too large to return"
