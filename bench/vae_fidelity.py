"""VAE decode variants on the trained ``shapes`` VAE: fidelity to the float32 decode and checker accuracy.

The shapes model (packaged weights, float32 transformer) generates one image per held-out prompt (dataset seed
1000, sampling seed = index) and its summed codes (the decoder input) are kept. Each eager variant of
``toprovar.benchmark.vae_variants`` (and, on CUDA, the compiled subpixel bfloat16/float16 ones) decodes the
same latents: PSNR (dB, uint8 images, mean and minimum over prompts) and max abs difference against the float32
plain decode, the checker's accuracy (GenEval-style overall) and how many prompts changed verdict. JSON +
Markdown are rewritten after every row.

    python bench/vae_fidelity.py --device cuda --prompts 200 --out bench/results
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time

import numpy as np
import torch
from common import RESULTS, environment, write_results

from toprovar.benchmark.vae_variants import REFERENCE, prepare, variants
from toprovar.eval.datasets import dataset_for
from toprovar.eval.metrics import psnr
from toprovar.images import to_uint8
from toprovar.pipeline import Pipeline


class _Capture(torch.nn.Module):
    """Decodes with ``decoder`` and keeps each input latent (the generation's summed codes)."""

    def __init__(self, decoder: torch.nn.Module):
        super().__init__()
        self.decoder, self.latents = decoder, []

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        self.latents.append(z.float().cpu())
        return self.decoder(z)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--prompts", type=int, default=100)
    ap.add_argument("--batch", type=int, default=64, help="latents per decode call")
    ap.add_argument("--budget", type=float, default=1e9, help="seconds for the variants (after generation)")
    ap.add_argument("--out", default=str(RESULTS), help="output directory of vae_fidelity.{json,md}")
    args = ap.parse_args()
    if args.prompts < 1:
        sys.exit(f"bench/vae_fidelity.py: --prompts {args.prompts}: need at least 1")
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/vae_fidelity.py: --device cuda: CUDA is not available")
    pipe = Pipeline.load("shapes", device=args.device, vae_dtype=torch.float32)
    base = copy.deepcopy(pipe.decoder).cpu().set_layout(subpixel=False)
    pipe.decoder = _Capture(pipe.decoder)
    data = dataset_for("shapes")
    _, prompts, scenes = data.make(args.prompts, 1000)
    specs = [s.spec for s in scenes]
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        pipe.generate([p], seed=i, progress=False)
    latents = torch.cat(pipe.decoder.latents)
    gen_s = time.perf_counter() - t0
    todo = [v for v in variants() if not v.channels_last and (not v.compiled or (
        dev.type == "cuda" and v.subpixel and v.dtype != "float32"))]
    payload = {"model": "shapes", "prompts": args.prompts, "dataset_seed": 1000, "device": args.device,
               "generation_s": gen_s, "environment": environment(dev)}
    rows, ref_img, ref_u8, ref_ok = [], None, None, None
    t_end = time.monotonic() + args.budget
    for v in todo:
        if time.monotonic() > t_end:
            break
        fn, conv = prepare(copy.deepcopy(base), v, dev)
        with torch.no_grad():
            img = torch.cat([fn(conv(latents[i:i + args.batch])).float().cpu()
                             for i in range(0, len(latents), args.batch)])
        u8 = to_uint8(img)
        ev = data.evaluate(list(u8), specs)
        if v == REFERENCE:
            ref_img, ref_u8, ref_ok = img, u8, ev["correct"]
        p = np.minimum([psnr(a, b) for a, b in zip(u8, ref_u8)], 99.0)
        rows.append({"variant": v.label, "PSNR mean dB": float(p.mean()),
                     "PSNR min dB": float(p.min()), "max abs diff": (img - ref_img).abs().max().item(),
                     "checker accuracy": ev["overall"],
                     "verdicts changed": sum(a != b for a, b in zip(ev["correct"], ref_ok))})
        print(json.dumps(rows[-1]), flush=True)
        write_results("vae_fidelity", {**payload, "rows": rows}, rows,
                      f"VAE decode variants on the trained shapes VAE ({args.prompts} prompts, {args.device}): "
                      "fidelity to the float32 plain decode", args.out,
                      ["PSNR over uint8 images; identical images count as 99 dB."])


if __name__ == "__main__":
    main()
