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
        # and ends as a finished job does (jobs/task_exit.py): left to the interpreter's teardown,
        # a gloo thread freeing the last all-reduce aborted it (SIGABRT) ~1 run in 30 under load
        "from hpc_mim.distributed.env import leave_process_group\n"
        "from jobs.task_exit import end_without_teardown\n"
        "leave_process_group(); end_without_teardown(lambda: True)\n"
        "print(engine.zero_optimization_stage(), not torch.equal(before, model.weight.detach()),"
        " 'torch._inductor.compile_fx' in sys.modules, torch.compile is compile_)")
    assert out == ["2", "True", "False", "True"]


def test_a_job_collects_nothing_during_its_imports_and_nothing_at_exit(tmp_path):
    """The launcher imports the entry point with the collector off and freezes what it made
    (~1 s of CPU per task: 8 full collections over ~0.5M objects that live as long as the
    process); the job runs with the collector on, over its own objects only; once it has
    returned, everything is frozen, so interpreter exit skips its last walk (~1.4 s)."""
    (tmp_path / "probe_entry.py").write_text(
        "import gc\nimport torch    # what every entry point imports\n"
        "ON_AT_IMPORT = gc.isenabled()\n"
        "def main():\n    return gc.isenabled(), gc.get_freeze_count(), len(gc.get_objects())\n")
    out = fresh_python(
        f"import gc, sys; sys.path.insert(0, {str(tmp_path)!r})\n"
        "from jobs.launcher import run_entry\n"
        "on, frozen, tracked = run_entry('probe_entry:main', {})\n"
        "import probe_entry\n"
        "print(probe_entry.ON_AT_IMPORT, on, frozen > 100_000, tracked < frozen // 10, "
        "len(gc.get_objects()) < 1000, gc.isenabled())")
    assert out == ["False", "True", "True", "True", "True", "True"]


def test_only_the_process_that_logs_imports_mlflow():
    """Every entry point (and DeepSpeed, whose autotuner would import mlflow just in case) loads
    without mlflow (~1 s of CPU): the ranks that never log never pay it; the first call that
    logs imports it."""
    out = fresh_python(
        "import sys\n"
        "import hpc_mim.train.pretrain, evaluation.knn, evaluation.linear_probe, evaluation.finetune\n"
        "import evaluation.segmentation, evaluation.detection, evaluation.diagnostics\n"
        "before = 'mlflow' in sys.modules\n"
        "from hpc_mim import tracking\n"
        "tracking.client('sqlite:///:memory:')\n"
        "print(before, 'deepspeed' in sys.modules, 'mlflow' in sys.modules)")
    assert out == ["False", "True", "True"]
