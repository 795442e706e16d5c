"""The one submitit launcher (the only module that imports submitit).

Every job, whatever it runs, executes ``run_entry(entry, kwargs, status_file, max_restarts)``:
it turns submitit's job environment into torchrun-style variables (so hpc_mim.distributed needs
no submitit), handles the scheduler's stop signals (hpc_mim/distributed/preemption.py: USR2 and
SIGTERM, replacing submitit's handlers), calls ``module:function(**kwargs)``, and records
RUNNING / COMPLETED / FAILED / REQUEUED / STOPPED (with the error, URLs redacted:
hpc_mim/redact.py) in ``status_file`` for ``jobs/submit.py --status``. ``Launcher`` submits a
``JobSpec`` to SLURM (dependencies via ``afterok``), same-resource specs of a sweep as one job
array (``aftercorr``), to local subprocesses, or in-process (debug).

Submitting: ``submit_plan`` records each job in ``jobs.json`` as soon as its sbatch returned;
when a later one fails it cancels those and raises ``jobs.submission.SubmissionError``. Every
batch script runs under the run's umask (077, or 027 with ``share_runs_with_group``:
hpc_mim/rundir.py), and a value that would reach it with a control character (a newline ends
the ``#SBATCH`` block) is refused before the script is written.

Requeueing on SLURM: every task that ends abnormally leaves an outcome marker saying why
(hpc_mim/distributed/outcome.py): a genuine error of the job, a stop on a scheduler signal, a
lost peer (another rank or node died, a collective timed out) or a stall (the progress
watchdog). Once srun has returned, the batch script's EXIT trap (jobs/after_tasks.py) reads them:
a genuine error ends the job FAILED; SIGTERM is SLURM's to decide (``scontrol requeue``,
preemption, ``scancel``); after SIGUSR2, a lost peer, a stall, or a task killed by a signal
(OOM killer, ``kill -9``, a lost node, NCCL's watchdog) the job is requeued. At most
``cluster.max_restarts`` times, so a job that is killed every time does not loop forever.
"""
from __future__ import annotations

import contextlib
import gc
import importlib
import json
import os
import re
import shlex
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator

import submitit

from jobs.plan import JobSpec
from jobs.status import status_path, write_status
from jobs.task_exit import end_without_teardown, result_says_success

CLUSTERS = ("auto", "slurm", "local", "debug")


def usage(start: float) -> dict[str, float]:
    """This task's wall time since ``start`` and its peak resident memory so far."""
    import resource
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss        # KiB on Linux
    return {"seconds": round(time.time() - start, 1), "peak_rss_mb": round(rss_kb / 1024, 1)}


def run_entry(entry: str, kwargs: dict[str, Any], status_file: str | None = None,
              max_restarts: int = 0) -> Any:
    """Job body: export rank/world/rendezvous, call ``entry``, record how it ended (rank 0),
    with the task's wall time and peak RSS."""
    start = time.time()
    from hpc_mim.distributed.env import DistEnv, job_port, leave_process_group, slurm_master_addr
    from hpc_mim.distributed.outcome import OUTCOME, classify
    from hpc_mim.distributed.preemption import STOP, Preempted
    STOP.install()
    try:
        job = submitit.JobEnvironment()
    except RuntimeError:          # debug executor: this very process, one task
        job = None
    rank = job.global_rank if job is not None else 0
    if job is not None:
        drop_stale_result(job.paths.result_pickle)
    record = status_file is not None and rank == 0
    job_id = job.job_id if job is not None else "debug"
    on_slurm = "SLURM_JOB_ID" in os.environ
    if record:
        write_status(status_file, "RUNNING", job_id=job_id, host=os.uname().nodename)

    def status(state: str, error: str, **fields: Any) -> None:
        if status_file is not None:
            write_status(status_file, state, job_id=job_id, rank=rank, error=error[:2000],
                         **fields, **usage(start))
    OUTCOME.configure(outcomes_folder(status_file), os.environ.get("SLURM_JOB_ID", job_id),
                      int(os.environ.get("SLURM_RESTART_COUNT", "0")), rank, status)
    if job is not None and job.num_tasks > 1:
        DistEnv(rank=job.global_rank, world_size=job.num_tasks, local_rank=job.local_rank,
                local_world_size=job.num_tasks // max(1, job.num_nodes),
                master_addr=slurm_master_addr() if on_slurm else "127.0.0.1",
                master_port=job_port(job.job_id)).export()
    module, func = entry.split(":")
    try:
        with start_up_gc():
            function = getattr(importlib.import_module(module), func)
        result = function(**kwargs)
    except Preempted as e:
        # USR2: SLURM will not requeue us, so the batch script does once every task has exited
        # (jobs/after_tasks.py); SIGTERM: SLURM decides (requeue, preemption, or a plain scancel
        # that must stay cancelled)
        outcome = "SLURM requeues it or it was cancelled"
        if e.signal_name == "SIGUSR2":
            outcome = usr2_outcome(max_restarts, on_slurm)
        print(f"[launcher] {e}; {outcome}", flush=True)
        OUTCOME.record("stopped", f"{e.signal_name}: {e}", write_status=False)
        # srun's SIGTERM after another rank failed: that rank's FAILED record stays
        if record and not OUTCOME.others("error"):
            write_status(status_file, "REQUEUED" if outcome.startswith("requeued") else "STOPPED",
                         job_id=job_id, error=f"{e}; {outcome}")
        raise
    except BaseException as e:
        # a genuine error of the job fails it (any rank's record names it); a lost peer (a rank
        # or node died, a collective timed out) leaves the requeue to the batch script
        kind = classify(e)
        # MLflow's exception texts carry URLs, credentials included
        from hpc_mim.redact import redact
        error = redact(f"{type(e).__name__}: {e}")
        with STOP.polled():           # srun's SIGTERM must not interrupt the record
            print(f"[launcher] rank {rank}: {'lost a peer' if kind == 'lost' else 'failed'}: "
                  f"{error[:500]}", flush=True)
            OUTCOME.record(kind if on_slurm else "error", error, write_status=False)
            if kind == "error" or not on_slurm:
                if status_file is not None and (record or kind == "error"):
                    status("FAILED", error, traceback=redact(traceback.format_exc())[-4000:])
            elif record and not OUTCOME.others("error"):
                status("REQUEUED", f"lost a peer: {error}; the batch script requeues the job "
                                   "while cluster.max_restarts allows")
        raise
    leave_process_group()
    if record:
        write_status(status_file, "COMPLETED", job_id=job_id, **usage(start))
    if job is not None:      # a submitit task: its process ends once the result is recorded
        end_without_teardown(result_says_success(job.paths.result_pickle))
    # interpreter exit would walk every object once more to collect cycles that die with the
    # process anyway (~1.4 s of CPU per task); atexit handlers and destructors still run
    gc.freeze()
    return result


def drop_stale_result(result_pickle: Path) -> None:
    """Remove the half-written result a killed earlier start of this task left behind.

    submitit writes each task's result to ``<result>.save_tmp`` and renames it, refusing to start
    if that file exists. A task killed in between (srun's ``--kill-on-bad-exit`` ends the survivor
    of a lost node while it records its error) leaves it, and the requeued start, which does all
    its work, would then fail at its very last line: SLURM records FAILED and the chained
    evaluations never run. Only this task writes that file, and never before its entry returns."""
    Path(f"{result_pickle}.save_tmp").unlink(missing_ok=True)


@contextlib.contextmanager
def start_up_gc() -> Iterator[None]:
    """Importing an entry point (torch, timm, DeepSpeed, FFCV) creates ~0.5M objects
    that live as long as the process; the collector walks all of them at each full collection
    (8 during the import, ~1 s of CPU per task, nothing found). So: no collection during the
    import, and its objects frozen afterwards (``gc.freeze``), out of every later collection;
    the job itself runs with the collector on, over what it creates."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if was_enabled:
            gc.enable()


def outcomes_folder(status_file: str | None) -> Path | None:
    """Where the tasks of this job leave their outcome markers: the batch script's
    ``HPC_MIM_OUTCOMES`` on SLURM (one folder per launcher, shared by all nodes), else next to
    the job's status record."""
    if os.environ.get("HPC_MIM_OUTCOMES"):
        return Path(os.environ["HPC_MIM_OUTCOMES"])
    return Path(status_file).parent / "outcomes" if status_file else None


def usr2_outcome(max_restarts: int, on_slurm: bool) -> str:
    """What becomes of a job stopped by SIGUSR2 (for its record and log)."""
    if not on_slurm:
        return "not on SLURM: run the same command again to resume"
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    if restarts >= max_restarts:
        return f"not requeued: already restarted {restarts} times (cluster.max_restarts)"
    return (f"requeued by the batch script once every task has exited (restart {restarts + 1} "
            f"of at most {max_restarts})")


def after_tasks_setup(max_restarts: int, outcomes: Path) -> list[str]:
    """Batch-script lines: where the tasks leave their outcome markers, and the EXIT trap that
    reads them once srun has returned and requeues the job or lets it end (jobs/after_tasks.py,
    run by this interpreter: stdlib only, no import of the project's stack)."""
    script = Path(__file__).resolve().parent / "after_tasks.py"
    return [f"export HPC_MIM_OUTCOMES={shlex.quote(str(Path(outcomes).resolve()))}",
            f"trap '\"{sys.executable}\" \"{script}\" $? {int(max_restarts)}' EXIT"]


def failure_reason(error: Exception) -> str:
    """The job's own exception line (``ValueError: ...``) out of submitit's error text, which
    wraps the remote traceback between log paths."""
    lines = [line.strip() for line in str(error).splitlines()]
    raised = [line for line in lines if re.match(r"^[\w.]+(Error|Exception|Interrupt)\b.*:", line)]
    return raised[-1] if raised else (lines[0] if lines and lines[0] else repr(error))


def resolve_cluster(cluster: str) -> str:
    if cluster not in CLUSTERS:
        raise ValueError(f"--cluster {cluster!r}; choose one of {CLUSTERS}")
    if cluster == "auto":
        return "slurm" if shutil.which("sbatch") else "local"
    return cluster


class Launcher:
    def __init__(self, cluster: str, folder: Path, partition: str = "", share_with_group: bool = False) -> None:
        self.cluster = resolve_cluster(cluster)
        self.folder = Path(folder)
        self.partition = partition
        self.share_with_group = share_with_group

    def slurm_executor(self, spec: JobSpec, dependency: str = "", job_name: str = "",
                       partition: str | None = None) -> submitit.SlurmExecutor:
        """``dependency``: SLURM's ``--dependency`` (``afterok:<id>``, ``aftercorr:<array id>``);
        ``partition``: this job's (a sweep's cells may differ), else the launcher's."""
        from hpc_mim.rundir import refuse_control_characters, runs_umask
        partition = self.partition if partition is None else partition
        job_name = job_name or f"hpc_mim-{spec.name}"
        mask = f"{runs_umask(self.share_with_group):04o}"
        # the batch script and (SLURM_UMASK: srun applies it to every task) the job's processes
        # make the run's files under the run's umask, whatever the submitting shell had
        setup = [f"umask {mask}", f"export SLURM_UMASK={mask}",
                 *after_tasks_setup(spec.max_restarts, self.folder / "outcomes")]
        # each is written into the script, where a newline would end the #SBATCH block (--requeue,
        # --signal, --time then silently dropped) and run the rest as a shell line on the node
        for label, value in {"cluster.partition": partition, "job name": job_name, "dependency": dependency,
                             "run directory": str(self.folder / spec.name), "python": sys.executable,
                             **{f"setup line {i}": line for i, line in enumerate(setup)}}.items():
            refuse_control_characters(label, value)
        ex = submitit.SlurmExecutor(folder=self.folder / spec.name / "%j")
        params: dict[str, Any] = dict(
            job_name=job_name, nodes=spec.nodes,
            ntasks_per_node=spec.tasks_per_node, cpus_per_task=spec.cpus_per_task, time=spec.time_min,
            # one task dying ends the step at once (else the others wait in a collective)
            srun_args=["--kill-on-bad-exit=1"], setup=setup)
        extra: dict[str, Any] = {"requeue": True}
        if spec.gpus_per_node:
            params["gpus_per_node"] = spec.gpus_per_node
        if partition:
            params["partition"] = partition
        if dependency:
            extra["dependency"] = dependency
        ex.update_parameters(additional_parameters=extra, **params)
        return ex

    def executor(self, spec: JobSpec, after_ids: list[str] = ()) -> submitit.Executor:
        folder = self.folder / spec.name / "%j"
        if self.cluster == "slurm":
            return self.slurm_executor(spec, "afterok:" + ":".join(after_ids) if after_ids else "")
        if self.cluster == "local":
            ex = submitit.LocalExecutor(folder=folder)
            # one machine: all of the job's tasks run here as subprocesses
            ex.update_parameters(tasks_per_node=spec.tasks, timeout_min=spec.time_min,
                                 gpus_per_node=spec.gpus_per_node)
            return ex
        return submitit.DebugExecutor(folder=folder)

    def sbatch_script(self, spec: JobSpec, dependency: str = "", array_size: int = 0,
                      job_name: str = "", partition: str | None = None) -> str:
        """The sbatch script this spec would be submitted with (for --dry-run, and to refuse a
        bad value before anything is created); ``array_size``: as task 0 of a job array."""
        ex = self.slurm_executor(spec, dependency, job_name, partition)
        if array_size:
            ex.parameters["map_count"] = array_size
        return ex._make_submission_file_text(ex._submitit_command_str, "dry-run")

    def submit_array(self, specs: list[JobSpec], status_files: list[Path], dependency: str = "",
                     job_name: str = "", partition: str | None = None) -> list[submitit.Job]:
        """One SLURM job array: task i runs ``specs[i]`` (all with the resources of
        ``specs[0]``, on ``partition``) and records its state in ``status_files[i]``.
        ``dependency`` e.g. ``aftercorr:<array id>``: task i starts once task i of that array
        completed."""
        ex = self.slurm_executor(specs[0], dependency, job_name, partition)
        return ex.map_array(run_entry, [s.entry for s in specs], [s.kwargs for s in specs],
                            [str(f) for f in status_files], [s.max_restarts for s in specs])

    def status_file(self, spec: JobSpec) -> Path:
        return status_path(self.folder, spec.name)

    def submit(self, spec: JobSpec, after_ids: list[str] = ()) -> submitit.Job:
        return self.executor(spec, after_ids).submit(run_entry, spec.entry, spec.kwargs,
                                                     str(self.status_file(spec)), spec.max_restarts)

    def submit_plan(self, plan: list[JobSpec]) -> dict[str, submitit.Job]:
        """SLURM: queue every job now; the scheduler holds each until its dependencies succeed.
        Each job is in ``jobs.json`` as soon as its sbatch returned; if one fails (or Ctrl-C),
        the jobs queued before it are cancelled, recorded CANCELLED, and SubmissionError says so."""
        from jobs.submission import SubmissionError, cancel, record_cancelled, sbatch_reason
        jobs: dict[str, submitit.Job] = {}
        for spec in plan:
            try:
                jobs[spec.name] = self.submit(spec, [jobs[name].job_id for name in spec.after])
            except BaseException as e:
                ids = [job.job_id for job in jobs.values()]
                cancel_error = cancel(ids)
                if not cancel_error:
                    record_cancelled({s.name: self.status_file(s) for s in plan if s.name in jobs},
                                     {n: j.job_id for n, j in jobs.items()},
                                     f"cancelled at submission: sbatch of {spec.name} failed")
                raise SubmissionError(spec.name, sbatch_reason(e), ids, cancel_error) from e
            self.write_index(plan, jobs)
        return jobs

    def write_index(self, plan: list[JobSpec], jobs: dict[str, submitit.Job]) -> None:
        """``jobs.json``: each job's id, log and status file (what ``--status`` reads)."""
        from hpc_mim.rundir import atomic_write_text
        index = {spec.name: {"job_id": jobs[spec.name].job_id if spec.name in jobs else None,
                             "cluster": self.cluster, "after": spec.after,
                             "log": self.log_path(jobs[spec.name]) if spec.name in jobs else None,
                             "status_file": str(self.status_file(spec))}
                 for spec in plan}
        atomic_write_text(self.folder / "jobs.json", json.dumps(index, indent=2))

    def run_plan(self, plan: list[JobSpec],
                 on_start: Callable[[JobSpec, submitit.Job], None] = lambda spec, job: None,
                 on_poll: Callable[[bool], None] = lambda done: None) -> dict[str, str]:
        """Local / debug: run the jobs one after another (they share this machine), each only if
        the jobs it depends on succeeded; ``on_poll(done)`` is called about once a second while a
        job runs and once when it ended (jobs/follow.py shows its progress). Returns job name ->
        "ok" or what went wrong."""
        status: dict[str, str] = {}
        jobs: dict[str, submitit.Job] = {}
        for spec in plan:
            failed = [name for name in spec.after if status.get(name) != "ok"]
            if failed:
                status[spec.name] = f"not started: {', '.join(failed)} did not succeed"
                continue
            job = jobs[spec.name] = self.submit(spec)
            self.write_index(plan, jobs)
            on_start(spec, job)
            polled = time.monotonic()
            while not job.done():         # submitit's own wait looks once a second
                time.sleep(0.1)
                if time.monotonic() - polled >= 1.0:
                    polled = time.monotonic()
                    on_poll(False)
            on_poll(True)
            try:
                job.results()             # every task's result; raises if one failed
                status[spec.name] = "ok"
            except Exception as e:  # noqa: BLE001 - report the failure, go on with the others
                status[spec.name] = f"FAILED: {failure_reason(e)} (log {self.log_path(job)})"
        return status

    @staticmethod
    def log_path(job: submitit.Job) -> str:
        return str(job.paths.stdout).replace("%t", "0")
