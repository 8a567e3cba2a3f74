"""Bad input to ``toprovar generate`` / ``calibrate`` / ``bench`` and ``toprovar-export``: each case asserts the
exit status, ONE error line naming the argument or file, and that nothing was written or changed (the
directory tree before and after: names, kinds, modes, sizes, mtimes and bytes).

The command lines run in-process through their ``main(argv)``; only the signal cases (Ctrl-C during
generate, SIGKILL of an exporting parent) run as subprocesses.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from toprovar import cli
from toprovar.config import get_config
from toprovar.export import cli as export_cli
from toprovar.outputs import OutputError, atomic_write, check_output_file, file_mode

SHAPES_WEIGHTS = get_config("shapes").weights_dir
PROMPT = "three yellow triangles"


# ----------------------------------------------------------------------------------------- helpers
def run(main, argv: list[str]) -> tuple[int, str, list[str]]:
    """(exit status, stdout, non-empty stderr lines) of ``main(argv)``; SystemExit (argparse) included."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as exc:
            rc = exc.code
    return rc, out.getvalue(), [ln for ln in err.getvalue().splitlines() if ln.strip() and "%|" not in ln]


def snapshot(root: Path, dir_mtimes: bool = True) -> dict:
    """Everything under ``root`` (itself included): kind, mode, size, mtime and content hash (links not followed).
    dir_mtimes=False leaves out directories' mtimes (a temporary file created and removed changes them)."""
    out = {}
    paths = [root] + (sorted(root.rglob("*")) if root.is_dir() and not root.is_symlink() else [])
    for p in paths:
        if not os.path.lexists(p):
            continue
        st = os.lstat(p)
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) else \
            os.readlink(p) if stat.S_ISLNK(st.st_mode) else None
        mtime = None if stat.S_ISDIR(st.st_mode) and not dir_mtimes else st.st_mtime_ns
        out[str(p.relative_to(root))] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_size,
                                         mtime, st.st_rdev, digest)
    return out


def refused(main, argv: list[str], root: Path, *needles: str, rc: int = 2) -> str:
    """Run a command that must be refused: exit ``rc``, one stderr line containing every needle, no traceback,
    nothing under ``root`` written or changed. Returns the line."""
    before = snapshot(root)
    code, stdout, err = run(main, argv)
    assert code == rc, (code, err)
    assert len(err) == 1, err
    assert "error" in err[0] and "Traceback" not in err[0]
    for n in needles:
        assert n in err[0], (n, err[0])
    assert snapshot(root) == before
    return err[0]


def gen(*args: str) -> list[str]:
    return ["generate", "--device", "cpu", "--prompt", PROMPT, *args]


# ----------------------------------------------------------------------------------------- output files
def test_output_onto_a_device_node_is_refused(tmp_path):
    """`-o` naming a character device (as /dev/null): refused before any work; the node stays a device."""
    node = tmp_path / "null"
    try:
        os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except (PermissionError, OSError) as exc:
        pytest.skip(f"cannot create a device node here ({exc.strerror}); the FIFO case covers special files")
    refused(cli.main, gen("-o", str(node)), tmp_path, "-o", str(node), "a device")
    assert stat.S_ISCHR(os.lstat(node).st_mode)
    with pytest.raises(OutputError, match="a device"):
        check_output_file("/dev/null", "-o")


@pytest.mark.parametrize("kind", ["fifo", "symlink", "dangling-symlink", "directory"])
def test_output_onto_a_non_regular_file_is_refused(tmp_path, kind):
    target = tmp_path / "target.png"
    target.write_bytes(b"earlier image")
    out = tmp_path / "out.png"
    if kind == "fifo":
        os.mkfifo(out)
    elif kind == "symlink":
        out.symlink_to(target)
    elif kind == "dangling-symlink":
        out.symlink_to(tmp_path / "nowhere.png")
    else:
        out.mkdir()
    what = {"fifo": "a FIFO", "symlink": "a symbolic link", "dangling-symlink": "a symbolic link",
            "directory": "a directory"}[kind]
    refused(cli.main, gen("-o", str(out)), tmp_path, "-o", what)
    refused(cli.main, ["calibrate", "--device", "cpu", "--prompt", PROMPT, "-o", str(out)], tmp_path, "-o", what)


@pytest.mark.parametrize("name", ["dir/", "sub/dir/", ".", "x/.."])
def test_output_path_naming_a_directory_is_refused(tmp_path, name):
    refused(cli.main, gen("-o", str(tmp_path) + "/" + name), tmp_path, "-o", "names a directory")


def test_output_under_a_file_is_refused(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    refused(cli.main, gen("-o", str(tmp_path / "file.txt" / "a.png")), tmp_path, "-o", "not a directory")
    refused(cli.main, ["bench", "--model", "tiny", "--device", "cpu", "--out", str(tmp_path / "file.txt")],
            tmp_path, "--out", "not a directory")
    refused(export_cli.main, ["--out", str(tmp_path / "file.txt"), "--no-progress"], tmp_path, "--out",
            "not a directory")
    refused(export_cli.main, ["--out", str(tmp_path / "file.txt" / "x"), "--no-progress"], tmp_path, "--out",
            "not a directory")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only-mode directories")
def test_unwritable_output_directory_is_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    try:
        refused(cli.main, gen("-o", str(ro / "a.png")), tmp_path, "-o", "not writable")
        refused(export_cli.main, ["--out", str(ro / "exp"), "--no-progress"], tmp_path, "--out", "not writable")
    finally:
        ro.chmod(0o700)


def test_atomic_write_mode_follows_the_umask_and_failures_leave_the_target(tmp_path):
    old = os.umask(0o027)
    try:
        p = atomic_write(tmp_path / "a.txt", lambda tmp: Path(tmp).write_text("one"))
        assert stat.S_IMODE(p.stat().st_mode) == 0o640 == file_mode()
    finally:
        os.umask(old)
    p = atomic_write(tmp_path / "b.txt", lambda tmp: Path(tmp).write_text("one"))
    assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~old

    def full_disk(tmp):
        Path(tmp).write_text("half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    before = snapshot(tmp_path, dir_mtimes=False)
    with pytest.raises(OutputError, match=r"^-o: cannot write .*b\.txt: No space left on device$"):
        atomic_write(tmp_path / "b.txt", full_disk, "-o")
    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "b.txt", lambda tmp: (_ for _ in ()).throw(KeyboardInterrupt()), "-o")
    assert snapshot(tmp_path, dir_mtimes=False) == before  # no temporary file left, the old file untouched


@pytest.fixture
def tmpfs(tmp_path):
    """A 64 KiB tmpfs (root only) to fill up for real."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                                           capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root); the ENOSPC injection covers a full disk")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


def _fill(path: Path) -> None:
    """Write ``path`` until its filesystem is full."""
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC


def test_full_disk_is_one_line(tmpfs):
    _fill(tmpfs / "filler")
    big = "x" * 100_000
    with pytest.raises(OutputError, match="No space left on device"):
        atomic_write(tmpfs / "out.json", lambda tmp: Path(tmp).write_text(big), "-o")
    assert sorted(p.name for p in tmpfs.iterdir()) == ["filler"]


# ----------------------------------------------------------------------------------------- sampling args
@pytest.mark.parametrize("args,needle", [
    (["--cfg", "nan"], "--cfg"), (["--cfg", "inf"], "--cfg"), (["--cfg", "-1"], "--cfg"),
    (["--cfg", "1,2,x"], "--cfg"), (["--tau", "nan"], "--tau"), (["--tau", "0"], "--tau"),
    (["--tau", "-0.5"], "--tau"), (["--tau", "1,-inf"], "--tau"), (["--top-p", "1.5"], "--top-p"),
    (["--top-p", "-0.1"], "--top-p"), (["--top-p", "nan"], "--top-p"), (["--h-div-w", "0"], "--h-div-w"),
    (["--h-div-w", "-1"], "--h-div-w"), (["--h-div-w", "nan"], "--h-div-w"), (["--h-div-w", "100"], "0.333..3"),
    (["--seed", str(2**64)], "--seed"), (["--seed", "-1"], "--seed"), (["--weights-seed", str(2**70)], "--weights-seed"),
    (["--resolution", "77"], "--resolution"), (["--resolution", "0"], "--resolution"),
    (["--cfg", "1,1,1,1,1,1,1,1"], "8 values given for 7 scales"), (["--tau", "1,1"], "2 values given for 7 scales"),
    (["--model", "nope"], "--model"), (["--policy", "nope"], "--policy"), (["--dtype", "int8"], "--dtype"),
    (["--device", "tpu"], "--device"), (["--prompt", "x\udcff"], "--prompt"),
    (["--weights", "/nonexistent/w"], "--weights"), (["--checkpoint", "/nonexistent.pth"], "--checkpoint"),
    (["--calibration", "/nonexistent.json", "--policy", "toprovar"], "--calibration"),
])
def test_generate_refuses_bad_arguments(tmp_path, args, needle):
    refused(cli.main, gen("-o", str(tmp_path / "a.png"), *args), tmp_path, needle)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="CUDA is available here")
def test_device_cuda_without_cuda(tmp_path):
    for cmd in (gen("-o", str(tmp_path / "a.png")), ["calibrate", "--prompt", PROMPT, "-o", str(tmp_path / "c.json")]):
        cmd = [a for a in cmd if a != "cpu" and a != "--device"] + ["--device", "cuda"]
        refused(cli.main, cmd, tmp_path, "--device cuda", "CUDA is not available")


def test_library_refuses_bad_sampling_values():
    from toprovar.sampling import check_sampling
    for bad in (dict(cfg=float("nan")), dict(cfg=[1.0] * 8), dict(tau=0.0), dict(tau=float("inf")),
                dict(top_p=1.01), dict(top_p=float("nan"))):
        kw = {"cfg": 3.0, "tau": 1.0, "top_p": 0.97, **bad}
        with pytest.raises(ValueError, match=r"^--(cfg|tau|top-p): "):
            check_sampling(kw["cfg"], kw["tau"], kw["top_p"], 7)
    check_sampling([1.0] * 7, 0.5, 0.0, 7)


def test_calibration_of_another_model_is_refused(tmp_path):
    cal = json.loads((SHAPES_WEIGHTS / "calibration.json").read_text())
    cal["model"] = "tiny"
    bad = tmp_path / "cal.json"
    bad.write_text(json.dumps(cal))
    refused(cli.main, gen("-o", str(tmp_path / "a.png"), "--policy", "toprovar", "--calibration", str(bad)),
            tmp_path, "--calibration", "calibrated for model 'tiny', not 'shapes'")
    refused(export_cli.main, ["--model", "shapes", "--calibration", str(bad), "--out", str(tmp_path / "e"),
                              "--no-progress"], tmp_path, "--calibration", "'tiny'")


def test_broken_t5_directory(tmp_path):
    t5 = tmp_path / "t5"
    t5.mkdir()
    (t5 / "config.json").write_text("{broken")
    refused(cli.main, gen("--model", "infinity-2b", "--t5", str(t5), "-o", str(tmp_path / "a.png")), tmp_path,
            "--t5", str(t5))
    (t5 / "config.json").write_text(json.dumps({"model_type": "t5", "d_model": 8}))  # no weights, no tokenizer
    refused(cli.main, gen("--model", "infinity-2b", "--t5", str(t5), "-o", str(tmp_path / "a.png")), tmp_path,
            "--t5", str(t5))
    refused(cli.main, gen("--model", "infinity-2b", "--t5", str(tmp_path / "none"), "-o", str(tmp_path / "a.png")),
            tmp_path, "--t5", "not a directory")


def test_calibrate_refuses_bad_prompts_file(tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_bytes(b"a red square\n\xff\xfe bad\n")
    refused(cli.main, ["calibrate", "--device", "cpu", "--prompts", str(p), "-o", str(tmp_path / "c.json")],
            tmp_path, "--prompts", "not valid UTF-8")
    refused(cli.main, ["calibrate", "--device", "cpu", "--prompts", str(tmp_path / "none.txt")], tmp_path,
            "--prompts", "not found")


# ----------------------------------------------------------------------------------------- bench
def test_bench_failure_never_overwrites_results(tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    (out / "e2e_tiny.json").write_text('{"earlier": true}\n')
    (out / "e2e_tiny.md").write_text("# earlier\n")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    base = ["bench", "--model", "tiny", "--device", "cpu", "--runs", "1", "--warmup", "0", "--overhead-runs", "1",
            "--out", str(out)]
    refused(cli.main, base + ["--calibration", str(bad)], tmp_path, "--calibration", str(bad))
    refused(cli.main, base + ["--policies", "none,nope"], tmp_path, "--policies", "'nope'")
    refused(cli.main, base + ["--runs", "0"], tmp_path, "--runs")
    (out / "e2e_tiny.md").unlink()
    (out / "e2e_tiny.md").symlink_to(tmp_path / "bad.json")
    refused(cli.main, base, tmp_path, "--out", "a symbolic link")


# ----------------------------------------------------------------------------------------- toprovar-export args
@pytest.mark.parametrize("args,needle", [
    (["--batch-size", "-1"], "--batch-size"), (["--batch-size", "0"], "--batch-size"),
    (["--max-batch-size", "1", "--batch-size", "2"], "--max-batch-size"), (["--h-div-w", "-1"], "--h-div-w"),
    (["--h-div-w", "nan"], "--h-div-w"), (["--h-div-w", "inf"], "--h-div-w"), (["--opset", "99"], "--opset"),
    (["--opset", "17"], "--opset"), (["--resolution", "77"], "--resolution"), (["--jobs", "0"], "--jobs"),
    (["--weights-seed", "-3"], "--weights-seed"), (["--checkpoint", "/nonexistent.pth"], "--checkpoint"),
    (["--vae", "/nonexistent.pth"], "--vae"), (["--calibration", "/nonexistent.json"], "--calibration"),
    (["--t5", "/nonexistent"], "--t5"), (["--onnx-dir", "/tmp/elsewhere"], "--onnx-dir"),
    (["--model", "nope"], "--model"), (["--dtype", "int8"], "--dtype"),
    (["--weights", "/nonexistent"], "--weights"), (["--skip-export"], "no such export directory"),
])
def test_export_validates_arguments_before_writing(tmp_path, args, needle):
    out = tmp_path / "exp"
    refused(export_cli.main, ["--model", "tiny", "--out", str(out), "--no-progress", *args], tmp_path, needle)
    assert not out.exists()  # no empty --out left behind


def test_export_with_no_matching_piece_leaves_no_out(tmp_path):
    out = tmp_path / "exp"
    refused(export_cli.main, ["--model", "tiny", "--out", str(out), "--pieces", "nomatch*", "--no-progress"],
            tmp_path, "--pieces")
    assert not out.exists()


# ----------------------------------------------------------------------------------------- real runs
@pytest.fixture(scope="module")
def shapes_export(tmp_path_factory):
    """The shapes model (packaged weights) exported with one ONNX piece: enough for the manifest, the torch
    backend and the manifest-damage cases."""
    out = tmp_path_factory.mktemp("shapes") / "exp"
    rc, _, err = run(export_cli.main, ["--model", "shapes", "--out", str(out), "--pieces", "head_s00",
                                       "--no-progress"])
    assert rc == 0, err
    return out


def test_export_records_what_it_wrote(shapes_export):
    import onnx
    from toprovar.export.onnx_export import written_opset
    m = json.loads((shapes_export / "manifest.json").read_text())
    assert m["random_weights"] is False and m["random_parts"] == []
    assert m["weights"] == {"dir": None, "model_from_dir": True}
    piece = m["pieces"]["head_s00"]
    assert piece["opset"] == m["exporter"]["opset"] == written_opset(onnx.load(str(shapes_export / piece["file"])))
    mode = 0o666 & ~_umask()
    for f in (shapes_export / "manifest.json", shapes_export / piece["file"]):
        assert stat.S_IMODE(f.stat().st_mode) == mode  # not mkstemp's 0600


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_stale_pieces_are_removed(shapes_export, tmp_path):
    from toprovar.export.onnx_export import remove_stale_pieces
    out = Path(shutil.copytree(shapes_export, tmp_path / "exp"))
    stale = [out / "onnx" / "block_99.onnx", out / "onnx" / "block_99.onnx.data"]
    for f in stale:
        f.write_bytes(b"old")
    (out / "onnx" / "notes.txt").write_text("kept: not a piece")
    m = json.loads((out / "manifest.json").read_text())
    assert remove_stale_pieces(m, out, out / "onnx") == sorted(stale)
    assert sorted(p.name for p in (out / "onnx").iterdir()) == ["head_s00.onnx", "notes.txt"]


def test_shapes_generate_with_checkpoint_loads_its_vae_and_text_encoder(tmp_path):
    """--checkpoint replaces only the transformer: the same weights give the same image as the default, and no
    random part is reported."""
    rc, _, err = run(cli.main, gen("-o", str(tmp_path / "a.png")))
    assert rc == 0, err
    rc, _, err = run(cli.main, gen("-o", str(tmp_path / "b.png"), "--checkpoint",
                                   str(SHAPES_WEIGHTS / "model.safetensors")))
    assert rc == 0, err
    assert not any("RANDOM" in ln for ln in err)
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert stat.S_IMODE((tmp_path / "a.png").stat().st_mode) == 0o666 & ~_umask()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png"]  # no temporary file left


def test_engine_dir_torch_backend_matches_the_pipeline(shapes_export, tmp_path):
    """The shapes export runs on the torch backend without extra flags, with the model's packaged calibration
    for --policy toprovar: the same PNG bytes as the PyTorch pipeline path."""
    rc, _, err = run(cli.main, gen("--policy", "toprovar", "-o", str(tmp_path / "pipe.png")))
    assert rc == 0, err
    rc, _, err = run(cli.main, gen("--engine-dir", str(shapes_export), "--backend", "torch", "--policy", "toprovar",
                                   "-o", str(tmp_path / "engine.png")))
    assert rc == 0, err
    assert not any("RANDOM" in ln for ln in err)
    assert (tmp_path / "pipe.png").read_bytes() == (tmp_path / "engine.png").read_bytes()


def test_full_disk_during_generate(tmp_path, monkeypatch):
    """ENOSPC while the PNG is written: one line, no file, no temporary left."""
    from PIL import Image

    def save(self, fp, *a, **k):
        Path(fp).write_bytes(b"\x89PNG partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(Image.Image, "save", save)
    before = snapshot(tmp_path, dir_mtimes=False)
    rc, _, err = run(cli.main, gen("-o", str(tmp_path / "a.png")))
    assert rc == 2 and len(err) == 1 and "-o" in err[0] and "No space left on device" in err[0], err
    assert snapshot(tmp_path, dir_mtimes=False) == before


# ----------------------------------------------------------------------------------------- manifests
def _damaged(shapes_export: Path, tmp_path: Path, edit) -> Path:
    out = Path(shutil.copytree(shapes_export, tmp_path / "exp"))
    m = json.loads((out / "manifest.json").read_text())
    edit(m, out)
    (out / "manifest.json").write_text(json.dumps(m))
    return out


@pytest.mark.parametrize("case", ["dotdot", "absolute", "symlink-out", "num_heads-0", "depth-str", "h_div_w-nan"])
def test_damaged_manifest_is_one_line(shapes_export, tmp_path, case):
    outside = tmp_path / "outside.onnx"
    outside.write_bytes((shapes_export / "onnx" / "head_s00.onnx").read_bytes())

    def edit(m, out):
        pc = m["pieces"]["head_s00"]
        if case == "dotdot":
            pc["file"] = "../outside.onnx"
        elif case == "absolute":
            pc["file"] = str(outside)
        elif case == "symlink-out":
            (out / "onnx" / "head_s00.onnx").unlink()
            (out / "onnx" / "head_s00.onnx").symlink_to(outside)
        elif case == "num_heads-0":
            m["model"]["num_heads"] = 0
        elif case == "depth-str":
            m["model"]["depth"] = "8"
        else:
            m["h_div_w"] = float("nan")
    out = _damaged(shapes_export, tmp_path, edit)
    needle = {"dotdot": "head_s00", "absolute": "head_s00", "symlink-out": "outside the export directory",
              "num_heads-0": "num_heads", "depth-str": "depth", "h_div_w-nan": "NaN"}[case]
    for backend in ("torch", "onnxruntime"):
        refused(cli.main, gen("--engine-dir", str(out), "--backend", backend, "-o", str(tmp_path / "a.png")),
                tmp_path, needle)


def test_engine_dir_that_is_not_an_export(tmp_path):
    (tmp_path / "empty").mkdir()
    refused(cli.main, gen("--engine-dir", str(tmp_path / "empty"), "--backend", "onnxruntime"), tmp_path,
            "no manifest.json")
    refused(cli.main, gen("--engine-dir", str(tmp_path / "none"), "--backend", "onnxruntime"), tmp_path,
            "no such export directory")


def test_fuzzed_manifests_fail_in_one_line(shapes_export, tmp_path_factory):
    """Random values at random places of a real manifest: loading, model configuration, path resolution and
    verification either work or raise one of the one-line input errors; never anything else."""
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import HealthCheck, given, settings, strategies as st
    from toprovar.export.manifest import load_manifest, verify
    from toprovar.runtime.engine_dir import model_config
    base = json.loads((shapes_export / "manifest.json").read_text())
    root = tmp_path_factory.mktemp("fuzz")
    shutil.copytree(shapes_export / "onnx", root / "onnx")
    leaves = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                       st.text(max_size=12), st.sampled_from(["../x", "/etc/passwd", "onnx/../../x", "onnx/head_s00.onnx"]),
                       st.lists(st.integers(-3, 300), max_size=3))

    def paths(obj, prefix=()):
        yield prefix
        if isinstance(obj, dict):
            for k, v in obj.items():
                yield from paths(v, prefix + (k,))
        elif isinstance(obj, list):
            for i, v in enumerate(obj[:3]):
                yield from paths(v, prefix + (i,))
    all_paths = [p for p in paths(base) if p and p[0] != "versions"]

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(st.tuples(st.sampled_from(all_paths), leaves), min_size=1, max_size=3))
    def check(edits):
        m = json.loads(json.dumps(base))
        for path, value in edits:
            node = m
            try:
                for k in path[:-1]:
                    node = node[k]
                node[path[-1]] = value
            except (KeyError, IndexError, TypeError):
                pass
        (root / "manifest.json").write_text(json.dumps(m))
        try:
            man = load_manifest(root)
            model_config(man)
            for name in man["pieces"]:
                man.piece_path(name)
            verify(man)
        except ValueError as exc:  # ManifestError, EngineDirError, ScheduleError, config errors
            assert str(exc).strip() and "\n" not in str(exc).strip(), str(exc)
    check()


# ----------------------------------------------------------------------------------------- signals
def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[1]),
                                                                       os.environ.get("PYTHONPATH")]))}


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_during_generate(tmp_path):
    """SIGINT while the scales run: exit 130, one line, no PNG and no temporary file."""
    argv = gen("-o", str(tmp_path / "a.png"), "--resolution", "256")  # 13 scales: seconds, not a blink
    proc = subprocess.Popen([sys.executable, "-m", "toprovar.cli", *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                            preexec_fn=_default_sigint)  # a background job (`cmd &`) inherits SIGINT ignored
    err = ""
    while "scales" not in err:  # wait for the progress bar: generation started (imports take long on a busy CPU)
        ch = proc.stderr.read(1)
        if not ch:
            break
        err += ch
    assert "scales" in err, f"generation did not start: {err[-300:]!r}"
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=60)
    lines = [ln for ln in (err + rest).replace("\r", "\n").splitlines()
             if ln.strip() and "%|" not in ln and "scales" not in ln]
    assert proc.returncode == 130, lines
    assert lines == ["toprovar: interrupted; no output was written (nor a partial one)"]
    assert list(tmp_path.iterdir()) == []


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_export_workers_die_with_their_parent(tmp_path):
    """SIGKILL of `toprovar-export --jobs 2`: its worker processes exit too and write no piece afterwards."""
    out = tmp_path / "exp"
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from toprovar.export.cli import main; "
                             "sys.exit(main())", "--model", "tiny", "--out", str(out), "--jobs", "2",
                             "--no-progress"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    deadline = time.time() + 120
    workers: list[int] = []
    while time.time() < deadline and proc.poll() is None:
        workers = [c for c in _children(proc.pid) if "spawn_main" in Path(f"/proc/{c}/cmdline").read_text()] \
            if Path(f"/proc/{proc.pid}").exists() else []
        if len(workers) >= 2:
            break
        time.sleep(0.2)
    assert len(workers) >= 2, "the export did not start its workers"
    time.sleep(3)  # let them reach their initializer (model built, death signal armed)
    proc.kill()
    proc.wait()
    deadline = time.time() + 30
    while time.time() < deadline and any(Path(f"/proc/{w}").exists() and
                                         "Z" not in Path(f"/proc/{w}/stat").read_text().split()[2] for w in workers):
        time.sleep(0.2)
    alive = [w for w in workers if Path(f"/proc/{w}").exists()
             and Path(f"/proc/{w}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]
    assert not alive, f"workers {alive} outlived their parent"
    pieces = sorted((out / "onnx").glob("*.onnx")) if (out / "onnx").exists() else []
    time.sleep(2)
    assert (sorted((out / "onnx").glob("*.onnx")) if (out / "onnx").exists() else []) == pieces


def test_a_directory_given_as_an_input_file(tmp_path):
    d = tmp_path / "dir"
    d.mkdir()
    refused(cli.main, gen("-o", str(tmp_path / "a.png"), "--checkpoint", str(d)), tmp_path, "--checkpoint",
            "is a directory")
    refused(cli.main, gen("-o", str(tmp_path / "a.png"), "--policy", "toprovar", "--calibration", str(d)), tmp_path,
            "--calibration", "is a directory")
    refused(cli.main, ["calibrate", "--device", "cpu", "--prompts", str(d)], tmp_path, "--prompts", "is a directory")
    refused(export_cli.main, ["--model", "tiny", "--vae", str(d), "--out", str(tmp_path / "e"), "--no-progress"],
            tmp_path, "--vae", "is a directory")
    refused(cli.main, gen("-o", str(tmp_path / "a.png"), "--weights", str(d)), tmp_path, "--weights",
            "no model.safetensors")


def test_commands_on_a_full_disk(tmpfs):
    """generate, calibrate and toprovar-export writing into a full filesystem: one line each, exit 2, no
    temporary file or created directory left (bench writes through the same ``atomic_write_files``)."""
    _fill(tmpfs / "filler")
    cases = [(cli.main, gen("-o", str(tmpfs / "a.png"))),
             (cli.main, ["calibrate", "--device", "cpu", "--prompt", PROMPT, "-o", str(tmpfs / "c.json")]),
             (export_cli.main, ["--model", "tiny", "--pieces", "head_s00", "--out", str(tmpfs / "e"),
                                "--no-progress"])]
    for main, argv in cases:
        rc, _, err = run(main, argv)
        assert rc == 2 and len(err) == 1, (argv, err)
        assert "No space left on device" in err[0] or "Errno 28" in err[0], err
        assert sorted(p.name for p in tmpfs.iterdir()) == ["filler"], argv
