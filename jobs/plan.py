"""The job plan: pre-training, then one job per evaluation, each depending on pre-training.

Pure data (no submitit, no torch), so ``--dry-run`` and tests can inspect it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from evaluation import EVALUATIONS
from hpc_mim.config import Config

PRETRAIN_ENTRY = "hpc_mim.train.pretrain:main"


@dataclass
class JobSpec:
    name: str
    entry: str                                   # "module:function", called with ``kwargs``
    kwargs: dict[str, Any]
    nodes: int = 1
    tasks_per_node: int = 1
    cpus_per_task: int = 1
    gpus_per_node: int = 0
    time_min: int = 60
    max_restarts: int = 0                        # requeues after preemption, timeout or kill
    after: list[str] = field(default_factory=list)   # names of jobs that must succeed first

    @property
    def tasks(self) -> int:
        return self.nodes * self.tasks_per_node


def build_plan(cfg: Config, run_dir: str) -> list[JobSpec]:
    c = cfg.cluster
    pretrain = JobSpec("pretrain", PRETRAIN_ENTRY, {"run_dir": run_dir}, nodes=c.nodes,
                       tasks_per_node=c.tasks_per_node, cpus_per_task=c.cpus_per_task,
                       gpus_per_node=c.gpus_per_node, time_min=c.time_min,
                       max_restarts=c.max_restarts)
    # each evaluation depends on pre-training only: one that fails does not hold up the others
    evals = []
    for label, name, dataset in cfg.eval_jobs():
        nodes, tasks, gpus, minutes = getattr(cfg.eval, name).resources(c)
        evals.append(JobSpec(label, EVALUATIONS[name], {"run_dir": run_dir, "dataset": dataset, "label": label},
                             nodes=nodes, tasks_per_node=tasks, cpus_per_task=c.cpus_per_task,
                             gpus_per_node=gpus, time_min=minutes, max_restarts=c.max_restarts,
                             after=["pretrain"]))
    return [pretrain, *evals]


def format_plan(plan: list[JobSpec]) -> str:
    rows = [("job", "entry", "nodes x tasks", "cpus/task", "gpus/node", "time", "after")]
    for j in plan:
        rows.append((j.name, j.entry, f"{j.nodes} x {j.tasks_per_node}", str(j.cpus_per_task),
                     str(j.gpus_per_node), f"{j.time_min} min", ",".join(j.after) or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)) for r in rows)
