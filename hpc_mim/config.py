"""Typed configuration: dataclasses per component, YAML files, dotted CLI overrides.

A run's config is composed in this order (later wins):

    dataclass defaults < configs/methods/<method>.yaml < configs/presets/<preset>.yaml
                       < --config FILE ... < --set key.sub=value ...

Every layer is checked against the dataclasses: an unknown key gets a did-you-mean, a value of
the wrong type or an impossible value gets a ``ConfigError`` naming the dotted key and the file
(or ``--set``) it came from. Every numeric key has its range (each section's ``RANGES`` table,
checked as the value is read: hpc_mim/config_checks.py, so NaN, a negative step count or a
zero divisor never reaches ``validate()`` or the job), no string may hold a control character,
``name`` must be a plain folder name, and a YAML syntax error names the file and line. Nothing
here imports torch, so the login-node CLI stays light.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from hpc_mim import datasets
from hpc_mim.config_checks import (COUNT_MAX, LAYERS_MAX, MINUTES_MAX, PIXELS_MAX, SECONDS_MAX, SEED_MAX,
                                   WIDTH_MAX, Range, check_run_name, check_saved_run_name, check_text,
                                   check_tree, check_value, yaml_error)
from hpc_mim.config_error import ConfigError  # noqa: F401 - raised here, and imported from here
from hpc_mim.eval_options import EVAL_KINDS, EvalConfig, parse_entry
from hpc_mim.methods.options import LatentMIMOptions, LUTOptions, NoisedMIMOptions, UMDOptions

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` as a float (YAML 1.1 insists on ``1.0e-3``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def yaml_load(text_or_stream: Any) -> Any:
    return yaml.load(text_or_stream, Loader=_Loader)


@dataclass
class ModelConfig:
    """ViT encoder size. Defaults are ViT-B/16 at 224 px."""
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    drop_path: float = 0.0
    pos_embed: str = "sincos"           # sincos: fixed 2-D sin-cos (MAE) | learned (UMD's authors)
    RANGES: ClassVar[dict[str, Range]] = {
        "img_size": f"[1, {PIXELS_MAX}]", "patch_size": f"[1, {PIXELS_MAX}]", "in_chans": "[1, 1024]",
        "embed_dim": f"[1, {WIDTH_MAX}]", "depth": f"[1, {LAYERS_MAX}]", "num_heads": f"[1, {LAYERS_MAX}]",
        "mlp_ratio": "(0, 1024]", "drop_path": ("[0, 1)", "a probability; 1 drops every residual branch")}

    def validate(self) -> None:
        for key in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads"):
            _check(getattr(self, key) > 0, f"model.{key}", "must be > 0")   # before dividing by them
        _check(self.img_size % self.patch_size == 0, "model.img_size",
               f"{self.img_size} is not a multiple of model.patch_size={self.patch_size}")
        _check(self.embed_dim % self.num_heads == 0, "model.embed_dim",
               f"{self.embed_dim} is not divisible by model.num_heads={self.num_heads}")
        _check(self.pos_embed in ("sincos", "learned"), "model.pos_embed",
               f"{self.pos_embed!r}; choose sincos or learned")


@dataclass
class MethodConfig:
    """Pre-training method (a name in hpc_mim.methods.REGISTRY), the options several methods
    share, and one section per method (hpc_mim/methods/options.py)."""
    name: str = "mae"
    mask_ratio: float = 0.75            # fraction of patches hidden from the encoder
    norm_pix_loss: bool = True
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    noised_mim: NoisedMIMOptions = field(default_factory=NoisedMIMOptions)
    latent_mim: LatentMIMOptions = field(default_factory=LatentMIMOptions)
    lut: LUTOptions = field(default_factory=LUTOptions)
    umd: UMDOptions = field(default_factory=UMDOptions)
    RANGES: ClassVar[dict[str, Range]] = {
        "mask_ratio": ("[0, 1)", "at least one patch must stay visible"),
        "decoder_dim": f"[1, {WIDTH_MAX}]", "decoder_depth": f"[1, {LAYERS_MAX}]",
        "decoder_heads": f"[1, {LAYERS_MAX}]"}

    def validate(self, depth: int | None = None) -> None:
        from hpc_mim.methods import REGISTRY  # the registry is a plain dict of import paths
        _check(self.name in REGISTRY, "method.name",
               f"unknown method {self.name!r}; choose one of {sorted(REGISTRY)}")
        _check(0.0 <= self.mask_ratio < 1.0, "method.mask_ratio",
               f"{self.mask_ratio} must be in [0, 1): at least one patch must stay visible")
        _check(self.decoder_heads > 0, "method.decoder_heads", "must be > 0")   # before dividing by it
        _check(self.decoder_dim % self.decoder_heads == 0, "method.decoder_dim",
               f"{self.decoder_dim} is not divisible by method.decoder_heads={self.decoder_heads}")
        for section in METHOD_SECTIONS:      # checks against mask ratio / depth: chosen one only
            chosen = section == self.name
            getattr(self, section).validate(self.mask_ratio if chosen else None,
                                            depth if chosen else None)


METHOD_SECTIONS = ("noised_mim", "latent_mim", "lut", "umd")


@dataclass
class DataConfig:
    """Which converted dataset to read (a name in configs/datasets.yaml) and its augmentation."""
    dataset: str = "fmnist"
    root: str = "data"                  # folder holding the converted .beton files
    crop: str = "resized"               # resized: RandomResizedCrop(crop_scale) | pad: Resize + RandomCrop(padding) (LUT)
    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])
    crop_padding: int = 4               # reflect padding of crop: pad
    normalize: str = "dataset"          # dataset: its per-channel mean/std | symmetric: [-1, 1] (UMD's authors)
    hflip: bool = True
    num_workers: int = 2
    max_train_samples: int = 0          # 0 = all; a prefix subset for quick runs
    RANGES: ClassVar[dict[str, Range]] = {
        "crop_scale": "(0, 1]", "crop_padding": f"[0, {PIXELS_MAX}]", "num_workers": "[1, 1024]",
        "max_train_samples": (f"[0, {COUNT_MAX}]", "0 = all")}

    def validate(self) -> None:
        info = datasets.dataset_info(self.dataset, self.root)
        _check(info["kind"] == "classification", "data.dataset",
               f"{self.dataset!r} is a {info['kind']} dataset; pre-training reads .beton files")
        lo, hi = (self.crop_scale + [0, 0])[:2]
        _check(len(self.crop_scale) == 2 and 0 < lo <= hi <= 1, "data.crop_scale",
               f"{self.crop_scale} must be [lo, hi] with 0 < lo <= hi <= 1")
        _check(self.crop in ("resized", "pad"), "data.crop", f"{self.crop!r}; choose resized or pad")
        _check(self.crop_padding >= 0, "data.crop_padding", "must be >= 0")
        _check(self.normalize in ("dataset", "symmetric"), "data.normalize",
               f"{self.normalize!r}; choose dataset or symmetric")
        _check(self.num_workers >= 1, "data.num_workers", "must be >= 1")
        _check(self.max_train_samples >= 0, "data.max_train_samples", "must be >= 0")


@dataclass
class TrainConfig:
    """Optimisation (MAE recipe by default: AdamW(0.9, 0.95), lr = blr * batch / 256)."""
    epochs: int = 800
    warmup_epochs: float = 40
    batch_size: int = 4096              # effective (global) batch size per optimizer step
    micro_batch_size: int = 64          # per process per forward; the rest is accumulation
    blr: float = 1.5e-4
    lr_scaling: str = "linear"          # linear: lr = blr * batch / 256 (MAE); sqrt: blr * sqrt(batch) / 4 (LUT)
    min_lr: float = 0.0                 # floor of the cosine, absolute ...
    min_lr_ratio: float = 0.0           # ... or as a fraction of the peak lr (LatentMIM: 0.25)
    # warmup from the floor lr (LatentMIM's util/lr_sched.py: min_lr + (lr - min_lr) * ep / warmup)
    # instead of from 0 (MAE's)
    warmup_from_floor: bool = False
    weight_decay: float = 0.05
    # substrings of parameter names exempt from weight decay, on top of timm's rule (every 1-D
    # tensor and bias): LatentMIM's authors [embed], UMD's [cls_token, mask_token]
    no_weight_decay: list[str] = field(default_factory=list)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    clip_grad: float = 0.0              # 0 = no clipping
    precision: str = "fp32"             # fp32 | bf16
    zero_stage: int = 2
    # ZeRO 1-3: reduce gradients on a side stream while the backward goes on, in buckets of this
    # many elements (see hpc_mim/distributed/deepspeed.py::ds_config for the sizing)
    zero_overlap_comm: bool = True
    zero_bucket_size: int = 25_000_000
    seed: int = 0
    log_every: int = 20                 # optimizer steps between metric points
    # validation images whose RankMe and pairwise cosine are logged every log_every steps
    # (val/rankme, val/pairwise_cosine: collapse as a curve; hpc_mim/train/collapse.py); 0 = off
    collapse_images: int = 256
    max_steps: int = 0                  # 0 = run all epochs; > 0 stops early (smoke tests)
    compile: bool = False               # torch.compile the method's networks (MIMMethod.compiled)
    RANGES: ClassVar[dict[str, Range]] = {
        "epochs": "[1, 1000000]", "warmup_epochs": "[0, 1000000]", "batch_size": f"[1, {COUNT_MAX}]",
        "micro_batch_size": f"[1, {COUNT_MAX}]", "blr": "(0, inf)", "min_lr": "[0, inf)",
        "min_lr_ratio": "[0, 1]", "weight_decay": "[0, inf)", "betas": ("[0, 1)", "Adam's decay rates"),
        "clip_grad": ("[0, inf)", "0 = no clipping"), "zero_stage": "[0, 3]",
        "zero_bucket_size": f"[1, {COUNT_MAX}]", "seed": (f"[0, {SEED_MAX}]", "numpy seeds are uint32"),
        "log_every": f"[1, {COUNT_MAX}]", "collapse_images": (f"[0, {COUNT_MAX}]", "0 = off"),
        "max_steps": (f"[0, {COUNT_MAX}]", "0 = all epochs; a negative count would train nothing")}

    def validate(self) -> None:
        _check(self.epochs > 0, "train.epochs", "must be > 0")
        _check(0 <= self.warmup_epochs <= self.epochs, "train.warmup_epochs",
               f"{self.warmup_epochs} must be in [0, train.epochs={self.epochs}]")
        _check(self.batch_size > 0 and self.micro_batch_size > 0, "train.batch_size", "must be > 0")
        _check(self.batch_size % self.micro_batch_size == 0, "train.batch_size",
               f"{self.batch_size} is not a multiple of train.micro_batch_size={self.micro_batch_size}")
        _check(self.precision in ("fp32", "bf16"), "train.precision",
               f"{self.precision!r}; choose fp32 or bf16")
        _check(self.zero_stage in (0, 1, 2, 3), "train.zero_stage", f"{self.zero_stage}; choose 0-3")
        _check(self.zero_bucket_size > 0, "train.zero_bucket_size", "must be > 0 (elements)")
        _check(self.blr > 0, "train.blr", "must be > 0")
        _check(self.lr_scaling in ("linear", "sqrt"), "train.lr_scaling",
               f"{self.lr_scaling!r}; choose linear or sqrt")
        _check(0.0 <= self.min_lr_ratio <= 1.0, "train.min_lr_ratio", "must be in [0, 1]")
        _check(not (self.min_lr and self.min_lr_ratio), "train.min_lr",
               "set train.min_lr or train.min_lr_ratio, not both")
        _check(len(self.betas) == 2, "train.betas", "must be [beta1, beta2]")

    def peak_lr(self) -> float:
        if self.lr_scaling == "sqrt":
            return self.blr * self.batch_size ** 0.5 / 4
        return self.blr * self.batch_size / 256

    def floor_lr(self) -> float:
        return self.min_lr or self.min_lr_ratio * self.peak_lr()

    def accumulation(self, world_size: int) -> int:
        """Gradient accumulation steps so that micro * world * accum == batch_size."""
        per_step = self.micro_batch_size * world_size
        if self.batch_size % per_step:
            raise ConfigError(
                f"train.batch_size={self.batch_size} is not divisible by train.micro_batch_size"
                f" x world size = {self.micro_batch_size} x {world_size}")
        return self.batch_size // per_step


@dataclass
class CheckpointConfig:
    every_steps: int = 500              # periodic checkpoints cover kill -9 and node loss
    keep_last: int = 2
    RANGES: ClassVar[dict[str, Range]] = {"every_steps": f"[1, {COUNT_MAX}]", "keep_last": "[1, 1000]"}

    def validate(self) -> None:
        _check(self.every_steps > 0, "checkpoint.every_steps", "must be > 0")
        _check(self.keep_last >= 1, "checkpoint.keep_last", "must be >= 1")


@dataclass
class TrackingConfig:
    uri: str = ""                       # "" = sqlite:///<runs_root>/mlflow.db; or http://host:port
    experiment: str = "hpc_mim"
    retry_s: float = 30.0               # while the server is unreachable: retry this often
    # A file store (sqlite:, file:, a path, "") written from several nodes at once over NFS or
    # Lustre gets "database is locked" and corrupted: jobs/submit.py refuses such a SLURM
    # submission (multi-node, or a sweep) unless this is true (one machine's local disk).
    allow_file_store: bool = False
    RANGES: ClassVar[dict[str, Range]] = {"retry_s": "(0, 86400]"}

    def validate(self) -> None:
        _check(self.retry_s > 0, "tracking.retry_s", "must be > 0")
        # a secret here would reach config.yaml, the MLflow params, tracking.json, sweep.json,
        # printed lines and MLflow's exception texts; the message shows the URI redacted
        from hpc_mim.redact import redact, uri_secret
        secret = uri_secret(self.uri)
        _check(not secret, "tracking.uri",
               f"{redact(self.uri)} holds {secret}; leave it out: MLflow reads "
               "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) "
               "from the environment (a database store: e.g. PostgreSQL's ~/.pgpass or PGPASSWORD)")


@dataclass
class ClusterConfig:
    """Resources for the pre-training job (each evaluation's: eval.<name>.nodes, ...)."""
    partition: str = ""
    nodes: int = 1
    tasks_per_node: int = 1             # = GPUs per node on a GPU cluster
    gpus_per_node: int = 0
    cpus_per_task: int = 2
    time_min: int = 60
    eval_time_min: int = 60             # the evaluations' time limit unless eval.<name>.time_min
    max_restarts: int = 20              # requeues after preemption / time limit / killed tasks
    rendezvous_timeout_s: int = 300     # all ranks must have joined by then, else a clear error
    collective_timeout_s: int = 1800    # how long a collective waits for the slowest rank
    # no optimizer step for this long (or 10x the longest step seen) ends a training job with
    # every rank's Python stacks in its log; requeued once, failed if it stalls there again.
    # Below collective_timeout_s, so the stacks are written before a collective times out
    stall_timeout_min: float = 20.0
    RANGES: ClassVar[dict[str, Range]] = {
        "nodes": "[1, 65536]", "tasks_per_node": "[1, 1024]", "gpus_per_node": "[0, 1024]",
        "cpus_per_task": "[1, 4096]", "time_min": (f"[1, {MINUTES_MAX}]", "SLURM minutes, at most a year"),
        "eval_time_min": (f"[1, {MINUTES_MAX}]", "SLURM minutes, at most a year"), "max_restarts": "[0, 10000]",
        "rendezvous_timeout_s": f"[1, {SECONDS_MAX}]", "collective_timeout_s": f"[1, {SECONDS_MAX}]",
        "stall_timeout_min": f"(0, {SECONDS_MAX // 60}]"}

    def validate(self) -> None:
        for key in ("nodes", "tasks_per_node", "cpus_per_task", "time_min", "eval_time_min"):
            _check(getattr(self, key) >= 1, f"cluster.{key}", "must be >= 1")
        _check(self.max_restarts >= 0, "cluster.max_restarts", "must be >= 0")
        _check(self.rendezvous_timeout_s >= 1, "cluster.rendezvous_timeout_s", "must be >= 1")
        _check(self.collective_timeout_s >= 1, "cluster.collective_timeout_s", "must be >= 1")
        _check(self.stall_timeout_min > 0, "cluster.stall_timeout_min", "must be > 0")


@dataclass
class Config:
    name: str = ""                      # run name; "" = <method>-<timestamp>
    runs_root: str = "runs"
    # run directories are their owner's only (0700, files 0600: write access to one is code
    # execution in the jobs that resume from it); true: the group may read them (0750, 0640)
    share_runs_with_group: bool = False
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # evaluations chained after pre-training: "name" or "name:dataset" (hpc_mim/eval_options.py)
    evals: list[str] = field(default_factory=lambda: ["knn", "linear_probe"])

    def validate(self) -> "Config":
        check_tree(self)                 # ranges first: the checks below divide by these values
        check_saved_run_name(self.name)  # a sweep cell's saved config: <sweep>/<cell>
        for f in dataclasses.fields(self):
            validate = getattr(getattr(self, f.name), "validate", None)
            if validate is not None and f.name != "method":
                validate()
        self.method.validate(depth=self.model.depth)   # noise_block is checked against depth
        world = self.cluster.nodes * self.cluster.tasks_per_node
        self.train.accumulation(world)
        jobs = self.eval_jobs()                                    # also checks every dataset
        for label, name, _ in jobs:
            getattr(self.eval, name).check_resources(name, self.cluster)
        labels = [label for label, _, _ in jobs]
        _check(len(set(labels)) == len(labels), "evals", f"{self.evals} lists a job twice")
        return self

    def eval_jobs(self) -> list[tuple[str, str, str]]:
        """(job label, evaluation, dataset) per ``evals`` entry; the dataset resolved (entry,
        else the section's, else the pre-training one) and checked to be of the right kind."""
        jobs = []
        for entry in self.evals:
            name, dataset = parse_entry(entry)
            dataset = dataset or getattr(self.eval, name).dataset or self.data.dataset
            info = self.dataset_info(dataset, key="evals")
            _check(info["kind"] == EVAL_KINDS[name], "evals",
                   f"{entry!r}: {dataset!r} is a {info['kind']} dataset; {name} needs a "
                   f"{EVAL_KINDS[name]} one (configs/datasets.yaml)")
            jobs.append((entry, name, dataset))
        return jobs

    def to_dict(self) -> dict[str, Any]:
        """Plain dict; of the per-method sections only the chosen method's is kept."""
        out = dataclasses.asdict(self)
        for section in METHOD_SECTIONS:
            if section != self.method.name:
                del out["method"][section]
        return out

    def dataset_info(self, name: str = "", key: str = "data.dataset") -> dict[str, Any]:
        """Registry entry of a dataset with its paths made absolute (hpc_mim/datasets.py).
        ``data.normalize: symmetric`` replaces its mean/std by 0.5 (pixels in [-1, 1]) for
        pre-training and for every evaluation of the run, which reads this same config."""
        info = datasets.dataset_info(name or self.data.dataset, self.data.root, key)
        if self.data.normalize == "symmetric":
            channels = len(info.get("mean", [0, 0, 0]))
            info["mean"], info["std"] = [0.5] * channels, [0.5] * channels
        return info


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


# --------------------------------------------------------------------------- composition

def from_dict(cls: type, data: dict[str, Any], source: str = "", prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys, wrong types, numbers
    out of their range and strings with control characters (hpc_mim/config_checks.py)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or '<root>'}: expected a mapping, got {data!r} ({source})")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
            raise ConfigError(f"unknown config key {dotted!r} ({source}){hint}")
        kwargs[key] = _coerce(hints[key], value, dotted, source)
        check_value(cls, key, kwargs[key], dotted, source)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str, source: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, source, prefix=f"{key}.")
    origin = typing.get_origin(tp)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r} ({source})")
        (item,) = typing.get_args(tp)
        return [_coerce(item, v, key, source) for v in value]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        if abs(value) > 2 ** 63:        # float() of a huge int raises OverflowError
            raise ConfigError(f"{key}: {value!r} is too large for a float ({source})")
        return float(value)
    if tp in (int, float, str, bool) and (type(value) is not tp):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r} ({source})")
    if tp is str:
        check_text(value, key, source)
    return value


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path) as f:
            data = yaml_load(f) or {}
    except yaml.YAMLError as e:
        raise yaml_error(str(path), e) from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a text (UTF-8) YAML file: {e}") from None
    except OSError as e:                 # unreadable: permissions, a folder, ...
        raise ConfigError(f"{path}: cannot read it: {e.strerror}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


def parse_override(text: str) -> dict[str, Any]:
    """``"train.epochs=5"`` -> ``{"train": {"epochs": 5}}`` (value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. train.epochs=5")
    key, raw = text.split("=", 1)
    # the raw text, before YAML reads it: YAML folds a newline into a space or drops what
    # follows a '#', so the parsed value may look clean where the command line was not
    check_text(text, key.strip(), "--set")
    try:
        value = yaml_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise yaml_error(f"--set {text!r}", e) from None
    out: dict[str, Any] = {}
    node = out
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


_PLAIN_NAME = re.compile(r"[\w-]+")       # a method's or preset's file name, without folders


def preset_layers(name: str, seen: tuple[str, ...] = ()) -> list[tuple[str, dict]]:
    """configs/presets/<name>.yaml, after the preset its ``base:`` key names (if any)."""
    path = CONFIG_DIR / "presets" / f"{name}.yaml"
    if not _PLAIN_NAME.fullmatch(str(name)) or not path.is_file():
        names = sorted(p.stem for p in (CONFIG_DIR / "presets").glob("*.yaml"))
        where = f" (base of {seen[-1]})" if seen else ""
        raise ConfigError(f"--preset {name!r}{where}: no such preset; choose one of {names}")
    if name in seen:
        raise ConfigError(f"{path}: base presets form a cycle: {' -> '.join((*seen, name))}")
    data = _read_yaml(path)
    base = data.pop("base", None)
    return [*(preset_layers(base, (*seen, name)) if base else []), (str(path), data)]


def load_config(method: str | None = None, preset: str | None = None,
                files: list[str] = (), overrides: list[str] = ()) -> Config:
    """Compose and validate a config; every layer is checked as it is applied."""
    layers: list[tuple[str, dict]] = []
    if method:
        path = CONFIG_DIR / "methods" / f"{method}.yaml"
        if not _PLAIN_NAME.fullmatch(method) or not path.is_file():   # no '../' out of configs/methods
            from hpc_mim.methods import REGISTRY
            raise ConfigError(f"--method {method!r}: no configs/methods/{method}.yaml; "
                              f"choose one of {sorted(REGISTRY)}")
        layers.append((str(path), _read_yaml(path)))
    if preset:
        layers += preset_layers(preset)
    layers += [(f, _read_yaml(Path(f))) for f in files]
    layers += [(f"--set {o}", parse_override(o)) for o in overrides]

    merged: dict[str, Any] = {}
    for source, data in layers:
        layer = from_dict(Config, data, source)  # check this layer alone so errors name its source
        if "name" in data:               # a folder under runs_root: no '/', '..' (check_run_name)
            check_run_name(layer.name, source)
        merged = _merge(merged, data)
    return from_dict(Config, merged, "merged config").validate()


def save_config(cfg: Config, path: Path) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)


def read_config(path: Path) -> Config:
    """Read a resolved config written by ``save_config`` (e.g. from a run directory)."""
    return from_dict(Config, _read_yaml(Path(path)), str(path)).validate()
