"""DeepSpeed's checkpoints are read with ``torch.load(weights_only=True)``
(hpc_mim/distributed/deepspeed.py ``weights_only_loads``): ZeRO 0, 2 and 3 still resume, and a
pickle placed as a checkpoint's model states or ZeRO shard is refused without running. One fresh interpreter (a
process group of one, as a single-task job has)."""
import subprocess
import sys

from conftest import REPO

SCRIPT = r"""
import os, sys, pickle, torch
from pathlib import Path
from hpc_mim.config import load_config
from hpc_mim.distributed import deepspeed as ds
from hpc_mim.distributed.env import DistEnv
out = Path(sys.argv[1])
ds.init_distributed(DistEnv(), torch.device("cpu"))

class Hostile:
    def __reduce__(self):
        return (os.system, (f"touch {out / 'code_ran'}",))

def engine(stage):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    cfg = load_config("mae", "smoke").train
    cfg.zero_stage = stage
    return ds.initialize(model, torch.optim.AdamW(model.parameters(), lr=0.1), cfg, 1)

for stage in (0, 2, 3):
    folder = out / f"zero{stage}"
    a = engine(stage)
    for _ in range(2):
        a.backward(a(torch.ones(32, 4)).sum()); a.step()
    ds.save_checkpoint(a, folder, "step_2", {"step": 2})
    b = engine(stage)
    client = ds.load_checkpoint(b, folder, "step_2")
    same = all(torch.equal(p, q) for p, q in zip(a.module.state_dict().values(), b.module.state_dict().values()))
    print(stage, "resumed", client["step"], same, "-", "-")
    if stage != 2:
        continue
    for victim in sorted((folder / "step_2").glob("*.pt")):   # model states, then ZeRO's shard
        good = victim.read_bytes()
        torch.save({"module": Hostile()}, victim)
        try:
            ds.load_checkpoint(engine(stage), folder, "step_2")
            refused = False
        except pickle.UnpicklingError:
            refused = True
        victim.write_bytes(good)
        print(stage, victim.name, "-", "-", refused, (out / "code_ran").exists())
"""


def test_every_zero_stage_resumes_and_a_planted_pickle_is_refused_unrun(tmp_path):
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=REPO, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [line.split() for line in r.stdout.splitlines() if line[:2] in ("0 ", "2 ", "3 ")]
    resumed = [row for row in rows if row[1] == "resumed"]
    assert [row[0] for row in resumed] == ["0", "2", "3"]
    assert all(row[2:4] == ["2", "True"] for row in resumed), resumed
    planted = [row for row in rows if row[1] != "resumed"]
    assert {"optim_states" in row[1] for row in planted} == {True, False}, planted
    assert all(row[4:] == ["True", "False"] for row in planted), planted
