import torch

from evaluation.linear_probe import ProbeTask, linear_head
from hpc_mim.distributed.env import DistEnv, free_port
from hpc_mim.eval_options import LinearProbeConfig
from hpc_mim.train.loop import Budget, TrainLoop
from hpc_mim.train.process import join


def test_head_is_bn_without_affine_then_linear():
    head = linear_head(16, 5)
    bn, fc = head
    assert isinstance(bn, torch.nn.BatchNorm1d) and not bn.affine and bn.eps == 1e-6
    assert fc.weight.std().item() < 0.02 and torch.count_nonzero(fc.bias) == 0


def separable(n: int = 600):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(20, 4, generator=g)
    x = torch.randn(n, 20, generator=g) * 3 + 1      # BN must undo the scale and offset (chance: 25%)
    return x, (x @ w).argmax(1)


def probe(tmp_path, monkeypatch, epochs: int, rank: int = 0, world: int = 1) -> tuple[dict, TrainLoop]:
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)   # join() exports them: not into later tests' jobs
    x, y = separable()
    # MAE's lr at its batch 16384 (0.1 x 16384 / 256 = 6.4): LARS moves the weight by ~lr x 0.001 ||w||
    lp = LinearProbeConfig(epochs=epochs, warmup_epochs=2, batch_size=64, blr=25.6)
    torch.manual_seed(0)
    task = ProbeTask(x[:500], y[:500], x[500:], y[500:], 4, lp, 64, seed=0, rank=rank, world=world)
    proc = join(env=DistEnv(master_port=free_port()))
    loop = TrainLoop(task, Budget(64, 64 // world, epochs=epochs, zero_stage=0, log_every=7),
                     tmp_path / "checkpoints", proc)
    return loop.fit(), loop


def test_probe_learns_a_linearly_separable_problem_through_the_training_loop(tmp_path, monkeypatch):
    out, loop = probe(tmp_path, monkeypatch, epochs=30)
    assert out["top1"] >= 85 and out["top5"] == 100.0
    assert loop.total_steps == 30 * (500 // 64)
    assert (tmp_path / "checkpoints" / "latest").read_text() == f"step_{loop.total_steps:08d}"


def test_each_rank_takes_its_slice_of_every_global_batch():
    x, y = separable()
    lp = LinearProbeConfig(epochs=1, warmup_epochs=0, batch_size=64)
    ranks = [ProbeTask(x, y, x, y, 4, lp, 64, seed=3, rank=r, world=2) for r in (0, 1)]
    for epoch in (0, 1):
        halves = [list(t.batches(epoch, 0)) for t in ranks]
        assert len(halves[0]) == len(halves[1]) == 600 // 64
        rows = torch.cat([torch.cat([a[0], b[0]]) for a, b in zip(*halves)])
        assert len({tuple(r.tolist()) for r in rows}) == len(rows)          # no sample twice
        again = list(ranks[0].batches(epoch, 2))                           # resumed after 2
        assert all(torch.equal(a[0], b[0]) for a, b in zip(again, halves[0][2:]))
    assert not torch.equal(next(iter(ranks[0].batches(0, 0)))[0], next(iter(ranks[0].batches(1, 0)))[0])
