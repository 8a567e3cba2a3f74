#!/usr/bin/env bash
# Build .whl/serve_site.tar.xz: nvidia-pytriton 0.7.0 (tritonserver + Python backend) and the client's
# dependencies for the H200 machine (CPython 3.12, manylinux x86_64, no network), unpacked into one site
# directory (serve_site/) and pruned to what the device runs: the Python-backend stub of 3.12 only, the
# bundled libraries the kept binaries load, no tests; PyTriton's own Python API (pydantic, typer, zmq, ...)
# is not used by toprovar serve and is left out; debug sections of three unpatched extension modules are
# stripped. bench/serve_device.sh extracts it and sets PYTHONPATH.
#   tools/device_wheels.sh            # -> .whl/serve_site.tar.xz (git-ignored), <= 50 MiB
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
W=$ROOT/.whl
DL=$W/serve_wheels
SITE=$W/serve_site
OUT=$W/serve_site.tar.xz
PINS=(nvidia-pytriton==0.7.0 tritonclient==2.73.0 numpy==1.26.4 grpcio==1.85.3 protobuf==6.33.6
      python-rapidjson==1.25 ml-dtypes==0.5.4 urllib3==2.8.0 packaging==26.4 geventhttpclient==2.6.1
      gevent==26.9.0 greenlet==3.3.2 zope.event==6.2 zope.interface==8.7 certifi==2026.10.19.post1 brotli==1.2.1
      typing-extensions==4.16.0)
mkdir -p "$DL"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
  --platform manylinux_2_35_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_26_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DL" "${PINS[@]}"
rm -rf "$SITE" && mkdir -p "$SITE"
for w in "$DL"/*.whl; do python3 -m zipfile -e "$w" "$SITE"; done
for d in "$SITE"/*.data; do  # wheel data: purelib/platlib into the site, headers/scripts dropped
  for lib in purelib platlib; do [ -d "$d/$lib" ] && cp -a "$d/$lib/." "$SITE/"; done
  rm -rf "$d"
done
TS=$SITE/pytriton/tritonserver
find "$TS/python_backend_stubs" -mindepth 1 -maxdepth 1 ! -name 3.12 -exec rm -rf {} +
chmod +x "$TS/bin/tritonserver" "$TS/python_backend_stubs/3.12/triton_python_backend_stub"  # zipfile drops modes
# bundled libraries that no kept binary loads (transitively): e.g. the 3.13 stub's libpython
python3 - "$SITE" <<'EOF'
import os, subprocess, sys
site = sys.argv[1]
libdir = os.path.join(site, "nvidia_pytriton.libs")
ts = os.path.join(site, "pytriton", "tritonserver")
todo = [os.path.join(r, f) for r, _, fs in os.walk(ts) for f in fs
        if f.endswith(".so") or f in ("tritonserver", "triton_python_backend_stub")]
libs, seen = set(os.listdir(libdir)), set()
while todo:
    dyn = subprocess.run(["readelf", "-d", todo.pop()], capture_output=True, text=True).stdout
    for name in (l.split("[", 1)[1].split("]", 1)[0] for l in dyn.splitlines() if "(NEEDED)" in l):
        if name in libs and name not in seen:
            seen.add(name)
            todo.append(os.path.join(libdir, name))
for name in sorted(libs - seen):
    print(f"device_wheels: dropping unused {name}")
    os.remove(os.path.join(libdir, name))
EOF
find "$SITE" -depth -type d \( -name tests -o -name __pycache__ \) -exec rm -rf {} +
rm -rf "$SITE"/bin
# debug sections of extension modules that no patchelf touched (no bundled .libs): about 34 MB unpacked
strip --strip-debug "$SITE"/ml_dtypes/_ml_dtypes_ext.*.so "$SITE"/rapidjson.*.so "$SITE"/_brotli.*.so
echo "device_wheels: $(du -sh "$SITE" | cut -f1) unpacked; packing with xz -T2 ..."
tar -C "$W" -cf - serve_site | xz -T2 -6 > "$OUT.tmp"
mv "$OUT.tmp" "$OUT"
size=$(stat -c %s "$OUT")
echo "device_wheels: $OUT $((size / 1048576)) MiB"
[ "$size" -le $((50 * 1048576)) ] || { echo "device_wheels: $OUT is over 50 MiB" >&2; exit 1; }
