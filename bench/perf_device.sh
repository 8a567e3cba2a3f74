#!/usr/bin/env bash
# Issue 17 on one H200 in one device call (hard stop at $PERF_DEVICE_LIMIT s, default 420), most informative first
# (the end-to-end rows and the VAE variants were measured on this code: bench/results/e2e_notes.md):
#   1. GPU checks: compiled scale graphs == compiled eager (none, pinned toprovar, FastVAR's compiled blocks)
#                                                                                               -> gpu_pytest_perf.log
#   2. bench/small_scales.py: per-scale block time per option (one_graph included) vs the weight-read floor, scales
#      0, 2, 5, 8, 12 (PERF_SMALL_S, default 150 s)                                             -> small_scales_infinity-2b.*
#   3. bench/small_mm.py: cuBLAS vs the Triton weight-streaming kernel for scales 0-8's products (<= 90 s)
#                                                                                               -> small_mm_infinity-2b.*
#   4. toprovar bench: 2B random weights, 1024px bf16, none / toprovar (pinned) / fastvar-public / skipvar, median of 3,
#      current defaults                                                                         -> e2e_infinity-2b.*
#   5. with PERF_VAE=1: bench/vae_decode.py (PERF_VAE_VARIANTS, each up to PERF_VAE_EACH_S, 110 s) and
#      bench/vae_fidelity.py on the trained shapes VAE                                          -> vae/vae_*.*
# Every step is under `timeout`; the benches rewrite their JSON/MD after every row, so a cut step keeps its rows.
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?bench/perf_device.sh: OUT is not set (the output folder of the device tool)}"
export PYTHONUNBUFFERED=1
LIMIT=${PERF_DEVICE_LIMIT:-420}
left() { echo $((LIMIT - SECONDS)); }
exec > >(tee -a "$OUT/perf.log") 2>&1
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . || exit 1
timeout -k 5 120 python3 -m pytest -q -rA tests/gpu/test_pipeline_gpu.py -k compiled -p no:cacheprovider \
  > "$OUT/gpu_pytest_perf.log" 2>&1
echo "gpu checks exit $? at ${SECONDS} s"; tail -n 3 "$OUT/gpu_pytest_perf.log"
small_s=${PERF_SMALL_S:-150}
timeout -k 5 "$(( small_s + 30 ))" python3 bench/small_scales.py --model infinity-2b --time-budget "$small_s" \
  --runs 20 --scales 0,2,5,8,12 --out "$OUT"
echo "small_scales exit $? at ${SECONDS} s"
timeout -k 5 90 python3 bench/small_mm.py --model infinity-2b --out "$OUT"
echo "small_mm exit $? at ${SECONDS} s"
if [ "$(left)" -gt 60 ]; then
  timeout -k 10 "$(( $(left) - 10 ))" toprovar bench --model infinity-2b --runs 3 \
    --policies none,toprovar,fastvar-public,skipvar --out "$OUT"
  echo "bench exit $? at ${SECONDS} s"
fi
if [ "${PERF_VAE:-0}" = 1 ] && [ "$(left)" -gt 120 ]; then
  mkdir -p "$OUT/vae"
  VAE_VARIANTS=${PERF_VAE_VARIANTS:-bfloat16 subpixel channels-last compiled}
  vae_s=$(( $(left) - 75 ))  # what is left but the fidelity step
  timeout -k 5 "$(( vae_s + 10 ))" python3 bench/vae_decode.py --budget "$vae_s" \
    --candidate-timeout "${PERF_VAE_EACH_S:-110}" --variants "$VAE_VARIANTS" --out "$OUT/vae"
  echo "vae_decode exit $? at ${SECONDS} s"
  timeout -k 5 60 python3 bench/vae_fidelity.py --device cuda --prompts 200 --budget 45 --out "$OUT/vae"
  echo "vae_fidelity exit $? at ${SECONDS} s"
fi
