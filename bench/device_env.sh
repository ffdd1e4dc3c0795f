# Sourced at the start of every device call (bench/GPU_RUNS.md): the wheels the device lacks, the environment, the
# carried caches. A fresh device machine has cold caches: the tuning cache (bench/tune_cache/, tracked in git, so a
# new session's first call starts warm on a GPU an earlier session tuned; copied to SPEAR_TUNE_CACHE in /tmp, outside
# the tree, which every call's copy of the tree resets: on a warm machine the next call keeps what this one tuned
# even if this one's device_save.sh did not run) and the
# compile caches (Inductor's FX graph cache and Triton's kernel cache, carried as .compile_cache/cache.txz (xz: a fifth
# of gzip's size for these text-heavy caches) and unpacked
# outside the tree) make a second call's engine start-up skip what an earlier call compiled and tuned.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 SPEAR_TUNE_CACHE=/tmp/spear_tune_cache
mkdir -p "$SPEAR_TUNE_CACHE" && cp -n bench/tune_cache/*.json "$SPEAR_TUNE_CACHE"/ 2>/dev/null
export SPEAR_COMPILE_CACHE=/tmp/spear_compile_cache
export TORCHINDUCTOR_CACHE_DIR=$SPEAR_COMPILE_CACHE/inductor TRITON_CACHE_DIR=$SPEAR_COMPILE_CACHE/triton
mkdir -p "$TORCHINDUCTOR_CACHE_DIR" "$TRITON_CACHE_DIR"
for f in .compile_cache/cache.txz .compile_cache/cache.tgz; do [ -f "$f" ] && tar -xf "$f" -C "$SPEAR_COMPILE_CACHE"; done
echo "device: $(nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv,noheader)" \
     "compile cache: $(du -sh "$SPEAR_COMPILE_CACHE" | cut -f1)"
