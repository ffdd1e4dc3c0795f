# Run at the end of every device call (bench/GPU_RUNS.md): the tuning cache and the compile caches back into $OUT
# (a returned file may hold 16 MiB: the Triton cache is left out when both do not fit, then the Inductor one too).
# only the tuning / step-cost files this call wrote ($OUT returns 8 files at most)
find bench/tune_cache -name '*.json' -newer /tmp/spear_call_start -exec cp {} "$OUT"/ \; 2>/dev/null
[ -n "$SPEAR_COMPILE_CACHE" ] && cd "$SPEAR_COMPILE_CACHE" 2>/dev/null || exit 0
for parts in "inductor triton" "inductor"; do
    tar -czf "$OUT/compile_cache.tgz" $parts 2>/dev/null
    if [ "$(stat -c %s "$OUT/compile_cache.tgz")" -le 15728640 ]; then echo "compile cache saved: $parts"; exit 0; fi
done
rm -f "$OUT/compile_cache.tgz"; echo "compile cache too large to return"
