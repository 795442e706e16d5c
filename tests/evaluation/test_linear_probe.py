import torch

from evaluation.linear_probe import linear_head, train_probe
from hpc_mim.eval_options import LinearProbeConfig


def test_head_is_bn_without_affine_then_linear():
    head = linear_head(16, 5)
    bn, fc = head
    assert isinstance(bn, torch.nn.BatchNorm1d) and not bn.affine and bn.eps == 1e-6
    assert fc.weight.std().item() < 0.02 and torch.count_nonzero(fc.bias) == 0


def test_probe_learns_a_linearly_separable_problem():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(20, 4, generator=g)
    x = torch.randn(600, 20, generator=g) * 3 + 1      # BN must undo the scale and offset (chance: 25%)
    y = (x @ w).argmax(1)
    lp = LinearProbeConfig(epochs=30, warmup_epochs=2, batch_size=64, blr=0.1)
    out = train_probe(x[:500], y[:500], x[500:], y[500:], 4, lp)
    assert out["top1"] >= 85 and out["top5"] == 100.0
