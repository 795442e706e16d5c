"""Synced BatchNorm over gloo: two ranks with a part of a batch each behave like one BatchNorm on
the whole batch (outputs, input gradients, summed weight gradients, running statistics), for
(N, C) and (N, C, H, W) inputs, equal or unequal parts."""
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hpc_mim.distributed.env import free_port
from hpc_mim.models.heads import SyncBatchNorm1d, SyncBatchNorm2d, mlp_head


def data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(12, 6, generator=g) * 3 + 1, torch.randn(12, 6, generator=g)


def worker(rank: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    x, w = data()
    x = x[rank * 6:(rank + 1) * 6].clone().requires_grad_(True)
    bn = SyncBatchNorm1d(6)
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 2, 6))
    y = bn(x)
    (y * w[rank * 6:(rank + 1) * 6]).sum().backward()
    out[rank] = (y.detach(), x.grad, bn.weight.grad, bn.bias.grad, bn.running_mean, bn.running_var)
    dist.destroy_process_group()


def test_two_ranks_match_one_batchnorm_on_the_whole_batch():
    port = free_port()
    out = mp.Manager().dict()
    mp.spawn(worker, args=(port, out), nprocs=2, join=True)

    x, w = data()
    x.requires_grad_(True)
    bn = torch.nn.BatchNorm1d(6)
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 2, 6))
    y = bn(x)
    (y * w).sum().backward()
    assert torch.allclose(torch.cat([out[0][0], out[1][0]]), y, atol=1e-5)
    assert torch.allclose(torch.cat([out[0][1], out[1][1]]), x.grad, atol=1e-5)
    assert torch.allclose(out[0][2] + out[1][2], bn.weight.grad, atol=1e-4)
    assert torch.allclose(out[0][3] + out[1][3], bn.bias.grad, atol=1e-4)
    assert torch.allclose(out[0][4], bn.running_mean, atol=1e-5)
    assert torch.allclose(out[0][5], bn.running_var, atol=1e-5)


def test_single_process_is_plain_batchnorm_and_heads_have_the_right_shape():
    x, _ = data()
    bn, ref = SyncBatchNorm1d(6), torch.nn.BatchNorm1d(6)
    assert torch.allclose(bn(x), ref(x))
    head = mlp_head(6, 16, 6, layers=3, norm="ln", act=torch.nn.GELU, out_norm=True)
    linears = [m for m in head if isinstance(m, torch.nn.Linear)]
    assert [m.weight.shape for m in linears] == [(16, 6), (16, 16), (6, 16)]
    assert all(m.bias is None for m in linears) and isinstance(head[-1], torch.nn.LayerNorm)


# ------------------------------------------------------------------ large means, bf16 inputs

def large_mean_cases() -> dict[str, torch.Tensor]:
    """(16, 5) inputs whose mean dwarfs their spread: a one-pass E[x^2] - E[x]^2 cancels."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(16, 5, generator=g)
    return {"fp32 mean 1e3": base + 1e3,             # one-pass: E[x^2] = 1e6, ulp 0.06
            "bf16 mean 300": (base * 2 + 300).bfloat16()}       # bf16's step at 300 is 2


def large_mean_worker(rank: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    for name, x in large_mean_cases().items():
        bn = SyncBatchNorm1d(5)
        out[(rank, name)] = (bn(x[rank * 8:(rank + 1) * 8]).detach(), bn.running_var.clone())
    dist.destroy_process_group()


def test_large_mean_and_bf16_inputs_match_fp32_batchnorm():
    port = free_port()
    out = mp.Manager().dict()
    mp.spawn(large_mean_worker, args=(port, out), nprocs=2, join=True)
    for name, x in large_mean_cases().items():
        ref = torch.nn.BatchNorm1d(5)
        y = ref(x.float())                          # fp32 BatchNorm on the very same values
        got = torch.cat([out[(0, name)][0], out[(1, name)][0]])
        assert got.dtype == torch.float32, name
        assert torch.allclose(got, y, atol=1e-3), (name, (got - y).abs().max())
        assert torch.allclose(out[(0, name)][1], ref.running_var, rtol=1e-3), name
        # and a single process (or eval mode) takes bf16 inputs too, computing in fp32
        assert torch.allclose(SyncBatchNorm1d(5)(x), y, atol=1e-3), name


# ------------------------------------------------------------------ (N, C, H, W), unequal parts

SPLIT = (3, 1)          # images per rank: the count travels with the sums, nothing assumes equal


def map_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    shift = torch.randn(1, 4, 1, 1, generator=g) * 5
    return torch.randn(4, 4, 3, 5, generator=g) * 2 + shift, torch.randn(4, 4, 3, 5, generator=g)


def map_worker(rank: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    x, w = map_data()
    mine = slice(sum(SPLIT[:rank]), sum(SPLIT[:rank + 1]))
    x = x[mine].clone().requires_grad_(True)
    bn = SyncBatchNorm2d(4, momentum=None)               # cumulative average, as BatchNorm's
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 2, 4))
    y = bn(x)
    (y * w[mine]).sum().backward()
    bn(x.detach() * 2)                                   # a second step of the running average
    with torch.autocast("cpu", torch.bfloat16):          # bf16 input: fp32 statistics and output
        half = bn(x.detach().bfloat16())
    out[rank] = (y.detach(), x.grad, bn.weight.grad, bn.bias.grad, bn.running_mean,
                 bn.running_var, bn.num_batches_tracked, half.dtype)
    dist.destroy_process_group()


def test_unequal_parts_of_a_batch_of_maps_match_one_batchnorm2d():
    out = mp.Manager().dict()
    mp.spawn(map_worker, args=(free_port(), out), nprocs=2, join=True)
    x, w = map_data()
    x.requires_grad_(True)
    bn = torch.nn.BatchNorm2d(4, momentum=None)
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 2, 4))
    y = bn(x)
    (y * w).sum().backward()
    bn(x.detach() * 2)
    bn(x.detach().bfloat16().float())
    torch.testing.assert_close(torch.cat([out[0][0], out[1][0]]), y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([out[0][1], out[1][1]]), x.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[0][2] + out[1][2], bn.weight.grad, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out[0][3] + out[1][3], bn.bias.grad, atol=1e-4, rtol=1e-5)
    for rank in (0, 1):                                  # the same running statistics on each
        torch.testing.assert_close(out[rank][4], bn.running_mean, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(out[rank][5], bn.running_var, atol=1e-4, rtol=1e-5)
        assert out[rank][6] == 3 and out[rank][7] == torch.float32
