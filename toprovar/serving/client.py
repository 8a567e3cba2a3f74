"""Clients of the ``toprovar`` model: one request (``toprovar client``) and a closed-loop load generator
(the serving benchmark), over Triton's HTTP or gRPC protocol (``tritonclient``).

URLs: ``localhost:8000`` or ``http://localhost:8000`` (HTTP), ``grpc://localhost:8001`` (gRPC).
"""
from __future__ import annotations

import argparse
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

MODEL_NAME = "toprovar"


def split_url(url: str) -> tuple[str, str]:
    """'grpc://h:p' -> ('grpc', 'h:p'); 'http://h:p' or 'h:p' -> ('http', 'h:p')."""
    for proto in ("grpc", "http"):
        if url.startswith(proto + "://"):
            return proto, url[len(proto) + 3:].rstrip("/")
    if "://" in url:
        raise ValueError(f"--url: {url!r}: use http://HOST:PORT, grpc://HOST:PORT or HOST:PORT")
    return "http", url.rstrip("/")


class Client:
    """One connection to the server (not shared between threads)."""

    def __init__(self, url: str, timeout: float = 600.0):
        self.protocol, self.address = split_url(url)
        if self.protocol == "grpc":
            import tritonclient.grpc as tc
            self._c = tc.InferenceServerClient(self.address)
        else:
            import tritonclient.http as tc
            self._c = tc.InferenceServerClient(self.address, connection_timeout=timeout, network_timeout=timeout)
        self._tc = tc

    def ready(self) -> bool:
        try:
            return bool(self._c.is_server_ready() and self._c.is_model_ready(MODEL_NAME))
        except Exception:  # noqa: BLE001  (not up yet: connection refused)
            return False

    def infer(self, prompts: list[str], seeds: list[int] | None = None, cfgs: list[float] | None = None,
              policies: list[str] | None = None, raw: dict | None = None) -> tuple[np.ndarray, list[str]]:
        """One request of len(prompts) rows -> images (n, H, W, 3) uint8 and each row's instance device.
        ``raw``: {input name: numpy array} sent as given (tests of bad requests)."""
        cols = {"prompt": np.array([[p.encode()] for p in prompts], dtype=np.object_)}
        if seeds is not None:
            cols["seed"] = np.array([[s] for s in seeds], dtype=np.int64)
        if cfgs is not None:
            cols["cfg"] = np.array([[c] for c in cfgs], dtype=np.float32)
        if policies is not None:
            cols["policy"] = np.array([[p.encode()] for p in policies], dtype=np.object_)
        cols.update(raw or {})
        inputs = []
        for name, arr in cols.items():
            dtype = "BYTES" if arr.dtype == np.object_ else _triton_dtype(arr.dtype)
            t = self._tc.InferInput(name, list(arr.shape), dtype)
            t.set_data_from_numpy(arr)
            inputs.append(t)
        outputs = [self._tc.InferRequestedOutput(n) for n in ("image", "device")]
        res = self._c.infer(MODEL_NAME, inputs, outputs=outputs)
        return res.as_numpy("image"), [d.decode() for d in res.as_numpy("device").reshape(-1)]

    def close(self) -> None:
        self._c.close()


def _triton_dtype(dtype: np.dtype) -> str:
    from tritonclient.utils import np_to_triton_dtype
    return np_to_triton_dtype(dtype)


# ------------------------------------------------------------------------------------------ load generator
@dataclass
class LoadResult:
    """A closed-loop run: ``concurrency`` clients each sending one request after the other."""
    concurrency: int
    requests: int
    wall_s: float
    latencies_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    devices: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict:
        lat = sorted(self.latencies_ms)
        pct = (lambda q: float(np.percentile(lat, q)) if lat else float("nan"))  # noqa: E731
        return {"concurrency": self.concurrency, "requests": self.requests, "ok": len(lat),
                "errors": len(self.errors), "first_error": self.errors[0] if self.errors else None,
                "wall_s": self.wall_s, "images_per_s": len(lat) / self.wall_s if self.wall_s > 0 else float("nan"),
                "latency_ms": {"mean": statistics.fmean(lat) if lat else float("nan"), "p50": pct(50),
                               "p95": pct(95), "p99": pct(99)}, "devices": dict(self.devices),
                "latencies_ms_in_order": [round(v, 1) for v in self.latencies_ms]}  # in completion order


def load(url: str, concurrency: int, requests: int, prompts: list[str], policy: str | None = None,
         seed: int = 0, cfg: float | None = None) -> LoadResult:
    """Send ``requests`` one-prompt requests from ``concurrency`` threads (closed loop: a thread sends its
    next request when the previous one is answered); request i uses prompts[i % len] and seed + i."""
    out = LoadResult(concurrency, requests, 0.0)
    lock, counter = threading.Lock(), iter(range(requests))

    def worker():
        c = Client(url)
        try:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                t0 = time.perf_counter()
                try:
                    _, dev = c.infer([prompts[i % len(prompts)]], [seed + i], None if cfg is None else [cfg],
                                     None if policy is None else [policy])
                except Exception as exc:  # noqa: BLE001  (recorded, the run goes on)
                    with lock:
                        out.errors.append(str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc))
                    continue
                ms = (time.perf_counter() - t0) * 1e3
                with lock:
                    out.latencies_ms.append(ms)
                    out.devices[dev[0]] = out.devices.get(dev[0], 0) + 1
        finally:
            c.close()

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(worker) for _ in range(concurrency)]:
            f.result()
    out.wall_s = time.perf_counter() - t0
    return out


def wait_ready(url: str, timeout: float, proc=None) -> None:
    """Block until the server and the model are ready: TimeoutError after ``timeout`` s, RuntimeError as soon
    as ``proc`` (the server's ``subprocess.Popen``, if given) has exited."""
    c, t0 = Client(url), time.monotonic()
    try:
        while not c.ready():
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"toprovar serve exited with status {proc.returncode} before it was ready")
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"{url}: model {MODEL_NAME} not ready after {timeout:g} s")
            time.sleep(0.5)
    finally:
        c.close()


# ------------------------------------------------------------------------------------------ command line
def add_client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="localhost:8000", help="HOST:PORT / http://HOST:PORT / grpc://HOST:PORT")
    p.add_argument("--prompt", action="append", required=True, help="text prompt (repeat for several images)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first prompt (prompt i: seed + i)")
    p.add_argument("--cfg", type=float, default=None, help="CFG scale (default: the server model's)")
    p.add_argument("--policy", default=None, help="pruning policy (default: the server's --policy)")
    p.add_argument("-o", "--output", default="output/toprovar.png", help="PNG path (several prompts: _i appended)")


def cmd_client(args: argparse.Namespace) -> int:
    from pathlib import Path

    from toprovar.images import save_png
    c = Client(args.url)
    try:
        for i, prompt in enumerate(args.prompt):
            t0 = time.perf_counter()
            images, dev = c.infer([prompt], [args.seed + i], None if args.cfg is None else [args.cfg],
                                  None if args.policy is None else [args.policy])
            out = Path(args.output)
            if len(args.prompt) > 1:
                out = out.with_name(f"{out.stem}_{i}{out.suffix}")
            path = save_png(images[0], out)
            print(f"{path}  ({(time.perf_counter() - t0) * 1e3:.0f} ms, {dev[0]})")
    except Exception as exc:  # tritonclient's InferenceServerException: the server's message
        raise RuntimeError(f"client: {str(exc).strip().splitlines()[0] if str(exc).strip() else exc!r}") from None
    finally:
        c.close()
    return 0

