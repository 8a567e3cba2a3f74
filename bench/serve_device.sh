#!/usr/bin/env bash
# Issue 16 on one H200: the two device calls (each ends within 9 min, results rewritten under $OUT after every row).
#   bench/serve_device.sh offline   carry [".carry/infinity"]          2B random weights, 1024px bf16, batch
#       1,2,4,8,16 x none/toprovar (pinned)/fastvar-public/skipvar, whole-scale CUDA graphs, torch.compile OFF
#       (compiling every block for 5 batch sizes does not fit the call), median of 2 after 2 warm-ups (eager,
#       then capture); then the official Infinity code at the same batch sizes (<= 160 s); then
#       bench/batch_sets.py with what is left.
#   bench/serve_device.sh serve     carry [".whl/serve_site.tar.xz"]   tools/device_wheels.sh's site (nvidia-pytriton
#       0.7.0, tritonclient, numpy<2, ...) extracted to /tmp/serve_site, then tests/gpu/test_serve_gpu.py, then
#       toprovar serve (Triton) under closed-loop load at concurrency 1/4/16 for none and toprovar, and its SIGTERM
#       shutdown.
# $OUT: serve_infinity-2b.{json,md} (offline + official section) or serve_infinity-2b_server.{json,md} and
# serve_infinity-2b_server_server.log and serve_gpu_pytest.log (serve), official_anchor_batch.{json,md},
# batch_sets_infinity-2b.{json,md},
# env.txt, and <mode>.log (everything printed).
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:-}
[ "$mode" = offline ] || [ "$mode" = serve ] || { echo "usage: bench/serve_device.sh offline|serve" >&2; exit 2; }
: "${OUT:?bench/serve_device.sh: OUT is not set (the output folder of the device tool)}"
export PYTHONUNBUFFERED=1
LIMIT=${SERVE_DEVICE_LIMIT:-540}  # seconds for the whole script, installs included
# offline: SERVE_ROWS_S (default 330) for the rows, SERVE_OFFICIAL_S (default 160) for the official anchor
left() { echo $((LIMIT - SECONDS)); }
exec > >(tee -a "$OUT/$mode.log") 2>&1

if [ "$mode" = serve ]; then
  [ -f .whl/serve_site.tar.xz ] || { echo "serve: .whl/serve_site.tar.xz not carried (tools/device_wheels.sh)" >&2; exit 2; }
  python3 -c "import tarfile; tarfile.open('.whl/serve_site.tar.xz').extractall('/tmp', filter='tar')" || exit 1
  export PYTHONPATH=/tmp/serve_site${PYTHONPATH:+:$PYTHONPATH}
  echo "serve_site extracted in ${SECONDS} s"
fi
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . || exit 1
LIBDIR=$(python3 -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR"))')
{
  nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
  python3 -c 'import sys, sysconfig, numpy, torch; print(sys.executable, sys.version.split()[0], "LDLIBRARY",
sysconfig.get_config_var("LDLIBRARY"), "numpy", numpy.__version__, "torch", torch.__version__)'
  echo "LIBDIR $LIBDIR"
  if [ "$mode" = serve ]; then
    LD_LIBRARY_PATH=$LIBDIR ldd /tmp/serve_site/pytriton/tritonserver/python_backend_stubs/3.12/triton_python_backend_stub |
      grep -i "python\|not found"
  fi
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

if [ "$mode" = offline ]; then
  # offline rows: SERVE_ROWS_S (skipped rows recorded); official anchor: SERVE_OFFICIAL_S; the outer timeout is the hard stop
  timeout -k 10 "$(( $(left) - 15 ))" python3 bench/serve.py --model infinity-2b --no-serve --no-compile \
    --runs 2 --warmup 2 --time-budget "${SERVE_ROWS_S:-330}" --official-repo .carry/infinity --official-timeout "${SERVE_OFFICIAL_S:-160}" --out "$OUT"
  echo "serve.py exit $? at ${SECONDS} s"
  if [ "$(left)" -gt 60 ]; then
    timeout -k 5 "$(( $(left) - 10 ))" python3 bench/batch_sets.py --model infinity-2b --no-compile \
      --batch-sizes 1,8 --modes pinned,adaptive --runs 2 --warmup 2 --out "$OUT"
    echo "batch_sets.py exit $? at ${SECONDS} s"
  else
    echo "batch_sets.py skipped: $(left) s left"
  fi
else
  # first the GPU check of toprovar serve (shapes model, cuda:0: images == generate, SIGTERM) <= 150 s
  # (SERVE_GPU_TEST=0 skips it)
  if [ "${SERVE_GPU_TEST:-1}" != 0 ]; then
    timeout -k 5 150 python3 -m pytest -q -s -rA tests/gpu/test_serve_gpu.py -p no:cacheprovider \
      > "$OUT/serve_gpu_pytest.log" 2>&1
    echo "test_serve_gpu exit $? at ${SECONDS} s"; tail -n 5 "$OUT/serve_gpu_pytest.log"
  fi
  # server startup (model load and its warm-up of every bucket for none and toprovar) <= SERVE_STARTUP_S
  # (default 300); rows: what is left minus 90 s (skipped rows recorded); shutdown <= 60 s
  timeout -k 10 "$(( $(left) - 10 ))" python3 bench/serve.py --model infinity-2b --no-offline --no-compile \
    --concurrency 1,4,16 --requests-per-client 4 --min-requests 16 --serve-policies "${SERVE_POLICIES:-none,toprovar}" \
    --max-batch 16 --queue-delay-ms 20 \
    --startup-timeout "${SERVE_STARTUP_S:-300}" --time-budget "$(( $(left) - 90 ))" --shutdown-timeout 60 \
    --name serve_infinity-2b_server --out "$OUT"
  echo "serve.py exit $? at ${SECONDS} s"
fi
