"""MAE against the formula in shared/methods.md, written independently of the implementation."""
import torch

from hpc_mim.config import load_config
from hpc_mim.masking import random_masking
from hpc_mim.methods import build_method


def formula_loss(imgs, pred, mask, p):
    """loss = mean over masked patches of mean_j (pred - norm_pix(patch))^2, by explicit loops."""
    b, c, h, w = imgs.shape
    total, count = 0.0, 0
    for n in range(b):
        idx = 0
        for r in range(h // p):
            for q in range(w // p):
                patch = imgs[n, :, r * p:(r + 1) * p, q * p:(q + 1) * p].permute(1, 2, 0).reshape(-1)
                target = (patch - patch.mean()) / torch.sqrt(patch.var() + 1e-6)
                if mask[n, idx] == 1:
                    total += ((pred[n, idx] - target) ** 2).mean().item()
                    count += 1
                idx += 1
    return total / count


def test_mae_loss_matches_formula():
    cfg = load_config("mae", "smoke")
    torch.manual_seed(0)
    mae = build_method(cfg.model, cfg.method)
    imgs = torch.randn(3, 3, 28, 28)
    captured = {}
    mae.decoder.register_forward_hook(lambda m, i, o: captured.update(pred=o))
    torch.manual_seed(123)
    out = mae({"image": imgs})
    torch.manual_seed(123)                         # replay the same mask draw
    mask = random_masking(3, 49, cfg.method.mask_ratio, imgs.device).mask
    assert mask.sum(1).tolist() == [49 - int(49 * 0.25)] * 3
    expected = formula_loss(imgs, captured["pred"].detach(), mask, 4)
    assert abs(out["loss"].item() - expected) < 1e-5


def test_mae_encoder_sees_only_visible_tokens():
    cfg = load_config("mae", "smoke")
    mae = build_method(cfg.model, cfg.method)
    seen = {}
    mae.encoder.norm.register_forward_hook(lambda m, i, o: seen.update(shape=o.shape))
    mae({"image": torch.randn(2, 3, 28, 28)})
    assert seen["shape"] == (2, 1 + int(49 * 0.25), 32)


def test_mae_contract_backward_and_fixed_batch_descent():
    cfg = load_config("mae", "smoke")
    torch.manual_seed(0)
    mae = build_method(cfg.model, cfg.method)
    batch = {"image": torch.randn(8, 3, 28, 28)}
    out = mae(batch)
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    missing = [n for n, p in mae.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    opt = torch.optim.AdamW(mae.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        torch.manual_seed(1)                       # same masks each step: a fixed problem
        loss = mae(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_compiled_networks_compute_the_eager_loss_and_gradients_and_keep_the_state_dict():
    """train.compile: the encoder and decoder compiled in place (on CPU with timm's explicit
    attention path); same loss and gradients as eager on the same masks, same state-dict keys."""
    cfg = load_config("mae", "smoke")
    torch.manual_seed(0)
    eager = build_method(cfg.model, cfg.method)
    compiled = build_method(cfg.model, cfg.method)
    compiled.load_state_dict(eager.state_dict())
    keys = list(compiled.state_dict())
    assert compiled.compile_networks(torch.device("cpu")) == ["encoder", "decoder"]
    assert list(compiled.state_dict()) == keys                      # checkpoints and export unchanged
    assert not any(getattr(m, "fused_attn", False) for m in compiled.modules())
    images = {"image": torch.randn(8, 3, compiled.input_size, compiled.input_size)}
    losses = []
    for model in (eager, compiled):
        torch.manual_seed(1)                                        # the same masks: drawn eagerly
        loss = model(images)["loss"]
        loss.backward()
        losses.append(loss.detach())
    assert torch.allclose(losses[0], losses[1], rtol=1e-4, atol=1e-6)
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-3, atol=1e-6), name
