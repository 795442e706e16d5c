"""A sweep: every cell (method x grid point x seed) enumerated up front, each with a stable id.

A sweep file (``--sweep FILE``; every key optional but ``methods``):

    name: compare                       # default sweep-<timestamp>
    methods: [mae, noised_mim, latent_mim, lut, umd]
    seeds: [0, 1]                       # train.seed: data order, initialisation, augmentation
    preset: compare                     # configs/presets/<name>.yaml
    config: []                          # more YAML files
    set: [train.epochs=8]               # overrides of every cell
    grid: {method.noised_mim.noise_block: [0, 2, 4]}   # swept overrides (cartesian product)

or the same on the command line: ``--method mae,lut --seeds 0,1 --set k=v1,v2`` (a value with a
top-level comma is swept; ``[5, 20]`` stays one list value). A cell's id is its method, its grid
values and its seed (``noised_mim-noise_block2-seed0``); it names the cell's run directory
``<runs_root>/<sweep>/<cell>`` and its MLflow run.
"""
from __future__ import annotations

import itertools
import re
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from hpc_mim.config import ConfigError


@dataclass
class SweepSpec:
    name: str = ""
    methods: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0])
    preset: str | None = None
    config: list[str] = field(default_factory=list)
    set: list[str] = field(default_factory=list)
    grid: dict[str, list[Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.name = self.name or f"sweep-{time.strftime('%Y%m%d-%H%M%S')}"
        if not re.fullmatch(r"[A-Za-z0-9][\w.-]*", self.name):
            raise ConfigError(f"sweep name {self.name!r}: use letters, digits, '.', '_' and '-'")
        if not self.methods:
            raise ConfigError("sweep: give at least one method (methods: [...] or --method a,b)")
        for key, values in self.grid.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"sweep grid: {key} needs a non-empty list of values, got {values!r}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"sweep seeds {self.seeds} repeat a seed")


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
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a sweep file is a mapping of {[f.name for f in fields(SweepSpec)]}")
    known = {f.name for f in fields(SweepSpec)}
    for key, value in data.items():
        if key not in known:
            raise ConfigError(f"{path}: unknown key {key!r}; a sweep file has {sorted(known)}")
        want = {"name": str, "preset": str, "grid": dict}.get(key, list)
        if value is not None and not isinstance(value, want):
            raise ConfigError(f"{path}: {key} must be a {want.__name__}, got {value!r}")
    data["set"] = [str(s) for s in data.get("set") or []] + list(sets)
    data["config"] = list(data.get("config") or []) + list(configs)
    data["name"] = name or data.get("name") or ""
    data["preset"] = preset or data.get("preset")
    return SweepSpec(**{k: v for k, v in data.items() if v is not None})


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


def from_cli(methods: str, seeds: str | None, sets: list[str], preset: str | None,
             configs: list[str], name: str = "") -> SweepSpec | None:
    """The sweep the short form asks for, or None when it asks for a single run."""
    grid, common = {}, []
    for item in sets:
        key, sep, value = item.partition("=")
        values = split_top_level(value) if sep else [value]
        if len(values) > 1:
            grid[key.strip()] = [yaml.safe_load(v) for v in values]
        else:
            common.append(item)
    method_list = split_top_level(methods)
    seed_list = [int(s) for s in split_top_level(seeds)] if seeds else [0]
    if len(method_list) == 1 and seeds is None and not grid:
        return None
    return SweepSpec(name, method_list, seed_list, preset, configs, common, grid)


def _label(key: str, value: Any) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", f"{key}{value}").strip("_")


def enumerate_cells(spec: SweepSpec) -> list[Cell]:
    """Every (method, grid point, seed), methods in the given order, then grid, then seed."""
    keys = list(spec.grid)
    leaves = [k.rsplit(".", 1)[-1] for k in keys]
    if len(set(leaves)) < len(leaves):     # two swept keys end alike: spell them out
        leaves = [k.replace(".", "_") for k in keys]
    cells = []
    for method in spec.methods:
        for values in itertools.product(*(spec.grid[k] for k in keys)):
            for seed in spec.seeds:
                parts = [method, *(_label(leaf, v) for leaf, v in zip(leaves, values)), f"seed{seed}"]
                cells.append(Cell("-".join(parts), method, seed, dict(zip(keys, values))))
    ids = [c.id for c in cells]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"sweep: cells {sorted({i for i in ids if ids.count(i) > 1})} repeat; "
                          "two grid values print alike")
    return cells


def spec_dict(spec: SweepSpec) -> dict[str, Any]:
    return asdict(spec)
