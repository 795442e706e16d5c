"""Submit a pre-training run and its chained evaluations.

    python jobs/submit.py --method mae --nodes 8 --gpus-per-node 8 --partition gpu --set tracking.uri=http://HOST:5000
    python jobs/submit.py --method mae --cluster local --preset fmnist_tiny
    python jobs/submit.py --method mae --nodes 2 --dry-run
    python jobs/submit.py --status runs/<name>          # each job's state, error, MLflow runs
    python jobs/submit.py --sweep configs/sweeps/compare.yaml             # a sweep (jobs/sweep.py)
    python jobs/submit.py --method mae,lut --seeds 0,1 --set k=v1,v2       # the same, short form
    python jobs/submit.py --status SWEEP | --resume SWEEP

Everything is validated before anything is created or queued: the config (unknown keys,
types, impossible values), the dataset files, the runs folder, and the MLflow store (a file
store is refused for a multi-node or sweep submission to SLURM: ``check_tracking_store``).
Then: the run directory (resolved config), the MLflow parent run, the pre-training job, and one
job per evaluation that starts only after pre-training succeeded (SLURM ``afterok``; locally:
run after it).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

if __package__ in (None, ""):        # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hpc_mim.config import ConfigError, load_config  # noqa: E402
from jobs.plan import build_plan, format_plan  # noqa: E402
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
        except FileNotFoundError as e:
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
    try:
        cfg = load_config(args.method, args.preset, args.config, args.set + flag_overrides(args))
        cfg.name = cfg.name or f"{args.method}-{time.strftime('%Y%m%d-%H%M%S')}"
        # jobs may start in another directory: the run's config carries absolute paths
        cfg.runs_root, cfg.data.root = str(Path(cfg.runs_root).resolve()), str(Path(cfg.data.root).resolve())
        run_dir = Path(cfg.runs_root) / cfg.name
        plan = build_plan(cfg, str(run_dir))
        check_tracking_store(cfg, [plan], resolve_cluster(args.cluster))
        if not args.dry_run:
            check_inputs(cfg, run_dir)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from jobs.launcher import Launcher
    launcher = Launcher(args.cluster, run_dir / "jobs", cfg.cluster.partition)
    if args.dry_run:
        print(f"# dry run: nothing created, nothing queued\n# run dir would be {run_dir}\n")
        print(format_plan(plan))
        for spec in plan:
            deps = "afterok:" + ":".join(f"<{name} job id>" for name in spec.after) if spec.after else ""
            print(f"\n# ---- sbatch script: {spec.name} ----")
            print(launcher.sbatch_script(spec, deps))
        return 0
    if launcher.cluster == "local" and cfg.cluster.nodes > 1:
        print(f"note: --cluster local runs all {cfg.cluster.nodes * cfg.cluster.tasks_per_node} "
              "tasks as processes on this machine", file=sys.stderr)

    uri = tracking_uri(cfg)
    try:      # jobs may buffer through an outage, but the parent run must exist before queueing
        run_id = create_run(cfg, run_dir, uri, tracking_experiment(cfg, uri))
    except Exception as e:  # noqa: BLE001 - connection errors come in many types
        shutil.rmtree(run_dir, ignore_errors=True)     # created here, holds nothing else yet
        print(f"error: tracking.uri: cannot create the MLflow run at {uri} "
              f"({type(e).__name__}: {str(e)[:300]}); nothing was queued", file=sys.stderr)
        return 2
    print(f"run dir:     {run_dir}\nmlflow run:  {run_id} ({uri})")
    print(format_plan(plan))

    if launcher.cluster == "slurm":
        jobs = launcher.submit_plan(plan)
        for spec in plan:
            dep = f" (afterok:{jobs['pretrain'].job_id})" if spec.after else ""
            print(f"queued {spec.name:<14} job {jobs[spec.name].job_id}{dep}  log {launcher.log_path(jobs[spec.name])}")
        ids = ",".join(j.job_id for j in jobs.values())
        print(f"\nwatch:  squeue -j {ids}\n        tail -f {launcher.log_path(jobs['pretrain'])}"
              f"\n        python jobs/submit.py --status {run_dir}"
              f"\n        mlflow ui --backend-store-uri {uri}")
        return 0

    # local / debug: run pre-training, then the evaluations, here and now
    outcome = launcher.run_plan(plan, lambda spec, job: print(
        f"running {spec.name} (log {launcher.log_path(job)})", flush=True))
    for job_name, state in outcome.items():
        print(f"{job_name:<14} {state}")
    return 0 if all(s == "ok" for s in outcome.values()) else 1

if __name__ == "__main__":
    sys.exit(main())
