"""LUT against shared/methods.md, written independently of the implementation."""
import torch

from hpc_mim.config import load_config
from hpc_mim.methods import build_method
from hpc_mim.methods.lut import cross_view_loss


def make():
    cfg = load_config("lut", "smoke")
    torch.manual_seed(0)
    return build_method(cfg.model, cfg.method), cfg


def test_cross_view_term_pairs_each_student_with_the_other_views_teacher():
    g = torch.Generator().manual_seed(0)
    s1, s2, t1, t2 = (torch.randn(5, 8, generator=g) for _ in range(4))
    by_hand = 0.0
    for i in range(5):
        by_hand += (2 - 2 * torch.dot(s1[i], t2[i]) / (s1[i].norm() * t2[i].norm())).item()
        by_hand += (2 - 2 * torch.dot(s2[i], t1[i]) / (s2[i].norm() * t1[i].norm())).item()
    assert abs(cross_view_loss([s1, s2], [t1, t2]).item() - by_hand / 10) < 1e-5


def test_total_is_mae_plus_quarter_cross_view_and_views_see_disjoint_patches():
    method, cfg = make()
    calls = []
    method.encoder.register_forward_hook(lambda m, a, o: calls.append(a[1] if len(a) > 1 else None))
    out = method({"image": torch.randn(4, 3, 28, 28), "strong_color": torch.randn(4, 3, 28, 28)})
    assert abs(out["loss"].item() - (out["mae_loss"] + 0.25 * out["cross_view_loss"]).item()) < 1e-6
    keep = int(49 * (1 - cfg.method.mask_ratio))
    ids1, ids2 = calls                           # the student encodes each view once, masked
    assert ids1.shape == ids2.shape == (4, keep)
    for n in range(4):
        assert not set(ids1[n].tolist()) & set(ids2[n].tolist())


def test_teacher_sees_full_views_and_gets_no_gradient():
    method, _ = make()
    shapes = []
    method.teacher["encoder"].register_forward_hook(lambda m, a, o: shapes.append(o.shape))
    out = method({"image": torch.randn(4, 3, 28, 28), "strong_color": torch.randn(4, 3, 28, 28)})
    assert shapes == [(4, 50, 32), (4, 50, 32)]  # both views, all 49 patches + cls
    out["loss"].backward()
    assert all(p.grad is None for p in method.teacher.parameters())


def test_teacher_update_is_the_cosine_ema():
    method, _ = make()
    before = [p.clone() for p in method.teacher["encoder"].parameters()]
    with torch.no_grad():
        for p in method.encoder.parameters():
            p.add_(1.0)
    method.on_optimizer_step(0.0)                # m = 0.996 at the start of training
    for t0, t, s in zip(before, method.teacher["encoder"].parameters(), method.encoder.parameters()):
        assert torch.allclose(t, 0.996 * t0 + 0.004 * s, atol=1e-6)
    method.on_optimizer_step(1.0)                # m = 1 at the end: frozen
    frozen = [p.clone() for p in method.teacher["projector"].parameters()]
    method.on_optimizer_step(1.0)
    assert all(torch.equal(a, b) for a, b in zip(frozen, method.teacher["projector"].parameters()))


def test_heads_are_bias_free_two_layer_mlps_with_batchnorm():
    method, _ = make()
    linears = [m for m in method.projector if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 2 and all(m.bias is None for m in linears)
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in method.predictor)
    assert any(isinstance(m, torch.nn.ReLU) for m in method.projector)


def test_teacher_is_in_eval_mode_and_normalises_with_running_statistics():
    """As the authors' ModelEma teacher: eval mode even while the method trains, so its
    BatchNorm uses running statistics (a sample's target does not depend on its batch)."""
    method, _ = make()
    method.train()
    assert not any(m.training for m in method.teacher.copies.modules())
    proj = method.teacher["projector"]
    bn = next(m for m in proj if isinstance(m, torch.nn.BatchNorm1d))
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    seen = {}
    proj.register_forward_hook(lambda m, a, o: seen.setdefault("io", []).append((a[0], o)))
    method({"image": torch.randn(4, 3, 28, 28), "strong_color": torch.randn(4, 3, 28, 28)})
    for x, out in seen["io"]:                    # Linear -> BN(running stats) -> ReLU -> Linear
        h = x @ proj[0].weight.T
        h = (h - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
        assert torch.allclose(out, torch.relu(h) @ proj[3].weight.T, atol=1e-5)


def test_teacher_running_statistics_follow_the_students_by_the_ema():
    method, _ = make()
    s_bn = next(m for m in method.projector if isinstance(m, torch.nn.BatchNorm1d))
    t_bn = next(m for m in method.teacher["projector"] if isinstance(m, torch.nn.BatchNorm1d))
    with torch.no_grad():
        s_bn.running_mean.fill_(1.0)
        s_bn.num_batches_tracked.fill_(7)
    method.on_optimizer_step(0.0)                 # m = 0.996
    assert torch.allclose(t_bn.running_mean, torch.full_like(t_bn.running_mean, 0.004), atol=1e-7)
    assert t_bn.num_batches_tracked.item() == 7


def test_each_view_goes_through_the_heads_on_its_own():
    """The authors run the heads per view (batch statistics over B samples each), not the two
    views as one batch of 2B."""
    method, _ = make()
    batches = []
    method.predictor.register_forward_hook(lambda m, a, o: batches.append(a[0].shape[0]))
    method.projector.register_forward_hook(lambda m, a, o: batches.append(a[0].shape[0]))
    method.train()
    method({"image": torch.randn(4, 3, 28, 28), "strong_color": torch.randn(4, 3, 28, 28)})
    assert batches == [4, 4, 4, 4]
