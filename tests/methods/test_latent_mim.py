"""LatentMIM against shared/methods.md, written independently of the implementation."""
import math

import torch

from hpc_mim.config import load_config
from hpc_mim.methods import build_method
from hpc_mim.methods.latent_mim import mean_pairwise_similarity, patch_discrimination_loss


def infonce_by_loops(pred, target, tau):
    """Per image n and target patch p: -log softmax_q(<pred_p, target_q> / tau)[p], with pred
    standardised over the patches first; mean over (n, p), times 2 tau."""
    n_img, t, d = pred.shape
    total = 0.0
    for n in range(n_img):
        mu = pred[n].mean(0)
        sd = pred[n].std(0)                      # unbiased, as torch.std
        z = [(pred[n, p] - mu) / (sd + 1e-4) for p in range(t)]
        z = [v / v.norm() for v in z]
        y = [target[n, q] / target[n, q].norm() for q in range(t)]
        for p in range(t):
            logits = torch.stack([torch.dot(z[p], y[q]) / tau for q in range(t)])
            total += -(logits[p] - torch.logsumexp(logits, 0)).item()
    return total / (n_img * t) * 2 * tau


def test_patch_discrimination_matches_the_formula():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 6, 8, generator=g), torch.randn(3, 6, 8, generator=g)
    got = patch_discrimination_loss(pred, target, 0.2).item()
    assert abs(got - infonce_by_loops(pred, target, 0.2)) < 1e-5


def test_patch_discrimination_rewards_matching_patches():
    g = torch.Generator().manual_seed(1)
    target = torch.randn(2, 10, 16, generator=g)
    perfect = patch_discrimination_loss(target.clone(), target, 0.2)
    shuffled = patch_discrimination_loss(target[:, torch.randperm(10, generator=g)], target, 0.2)
    assert perfect < 0.2 < shuffled


def test_similarity_regulariser_averages_the_full_matrix_with_the_diagonal():
    """The authors' avg_pairwise_sim: mean over all (i, j) pairs of an image's tokens, i == j
    included (the previous off-diagonal mean differs by (1 - offdiag) / T)."""
    x = torch.randn(2, 5, 4)
    expected = 0.0
    for n in range(2):
        u = x[n] / x[n].norm(dim=-1, keepdim=True)
        expected += sum((u[i] @ u[j]).item() for i in range(5) for j in range(5)) / 25
    assert abs(mean_pairwise_similarity(x).item() - expected / 2) < 1e-6
    # one token per image: its similarity with itself is all there is
    assert abs(mean_pairwise_similarity(torch.randn(3, 1, 4)).item() - 1.0) < 1e-6


def test_target_encoder_sees_only_the_target_patches_and_online_only_visible():
    cfg = load_config("latent_mim", "smoke")
    method = build_method(cfg.model, cfg.method)
    keep = round(49 * (1 - cfg.method.mask_ratio))
    seen = {}
    method.encoder.register_forward_hook(lambda m, a, o: seen.update(online=a[1]))
    method.target["encoder"].register_forward_hook(lambda m, a, o: seen.update(target=a[1]))
    method({"image": torch.randn(2, 3, 35, 35)})
    assert seen["online"].shape == (2, keep) and seen["target"].shape == (2, 49 - keep)
    for n in range(2):                          # a partition of the 49 patches
        both = torch.cat([seen["online"][n], seen["target"][n]])
        assert sorted(both.tolist()) == list(range(49))


def test_similarity_target_follows_a_cosine_from_start_to_end(monkeypatch):
    import hpc_mim.methods.latent_mim as lm
    cfg = load_config("latent_mim", "smoke", overrides=["method.latent_mim.sim_reg_weight=1.0"])
    method = build_method(cfg.model, cfg.method)
    monkeypatch.setattr(lm, "mean_pairwise_similarity", lambda x: torch.tensor(0.5))
    for progress, s in ((0.0, 0.75), (0.5, 0.5), (1.0, 0.25)):
        method.progress.fill_(progress)
        out = method({"image": torch.randn(2, 3, 35, 35)})
        # c * (avgsim(pred) - s)^2 + c * (avgsim(vis) - s)^2 with c = 1
        assert math.isclose(out["sim_reg"].item(), 2 * (0.5 - s) ** 2, abs_tol=1e-6)


def test_decoder_queries_are_its_own_cls_token_and_a_zero_mask_token():
    """yibingwei-1/LatentMIM:xvits.py ``CrossDecoder``: mask_token zeros_ at init, the query
    sequence is [decoder cls_token (normal 0.02, zero position embedding); mask tokens + visual
    cue + position embedding]; the encoder's cls token stays among the keys."""
    cfg = load_config("latent_mim", "smoke")
    torch.manual_seed(0)
    method = build_method(cfg.model, cfg.method)
    dec = method.decoder
    assert torch.count_nonzero(dec.mask_token) == 0
    assert dec.cls_token.shape == (1, 1, cfg.method.decoder_dim) and dec.cls_token.requires_grad
    assert 0.005 < dec.cls_token.std().item() < 0.05
    seen = {}
    dec.blocks[0].register_forward_pre_hook(lambda m, a: seen.update(q=a[0].detach(), kv=a[1].detach()))
    b, keep = 3, 5
    visible = torch.randn(b, 1 + keep, cfg.model.embed_dim)
    ids = torch.argsort(torch.rand(b, 49), dim=1)
    ids_keep, ids_target = ids[:, :keep], ids[:, keep:]
    dec(visible, ids_keep, ids_target)
    q, kv = seen["q"], seen["kv"]
    assert torch.equal(q[:, 0], dec.cls_token.detach().expand(b, 1, -1)[:, 0])
    v = dec.embed(visible).detach()
    pos = dec.pos_embed[0, 1:]                                            # (L, d)
    d = v.shape[-1]
    for n in range(b):
        pe_q, pe_k = pos[ids_target[n]], pos[ids_keep[n]]
        cue = torch.softmax(pe_q @ pe_k.T / d ** 0.5, dim=-1) @ v[n, 1:]
        assert torch.allclose(q[n, 1:], cue + pe_q, atol=1e-5)            # + mask token 0
        assert torch.allclose(kv[n, 0], v[n, 0])                          # encoder cls: a key



def test_online_target_is_the_online_encoder_with_gradients_and_keeps_no_teacher():
    """``target: online`` (the paper's section 3.3 joint optimisation): the target patches go
    through the online encoder, and the loss's gradient flows back through that branch too."""
    cfg = load_config("latent_mim", "smoke", overrides=["method.latent_mim.target=online"])
    method = build_method(cfg.model, cfg.method)
    assert method.target is None and method.ema_parameters() == ([], [])
    outputs = []

    def keep(module, args, out):
        out.retain_grad()
        outputs.append((args[1].shape[1], out))
    method.encoder.register_forward_hook(keep)
    out = method({"image": torch.randn(2, 3, 35, 35)})
    k = method.num_keep
    assert [n for n, _ in outputs] == [k, 49 - k]                # visible, then the target patches
    out["loss"].backward()
    target_grad = outputs[1][1].grad
    assert target_grad is not None and target_grad[:, 1:].abs().sum() > 0
    method.on_optimizer_step(0.5)                               # no teacher: nothing to update
    assert float(method.progress) == 0.5
