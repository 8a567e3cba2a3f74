"""polygraphy comparisons of exported pieces with the PyTorch modules they were exported from.

``TorchRunner`` is a polygraphy ``BaseRunner`` over a piece's nn.Module, so ``Comparator.run`` can put
it next to polygraphy's ONNX Runtime (``OnnxrtRunner``) or TensorRT (``TrtRunner``) runners;
``piece_feeds`` gives deterministic inputs per piece kind, several token counts / cache lengths / batch
sizes for the dynamic pieces; ``TOLERANCES`` are the float32 tolerances the tests assert.

    specs = {s.name: s for s in build_specs(req)[1]}
    ok, results = compare_piece(manifest, "block_00_entropy", specs["block_00_entropy"])
"""
from __future__ import annotations

import time
from collections import OrderedDict

import numpy as np
import torch
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata

from .pieces import PieceSpec

# float32 tolerances (atol, rtol) per piece kind and output; bits, counts and orders are exact.
# (measured max |diff| on the tiny model, CPU, ORT 1.32: block x_out 5e-7, v 1e-6, entropy 1e-6; T5 2e-6;
# VAE 4e-6; everything else <= 7e-7; bits, counts, orders, lengths identical)
TOLERANCES: dict[str, dict[str, tuple[float, float]]] = {
    "block": {"x_out": (2e-5, 1e-5), "k": (1e-5, 1e-5), "v": (1e-5, 1e-5), "entropy": (2e-5, 1e-5)},
    "condition": {"cond": (1e-5, 1e-5), "ada": (1e-5, 1e-5), "ca_kv": (1e-5, 1e-5), "ca_lengths": (0, 0),
                  "x0": (1e-5, 1e-5)},
    "head": {"bits": (0, 0)},
    "next_input": {"summed_out": (1e-6, 1e-6), "x_next": (1e-5, 1e-5)},
    "policy": {"p_keep": (1e-6, 1e-6), "k": (0, 0), "order": (0, 0)},
    "text_encoder": {"hidden": (5e-5, 1e-5)},
    "vae_decoder": {"image": (5e-5, 1e-5)},
}
# TensorRT fuses differently (TF32 is cleared at build: float32 stays float32): looser; sampled
# bits may flip where u is within rounding of p(1): the head is compared by the mean (flip rate <= 1%)
TRT_TOLERANCES: dict[str, tuple[float, float]] = {"block": (5e-3, 5e-3), "condition": (2e-3, 2e-3),
                                                   "next_input": (1e-4, 1e-4), "text_encoder": (5e-3, 5e-3),
                                                   "vae_decoder": (5e-3, 5e-3), "policy": (1e-6, 0.0)}


def _np_dtype(name: str):
    return {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32,
            "bool": np.bool_, "uint8": np.uint8, "int8": np.int8}.get(name, np.float32)


class TorchRunner(BaseRunner):
    """polygraphy runner over a piece's PyTorch module (CPU, no grad); outputs as numpy arrays."""

    def __init__(self, spec: PieceSpec, entry: dict | None = None, name: str | None = None):
        super().__init__(name=name or f"torch-{spec.name}", prefix="torch-runner")
        self.spec, self.entry = spec, entry

    def activate_impl(self):
        self.spec.module.eval()

    def get_input_metadata_impl(self):
        meta = TensorMetadata()
        shapes = {i["name"]: i for i in (self.entry or {}).get("inputs", [])}
        for i, name in enumerate(self.spec.inputs):
            s = shapes.get(name)
            shape = [d if isinstance(d, int) else -1 for d in s["shape"]] if s else None
            dtype = _np_dtype(s["dtype"]) if s else self.spec.sample[i].numpy().dtype
            meta.add(name, dtype=np.dtype(dtype), shape=shape)
        return meta

    def infer_impl(self, feed_dict):
        args = [torch.from_numpy(np.ascontiguousarray(feed_dict[n])) for n in self.spec.inputs]
        start = time.time()
        with torch.no_grad():
            outs = self.spec.module(*args)
        self.inference_time = time.time() - start
        outs = outs if isinstance(outs, (tuple, list)) else (outs,)
        return OrderedDict((n, np.ascontiguousarray(o.detach().cpu().numpy())) for n, o in zip(self.spec.outputs, outs))

    def deactivate_impl(self):
        pass


# ------------------------------------------------------------------------------------------ inputs
def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def block_cases(schedule: list[tuple[int, int]]) -> list[tuple[int, int, int, int]]:
    """(Bp, n, P, L) cases: scale 0 (P = 0), a middle scale without CFG, pruned token counts, the last scale."""
    counts = [h * w for h, w in schedule]
    cum = [0]
    for c in counts:
        cum.append(cum[-1] + c)
    mid = len(counts) // 2
    return [(2, counts[0], 0, 5), (1, counts[mid], cum[mid], 3), (2, max(1, counts[mid] // 3), cum[mid] - 2, 9),
            (2, 1, cum[-2], 12), (2, counts[-1], cum[-2], 7)]


def piece_feeds(spec: PieceSpec, entry: dict, model_cfg: dict, schedule: list[tuple[int, int]]) -> list[dict]:
    """Deterministic feed dicts (numpy) for ``spec``: several shapes for the dynamic pieces."""
    ins = {i["name"]: i for i in entry["inputs"]}
    kind = spec.kind

    def dt(name):
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "int64": torch.int64, "int32": torch.int32}[ins[name]["dtype"]]

    def arr(t: torch.Tensor):
        return t.numpy() if t.dtype != torch.bfloat16 else t.float().numpy()

    feeds = []
    C, Ct = model_cfg["width"], model_cfg["text_channels"]
    H = model_cfg["num_heads"]
    hd = C // H
    if kind == "block":
        from toprovar.model.rope import rope_tables
        ropes = rope_tables(hd, schedule, tuple(max(schedule[-1]) for _ in range(2)))
        for ci, (Bp, n, P, L) in enumerate(block_cases(schedule)):
            g = _g(100 + ci)
            r = next((rp for rp in ropes if rp.shape[1] == n), None)
            if r is None:  # pruned: a subset of a larger scale's positions
                big = next(rp for rp in ropes if rp.shape[1] >= n)
                r = big.index_select(1, torch.randperm(big.shape[1], generator=g)[:n].sort().values)
            feeds.append({"x": torch.randn(Bp, n, C, generator=g), "ada": 0.1 * torch.randn(Bp, 1, 6, C, generator=g),
                          "ca_kv": torch.randn(Bp, L, C, generator=g).to(dt("ca_kv")),
                          "ca_lengths": torch.randint(1, L + 1, (Bp,), generator=g, dtype=torch.int32),
                          "rope": r.contiguous(),
                          "past_k": torch.nn.functional.normalize(torch.randn(Bp, H, P, hd, generator=g),
                                                                  dim=-1).to(dt("past_k")),
                          "past_v": torch.randn(Bp, H, P, hd, generator=g).to(dt("past_v"))})
    elif kind == "condition":
        for ci, (B, L) in enumerate([(1, 5), (2, model_cfg["text_maxlen"]), (3, 17)]):
            g = _g(200 + ci)
            feeds.append({"text": torch.randn(B, L, Ct, generator=g),
                          "lengths": torch.randint(1, L + 1, (B,), generator=g, dtype=torch.int32)})
    elif kind == "head":
        n = spec.sample[0].shape[1]
        f = spec.sample[0].shape[0] // spec.sample[2].shape[0]
        for ci, (B, cfg, tau) in enumerate([(1, 3.0, 1.0), (2, 4.0, 0.5), (3, 1.5, 2.0)]):
            g = _g(300 + ci)
            feeds.append({"x": torch.randn(f * B, n, C, generator=g), "cond": torch.randn(f * B, C, generator=g),
                          "uniform": torch.rand(B, n, model_cfg["token_bits"], generator=g),
                          "cfg": torch.tensor([cfg]), "tau": torch.tensor([tau]), "top_p": torch.tensor([0.97])})
    elif kind == "next_input":
        bshape, sshape = spec.sample[0].shape, spec.sample[1].shape
        for ci, B in enumerate([1, 2]):
            g = _g(400 + ci)
            feeds.append({"bits": (torch.rand(B, *bshape[1:], generator=g) < 0.5).float(),
                          "summed": 0.2 * torch.randn(B, *sshape[1:], generator=g)})
    elif kind == "policy":
        n = spec.sample[0].shape[0]
        for ci, phi in enumerate([0.0, 0.6, 1.0, 3.0]):
            g = _g(500 + ci)
            e = torch.rand(n, generator=g) * 4.0
            if ci == 3:
                e = e.round()  # ties
            feeds.append({"entropy": e, "phi_r": torch.tensor([phi])})
    elif kind == "text_encoder":
        for ci, (B, L) in enumerate([(1, 4), (2, 12)]):
            g = _g(600 + ci)
            ids = torch.randint(3, 259, (B, L), generator=g)
            mask = torch.ones(B, L, dtype=torch.long)
            mask[-1, L // 2:] = 0
            feeds.append({"input_ids": ids, "attention_mask": mask})
    elif kind == "vae_decoder":
        sshape = spec.sample[0].shape
        for ci, B in enumerate([1, 2]):
            feeds.append({"summed": 0.3 * torch.randn(B, *sshape[1:], generator=_g(700 + ci))})
    else:
        feeds.append(dict(zip(spec.inputs, spec.sample)))
    return [{k: arr(v) for k, v in f.items()} for f in feeds]


def compare_func(kind: str, outputs: list[str], table: dict | None = None, error_stat: dict | None = None):
    try:
        from polygraphy.comparator import SimpleCompareFunc as simple  # polygraphy >= 0.50
    except ImportError:  # pragma: no cover
        from polygraphy.comparator import CompareFunc
        simple = CompareFunc.simple
    tol = (table or TOLERANCES).get(kind, {})
    atol = {o: tol.get(o, (1e-4, 1e-4))[0] for o in outputs}
    rtol = {o: tol.get(o, (1e-4, 1e-4))[1] for o in outputs}
    return simple(atol=atol, rtol=rtol, check_shapes=True,
                  check_error_stat=error_stat or {o: "elemwise" for o in outputs})


def compare_runners(runners: list, spec: PieceSpec, feeds: list[dict]):
    """Comparator.run + compare_accuracy of ``runners`` on ``feeds``: (passed, RunResults)."""
    from polygraphy.comparator import Comparator
    results = Comparator.run(runners, data_loader=feeds)
    acc = Comparator.compare_accuracy(results, compare_func=compare_func(spec.kind, spec.outputs))
    return bool(acc), results


def compare_piece(manifest, name: str, spec: PieceSpec, feeds: list[dict] | None = None):
    """PyTorch module vs ONNX Runtime for one piece of an export: (passed, RunResults)."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    entry = manifest["pieces"][name]
    feeds = feeds if feeds is not None else piece_feeds(spec, entry, manifest["spec"] | manifest["model"],
                                                        [tuple(s) for s in manifest["schedule"]])
    ort = OnnxrtRunner(SessionFromOnnx(str(manifest.piece_path(name)), providers=["CPUExecutionProvider"]),
                       name=f"onnxrt-{name}")
    return compare_runners([TorchRunner(spec, entry), ort], spec, feeds)


def profile_index(entry: dict, feed: dict) -> int:
    """The first optimization profile of ``entry`` whose ranges hold every input shape of ``feed``."""
    for i, prof in enumerate(entry.get("profiles", [])):
        if all(all(lo <= d <= hi for d, lo, hi in zip(np.shape(feed[name]), r["min"], r["max"]))
               for name, r in prof.items() if name in feed):
            return i
    raise ValueError(f"no optimization profile holds the shapes {({k: np.shape(v) for k, v in feed.items()})}")


def typed_feed(feed: dict, entry: dict) -> dict:
    """``feed`` (numpy; bfloat16 inputs travel as float32 numpy, which has no bfloat16) as torch tensors of the
    manifest's dtypes: what a TensorRT runner must be given (a bfloat16 engine input reads 2-byte values)."""
    dts = {i["name"]: i["dtype"] for i in entry["inputs"]}
    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int64": torch.int64,
             "int32": torch.int32, "bool": torch.bool, "uint8": torch.uint8, "int8": torch.int8}
    return {k: torch.from_numpy(np.ascontiguousarray(v)).to(table[dts[k]]) for k, v in feed.items()}


def compare_trt_ort(manifest, name: str, spec: PieceSpec, plugins: list, feeds: list[dict] | None = None):
    """TensorRT engine of ``name`` (from the manifest, either flavour) vs ONNX Runtime, profile chosen per feed:
    (passed, RunResults). Needs the flavour's module, a GPU it runs on and, for ``fae: plugin`` engines, the FAE
    plugin library. The engine gets its inputs in the manifest's dtypes (``typed_feed``)."""
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner
    from polygraphy.comparator import Comparator, IterationResult, RunResults
    from .engine import load_plugins
    from .manifest import engine_flavour
    from .trt_flavour import import_flavour
    trt = import_flavour(engine_flavour(manifest))
    if manifest["engines"][name].get("fae") == "plugin":
        load_plugins(trt, plugins)
    entry = manifest["pieces"][name]
    feeds = feeds if feeds is not None else piece_feeds(spec, entry, manifest["spec"] | manifest["model"],
                                                        [tuple(s) for s in manifest["schedule"]])
    eng = EngineFromBytes(BytesFromPath(str(manifest.engine_path(name))))
    results = RunResults()
    trt_iters, ort_iters = [], []
    with TrtRunner(eng, name=f"trt-{name}") as tr, OnnxrtRunner(
            SessionFromOnnx(str(manifest.piece_path(name)), providers=["CPUExecutionProvider"]),
            name=f"onnxrt-{name}") as orr:
        for feed in feeds:
            if entry.get("profiles"):
                tr.set_profile(profile_index(entry, feed))
            out = tr.infer({k: v.cuda() for k, v in typed_feed(feed, entry).items()})
            trt_iters.append(IterationResult({k: v.float().cpu().numpy() if isinstance(v, torch.Tensor)
                                              else np.array(v) for k, v in out.items()}, runner_name=tr.name))
            ort_iters.append(IterationResult(orr.infer(feed), runner_name=orr.name))
    results.append((f"trt-{name}", trt_iters))
    results.append((f"onnxrt-{name}", ort_iters))
    atol, rtol = TRT_TOLERANCES.get(spec.kind, (1e-3, 1e-3))
    exact = {("policy", "k"), ("policy", "order"), ("condition", "ca_lengths")}
    table = {spec.kind: {o: (0, 0) if (spec.kind, o) in exact else (0.01, 0.0) if spec.kind == "head" else (atol, rtol)
                         for o in spec.outputs}}
    stat = {o: "mean" if spec.kind == "head" else "elemwise" for o in spec.outputs}
    acc = Comparator.compare_accuracy(results, compare_func=compare_func(spec.kind, spec.outputs, table, stat))
    return bool(acc), results
