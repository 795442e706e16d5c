"""A new run, before and as it is queued: its inputs checked (dataset files, a writable runs
folder, an MLflow store the nodes may share), its run directory and MLflow parent run created.
Shared by a single submission (jobs/submit.py) and every cell of a sweep
(jobs/sweep_commands.py)."""
from __future__ import annotations

import tempfile
from pathlib import Path
from urllib.parse import urlparse

from hpc_mim.config import Config, ConfigError, save_config
from hpc_mim.datasets import check_classes, required_files
from jobs.plan import JobSpec


def check_inputs(cfg: Config, run_dir: Path) -> None:
    """Dataset files present and the runs folder writable, else a ConfigError naming them."""
    needed = {cfg.data.dataset: "data.dataset"}
    for label, _, dataset in cfg.eval_jobs():
        needed.setdefault(dataset, f"evals ({label})")
    for dataset, key in needed.items():
        info = cfg.dataset_info(dataset)
        for path in required_files(info):
            if not path.exists():
                raise ConfigError(f"{key}={dataset}: {path} not found; "
                                  f"convert it first: {info.get('convert', 'see data_prep/')}")
        check_classes(info, key)        # registry num_classes vs the converter's manifests
    root = run_dir.parent
    probe = root if root.exists() else next(p for p in root.parents if p.exists())
    if not probe.is_dir():
        raise ConfigError(f"runs_root: {root} cannot be created: {probe} is not a folder")
    try:                       # really write: os.access says yes to root on a read-only mount
        tempfile.TemporaryDirectory(dir=probe, prefix=".hpc_mim-probe-").cleanup()
    except OSError as e:
        raise ConfigError(f"runs_root: {root} is not writable ({e.strerror} in {probe})") from e
    if run_dir.exists():
        raise ConfigError(f"name: run directory {run_dir} already exists; pick another --set name=...")


def is_file_store(uri: str) -> bool:
    """True for an MLflow store that is a file on disk: "" (the default sqlite:///<runs_root>/
    mlflow.db), ``sqlite:``, ``file:`` or a plain path; False for a server (``http(s)://``) or
    a database server (``postgresql://``, ``mysql://``, ...) or Databricks (``databricks``
    alone is a URI: mlflow.utils.uri.is_databricks_uri)."""
    uri = uri.strip()
    return uri != "databricks" and urlparse(uri).scheme.lower() in ("", "file", "sqlite")


def check_tracking_store(cfg: Config, plans: list[list[JobSpec]], cluster: str, cells: int = 0) -> None:
    """Refuse (ConfigError) a SLURM submission whose jobs would write a file-based MLflow store
    from several nodes at once: a multi-node job (``cluster.nodes`` or ``eval.<name>.nodes`` >
    1) or a sweep (``cells`` > 0: its cells run side by side). SQLite's locking does not hold
    on NFS/Lustre ("database is locked", corrupted stores: https://www.sqlite.org/faq.html#q5),
    and a ``file:`` store's run folders race the same way. ``--cluster local``/``debug`` run on
    one machine and pass; ``tracking.allow_file_store: true`` opts in (one machine's local
    disk, e.g. scripts/local_slurm.sh). ``cluster``: the resolved one (``auto`` -> slurm when
    sbatch is on PATH). Called before anything is created or queued, on ``--dry-run`` too."""
    if cluster != "slurm" or cfg.tracking.allow_file_store or not is_file_store(cfg.tracking.uri):
        return
    wide = [s for plan in plans for s in plan if s.nodes > 1]
    if cells:
        why = f"a sweep of {cells} cells, whose jobs run at once on several nodes"
    elif wide:
        why = ", ".join(f"{s.name} on {s.nodes} nodes" for s in wide)
    else:
        return
    store = cfg.tracking.uri or f"the default {tracking_uri(cfg)}"
    raise ConfigError(
        f"tracking.uri: the MLflow store is a file ({store}) and this SLURM submission writes it "
        f"from several nodes at once ({why}); a file store on a shared file system (NFS, "
        "Lustre) gives 'database is locked' and corrupted stores. Nothing was queued. Run a tracking "
        "server on a host the nodes reach:\n"
        "    mlflow server --backend-store-uri postgresql://USER:PASSWORD@DBHOST/mlflow "
        "--host 0.0.0.0 --port 5000 --allowed-hosts '<server host>:5000'\n"
        "    (or --backend-store-uri sqlite:////<a local disk of the server host>/mlflow.db: "
        "only the server writes it)\n"
        "and submit with --set tracking.uri=http://<server host>:5000; or, when every node writes "
        "to one machine's local disk (scripts/local_slurm.sh), opt in with "
        "--set tracking.allow_file_store=true")


def tracking_uri(cfg: Config) -> str:
    from hpc_mim.tracking import default_uri
    return cfg.tracking.uri or default_uri(Path(cfg.runs_root))


def tracking_experiment(cfg: Config, uri: str) -> str:
    """The experiment id. The submitting process creates the store first (concurrent creation
    corrupts sqlite); artifacts go next to a local store, a server keeps its own."""
    from hpc_mim.tracking import ensure_experiment
    artifacts = Path(cfg.runs_root) / "mlartifacts" if uri.startswith("sqlite:") else None
    return ensure_experiment(uri, cfg.tracking.experiment, artifacts)


def create_run(cfg: Config, run_dir: Path, uri: str, experiment: str, parent_run_id: str | None = None,
               tags: dict[str, str] | None = None) -> str:
    """The run directory (resolved config, tracking.json) and its MLflow run (params, what
    reproduces it: jobs/provenance.py); ``tags`` (a sweep's ``sweep``, ``cell``, ``seed``) also
    go to the evaluations' child runs. Returns the MLflow run id."""
    from hpc_mim.rundir import RunDir
    from hpc_mim.tracking import MLflowLogger
    from jobs import provenance
    run = RunDir(run_dir).create()
    save_config(cfg, run.config)
    tags = {k: str(v) for k, v in (tags or {}).items()}
    logger = MLflowLogger.create_run(uri, experiment, cfg.name, parent_run_id=parent_run_id,
                                     tags={"method": cfg.method.name, "run_dir": str(run_dir), **tags})
    logger.log_params(cfg.to_dict())
    recorded = provenance.record(logger, cfg, run.config)
    run.write_tracking({"uri": uri, "experiment_id": experiment, "run_id": logger.run_id, "tags": tags,
                        "provenance": recorded})
    return logger.run_id
