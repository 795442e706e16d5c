"""No method waits on its device: a forward and backward make no tensor -> host conversion
(each one drains a GPU's queue, once per micro-batch). On the CPU the same calls are counted."""
import pytest
import torch

from conftest import HostSyncs
from test_contract import METHODS, batch_for, make


@pytest.mark.parametrize("name", METHODS)
def test_forward_and_backward_make_no_host_sync(name, monkeypatch):
    method = make(name)
    method.on_optimizer_step(0.3)          # LatentMIM's s schedule reads its progress buffer
    batch = batch_for(method)
    syncs = HostSyncs(monkeypatch.setattr)
    out = method(batch)
    out["loss"].backward()
    method.on_optimizer_step(0.5)
    assert syncs.sites == {}, f"{name}: host syncs at {syncs.sites}"


@pytest.mark.parametrize("name", METHODS)
def test_under_bf16_autocast_losses_are_fp32(name):
    """Loss reductions stay fp32 while the matmuls run in bf16 (how precision: bf16 trains)."""
    method = make(name)
    with torch.autocast("cpu", torch.bfloat16):
        out = method(batch_for(method))
    assert {k: v.dtype for k, v in out.items()} == {k: torch.float32 for k in out}
    assert all(p.dtype == torch.float32 for p in method.parameters())
