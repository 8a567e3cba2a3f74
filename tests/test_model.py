"""Infinity model: structure, KV-cache vs teacher forcing, checkpoint round trip and errors."""
from __future__ import annotations

import torch
import pytest

from toprovar.config import get_config
from toprovar.model.checkpoint import CheckpointError, save_state_dict
from toprovar.model.infinity import Infinity, build_model
from toprovar.model.pieces import BlockPiece, CachedBlockPiece, NextInputPiece
from toprovar.model.rope import rope_tables
from toprovar.schedule import get_schedule, rope_grid_side


@pytest.fixture(scope="module")
def tiny():
    return build_model(get_config("tiny"), seed=123)


def _text(cfg, B=2, L=7, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    text = torch.randn(B, L, cfg.text_channels, generator=g)
    lengths = torch.randint(1, L + 1, (B,), generator=g, dtype=torch.int32)
    return text, lengths


@pytest.mark.parametrize("name,depth,blocks_keys,params_b", [("infinity-2b", 32, 21, 2.2046),
                                                             ("infinity-8b", 40, 21, 8.3758)])
def test_official_layout(name, depth, blocks_keys, params_b):
    cfg = get_config(name)
    with torch.device("meta"):
        m = Infinity(cfg)
    sd = m.state_dict()
    assert len(sd) == 22 + depth * blocks_keys
    assert "block_chunks.7.module.3.sa.scale_mul_1H11" in sd
    assert tuple(sd["block_chunks.0.module.0.sa.scale_mul_1H11"].shape) == (1, cfg.num_heads, 1, 1)
    assert tuple(sd["head.weight"].shape) == (2 * cfg.token_bits, cfg.width)
    n = sum(p.numel() for p in m.parameters()) / 1e9
    assert abs(n - params_b) < 1e-4


def test_kv_cache_equals_teacher_forcing(tiny):
    """Cached scale-by-scale forward == one block-causal forward over all scales (teacher-forced bits)."""
    cfg = tiny.cfg
    sched = get_schedule("0.06M")
    ropes = rope_tables(cfg.head_dim, sched, rope_grid_side(1.0))
    text, lengths = _text(cfg)
    cond, ada, ca_kv, ca_len = tiny.condition(text, lengths, cfg=True)
    Bp, B = cond.shape[0], text.shape[0]
    x = tiny.first_input(cond)
    caches = [(x.new_zeros(Bp, cfg.num_heads, 0, cfg.head_dim),) * 2 for _ in tiny.blocks]
    summed = torch.zeros(B, cfg.codebook_dim, *sched[-1])
    inputs, logits_cached = [], []
    for si, (h, w) in enumerate(sched):
        inputs.append(x)
        for li, blk in enumerate(tiny.blocks):
            pk, pv = caches[li]
            x, k, v, _ = blk(x, ada, ca_kv, ca_len, ropes[si], pk, pv)
            caches[li] = (torch.cat([pk, k], 2), torch.cat([pv, v], 2))
        logits_cached.append(tiny.logits(x, cond))
        bits = torch.randint(0, 2, (B, h * w, cfg.token_bits)).float()
        out = NextInputPiece(tiny, sched, si)(bits, summed)
        summed = out[0]
        if len(out) > 1:
            x = torch.cat([out[1], out[1]], 0)
    counts = [h * w for h, w in sched]
    full = tiny.forward_teacher(cond, ada, ca_kv, ca_len, torch.cat(inputs, 1), ropes, counts)
    cached = torch.cat(logits_cached, 1)
    assert cached.shape == (Bp, sum(counts), cfg.token_bits, 2)
    torch.testing.assert_close(cached, full, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("entropy", [False, True])
@pytest.mark.parametrize("writes_inside", [False, True])
@pytest.mark.parametrize("kv_once", [False, True])
def test_cached_block_piece_equals_block_piece(tiny, entropy, writes_inside, kv_once):
    """The in-place KV-cache form (PyTorch backend) against the exported form, float64: same x and entropy;
    the new keys/values land in the cache at [P, P+n) and nothing else of the cache changes. With the
    backend's options: the cache written by the block's first half (``writes_inside``), the text K/V
    projected beforehand (``kv_once``: ``ca.kv_proj`` of ca_kv handed in, ca_kv itself not passed)."""
    import copy
    cfg = tiny.cfg
    blk = copy.deepcopy(tiny.blocks[2]).double()
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    B, H, hd, n, P, room = 2, cfg.num_heads, cfg.head_dim, 9, 13, 5
    text, lengths = _text(cfg, B=1)
    _, ada, ca_kv, ca_len = tiny.condition(text, lengths, True)
    ada, ca_kv = ada.double(), ca_kv.double()
    x = torch.randn(B, n, cfg.width, generator=g, dtype=torch.float64)
    rope = rope_tables(hd, [(3, 3)], (3, 3))[0].double()
    cache_k = torch.randn(B, H, P + n + room, hd, generator=g, dtype=torch.float64)
    cache_v = torch.randn_like(cache_k)
    before_k, before_v = cache_k.clone(), cache_v.clone()
    want = BlockPiece(blk, entropy)(x, ada, ca_kv, ca_len, rope, cache_k[:, :, :P], cache_v[:, :, :P])
    piece = CachedBlockPiece(blk, writes_inside=writes_inside)
    if kv_once:
        got_x, got_ent = piece(x, ada, None, ca_len, rope, cache_k, cache_v, P, entropy, blk.ca.kv_proj(ca_kv))
    else:
        got_x, got_ent = piece(x, ada, ca_kv, ca_len, rope, cache_k, cache_v, P, entropy)
    torch.testing.assert_close(got_x, want[0], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(cache_k[:, :, P:P + n], want[1], atol=0, rtol=0)
    torch.testing.assert_close(cache_v[:, :, P:P + n], want[2], atol=0, rtol=0)
    for got, orig in ((cache_k, before_k), (cache_v, before_v)):
        assert torch.equal(got[:, :, :P], orig[:, :, :P]) and torch.equal(got[:, :, P + n:], orig[:, :, P + n:])
    if entropy:
        torch.testing.assert_close(got_ent, want[3], atol=1e-12, rtol=1e-12)
    else:
        assert got_ent is None


def test_checkpoint_round_trip(tiny, tmp_path):
    for suffix in (".safetensors", ".pth"):
        path = save_state_dict(tiny, tmp_path / f"m{suffix}")
        other = build_model(tiny.cfg, seed=999)
        other.load_checkpoint(path)
        for (ka, a), (kb, b) in zip(tiny.state_dict().items(), other.state_dict().items()):
            assert ka == kb and torch.equal(a, b), ka


def test_truncated_checkpoint_is_one_clear_error(tiny, tmp_path):
    path = save_state_dict(tiny, tmp_path / "m.pth")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"m\.pth: cannot read checkpoint"):
        build_model(tiny.cfg).load_checkpoint(path)


def test_wrong_shape_key_is_named(tiny, tmp_path):
    sd = dict(tiny.state_dict())
    sd["block_chunks.1.module.0.ffn.fc1.weight"] = torch.zeros(3, 3)
    del sd["pos_start"]
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as err:
        build_model(tiny.cfg).load_checkpoint(tmp_path / "bad.pth")
    msg = str(err.value)
    assert "bad.pth" in msg and "missing keys: pos_start" in msg
    assert "block_chunks.1.module.0.ffn.fc1.weight (3, 3)" in msg and "\n" not in msg


def test_official_flash_layout_scale_mul_is_adapted(tiny, tmp_path):
    sd = {k: v.clone() for k, v in tiny.state_dict().items()}
    key = "block_chunks.0.module.0.sa.scale_mul_1H11"
    sd[key] = torch.randn(1, 1, tiny.cfg.num_heads, 1)
    torch.save({"gpt_fsdp": sd}, tmp_path / "official.pth")
    m = build_model(tiny.cfg).load_checkpoint(tmp_path / "official.pth")
    torch.testing.assert_close(m.state_dict()[key].flatten(), sd[key].flatten(), rtol=0, atol=0)
