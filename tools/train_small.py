"""Train the project's small text-to-image VAR models on their procedural datasets.

--model shapes (default): 64x64 shapes images, 7 scales (about ten minutes on an H100); --model scenes:
256x256 scenes images, 10 scales up to 32x32 tokens, 16 layers of width 512 (``toprovar/eval/datasets.py``
says which dataset a model uses). Two stages, on one GPU (CPU works for smoke runs):
  1. the BSQ tokenizer (``BSQAutoencoder``, the model's VAE config): images <-> multiscale bit maps;
  2. the Infinity transformer with its byte-level T5 text encoder, teacher-forced on the tokenized images,
     10% of the prompts replaced by the learned empty text (classifier-free guidance).
Both stages can be given a time budget (--tokenizer-seconds, --minutes): the schedule's length is set from
the measured step time.

Writes to --out (default: the packaged weights directory, toprovar/weights/shapes): model.safetensors,
vae.safetensors, text_encoder.safetensors (bfloat16; EMA weights), train_config.json (arguments, versions,
steps, final losses, held-out checker accuracy), train_log.jsonl (one line per logged step) and
train_state.pt (float32 weights, optimizer, EMA, step, schedule length and random streams: what --resume
continues from; not a file to ship).

    python tools/train_small.py --device cuda
    python tools/train_small.py --device cpu --images 512 --tokenizer-steps 5 --steps 5 --out /tmp/smoke
    python tools/train_small.py --model scenes --images 30000 --batch 64 --tokenizer-batch 32 --compile \
        --tokenizer-seconds 90 --minutes 4 --out runs/scenes
    # the stages apart (a tokenizer trained in one device call, the transformer in a later one):
    python tools/train_small.py --model scenes --tokenizer-only --tokenizer-seconds 420 --out runs/scenes_tok
    python tools/train_small.py --model scenes --tokenizer runs/scenes_tok --minutes 8 --compile --out runs/scenes
    # one schedule over several calls (each stops at its own budget, --resume continues it):
    python tools/train_small.py --model scenes --tokenizer runs/scenes_tok --plan-seconds 1500 --minutes 8 \
        --out runs/scenes
    python tools/train_small.py --model scenes --resume runs/scenes --minutes 8 --out runs/scenes

--tokenizer-only writes vae.safetensors, train_config.json (with the reconstructions' checker accuracy and
PSNR on the held-out images) and train_log.jsonl; with --tokenizer DIR it continues DIR's tokenizer.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from toprovar.config import get_config
from toprovar.eval.datasets import dataset_for
from toprovar.model.checkpoint import atomic_write, load_into, save_state_dict
from toprovar.model.infinity import build_model
from toprovar.model.rope import rope_tables
from toprovar.model.text import ByteTokenizer, tiny_text_encoder, tokenize_batch
from toprovar.model.vae import BSQAutoencoder
from toprovar.images import to_uint8
from toprovar.pipeline import Pipeline, resolve_schedule
from toprovar.schedule import rope_grid_side, token_counts
from toprovar.train.teacher import bit_labels, bitwise_loss, init_for_training, teacher_inputs


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="shapes", help="model config (default: shapes)")
    p.add_argument("--out", default=None, help="output directory (default: the config's packaged weights dir)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images", type=int, default=100_000, help="training images (dataset seed = --seed)")
    p.add_argument("--batch", type=int, default=128, help="transformer batch")
    p.add_argument("--tokenizer-batch", type=int, default=None, help="tokenizer batch (default: --batch)")
    p.add_argument("--tokenizer-steps", type=int, default=3000)
    p.add_argument("--tokenizer-seconds", type=float, default=None,
                   help="time budget of the tokenizer stage: at step 30 its schedule's length becomes "
                        "min(--tokenizer-steps, what fits at the speed of steps 10-30)")
    p.add_argument("--tokenizer-lr", type=float, default=1e-3)
    p.add_argument("--tokenizer-layout", default="auto", choices=("auto", "contiguous", "channels-last", "probe"),
                   help="memory format of the tokenizer's convolutions; probe: steps 3-7 contiguous, 9-13 "
                        "channels-last, the faster kept for the rest (logged); auto: probe on CUDA, contiguous on "
                        "the CPU")
    p.add_argument("--steps", type=int, default=8000, help="transformer steps")
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--cfg-drop", type=float, default=0.1, help="fraction of prompts replaced by the empty text")
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--minutes", type=float, default=None,
                   help="time budget of the transformer stage: at step 70 the schedule's length becomes "
                        "min(--steps, what fits in the budget at the speed of steps 20-70); the log records it")
    p.add_argument("--train-seconds", type=float, default=None,
                   help="budget of data + tokenizer + transformer from the start of the run: the transformer "
                        "stage gets what is left of it when it starts (with --minutes: the smaller)")
    p.add_argument("--resume", default=None,
                   help="a previous run's output directory: its tokenizer is reused (stage 1 skipped); with its "
                        "train_state.pt the transformer's training continues where it stopped (weights, optimizer, "
                        "EMA, step, schedule, random streams), else it starts from its weights (fresh optimizer)")
    p.add_argument("--plan-seconds", type=float, default=None,
                   help="the transformer's schedule spans this many seconds of training over several calls: at step "
                        "70 its length becomes min(--steps, what fits at the measured speed); each call stops at its "
                        "own budget and --resume continues the same schedule")
    p.add_argument("--stop-after", type=int, default=None,
                   help="this call trains at most this many transformer steps (the schedule keeps its length)")
    p.add_argument("--tokenizer-only", action="store_true",
                   help="stage 1 only: train, save and evaluate the tokenizer (no transformer)")
    p.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="a trained tokenizer's directory (its vae.safetensors): with --tokenizer-only it is trained "
                        "further; otherwise stage 1 is skipped and the transformer trains from scratch on it")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each transformer block, one graph shared by all (falls back to eager)")
    p.add_argument("--eval-prompts", type=int, default=200, help="held-out prompts scored by the checker at the end")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--workers", type=int, default=1, help="processes rendering the dataset")
    return p.parse_args(argv)


def to_tensor(images: np.ndarray | torch.Tensor, device) -> torch.Tensor:
    """(n, H, W, 3) uint8 (numpy or torch) -> (n, 3, H, W) float32 in [-1, 1] on ``device``."""
    t = torch.from_numpy(images) if isinstance(images, np.ndarray) else images
    return t.to(device).permute(0, 3, 1, 2).float() / 127.5 - 1


def budget_steps(step: int, marks: tuple[int, int], t_mark: list[float], t_start: float, seconds: float | None,
                 most: int) -> int | None:
    """Schedule length from a time budget: call at every step; at ``marks[0]`` it notes the time, at
    ``marks[1]`` it returns min(most, marks[1] + what fits in the rest of ``seconds`` at the speed measured
    between the marks (after compilation and warm-up)); None at every other step or without a budget."""
    if seconds is None or step not in marks:
        return None
    now = time.perf_counter()
    if step == marks[0]:
        t_mark[:] = [now]
        return None
    per_step = (now - t_mark[0]) / (marks[1] - marks[0])
    return max(marks[1] + 1, min(most, marks[1] + int((seconds - (now - t_start)) / per_step)))


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


class Logger:
    """Appends one JSON line per record to train_log.jsonl (written atomically at the end)."""

    def __init__(self):
        self.lines: list[dict] = []
        self.t0 = time.perf_counter()

    def log(self, **rec) -> None:
        rec["time_s"] = round(time.perf_counter() - self.t0, 2)
        self.lines.append(rec)

    def save(self, path: Path) -> None:
        atomic_write(path, lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in self.lines)))


class LayoutProbe:
    """--tokenizer-layout probe: training steps 3-7 run contiguous, 9-13 channels-last (step 8 pays the switch);
    at step 14 the faster layout is kept and the two speeds are logged. ``at(step, log)`` returns the memory
    format to use from that step on when it changes, else None."""

    def __init__(self, module: torch.nn.Module, device):
        self.module, self.cuda = module, torch.device(device).type == "cuda"
        self.t: dict[int, float] = {}

    def at(self, step: int, log: Logger):
        if step not in (3, 8, 9, 14):
            return None
        if self.cuda:
            torch.cuda.synchronize()
        self.t[step] = time.perf_counter()
        if step == 8:
            self.module.to(memory_format=torch.channels_last)
            return torch.channels_last
        if step == 14:
            plain, last = (self.t[8] - self.t[3]) / 5, (self.t[14] - self.t[9]) / 5
            chosen = "channels-last" if last < plain else "contiguous"
            log.log(stage="tokenizer", step=step, layout_probe={"contiguous_s_per_step": round(plain, 5),
                                                                "channels_last_s_per_step": round(last, 5),
                                                                "chosen": chosen})
            if chosen == "contiguous":
                self.module.to(memory_format=torch.contiguous_format)
                return torch.contiguous_format
        return None


def train_tokenizer(args, images: torch.Tensor, schedule, log: Logger, start: Path | None = None) -> BSQAutoencoder:
    """Stage 1: reconstruction (L1 + MSE) through the straight-through multiscale BSQ, plus commitment.
    images: (n, H, W, 3) uint8 on the device; ``start``: a vae.safetensors to continue from."""
    cfg = get_config(args.model)
    torch.manual_seed(args.seed)
    ae = BSQAutoencoder(cfg.vae)
    if start is not None:
        load_into(ae, start)
        log.log(stage="tokenizer", continued_from=str(start))
    ae = ae.to(args.device).train()
    opt = torch.optim.AdamW(ae.parameters(), lr=args.tokenizer_lr, betas=(0.9, 0.99), weight_decay=0.0)
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    batch = args.tokenizer_batch or args.batch
    total, t_start, t_mark = args.tokenizer_steps, time.perf_counter(), []
    layout = args.tokenizer_layout
    if layout == "auto":
        layout = "probe" if torch.device(args.device).type == "cuda" else "contiguous"
    probe = LayoutProbe(ae, args.device) if layout == "probe" else None
    if layout == "channels-last":
        ae.to(memory_format=torch.channels_last)
    fmt = torch.channels_last if layout == "channels-last" else torch.contiguous_format
    marks = (15, 35) if probe else (10, 30)  # the speed for the time budget: measured after the probe
    bar = tqdm(total=total, desc="tokenizer", unit="step")
    step = 0
    while step < total:
        new_total = budget_steps(step, marks, t_mark, t_start, args.tokenizer_seconds, args.tokenizer_steps)
        if new_total is not None:
            total = bar.total = new_total
            log.log(stage="tokenizer", step=step, schedule_steps=total, reason=f"--tokenizer-seconds {args.tokenizer_seconds}")
        if probe is not None:
            fmt = probe.at(step, log) or fmt
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total, args.tokenizer_lr, min(200, total // 5 + 1))
        x = to_tensor(images[torch.randint(len(images), (batch,), generator=gen).to(images.device)], images.device)
        x = x.contiguous(memory_format=fmt)
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=x.is_cuda):
            rec, f, f_hat = ae(x, schedule)
        rec = rec.float()
        loss = (rec - x).abs().mean() + (rec - x).pow(2).mean() + 0.25 * (f - f_hat.detach()).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ae.parameters(), 1.0)
        opt.step()
        if step % args.log_every == 0 or step == total - 1:
            mse = (rec.detach().clamp(-1, 1) - x).pow(2).mean().item()
            psnr = 10 * math.log10(4 / max(mse, 1e-12))
            log.log(stage="tokenizer", step=step, loss=round(loss.item(), 5), psnr_db=round(psnr, 2))
            bar.set_postfix(loss=f"{loss.item():.4f}", psnr=f"{psnr:.1f}")
        step += 1
        bar.update(1)
    bar.close()
    return ae.to(memory_format=torch.contiguous_format).eval().requires_grad_(False)


@torch.no_grad()
def tokenize_all(ae: BSQAutoencoder, images: torch.Tensor, schedule, batch: int = 256) -> list[torch.Tensor]:
    """Bits per scale for every image ((n, H, W, 3) uint8): list of (n, h, w, d) uint8 on the images' device."""
    parts = [ae.tokenize(to_tensor(images[i:i + batch], images.device), schedule)[0]
             for i in range(0, len(images), batch)]
    return [torch.cat([p[k] for p in parts]) for k in range(len(schedule))]


@torch.no_grad()
def reconstruct(ae: BSQAutoencoder, images: torch.Tensor, schedule) -> torch.Tensor:
    """Decoded multiscale-quantized images (n, 3, H, W) in [-1, 1] of images (n, 3, H, W): the ceiling for
    generation."""
    return torch.cat([ae.decoder(ae.tokenize(images[i:i + 64], schedule)[2]).clamp(-1, 1)
                      for i in range(0, len(images), 64)])


STATE = "train_state.pt"  # the transformer's training state in a run's directory (not a shipped file)


def compile_blocks(model: torch.nn.Module) -> None:
    """--compile: each transformer block's forward through torch.compile. The blocks share one compiled graph
    (regional compilation), so the 16-layer scenes model compiles about as fast as one block; the rest of the
    step runs eagerly. (Compiling the whole step took 244 s on the H200, bench/results/scenes_attempt1; on the
    CPU the 8-layer shapes model's first step took 76 s whole, 25 s per block.)"""
    for blk in model.blocks:
        blk.forward = torch.compile(blk.forward)


def uncompile_blocks(model: torch.nn.Module) -> bool:
    """Undo ``compile_blocks`` (the class's forward again); returns False (no longer compiled)."""
    for blk in model.blocks:
        vars(blk).pop("forward", None)
    return False


def train_transformer(args, bits: list[torch.Tensor], prompts: list[str], schedule, log: Logger,
                      seconds: float | None = None):
    """Stage 2: the transformer and its text encoder, teacher-forced, within ``seconds`` when given; returns
    their EMA copies, the steps done in this call and the training state to save (``STATE``)."""
    cfg = get_config(args.model)
    dev = torch.device(args.device)
    torch.manual_seed(args.seed + 2)  # initialisation, CFG drop, dropout: the same run for the same seed
    model = init_for_training(build_model(cfg, seed=args.seed))
    text = tiny_text_encoder(cfg.text_channels, cfg.text_maxlen, seed=args.seed).encoder
    state = None
    if args.resume and (Path(args.resume) / STATE).is_file():
        state = torch.load(Path(args.resume) / STATE, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        text.load_state_dict(state["text"])
        log.log(stage="transformer", resumed_from=str(args.resume), step=state["step"], schedule_steps=state["total"])
    elif args.resume:
        model.load_checkpoint(Path(args.resume) / "model.safetensors")
        load_into(text, Path(args.resume) / "text_encoder.safetensors")
    model, text = model.to(dev), text.to(dev).train().requires_grad_(True)
    ids, mask = tokenize_batch(ByteTokenizer(), prompts, cfg.text_maxlen, args.model)
    ids, mask = ids.to(dev), mask.to(dev)
    params = list(model.parameters()) + list(text.parameters())
    decay = [p for p in params if p.ndim >= 2]
    other = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": other, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    ema_model, ema_text = copy.deepcopy(model).eval(), copy.deepcopy(text).eval()
    ema_params = list(ema_model.parameters()) + list(ema_text.parameters())
    ropes = [r.to(dev) for r in rope_tables(cfg.head_dim, schedule, rope_grid_side(1.0))]
    counts = token_counts(schedule)
    gen = torch.Generator(device="cpu").manual_seed(args.seed + 1)
    start, total, planned = 0, args.steps, args.plan_seconds is not None
    if state is not None:
        opt.load_state_dict(state["opt"])
        ema_model.load_state_dict(state["ema_model"])
        ema_text.load_state_dict(state["ema_text"])
        gen.set_state(state["data_rng"])
        torch.set_rng_state(state["cpu_rng"])
        if dev.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], dev)
        start, total, planned = state["step"], state["total"], True
    def forward(ids_b, m, drop, b_bits):
        """Teacher-forced loss of one batch (the text encoder runs here too: it is trained)."""
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            feats = text(input_ids=ids_b, attention_mask=m)["last_hidden_state"].float()
            feats = torch.where(drop[:, None, None], model.cfg_uncond[:ids_b.shape[1]].float().unsqueeze(0), feats)
            cond, ada, ca_kv, lengths = model.condition(feats, m.sum(1).to(torch.int32), cfg=False)
            x = teacher_inputs(model, cond, b_bits, schedule)
            logits = model.forward_teacher(cond, ada, ca_kv, lengths, x, ropes, counts)
        return bitwise_loss(logits, bit_labels(b_bits), counts)

    compiled = args.compile  # after the EMA copies: they must not share the compiled forwards
    if compiled:
        compile_blocks(model)
    t_start, t_call, t_plan = time.perf_counter(), [], []
    stop = min(total, start + args.stop_after) if args.stop_after is not None else total
    bar = tqdm(total=stop, initial=start, desc="transformer", unit="step")
    step = start
    while step < stop:
        # steady-state speed over this call's steps 20-70, after compilation
        if state is None and args.plan_seconds is not None:
            new_total = budget_steps(step - start, (20, 70), t_plan, t_start, args.plan_seconds, args.steps)
            if new_total is not None:
                total = new_total
                stop = min(stop, total)
                log.log(stage="transformer", step=step, schedule_steps=total,
                        reason=f"--plan-seconds {args.plan_seconds:.0f}")
        new_stop = budget_steps(step - start, (20, 70), t_call, t_start, seconds, stop - start)
        if new_stop is not None:
            stop = bar.total = min(stop, start + new_stop)
            if not planned:
                total = stop
            log.log(stage="transformer", step=step, schedule_steps=total, stop_step=stop,
                    reason=f"{seconds:.0f} s budget")
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total, args.lr, args.warmup)
        idx = torch.randint(len(ids), (args.batch,), generator=gen).to(dev)
        m = mask[idx]  # padded to the dataset's longest prompt: static shapes, no device read
        b_bits = [b[idx] for b in bits]
        drop = torch.rand(args.batch, device=dev) < args.cfg_drop
        try:
            loss, per_scale = forward(ids[idx], m, drop, b_bits)
        except Exception as exc:  # a compiler failure must not cost the run: continue eagerly
            if not compiled:
                raise
            log.log(stage="transformer", step=step, compile_failed=str(exc).splitlines()[0][:300])
            compiled = uncompile_blocks(model)
            loss, per_scale = forward(ids[idx], m, drop, b_bits)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():  # EMA with warm-up: short runs are not dominated by the initial weights
            torch._foreach_lerp_(ema_params, params, 1 - min(args.ema, (1 + step) / (10 + step)))
        step += 1
        bar.update(1)
        if (step - 1) % args.log_every == 0 or step == stop:
            ps = [round(v, 4) for v in per_scale.tolist()]
            log.log(stage="transformer", step=step - 1, loss=round(loss.item(), 5), per_scale=ps,
                    lr=round(opt.param_groups[0]["lr"], 7))
            bar.set_postfix(loss=f"{loss.item():.4f}", last=f"{ps[-1]:.3f}")
    bar.close()
    state = {"step": step, "total": total, "model": model.state_dict(), "text": text.state_dict(),
             "ema_model": ema_model.state_dict(), "ema_text": ema_text.state_dict(), "opt": opt.state_dict(),
             "data_rng": gen.get_state(), "cpu_rng": torch.get_rng_state(),
             "cuda_rng": torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None}
    return ema_model.eval().requires_grad_(False), ema_text.requires_grad_(False), step - start, state


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    if torch.cuda.is_available():
        out.update(cuda=torch.version.cuda, device=torch.cuda.get_device_name(0))
    return out


def finish_tokenizer(args, ae: BSQAutoencoder, schedule, data, log: Logger, out: Path, t0: float) -> int:
    """--tokenizer-only: save vae.safetensors (bfloat16) and score its reconstructions of the held-out images
    (checker accuracy next to ground truth and chance, PSNR) into train_config.json."""
    out.mkdir(parents=True, exist_ok=True)
    save_state_dict(ae, out / "vae.safetensors", dtype=torch.bfloat16)
    ev_images, _, ev_scenes = data.make(args.eval_prompts, args.seed + 1000, workers=args.workers)
    saved = BSQAutoencoder(get_config(args.model).vae)
    load_into(saved, out / "vae.safetensors")  # what a later stage loads
    x = to_tensor(ev_images, args.device)
    rec = reconstruct(saved.to(args.device).float().eval(), x, schedule)
    mse = (rec - x).pow(2).mean(dim=(1, 2, 3)).clamp_min(1e-12)
    ae_rec = to_uint8(rec)
    specs = [s.spec for s in ev_scenes]
    summary = {
        "args": vars(args), "versions": versions(), "schedule": schedule, "stage": "tokenizer only",
        "train_seconds": round(time.perf_counter() - t0, 1), "eval_seed": args.seed + 1000, "dataset": data.name,
        "tokenizer_final": next((r for r in reversed(log.lines) if r.get("stage") == "tokenizer" and "loss" in r),
                                None),
        "reconstruction_psnr_db": round(float((10 * torch.log10(4 / mse)).mean()), 2),
        "checker_ground_truth": data.evaluate(list(ev_images), specs)["overall"],
        "checker_tokenizer_reconstruction": {k: v for k, v in data.evaluate(list(ae_rec), specs).items()
                                             if k != "correct"},
        "checker_chance": data.chance(list(ev_images), specs, seed=args.seed)["overall"],
        "files_bytes": {"vae.safetensors": (out / "vae.safetensors").stat().st_size},
    }
    log.save(out / "train_log.jsonl")
    atomic_write(out / "train_config.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=1)))
    print(json.dumps({k: summary[k] for k in ("train_seconds", "reconstruction_psnr_db", "checker_ground_truth",
                                               "checker_tokenizer_reconstruction")}, indent=1))
    print(out / "train_config.json")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = get_config(args.model)
    out = Path(args.out) if args.out else cfg.weights_dir
    if out is None:
        sys.exit(f"--out: model {args.model} has no packaged weights directory; pass --out")
    if args.tokenizer_only and args.resume:
        sys.exit("--tokenizer-only: trains a tokenizer alone; --resume continues a transformer (use --tokenizer DIR "
                 "to continue a tokenizer)")
    if args.resume and args.tokenizer:
        sys.exit("--tokenizer: --resume already reuses the previous run's tokenizer; give one of them")
    given = args.resume or args.tokenizer
    if given and not (Path(given) / "vae.safetensors").is_file():
        sys.exit(f"{'--resume' if args.resume else '--tokenizer'}: {given} holds no vae.safetensors")
    schedule = resolve_schedule(cfg, None, 1.0)
    data = dataset_for(args.model)
    log = Logger()
    t0 = time.perf_counter()
    if torch.device(args.device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    images_np, prompts, _ = data.make(args.images, args.seed, workers=args.workers)
    images = torch.from_numpy(images_np).to(args.device)  # uint8: converted per batch
    del images_np
    log.log(stage="data", dataset=data.name, images=len(prompts), seconds=round(time.perf_counter() - t0, 1))

    if given and not args.tokenizer_only:
        ae = BSQAutoencoder(cfg.vae)
        load_into(ae, Path(given) / "vae.safetensors")
        ae = ae.to(args.device).eval().requires_grad_(False)
        log.log(stage="tokenizer", resumed_from=str(given))
    else:  # with --tokenizer-only --tokenizer DIR: DIR's tokenizer trained further (fresh optimizer)
        ae = train_tokenizer(args, images, schedule, log, Path(given) / "vae.safetensors" if given else None)
    if args.tokenizer_only:
        del images
        return finish_tokenizer(args, ae, schedule, data, log, out, t0)
    t_tok = time.perf_counter()
    bits = tokenize_all(ae, images, schedule)
    log.log(stage="tokenize", images=len(images), seconds=round(time.perf_counter() - t_tok, 1))
    del images
    budgets = [60 * args.minutes] if args.minutes is not None else []
    if args.train_seconds is not None:
        budgets.append(args.train_seconds - (time.perf_counter() - t0))
    model, text, steps_done, state = train_transformer(args, bits, prompts, schedule, log,
                                                       min(budgets) if budgets else None)

    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / STATE, lambda tmp: torch.save(state, tmp))
    save_state_dict(model, out / "model.safetensors", dtype=torch.bfloat16)
    save_state_dict(ae, out / "vae.safetensors", dtype=torch.bfloat16)
    save_state_dict(text, out / "text_encoder.safetensors", dtype=torch.bfloat16)

    # held-out evaluation from the saved files (what a user loads): tokenizer ceiling and generation
    ev_images, ev_prompts, ev_scenes = data.make(args.eval_prompts, args.seed + 1000, workers=args.workers)
    pipe = Pipeline.load(args.model, weights=str(out), device=args.device)
    ae_rec = to_uint8(reconstruct(ae.float(), to_tensor(ev_images, args.device), schedule))
    gen = np.concatenate([to_uint8(pipe.generate(ev_prompts[i:i + 50], seed=i, progress=False).images)
                          for i in range(0, len(ev_prompts), 50)])
    specs = [s.spec for s in ev_scenes]
    previous = json.loads((Path(given) / "train_config.json").read_text()) if given and (
        Path(given) / "train_config.json").is_file() else None
    summary = {
        "args": vars(args), "versions": versions(), "schedule": schedule, "resumed_from": previous,
        "transformer_steps_done": steps_done, "transformer_step": state["step"],
        "transformer_schedule_steps": state["total"], "train_seconds": round(time.perf_counter() - t0, 1),
        "final": next((r for r in reversed(log.lines) if r.get("stage") == "transformer" and "loss" in r), None),
        "eval_seed": args.seed + 1000,
        "dataset": data.name,
        "checker_ground_truth": data.evaluate(list(ev_images), specs)["overall"],
        "checker_tokenizer_reconstruction": data.evaluate(list(ae_rec), specs)["overall"],
        "checker_chance": data.chance(list(ev_images), specs, seed=args.seed)["overall"],
        "checker_generated": {k: v for k, v in data.evaluate(list(gen), specs).items() if k != "correct"},
        "files_bytes": {f.name: f.stat().st_size for f in sorted(out.glob("*.safetensors"))},
    }
    log.save(out / "train_log.jsonl")
    atomic_write(out / "train_config.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=1)))
    print(json.dumps({k: summary[k] for k in ("transformer_steps_done", "train_seconds", "checker_ground_truth",
                                               "checker_tokenizer_reconstruction", "checker_generated")}, indent=1))
    print(out / "train_config.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
