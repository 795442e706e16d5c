"""Why a task ended, and what the batch script does about it (no SLURM needed here; the real
cluster cases are in tests/test_stalls_slurm.py, test_preemption.py and test_failures_slurm.py):
a lost peer of a real gloo group told apart from a genuine error, the requeue policy, the
outcome markers and status records, and the progress watchdog in a real process."""
import json
import os
import pickle
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch.multiprocessing as mp
from submitit.core.utils import DelayedSubmission, JobPaths

from conftest import REPO
from hpc_mim.distributed.env import free_port
from hpc_mim.distributed.outcome import JobOutcome, classify, is_lost_peer, read_markers
from hpc_mim.distributed.preemption import Preempted
from jobs.after_tasks import decide
from jobs.launcher import run_entry


def lose_a_peer(rank: int, port: int, out: dict) -> None:
    import datetime

    import torch
    import torch.distributed as dist
    store = dist.TCPStore("127.0.0.1", port, 2, is_master=rank == 0,
                          timeout=datetime.timedelta(seconds=30))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    if rank == 1:
        time.sleep(1)
        os._exit(9)                          # gone without a word, like a SIGKILLed task
    try:
        for _ in range(10 ** 6):
            dist.all_reduce(torch.ones(4))
    except Exception as e:  # noqa: BLE001 - what the survivor's launcher sees
        out["error"] = f"{type(e).__name__}: {e}"
        out["kind"] = classify(e)


def test_a_real_lost_peer_is_told_apart_from_errors_of_the_job():
    """gloo's "Connection closed by peer" (a plain RuntimeError, the way the survivor of a killed
    task ends): requeue; the job's own exceptions: fail; scheduler stops: their own kind."""
    out = mp.Manager().dict()
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=lose_a_peer, args=(r, port, out)) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert out.get("kind") == "lost", out.get("error")
    assert classify(ValueError("eval.knn.k must be > 0")) == "error"
    assert classify(FloatingPointError("non-finite loss at step 5")) == "error"
    assert classify(Preempted("SIGUSR2", 7)) == "stopped"
    wrapped = RuntimeError("rendezvous failed at 10.0.0.1:21000 (rank 3/8, backend nccl): ...")
    assert is_lost_peer(wrapped)
    try:                                     # raised from a lost peer: the chain is followed
        try:
            raise RuntimeError("[gloo/transport/tcp/pair.cc:561] Connection reset by peer")
        except RuntimeError as inner:
            raise KeyError("batch") from inner
    except KeyError as e:
        assert classify(e) == "lost"


@pytest.mark.parametrize("rc, markers, restarts, running, requeue, says", [
    (0, {}, 0, True, False, ""),
    (137, {}, 0, True, True, "died from a signal"),                        # kill -9, OOM, a lost node
    (134, {}, 0, True, True, "died from a signal"),                        # NCCL's watchdog abort
    (1, {"lost": [(0, "RuntimeError: Connection closed by peer")]}, 0, True, True, "lost a peer"),
    (1, {"lost": [(0, "x")], "error": [(1, "ValueError: bad")]}, 0, True, False, "rank 1 failed"),
    (1, {"stopped": [(1, "SIGUSR2: stopped by SIGUSR2 at step 9")]}, 2, True, True, "SIGUSR2"),
    (1, {"stopped": [(0, "SIGTERM: stopped by SIGTERM")]}, 0, True, True, "srun ended the step"),
    (1, {"stopped": [(0, "SIGTERM: stopped by SIGTERM")]}, 0, False, False, "not RUNNING"),
    (137, {}, 3, True, False, "already restarted 3 times"),
    (1, {"lost": [(1, "stalled: no optimizer step for 30.2 min after step 80")]}, 0, True, True, "stalled"),
    (1, {"error": [(1, "stalled: ... earlier run of the job too")]}, 1, True, False, "failed"),
])
def test_the_batch_script_requeues_unless_the_job_itself_failed(rc, markers, restarts, running,
                                                                 requeue, says):
    wants, message = decide(rc, markers, restarts, 3, running)
    assert wants == requeue and says in message, message


def test_markers_and_status_records_keep_the_genuine_error(tmp_path):
    """Rank 1 fails with an error of the job, rank 0 then loses it as a peer: the markers say
    both, and the status record keeps rank 1's error (rank 0 does not overwrite it)."""
    records: list[tuple[str, str]] = []
    status = lambda state, why: records.append((state, why))  # noqa: E731
    rank1, rank0 = JobOutcome(), JobOutcome()
    rank1.configure(tmp_path, "42", 0, 1, status)
    rank0.configure(tmp_path, "42", 0, 0, status)
    rank1.record("error", "ValueError: injected")
    rank0.record("lost", "RuntimeError: Connection closed by peer")
    assert read_markers(tmp_path, "42", 0) == {"error": [(1, "ValueError: injected")],
                                               "lost": [(0, "RuntimeError: Connection closed by peer")]}
    assert records == [("FAILED", "rank 1: ValueError: injected")]
    assert read_markers(tmp_path, "42", 1) == {}                    # the next run starts clean
    with pytest.raises(ValueError, match="outcome kind"):
        rank0.record("crashed", "?")


STALL = r"""
import sys, threading, time
from hpc_mim.distributed.outcome import OUTCOME
from hpc_mim.distributed.watchdog import ProgressWatchdog
OUTCOME.configure(sys.argv[1], "7", int(sys.argv[2]), 0, None)
dog = ProgressWatchdog(floor_s=1.5, poll_s=0.1).start()
for step in (1, 2, 3):
    time.sleep(0.05)
    dog.beat(step)
def load():                               # FFCV's loader thread dying on a batch
    raise RuntimeError("corrupt sample 17")
threading.Thread(target=load, name="loader").start()
print("waiting for a batch", flush=True)
time.sleep(60)                            # the training thread waits for it forever
print("never here", flush=True)
"""


def test_the_watchdog_ends_a_stalled_process_with_its_stacks_and_fails_a_second_stall(tmp_path):
    """No step for the timeout: every thread's stack and the dead loader thread's error in the
    log, a ``lost`` marker (requeue), exit; the same stall in the next run: ``error``."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for restart, kind in ((0, "lost"), (1, "error")):
        start = time.time()
        r = subprocess.run([sys.executable, "-c", STALL, str(tmp_path), str(restart)], env=env,
                           capture_output=True, text=True, timeout=60)
        took = time.time() - start
        assert r.returncode == 75 and "never here" not in r.stdout, r.stderr
        assert took < 15, took
        assert "stalled: no optimizer step for" in r.stderr and "after step 3" in r.stderr
        assert "thread 'loader' died: RuntimeError: corrupt sample 17" in r.stderr
        assert "Current thread" in r.stderr or "Thread 0x" in r.stderr      # faulthandler's dump
        assert 'File "<string>"' in r.stderr                                 # the main thread's line
        markers = read_markers(tmp_path, "7", restart)
        assert list(markers) == [kind], markers
    assert "earlier run of the job too" in markers["error"][0][1]
    assert json.loads((tmp_path / "7.stall.1.rank0.json").read_text())["step"] == 3


def test_the_watchdog_sizes_its_timeout_from_the_slowest_step():
    from hpc_mim.distributed.watchdog import ProgressWatchdog
    dog = ProgressWatchdog(floor_s=60, factor=10)
    dog.last -= 500                           # the first step: start-up, compilation
    dog.beat(1, measure=False)
    assert dog.timeout_s() == 60
    dog.last -= 9                             # a 9 s step
    dog.beat(2)
    assert 90 <= dog.timeout_s() < 91


def test_a_job_script_exports_the_outcome_folder_and_traps_its_exit(tmp_path):
    from jobs.launcher import Launcher
    from jobs.plan import JobSpec
    script = Launcher("slurm", tmp_path).sbatch_script(JobSpec("pretrain", "m:f", {}, max_restarts=4))
    assert f"export HPC_MIM_OUTCOMES={tmp_path.resolve()}/outcomes" in script
    assert 'jobs/after_tasks.py" $? 4\' EXIT' in script
    trap = textwrap.dedent(script.split("trap '", 1)[1].split("' EXIT")[0])
    assert trap.startswith(f'"{sys.executable}"')


def run_task(tmp_path: Path, entry: str, rank: int = 0, leftover: bool = False) -> tuple[int, str, JobPaths]:
    """``probe_entry:main`` (``entry``: the module's source) run as rank ``rank`` of a real
    2-task submitit job (its local environment, as sbatch's would be), through the launcher;
    ``leftover``: with the half-written result a killed earlier start leaves."""
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "probe_entry.py").write_text(entry)
    paths = JobPaths(tmp_path / "jobs", job_id="41", task_id=rank)
    paths.folder.mkdir()
    DelayedSubmission(run_entry, "probe_entry:main", {}).dump(paths.submitted_pickle)
    if leftover:
        Path(f"{paths.result_pickle}.save_tmp").write_bytes(b"half a pickle")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_"))}
    env.update(PYTHONPATH=f"{REPO}{os.pathsep}{tmp_path}", SUBMITIT_EXECUTOR="local",
               SUBMITIT_LOCAL_JOB_ID="41", SUBMITIT_LOCAL_NTASKS="2",
               SUBMITIT_LOCAL_JOB_NUM_NODES="1", SUBMITIT_LOCAL_NODEID="0",
               SUBMITIT_LOCAL_GLOBALID=str(rank), SUBMITIT_LOCAL_LOCALID=str(rank))
    r = subprocess.run([sys.executable, "-m", "submitit.core._submit", str(paths.folder)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    return r.returncode, r.stderr, paths


def test_a_requeued_task_finishes_past_the_result_its_killed_start_left_half_written(tmp_path):
    """submitit refuses to write a task's result while ``<result>.save_tmp`` exists; a start
    killed while writing it (srun ending the survivor of a lost node) leaves one, and the
    requeued start did all its work and then failed on its last line (seen 1 run in N in
    test_preemption's kill_one case)."""
    rc, err, paths = run_task(tmp_path, "def main():\n    return 7\n", rank=1, leftover=True)
    assert rc == 0, err[-3000:]
    assert not Path(f"{paths.result_pickle}.save_tmp").exists()
    assert pickle.loads(paths.result_pickle.read_bytes()) == ("success", 7)


ENDS = """
import atexit, builtins, os
from pathlib import Path
HERE = Path(__file__).parent
atexit.register(lambda: (HERE / "atexit_ran").write_text("yes"))
TEARDOWN = os.open(HERE / "teardown", os.O_WRONLY | os.O_CREAT)

class Teardown:
    def __del__(self, write=os.write, fd=TEARDOWN):
        write(fd, b"ran")      # the interpreter's teardown clears the builtins, and this with them

def main():
    builtins.hpc_mim_probe = Teardown()
    if (HERE / "fail").exists():
        raise ValueError("the job's own error")
    return 7
"""


def test_a_finished_task_ends_after_its_exit_handlers_without_the_interpreter_teardown(tmp_path):
    """A task that did its work and whose result submitit recorded runs every atexit handler
    and then ends (status 0) without the interpreter's teardown, during which a gloo (or NCCL)
    thread freeing a finished collective's tensors aborts the process (jobs/task_exit.py: the
    backtrace; SLURM would record FAILED and the chained evaluations never start). A failed
    task exits as usual, with its error status."""
    rc, err, paths = run_task(tmp_path / "ok", ENDS)
    assert rc == 0, err[-3000:]
    assert pickle.loads(paths.result_pickle.read_bytes()) == ("success", 7)
    assert (tmp_path / "ok" / "atexit_ran").is_file()
    assert (tmp_path / "ok" / "teardown").read_text() == ""
    (tmp_path / "failed").mkdir()
    (tmp_path / "failed" / "fail").touch()         # the same entry, raising
    rc, err, paths = run_task(tmp_path / "failed", ENDS)
    assert rc == 1 and "the job's own error" in err
    assert pickle.loads(paths.result_pickle.read_bytes())[0] == "error"
    assert (tmp_path / "failed" / "atexit_ran").is_file()
    assert (tmp_path / "failed" / "teardown").read_text() == "ran"
