"""The contract every registered method fulfils (parametrized over the registry), as timm tests
every model: forward, backward, no gradient for teachers, descent on a fixed batch, state_dict."""
import pytest
import torch

from hpc_mim.config import load_config
from hpc_mim.methods import REGISTRY, build_method

METHODS = sorted(REGISTRY)


def make(name: str, seed: int = 0):
    cfg = load_config(name, "smoke")
    torch.manual_seed(seed)
    return build_method(cfg.model, cfg.method)


def batch_for(method, n: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    s = method.input_size
    names = ("image",) + tuple(method.extra_views)
    return {name: torch.randn(n, 3, s, s, generator=g) for name in names}


@pytest.mark.parametrize("name", METHODS)
def test_forward_returns_finite_loss_and_every_named_term(name):
    method = make(name)
    out = method(batch_for(method))
    assert set(out) == {"loss", *method.terms}
    for key, value in out.items():
        assert value.ndim == 0 and torch.isfinite(value), (key, value)


@pytest.mark.parametrize("name", METHODS)
def test_backward_reaches_every_trainable_parameter_and_no_teacher(name):
    method = make(name)
    method(batch_for(method))["loss"].backward()
    trainable = {n: p for n, p in method.named_parameters() if p.requires_grad}
    frozen = {n: p for n, p in method.named_parameters() if not p.requires_grad}
    assert [n for n, p in trainable.items() if p.grad is None] == []
    assert [n for n, p in frozen.items() if p.grad is not None] == []
    # exactly the methods with an EMA teacher have frozen parameters, and all of them are its
    read, written = method.ema_parameters()
    assert {id(p) for p in written} == {id(p) for p in frozen.values()}
    assert all(p.requires_grad for p in read)


@pytest.mark.parametrize("name", METHODS)
def test_thirty_steps_on_a_fixed_batch_lower_the_loss(name):
    method = make(name)
    batch = batch_for(method)
    opt = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for step in range(30):
        torch.manual_seed(1)                 # same masks, noise and timesteps: a fixed problem
        loss = method(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        method.on_optimizer_step((step + 1) / 30)
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


@pytest.mark.parametrize("name", METHODS)
def test_state_dict_round_trip(name):
    a = make(name, seed=0)
    batch = batch_for(a)
    with torch.no_grad():                    # students move, so the EMA step moves the teachers
        for p in a.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    a.on_optimizer_step(0.5)
    b = make(name, seed=1)
    b.load_state_dict(a.state_dict(), strict=True)
    a.eval(), b.eval()
    torch.manual_seed(2)
    out_a = a(batch)
    torch.manual_seed(2)
    out_b = b(batch)
    assert {k: v.item() for k, v in out_a.items()} == {k: v.item() for k, v in out_b.items()}
