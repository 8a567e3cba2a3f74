"""Training the small model: multiscale BSQ encoding, the autoencoder's checkpoint layout, teacher forcing
consistent with generation, and a smoke run of tools/train_small.py (CPU)."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from toprovar.config import get_config
from toprovar.model.checkpoint import save_state_dict
from toprovar.model.infinity import build_model
from toprovar.model.quant import accumulate_codes, quantize_multiscale
from toprovar.model.rope import rope_tables
from toprovar.model.vae import BSQAutoencoder, load_vae_decoder
from toprovar.pipeline import Pipeline
from toprovar.schedule import get_schedule, rope_grid_side, token_counts
from toprovar.train.teacher import bit_labels, bitwise_loss, init_for_training, teacher_inputs

ROOT = Path(__file__).resolve().parents[1]
SCHEDULE = get_schedule("0.06M")


def fresh_seed() -> int:
    return int(np.random.SeedSequence().entropy % (2 ** 31))


def test_quantize_multiscale_is_the_inverse_of_generation_accumulation():
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(3, 16, 16, 16, generator=g) * 0.4
    bits, f_hat = quantize_multiscale(f, SCHEDULE)
    assert [tuple(b.shape) for b in bits] == [(3, h, w, 16) for h, w in SCHEDULE]
    assert all(b.dtype == torch.uint8 and int(b.max()) <= 1 for b in bits)
    acc = None
    for b in bits:  # what generation rebuilds from the same bits
        acc = accumulate_codes(acc, b, SCHEDULE[-1])
    assert torch.equal(acc, f_hat), f"seed {seed}"
    # every scale removes energy from the residual: the full encoding beats the first scale alone
    first = accumulate_codes(None, bits[0], SCHEDULE[-1])
    assert (f - f_hat).pow(2).mean() < (f - first).pow(2).mean(), f"seed {seed}"
    with pytest.raises(ValueError, match="last scale"):
        quantize_multiscale(f[..., :8, :8], SCHEDULE)


def test_autoencoder_file_loads_as_an_official_style_vae(tmp_path):
    torch.manual_seed(fresh_seed())
    ae = BSQAutoencoder("shapes").eval()
    path = save_state_dict(ae, tmp_path / "vae.safetensors")
    dec = load_vae_decoder(path, "shapes")  # drops encoder.* as for official VAE files
    z = torch.randn(2, 16, 16, 16) * 0.3
    with torch.no_grad():
        assert torch.equal(dec(z), ae.decoder(z).clamp(-1, 1))
        rec, f, f_hat = ae(torch.rand(2, 3, 64, 64) * 2 - 1, SCHEDULE)
    assert rec.shape == (2, 3, 64, 64) and f.shape == f_hat.shape == (2, 16, 16, 16)


def test_autoencoder_straight_through_reaches_the_encoder():
    ae = BSQAutoencoder("shapes")
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    rec, f, f_hat = ae(x, SCHEDULE)
    (rec - x).pow(2).mean().backward()
    grads = [p.grad for p in ae.encoder.parameters()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0


def test_teacher_forcing_matches_greedy_generation():
    """Greedy generation (temperature -> 0, CFG 1) must pick, at every scale, the argmax of the logits
    that teacher forcing computes from the same bits: the training inputs are the inference inputs."""
    pipe = Pipeline.load("tiny", seed=fresh_seed() % 1000)
    prompts = ["two red circles left of a blue square", "a green triangle"]
    res = pipe.generate(prompts, seed=1, cfg=1.0, tau=1e-5, top_p=0.0, progress=False)
    bits = [b.view(len(prompts), h, w, -1) for b, (h, w) in zip(res.bits, SCHEDULE)]
    text, lengths = pipe.text_encoder.encode(prompts)
    m = pipe.model
    with torch.no_grad():
        cond, ada, ca_kv, lens = m.condition(text, lengths, cfg=False)
        x = teacher_inputs(m, cond, bits, SCHEDULE)
        ropes = rope_tables(m.cfg.head_dim, SCHEDULE, rope_grid_side(1.0))
        logits = m.forward_teacher(cond, ada, ca_kv, lens, x, ropes, token_counts(SCHEDULE))
    agree = (logits.argmax(-1) == bit_labels(bits)).float().mean().item()
    assert agree >= 0.999, agree


def test_bitwise_loss_weights_scales_by_sqrt_tokens():
    counts = token_counts(SCHEDULE)
    g = torch.Generator().manual_seed(fresh_seed())
    logits = torch.randn(2, sum(counts), 16, 2, generator=g)
    labels = torch.randint(0, 2, (2, sum(counts), 16), generator=g)
    loss, per_scale = bitwise_loss(logits, labels, counts)
    ce = F.cross_entropy(logits.double().reshape(-1, 2), labels.reshape(-1), reduction="none").view(labels.shape)
    want = [c.mean() for c in ce.split(counts, dim=1)]
    w = [math.sqrt(n) for n in counts]
    ref = sum(wi * v for wi, v in zip(w, want)) / sum(w)
    assert abs(loss.item() - ref.item()) < 1e-5
    assert torch.allclose(per_scale.double(), torch.stack(want), atol=1e-5)


def test_training_steps_fit_a_fixed_batch():
    cfg = get_config("tiny")
    torch.manual_seed(fresh_seed())
    model = init_for_training(build_model(cfg, seed=None))
    g = torch.Generator().manual_seed(0)
    pattern = torch.randint(0, 2, (cfg.token_bits,), generator=g, dtype=torch.uint8)  # a learnable target
    bits = [pattern.expand(2, h, w, -1).clone() for h, w in SCHEDULE]
    text = torch.randn(2, 8, cfg.text_channels, generator=g)
    lengths = torch.tensor([8, 5], dtype=torch.int32)
    ropes = rope_tables(cfg.head_dim, SCHEDULE, rope_grid_side(1.0))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        cond, ada, ca_kv, lens = model.condition(text, lengths, cfg=False)
        logits = model.forward_teacher(cond, ada, ca_kv, lens, teacher_inputs(model, cond, bits, SCHEDULE), ropes,
                                       token_counts(SCHEDULE))
        loss, _ = bitwise_loss(logits, bit_labels(bits), token_counts(SCHEDULE))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 0.6 and losses[-1] < 0.5 * losses[0], losses


def test_train_small_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("train_small", ROOT / "tools" / "train_small.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "w"
    assert mod.main(["--model", "tiny", "--device", "cpu", "--images", "48", "--batch", "2", "--tokenizer-steps", "3", "--steps", "3",
                     "--eval-prompts", "4", "--log-every", "1", "--out", str(out)]) == 0
    for name in ("model.safetensors", "vae.safetensors", "text_encoder.safetensors", "train_config.json",
                 "train_log.jsonl"):
        assert (out / name).is_file(), name
    pipe = Pipeline.load("tiny", weights=str(out))
    assert not pipe.random_weights and pipe.text_encoder.label == "tiny (trained)"
    assert pipe.generate(["a red circle"], progress=False).images.shape == (1, 3, 64, 64)
    with pytest.raises(FileNotFoundError, match="--weights"):
        Pipeline.load("tiny", weights=str(tmp_path / "missing"))


def test_train_small_stages_apart(tmp_path, capsys):
    """--tokenizer-only trains, saves and scores a tokenizer alone; --tokenizer DIR trains a transformer on it
    (the tokenizer file unchanged); bad combinations are one line."""
    spec = importlib.util.spec_from_file_location("train_small", ROOT / "tools" / "train_small.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    tok, full = tmp_path / "tok", tmp_path / "full"
    common = ["--model", "tiny", "--device", "cpu", "--images", "32", "--batch", "2", "--eval-prompts", "4",
              "--log-every", "1"]
    assert mod.main(common + ["--tokenizer-only", "--tokenizer-steps", "16", "--tokenizer-layout", "probe",
                              "--out", str(tok)]) == 0
    assert sorted(f.name for f in tok.iterdir()) == ["train_config.json", "train_log.jsonl", "vae.safetensors"]
    log = [json.loads(line) for line in (tok / "train_log.jsonl").read_text().splitlines()]
    probe = [r["layout_probe"] for r in log if "layout_probe" in r]  # steps 3-7 vs 9-13, the faster kept
    assert len(probe) == 1 and probe[0]["chosen"] in ("contiguous", "channels-last")
    assert probe[0]["contiguous_s_per_step"] > 0 and probe[0]["channels_last_s_per_step"] > 0
    summary = json.loads((tok / "train_config.json").read_text())
    assert summary["stage"] == "tokenizer only" and summary["checker_ground_truth"] == 1.0
    assert 0 <= summary["checker_tokenizer_reconstruction"]["overall"] <= 1 and summary["reconstruction_psnr_db"] > 0
    assert mod.main(common + ["--tokenizer", str(tok), "--steps", "2", "--out", str(full)]) == 0
    assert (full / "vae.safetensors").read_bytes() == (tok / "vae.safetensors").read_bytes()
    assert Pipeline.load("tiny", weights=str(full)).generate(["a red circle"], progress=False).images.shape[0] == 1
    more = tmp_path / "tok2"  # the tokenizer trained further
    assert mod.main(common + ["--tokenizer-only", "--tokenizer", str(tok), "--tokenizer-steps", "1", "--out",
                              str(more)]) == 0
    assert json.loads((more / "train_config.json").read_text())["stage"] == "tokenizer only"
    assert (more / "vae.safetensors").read_bytes() != (tok / "vae.safetensors").read_bytes()
    for extra, message in [(["--tokenizer-only", "--resume", str(full)], "--tokenizer-only: trains a tokenizer alone"),
                           (["--tokenizer", str(tmp_path)], f"--tokenizer: {tmp_path} holds no vae.safetensors")]:
        with pytest.raises(SystemExit) as err:
            mod.main(common + extra + ["--out", str(tmp_path / "x")])
        assert str(err.value).startswith(message), err.value
    assert not (tmp_path / "x").exists()


def test_train_small_resume_continues_the_same_schedule(tmp_path):
    """A transformer schedule of 6 steps trained as 4 steps, then --resume for the rest, ends with the same
    float32 weights, EMA and optimizer state, bit for bit, as 6 steps in one call (tiny model, CPU, one saved
    tokenizer for both); the resumed call logs where it continued."""
    spec = importlib.util.spec_from_file_location("train_small", ROOT / "tools" / "train_small.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    seed = str(int(np.random.SeedSequence().entropy % 1000))
    common = ["--model", "tiny", "--device", "cpu", "--images", "32", "--batch", "2", "--eval-prompts", "4",
              "--log-every", "1", "--seed", seed, "--warmup", "2"]
    tok, whole, part = tmp_path / "tok", tmp_path / "whole", tmp_path / "part"
    assert mod.main(common + ["--tokenizer-only", "--tokenizer-steps", "2", "--out", str(tok)]) == 0
    assert mod.main(common + ["--tokenizer", str(tok), "--steps", "6", "--out", str(whole)]) == 0
    assert mod.main(common + ["--tokenizer", str(tok), "--steps", "6", "--stop-after", "4", "--out", str(part)]) == 0
    first = torch.load(part / mod.STATE, weights_only=True)
    assert (first["step"], first["total"]) == (4, 6)
    assert mod.main(common + ["--resume", str(part), "--out", str(part)]) == 0
    a, b = torch.load(whole / mod.STATE, weights_only=True), torch.load(part / mod.STATE, weights_only=True)
    assert (a["step"], a["total"], b["step"], b["total"]) == (6, 6, 6, 6)
    for key in ("model", "text", "ema_model", "ema_text"):
        for name, t in a[key].items():
            assert torch.equal(t, b[key][name]), (seed, key, name)
    for i, st in a["opt"]["state"].items():
        assert all(torch.equal(v, b["opt"]["state"][i][k]) for k, v in st.items()), (seed, i)
    log = [json.loads(line) for line in (part / "train_log.jsonl").read_text().splitlines()]
    assert any(r["stage"] == "transformer" and r.get("resumed_from") == str(part) and r["step"] == 4 for r in log)
    assert json.loads((part / "train_config.json").read_text())["transformer_steps_done"] == 2
    # --plan-seconds: the schedule's length from the plan (ample: --steps 80), this call's stop from its own
    # budget (nearly none: the measuring steps, 71)
    plan = tmp_path / "plan"
    assert mod.main(common + ["--tokenizer", str(tok), "--steps", "80", "--plan-seconds", "1e6", "--minutes", "1e-6",
                              "--log-every", "50", "--out", str(plan)]) == 0
    state = torch.load(plan / mod.STATE, weights_only=True)
    assert (state["step"], state["total"]) == (71, 80)


def test_train_small_compile_shares_one_graph_across_blocks(tmp_path):
    """--compile compiles the transformer blocks regionally: one Dynamo graph for all of them (not one per
    block), training runs with it, and uncompile_blocks restores the plain forward (tiny model, CPU)."""
    from torch._dynamo.utils import counters
    spec = importlib.util.spec_from_file_location("train_small", ROOT / "tools" / "train_small.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model = build_model(get_config("tiny"), seed=0)
    assert len(model.blocks) >= 2
    before = counters["stats"]["unique_graphs"]
    out = tmp_path / "w"
    assert mod.main(["--model", "tiny", "--device", "cpu", "--images", "16", "--batch", "2", "--tokenizer-steps",
                     "1", "--steps", "2", "--eval-prompts", "2", "--compile", "--out", str(out)]) == 0
    assert counters["stats"]["unique_graphs"] - before == 1
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert not any("compile_failed" in r for r in log), log
    mod.compile_blocks(model)
    assert all("forward" in vars(b) for b in model.blocks)
    assert not mod.uncompile_blocks(model) and not any("forward" in vars(b) for b in model.blocks)


def test_packaged_shapes_model_follows_prompts():
    """The committed model draws what single-object prompts ask for (held-out: 0.96; chance 0.006)."""
    from toprovar.eval.checker import evaluate
    from toprovar.eval.shapes import Group, Spec, prompt_of
    from toprovar.images import to_uint8
    rng = np.random.default_rng(fresh_seed())
    colors, kinds = ("red", "green", "blue", "yellow", "purple"), ("circle", "square", "triangle")
    specs = [Spec("single", (Group(1, str(rng.choice(colors)), str(rng.choice(kinds))),)) for _ in range(8)]
    pipe = Pipeline.load("shapes")
    seed = int(rng.integers(1 << 20))
    images = to_uint8(pipe.generate([prompt_of(s) for s in specs], seed=seed, progress=False).images)
    acc = evaluate(list(images), specs)["overall"]
    assert acc >= 0.5, (acc, seed, [prompt_of(s) for s in specs])


def test_export_uses_the_trained_weights(tmp_path):
    """`toprovar-export --model shapes` exports the packaged trained weights, not random ones: the exported
    text encoder (ONNX Runtime) reproduces the trained encoder's features; the manifest says so."""
    import json
    ort = pytest.importorskip("onnxruntime")
    from toprovar.export.onnx_export import ExportRequest, export_model
    from toprovar.model.text import ByteTokenizer, tokenize_batch
    manifest = export_model(ExportRequest(model="shapes", out=str(tmp_path), only=["text_encoder", "vae_decoder"],
                                          progress=False))
    assert manifest["random_weights"] is False and manifest["text_encoder"]["source"].endswith("text_encoder.safetensors")
    assert json.loads((tmp_path / "manifest.json").read_text())["vae"]["source"].endswith("vae.safetensors")
    pipe = Pipeline.load("shapes")
    prompts = ["four purple squares", "a red circle above a green triangle"]
    ids, mask = tokenize_batch(ByteTokenizer(), prompts, 64, "shapes")
    sess = ort.InferenceSession(str(tmp_path / "onnx" / "text_encoder.onnx"), providers=["CPUExecutionProvider"])
    (hidden,) = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    ref, lengths = pipe.text_encoder.encode(prompts)
    for i, n in enumerate(lengths.tolist()):  # padding rows are masked downstream
        np.testing.assert_allclose(hidden[i, :n], ref[i, :n].numpy(), atol=1e-4, rtol=1e-4)
