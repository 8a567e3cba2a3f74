#!/usr/bin/env bash
# Issue 17 on one H200 in one device call (hard stop at $PERF_DEVICE_LIMIT s, default 420), most important first:
#   1. toprovar bench: 2B random weights, 1024px bf16, none / toprovar (pinned) / fastvar-public / skipvar, median of 3,
#      current defaults (text K/V once, cache writes inside the compiled half, bf16 subpixel VAE)   -> e2e_infinity-2b.*
#   2. bench/vae_decode.py: decoder variants on random 2B-size weights (PERF_VAE_VARIANTS: labels to run,
#      default the bf16 subpixel candidates channels-last / compiled / both; each up to PERF_VAE_EACH_S, 110 s; the step
#      gets what is left but 75 s)                                                                  -> vae/vae_decode.*
#   3. bench/vae_fidelity.py: the trained shapes VAE, each variant vs its float32 decode          -> vae/vae_fidelity.*
#   4. bench/small_scales.py: per-scale block time per option vs the weight-read floor            -> small_scales_infinity-2b.*
# Every step is under `timeout`; the benches rewrite their JSON/MD after every row, so a cut step keeps its rows.
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?bench/perf_device.sh: OUT is not set (the output folder of the device tool)}"
export PYTHONUNBUFFERED=1
LIMIT=${PERF_DEVICE_LIMIT:-420}
left() { echo $((LIMIT - SECONDS)); }
exec > >(tee -a "$OUT/perf.log") 2>&1
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . || exit 1
mkdir -p "$OUT/vae"
# GPU checks of this code first (<= 120 s): compiled scale graphs == compiled eager (none, pinned toprovar, FastVAR's
# compiled blocks)
timeout -k 5 120 python3 -m pytest -q -rA tests/gpu/test_pipeline_gpu.py -k compiled -p no:cacheprovider \
  > "$OUT/gpu_pytest_perf.log" 2>&1
echo "gpu checks exit $? at ${SECONDS} s"; tail -n 3 "$OUT/gpu_pytest_perf.log"
timeout -k 10 250 toprovar bench --model infinity-2b --runs 3 --policies none,toprovar,fastvar-public,skipvar --out "$OUT"
echo "bench exit $? at ${SECONDS} s"
VAE_VARIANTS=${PERF_VAE_VARIANTS:-bfloat16 subpixel channels-last,bfloat16 subpixel compiled,bfloat16 subpixel channels-last compiled}
vae_s=$(( $(left) - 75 ))  # what is left but the fidelity step
timeout -k 5 "$(( vae_s + 10 ))" python3 bench/vae_decode.py --budget "$vae_s" \
  --candidate-timeout "${PERF_VAE_EACH_S:-110}" --variants "$VAE_VARIANTS" --out "$OUT/vae"
echo "vae_decode exit $? at ${SECONDS} s"
timeout -k 5 60 python3 bench/vae_fidelity.py --device cuda --prompts 200 --budget 45 --out "$OUT/vae"
echo "vae_fidelity exit $? at ${SECONDS} s"
if [ "$(left)" -gt 40 ]; then
  timeout -k 5 "$(( $(left) - 5 ))" python3 bench/small_scales.py --model infinity-2b --time-budget "$(( $(left) - 30 ))" \
    --runs 20 --scales 0,12,2,5,8 --out "$OUT"
  echo "small_scales exit $? at ${SECONDS} s"
fi
