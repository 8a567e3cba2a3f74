"""Pruning policies: hand-computed statistics, the token-keep piece, pruned execution against explicit
references, every baseline / ablation end to end on the tiny model, FLOP counting, the CLI."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from toprovar.cli import main
from toprovar.config import get_config
from toprovar.model.pieces import HeadPiece, NextInputPiece
from toprovar.model.rope import rope_tables
from toprovar.pipeline import Pipeline, model_spec
from toprovar.policy import (POLICIES, FastVARConfig, GenerationInfo, Policy, ScaleExitConfig, SkipVARConfig,
                             ToProVARConfig, ToProVARPolicy, make_policy, policy_report)
from toprovar.policy.fastvar import FastVARBlock, fastvar_select, restore_branch
from toprovar.policy.flops import block_flops, head_flops, trace_flops, unpruned_flops
from toprovar.policy.stats import (layer_score, low_entropy_ratio, min_kept, principal_ratio, pruning_depth,
                                   upsample_entropy)
from toprovar.policy.token import TokenKeepPiece, descending_order
from toprovar.runtime.orchestrator import Orchestrator, uniform_noise
from toprovar.runtime.torch_backend import TorchBackend
from toprovar.schedule import get_schedule, rope_grid_side


def fresh_seed() -> int:
    return int(torch.seed() % 2**31)


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.load("tiny", seed=5, text_encoder=False)


def features(pipe, B=1, L=9, seed=None):
    g = torch.Generator().manual_seed(fresh_seed() if seed is None else seed)
    text = torch.randn(B, L, pipe.cfg.text_channels, generator=g)
    lengths = torch.randint(3, L + 1, (B,), generator=g, dtype=torch.int32)
    return text, lengths


# ----------------------------------------------------------------------------- configuration
@pytest.mark.parametrize("field,value", [
    ("tau", 1.5), ("tau", -0.1), ("beta", 0.0), ("a_min", -0.1), ("a_max", 1.2), ("k_min", 0.0), ("bucket", 0),
    ("bucket", 2.5), ("stage", "tokens"), ("layer_score_mode", "both"), ("full_layers", (1, 2)),
    ("rho_layers", (3,)), ("layer_scores", (0.5, 1.5)), ("layer_skip", 1), ("rep_scale", -1),
    ("detail_threshold", 2.0)])
def test_bad_config_value_is_one_error_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"^ToProVARConfig\.{field}: must be "):
        ToProVARConfig(**{field: value})


def test_config_cross_field_and_model_checks():
    with pytest.raises(ValueError, match=r"ToProVARConfig\.a_max: must be a number in \[a_min=0.5, 1\]"):
        ToProVARConfig(a_min=0.5, a_max=0.2)
    with pytest.raises(ValueError, match=r"ToProVARConfig\.layer_scores: must be given when layer_score_mode"):
        ToProVARConfig(layer_score_mode="static")
    with pytest.raises(ValueError, match=r"ToProVARConfig\.bogus: unknown parameter"):
        ToProVARConfig.from_dict({"bogus": 1})
    with pytest.raises(ValueError, match=r"ToProVARConfig\.layer_scores: must be 4 values"):
        ToProVARConfig(layer_score_mode="static", layer_scores=(0.5,) * 3).check_model(4, 7)
    with pytest.raises(ValueError, match=r"ToProVARConfig\.full_layers: must be layer indices < depth 4"):
        ToProVARConfig(full_layers=(0, 4)).check_model(4, 7)
    with pytest.raises(ValueError, match=r"ToProVARConfig\.rep_scale: must be a scale index < 7"):
        ToProVARConfig(rep_scale=7).check_model(4, 7)
    assert ToProVARConfig().rep_index(13) == 6 and ToProVARConfig().rep_index(7) == 3
    assert ToProVARConfig(rep_scale=2).rep_index(13) == 2
    cfg = ToProVARConfig.from_dict(ToProVARConfig(layer_score_mode="static", layer_scores=[0.2, 1]).to_dict())
    assert cfg.layer_scores == (0.2, 1.0)
    with pytest.raises(ValueError, match=r"FastVARConfig\.ratios: must be ratios in \[0, 1\]"):
        FastVARConfig(ratios={-4: 1.5})
    with pytest.raises(ValueError, match=r"ScaleExitConfig\.exit_from: must be a position within a 7-scale"):
        ScaleExitConfig(exit_from=-7).resolve(7)
    with pytest.raises(ValueError, match=r"SkipVARConfig\.skip_from: must be a position"):
        SkipVARConfig(skip_from=9).resolve(7)


# ----------------------------------------------------------------------------- statistics by hand
def test_low_entropy_ratio_by_hand():
    assert float(low_entropy_ratio(torch.tensor([1.0, 2.0, 3.0, 10.0]))) == 0.75  # mean 4: three below
    assert float(low_entropy_ratio(torch.tensor([5.0, 5.0, 5.0, 5.0]))) == 0.0   # none strictly below
    assert float(low_entropy_ratio(torch.tensor([1.0, 9.0, 9.0, 9.0]))) == 0.25  # mean 7
    batch = low_entropy_ratio(torch.tensor([[1.0, 2.0, 3.0, 10.0], [1.0, 9.0, 9.0, 9.0]]))
    assert batch.tolist() == [0.75, 0.25]


def test_pruning_depth_by_hand():
    rhos = [0.0, 0.2, 0.45, 0.3, 0.5]
    assert pruning_depth(rhos, 0.4) == 2
    assert pruning_depth(rhos, 0.45) == 2  # >= tau
    assert pruning_depth(rhos, 0.5) == 4
    assert pruning_depth(rhos, 0.6) is None  # never crosses: no pruning


def test_layer_score_rank1_and_isotropic():
    g = torch.Generator().manual_seed(fresh_seed())
    u, v = torch.rand(8, generator=g) + 0.5, torch.rand(8, generator=g) + 0.5
    r1 = principal_ratio(torch.outer(u, v), center=False)
    assert r1 > 1e6 and layer_score(r1, 0.5) < 1e-6  # rank 1 -> Global, R ~ 0
    uz, vz = u - u.mean(), v - v.mean()  # zero-mean factors: still rank 1 after centring
    assert layer_score(principal_ratio(torch.outer(uz, vz), center=True), 0.5) < 1e-6
    eye = torch.eye(6)
    for center in (False, True):  # isotropic: sigma1 = sigma2 -> R = 1 (centred I: 1,...,1,0)
        assert principal_ratio(eye, center) == pytest.approx(1.0, abs=1e-9)
        assert layer_score(principal_ratio(eye, center), 3.0) == pytest.approx(1.0, abs=1e-9)
    assert principal_ratio(torch.diag(torch.tensor([2.0, 1.0, 0.5]))) == pytest.approx(2.0)
    assert layer_score(2.0, 0.7) == pytest.approx(math.exp(-0.7))
    assert layer_score(principal_ratio(torch.ones(1, 5)), 1.0) == 0.0  # one singular value


def test_token_keep_by_hand():
    # H = [1, 1, 2, 4]: Hn = N H / sum H = [0.5, 0.5, 1, 2]; phi R = 0.5 -> q = [0.25, 0.25, 0.5, 1]
    # a_min 0.1, a_max 0.5: a + (b - a) q = [0.2, 0.2, 0.3, 0.5] -> P_keep = [0.8, 0.8, 0.7, 0.5]
    piece = TokenKeepPiece(a_min=0.1, a_max=0.5, k_min=0.25, bucket=1)
    p, k, order = piece(torch.tensor([1.0, 1.0, 2.0, 4.0]), torch.tensor([0.5]))
    torch.testing.assert_close(p, torch.tensor([0.8, 0.8, 0.7, 0.5]))
    assert k.dtype == torch.int64 and k.shape == (1,) and k.item() == 3  # round(2.8)
    assert order.tolist() == [0, 1, 2, 3]  # descending, equal P_keep by lower index
    p2, _, order2 = piece(torch.tensor([[4.0, 1.0, 2.0, 1.0]]), torch.tensor([0.5]))  # (1, n) input
    torch.testing.assert_close(p2, torch.tensor([0.5, 0.8, 0.7, 0.8]))
    assert order2.tolist() == [1, 3, 2, 0]
    # clipping: q large -> P_keep 0; phi R = 0 -> P_keep = 1 - a_min
    p3, _, _ = TokenKeepPiece(0.1, 0.9, 0.1, 1)(torch.tensor([1.0, 100.0]), torch.tensor([1.0]))
    torch.testing.assert_close(p3, torch.tensor([1.0 - (0.1 + 0.8 * 2 / 101), 0.0]))
    p4, _, _ = TokenKeepPiece(0.1, 0.9, 0.1, 1)(torch.tensor([1.0, 3.0]), torch.tensor([0.0]))
    torch.testing.assert_close(p4, torch.tensor([0.9, 0.9]))


@pytest.mark.parametrize("a_max,k_min,bucket,n,expect", [
    (0.95, 0.1, 1, 100, 10),    # sum P = 5 -> minimum ceil(0.1 * 100) = 10
    (0.95, 0.1, 16, 100, 16),   # minimum 10 -> bucket 16
    (0.5, 0.1, 16, 100, 64),    # sum P = 50 -> 64
    (0.5, 0.1, 1, 100, 50),
    (0.1, 0.1, 16, 20, 20),     # sum P = 18 -> 32, capped at N
    (0.95, 0.1, 16, 640, 64),   # 0.1 * 640 = 64 exactly (no float push to 65, then 80)
    (0.999, 0.001, 4, 10, 4),   # minimum is at least one token, then the bucket
])
def test_kept_count_minimum_and_bucket(a_max, k_min, bucket, n, expect):
    piece = TokenKeepPiece(0.0, a_max, k_min, bucket)
    _, k, _ = piece(torch.full((n,), 2.0), torch.tensor([1.0]))  # uniform entropy: P_keep = 1 - a_max
    assert k.item() == expect
    if round(n * (1 - a_max)) <= math.ceil(k_min * n - 1e-3):
        assert min_kept(n, k_min, bucket) == expect


def test_descending_order_equals_stable_sort_with_ties():
    g = torch.Generator().manual_seed(fresh_seed())
    p = torch.randint(0, 5, (300,), generator=g).float() / 4  # many ties
    assert torch.equal(descending_order(p), torch.sort(p, descending=True, stable=True).indices)


def test_token_keep_piece_onnx_matches_torch(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    piece = TokenKeepPiece(0.05, 0.9, 0.1, 16).eval()
    g = torch.Generator().manual_seed(fresh_seed())
    n = 144
    path = tmp_path / "policy.onnx"
    prog = torch.onnx.export(piece, (torch.rand(n, generator=g), torch.tensor([0.5])), dynamo=True, verbose=False,
                             input_names=["entropy", "phi_r"], output_names=["p_keep", "k", "order"], opset_version=18)
    prog.save(str(path))
    assert "ScatterElements" in {node.op_type for node in prog.model_proto.graph.node}  # the exact-rank order
    sess = ort.InferenceSession(str(path))
    for ent in (torch.rand(n, generator=g) * 5, torch.randint(1, 4, (n,), generator=g).float()):  # + ties
        for phi_r in (0.3, 1.0):
            ref = piece(ent, torch.tensor([phi_r]))
            out = sess.run(None, {"entropy": ent.numpy(), "phi_r": np.array([phi_r], np.float32)})
            np.testing.assert_allclose(out[0], ref[0].numpy(), atol=1e-6)
            assert out[1].tolist() == ref[1].tolist()
            assert out[2].tolist() == ref[2].tolist()


def test_upsample_entropy_bilinear():
    src = torch.tensor([1.0, 2.0, 3.0, 4.0])
    up = upsample_entropy(src, (2, 2), (4, 4)).reshape(4, 4)
    assert up[0, 0] == 1.0 and up[3, 3] == 4.0 and up[1:3, 1:3].mean() == pytest.approx(2.5)
    assert torch.equal(upsample_entropy(src, (2, 2), (2, 2)), src)


# ----------------------------------------------------------------------------- ToProVAR decisions, no model
def _drive(policy, schedule, depth=4):
    policy.start(GenerationInfo(schedule, depth, 1, torch.device("cpu")))
    return policy


def test_decision_input_is_previous_layer_entropy_and_D_is_causal():
    sched = [(1, 1), (2, 2), (4, 4), (8, 8)]
    cfg = ToProVARConfig(stage="scale-token", tau=0.5, a_min=0.0, a_max=0.9, k_min=0.1, bucket=1)
    pol = _drive(ToProVARPolicy(cfg), sched)
    g = torch.Generator().manual_seed(fresh_seed())
    # scales 0..2: rho below tau (one low token each) -> nothing pruned
    for si, (h, w) in enumerate(sched[:3]):
        n = h * w
        assert pol.keep(si, 0, n) is None and pol.wants_entropy(si, 0)
        e = torch.full((1, n), 5.0)
        e[0, 0] = 1.0
        pol.observe(si, 0, e, None)
        if n > 1:
            assert pol.rho[si] == pytest.approx(1 / n)
        assert pol.D is None and pol.keep(si, 1, n) is None
    # scale 3: rho = 0.5 at layer 0 -> D = 3, and layer 1 of the same scale is pruned on layer 0's entropy
    n = 64
    assert pol.keep(3, 0, n) is None
    e0 = torch.cat([torch.rand(32, generator=g) + 0.1, torch.rand(32, generator=g) + 5.0])[torch.randperm(64, generator=g)]
    pol.observe(3, 0, e0.unsqueeze(0), None)
    assert pol.D == 3 and pol.rho[3] == 0.5
    idx1 = pol.keep(3, 1, n)
    _, k, order = pol.piece(e0, torch.tensor([1.0]))  # phi(3) = 4/4, R = 1 in scale-token
    assert torch.equal(idx1, order[: k.item()].sort().values)
    assert idx1.tolist() == sorted(idx1.tolist()) and 0 < idx1.numel() < n
    # layer 1 reports entropy for its kept tokens only: the decision input of layer 2 merges them
    e1 = torch.rand(1, idx1.numel(), generator=g) * 10
    assert pol.wants_entropy(3, 1)
    pol.observe(3, 1, e1, idx1)
    merged = e0.clone()
    merged[idx1] = e1[0]
    _, k2, order2 = pol.piece(merged, torch.tensor([1.0]))
    assert torch.equal(pol.keep(3, 2, n), order2[: k2.item()].sort().values)
    assert not pol.wants_entropy(3, 3)  # the last layer's entropy feeds nobody (layer 0 is always full)


def test_first_layer_input_is_previous_scale_upsampled():
    sched = [(1, 1), (2, 2), (4, 4)]
    pol = _drive(ToProVARPolicy(ToProVARConfig(stage="scale-token", tau=0.0)), sched)
    src = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    pol.keep(1, 0, 4)
    pol.observe(1, 0, src, None)
    pol.observe(1, 3, src * 2, None)  # the last layer of scale 1 that reported
    pol.keep(2, 0, 16)  # enter scale 2
    torch.testing.assert_close(pol.ent, upsample_entropy(src * 2, (2, 2), (4, 4)))


def test_online_layer_scores_from_representative_scale():
    sched = [(1, 1), (2, 2), (4, 4), (4, 4), (6, 6)]
    cfg = ToProVARConfig(stage="scale-layer", tau=0.0, rep_scale=2, svd_center=False, beta=1.0)
    pol = _drive(ToProVARPolicy(cfg), sched)
    maps = {1: torch.eye(4) + 1e-3, 2: torch.outer(torch.arange(1.0, 5.0), torch.ones(4)), 3: torch.eye(4)}
    for si, (h, w) in enumerate(sched):
        n = h * w
        for layer in range(4):
            idx = pol.keep(si, layer, n)
            if si <= 2:  # before R is known every layer runs in full
                assert idx is None
            if pol.wants_entropy(si, layer) and (idx is None or idx.numel()):
                m = maps.get(layer, torch.rand(h, w) + 1) if si == 2 else torch.rand(h, w) + 1
                pol.observe(si, layer, m.reshape(1, -1), idx)
        if si == 2:
            assert pol.R[1] == pytest.approx(1.0, abs=1e-2) and pol.R[2] < 1e-6 and pol.R[3] == pytest.approx(1.0)
    # after the representative scale: Detail layers (1, 3) are skipped, the Global layer 2 runs in full
    assert pol.keep(4, 1, 36).numel() == 0 and pol.keep(4, 2, 36) is None and pol.keep(4, 3, 36).numel() == 0


# ----------------------------------------------------------------------------- pruned execution
class Forced(Policy):
    """Keeps what ``decide(si, layer, n)`` says; asks entropy where ``want``."""

    def __init__(self, decide, want=lambda si, layer: False):
        self.decide, self.want = decide, want

    def keep(self, si, layer, n):
        return self.decide(si, layer, n)

    def wants_entropy(self, si, layer):
        return self.want(si, layer)


class Recording(Policy):
    """Forwards to ``inner`` and logs each decision (kept indices, whether entropy was asked)."""

    def __init__(self, inner):
        self.inner, self.log = inner, {}

    def start(self, info):
        self.inner.start(info)
        self.log = {}

    def run_scale(self, si):
        return self.inner.run_scale(si)

    def use_cfg(self, si):
        return self.inner.use_cfg(si)

    def keep(self, si, layer, n):
        idx = self.inner.keep(si, layer, n)
        self.log[(si, layer)] = {"idx": None if idx is None else idx.clone(), "want": False}
        return idx

    def wants_entropy(self, si, layer):
        w = self.inner.wants_entropy(si, layer)
        self.log[(si, layer)]["want"] = w
        return w

    def observe(self, si, layer, entropy, kept):
        self.inner.observe(si, layer, entropy, kept)


class RecordingBackend(TorchBackend):
    """Records the residual stream entering the head at every scale."""

    def __init__(self, *a):
        super().__init__(*a)
        self.head_x = []

    def head(self, si, x, cond, uniform, cfg, tau, top_p):
        self.head_x.append(x.clone())
        return super().head(si, x, cond, uniform, cfg, tau, top_p)


def orchestrator(pipe, backend_cls=TorchBackend):
    sched = get_schedule(pipe.cfg.default_preset)
    ropes = rope_tables(pipe.cfg.head_dim, sched, rope_grid_side(1.0))
    be = backend_cls(pipe.model, pipe.decoder, sched)
    return Orchestrator(be, model_spec(pipe.cfg), sched, ropes), be, sched, ropes


def test_everything_kept_through_the_gather_path_is_bit_identical(pipe):
    text, lengths = features(pipe, B=2)
    seed = fresh_seed()
    orch, _, _, _ = orchestrator(pipe)
    kw = dict(seed=seed, cfg=3.0, tau=1.0, progress=False)
    ref = orch.generate(text, lengths, policy=Policy(), **kw)
    gathered = orch.generate(text, lengths, policy=Forced(lambda si, l, n: torch.arange(n)), **kw)
    for a, b in zip(ref.bits, gathered.bits):
        assert torch.equal(a, b), f"seed {seed}"
    assert torch.equal(ref.images, gathered.images)
    # with entropy asked everywhere: the policy that keeps all == the same requests without keeping
    want = lambda si, l: True  # noqa: E731
    plain = orch.generate(text, lengths, policy=Forced(lambda si, l, n: None, want), **kw)
    kept = orch.generate(text, lengths, policy=Forced(lambda si, l, n: torch.arange(n), want), **kw)
    assert all(torch.equal(a, b) for a, b in zip(plain.bits, kept.bits)) and torch.equal(plain.images, kept.images)
    # ToProVAR configured to keep everything (a_max = 0: P_keep = 1) equals the unpruned run with the same
    # entropy requests (layers 0..2 report entropy once D = 0 is known) bit for bit
    keep_all = ToProVARPolicy(ToProVARConfig(stage="full", tau=0.0, a_min=0.0, a_max=0.0))
    tp = orch.generate(text, lengths, policy=keep_all, **kw)
    assert keep_all.D == 0 and all(k == [n] * 4 for k, n in zip(tp.trace.kept.values(), tp.trace.tokens.values()))
    same = orch.generate(text, lengths, policy=Forced(lambda si, l, n: None, lambda si, l: l < 3), **kw)
    assert all(torch.equal(a, b) for a, b in zip(same.bits, tp.bits)) and torch.equal(same.images, tp.images)


@pytest.mark.parametrize("cfg", [
    ToProVARConfig(stage="scale-token", tau=0.0, a_min=0.2, a_max=0.9, k_min=0.1, bucket=4),
    ToProVARConfig(stage="full", tau=0.0, a_min=0.1, a_max=1.0, k_min=0.2, bucket=8, layer_score_mode="static",
                   layer_scores=(1.0, 1.0, 0.3, 1.0)),
], ids=["scale-token", "full-static"])
def test_pruned_execution_equals_explicit_gather_run_scatter(pipe, cfg):
    model = pipe.model
    text, lengths = features(pipe, B=1)
    seed = fresh_seed()
    orch, be, sched, ropes = orchestrator(pipe, RecordingBackend)
    pol = Recording(ToProVARPolicy(cfg))
    res = orch.generate(text, lengths, seed=seed, cfg=3.0, tau=1.0, policy=pol, progress=False)
    pruned = [(k, v["idx"].numel()) for k, v in pol.log.items() if v["idx"] is not None]
    assert pruned, "the configuration must prune something"
    if cfg.stage == "full":
        assert any(n == 0 for _, n in pruned), "a layer at the minimum must be skipped"
    # explicit reference: gather the kept rows, run the block, scatter back; the cache holds kept k/v only
    cond, ada, ca_kv, ca_len = model.condition(text, lengths, True)
    x = model.first_input(cond)
    H, hd = pipe.cfg.num_heads, pipe.cfg.head_dim
    caches = [(x.new_zeros(2, H, 0, hd), x.new_zeros(2, H, 0, hd)) for _ in range(pipe.cfg.depth)]
    summed = torch.zeros(1, pipe.cfg.codebook_dim, *sched[-1])
    gen = torch.Generator().manual_seed(seed)
    head, one = HeadPiece(model), torch.tensor([1.0])
    for si, (h, w) in enumerate(sched):
        for layer, blk in enumerate(model.blocks):
            rec = pol.log[(si, layer)]
            idx = rec["idx"]
            if idx is not None and idx.numel() == 0:
                continue
            xin = x if idx is None else x[:, idx]
            rin = ropes[si] if idx is None else ropes[si][:, idx]
            pk, pv = caches[layer]
            out, k, v, _ = blk(xin, ada, ca_kv, ca_len, rin, pk, pv, entropy="mean" if rec["want"] else None)
            caches[layer] = (torch.cat([pk, k], 2), torch.cat([pv, v], 2))
            if idx is None:
                x = out
            else:
                untouched = torch.ones(h * w, dtype=torch.bool)
                untouched[idx] = False
                x_new = x.clone()
                x_new[:, idx] = out
                assert torch.equal(x_new[:, untouched], x[:, untouched])  # pruned tokens pass unchanged
                x = x_new
        torch.testing.assert_close(be.head_x[si], x, atol=1e-5, rtol=1e-5, msg=f"scale {si}, seed {seed}")
        bits = head(x, cond, uniform_noise(gen, 1, [h * w], pipe.cfg.token_bits, torch.device("cpu"))[0],
                    torch.tensor([3.0]), one, torch.tensor([pipe.cfg.top_p]))
        assert torch.equal(bits, res.bits[si]), f"bits differ at scale {si}, seed {seed}"
        out = NextInputPiece(model, sched, si)(bits, summed)
        summed = out[0]
        if len(out) > 1:
            x = torch.cat([out[1], out[1]], 0)
    for layer in range(pipe.cfg.depth):  # cache length = kept tokens summed over scales
        assert caches[layer][0].shape[2] == sum(res.trace.kept[si][layer] for si in res.trace.kept)


def test_pinned_operating_point_reads_nothing_from_the_device(pipe, monkeypatch):
    """fixed_depth + keep_fraction: D and the kept counts come from the config (no .item() per layer)."""
    cfg = ToProVARConfig(stage="full", fixed_depth=4, keep_fraction=0.25, k_min=0.1, bucket=4,
                         layer_score_mode="static", layer_scores=(0.0, 1.0, 0.5, 1.0), layer_skip=False)
    text, lengths = features(pipe, B=1)
    orch, _, sched, _ = orchestrator(pipe)
    reads = []
    real_item = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda t: reads.append(1) or real_item(t))
    res = orch.generate(text, lengths, seed=fresh_seed(), cfg=3.0, tau=1.0,
                        policy=ToProVARPolicy(cfg), progress=False)
    assert not reads
    for si, (h, w) in enumerate(sched):
        n = h * w
        for layer, k in enumerate(res.trace.kept[si]):
            if si < 4 or layer == 0:
                assert k == n
            else:
                r = cfg.layer_scores[layer]
                want = min(n, max(min_kept(n, 0.1, 4), -(-round(n * (1 - r * 0.75)) // 4) * 4))
                assert k == want, (si, layer)


# ----------------------------------------------------------------------------- FastVAR
def test_fastvar_selection_fixed_input():
    # mean token is (0, 0); squared distances 9, 9, 4, 1, 0.25, 1.25
    x = torch.tensor([[[3.0, 0], [-3, 0], [0, 2], [0, -1], [0.5, 0], [-0.5, -1]]])
    assert fastvar_select(x, 0.5).tolist() == [[0, 1, 2]]        # int(6 * 0.5) = 3 pruned
    assert fastvar_select(x, 0.4).tolist() == [[0, 1, 2, 5]]     # int(2.4) = 2 pruned


@pytest.mark.parametrize("side,ratio", [(32, 0.4), (40, 0.5), (40, 0.6), (6, 0.4)])
def test_fastvar_selection_matches_public_algorithm(side, ratio):
    """The released algorithm, restated independently in NumPy: per row, score = sum over channels of
    (x - mean over the scale's tokens)^2, argsort descending, keep the first n - int(n * ratio)."""
    g = torch.Generator().manual_seed(fresh_seed())
    x = torch.randn(4, side * side, 16, generator=g) * torch.rand(4, side * side, 1, generator=g)
    xn = x.numpy().astype(np.float64)
    score = ((xn - xn.mean(axis=1, keepdims=True)) ** 2).sum(-1)
    keep = x.shape[1] - int(x.shape[1] * ratio)
    ref = np.sort(np.argsort(-score, axis=1, kind="stable")[:, :keep], axis=1)
    got = fastvar_select(x, ratio)
    assert got.shape == (4, keep)
    np.testing.assert_array_equal(got.numpy(), ref)


def test_fastvar_block_unpruned_is_bit_identical_to_block(pipe):
    g = torch.Generator().manual_seed(fresh_seed())
    blk = pipe.model.blocks[1]
    C, H, hd = pipe.cfg.width, pipe.cfg.num_heads, pipe.cfg.head_dim
    sched = get_schedule("0.06M")
    rope = rope_tables(hd, sched, rope_grid_side(1.0))[3]
    x, ada = torch.randn(2, 36, C, generator=g), torch.randn(2, 1, 6, C, generator=g) * 0.1
    ca_kv, ca_len = torch.randn(2, 5, C, generator=g), torch.tensor([5, 3], dtype=torch.int32)
    pk, pv = torch.randn(2, H, 21, hd, generator=g), torch.randn(2, H, 21, hd, generator=g)
    ref = blk(x, ada, ca_kv, ca_len, rope, pk, pv)
    store = {}
    got = FastVARBlock.run(blk, x, ada, ca_kv, ca_len, rope, pk, pv, (6, 6), 0.0, None, store)
    for a, b in zip(ref[:3], got):
        assert torch.equal(a, b)
    assert set(store) == {"sa", "ca", "ffn"} and store["sa"].shape == (2, 36, C)


def test_fastvar_block_pruned_equals_per_row_reference(pipe):
    """Per sub-layer, per row: choose, gather, run, restore from the area-resized cache, add."""
    g = torch.Generator().manual_seed(fresh_seed())
    blk = pipe.model.blocks[2]
    C, H, hd = pipe.cfg.width, pipe.cfg.num_heads, pipe.cfg.head_dim
    rope = rope_tables(hd, get_schedule("0.06M"), rope_grid_side(1.0))[4]  # 8x8
    B, n, ratio = 2, 64, 0.4
    x, ada = torch.randn(B, n, C, generator=g), torch.randn(B, 1, 6, C, generator=g) * 0.1
    ca_kv, ca_len = torch.randn(B, 4, C, generator=g), torch.tensor([4, 2], dtype=torch.int32)
    pk, pv = torch.randn(B, H, 30, hd, generator=g), torch.randn(B, H, 30, hd, generator=g)
    cache = {k: torch.randn(B, 16, C, generator=g) for k in ("sa", "ca", "ffn")}  # a 4x4 cache scale
    got_x, got_k, got_v = FastVARBlock.run(blk, x, ada, ca_kv, ca_len, rope, pk, pv, (8, 8), ratio, (cache, (4, 4)))
    keep = n - int(n * ratio)
    assert got_k.shape == (B, H, keep, hd)
    from toprovar.model.layers import layer_norm
    g1, g2, s1, s2, b1, b2 = (blk.ada_gss.float() + ada).unbind(2)
    for b in range(B):
        xb = x[b:b + 1]

        def restore(name, idx, out):
            full = torch.nn.functional.adaptive_avg_pool2d(cache[name][b].T.reshape(1, C, 4, 4), (8, 8))
            full = full.reshape(C, n).T.clone()
            full[idx] = out[0]
            return full.unsqueeze(0)
        idx = fastvar_select(xb, ratio)[0]
        a, k, v, _ = blk.sa(layer_norm(xb[:, idx], blk.eps) * (s1[b:b + 1] + 1) + b1[b:b + 1], rope[:, idx],
                            pk[b:b + 1], pv[b:b + 1])
        torch.testing.assert_close(got_k[b:b + 1], k, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(got_v[b:b + 1], v, atol=1e-6, rtol=1e-5)
        xb = xb + restore("sa", idx, a.float() * g1[b:b + 1])
        idx = fastvar_select(xb, ratio)[0]
        c = blk.ca(layer_norm(xb[:, idx], blk.eps, blk.ca_norm.weight, blk.ca_norm.bias), ca_kv[b:b + 1],
                   ca_len[b:b + 1])
        xb = xb + restore("ca", idx, c.float())
        idx = fastvar_select(xb, ratio)[0]
        f = blk.ffn(layer_norm(xb[:, idx], blk.eps) * (s2[b:b + 1] + 1) + b2[b:b + 1])
        xb = xb + restore("ffn", idx, f.float() * g2[b:b + 1])
        torch.testing.assert_close(got_x[b:b + 1], xb, atol=1e-5, rtol=1e-5)


def test_restore_branch_area_upsamples_cache():
    cached = torch.arange(4.0).reshape(1, 4, 1)  # 2x2 grid
    out = restore_branch(torch.tensor([[[9.0]]]), torch.tensor([[5]]), cached, (2, 2), (4, 4))
    expect = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]], dtype=torch.float32).reshape(16)
    expect[5] = 9.0
    assert torch.equal(out.reshape(16), expect)


def test_fastvar_schedule_resolution():
    r, layers, cache = FastVARConfig().resolve(32, 13)  # 2B at 1024: Table 8 {10: 0.4, 11: 0.6} (1-based)
    assert r[9] == 0.4 and r[10] == 0.6 and r[11] == 0.0 and r[12] == 0.0 and sum(r) == pytest.approx(1.0)
    assert layers == range(3, 28) and cache == 8
    r8, layers8, _ = FastVARConfig().resolve(40, 13)  # 8B: {10: 0.4, 11: 0.6, 12: 1.0, 13: 1.0}
    assert r8[9:] == [0.4, 0.6, 1.0, 1.0] and layers8 == range(4, 35)
    rp, _, _ = FastVARConfig(preset="public").resolve(32, 13)  # released code: 32:0.4 40:0.5, 48/64 skipped
    assert rp[9:] == [0.4, 0.5, 1.0, 1.0]
    rt, lt, ct = FastVARConfig().resolve(4, 7)  # tiny: 6x6 and 8x8 pruned, cache at 4x4, layers 1..3
    assert rt == [0, 0, 0, 0.4, 0.6, 0, 0] and lt == range(1, 4) and ct == 2
    for preset in ("issue", "public"):  # HART 0.7B: its released HART code's setting, whatever the preset
        rh, lh, ch = FastVARConfig(preset=preset).resolve(24, 14, "hart")
        assert rh == [0.0] * 12 + [0.5, 0.75] and lh == range(0, 24) and ch == 11  # cache at 36x36
    rh, lh, ch = FastVARConfig(ratios={-3: 0.3}, layers=(2, 5), cache_scale=-4).resolve(24, 14, "hart")
    assert rh[11] == 0.3 and sum(rh) == pytest.approx(0.3) and lh == range(2, 5) and ch == 10  # explicit wins
    with pytest.raises(ValueError, match="family"):
        FastVARConfig().resolve(24, 14, "var")


# ----------------------------------------------------------------------------- FLOPs
def test_block_flops_by_hand():
    f = block_flops(n=2, past=3, width=4, mlp_hidden=8, text_len=5, rows=2)
    assert f == {"sa_qkv": 2 * 2 * 2 * 4 * 12, "sa_attn": 2 * 4 * 2 * 5 * 4, "sa_proj": 2 * 2 * 2 * 16,
                 "ca_q": 2 * 2 * 2 * 16, "ca_kv": 2 * 2 * 5 * 4 * 8, "ca_attn": 2 * 4 * 2 * 5 * 4,
                 "ca_proj": 2 * 2 * 2 * 16, "ffn": 2 * 4 * 2 * 4 * 8}
    assert sum(block_flops(0, 3, 4, 8, 5).values()) == 0  # a skipped layer costs nothing
    assert head_flops(3, 4, 2, rows=1) == 2 * 4 * 8 + 2 * 3 * 4 * 4


def test_flops_of_a_trace_use_actual_cache_lengths():
    cfg = get_config("tiny")
    sched = [(1, 1), (2, 2)]
    full = unpruned_flops(sched, cfg, batch=1, cfg=False, text_len=7)
    from toprovar.policy import PolicyTrace
    tr = PolicyTrace(kept={0: [1, 1, 1, 1], 1: [4, 2, 0, 4]}, tokens={0: 1, 1: 4}, cfg_batch={0: False, 1: False},
                     schedule=sched, batch=1, cfg=False, text_len=7)
    got = trace_flops(tr, cfg)
    C, F = cfg.width, cfg.mlp_hidden
    blk = lambda n, p: sum(block_flops(n, p, C, F, 7).values())  # noqa: E731
    assert got[0] == full[0] == 4 * blk(1, 0) + head_flops(1, C, cfg.token_bits)
    assert got[1] == blk(4, 1) + blk(2, 1) + blk(4, 1) + head_flops(4, C, cfg.token_bits)
    rep = policy_report(tr, cfg)
    assert rep["relative_flops"] == pytest.approx((got[0] + got[1]) / (full[0] + full[1]))
    assert rep["kept_fraction"][1] == [1.0, 0.5, 0.0, 1.0]


# ----------------------------------------------------------------------------- every policy end to end
EXPECTED = {  # fixed-rule policies on the tiny model (7 scales, 4 layers), kept count per scale per layer
    "none": {si: [n] * 4 for si, n in enumerate([1, 4, 16, 36, 64, 144, 256])},
    "fastvar": {0: [1] * 4, 1: [4] * 4, 2: [16] * 4, 3: [36, 22, 22, 22], 4: [64, 26, 26, 26], 5: [144] * 4,
                6: [256] * 4},
    "fastvar-public": {0: [1] * 4, 1: [4] * 4, 2: [16] * 4, 3: [36, 22, 22, 22], 4: [64, 32, 32, 32]},
    "skipvar": {si: [n] * 4 for si, n in enumerate([1, 4, 16, 36, 64, 144])},
    "scale-exit": {si: [n] * 4 for si, n in enumerate([1, 4, 16, 36, 64])},
}


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_policy_end_to_end_reports_kept_fraction_and_flops(pipe, name):
    text, lengths = features(pipe, B=1)
    policy = make_policy(name)
    res = pipe.generate_from_features(text, lengths, seed=fresh_seed(), policy=policy, progress=False)
    assert res.images.shape == (1, 3, 64, 64) and torch.isfinite(res.images).all()
    rep = policy_report(res.trace, pipe.cfg)
    assert set(rep["kept_fraction"]) == set(range(7))
    assert all(len(v) == 4 and all(0.0 <= f <= 1.0 for f in v) for v in rep["kept_fraction"].values())
    assert 0.0 < rep["relative_flops"] <= 1.0
    kept = res.trace.kept
    assert all(kept[si][0] == res.trace.tokens[si] for si in kept)  # layer 0 always runs in full
    if name in EXPECTED:
        assert kept == EXPECTED[name]
        assert (rep["relative_flops"] == 1.0) == (name == "none")
    if name == "skipvar":  # cond-only from 6x6 (-4): the unconditional branch is dropped
        assert [res.trace.cfg_batch[si] for si in kept] == [True, True, True, False, False, False]
    if name.startswith("toprovar"):
        info = policy.report()
        D = info["D"]
        for si in kept:  # nothing is pruned before D (or at all when rho never reached tau)
            if D is None or si < D:
                assert kept[si] == [res.trace.tokens[si]] * 4
        if name == "toprovar-scale":
            assert rep["skipped_scales"] == ([] if D is None else list(range(D + 1, 7)))
        else:
            assert rep["skipped_scales"] == []
        if name == "toprovar-scale-layer":  # whole layers only
            assert all(k in (0, res.trace.tokens[si]) for si in kept for k in kept[si])


def test_calibration_is_ignored_by_policies_without_parameters(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text('{"format": "something-else"}')
    with pytest.raises(ValueError, match="expected format 'toprovar-calibration/1'"):
        make_policy("fastvar", str(bad))
    with pytest.raises(FileNotFoundError, match="--calibration: .*missing.json: file not found"):
        make_policy("toprovar", str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match=r"--policy: unknown policy 'bogus'"):
        make_policy("bogus")


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_cli_generate_each_policy(tmp_path, capsys, name):
    out = tmp_path / f"{name}.png"
    assert main(["generate", "--model", "tiny", "--prompt", "a red fox", "--policy", name, "-o", str(out),
                 "--seed", "3", "--profile", "--device", "cpu"]) == 0
    cap = capsys.readouterr()
    assert out.is_file() and str(out) in cap.out
    assert "relative" in cap.err and "per layer kept%" in cap.err


def test_cli_unknown_policy_is_one_line_error(capsys):
    assert main(["generate", "--prompt", "x", "--policy", "nope", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "unknown policy 'nope'" in err and err.count("\n") == 1


class _SkipLayerPolicy(Policy):
    """Skips one layer at the last scale (restore on or off); runs everything else in full."""

    def __init__(self, layer: int, restore: bool):
        self.layer, self.restore_pruned = layer, restore

    def keep(self, si, layer, n):
        last = si == len(self.info.schedule) - 1
        return torch.empty(0, dtype=torch.int64) if last and layer == self.layer else None


def test_restore_gives_a_skipped_layer_its_resized_previous_update():
    """The last layer is skipped at the last scale. Without restore the head sees the stream as the layer
    before left it; with restore, that plus the last layer's update of the previous scale resized
    bilinearly to the last grid (float64 reference of the resize below); earlier scales are untouched."""
    from toprovar.pipeline import resolve_schedule
    pipe = Pipeline.load("tiny", seed=int(np.random.SeedSequence().entropy % 1000))
    orch = pipe.orchestrator(resolve_schedule(pipe.cfg, None, 1.0))
    text, lengths = pipe.text_encoder.encode(["a red circle"])
    sched, layer = orch.schedule, pipe.cfg.depth - 1
    be, seen = orch.backend, {}
    block, head = be.block_in_cache, be.head

    def spy_block(li, x, *a, **kw):
        out = block(li, x, *a, **kw)
        if li == layer and x.shape[1] == sched[-2][0] * sched[-2][1]:
            seen["update"] = (out[0].double() - x.double())
        return out

    def spy_head(si, x, *a, **kw):
        if si == len(sched) - 1:
            seen.setdefault("head_x", []).append(x.double().clone())
        return head(si, x, *a, **kw)

    be.block_in_cache, be.head = spy_block, spy_head
    try:
        res = [orch.generate(text, lengths, seed=2, policy=_SkipLayerPolicy(layer, r), progress=False, cfg=1.0)
               for r in (False, True)]
    finally:
        be.block_in_cache, be.head = block, head
    (ph, pw), (h, w) = sched[-2], sched[-1]
    u = seen["update"].transpose(1, 2).reshape(1, -1, ph, pw)
    u = torch.nn.functional.interpolate(u, size=(h, w), mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
    plain, restored = seen["head_x"]
    assert u.abs().max() > 1e-3
    torch.testing.assert_close(restored - plain, u, atol=1e-4, rtol=1e-4)
    for si in range(len(sched) - 1):
        assert torch.equal(res[0].bits[si], res[1].bits[si])
    assert res[1].trace.kept[len(sched) - 1][layer] == 0


def test_ascending_first_is_sorted_prefix():
    """ascending_first(order, k) == order[:k].sort() on fresh random permutations and every k; select_kept
    is the piece's order with it."""
    from toprovar.policy.token import TokenKeepPiece, ascending_first, select_kept
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
    for n in (1, 2, 7, 64, 333):
        order = torch.randperm(n, generator=g)
        for k in sorted({1, n // 3, n // 2, n - 1, n} - {0}):
            assert torch.equal(ascending_first(order, k), order[:k].sort().values)
    piece = TokenKeepPiece(0.1, 0.9, 0.05, 4)
    ent, phi_r = torch.rand(100, generator=g) * 3, torch.tensor([0.7])
    assert torch.equal(select_kept(piece, ent, phi_r, 40), piece(ent, phi_r)[2][:40].sort().values)
