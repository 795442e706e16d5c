"""LARS as MAE's linear probe ran it (facebookresearch/mae:util/lars.py, from MoCo v3).

For every parameter with ``ndim > 1`` (the probe's Linear weight) the update is

    dp = g + wd * p
    q  = trust_coefficient * ||p|| / ||dp||   (1 where ||p|| = 0 or ||dp|| = 0)
    mu = momentum * mu + q * dp
    p  = p - lr * mu

and a parameter with ``ndim <= 1`` (biases, norms) takes plain SGD with momentum on ``g``: no
weight decay and no trust ratio. The momentum buffer starts at zero (so the first step is
``p -= lr * q * dp``, not torch SGD's ``buf = g``) and has no dampening or Nesterov term.

Why not ``timm.optim.Lars``: timm applies its trust ratio only when the group's weight decay
is non-zero or ``always_adapt`` is set, so with the probe's weight decay 0 it is SGD with
momentum at lr = 0.1 x batch / 256 (6.4 at MAE's batch 16384), and its ratio has ``g_norm +
w_norm * wd + eps`` in the denominator where MAE's has ``||g + wd p||``
(tests/evaluation/test_lars.py checks both against the formula above).

Device-side: the trust ratio is a 0-d tensor selected with ``torch.where`` on the parameter's
device (no ``.item()``, no host sync per parameter), as MAE's does. The optimizer keeps its
state in ``self.state`` and its hyper-parameters in ``param_groups`` like any torch optimizer,
so DeepSpeed takes it as a client optimizer (ZeRO stage 0: LARS needs each parameter's own
norm, which ZeRO's flattened partitions would mix) and timm's schedulers set ``lr``.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling for parameters with ndim > 1, SGD + momentum for the
    rest (MAE's ``util/lars.py``); ``trust_coefficient`` 0.001 as there."""

    def __init__(self, params: Iterable, lr: float = 0.0, weight_decay: float = 0.0,
                 momentum: float = 0.9, trust_coefficient: float = 0.001) -> None:
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                        trust_coefficient=trust_coefficient)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                dp = p.grad
                if p.ndim > 1:                      # not a bias or a norm's gain / shift
                    dp = dp.add(p, alpha=group["weight_decay"])
                    p_norm, dp_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(dp)
                    one = torch.ones_like(p_norm)
                    q = torch.where(p_norm > 0, torch.where(
                        dp_norm > 0, group["trust_coefficient"] * p_norm / dp_norm, one), one)
                    dp = dp.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(dp)
                p.add_(mu, alpha=-group["lr"])
        return loss
