"""HART (the second family) on the CPU: config, strict loading, cached == teacher-forced, generation
through the shared pipeline, every policy, export + ONNX Runtime == PyTorch, one-line errors.

The comparison with the official code is ``tests/oracle/test_hart_oracle.py``."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from toprovar.cli import main
from toprovar.config import get_config
from toprovar.model import families
from toprovar.model.checkpoint import CheckpointError, save_state_dict
from toprovar.model.hart.transformer import Hart, build_hart
from toprovar.pipeline import Pipeline
from toprovar.policy import POLICIES, make_policy, policy_report

CFG = get_config("hart-tiny")


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.load("hart-tiny")


def _features(B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, CFG.text_maxlen, CFG.text_channels, generator=g),
            torch.tensor([5, CFG.text_maxlen][:B], dtype=torch.int32))


def test_hart_0_7b_size_matches_the_release():
    """732M parameters in the transformer (the paper's 732M), 37M in the residual diffusion MLP."""
    with torch.device("meta"):
        m = Hart(get_config("hart-0.7b"))
    total = sum(p.numel() for n, p in m.named_parameters() if not n.startswith("quantize."))
    assert 0.725e9 < total < 0.74e9
    assert 36e6 < sum(p.numel() for p in m.diffloss.parameters()) < 38e6
    assert [h for h, _ in families.schedule_for(m.cfg, 1024, 1.0)] == list(m.cfg.patch_nums)


def test_strict_checkpoint_loading(tmp_path):
    src = build_hart(CFG, seed=1)
    path = tmp_path / "hart.safetensors"
    save_state_dict(src.transformer_view(), path)
    dst = build_hart(CFG, seed=2).load_checkpoint(path)
    assert torch.equal(dst.head.weight, src.head.weight) and torch.equal(dst.blocks[2].attn.q_bias,
                                                                         src.blocks[2].attn.q_bias)
    sd = src.transformer_view().state_dict()
    del sd["blocks.1.ffn.up_proj.weight"]
    sd["blocks.9.extra"] = torch.zeros(1)
    torch.save(sd, tmp_path / "bad.bin")
    with pytest.raises(CheckpointError) as e:
        build_hart(CFG).load_checkpoint(tmp_path / "bad.bin")
    msg = str(e.value)
    assert "\n" not in msg and "missing keys: blocks.1.ffn.up_proj.weight" in msg and "blocks.9.extra" in msg


def test_tokenizer_loading_is_strict(tmp_path):
    from safetensors.torch import save_file
    dec = families.build_decoder(CFG, seed=3)
    model = build_hart(CFG, seed=3)
    sd = {f"vae.{k}": v for k, v in dec.state_dict().items()}
    sd.update({f"vae.quantize.{k}": v for k, v in model.quantize.state_dict().items()})
    sd["vae.encoder.conv_in.weight"] = torch.zeros(1)  # known, skipped
    save_file(sd, str(tmp_path / "tok.safetensors"))
    other = build_hart(CFG, seed=4)
    loaded = families.load_decoder(CFG, str(tmp_path / "tok.safetensors"), other)
    assert torch.equal(loaded.post_quant_conv.weight, dec.post_quant_conv.weight)
    assert torch.equal(other.quantize.embedding.weight, model.quantize.embedding.weight)
    del sd["vae.decoder.conv_out.bias"]
    save_file(sd, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError, match="missing keys: decoder.conv_out.bias"):
        families.load_decoder(CFG, str(tmp_path / "bad.safetensors"))


def test_cached_scales_equal_teacher_forcing():
    """The KV-cached scale-by-scale blocks (what generation runs) == one block-causal pass (float32 norms, RoPE and
    head as in generation: max abs logit difference <= 1e-5)."""
    model = build_hart(CFG, seed=5)
    sched = [(p, p) for p in CFG.patch_nums]
    ropes = families.ropes_for(CFG, sched)
    text, lengths = _features()
    cond, ada, ca, calen, x0 = model.condition(text, lengths, cfg=True)
    g = torch.Generator().manual_seed(6)
    xs = [x0] + [torch.randn(x0.shape[0], h * w, CFG.width, generator=g) for h, w in sched[1:]]
    counts = [x.shape[1] for x in xs]
    full = model.forward_teacher(cond, ada, torch.cat(xs, 1), ropes, counts)
    H, hd = CFG.num_heads, CFG.head_dim
    past = [(x0.new_zeros(x0.shape[0], H, 0, hd),) * 2 for _ in model.blocks]
    off = 0
    for si, x in enumerate(xs):
        for li, blk in enumerate(model.blocks):
            x, k, v, _ = blk(x, ada, ca, calen, ropes[si], *past[li])
            past[li] = (torch.cat([past[li][0], k], 2), torch.cat([past[li][1], v], 2))
        d = (model.logits(x, cond) - full[:, off:off + counts[si]]).abs().max().item()
        assert d <= 1e-5, f"scale {si}: {d}"
        off += counts[si]


def test_generation_is_deterministic_and_profiled_equal(pipe):
    a = pipe.generate(["a red fox", "two cats"], seed=3, progress=False)
    b = pipe.generate(["a red fox", "two cats"], seed=3, progress=False, profile=True)
    c = pipe.generate(["a red fox", "two cats"], seed=4, progress=False)
    assert a.images.shape == (2, 3, 32, 32) and torch.isfinite(a.images).all()
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)
    assert [t.shape[1] for t in a.bits] == [p * p for p in CFG.patch_nums]
    assert b.trace.tokens[0] == CFG.text_maxlen  # scale 0 runs the context tokens
    assert set(b.piece_ms) == set(range(len(CFG.patch_nums)))


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_runs_on_hart(pipe, name):
    res = pipe.generate(["a red fox"], seed=1, progress=False, policy=make_policy(name))
    rep = policy_report(res.trace, CFG)
    assert torch.isfinite(res.images).all() and 0 < rep["relative_flops"] <= 1.0
    if name == "none":
        assert rep["relative_flops"] == 1.0
    if name == "scale-exit":
        assert rep["skipped_scales"]
    if name.startswith("fastvar"):  # HART: its released HART setting, 6x6 (-2) at 0.5 and 8x8 (-1) at 0.75, all layers
        assert not rep["skipped_scales"]
        assert res.trace.kept[4] == [36 - 18] * CFG.depth and res.trace.kept[5] == [64 - 48] * CFG.depth
        assert all(res.trace.kept[si] == [res.trace.tokens[si]] * CFG.depth for si in range(4))


@pytest.fixture
def exported(hart_exported):
    return hart_exported


def test_export_manifest(exported):
    from toprovar.export.manifest import load_manifest, verify
    m = load_manifest(exported)
    verify(m)
    names = set(m["pieces"])
    assert {"condition_cfg", "block_00", "block_00_entropy", "head_s05", "head_s00_nocfg", "next_input_s04",
            "diffusion_head", "diffusion_head_nocfg", "vae_decoder", "policy_s05"} <= names
    assert [i["name"] for i in m["pieces"]["head_s05"]["outputs"]] == ["bits", "hard"]
    assert m["model"]["family"] == "hart" and m["spec"]["noise_widths"][-1] > m["spec"]["noise_widths"][0]


@pytest.mark.parametrize("policy", ["none", "toprovar"])
def test_onnxruntime_equals_torch(exported, policy):
    """Same codes at every scale before the last, same kept tokens, the last scale's codes (plus the continuous
    diffusion residual: 8 MLP passes amplify float differences) within 1e-3, images within 1e-4."""
    from toprovar.runtime.engine_dir import EngineRuntime
    text, lengths = _features(seed=7)
    res = {}
    for be in ("torch", "onnxruntime"):
        rt = EngineRuntime.open(exported, be, "cpu")
        res[be] = rt.generate_from_features(text, lengths, seed=3, policy=make_policy(policy), progress=False)
    a, b = res["torch"], res["onnxruntime"]
    assert a.trace.kept == b.trace.kept
    for si, (x, y) in enumerate(zip(a.bits, b.bits)):
        assert (torch.equal(x, y) if si < len(a.bits) - 1 else (x - y).abs().max() < 1e-3), f"scale {si}"
    assert (a.images - b.images).abs().max() < 1e-4


def test_cli_generate_png_and_one_line_errors(tmp_path, capsys):
    out = tmp_path / "fox.png"
    assert main(["generate", "--model", "hart-tiny", "--prompt", "a red fox", "-o", str(out), "--policy",
                 "toprovar"]) == 0
    assert str(out) in capsys.readouterr().out
    assert np.asarray(Image.open(out)).shape == (32, 32, 3)
    cases = [
        (["--model", "hart-tiny", "--resolution", "512"], "--resolution: hart-tiny generates only 32x32"),
        (["--model", "hart-tiny", "--prompt", "x" * 60], "exceed"),
        (["--model", "hart-0.7b"], "--text-encoder: model hart-0.7b needs a local Qwen2 directory"),
        (["--model", "hart-tiny", "--checkpoint", str(tmp_path / "none.bin")], "--checkpoint/--tokenizer"),
    ]
    for args, want in cases:
        argv = ["generate", "--prompt", "x", "-o", str(tmp_path / "bad.png")] + args
        assert main(argv) == 2
        err = [e for e in capsys.readouterr().err.strip().splitlines() if not e.startswith("note: ")]
        assert len(err) == 1 and want in err[0], err
    assert not (tmp_path / "bad.png").exists()


def test_calibration_on_hart(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\ntwo blue cats\n")
    out = tmp_path / "calib.json"
    assert main(["calibrate", "--model", "hart-tiny", "--prompts", str(prompts), "-o", str(out)]) == 0
    pol = make_policy("toprovar", str(out))
    pipe = Pipeline.load("hart-tiny")
    res = pipe.generate(["a red fox"], seed=2, progress=False, policy=pol)
    assert torch.isfinite(res.images).all() and 0 < policy_report(res.trace, CFG)["relative_flops"] <= 1.0


def test_engine_dir_cli_generates_from_a_prompt(exported, tmp_path, capsys):
    """``toprovar generate --engine-dir`` on ONNX Runtime: the tiny Qwen2 text path runs in PyTorch."""
    out = tmp_path / "ort.png"
    assert main(["generate", "--engine-dir", str(exported), "--backend", "onnxruntime", "--device", "cpu",
                 "--prompt", "a red fox", "-o", str(out)]) == 0
    assert np.asarray(Image.open(out)).shape == (32, 32, 3)
