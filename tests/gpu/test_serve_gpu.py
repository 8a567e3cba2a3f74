"""``toprovar serve`` on a GPU (run on the device with the carried serving site, bench/serve_device.sh's
PYTHONPATH): the shapes model in a Triton instance on cuda:0 answers concurrent HTTP and gRPC requests with
the images of ``toprovar generate --device cuda`` for the same seeds, reports its GPU, and stops on SIGTERM."""
from __future__ import annotations

import importlib.util
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.skipif(importlib.util.find_spec("pytriton") is None,
                                 reason="nvidia-pytriton (the tritonserver binary) is not importable")]

PROMPTS = ["a red square left of a blue circle", "two green triangles", "a yellow circle", "a blue square"]


@pytest.fixture(scope="module")
def server():
    from toprovar.serving.client import wait_ready
    from toprovar.serving.server import free_ports
    http, grpc, metrics = free_ports(3)
    proc = subprocess.Popen([sys.executable, "-m", "toprovar.cli", "serve", "--model", "shapes", "--device", "cuda",
                             "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics),
                             "--max-batch", "4", "--queue-delay-ms", "200"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    t0 = time.monotonic()
    try:
        wait_ready(f"localhost:{http}", 240, proc)
    except (RuntimeError, TimeoutError) as exc:
        proc.kill()
        pytest.fail(f"{exc}:\n{proc.stdout.read()[-4000:]}")
    print(f"server ready in {time.monotonic() - t0:.1f} s")
    yield {"proc": proc, "urls": [f"localhost:{http}", f"grpc://localhost:{grpc}"]}
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_gpu_instance_serves_the_generate_images(server, tmp_path):
    from toprovar.cli import main
    from toprovar.serving.client import Client
    s = int(np.random.default_rng().integers(0, 2**31))
    out = tmp_path / "gen.png"
    assert main(["generate", "--model", "shapes", "--device", "cuda", "--seed", str(s), "-o", str(out)]
                + [a for p in PROMPTS for a in ("--prompt", p)]) == 0
    expected = [np.asarray(Image.open(out.with_name(f"gen_{i}.png")).convert("RGB")) for i in range(len(PROMPTS))]

    def one(i):
        c = Client(server["urls"][i % 2])
        try:
            return c.infer([PROMPTS[i]], [s + i])
        finally:
            c.close()

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        results = list(pool.map(one, range(len(PROMPTS))))
    gpu = torch.cuda.get_device_name(0)
    same = [bool(np.array_equal(images[0], expected[i])) for i, (images, _) in enumerate(results)]
    print(f"served == generate (seed by seed): {same}")
    for i, (images, devices) in enumerate(results):
        assert images.shape[0] == 1 and images.dtype == np.uint8 and images.shape[-1] == 3
        assert devices == [f"cuda:0 {gpu} toprovar_0_0"]
    assert all(same), f"served images differ from `toprovar generate` for seeds {[s + i for i, ok in enumerate(same) if not ok]}"


def test_sigterm_stops_the_server(server):
    proc = server["proc"]
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out[-3000:]
