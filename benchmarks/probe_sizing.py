"""How the linear probe's optimizer settings train its BN + linear head on frozen features: raw
pixels of Fashion-MNIST (Debian's dataset-fashion-mnist; the first 20,000 or 5,000 training
images, the 10,000 test images), timm's Lars at weight decay 0 (= SGD with momentum, the probe
before issue 28) vs MAE's LARS (evaluation/lars.py) at several batch sizes and lrs. It sized the
toy presets' probe (configs/presets/fmnist_tiny.yaml): LARS moves a weight by lr x 0.001 x ||w||
per step, so a probe needs MAE's lr (6.4) and enough steps, not the linear scaling rule's lr.

    python benchmarks/probe_sizing.py      # ~15 s, one thread
"""
import gzip, sys, time, numpy as np, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent))
torch.set_num_threads(1)
from evaluation.lars import LARS
from evaluation.linear_probe import linear_head
from timm.optim import Lars
from timm.scheduler import CosineLRScheduler
def load(kind):
    d = "/usr/share/datasets/fashion-mnist/"
    x = np.frombuffer(gzip.open(d + f"{kind}-images-idx3-ubyte.gz").read(), np.uint8, offset=16).reshape(-1, 784)
    y = np.frombuffer(gzip.open(d + f"{kind}-labels-idx1-ubyte.gz").read(), np.uint8, offset=8)
    return torch.tensor(x, dtype=torch.float32) / 255, torch.tensor(y, dtype=torch.long)
xtr, ytr = load("train"); xte, yte = load("t10k"); xtr, ytr = xtr[:20000], ytr[:20000]
def run(opt_name, batch, blr, epochs, warm, n=20000):
    torch.manual_seed(0)
    f, y = xtr[:n], ytr[:n]
    batch = min(batch, n)
    head = linear_head(784, 10)
    lr = blr * batch / 256
    opt = (LARS if opt_name == "mae" else Lars)(head.parameters(), lr=lr, weight_decay=0.0, **({"momentum": 0.9}))
    spe = n // batch; total = spe * epochs
    sch = CosineLRScheduler(opt, t_initial=max(1, total - warm * spe), warmup_t=warm * spe, warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False)
    step = 0; t = time.time()
    for e in range(epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(e))
        for i in range(spe):
            idx = order[i * batch:(i + 1) * batch]
            head.train(); loss = torch.nn.functional.cross_entropy(head(f[idx]), y[idx])
            opt.zero_grad(); loss.backward(); opt.step(); step += 1; sch.step_update(step)
    head.eval()
    with torch.no_grad(): acc = (head(xte).argmax(1) == yte).float().mean().item() * 100
    print(f"{opt_name:4s} n={n} batch={batch} blr={blr} lr={lr:.2f} epochs={epochs} steps={total}: top-1 {acc:.1f}  ({time.time()-t:.0f} s)", flush=True)
for args in [("timm", 1024, 0.1, 30, 3), ("mae", 1024, 0.1, 30, 3), ("mae", 256, 6.4, 30, 3), ("mae", 256, 0.1, 30, 3),
             ("timm", 16384, 0.1, 20, 2, 5000), ("mae", 16384, 0.1, 20, 2, 5000), ("mae", 64, 25.6, 20, 2, 5000), ("mae", 256, 6.4, 20, 2, 5000)]:
    run(*args)
