#!/usr/bin/env bash
# Cold service starts (page cache dropped, empty compile cache) on the lent GPU machine, one per argument:
#   bash benchmarks/setup_runs.sh OUT_DIR load none disk h2d load-stacks ...
# Each argument is a --background mode of setup_time.py; a "-stacks" suffix adds --sample-stacks; SETUP_ARGS are
# passed to every run (e.g. SETUP_ARGS="--workers wait"). A random
# checkpoint of the real shapes is built in /tmp/b first (≈ 52 s) unless it exists. Needs root (drop_caches).
set -u
out=$1; shift
mkdir -p "$out"
ckpt=/tmp/b/ckpt-small
if [ ! -f "$ckpt/config.json" ]; then
  python3 -c "from dsvl2.model.tiny import build_random_checkpoint as b; b('$ckpt', 'small', std=0.02, n_shards=4, device='cuda')"
fi
i=0
for run in "$@"; do
  i=$((i + 1))
  mode=${run%-stacks}
  extra=()
  [ "$mode" != "$run" ] && extra=(--sample-stacks)
  rm -rf /tmp/cc
  export TORCHINDUCTOR_CACHE_DIR=/tmp/cc/inductor TRITON_CACHE_DIR=/tmp/cc/triton
  sync; echo 3 > /proc/sys/vm/drop_caches
  echo "== run $i: $run"
  # shellcheck disable=SC2086 - SETUP_ARGS (e.g. "--workers wait") is split on purpose
  timeout 200 python3 benchmarks/setup_time.py "$ckpt" --background "$mode" "${extra[@]}" ${SETUP_ARGS:-} \
    > "$out/setup-$i-$run.txt" 2>&1
  grep -v -i warn "$out/setup-$i-$run.txt" | grep -v '"stacks"' | tail -12
done
