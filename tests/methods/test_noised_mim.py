"""noised_mim against shared/methods.md (no reference code exists), written independently of
the implementation: the disruption term by loops, where the noise goes, the ablations."""
import math

import pytest
import torch

import hpc_mim.methods.noised_mim as nm
from hpc_mim.config import load_config
from hpc_mim.methods import build_method
from hpc_mim.models.vit import attention_probs

TINY = ["model.depth=7", "model.embed_dim=32", "model.num_heads=2"]


def disruption_by_loops(probs, noised, masked, prefix=1):
    total = 0.0
    for a in probs:
        b, h = a.shape[:2]
        for n in range(b):
            N = [i for i in range(noised.shape[1]) if noised[n, i]]
            M = [i for i in range(masked.shape[1]) if masked[n, i]]
            for k in range(h):
                att = a[n, k, prefix:, prefix:]
                n_to_m = sum(att[i, j].item() for i in N for j in M) / len(N)
                m_to_n = sum(att[i, j].item() for i in M for j in N) / len(M)
                total += (n_to_m + m_to_n) / 2 / (b * h)
    return total / len(probs)


def test_disruption_loss_is_the_mean_attention_mass_between_the_sets():
    g = torch.Generator().manual_seed(0)
    probs = [torch.softmax(torch.randn(2, 3, 1 + 10, 1 + 10, generator=g), -1) for _ in range(2)]
    order = torch.stack([torch.randperm(10, generator=g) for _ in range(2)])
    masked, noised = order < 4, (order >= 4) & (order < 7)
    got = nm.disruption_loss(probs, noised, masked).item()
    assert abs(got - disruption_by_loops(probs, noised, masked)) < 1e-6


def test_attention_probs_are_the_blocks_own_attention():
    cfg = load_config("noised_mim", "smoke")
    block = build_method(cfg.model, cfg.method).encoder.blocks[0].eval()
    x = torch.randn(2, 5, 32)
    probs = attention_probs(block, x)                                       # (B, h, N, N)
    attn = block.attn
    v = attn.qkv(block.norm1(x)).reshape(2, 5, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)[2]
    by_probs = attn.proj((probs @ v).transpose(1, 2).reshape(2, 5, 32))
    assert torch.allclose(by_probs, attn(block.norm1(x)), atol=1e-5)
    assert torch.allclose(probs.sum(-1), torch.ones(2, attn.num_heads, 5))


@pytest.mark.parametrize("k", [1, 2, 4, 6])
def test_noise_lands_on_the_noised_tokens_after_block_k(monkeypatch, k):
    cfg = load_config("noised_mim", "smoke", overrides=TINY + [f"method.noised_mim.noise_block={k}"])
    method = build_method(cfg.model, cfg.method)
    sets = {}
    real = nm.hybrid_masking
    monkeypatch.setattr(nm, "hybrid_masking",
                        lambda *a: sets.setdefault("v", real(*a)))
    seen = {}
    method.encoder.blocks[k - 1].register_forward_hook(lambda m, a, o: seen.update(out=o.detach()))
    method.encoder.blocks[k].register_forward_pre_hook(lambda m, a: seen.update(into=a[0].detach()))
    method({"image": torch.randn(2, 3, 28, 28)})
    masked, noised = sets["v"]
    changed = (seen["into"] - seen["out"]).abs().sum(-1) > 0               # (B, 1+L)
    assert not changed[:, 0].any()                                         # cls untouched
    assert torch.equal(changed[:, 1:], noised)
    assert not (masked & noised).any()
    assert noised.sum(1).tolist() == [int(49 * 0.2)] * 2 and masked.sum(1).tolist() == [int(49 * 0.6)] * 2


def capture_draws(monkeypatch) -> dict:
    """Record every torch.randn_like and torch.randint result (the noise and the timesteps)."""
    draws = {"randn_like": [], "randint": []}
    for name in draws:
        real = getattr(torch, name)

        def wrapped(*a, _real=real, _name=name, **k):
            out = _real(*a, **k)
            draws[_name].append(out)
            return out
        monkeypatch.setattr(torch, name, wrapped)
    return draws


def test_feature_noise_is_scaled_to_each_tokens_rms_and_stops_at_snr_one(monkeypatch):
    """The choice documented in noised_mim.py: h' = sqrt(a) h + sqrt(1 - a) rms(h) eps with
    rms(h) = sqrt(mean_d h_d^2) per token, a = alpha_bar(t) of the cosine schedule (T = 1000),
    t < noise_max_t = 500 (alpha_bar >= 0.49). The earlier noise was unit-scale and reached
    t = 999 (alpha_bar ~ 0: pure noise)."""
    k = 2
    cfg = load_config("noised_mim", "smoke", overrides=TINY + [f"method.noised_mim.noise_block={k}"])
    method = build_method(cfg.model, cfg.method)                # the defaults: rms, t < 500
    sets, seen = {}, {}
    real = nm.hybrid_masking
    monkeypatch.setattr(nm, "hybrid_masking", lambda *a: sets.setdefault("v", real(*a)))
    method.encoder.blocks[k - 1].register_forward_hook(lambda m, a, o: seen.update(out=o.detach()))
    method.encoder.blocks[k].register_forward_pre_hook(lambda m, a: seen.update(into=a[0].detach()))
    draws = capture_draws(monkeypatch)
    b = 64
    method({"image": torch.randn(b, 3, 28, 28)})
    t = draws["randint"][-1]                                  # the timesteps, (B,)
    eps = draws["randn_like"][-1]                             # the feature noise, (B, L, D)
    assert t.shape == (b,) and int(t.max()) < 500 and int(t.max()) > 400     # drawn over [0, 500)
    f = lambda u: math.cos((u / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2
    h = seen["out"][:, 1:]
    noised = sets["v"][1]
    for n in range(b):
        a = f(int(t[n]) + 1) / f(0)                           # cosine alpha_bar, nothing clipped
        rms = h[n].pow(2).mean(-1, keepdim=True).sqrt()       # (L, 1)
        expected = math.sqrt(a) * h[n] + math.sqrt(1 - a) * rms * eps[n]
        got = seen["into"][n, 1:]
        assert torch.allclose(got[noised[n]], expected[noised[n]], atol=1e-5)
        assert torch.equal(got[~noised[n]], h[n][~noised[n]])


def test_unit_noise_and_the_full_range_stay_options(monkeypatch):
    k = 1
    cfg = load_config("noised_mim", "smoke", overrides=[
        "method.noised_mim.noise_scale=unit", "method.noised_mim.noise_max_t=1000"])
    method = build_method(cfg.model, cfg.method)
    sets, seen = {}, {}
    real = nm.hybrid_masking
    monkeypatch.setattr(nm, "hybrid_masking", lambda *a: sets.setdefault("v", real(*a)))
    method.encoder.blocks[k - 1].register_forward_hook(lambda m, a, o: seen.update(out=o.detach()))
    method.encoder.blocks[k].register_forward_pre_hook(lambda m, a: seen.update(into=a[0].detach()))
    draws = capture_draws(monkeypatch)
    method({"image": torch.randn(64, 3, 28, 28)})
    t, eps = draws["randint"][-1], draws["randn_like"][-1]
    assert int(t.max()) >= 500
    a = method.alphas_cumprod[t].float().view(-1, 1, 1)
    expected = a.sqrt() * seen["out"][:, 1:] + (1 - a).sqrt() * eps
    noised = sets["v"][1]
    assert torch.allclose(seen["into"][:, 1:][noised], expected[noised], atol=1e-5)


def test_block_zero_noises_pixels_of_the_noised_patches_only(monkeypatch):
    cfg = load_config("noised_mim", "smoke", overrides=["method.noised_mim.noise_block=0"])
    method = build_method(cfg.model, cfg.method)
    sets, seen = {}, {}
    real = nm.hybrid_masking
    monkeypatch.setattr(nm, "hybrid_masking", lambda *a: sets.setdefault("v", real(*a)))
    method.encoder.patch_embed.register_forward_pre_hook(lambda m, a: seen.update(img=a[0]))
    imgs = torch.randn(2, 3, 28, 28)
    method({"image": imgs})
    diff = (seen["img"] - imgs).abs().reshape(2, 3, 7, 4, 7, 4).sum(dim=(1, 3, 5)).flatten(1) > 0
    assert torch.equal(diff, sets["v"][1])


def test_masked_tokens_enter_the_encoder_as_the_mask_embedding(monkeypatch):
    cfg = load_config("noised_mim", "smoke")
    method = build_method(cfg.model, cfg.method)
    sets, seen = {}, {}
    real = nm.hybrid_masking
    monkeypatch.setattr(nm, "hybrid_masking", lambda *a: sets.setdefault("v", real(*a)))
    method.encoder.blocks[0].register_forward_pre_hook(lambda m, a: seen.update(x=a[0]))
    method({"image": torch.randn(2, 3, 28, 28)})
    masked = sets["v"][0]
    tokens = seen["x"][:, 1:] - method.encoder.pos_embed[:, 1:]             # (B, L, D)
    assert seen["x"].shape == (2, 50, 32)                                  # all L tokens + cls
    assert torch.allclose(tokens[masked], method.mask_token[0, 0].expand(int(masked.sum()), -1), atol=1e-6)


@pytest.mark.parametrize("overrides,terms", [
    (["method.noised_mim.disruption_weight=0"], {"mask_loss", "noise_loss"}),
    (["method.noised_mim.style=decoder"], {"mask_loss", "noise_loss", "disruption"}),
    (["method.noised_mim.noise_target=features"], {"mask_loss", "noise_loss", "disruption"}),
    (["method.noised_mim.style=decoder", "method.noised_mim.noise_target=features"],
     {"mask_loss", "noise_loss", "disruption"}),
])
def test_ablations_are_reachable_by_config(overrides, terms):
    cfg = load_config("noised_mim", "smoke", overrides=overrides)
    method = build_method(cfg.model, cfg.method)
    out = method({"image": torch.randn(2, 3, 28, 28)})
    assert set(out) == {"loss"} | terms and torch.isfinite(out["loss"])
    expected = out["mask_loss"] + out["noise_loss"] + 0.1 * out.get("disruption", 0)
    assert torch.allclose(out["loss"], expected)


def test_decoder_style_encoder_never_sees_masked_tokens():
    cfg = load_config("noised_mim", "smoke", overrides=["method.noised_mim.style=decoder"])
    method = build_method(cfg.model, cfg.method)
    seen = {}
    method.encoder.blocks[0].register_forward_pre_hook(lambda m, a: seen.update(x=a[0]))
    method({"image": torch.randn(2, 3, 28, 28)})
    assert seen["x"].shape == (2, 1 + 49 - int(49 * 0.6), 32)
