"""UMD against shared/methods.md, written independently of the implementation: the loss is
recomputed in pixel space from the captured predictions, masks, timesteps and noise."""
import math

import torch

import hpc_mim.methods.umd as umd_module
from hpc_mim.config import load_config
from hpc_mim.methods import build_method


def to_image(patches, p, c, g):
    """(B, L, p*p*c) in (row-major patches, (p, q, c) pixels) -> (B, c, g*p, g*p), by loops."""
    b = patches.shape[0]
    img = torch.zeros(b, c, g * p, g * p)
    for n in range(b):
        for idx in range(g * g):
            r, q = divmod(idx, g)
            block = patches[n, idx].reshape(p, p, c).permute(2, 0, 1)
            img[n, :, r * p:(r + 1) * p, q * p:(q + 1) * p] = block
    return img


def pixel_mask(mask, p, g):
    return mask.reshape(-1, 1, g, g).repeat_interleave(p, 2).repeat_interleave(p, 3)


def mse_on(pred, target, where):
    where = where.expand_as(pred)
    return ((pred - target) ** 2 * where).sum() / where.sum()


def cosine_alpha_bar(t, steps=1000, s=0.008):
    """Telescoped cosine schedule: alpha_bar(t) = f(t + 1) / f(0) (no beta is clipped early on)."""
    f = lambda u: math.cos((u / steps + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    return f(t + 1) / f(0)


def test_weighted_x0_and_eps_losses(monkeypatch):
    cfg = load_config("umd", "smoke")
    torch.manual_seed(0)
    method = build_method(cfg.model, cfg.method)
    p, c, g = 4, 3, 7
    rec = {"masks": [], "noise": [], "dec": [], "t": []}
    real_masking, real_noise = umd_module.random_masking, umd_module.add_noise

    def masking(*a, **k):
        m = real_masking(*a, **k)
        rec["masks"].append(m.mask)
        return m

    def noise(x0, alpha_bar):
        xt, eps = real_noise(x0, alpha_bar)
        rec["noise"].append((alpha_bar, eps, xt))
        return xt, eps

    monkeypatch.setattr(umd_module, "random_masking", masking)
    monkeypatch.setattr(umd_module, "add_noise", noise)
    def on_decoder(module, args, output):
        rec["dec"].append(output)
        rec["t"].append(args[2])

    method.decoder.register_forward_hook(on_decoder)
    x0 = torch.randn(8, 3, 28, 28)
    out = method({"image": x0})

    (mask_clean, mask_noised), ((alpha_bar, eps, xt),) = rec["masks"], rec["noise"]
    assert mask_clean.sum(1).tolist() == [49 - int(49 * 0.25)] * 4           # 0.75 masked
    assert mask_noised.sum(1).tolist() == [49 - int(49 * 0.625)] * 4         # 0.375 masked
    t_clean, t_model = rec["t"]
    assert t_clean.tolist() == [0] * 4 and t_model.min() >= 1                # run at t + 1
    for i, t in enumerate((t_model - 1).tolist()):
        assert math.isclose(alpha_bar[i].item(), cosine_alpha_bar(t), rel_tol=1e-4, abs_tol=1e-6)
    a = alpha_bar.float().view(-1, 1, 1, 1)
    assert torch.allclose(xt, a.sqrt() * x0[4:] + (1 - a).sqrt() * eps, atol=1e-6)

    clean_out, noised_out = rec["dec"]
    P = p * p * c
    mae = mse_on(to_image(clean_out[..., :P], p, c, g), x0[:4], pixel_mask(mask_clean, p, g))
    x0_loss = mse_on(to_image(noised_out[..., :P], p, c, g), x0[4:], pixel_mask(mask_noised, p, g))
    eps_loss = mse_on(to_image(noised_out[..., P:], p, c, g), eps, 1 - pixel_mask(mask_noised, p, g))
    dit = (eps_loss + x0_loss) / 2
    expected = dit * 0.5 + mae * 0.5                                          # r = 4 / 8 clean
    for key, value in (("mae_loss", mae), ("x0_loss", x0_loss), ("eps_loss", eps_loss),
                       ("dit_loss", dit), ("loss", expected)):
        assert math.isclose(out[key].item(), value.item(), rel_tol=1e-5), key


def test_encoder_has_four_cls_tokens_averaged_into_the_representation():
    cfg = load_config("umd", "smoke")
    method = build_method(cfg.model, cfg.method).eval()
    x = torch.randn(2, 3, 28, 28)
    tokens = method.encoder(x)
    assert tokens.shape == (2, 4 + 49, 32)
    assert torch.allclose(method.encoder.pooled(x, "cls"), tokens[:, :4].mean(1), atol=1e-6)


def test_timestep_conditioning_changes_the_encoding():
    cfg = load_config("umd", "smoke")
    method = build_method(cfg.model, cfg.method).eval()
    for block in method.encoder.blocks:          # leave adaLN-Zero's identity start
        torch.nn.init.normal_(block.modulation[1].weight, std=0.1)
    x = torch.randn(2, 3, 28, 28)
    t0 = method.encoder(x)
    assert torch.equal(t0, method.encoder(x, t=torch.zeros(2, dtype=torch.long)))  # default t = 0
    assert not torch.allclose(t0, method.encoder(x, t=torch.full((2,), 500)))



def test_dit_variant_without_mask_averages_both_errors_over_every_patch(monkeypatch):
    """noised_mask_ratio 0, no_noise_prob 0 (the paper's DiT ablation): as in the authors'
    train_ae.py, no mask, dit_loss = (mean eps error + mean x0 error) / 2 over all pixels
    (it used to drop the x0 term and halve the eps error)."""
    cfg = load_config("umd", "smoke", overrides=["method.umd.noised_mask_ratio=0",
                                                 "method.umd.no_noise_prob=0"])
    torch.manual_seed(0)
    method = build_method(cfg.model, cfg.method)
    rec = {}
    real_noise = umd_module.add_noise

    def noise(x0, alpha_bar):
        xt, eps = real_noise(x0, alpha_bar)
        rec["eps"] = eps
        return xt, eps

    monkeypatch.setattr(umd_module, "add_noise", noise)
    method.decoder.register_forward_hook(lambda m, a, o: rec.update(dec=o))
    x0 = torch.randn(4, 3, 28, 28)
    out = method({"image": x0})
    p, c, g, P = 4, 3, 7, 48
    x0_err = ((to_image(rec["dec"][..., :P], p, c, g) - x0) ** 2).mean()
    eps_err = ((to_image(rec["dec"][..., P:], p, c, g) - rec["eps"]) ** 2).mean()
    assert x0_err > 0.1                                   # a real term, not a zero
    for key, value in (("x0_loss", x0_err), ("eps_loss", eps_err),
                       ("dit_loss", (x0_err + eps_err) / 2), ("loss", (x0_err + eps_err) / 2)):
        assert math.isclose(out[key].item(), value.item(), rel_tol=1e-5), key


def test_decoder_gets_the_mean_of_the_cls_tokens_as_its_one_prefix_token():
    """The authors' decode(rep, ...): rep = mean of the 4 cls tokens, one token in front of
    the patches; at the encoder's width the decoder has no input projection."""
    cfg = load_config("umd", "smoke")
    method = build_method(cfg.model, cfg.method).eval()
    seen = {}
    method.encoder.register_forward_hook(lambda m, a, o: seen.update(enc=o))
    method.decoder.register_forward_hook(lambda m, a, o: seen.update(dec_in=a[0]))
    method({"image": torch.randn(2, 3, 28, 28)})
    enc, dec_in = seen["enc"], seen["dec_in"]
    assert enc.shape[1] == 4 + dec_in.shape[1] - 1                   # 4 cls -> 1 prefix token
    assert torch.allclose(dec_in[:, 0], enc[:, :4].mean(1), atol=1e-6)
    assert torch.equal(dec_in[:, 1:], enc[:, 4:])
    assert isinstance(method.decoder.embed, torch.nn.Identity)      # decoder_dim == embed_dim
    assert method.decoder.pos_embed.shape[1] == 1 + 49


def test_learned_position_embeddings_are_the_authors_recipe(tmp_path):
    """model.pos_embed: learned (umd.yaml, the authors' models/ae.py): encoder and decoder learn
    their patch position embeddings (the cls tokens get none), they are trained, exported,
    reloaded, and resampled for other sizes; sincos stays an option."""
    from hpc_mim.models.vit import load_encoder, save_encoder
    cfg = load_config("umd", "smoke")
    assert cfg.model.pos_embed == "learned"
    method = build_method(cfg.model, cfg.method)
    enc_pos, dec_pos = method.encoder.pos_embed_learned, method.decoder.pos_embed_learned
    assert enc_pos.shape == (1, 49, 32) and dec_pos.shape == (1, 49, 32)
    assert abs(enc_pos.std().item() - 1 / 7) < 0.03                 # normal(1 / sqrt(L))
    method({"image": torch.randn(4, 3, 28, 28)})["loss"].backward()
    assert enc_pos.grad.abs().sum() > 0 and dec_pos.grad.abs().sum() > 0
    pos = method.encoder.position_embedding((28, 28))
    assert torch.equal(pos[:, :4], torch.zeros(1, 4, 32)) and torch.equal(pos[:, 4:], enc_pos)
    assert method.encoder.position_embedding((56, 56)).shape == (1, 4 + 196, 32)
    save_encoder(method.encoder, tmp_path / "enc.pt")
    again = load_encoder(tmp_path / "enc.pt")
    assert torch.equal(again.pos_embed_learned, enc_pos)
    x = torch.randn(2, 3, 28, 28)
    assert torch.allclose(again.eval()(x), method.encoder.eval()(x), atol=1e-6)
    sincos = load_config("umd", "smoke", overrides=["model.pos_embed=sincos"])
    assert build_method(sincos.model, cfg.method).encoder.pos_embed_learned is None


def test_decoder_output_is_modulated_by_the_timestep_before_the_prediction():
    """The authors' final_modulation: after the decoder's last block the tokens get a
    timestep-dependent shift/scale (zero-init, so training starts from the identity)."""
    cfg = load_config("umd", "smoke")
    torch.manual_seed(0)
    dec = build_method(cfg.model, cfg.method).decoder.eval()
    tokens, ids = torch.randn(2, 1 + 12, 32), torch.argsort(torch.rand(2, 49), dim=1)
    t0, t9 = torch.zeros(2, dtype=torch.long), torch.full((2,), 900)
    assert torch.equal(dec(tokens, ids, t0), dec(tokens, ids, t9))      # zero-init: no effect yet
    torch.nn.init.normal_(dec.final_modulation[1].weight, std=0.1)      # blocks stay identity in t
    run = torch.randn(2, 50, 32)
    x = dec.norm(run)
    c = dec.t_embed(t9)
    shift, scale = dec.final_modulation(c).chunk(2, dim=-1)
    expected = dec.pred(x * (1 + scale[:, None]) + shift[:, None])[:, 1:]
    assert torch.allclose(dec.head(run, c), expected, atol=1e-6)
    assert not torch.allclose(dec(tokens, ids, t0), dec(tokens, ids, t9))
