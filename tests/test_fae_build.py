"""The native FAE library compiles with nvcc through cmake/ (no GPU needed).

- sm_90a only (fast, CI): libtoprovar_fae.so builds, exports the C API and carries sm_90a SASS plus compute_90
  PTX (what newer GPUs, sm_100/sm_120, compile at load time).
- all archs (sm_80 + sm_90a, marked slow) with the ptxas report: no register spills.
- the TensorRT plugin library, when ``TENSORRT_ROOT`` holds the TensorRT headers (NvInferRuntime.h in it, in
  include/ or include/tensorrt/: the public NVIDIA/TensorRT repository, or NVIDIA's headers inside the PyPI
  kernel-lens wheel as CI uses them): it builds, links with --no-undefined, is self-contained (kernels and CUDA
  runtime linked in, no RPATH, only the C/C++ runtime among its dependencies, exactly the two entry points
  exported), and the host-only smoke program loads a lone copy of it, creates the plugin and round-trips its
  fields. tests/test_fae_plugin_trt.py runs it inside the real TensorRT-RTX builder.
"""
from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HAVE_TOOLS = shutil.which("nvcc") is not None and shutil.which("cmake") is not None
pytestmark = pytest.mark.skipif(not HAVE_TOOLS, reason="needs nvcc and cmake on PATH")


def _build(build_dir: Path, *defs: str) -> str:
    cfg = subprocess.run(["cmake", "-S", str(ROOT / "cmake"), "-B", str(build_dir), *defs],
                         capture_output=True, text=True, timeout=300)
    assert cfg.returncode == 0, cfg.stdout + cfg.stderr
    b = subprocess.run(["cmake", "--build", str(build_dir), "-j", str(os.cpu_count() or 2)],
                       capture_output=True, text=True, timeout=900)
    assert b.returncode == 0, b.stdout[-5000:] + b.stderr[-5000:]
    return cfg.stdout + b.stdout + b.stderr


def _exports(lib: Path) -> set[str]:
    out = subprocess.run(["nm", "-D", "--defined-only", str(lib)], capture_output=True, text=True).stdout
    return {line.split()[-1] for line in out.splitlines() if line.strip()}


def _fatbin_entries(lib: Path, tmp: Path) -> set[tuple[str, int]]:
    """(kind, arch) of the code in the library's .nv_fatbin section: ("elf", 90) is sm_90/sm_90a SASS,
    ("ptx", 90) compute_90 PTX. Fatbin container: magic 0xBA55ED50, u16 version, u16 header size, u64 size;
    then entries: u16 kind (1 PTX, 2 ELF), u16, u32 header size, u64 payload size, ..., u32 arch at +0x1c."""
    blob = tmp / "fatbin.bin"
    r = subprocess.run(["objcopy", "-O", "binary", "--only-section=.nv_fatbin", str(lib), str(blob)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    data, found, off = blob.read_bytes(), set(), 0
    magic = struct.pack("<I", 0xBA55ED50)
    while (start := data.find(magic, off)) >= 0:
        _, _, hsize, size = struct.unpack_from("<IHHQ", data, start)
        entry, end = start + hsize, start + hsize + size
        while entry < end:
            kind, _, ehsize, payload = struct.unpack_from("<HHIQ", data, entry)
            found.add(({1: "ptx", 2: "elf"}.get(kind, str(kind)), struct.unpack_from("<I", data, entry + 0x1C)[0]))
            entry += ehsize + payload
        off = end
    return found


def _dynamic(lib: Path) -> tuple[list[str], list[str]]:
    """(NEEDED libraries, RPATH/RUNPATH entries) of a shared library (readelf -d)."""
    out = subprocess.run(["readelf", "-d", str(lib)], capture_output=True, text=True).stdout
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", out)
    paths = re.findall(r"\((?:RPATH|RUNPATH)\)\s+Library r(?:un)?path: \[(.*?)\]", out)
    return needed, paths


HAVE_BINUTILS = all(shutil.which(t) for t in ("nm", "objcopy", "readelf"))
# The C/C++ runtime: everything else (libtoprovar_fae, libcudart, libnvinfer) must be linked in or absent.
SYSTEM_LIBS = re.compile(r"^(libstdc\+\+|libm|libgcc_s|libc|ld-linux-x86-64|libdl|libpthread|librt)\.so")


def test_kernel_library_builds_sm90a(tmp_path):
    _build(tmp_path, "-DFAE_CUDA_ARCHS=90a", "-DTENSORRT_ROOT=", "-DTENSORRT_INCLUDE_DIR=")
    lib = tmp_path / "libtoprovar_fae.so"
    assert lib.exists()
    if HAVE_BINUTILS:
        assert {"fae_forward", "fae_workspace_size", "fae_status_string", "fae_version"} <= _exports(lib)
        assert _fatbin_entries(lib, tmp_path) == {("elf", 90), ("ptx", 90)}  # default FAE_CUDA_PTX=90


@pytest.mark.slow
def test_kernel_library_builds_all_archs_without_spills(tmp_path):
    """sm_80 + sm_90a; the default kernels (fae_fwd_kernel) do not spill. The benchmark-only 32-rows-per-
    warp variant (fae_fwd_kernel_m2) spills a few dozen bytes at 255 registers and is not checked."""
    log = _build(tmp_path, "-DFAE_CUDA_ARCHS=80;90a", "-DFAE_PTXAS_VERBOSE=ON", "-DTENSORRT_ROOT=",
                 "-DTENSORRT_INCLUDE_DIR=")
    found = re.findall(r"Function properties for (\S+)\s+(\d+) bytes stack frame, (\d+) bytes spill stores, "
                       r"(\d+) bytes spill loads", log)
    default = [f for f in found if "fae_fwd_kernelI" in f[0]]
    assert len(default) >= 8, "no ptxas report for the default kernels"
    assert all(f[2] == "0" and f[3] == "0" for f in default), default
    if HAVE_BINUTILS:
        assert _fatbin_entries(tmp_path / "libtoprovar_fae.so", tmp_path) == {("elf", 80), ("elf", 90), ("ptx", 90)}


def test_trt_plugin_builds_against_tensorrt_headers(tmp_path):
    hdr = os.environ.get("TENSORRT_ROOT")
    if not hdr:
        pytest.skip("set TENSORRT_ROOT to the TensorRT headers (NvInferRuntime.h in it, include/ or include/tensorrt/)")
    log = _build(tmp_path, "-DFAE_CUDA_ARCHS=90a", f"-DTENSORRT_ROOT={hdr}")
    if "TensorRT headers not found" in log:
        pytest.skip(f"TENSORRT_ROOT={hdr}: no NvInferRuntime.h there (nor in include/, include/tensorrt/)")
    plugin = tmp_path / "libtoprovar_fae_trt.so"
    assert plugin.exists(), log
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy2(plugin, lone / plugin.name)  # nothing beside it: the kernels must be inside
    if HAVE_BINUTILS:
        assert _exports(plugin) == {"getCreators", "setLoggerFinder"}
        needed, paths = _dynamic(plugin)
        assert needed and all(SYSTEM_LIBS.match(n) for n in needed), needed
        assert paths == [], paths
        assert _fatbin_entries(plugin, tmp_path) == {("elf", 90), ("ptx", 90)}
    r = subprocess.run([str(tmp_path / "fae_plugin_smoke"), str(lone / plugin.name)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "plugin smoke ok" in r.stdout, r.stdout + r.stderr
