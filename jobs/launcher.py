"""The one submitit launcher (the only module that imports submitit).

Every job, whatever it runs, executes ``run_entry(entry, kwargs)``: it turns submitit's job
environment into torchrun-style variables (so hpc_mim.distributed needs no submitit) and calls
``module:function(**kwargs)``. ``Launcher`` submits a ``JobSpec`` to SLURM (dependencies via
``afterok``), to local subprocesses, or in-process (debug).
"""
from __future__ import annotations

import importlib
import os
import shutil
from pathlib import Path
from typing import Any

import submitit

from jobs.plan import JobSpec

CLUSTERS = ("auto", "slurm", "local", "debug")


def run_entry(entry: str, kwargs: dict[str, Any]) -> Any:
    """Job body: export rank/world/rendezvous, then call ``entry``."""
    from hpc_mim.distributed.env import DistEnv, port_for_job, slurm_master_addr
    try:
        job = submitit.JobEnvironment()
    except RuntimeError:          # debug executor: this very process, one task
        job = None
    if job is not None and job.num_tasks > 1:
        on_slurm = "SLURM_JOB_ID" in os.environ
        DistEnv(rank=job.global_rank, world_size=job.num_tasks, local_rank=job.local_rank,
                local_world_size=job.num_tasks // max(1, job.num_nodes),
                master_addr=slurm_master_addr() if on_slurm else "127.0.0.1",
                master_port=port_for_job(job.job_id)).export()
    module, func = entry.split(":")
    return getattr(importlib.import_module(module), func)(**kwargs)


def resolve_cluster(cluster: str) -> str:
    if cluster not in CLUSTERS:
        raise ValueError(f"--cluster {cluster!r}; choose one of {CLUSTERS}")
    if cluster == "auto":
        return "slurm" if shutil.which("sbatch") else "local"
    return cluster


class Launcher:
    def __init__(self, cluster: str, folder: Path, partition: str = "") -> None:
        self.cluster = resolve_cluster(cluster)
        self.folder = Path(folder)
        self.partition = partition

    def executor(self, spec: JobSpec, after_ids: list[str] = ()) -> submitit.Executor:
        folder = self.folder / spec.name / "%j"
        if self.cluster == "slurm":
            ex = submitit.SlurmExecutor(folder=folder)
            params: dict[str, Any] = dict(
                job_name=f"hpc_mim-{spec.name}", nodes=spec.nodes, ntasks_per_node=spec.tasks_per_node,
                cpus_per_task=spec.cpus_per_task, time=spec.time_min)
            if spec.gpus_per_node:
                params["gpus_per_node"] = spec.gpus_per_node
            if self.partition:
                params["partition"] = self.partition
            if after_ids:
                params["additional_parameters"] = {"dependency": "afterok:" + ":".join(after_ids)}
            ex.update_parameters(**params)
            return ex
        if self.cluster == "local":
            ex = submitit.LocalExecutor(folder=folder)
            # one machine: all of the job's tasks run here as subprocesses
            ex.update_parameters(tasks_per_node=spec.tasks, timeout_min=spec.time_min,
                                 gpus_per_node=spec.gpus_per_node)
            return ex
        return submitit.DebugExecutor(folder=folder)

    def sbatch_script(self, spec: JobSpec, after_ids: list[str] = ()) -> str:
        """The sbatch script this spec would be submitted with (for --dry-run)."""
        saved, self.cluster = self.cluster, "slurm"
        try:
            ex = self.executor(spec, after_ids)
        finally:
            self.cluster = saved
        return ex._make_submission_file_text(ex._submitit_command_str, "dry-run")

    def submit(self, spec: JobSpec, after: list[submitit.Job] = ()) -> submitit.Job:
        """Queue one job. On SLURM the dependency is left to the scheduler (afterok); locally
        we wait here for the jobs it depends on and raise if one failed."""
        after_ids = [job.job_id for job in after]
        if self.cluster != "slurm":
            for job in after:
                job.results()             # every task's result; raises if one failed
            after_ids = []
        return self.executor(spec, after_ids).submit(run_entry, spec.entry, spec.kwargs)

    def submit_plan(self, plan: list[JobSpec]) -> dict[str, submitit.Job]:
        jobs: dict[str, submitit.Job] = {}
        for spec in plan:
            jobs[spec.name] = self.submit(spec, [jobs[name] for name in spec.after])
        return jobs

    def wait(self, jobs: dict[str, submitit.Job]) -> dict[str, str]:
        """Block until every job ends; job name -> "ok" or the error (local and debug runs)."""
        status = {}
        for name, job in jobs.items():
            try:
                job.results()
                status[name] = "ok"
            except Exception as e:  # noqa: BLE001 - report every failure, keep waiting for others
                status[name] = f"FAILED: {str(e).strip().splitlines()[-1] if str(e).strip() else e!r}"
        return status

    @staticmethod
    def log_path(job: submitit.Job) -> str:
        return str(job.paths.stdout).replace("%t", "0")
