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

# 1. Correctness: layer vs reference formulation, graphed vs eager step, train() learns.
step check 60 python3 bench/check_cuda.py --no-compile
step graph_test 60 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_graph.py
# 2. The production step: CUDA graph, eager perturbation kernels (no compile time).
step graph 50 python3 bench/throughput.py --device cuda --steps 100 --warmup 10 --no-compile \
  --json "$OUT/graph.json"
# 3. The reference's way, same machine, same call: the baseline for every ratio.
step reference 70 python3 bench/throughput.py --device cuda --mode reference --steps 50 \
  --warmup 10 --json "$OUT/reference.json"
# 4. The perturbation layer alone at the README shapes (e6, e7, e8), three ways: reference
#    formulation, eager fused (what step 2 used), compiled; error vs reference, ms, peak MiB.
step layer_paths 60 python3 bench/layer_paths.py
# 5. A whole model with the compiled kernels (compile time shows in warm-up s).
step compiled 50 python3 bench/throughput.py --device cuda --steps 100 --warmup 10 \
  --experiments e7 --json "$OUT/compiled.json"
exit 0
