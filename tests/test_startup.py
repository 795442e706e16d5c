"""What every job pays before its first step, in every rank of every start: no library compiles
code the job never runs. Each check runs in a fresh interpreter (pytest's own may have loaded
anything already)."""
import subprocess
import sys

from conftest import REPO


def fresh_python(code: str) -> list[str]:
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.splitlines()[-1].split()          # the last line: DeepSpeed logs to stdout


def test_importing_ffcv_compiles_no_numba_dict_and_leaves_numba_as_it_was():
    """ffcv's jpg/raw table is a plain dict (numba's typed Dict compiled for it: 2.5-4 s); numba's
    own Dict is untouched for everyone else. The converter round trips write through that table."""
    out = fresh_python(
        "import numba.typed; from numba.typed.typeddict import Dict\n"
        "import hpc_mim.data.ffcv_io\n"
        "from ffcv.fields import rgb_image\n"
        "print(type(rgb_image.IMAGE_MODES).__name__, rgb_image.IMAGE_MODES == {'jpg': 0, 'raw': 1},"
        " numba.typed.Dict is Dict)")
    assert out == ["dict", "True", "True"]


def test_a_zero_engine_starts_without_loading_the_compiler():
    """DeepSpeed's ZeRO set-up imports its Muon module, which torch.compile()s kernels at import
    and so loads inductor (~2.5 s); the engine still trains, and torch.compile is ours again."""
    out = fresh_python(
        "import sys, torch\n"
        "from hpc_mim.config import load_config\n"
        "from hpc_mim.distributed.deepspeed import init_distributed, initialize\n"
        "from hpc_mim.distributed.env import DistEnv\n"
        "compile_ = torch.compile\n"
        "init_distributed(DistEnv(), torch.device('cpu'))\n"
        "model = torch.nn.Linear(4, 4)\n"
        "before = model.weight.detach().clone()\n"
        "engine = initialize(model, torch.optim.AdamW(model.parameters(), lr=0.1), load_config('mae', 'smoke').train, 1)\n"
        "for _ in range(2):\n"
        "    engine.backward(engine(torch.ones(32, 4)).sum()); engine.step()\n"
        "torch.distributed.destroy_process_group()\n"            # as the launcher does after a job
        "print(engine.zero_optimization_stage(), not torch.equal(before, model.weight.detach()),"
        " 'torch._inductor.compile_fx' in sys.modules, torch.compile is compile_)")
    assert out == ["2", "True", "False", "True"]
