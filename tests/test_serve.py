"""``toprovar serve``: a real Triton Inference Server (nvidia-pytriton's tritonserver) with the shapes model on
the CPU, answering concurrent HTTP and gRPC requests with exactly the images of ``toprovar generate``,
rejecting bad requests one by one while serving (their batch-mates answered), reporting the instance's device,
health and metrics endpoints, and shutting down on SIGTERM. Instance placement: tests/test_serve_placement.py."""
from __future__ import annotations

import importlib.util
import signal
import subprocess
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

if importlib.util.find_spec("pytriton") is None:
    pytest.skip("nvidia-pytriton (the tritonserver binary) is not installed", allow_module_level=True)
pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is not installed")

from toprovar.cli import main  # noqa: E402
from toprovar.serving.client import Client, load, wait_ready  # noqa: E402
from toprovar.serving.server import free_ports  # noqa: E402

PROMPTS = ["a red square left of a blue circle", "two green triangles", "a yellow circle", "a blue square"]


@pytest.fixture(scope="module")
def server():
    http, grpc, metrics = free_ports(3)
    cmd = [sys.executable, "-m", "toprovar.cli", "serve", "--model", "shapes", "--device", "cpu",
           "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics),
           "--max-batch", "4", "--queue-delay-ms", "300", "--batch-buckets", "2,4",  # buckets: padded batches
           "--warmup", "none"]  # each bucket generated twice before ready
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_ready(f"localhost:{http}", 240, proc)
    except (RuntimeError, TimeoutError) as exc:
        proc.kill()
        pytest.fail(f"{exc}:\n{proc.stdout.read()[-3000:]}")
    yield {"proc": proc, "http": f"localhost:{http}", "grpc": f"grpc://localhost:{grpc}", "metrics": metrics}
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[list[int], list[np.ndarray]]:
    """Seeds and what ONE ``toprovar generate`` writes for PROMPTS with --seed s (prompt i: seed s + i; a
    prompt's image does not depend on the others, tests/test_batch.py)."""
    s = int(np.random.default_rng().integers(0, 2**31))
    out = tmp_path_factory.mktemp("generate") / "gen.png"
    args = ["generate", "--model", "shapes", "--device", "cpu", "--seed", str(s), "-o", str(out)]
    assert main(args + [a for p in PROMPTS for a in ("--prompt", p)]) == 0
    return [s + i for i in range(len(PROMPTS))], [np.asarray(Image.open(out.with_name(f"gen_{i}.png")).convert("RGB"))
                                                  for i in range(len(PROMPTS))]


def metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") and 'model="toprovar"' in line)


def test_concurrent_http_and_grpc_requests_return_the_generate_images(server, reference):
    seeds, expected = reference
    urls = [server["http"], server["grpc"]] * (len(PROMPTS) // 2)
    execs0, reqs0 = metric(server["metrics"], "nv_inference_exec_count"), metric(server["metrics"],
                                                                                 "nv_inference_request_success")

    def one(i):
        c = Client(urls[i])
        try:
            return c.infer([PROMPTS[i]], [seeds[i]])
        finally:
            c.close()

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        results = list(pool.map(one, range(len(PROMPTS))))
    for i, (images, devices) in enumerate(results):
        assert images.shape[0] == 1 and images.dtype == np.uint8 and images.shape[-1] == 3
        assert devices == ["cpu toprovar_0_0"]  # the instance reports its device
        assert np.array_equal(images[0], expected[i]), f"request {i} ({urls[i]})"
    execs = metric(server["metrics"], "nv_inference_exec_count") - execs0
    reqs = metric(server["metrics"], "nv_inference_request_success") - reqs0
    assert reqs == len(PROMPTS) and execs < reqs, "the dynamic batcher must have batched some requests"


BAD = [
    ({"prompts": [""]}, "prompt: empty"),
    ({"prompts": ["x" * 300]}, "tokens exceed the"),
    ({"prompts": ["a"], "policies": ["bogus"]}, "policy: unknown policy 'bogus'"),
    ({"prompts": ["a"], "cfgs": [float("nan")]}, "cfg: must be a finite number >= 0, got nan"),
    ({"prompts": ["a"], "cfgs": [-1.0]}, "cfg: must be a finite number >= 0, got -1.0"),
    ({"prompts": ["a"], "raw": {"seed": np.array([[1.5]], dtype=np.float32)}}, "'seed' data-type is 'FP32'"),
    ({"prompts": ["a"], "raw": {"cfg": np.array([[3]], dtype=np.int32)}}, "'cfg' data-type is 'INT32'"),
]


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_bad_requests_fail_alone_and_the_server_keeps_serving(server, reference, protocol):
    url = server[protocol]
    seeds, expected = reference

    def send(kw):
        c = Client(url)
        try:
            return c.infer(kw["prompts"], kw.get("seeds"), kw.get("cfgs"), kw.get("policies"), kw.get("raw"))
        except Exception as exc:  # noqa: BLE001
            return exc
        finally:
            c.close()

    with ThreadPoolExecutor(len(BAD) + 1) as pool:  # bad requests batched with a good one
        futures = [pool.submit(send, kw) for kw, _ in BAD] + [pool.submit(send, {"prompts": [PROMPTS[1]],
                                                                                 "seeds": [seeds[1]]})]
        results = [f.result() for f in futures]
    for (kw, message), res in zip(BAD, results):
        assert isinstance(res, Exception), f"{kw}: no error"
        assert message in str(res), f"{kw}: {res}"
    images, _ = results[-1]
    assert np.array_equal(images[0], expected[1])  # the good batch-mate was served as if alone


def test_health_metrics_and_load_generator(server):
    base = f"http://{server['http']}/v2"
    for path in ("/health/live", "/health/ready", "/models/toprovar/ready"):
        assert urllib.request.urlopen(base + path, timeout=10).status == 200
    res = load(server["grpc"], concurrency=3, requests=3, prompts=PROMPTS).summary()
    assert res["ok"] == 3 and res["errors"] == 0 and res["devices"] == {"cpu toprovar_0_0": 3}
    assert 0 < res["latency_ms"]["p50"] <= res["latency_ms"]["p99"] and res["images_per_s"] > 0
    order = res["latencies_ms_in_order"]  # each request's latency, as they completed
    assert len(order) == 3 and np.percentile(order, 50) == pytest.approx(res["latency_ms"]["p50"], abs=0.1)
    assert metric(server["metrics"], "nv_inference_request_success") >= 3


def test_sigterm_shuts_down_cleanly(server):
    proc = server["proc"]
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("toprovar serve did not exit within 90 s of SIGTERM")
    log = proc.stdout.read()
    assert rc == 0, log[-2000:]
    assert "successfully unloaded 'toprovar'" in log
    assert "warm-up (none x4, none x2) in " in log  # --warmup none with buckets 2,4, before ready
    assert not Client(server["http"]).ready()


def test_serve_argument_errors_are_one_line(tmp_path, capsys):
    assert main(["serve", "--engine-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"toprovar: error: --engine-dir: {tmp_path}: no manifest.json (not a " \
                                              f"toprovar-export directory)"
    assert main(["serve", "--policy", "bogus"]) == 2
    assert "--policy: unknown policy 'bogus'" in capsys.readouterr().err
    assert main(["serve", "--http-port", "8000", "--grpc-port", "8000"]) == 2
    assert "three different ports" in capsys.readouterr().err
    for value, message in [("0,2", "sizes must be in 1..8 (--max-batch), got '0,2'"),
                           ("4,9", "sizes must be in 1..8 (--max-batch), got '4,9'"),
                           ("two", "'two' is not auto, off or a list of batch sizes")]:
        assert main(["serve", "--batch-buckets", value]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("toprovar: error: --batch-buckets: ") and message in err and "\n" not in err, err
    for value, message in [("none,bogus", "'bogus' is not auto, off or a list of policies"),
                           (",", "',' is not auto, off or a list of policies")]:
        assert main(["serve", "--warmup", value]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("toprovar: error: --warmup: ") and message in err and "\n" not in err, err


def test_batch_buckets_resolve_and_stay_inside_the_instances():
    """auto: powers of two up to --max-batch on GPU instances of a pipeline model, none on the CPU or for an
    export directory; they are not the dynamic batcher's preferred sizes (a preferred size runs as soon as it can
    be formed: two of sixteen requests arriving together would run as a batch of 2)."""
    import argparse

    from toprovar.serving.server import add_serve_args, batch_buckets, model_config
    p = argparse.ArgumentParser()
    add_serve_args(p)
    gpu, cpu = [{"kind": "KIND_GPU", "count": 1, "gpus": [0]}], [{"kind": "KIND_CPU", "count": 1}]
    assert batch_buckets(p.parse_args(["--max-batch", "16"]), gpu) == [1, 2, 4, 8, 16]
    assert batch_buckets(p.parse_args(["--max-batch", "12"]), gpu) == [1, 2, 4, 8, 12]
    assert batch_buckets(p.parse_args(["--max-batch", "16"]), cpu) is None
    assert batch_buckets(p.parse_args(["--max-batch", "16", "--engine-dir", "x"]), gpu) is None
    assert batch_buckets(p.parse_args(["--max-batch", "16", "--batch-buckets", "off"]), gpu) is None
    assert batch_buckets(p.parse_args(["--max-batch", "8", "--batch-buckets", "4,2,2"]), cpu) == [2, 4, 8]
    from toprovar.serving.server import warmup_policies
    assert warmup_policies(p.parse_args([]), [1, 2, 4]) == ["none"]  # auto: the default policy
    assert warmup_policies(p.parse_args(["--policy", "skipvar"]), [1, 2]) == ["skipvar"]
    assert warmup_policies(p.parse_args(["--warmup", "none,toprovar-pinned"]), [4]) == ["none", "toprovar-pinned"]
    assert warmup_policies(p.parse_args(["--warmup", "off"]), [1, 2, 4]) == []
    assert warmup_policies(p.parse_args(["--warmup", "none"]), None) == []  # no buckets: nothing to warm
    config = model_config(16, 20000, gpu)
    assert "dynamic_batching { max_queue_delay_microseconds: 20000 }" in config and "preferred" not in config



def test_model_py_puts_the_servers_pythonpath_first(tmp_path, monkeypatch):
    """The Python-backend stub ignores PYTHONPATH: model.py puts the server's PYTHONPATH directories (a carried
    site with numpy<2) before the environment's site directories."""
    from toprovar.serving.server import model_py
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    prefix = model_py().split("from toprovar")[0]
    monkeypatch.setattr(sys, "path", list(sys.path))
    exec(prefix, {})
    assert sys.path[0] == str(tmp_path.resolve())


def test_wait_ready_stops_when_the_server_process_exits():
    """A server that exits before it is ready: wait_ready says so at once, not after its timeout."""
    (port,) = free_ports(1)
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    proc.wait()
    with pytest.raises(RuntimeError, match="exited with status 3 before it was ready"):
        wait_ready(f"localhost:{port}", 600, proc)
