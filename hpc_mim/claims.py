"""The seed papers' claims as data (``configs/claims.yaml``): what each paper says, and the
comparison that tests it in this project.

A claims file has two keys (users add their own files, or entries to this one):

    arms:                                   # a method and its overrides; a claim names two
      noised_mim: {method: noised_mim}
      noised_mim-pixel_noise: {method: noised_mim, set: [method.noised_mim.noise_block=0]}
    claims:
      - id: noised_mim.feature_noise        # letters, digits, '.', '_', '-'
        paper: "Noised MIM (arXiv 2412.19104)"
        sentence: "noise must be introduced in the feature space ..."   # the paper's words
        treatment: noised_mim               # the arm the claim says is better ...
        control: noised_mim-pixel_noise     # ... than this one
        metric: linear_probe/top1           # <job>/<metric>, or <job>/layer/<name>@<layer|last>
        direction: higher                   # higher | lower: which way "better" goes
        min_effect: 1.0                     # the smallest |difference| that counts, metric units

An arm is a sweep cell without its seed: ``configs/sweeps/claims.yaml`` runs every arm of the
file with each seed (jobs/sweep.py), and ``python -m evaluation.report --claims FILE`` gives
each claim its verdict (evaluation/report_claims.py). Every error names the file, the claim or
arm, and the key. Torch-free: the login-node CLI reads it before anything is queued.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hpc_mim.config import ConfigError, load_config
from hpc_mim.config_checks import check_text, yaml_error

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")        # an arm names cells' folders
METRIC = re.compile(r"(?P<job>[A-Za-z0-9_]+)/(?:layer/(?P<layer_key>[A-Za-z0-9_]+)@(?P<layer>\d+|last)"
                    r"|(?P<key>[A-Za-z0-9_./]+))")
CLAIM_KEYS = {"id": str, "paper": str, "sentence": str, "treatment": str, "control": str,
              "metric": str, "direction": str, "min_effect": (int, float), "note": str}
OPTIONAL = {"note"}


@dataclass(frozen=True)
class Arm:
    name: str
    method: str
    set: tuple[str, ...] = ()                 # dotted overrides, as ``--set``


@dataclass(frozen=True)
class Metric:
    """A final metric of an evaluation job (``knn/top1``) or a per-layer diagnostic at one
    layer (``diagnostics/layer/pairwise_cosine@last``: block ``layer``, counted from 1)."""
    text: str
    job: str
    key: str                                  # ``top1`` or ``layer/pairwise_cosine``
    layer: int | str | None = None            # None for a final metric; an int or "last"


@dataclass(frozen=True)
class Claim:
    id: str
    paper: str
    sentence: str
    treatment: str
    control: str
    metric: Metric
    direction: str
    min_effect: float
    note: str = ""


@dataclass
class Claims:
    path: Path
    arms: dict[str, Arm] = field(default_factory=dict)
    claims: list[Claim] = field(default_factory=list)

    def used_arms(self) -> list[Arm]:
        """The arms some claim compares, in the file's order."""
        used = {a for c in self.claims for a in (c.treatment, c.control)}
        return [arm for name, arm in self.arms.items() if name in used]


def parse_metric(text: str, where: str) -> Metric:
    m = METRIC.fullmatch(text)
    if m is None:
        raise ConfigError(f"{where}: metric {text!r}: write <job>/<metric> (e.g. linear_probe/top1) "
                          "or <job>/layer/<name>@<layer|last> (e.g. diagnostics/layer/rankme@last)")
    if m["layer_key"]:
        layer = m["layer"] if m["layer"] == "last" else int(m["layer"])
        if layer == 0:
            raise ConfigError(f"{where}: metric {text!r}: layers count from 1")
        return Metric(text, m["job"], f"layer/{m['layer_key']}", layer)
    return Metric(text, m["job"], m["key"])


def _arm(name: Any, spec: Any, where: str) -> Arm:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ConfigError(f"{where}: arm name {name!r}: letters, digits, '.', '_', '-' (at most 64; "
                          "it names the arm's run folders)")
    if not isinstance(spec, dict) or set(spec) - {"method", "set"} or "method" not in spec:
        raise ConfigError(f"{where}: arm {name}: a mapping of method (required) and set (a list of "
                          f"key=value), got {spec!r}")
    sets = spec.get("set") or []
    if not isinstance(sets, list) or not all(isinstance(s, str) and "=" in s for s in sets):
        raise ConfigError(f"{where}: arm {name}: set must be a list of 'key=value' strings, got {sets!r}")
    for s in sets:
        check_text(s, f"arm {name}: set", where)
    try:                         # the overrides exist and hold valid values for this method
        load_config(str(spec["method"]), overrides=sets)
    except ConfigError as e:
        raise ConfigError(f"{where}: arm {name}: {e}") from None
    return Arm(name, str(spec["method"]), tuple(sets))


def _claim(entry: Any, index: int, arms: dict[str, Arm], where: str) -> Claim:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: claims[{index}] must be a mapping of {sorted(CLAIM_KEYS)}")
    cid = entry.get("id")
    if not isinstance(cid, str) or not NAME.fullmatch(cid):
        raise ConfigError(f"{where}: claims[{index}]: id {cid!r}: letters, digits, '.', '_', '-'")
    at = f"{where}: claim {cid}"
    for key in entry:
        if key not in CLAIM_KEYS:
            raise ConfigError(f"{at}: unknown key {key!r}; a claim has {sorted(CLAIM_KEYS)}")
    for key, want in CLAIM_KEYS.items():
        if key not in entry:
            if key in OPTIONAL:
                continue
            raise ConfigError(f"{at}: missing key {key!r}")
        value = entry[key]
        if isinstance(value, bool) or not isinstance(value, want):
            raise ConfigError(f"{at}: {key} must be a {getattr(want, '__name__', 'number')}, got {value!r}")
        if isinstance(value, str):
            check_text(value, f"claim {cid}: {key}", where)
    for key in ("treatment", "control"):
        if entry[key] not in arms:
            raise ConfigError(f"{at}: {key} {entry[key]!r} is not an arm; arms: {sorted(arms)}")
    if entry["treatment"] == entry["control"]:
        raise ConfigError(f"{at}: treatment and control are both {entry['treatment']!r}")
    if entry["direction"] not in ("higher", "lower"):
        raise ConfigError(f"{at}: direction {entry['direction']!r}: choose higher or lower")
    if not 0 <= entry["min_effect"] < float("inf"):
        raise ConfigError(f"{at}: min_effect {entry['min_effect']!r} must be >= 0 (metric units)")
    return Claim(cid, entry["paper"], " ".join(entry["sentence"].split()), entry["treatment"],
                 entry["control"], parse_metric(entry["metric"], at), entry["direction"],
                 float(entry["min_effect"]), entry.get("note", ""))


def load_claims(path: str | Path) -> Claims:
    """The claims file, every arm's overrides checked against its method's config."""
    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise ConfigError(f"claims file {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise yaml_error(where, e) from None
    except (UnicodeDecodeError, OSError) as e:
        raise ConfigError(f"{where}: cannot be read as UTF-8 text ({e})") from None
    if not isinstance(data, dict) or set(data) - {"arms", "claims"}:
        raise ConfigError(f"{where}: a claims file is a mapping of 'arms' and 'claims', got "
                          f"{sorted(data) if isinstance(data, dict) else type(data).__name__}")
    if not isinstance(data.get("arms"), dict) or not data["arms"]:
        raise ConfigError(f"{where}: arms must be a non-empty mapping of name -> {{method, set}}")
    if not isinstance(data.get("claims"), list) or not data["claims"]:
        raise ConfigError(f"{where}: claims must be a non-empty list")
    out = Claims(path, {name: _arm(name, spec, where) for name, spec in data["arms"].items()})
    for i, entry in enumerate(data["claims"]):
        claim = _claim(entry, i, out.arms, where)
        if any(c.id == claim.id for c in out.claims):
            raise ConfigError(f"{where}: claim {claim.id}: the id is used twice")
        out.claims.append(claim)
    return out
