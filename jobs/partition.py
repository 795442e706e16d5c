"""Will the partition ever run these jobs? Checked before anything is queued (on --dry-run too).

A job that asks for more than its partition has is accepted by ``sbatch`` and then pends
forever (reason ``PartitionConfig``, ``PartitionNodeLimit``, ``PartitionTimeLimit``): tried as
a new user would, ``--method noised_mim --nodes 8`` on a 2-node cluster queued an 8-node job
nobody was told about. So every job of a plan (pre-training and each evaluation) is checked
against what SLURM reports for its partition:

- ``scontrol -a -o show partition`` (hidden ones too, one line each): the partitions (which
  is the default), ``TotalNodes``, ``MaxNodes`` (per job; ``UNLIMITED``), ``MaxTime``
  (``UNLIMITED``, ``D-HH:MM:SS``, ``HH:MM:SS``, ``MM:SS``, ``MM``);
- ``sinfo -a -h -o "%P|%D|%G"``: how many nodes carry which generic resources (``gpu:8``,
  ``gpu:a100:8(S:0-1)``, ``(null)``), for GPUs per node.

Two layers: ``run_slurm`` runs the two commands (the only part that talks to the controller);
``read_partitions``, ``problems`` and ``check`` are pure functions of their text and the plan,
so they are tested on recorded output of real clusters.

A problem is a ConfigError naming the key (``cluster.partition``, ``cluster.nodes``,
``eval.<name>.nodes``, ``cluster.gpus_per_node``, ``cluster.time_min``, ...) and what the
partition offers. When the controller does not answer, a real submission is refused (sbatch
would fail the same way, perhaps after the first job was queued) and a dry run prints a note
and goes on: a dry run waits at most ``DRY_RUN_TIMEOUT_S`` for the answer (with slurmctld down,
``scontrol`` itself retries for ``MessageTimeout``, 10 s by default, before it gives up).
"""
from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from hpc_mim.config import Config, ConfigError
from jobs.plan import JobSpec

UNLIMITED = ("UNLIMITED", "INFINITE", "NONE", "")
# how long a dry run waits for scontrol + sinfo: a plan should print at once, with a note when
# the limits could not be checked, never hang on a controller that is down or busy
DRY_RUN_TIMEOUT_S = 5.0
# a real submission refuses without the answer; sbatch would wait as long
SUBMIT_TIMEOUT_S = 60.0
SCONTROL = ("scontrol", "-a", "-o", "show", "partition")
SINFO = ("sinfo", "-a", "-h", "-o", "%P|%D|%G")


class Unreachable(RuntimeError):
    """The SLURM controller (or its commands) could not tell what the partitions are."""


def parse_minutes(text: str) -> float | None:
    """SLURM's time formats -> minutes; None for no limit. ``MM``, ``MM:SS``, ``HH:MM:SS``,
    ``D-HH``, ``D-HH:MM``, ``D-HH:MM:SS`` (sbatch(1), ``--time``)."""
    text = text.strip()
    if text.upper() in UNLIMITED:
        return None
    days, _, clock = text.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    if days:                                    # D-HH[:MM[:SS]]
        h, m, s = (parts + [0, 0])[:3]
        return int(days) * 1440 + h * 60 + m + s / 60
    if len(parts) == 3:
        return parts[0] * 60 + parts[1] + parts[2] / 60
    return parts[0] + (parts[1] / 60 if len(parts) == 2 else 0)


def split_gres(gres: str) -> list[str]:
    """``gpu:a100:4(S:0-1),gpu:v100:2`` -> each resource, parentheses (socket binding) dropped."""
    items, depth, current = [], 0, ""
    for ch in gres:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            items.append(current)
            current = ""
        elif depth == 0 and ch != ")":
            current += ch
    return [i.strip() for i in [*items, current] if i.strip()]


def gpus_in(gres: str) -> int:
    """GPUs per node in one sinfo ``%G`` value: ``gpu:8`` 8, ``gpu:a100:8(S:0-1)`` 8,
    ``gpu:a100:4,gpu:v100:2`` 6, ``gpu:a100`` 1 (a type, no count), ``(null)`` 0."""
    total = 0
    for item in split_gres(gres):
        parts = item.split(":")
        if parts[0] != "gpu":
            continue
        count = re.fullmatch(r"(\d+)", parts[-1]) if len(parts) > 1 else None
        total += int(count.group(1)) if count else 1
    return total


@dataclass
class Partition:
    name: str
    default: bool = False
    total_nodes: int = 0
    max_nodes: int | None = None        # per job; None: UNLIMITED
    max_time: str = "UNLIMITED"         # as SLURM prints it
    gres: list[tuple[int, str]] = field(default_factory=list)   # (nodes, %G) groups; [] unknown

    @property
    def max_minutes(self) -> float | None:
        try:
            return parse_minutes(self.max_time)
        except ValueError:              # a format this parser does not know: do not guess
            return None

    def nodes_with(self, gpus: int) -> int:
        """Nodes that have at least ``gpus`` GPUs."""
        return sum(n for n, g in self.gres if gpus_in(g) >= gpus)

    def describe_gres(self) -> str:
        return ", ".join(f"{n} x {g}" for n, g in self.gres)


def parse_scontrol(text: str) -> dict[str, Partition]:
    """``scontrol -o show partition`` -> name -> Partition (GPUs from ``add_sinfo``)."""
    out: dict[str, Partition] = {}
    for chunk in re.split(r"(?=\bPartitionName=)", text):
        fields = dict(re.findall(r"(\w+)=(\S*)", chunk))
        if "PartitionName" not in fields:
            continue
        max_nodes = fields.get("MaxNodes", "UNLIMITED")
        out[fields["PartitionName"]] = Partition(
            fields["PartitionName"], default=fields.get("Default") == "YES",
            total_nodes=int(fields.get("TotalNodes", "0") or 0),
            max_nodes=int(max_nodes) if max_nodes.isdigit() else None,
            max_time=fields.get("MaxTime", "UNLIMITED"))
    return out


def add_sinfo(partitions: dict[str, Partition], text: str) -> None:
    """``sinfo -h -o "%P|%D|%G"`` lines (``debug*|2|(null)``; the default marked ``*``)."""
    for line in text.splitlines():
        cells = line.strip().split("|")
        if len(cells) != 3 or not cells[1].strip().isdigit():
            continue
        part = partitions.get(cells[0].strip().rstrip("*"))
        if part is not None:
            part.gres.append((int(cells[1]), cells[2].strip()))


def read_partitions(scontrol_text: str, sinfo_text: str | None) -> dict[str, Partition]:
    """Every partition from the two commands' output (``sinfo_text`` None: GPUs unknown, not
    checked)."""
    partitions = parse_scontrol(scontrol_text)
    if sinfo_text is not None:
        add_sinfo(partitions, sinfo_text)
    return partitions


def run_slurm(timeout: float) -> tuple[str, str | None]:
    """The output of ``scontrol`` and ``sinfo`` (None where sinfo failed), both within
    ``timeout`` seconds; Unreachable if scontrol is missing, fails or does not answer."""
    if not (shutil.which("scontrol") and shutil.which("sinfo")):
        raise Unreachable("scontrol/sinfo are not on PATH")
    deadline = time.monotonic() + timeout
    try:
        shown = subprocess.run(SCONTROL, capture_output=True, text=True, timeout=timeout, check=False)
        if shown.returncode != 0:
            raise Unreachable(f"scontrol show partition: {shown.stderr.strip()[:300] or shown.returncode}")
        listed = subprocess.run(SINFO, capture_output=True, text=True, check=False,
                                timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired as e:
        raise Unreachable(f"{e.cmd[0]} did not answer within {timeout:g} s") from e
    return shown.stdout, listed.stdout if listed.returncode == 0 else None


def query(timeout: float = SUBMIT_TIMEOUT_S) -> dict[str, Partition]:
    """Every partition, as the controller reports it now (Unreachable if it does not answer)."""
    return read_partitions(*run_slurm(timeout))


def job_keys(cfg: Config, spec: JobSpec) -> dict[str, str]:
    """The config keys that set this job's nodes, GPUs per node and time limit."""
    if spec.name == "pretrain":
        return {"nodes": "cluster.nodes", "gpus": "cluster.gpus_per_node", "time": "cluster.time_min"}
    name = spec.name.split(":")[0]                 # the evals entry "linear_probe:cub"
    res = getattr(cfg.eval, name)
    return {"nodes": f"eval.{name}.nodes" + ("" if res.nodes else " (0: as cluster.nodes)"),
            "gpus": f"eval.{name}.gpus_per_node" if res.gpus_per_node >= 0 else "cluster.gpus_per_node",
            "time": f"eval.{name}.time_min" if res.time_min else "cluster.eval_time_min"}


def problems(part: Partition, spec: JobSpec, keys: dict[str, str]) -> list[str]:
    """Why ``spec`` can never start on ``part`` (empty: it can)."""
    out = []
    where = f"partition {part.name}"
    if spec.nodes > part.total_nodes:
        out.append(f"{keys['nodes']}: {spec.nodes} nodes for {spec.name}, but {where} has "
                   f"{part.total_nodes} nodes (TotalNodes={part.total_nodes}); the job would pend forever")
    elif part.max_nodes is not None and spec.nodes > part.max_nodes:
        out.append(f"{keys['nodes']}: {spec.nodes} nodes for {spec.name}, but {where} allows at most "
                   f"{part.max_nodes} nodes per job (MaxNodes={part.max_nodes}, TotalNodes={part.total_nodes})")
    if spec.gpus_per_node and part.gres:
        best = max(gpus_in(g) for _, g in part.gres)
        if spec.gpus_per_node > best:
            out.append(f"{keys['gpus']}: {spec.gpus_per_node} GPUs per node for {spec.name}, but the nodes "
                       f"of {where} have " + (f"at most {best}" if best else "none")
                       + f" (Gres: {part.describe_gres()})")
        elif spec.nodes > part.nodes_with(spec.gpus_per_node):
            out.append(f"{keys['nodes']}: {spec.nodes} nodes with {spec.gpus_per_node} GPUs each for "
                       f"{spec.name}, but {where} has {part.nodes_with(spec.gpus_per_node)} such nodes "
                       f"(Gres: {part.describe_gres()})")
    limit = part.max_minutes
    if limit is not None and spec.time_min > limit:
        out.append(f"{keys['time']}: {spec.time_min} min for {spec.name}, but {where} allows at most "
                   f"{limit:g} min (MaxTime={part.max_time}); the job would pend forever")
    return out


def check(cfg: Config, plan: list[JobSpec], partitions: dict[str, Partition], partition: str | None = None) -> None:
    """ConfigError unless every job of ``plan`` fits ``partition`` (default: the config's
    ``cluster.partition``; a comma list: at least one of them; "": the cluster's default)."""
    asked = cfg.cluster.partition if partition is None else partition
    names = [p.strip() for p in asked.split(",") if p.strip()]
    offered = ", ".join(f"{p.name} (default)" if p.default else p.name for p in partitions.values())
    if not names:
        default = [p.name for p in partitions.values() if p.default]
        if not default:
            raise ConfigError(f"cluster.partition: not set, and this cluster has no default partition; "
                              f"choose one of: {offered or 'none listed'}")
        names = default[:1]
    for name in names:
        if name not in partitions:
            raise ConfigError(f"cluster.partition: {name!r} is not a partition of this cluster; "
                              f"choose one of: {offered or 'none listed'}")
    for spec in plan:
        found = [problems(partitions[name], spec, job_keys(cfg, spec)) for name in names]
        if all(found):                         # fits none of the partitions it may run in
            raise ConfigError(found[0][0])


def check_before_queueing(runs: Iterable[tuple[str, Config, list[JobSpec]]], cluster: str,
                          dry_run: bool) -> str | None:
    """Check each (label, config, plan) against the partitions; a label ("cell x") prefixes
    its errors. Returns a note for a dry run whose controller did not answer within
    ``DRY_RUN_TIMEOUT_S``. Only for SLURM (``cluster``: the resolved one)."""
    if cluster != "slurm":
        return None
    try:
        partitions = query(DRY_RUN_TIMEOUT_S if dry_run else SUBMIT_TIMEOUT_S)
    except Unreachable as e:
        if dry_run:
            return f"note: the partition's limits were not checked: the SLURM controller did not answer ({e})"
        raise ConfigError(f"cluster.partition: cannot check the partition's limits before queueing: the "
                          f"SLURM controller did not answer ({e}); nothing was queued") from e
    for label, cfg, plan in runs:
        try:
            check(cfg, plan, partitions)
        except ConfigError as e:
            raise ConfigError(f"{label}: {e}" if label else str(e)) from e
    return None
