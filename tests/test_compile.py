"""``TorchBackend(compile=True)``: the torch.compile'd block pieces and VAE decoder against a float64 eager
reference, over the token/cache shapes of a generation (size-0/1 first scales, pruned counts), and an
end-to-end generation with the same bits as the eager backend (CPU, float32)."""
from __future__ import annotations

import copy

import pytest
import torch

from toprovar.config import get_config
from toprovar.model.infinity import build_model
from toprovar.model.pieces import BlockPiece
from toprovar.model.rope import rope_tables
from toprovar.model.vae import build_decoder
from toprovar.pipeline import Pipeline
from toprovar.runtime.torch_backend import TorchBackend

# float32 compiled vs float64 eager, on unit-scale activations after one block (|x| ~ 1-10)
ATOL, RTOL = 2e-4, 1e-4


@pytest.fixture(scope="module")
def tiny():
    cfg = get_config("tiny")
    return cfg, build_model(cfg, seed=int(torch.randint(0, 2**31 - 1, ()).item()))


def _block_inputs(cfg, model, n, P, g):
    B, H, hd = 2, cfg.num_heads, cfg.head_dim
    text = torch.randn(1, 6, cfg.text_channels, generator=g)
    _, ada, ca_kv, ca_len = model.condition(text, torch.tensor([4], dtype=torch.int32), True)
    rope = rope_tables(hd, [(1, n)], (1, n))[0]
    return (torch.randn(B, n, cfg.width, generator=g), ada, ca_kv, ca_len, rope,
            torch.randn(B, H, P, hd, generator=g), torch.randn(B, H, P, hd, generator=g))


@pytest.mark.parametrize("entropy", [False, True])
@pytest.mark.parametrize("one_graph", [False, True])
def test_compiled_block_matches_float64(tiny, entropy, one_graph):
    """The backend's default options (text K/V once, cache writes in the compiled half) and the whole block
    as one compiled graph (``one_graph``)."""
    cfg, model = tiny
    be = TorchBackend(model, build_decoder(cfg.vae, seed=0), [(1, 1)], compile=True, one_graph=one_graph)
    ref = BlockPiece(copy.deepcopy(model.blocks[1]).double(), entropy)
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
    for n, P in [(1, 0), (4, 1), (16, 5), (23, 21), (36, 57)]:  # first scales, a pruned count, a later scale
        args = _block_inputs(cfg, model, n, P, g)
        got = be.block(1, *args, entropy)
        want = ref(*(a.double() if a.is_floating_point() else a for a in args))
        for name, a, b in zip(("x", "k", "v", "entropy"), got, want):
            torch.testing.assert_close(a.double(), b, atol=ATOL, rtol=RTOL, msg=lambda m: f"{name} n={n} P={P}: {m}")
        if not entropy:
            assert got[3] is None


def test_compiled_decoder_matches_float64(tiny):
    cfg, model = tiny
    dec = build_decoder(cfg.vae, seed=int(torch.randint(0, 2**31 - 1, ()).item())).eval()
    be = TorchBackend(model, dec, [(1, 1)], compile=True)
    z = torch.randn(1, cfg.codebook_dim, 8, 8)
    want = copy.deepcopy(dec).double()(z.double())
    torch.testing.assert_close(be.decode(z).double(), want, atol=ATOL, rtol=RTOL)


def test_compiled_generation_same_bits():
    """Pinned ToProVAR (entropy blocks, pruned token counts, the policy's compiled keep selection)."""
    from toprovar.benchmark.e2e import build_policy
    prompts = ["a red square left of a blue circle"]
    eager = Pipeline.load("tiny", seed=4)
    compiled = Pipeline.load("tiny", seed=4)
    compiled.compile = True
    ref = eager.generate(prompts, seed=9, policy=build_policy("toprovar", 4, None, 7), progress=False)
    got = compiled.generate(prompts, seed=9, policy=build_policy("toprovar", 4, None, 7), progress=False)
    assert got.trace.kept == ref.trace.kept and any(k < ref.trace.tokens[si] for si, ks in ref.trace.kept.items()
                                                    for k in ks)
    assert all(torch.equal(a, b) for a, b in zip(ref.bits, got.bits))
    torch.testing.assert_close(got.images, ref.images, atol=1e-4, rtol=0)


def test_compiled_fastvar_layers_same_bits():
    """FastVAR's per-sub-layer blocks run as one compiled function on a compiled backend
    (``TorchBackend.compiled_fn``): same kept counts and bits as eager (tiny, CPU float32)."""
    from toprovar.benchmark.e2e import build_policy
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    eager, compiled = Pipeline.load("tiny", seed=seed), Pipeline.load("tiny", seed=seed)
    compiled.compile = True
    ref = eager.generate(["two green triangles"], seed=seed, policy=build_policy("fastvar", 4, None, 7), progress=False)
    got = compiled.generate(["two green triangles"], seed=seed, policy=build_policy("fastvar", 4, None, 7),
                            progress=False)
    assert got.trace.kept == ref.trace.kept and any(k < ref.trace.tokens[si] for si, ks in ref.trace.kept.items()
                                                    for k in ks)
    assert all(torch.equal(a, b) for a, b in zip(ref.bits, got.bits))
    torch.testing.assert_close(got.images, ref.images, atol=1e-4, rtol=0)
    backend = next(iter(compiled._orchestrators.values())).backend
    from toprovar.policy.fastvar import FastVARBlock
    assert list(backend._compiled_fns) == [FastVARBlock.run]
