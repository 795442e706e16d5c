"""Submit a pre-training run and its chained evaluations.

    python jobs/submit.py --method mae --nodes 8 --gpus-per-node 8 --partition gpu --set tracking.uri=http://HOST:5000
    python jobs/submit.py --method mae --cluster local --preset fmnist_tiny
    python jobs/submit.py --method mae --nodes 2 --dry-run
    python jobs/submit.py --status runs/<name>          # each job's state, error, MLflow runs
    python jobs/submit.py --sweep configs/sweeps/compare.yaml             # a sweep (jobs/sweep.py)
    python jobs/submit.py --method mae,lut --seeds 0,1 --set k=v1,v2       # the same, short form
    python jobs/submit.py --status SWEEP | --resume SWEEP

Everything is validated before anything is created or queued: the config (unknown keys,
types, impossible values), the run's name (one folder directly inside ``runs_root``, resolved
before it is checked), what the SLURM partition offers (nodes, GPUs per node, time limit:
jobs/partition.py, on --dry-run too), the MLflow store (a file store is refused for a
multi-node or sweep submission to SLURM: ``check_tracking_store``), the values written into the
batch scripts, the dataset files and the runs folder. Then: the run directory, claimed
atomically and private to its owner (hpc_mim/rundir.py; a default name taken a moment ago gets
``-2``), its resolved config, the MLflow parent run, the pre-training job, and one job per
evaluation that starts only after pre-training succeeded (SLURM ``afterok``; locally: run after
it). Each job is recorded as soon as it is queued; if a later sbatch fails, the queued ones
are cancelled, the MLflow run is marked FAILED and the exit code is 2 (jobs/submission.py).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

if __package__ in (None, ""):        # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hpc_mim.config import Config, ConfigError, load_config  # noqa: E402
from hpc_mim.rundir import claim, run_dir_path, runs_umask, umask  # noqa: E402
from jobs.follow import terminal_progress  # noqa: E402
from jobs.plan import JobSpec, build_plan, format_plan  # noqa: E402
from jobs.runs import (check_inputs, check_tracking_store, create_run,  # noqa: E402
                       tracking_experiment, tracking_uri)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", help="mae, ... (hpc_mim.methods.REGISTRY); a,b,c: a sweep")
    ap.add_argument("--status", metavar="RUN_DIR|SWEEP", help="report on a submitted run or sweep instead")
    ap.add_argument("--sweep", metavar="FILE", help="a sweep file (jobs/sweep.py): many runs, one command")
    ap.add_argument("--seeds", help="comma-separated train.seed values: a sweep over seeds")
    ap.add_argument("--sweep-name", default="", help="the sweep's name (default sweep-<timestamp>)")
    ap.add_argument("--resume", metavar="SWEEP", help="resubmit the cells of a sweep that did not finish")
    ap.add_argument("--preset", help="configs/presets/<name>.yaml, applied after the method's YAML")
    ap.add_argument("--config", action="append", default=[], help="extra YAML file(s), applied in order")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="dotted override, e.g. --set train.epochs=5 (repeatable)")
    ap.add_argument("--nodes", type=int, help="nodes for pre-training (cluster.nodes)")
    ap.add_argument("--gpus-per-node", type=int, help="GPUs per node; one task per GPU")
    ap.add_argument("--tasks-per-node", type=int, help="processes per node (CPU runs)")
    ap.add_argument("--partition", help="SLURM partition (cluster.partition)")
    ap.add_argument("--time", type=int, help="pre-training time limit in minutes (cluster.time_min)")
    ap.add_argument("--cluster", default="auto", choices=["auto", "slurm", "local", "debug"],
                    help="auto = slurm if sbatch is on PATH, else local subprocesses")
    ap.add_argument("--tracking-uri", help="MLflow URI (default sqlite:///<runs_root>/mlflow.db; a server "
                    "http://host:5000 for multi-node or sweep SLURM submissions)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and sbatch scripts; queue nothing")
    args = ap.parse_args(argv)
    if not (args.method or args.status or args.sweep or args.resume):
        ap.error("--method is required (or --sweep FILE, --status RUN_DIR|SWEEP, --resume SWEEP)")
    return args


def flag_overrides(args: argparse.Namespace) -> list[str]:
    out = []
    for flag, key in (("nodes", "cluster.nodes"), ("partition", "cluster.partition"),
                      ("time", "cluster.time_min"), ("tasks_per_node", "cluster.tasks_per_node"),
                      ("tracking_uri", "tracking.uri")):
        if getattr(args, flag) is not None:
            out.append(f"{key}={getattr(args, flag)}")
    if args.gpus_per_node is not None:
        out += [f"cluster.gpus_per_node={args.gpus_per_node}",
                f"cluster.tasks_per_node={max(1, args.gpus_per_node)}"]
    return out


def status(run_dir: str) -> int:
    """Print each job's state; exit 1 when one failed or will never start."""
    from jobs.status import collect, format_status
    try:
        rows = collect(run_dir)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_status(rows))
    fine = ("COMPLETED", "PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING")
    return 1 if any(r["state"] not in fine for r in rows) else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from jobs import sweep_commands
    from jobs.launcher import resolve_cluster
    from jobs.sweep import from_cli, load_sweep_file
    if args.status:
        if (Path(args.status) / "sweep.json").is_file() or (Path("runs") / args.status / "sweep.json").is_file():
            return sweep_commands.status_sweep(args.status)
        return status(args.status)
    if args.resume:
        try:
            return sweep_commands.resume_sweep(args.resume, args.cluster)
        except (FileNotFoundError, ConfigError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    try:
        if args.sweep:
            spec = load_sweep_file(args.sweep, args.sweep_name, args.preset, args.config, args.set)
        else:
            spec = from_cli(args.method, args.seeds, args.set, args.preset, args.config, args.sweep_name)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if spec is not None:
        return sweep_commands.submit_sweep(spec, flag_overrides(args), args.cluster, args.dry_run)
    from jobs.launcher import Launcher
    from jobs.partition import check_before_queueing
    try:
        cfg = load_config(args.method, args.preset, args.config, args.set + flag_overrides(args))
        unique = not cfg.name            # a default name: the next free -2, -3 ... if taken
        # jobs may start in another directory: the run's config carries absolute paths
        cfg.runs_root, cfg.data.root = str(Path(cfg.runs_root).resolve()), str(Path(cfg.data.root).resolve())
        cfg.name = cfg.name or default_name(cfg)
        run_dir = run_dir_path(cfg.runs_root, cfg.name)      # resolved before anything checks it
        plan = build_plan(cfg, str(run_dir))
        cluster = resolve_cluster(args.cluster)
        note = check_before_queueing([("", cfg, plan)], cluster, args.dry_run)
        check_tracking_store(cfg, [plan], cluster)
        launcher = Launcher(args.cluster, run_dir / "jobs", cfg.cluster.partition, cfg.share_runs_with_group)
        # written now: a value with a newline is refused before anything exists
        scripts = [launcher.sbatch_script(spec, dry_run_dependency(spec)) for spec in plan] \
            if cluster == "slurm" or args.dry_run else []
        if not args.dry_run:
            check_inputs(cfg, run_dir)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if note:
        print(note, file=sys.stderr)

    if args.dry_run:
        print(f"# dry run: nothing created, nothing queued\n# run dir would be {run_dir}\n")
        print(format_plan(plan))
        for spec, script in zip(plan, scripts):
            print(f"\n# ---- sbatch script: {spec.name} ----")
            print(script)
        return 0
    if launcher.cluster == "local" and cfg.cluster.nodes > 1:
        print(f"note: --cluster local runs all {cfg.cluster.nodes * cfg.cluster.tasks_per_node} "
              "tasks as processes on this machine", file=sys.stderr)
    with umask(runs_umask(cfg.share_runs_with_group)):      # the run's files: its owner's only
        return submit_run(cfg, plan, run_dir, launcher, unique)


def default_name(cfg: Config) -> str:
    """``<method>-<timestamp>``, or the first free ``-2``, ``-3`` ... after it (``claim`` makes
    sure again, atomically)."""
    base = f"{cfg.method.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    root = Path(cfg.runs_root)
    return next(n for n in (base, *(f"{base}-{i}" for i in range(2, 100))) if not (root / n).exists())


def dry_run_dependency(spec: JobSpec) -> str:
    return "afterok:" + ":".join(f"<{name} job id>" for name in spec.after) if spec.after else ""


def submit_run(cfg: Config, plan: list[JobSpec], run_dir: Path, launcher, unique: bool) -> int:
    """Claim the run directory, create the MLflow run, queue (SLURM) or run (local) the plan."""
    from jobs.submission import SubmissionError, failed_runs_note
    try:
        claimed = claim(run_dir, cfg.share_runs_with_group, unique=unique)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if claimed != run_dir:         # another submission took this default name a moment ago
        cfg.name, run_dir, launcher.folder = claimed.name, claimed, claimed / "jobs"
        plan = build_plan(cfg, str(run_dir))

    from hpc_mim.tracking import how_to_look
    uri = tracking_uri(cfg)
    try:      # jobs may buffer through an outage, but the parent run must exist before queueing
        experiment = tracking_experiment(cfg, uri)
        run_id = create_run(cfg, run_dir, uri, experiment)
    except Exception as e:  # noqa: BLE001 - connection errors come in many types
        shutil.rmtree(run_dir, ignore_errors=True)     # created here, holds nothing else yet
        print(f"error: tracking.uri: cannot create the MLflow run at {uri} "
              f"({type(e).__name__}: {str(e)[:300]}); nothing was queued", file=sys.stderr)
        return 2
    print(f"run dir:     {run_dir}\nmlflow run:  {run_id} ({uri})")
    print(format_plan(plan))

    if launcher.cluster == "slurm":
        try:
            jobs = launcher.submit_plan(plan)
        except SubmissionError as e:
            note = failed_runs_note(uri, [{"run_id": run_id}])
            print(f"error: {e}; {note}; {run_dir} keeps what was recorded "
                  f"(python jobs/submit.py --status {run_dir})", file=sys.stderr)
            return 2
        for spec in plan:
            dep = f" (afterok:{jobs['pretrain'].job_id})" if spec.after else ""
            print(f"queued {spec.name:<14} job {jobs[spec.name].job_id}{dep}  log {launcher.log_path(jobs[spec.name])}")
        ids = ",".join(j.job_id for j in jobs.values())
        print(f"\nwatch:  squeue -j {ids}\n        tail -f {launcher.log_path(jobs['pretrain'])}"
              f"\n        python jobs/submit.py --status {run_dir}"
              + "".join(f"\n        {line}" for line in how_to_look(uri, experiment)))
        return 0

    # local / debug: run pre-training, then the evaluations, here and now, showing their progress
    outcome = launcher.run_plan(plan, *terminal_progress(launcher))
    for job_name, state in outcome.items():
        print(f"{job_name:<14} {state}")
    print(f"runs in MLflow: {', then '.join(how_to_look(uri, experiment))}")
    return 0 if all(s == "ok" for s in outcome.values()) else 1

if __name__ == "__main__":
    sys.exit(main())
