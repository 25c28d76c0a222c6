#!/usr/bin/env bash
# The one prepared GPU call: correctness on CUDA first, then every timing, each step under its
# own time limit so that a slow step cannot take the others' results with it.
#   run from the repo root on the GPU machine, with the wheels of .whl/ carried (hydra-core,
#   omegaconf, antlr4: the GPU image has torch but not these); results land in $OUT.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/pnn-bench}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
{ date -u; nvidia-smi -L; python3 -c "import torch; print('torch', torch.__version__)"; } \
  2>&1 | tee "$OUT/machine.txt"

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s)"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"
  echo "=== $name exit ${PIPESTATUS[0]}"
}

# Every figure of bench/RESULTS.md comes from one of these steps (the file says which); the
# limits add up to under 10 minutes, the most one device command may take.
# 1. Correctness: layer vs reference formulation, graphed vs eager step, train() learns.
step check 60 python3 bench/check_cuda.py --no-compile
step graph_test 40 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_graph.py
# 2. Seeds packed in one process (hydra.launcher.seeds_per_process) against the same seeds one
#    after another, same call: img/s, ratio, K-seed time over one seed's, packed peak memory.
step seeds 190 python3 bench/seeds.py --device cuda --experiments e1,e4,e7 --seeds 1,2,3,4,8 \
  --steps 100 --warmup 10 --json "$OUT/seeds.json"
# 3. The reference's way (DataLoader with pin_memory, as the reference's loaders), all eight:
#    the baseline of every same-call ratio.
step reference 80 python3 bench/throughput.py --device cuda --mode reference --steps 50 \
  --warmup 10 --json "$OUT/reference.json"
# 4. Production, all eight, as train() runs it (CUDA graph + compiled layers, the defaults):
#    every production row; peak memory with and without the warm-up (cuDNN autotuning).
step production 160 python3 bench/throughput.py --device cuda --steps 100 --warmup 10 \
  --json "$OUT/production.json"
# 5. The perturbation layer alone at the README shapes (e6, e7, e8), three ways: reference
#    formulation, eager fused, compiled; error vs reference, ms, peak MiB.
step layer_paths 50 python3 bench/layer_paths.py
exit 0
