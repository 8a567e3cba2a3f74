"""One GPU command for issue 19: train the scenes model, then measure it, within a wall-clock budget.

Stages (times for --budget-s 480 on one H200, planned, not yet measured):
  1. tools/train_small.py --model scenes: the dataset (--images, rendered on every core), the BSQ tokenizer
     (--tokenizer-frac of the training budget), the transformer (the rest of the training budget), saved to
     --work (bfloat16 safetensors, 171 MB: they stay there), then the unpruned checker accuracy on
     --eval-prompts held-out prompts, the tokenizer's reconstructions, ground truth and chance;
  2. ``toprovar calibrate`` (band rule for tau, beta auto) on --calib-prompts prompts -> WORK/calibration.json;
  3. the entropy analysis (tools/entropy_analysis.py) on the same number of prompts;
  4. bench/quality.py's sweep (--grid) on as many held-out prompts as fit in what is left (at most --prompts;
     the time per generation is measured first).
Writes into --out at most 8 flat files (what the device returns): train_config.json, train_log.jsonl,
calibration.json, entropy_scenes.{json,png}, quality_scenes.{json,png}, samples.png (ground truth above,
generated below). The Markdown table is rebuilt from quality_scenes.json with
``python -c "import json,bench.quality as q; print(q.markdown(json.load(open('quality_scenes.json'))))"``.

    python tools/train_scenes_gpu.py --budget-s 480 --out $OUT       # the ~8 minute run: everything once
    # longer, on one warm machine (runs/ is git-ignored, so it stays between calls of the same lease):
    python tools/train_scenes_gpu.py --train-only --budget-s 540 --images 60000 --compile --out $OUT
    python tools/train_scenes_gpu.py --train-only --budget-s 540 --images 60000 --compile \
        --resume runs/scenes --out $OUT                              # repeat while device time lasts
    python tools/train_scenes_gpu.py --measure-only --budget-s 540 --prompts 200 --grid full \
        --calib-prompts 64 --out $OUT
    # the tokenizer alone (its vae.safetensors, 26.6 MB in bfloat16, comes back in $OUT as parts:
    # tools/carry_parts.py join DIR vae.safetensors -o .carry/scenes_tokenizer/vae.safetensors), then the transformer:
    python tools/train_scenes_gpu.py --tokenizer-only --budget-s 420 --tokenizer-batch 32 --out $OUT
    python tools/train_scenes_gpu.py --train-only --tokenizer .carry/scenes_tokenizer --budget-s 540 --compile \
        --plan-seconds 900 --out $OUT                     # one schedule over two calls (a machine is held 30 min):
    python tools/train_scenes_gpu.py --train-only --resume runs/scenes --budget-s 540 --compile --out $OUT
    python tools/train_scenes_gpu.py --measure-only --budget-s 540 --out $OUT
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="directory for the returned files (e.g. $OUT)")
    p.add_argument("--model", default="scenes", help="model config (scenes; tiny for CPU smoke runs)")
    p.add_argument("--work", default=str(ROOT / "runs" / "scenes"), help="weights directory (kept off --out)")
    p.add_argument("--budget-s", type=float, default=480, help="wall-clock budget of the whole command")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--images", type=int, default=20000)
    p.add_argument("--batch", type=int, default=48, help="transformer batch (2521 tokens per image)")
    p.add_argument("--tokenizer-batch", type=int, default=32)
    p.add_argument("--tokenizer-frac", type=float, default=0.25, help="share of the training budget")
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the transformer blocks (one graph shared by all; tools/train_small.py)")
    p.add_argument("--resume", default=None, help="a previous --work: tokenizer reused, transformer continued "
                   "(its train_state.pt: the same schedule, optimizer and EMA)")
    p.add_argument("--plan-seconds", type=float, default=None,
                   help="the transformer's schedule spans this many training seconds over several --resume calls")
    p.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="a trained tokenizer (DIR/vae.safetensors, e.g. from --tokenizer-only): the transformer "
                        "trains from scratch on it")
    p.add_argument("--eval-prompts", type=int, default=100)
    p.add_argument("--calib-prompts", type=int, default=24)
    p.add_argument("--prompts", type=int, default=60, help="most held-out prompts of the quality sweep")
    p.add_argument("--grid", default="reduced", choices=("reduced", "full"))
    p.add_argument("--reserve-s", type=float, default=None,
                   help="seconds kept for stages 2-4 and the evaluation (default: 35%% of the budget)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--smoke", action="store_true", help="CPU smoke run: tiny step counts (tests)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--train-only", action="store_true", help="stage 1 only (the whole budget trains)")
    g.add_argument("--measure-only", action="store_true", help="stages 2-4 on the weights in --work")
    g.add_argument("--tokenizer-only", action="store_true",
                   help="the tokenizer alone (the whole budget but its evaluation); vae.safetensors comes back in "
                        "parts (tools/carry_parts.py join)")
    return p.parse_args(argv)


def samples_png(pipe, model: str, path: Path, n: int = 8) -> None:
    """Ground truth (top row) and generated images (bottom row) of the first n held-out prompts (dataset
    seed 1000, generation seed 0)."""
    from PIL import Image
    from toprovar.eval.datasets import dataset_for
    from toprovar.images import to_uint8
    gt, prompts, _ = dataset_for(model).make(n, 1000)
    gen = to_uint8(pipe.generate(prompts, seed=0, progress=False).images)
    grid = np.concatenate([np.concatenate(list(gt), 1), np.concatenate(list(gen), 1)], 0)
    tmp = path.with_suffix(".tmp.png")
    Image.fromarray(grid).save(tmp)
    tmp.replace(path)


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    out, work = Path(args.out), Path(args.work)
    if out.exists() and not out.is_dir():
        sys.exit(f"--out: {out} is not a directory")
    for flag, given in (("--resume", args.resume), ("--tokenizer", args.tokenizer)):
        if given and not (Path(given) / "vae.safetensors").is_file():
            sys.exit(f"{flag}: {given} holds no vae.safetensors")
    out.mkdir(parents=True, exist_ok=True)
    left = lambda: args.budget_s - (time.perf_counter() - t0)  # noqa: E731
    if args.measure_only and not (work / "model.safetensors").is_file():
        sys.exit(f"--measure-only: {work} holds no model.safetensors (train first)")
    reserve = args.reserve_s if args.reserve_s is not None else 0.35 * args.budget_s
    # train_small's own evaluation stays inside the budget
    train_s = args.budget_s - (60 if args.train_only or args.tokenizer_only else reserve)
    train_small = _load("train_small", ROOT / "tools" / "train_small.py")
    targs = ["--model", args.model, "--device", args.device, "--images", str(args.images), "--batch", str(args.batch),
             "--tokenizer-batch", str(args.tokenizer_batch), "--lr", str(args.lr), "--train-seconds", str(train_s),
             "--eval-prompts", str(args.eval_prompts), "--workers", str(args.workers), "--out", str(work),
             "--log-every", "50"]
    if args.smoke:
        targs += ["--tokenizer-steps", "2", "--steps", "2", "--warmup", "1", "--log-every", "1"]
    else:
        targs += ["--tokenizer-steps", "100000", "--steps", "1000000", "--warmup", "200",
                  "--tokenizer-seconds", str((0.9 if args.tokenizer_only else args.tokenizer_frac) * train_s)]
    if args.compile:
        targs.append("--compile")
    if args.resume:
        targs += ["--resume", args.resume]
    if args.plan_seconds is not None:
        targs += ["--plan-seconds", str(args.plan_seconds)]
    if args.tokenizer:
        targs += ["--tokenizer", args.tokenizer]
    if args.tokenizer_only:
        targs.append("--tokenizer-only")
    if not args.measure_only:
        print(f"[{time.perf_counter() - t0:.0f} s] training: {' '.join(targs)}", flush=True)
        train_small.main(targs)
    for name in ("train_config.json", "train_log.jsonl"):
        shutil.copy(work / name, out / name)
    if args.tokenizer_only:  # larger than one returned file (16 MiB): in verified parts
        _load("carry_parts", ROOT / "tools" / "carry_parts.py").split(work / "vae.safetensors", out, 15.0, "all")
    if args.train_only or args.tokenizer_only:
        return 0

    from toprovar.eval.datasets import dataset_for
    from toprovar.pipeline import Pipeline
    from toprovar.policy.calibrate import calibrate, write_calibration
    entropy = _load("entropy_analysis", ROOT / "tools" / "entropy_analysis.py")
    quality = _load("quality", ROOT / "bench" / "quality.py")
    data = dataset_for(args.model)
    pipe = Pipeline.load(args.model, weights=str(work), device=args.device)
    samples_png(pipe, args.model, out / "samples.png")
    pipe.cuda_graphs = False  # batch-1 runs of many policies
    _, cal_prompts, _ = data.make(args.calib_prompts, 2000)
    print(f"[{time.perf_counter() - t0:.0f} s] calibration on {len(cal_prompts)} prompts", flush=True)
    cal = calibrate(pipe, cal_prompts, progress=False)
    cal_path = write_calibration(work / "calibration.json", cal)
    shutil.copy(cal_path, out / "calibration.json")
    (work / "calibration_prompts.txt").write_text("\n".join(cal_prompts) + "\n")

    print(f"[{time.perf_counter() - t0:.0f} s] entropy analysis", flush=True)
    ent = entropy.analyse(pipe, cal_prompts, progress=False)
    ent.update(model=args.model, weights=str(work), device=args.device)
    (out / f"entropy_{args.model}.json").write_text(json.dumps(ent, indent=1, allow_nan=False))
    entropy.plot(ent, out / f"entropy_{args.model}.png", f"{args.model}: entropy patterns ({ent['prompts']} prompts)")

    # the sweep: as many prompts as fit, from the measured time of one unpruned generation
    _, probe_prompts, _ = data.make(3, 1000)
    pipe.generate(probe_prompts[:1], seed=0, progress=False)  # warm-up
    t = time.perf_counter()
    for i, pr in enumerate(probe_prompts):
        pipe.generate([pr], seed=i, progress=False)
    per_gen = (time.perf_counter() - t) / len(probe_prompts)
    n_settings = len(quality.settings(cal, len(cal["schedule"]), args.grid))
    checker_s = 0.03  # per image on the CPU
    fit = int((left() - 20) / (n_settings * (1.4 * per_gen + checker_s)))
    n = max(5, min(args.prompts, fit - fit % 5))
    print(f"[{time.perf_counter() - t0:.0f} s] quality sweep: {n_settings} settings x {n} prompts "
          f"({per_gen:.3f} s per generation)", flush=True)
    res = quality.run(pipe, args.model, cal, cal_path, n, grid=args.grid, device=args.device, progress=False)
    res["per_generation_s"] = per_gen
    (out / f"quality_{args.model}.json").write_text(json.dumps(res, indent=1))
    quality.plot(res["rows"], out / f"quality_{args.model}.png",
                 f"{args.model} model: quality vs compute per policy family ({res['n_prompts']} prompts)")
    print(quality.markdown(res))
    summary = json.loads((work / "train_config.json").read_text())
    print(json.dumps({k: summary.get(k) for k in ("transformer_steps_done", "train_seconds", "checker_ground_truth",
                                                    "checker_tokenizer_reconstruction", "checker_chance",
                                                    "checker_generated")}, indent=1))
    print(f"[{time.perf_counter() - t0:.0f} s] done; files: {sorted(p.name for p in out.iterdir())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
