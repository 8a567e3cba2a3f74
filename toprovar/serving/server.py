"""``toprovar serve``: a Triton Inference Server serving the model ``toprovar``.

The ``nvidia-pytriton`` wheel brings the ``tritonserver`` binary and the Python-backend stubs; this module
writes a model repository (``config.pbtxt`` with the dynamic batcher and one instance per visible GPU,
``model.py`` loading ``toprovar.serving.triton_model``), starts ``tritonserver`` on it and waits until it
is ready. SIGTERM / SIGINT are passed on to Triton, which stops accepting requests, finishes the ones in
flight, unloads the model and exits.

The Python-backend stub links ``libpython3.X.so``; the loader must find the running interpreter's own
(another build of the same minor version on the system breaks model loading), so ``LD_LIBRARY_PATH``
starts with this interpreter's ``sysconfig`` LIBDIR.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import site
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from pathlib import Path

from .placement import instance_groups, to_pbtxt, visible_gpus
from .service import POLICY_NAMES, default_buckets, parse_buckets

MODEL_NAME = "toprovar"
OPTIONS_FILE = "toprovar_options.json"  # the model's options, next to its model.py
SHM_BYTES = 64 * 2**20  # Python-backend shared memory per instance (grows by the same step)


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on 127.0.0.1 right now (for tests and benchmarks that start a server)."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class ServeError(RuntimeError):
    """The server cannot start as asked (one line)."""


def triton_dist() -> Path:
    """The ``tritonserver`` distribution of the nvidia-pytriton wheel (found, not imported: its Python API is
    not used)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ServeError("serve: nvidia-pytriton is not installed; pip install nvidia-pytriton==0.7.0")
    dist = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
    if not (dist / "bin" / "tritonserver").is_file():
        raise ServeError(f"serve: {dist}/bin/tritonserver not found (a broken nvidia-pytriton install)")
    return dist


def server_env(base: dict | None = None) -> dict:
    """Environment of the tritonserver process: this interpreter's LIBDIR first on LD_LIBRARY_PATH (the stub's
    libpython), the wheel's bundled libraries, this interpreter's bin directory first on PATH."""
    env = dict(os.environ if base is None else base)
    libs = [sysconfig.get_config_var("LIBDIR"), str(triton_dist().parent.parent / "nvidia_pytriton.libs")]
    old = env.get("LD_LIBRARY_PATH")
    env["LD_LIBRARY_PATH"] = os.pathsep.join([p for p in libs if p and Path(p).is_dir()] + ([old] if old else []))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def backend_dir(work: Path) -> Path:
    """A backends/ directory for Triton: the wheel's Python backend with the stub of this Python version."""
    dist = triton_dist()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServeError(f"serve: nvidia-pytriton has no Python-backend stub for Python {version} ({stub})")
    py = work / "backends" / "python"
    py.mkdir(parents=True)
    for f in (dist / "backends" / "python").iterdir():
        if f.is_file():
            (py / f.name).symlink_to(f)
    (py / "triton_python_backend_stub").symlink_to(stub)
    return work / "backends"


def model_config(max_batch: int, queue_delay_us: int, groups: list[dict]) -> str:
    """config.pbtxt of the model ``toprovar``. No ``preferred_batch_size``: Triton sends a batch of a preferred
    size the moment one can be formed, so with sizes 2, 4, 8, 16 the first two of sixteen requests arriving
    together would run as a batch of 2. Without them the batcher waits up to the queue delay for a full batch
    (the instances split batches into their buckets themselves, ``ImageService.split``)."""
    return f"""name: "{MODEL_NAME}"
backend: "python"
max_batch_size: {max_batch}
input [
  {{ name: "prompt", data_type: TYPE_STRING, dims: [ 1 ] }},
  {{ name: "seed", data_type: TYPE_INT64, dims: [ 1 ], optional: true }},
  {{ name: "cfg", data_type: TYPE_FP32, dims: [ 1 ], optional: true }},
  {{ name: "policy", data_type: TYPE_STRING, dims: [ 1 ], optional: true }}
]
output [
  {{ name: "image", data_type: TYPE_UINT8, dims: [ -1, -1, 3 ] }},
  {{ name: "device", data_type: TYPE_STRING, dims: [ 1 ] }}
]
dynamic_batching {{ max_queue_delay_microseconds: {queue_delay_us} }}
{to_pbtxt(groups)}"""


def model_py() -> str:
    """The repository's model.py: this process's PYTHONPATH directories first (the stub's interpreter ignores
    PYTHONPATH: a carried site, e.g. numpy<2 over the environment's numpy 2, must win), then this environment's
    site directories (the stub does not read a virtual environment's .pth files), then the model class."""
    env = [str(Path(d).resolve()) for d in os.environ.get("PYTHONPATH", "").split(os.pathsep) if d and Path(d).is_dir()]
    dirs = [d for d in site.getsitepackages() + [site.getusersitepackages()] if Path(d).is_dir()]
    return ("import site\nimport sys\n"
            f"sys.path[:0] = {env!r}\n"
            f"for _d in {dirs!r}:\n"
            "    site.addsitedir(_d)\n"
            "from toprovar.serving.triton_model import TritonPythonModel  # noqa: E402,F401\n")


def write_repository(root: Path, options: dict, max_batch: int, queue_delay_us: int, groups: list[dict]) -> Path:
    """The model repository: root/toprovar/{config.pbtxt, 1/model.py, 1/toprovar_options.json}."""
    m = root / MODEL_NAME
    (m / "1").mkdir(parents=True)
    (m / "config.pbtxt").write_text(model_config(max_batch, queue_delay_us, groups))
    (m / "1" / "model.py").write_text(model_py())
    (m / "1" / OPTIONS_FILE).write_text(json.dumps(options, indent=1))
    return root


def ready(http_port: int, host: str = "127.0.0.1", timeout: float = 2.0) -> bool:
    """Whether the server's readiness endpoint answers 200."""
    try:
        with urllib.request.urlopen(f"http://{host}:{http_port}/v2/health/ready", timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="pipeline model, as `toprovar generate` takes it (default: shapes)")
    p.add_argument("--engine-dir", default=None, metavar="DIR", help="serve this export directory instead")
    p.add_argument("--backend", default="torch", help="with --engine-dir: trt | onnxruntime | torch")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: one instance per visible GPU, else one CPU instance")
    p.add_argument("--dtype", default="float32", help="pipeline model dtype (float32 | bfloat16 | float16)")
    p.add_argument("--resolution", type=int, default=None, help="pipeline model: longer image side in pixels")
    p.add_argument("--weights-seed", type=int, default=0)
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--vae", default=None)
    p.add_argument("--t5", default=None)
    p.add_argument("--calibration", default=None, help="calibration JSON for the ToProVAR policies")
    p.add_argument("--compile", action="store_true", help="torch.compile the pipeline's blocks and decoder")
    p.add_argument("--random-text-encoder", action="store_true",
                   help="pipeline model without --t5: a random 2-layer T5 stands in for flan-t5-xl (benchmarks)")
    p.add_argument("--policy", default="none", help=f"policy of requests that name none ({', '.join(POLICY_NAMES)})")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--max-batch", type=int, default=8, help="largest dynamic batch (prompts per generation)")
    p.add_argument("--queue-delay-ms", type=float, default=5.0,
                   help="how long the dynamic batcher waits to fill a batch")
    p.add_argument("--batch-buckets", default="auto", metavar="auto|off|SIZES",
                   help="run batches of graphed policies as pieces of these sizes, padding the fewest rows (e.g. "
                        "1,2,4,8); auto: powers of two up "
                        "to --max-batch on GPU instances of a pipeline model (one CUDA-graph plan per size), off "
                        "elsewhere")
    p.add_argument("--warmup", default="auto", metavar="auto|off|POLICIES",
                   help="before reporting ready, generate every batch bucket twice (eager warm-up, CUDA-graph capture) "
                        "for these graphed policies (e.g. none,toprovar-pinned); auto: --policy where there are "
                        "batch buckets, off elsewhere")
    p.add_argument("--instances-per-gpu", type=int, default=1, help="model instances on each GPU (default 1)")
    p.add_argument("--gpus", default=None, help="comma-separated visible GPU indices to use (default: all)")
    p.add_argument("--startup-timeout", type=float, default=900.0, help="seconds to wait for the model to load")
    p.add_argument("--log-verbose", type=int, default=0)


def check_args(args: argparse.Namespace) -> None:
    """One-line errors before anything starts."""
    if args.engine_dir and args.model:
        raise ServeError("serve: give --model or --engine-dir, not both")
    if args.engine_dir and not (Path(args.engine_dir) / "manifest.json").is_file():
        raise ServeError(f"--engine-dir: {args.engine_dir}: no manifest.json (not a toprovar-export directory)")
    if args.policy not in POLICY_NAMES:
        raise ServeError(f"--policy: unknown policy {args.policy!r}; choose from {', '.join(POLICY_NAMES)}")
    if args.max_batch < 1:
        raise ServeError(f"--max-batch: must be >= 1, got {args.max_batch}")
    if args.queue_delay_ms < 0:
        raise ServeError(f"--queue-delay-ms: must be >= 0, got {args.queue_delay_ms}")
    try:
        parse_buckets(args.batch_buckets, args.max_batch)
    except ValueError as exc:
        raise ServeError(str(exc)) from None
    parse_warmup(args.warmup)
    ports = [args.http_port, args.grpc_port, args.metrics_port]
    if len(set(ports)) != 3 or not all(0 < p < 65536 for p in ports):
        raise ServeError(f"--http-port/--grpc-port/--metrics-port: three different ports in 1..65535, got {ports}")


def placement(args: argparse.Namespace) -> list[dict]:
    gpus = 0 if args.device == "cpu" else visible_gpus()
    if args.device == "cuda" and gpus == 0:
        raise ServeError("--device cuda: no GPU is visible")
    ids = [int(g) for g in args.gpus.split(",")] if args.gpus else None
    return instance_groups(gpus, args.instances_per_gpu, ids)


def batch_buckets(args: argparse.Namespace, groups: list[dict]) -> list[int] | None:
    """The instances' batch buckets: ``--batch-buckets`` resolved ("auto": ``default_buckets`` when the
    instances are GPUs running a pipeline model, whose generations replay whole-scale CUDA graphs)."""
    buckets = parse_buckets(args.batch_buckets, args.max_batch)
    if buckets == "auto":
        graphed = not args.engine_dir and groups[0]["kind"] == "KIND_GPU"
        return default_buckets(args.max_batch) if graphed else None
    return buckets


def parse_warmup(text: str) -> list[str] | str | None:
    """``--warmup``: "auto", "off" (None) or policy names "none,toprovar-pinned" (ServeError naming the flag
    for an unknown one)."""
    text = text.strip()
    if text in ("auto", "off"):
        return None if text == "off" else "auto"
    names = [v.strip() for v in text.split(",") if v.strip()]
    bad = [n for n in names if n not in POLICY_NAMES]
    if not names or bad:
        raise ServeError(f"--warmup: {', '.join(map(repr, bad)) or repr(text)} is not auto, off or a list of policies "
                         f"({', '.join(POLICY_NAMES)})")
    return names


def warmup_policies(args: argparse.Namespace, buckets: list[int] | None) -> list[str]:
    """The policies the instances warm up (``--warmup`` resolved; "auto": ``--policy`` when there are batch
    buckets). Without buckets there is nothing to warm."""
    names = parse_warmup(args.warmup)
    if not buckets or names is None:
        return []
    return [args.policy] if names == "auto" else names


def check_numpy() -> None:
    """The Python-backend stub of Triton 2.51 (nvidia-pytriton 0.7.0) reads numpy 2 arrays with wrong strides
    (BYTES inputs arrive garbled, the stub dies): refuse numpy 2 with one line."""
    import numpy
    if int(numpy.__version__.split(".")[0]) >= 2:
        raise ServeError(f"serve: the Triton Python-backend stub of nvidia-pytriton 0.7.0 needs numpy<2, this "
                         f"environment has numpy {numpy.__version__}; pip install 'numpy<2'")


def cmd_serve(args: argparse.Namespace) -> int:
    check_args(args)
    check_numpy()
    groups = placement(args)
    options = {"model": {"model": args.model, "engine_dir": str(Path(args.engine_dir).resolve()) if args.engine_dir
                         else None, "backend": args.backend, "dtype": args.dtype, "resolution": args.resolution,
                         "weights_seed": args.weights_seed, "checkpoint": args.checkpoint, "vae": args.vae,
                         "t5": args.t5, "calibration": args.calibration, "compile": args.compile,
                         "random_text_encoder": args.random_text_encoder},
               "default_policy": args.policy, "max_batch": args.max_batch,
               "batch_buckets": batch_buckets(args, groups)}
    options["warmup"] = warmup_policies(args, options["batch_buckets"])
    work = Path(tempfile.mkdtemp(prefix="toprovar-serve-"))
    proc = None
    try:
        repo = write_repository(work / "models", options, args.max_batch, int(args.queue_delay_ms * 1000), groups)
        cmd = [str(triton_dist() / "bin" / "tritonserver"), f"--model-repository={repo}",
               f"--backend-directory={backend_dir(work)}", f"--http-port={args.http_port}",
               f"--grpc-port={args.grpc_port}", f"--metrics-port={args.metrics_port}", "--allow-metrics=true",
               f"--allow-gpu-metrics={'true' if groups[0]['kind'] == 'KIND_GPU' else 'false'}",
               f"--backend-config=python,shm-default-byte-size={SHM_BYTES}",
               f"--backend-config=python,shm-growth-byte-size={SHM_BYTES}",
               f"--log-verbose={args.log_verbose}", "--exit-timeout-secs=60", "--exit-on-error=true"]
        proc = subprocess.Popen(cmd, env=server_env(), start_new_session=True)
        stop = {"signal": None}

        def forward(signum, frame):  # graceful: Triton drains in-flight requests and unloads the model
            stop["signal"] = signum
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

        signal.signal(signal.SIGTERM, forward)
        signal.signal(signal.SIGINT, forward)
        t0 = time.monotonic()
        while not ready(args.http_port):
            if proc.poll() is not None:
                if stop["signal"] is not None:
                    return 0
                raise ServeError(f"serve: tritonserver exited with status {proc.returncode} before the model was "
                                 f"ready (its log is above)")
            if time.monotonic() - t0 > args.startup_timeout:
                raise ServeError(f"serve: the model was not ready after {args.startup_timeout:g} s")
            time.sleep(0.5)
        where = ", ".join(f"{g['count']} x {'GPU ' + str(g['gpus']) if g.get('gpus') else 'CPU'}" for g in groups)
        print(f"toprovar serve: model '{MODEL_NAME}' ready ({where}) in {time.monotonic() - t0:.1f} s; "
              f"HTTP localhost:{args.http_port}, gRPC localhost:{args.grpc_port}, "
              f"metrics http://localhost:{args.metrics_port}/metrics", file=sys.stderr, flush=True)
        rc = proc.wait()
        return 0 if stop["signal"] is not None and rc in (0, -signal.SIGTERM) else rc
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(work, ignore_errors=True)
