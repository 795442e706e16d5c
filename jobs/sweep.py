"""A sweep: every cell (method x grid point x seed) enumerated up front, each with a stable id.

A sweep file (``--sweep FILE``; every key optional but ``methods`` or ``claims``):

    name: compare                       # default sweep-<timestamp>
    methods: [mae, noised_mim, latent_mim, lut, umd]
    seeds: [0, 1]                       # train.seed: data order, initialisation, augmentation
    preset: compare                     # configs/presets/<name>.yaml
    config: []                          # more YAML files
    set: [train.epochs=8]               # overrides of every cell
    grid: {method.noised_mim.noise_block: [0, 2, 4]}   # swept overrides (cartesian product)
    claims: configs/claims.yaml         # instead of methods: every arm some claim compares

or the same on the command line: ``--method mae,lut --seeds 0,1 --set k=v1,v2`` (a value with a
top-level comma is swept; ``[5, 20]`` stays one list value). A cell's id is its method, its grid
values and its seed (``noised_mim-noise_block2-seed0``), or with ``claims`` its arm and seed
(``noised_mim-pixel_noise-seed0``: the arm's method and overrides, hpc_mim/claims.py). It names
the cell's run directory ``<runs_root>/<sweep>/<cell>`` and its MLflow run. A YAML syntax
error in the sweep file or a swept value, a seed that is not an integer, or a control character
in a swept ``--set`` is a ``ConfigError`` naming it (the CLI: ``error: ...``, exit 2). A cell
id is one safe folder name: a method must be a plain name (``../../x`` in a sweep file is
refused, naming the file and the value), grid values are reduced to letters, digits and '.', an
id has at most 128 characters.
"""
from __future__ import annotations

import itertools
import re
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from hpc_mim.claims import Arm, load_claims
from hpc_mim.config import CONFIG_DIR, ConfigError
from hpc_mim.config_checks import check_text, yaml_error

SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")     # a folder name: no '/', no leading '.'
ID_MAX = 128                                               # a run name's limit (hpc_mim/config.py)


@dataclass
class SweepSpec:
    name: str = ""
    methods: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0])
    preset: str | None = None
    config: list[str] = field(default_factory=list)
    set: list[str] = field(default_factory=list)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    claims: str | None = None          # a claims file: its arms are the cells (without methods)
    arms: list[Arm] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self.name = self.name or f"sweep-{time.strftime('%Y%m%d-%H%M%S')}"
        if not re.fullmatch(r"[A-Za-z0-9][\w.-]*", self.name):
            raise ConfigError(f"sweep name {self.name!r}: use letters, digits, '.', '_' and '-'")
        if self.claims:
            if self.methods:
                raise ConfigError("sweep: give methods or claims, not both (a claims file's arms "
                                  "name their methods)")
            self.claims = str(claims_path(self.claims))
            self.arms = load_claims(self.claims).used_arms()
            self.methods = list(dict.fromkeys(a.method for a in self.arms))
        if not self.methods:
            raise ConfigError("sweep: give at least one method (methods: [...] or --method a,b)")
        for method in self.methods:      # it starts each cell id, a folder name
            if not isinstance(method, str) or not SAFE_NAME.fullmatch(method):
                raise ConfigError(f"sweep methods: {method!r} is not a method name (letters, digits, "
                                  "'.', '_', '-'; no '/')")
        for key, values in self.grid.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"sweep grid: {key} needs a non-empty list of values, got {values!r}")
        for seed in self.seeds:          # train.seed of a cell: an int in numpy's range
            if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= 2 ** 32 - 1:
                raise ConfigError(f"sweep seeds: {seed!r} is not a seed (an integer in [0, 2**32 - 1])")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"sweep seeds {self.seeds} repeat a seed")


def claims_path(text: str) -> Path:
    """A claims file as given, or relative to the repository (``configs/claims.yaml`` from any
    working directory)."""
    path = Path(text)
    if path.is_file() or path.is_absolute():
        return path.resolve()
    return (CONFIG_DIR.parent / path).resolve()


@dataclass
class Cell:
    id: str
    method: str
    seed: int
    grid: dict[str, Any]              # this cell's swept values

    def overrides(self) -> list[str]:
        return [f"{k}={v}" for k, v in self.grid.items()] + [f"train.seed={self.seed}"]


def load_sweep_file(path: str | Path, name: str = "", preset: str | None = None,
                    configs: list[str] = (), sets: list[str] = ()) -> SweepSpec:
    """A sweep file; an unknown key or a wrong type is an error naming the file and key. The
    command line's ``--sweep-name``, ``--preset``, ``--config`` and ``--set`` apply on top."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--sweep {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise yaml_error(str(path), e) from None
    except (UnicodeDecodeError, OSError) as e:
        raise ConfigError(f"--sweep {path}: cannot be read as UTF-8 text ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a sweep file is a mapping of {[f.name for f in fields(SweepSpec)]}")
    known = {f.name for f in fields(SweepSpec) if f.init}
    for key, value in data.items():
        if key not in known:
            raise ConfigError(f"{path}: unknown key {key!r}; a sweep file has {sorted(known)}")
        want = {"name": str, "preset": str, "grid": dict, "claims": str}.get(key, list)
        if value is not None and not isinstance(value, want):
            raise ConfigError(f"{path}: {key} must be a {want.__name__}, got {value!r}")
    data["set"] = [str(s) for s in data.get("set") or []] + list(sets)
    data["config"] = list(data.get("config") or []) + list(configs)
    data["name"] = name or data.get("name") or ""
    data["preset"] = preset or data.get("preset")
    try:
        spec = SweepSpec(**{k: v for k, v in data.items() if v is not None})
        enumerate_cells(spec)            # every cell id a safe folder name, none twice
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e
    return spec


def split_top_level(value: str) -> list[str]:
    """``"0,2,4"`` -> ["0", "2", "4"]; commas inside [...] or {...} do not split."""
    parts, depth, current = [], 0, ""
    for ch in value:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += ch
    return [*parts, current.strip()]


def _swept_value(item: str, value: str) -> Any:
    """One value of ``--set key=v1,v2`` read as YAML; a syntax error names the item."""
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise yaml_error(f"--set {item!r}: the value {value!r}", e) from None


def _seed(text: str, seeds: str) -> int:
    """One of ``--seeds 0,1``; its range is train.seed's, checked with each cell's config."""
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"--seeds {seeds!r}: {text!r} is not an integer; give comma-separated "
                          "integers, e.g. --seeds 0,1") from None


def from_cli(methods: str, seeds: str | None, sets: list[str], preset: str | None,
             configs: list[str], name: str = "") -> SweepSpec | None:
    """The sweep the short form asks for, or None when it asks for a single run."""
    grid, common = {}, []
    for item in sets:
        key, sep, value = item.partition("=")
        values = split_top_level(value) if sep else [value]
        if len(values) > 1:
            check_text(item, key.strip(), "--set")     # before YAML folds a newline away
            grid[key.strip()] = [_swept_value(item, v) for v in values]
        else:
            common.append(item)
    method_list = split_top_level(methods)
    seed_list = [_seed(s, seeds) for s in split_top_level(seeds)] if seeds else [0]
    if len(method_list) == 1 and seeds is None and not grid:
        return None
    return SweepSpec(name, method_list, seed_list, preset, configs, common, grid)


def _label(key: str, value: Any) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", f"{key}{value}").strip("_")


def enumerate_cells(spec: SweepSpec) -> list[Cell]:
    """Every (method or claims arm, grid point, seed), in the given order, then grid, then seed."""
    keys = list(spec.grid)
    leaves = [k.rsplit(".", 1)[-1] for k in keys]
    if len(set(leaves)) < len(leaves):     # two swept keys end alike: spell them out
        leaves = [k.replace(".", "_") for k in keys]
    # (name, method, fixed overrides): a method alone, or a claims arm with its overrides
    rows = ([(a.name, a.method, dict(s.split("=", 1) for s in a.set)) for a in spec.arms]
            or [(m, m, {}) for m in spec.methods])
    points = list(itertools.product(*(spec.grid[k] for k in keys)))
    order = [(row, values, seed) for row in rows for values in points for seed in spec.seeds]
    if spec.arms:     # seed-major: a claims sweep stopped part-way has every arm at the same n
        order.sort(key=lambda item: spec.seeds.index(item[2]))
    cells = []
    for (name, method, fixed), values, seed in order:
        parts = [name, *(_label(leaf, v) for leaf, v in zip(leaves, values)), f"seed{seed}"]
        cells.append(Cell("-".join(parts), method, seed, {**fixed, **dict(zip(keys, values))}))
    ids = [c.id for c in cells]
    for cid in ids:               # methods are checked and labels reduced: this is a last guard
        if not SAFE_NAME.fullmatch(cid) or len(cid) > ID_MAX:
            raise ConfigError(f"sweep: cell id {cid!r} is not a folder name of at most {ID_MAX} "
                              "characters (letters, digits, '.', '_', '-'); shorten the grid values")
    if len(set(ids)) != len(ids):
        raise ConfigError(f"sweep: cells {sorted({i for i in ids if ids.count(i) > 1})} repeat; "
                          "two grid values print alike")
    return cells


def spec_dict(spec: SweepSpec) -> dict[str, Any]:
    return asdict(spec)
