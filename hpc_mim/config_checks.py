"""The checks every config value passes where it enters a config: ranges, finiteness, control
characters, run names, and YAML syntax errors turned into ``ConfigError``s.

Each config dataclass declares its numeric fields' ranges beside the fields, as a table in the
usual interval notation, optionally with the reason a bound exists::

    RANGES: ClassVar[dict[str, Range]] = {"drop_path": "[0, 1)", "mask_ratio": ("[0, 1)", "why")}

(a list field's range is its items'; a subclass's table adds to its bases'). ``check_value``
runs for every field as it is read (``hpc_mim.config.from_dict``: a YAML file, ``--set``, a run's
saved config.yaml), so the error names the dotted key, the value and its source, and comes
before any ``validate()`` divides by the value (``model.num_heads=0`` used to end in a
ZeroDivisionError); ``check_tree`` runs the same checks over a config built or changed in code
(``Config.validate``). tests/test_config_ranges.py walks every numeric field of every section:
a new field without a range fails it.

Beyond its interval, every float must be finite (NaN compares False with every bound, so a
plain ``x > 0`` lets it through) and every int must fit int64 (torch and numpy take them), and
no string may hold a control character: a newline in ``cluster.partition``, ``name`` or
``runs_root`` would end the ``#SBATCH`` block of a job script and run the rest as a shell line
on the compute node (issue 29). Torch-free, for the login-node CLI.
"""
from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, fields, is_dataclass
from typing import Any

import yaml

from hpc_mim.config_error import ConfigError

Range = str | tuple[str, str]        # an interval, or (interval, why)

# upper bounds where a larger value would overflow something downstream, or is surely a typo
COUNT_MAX = 2 ** 31 - 1          # sizes, steps and sample counts: int32 indices in torch / FFCV / numba
SEED_MAX = 2 ** 32 - 1           # numpy seeds (np.random.seed, SeedSequence) are uint32 words
MINUTES_MAX = 525_600            # a year: SLURM time limits are uint32 minutes, 0xfffffffe = NO_VAL
SECONDS_MAX = 7 * 86_400         # a week: timeouts handed to timedelta / torch.distributed (ms, int64)
WIDTH_MAX = 1 << 20              # channels, embedding and hidden widths
PIXELS_MAX = 16_384              # image, crop and patch sizes
LAYERS_MAX = 1024                # depths, block indices, heads, tokens per image side
INT64 = (-2 ** 63, 2 ** 63 - 1)

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# a run's folder name under runs_root: as jobs/sweep.py's sweep names, a bounded length, no '..'
_NAME_PART = re.compile(r"[A-Za-z0-9][\w.-]*")
NAME_MAX = 128


@dataclass(frozen=True)
class Interval:
    lo: float
    hi: float
    lo_open: bool
    hi_open: bool
    text: str
    why: str = ""

    def __contains__(self, x: float) -> bool:
        above = x > self.lo if self.lo_open else x >= self.lo
        below = x < self.hi if self.hi_open else x <= self.hi
        return above and below


def parse_interval(text: str, why: str = "") -> Interval:
    """``"(0, 1]"`` -> Interval(0, 1, lo_open=True, hi_open=False); bounds are numbers or inf."""
    m = re.fullmatch(r"([\[(])\s*(-?inf|[-+0-9.e_]+)\s*,\s*(-?inf|[-+0-9.e_]+)\s*([\])])", text.strip())
    if not m:
        raise ValueError(f"range {text!r}: write it as [lo, hi], (lo, hi], ... with numbers or inf")
    return Interval(float(m[2]), float(m[3]), m[1] == "(", m[4] == ")", text.strip(), why)


@functools.cache
def ranges_of(cls: type) -> dict[str, Interval]:
    """The ``RANGES`` tables of ``cls`` and its bases (the subclass's entry wins)."""
    out: dict[str, Interval] = {}
    for klass in reversed(cls.__mro__):
        for name, spec in vars(klass).get("RANGES", {}).items():
            text, why = (spec, "") if isinstance(spec, str) else spec
            out[name] = parse_interval(text, why)
    return out


def _problem(x: float, interval: Interval | None) -> str:
    if isinstance(x, float) and not math.isfinite(x):
        return "is not a finite number"
    if interval is not None and x not in interval:    # an int against float bounds: exact in Python
        return f"must be in {interval.text}" + (f": {interval.why}" if interval.why else "")
    if isinstance(x, int) and not INT64[0] <= x <= INT64[1]:
        return "does not fit a 64-bit integer"
    return ""


def _where(source: str) -> str:
    return f" ({source})" if source else ""


def check_value(cls: type, name: str, value: Any, key: str, source: str = "") -> None:
    """A number (or each number of a list) of field ``name`` of ``cls``: finite, in its range."""
    for item in value if isinstance(value, list) else [value]:
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            continue
        problem = _problem(item, ranges_of(cls).get(name))
        if problem:
            shown = f"{item!r} in {value!r}" if isinstance(value, list) else repr(item)
            raise ConfigError(f"{key}: {shown} {problem}{_where(source)}")


def check_text(value: str, key: str, source: str = "") -> None:
    """No control character (newline, tab, NUL, ESC, DEL, ...) in a config string."""
    bad = _CONTROL.search(value)
    if bad:
        raise ConfigError(f"{key}: {value!r} holds the control character {bad[0]!r}: refused in every "
                          f"config string (a newline would end the #SBATCH block of a job script)"
                          f"{_where(source)}")


def check_tree(obj: Any, prefix: str = "") -> None:
    """``check_value`` / ``check_text`` over every field of a dataclass tree built in code."""
    for f in fields(obj):
        value, key = getattr(obj, f.name), f"{prefix}{f.name}"
        if is_dataclass(value):
            check_tree(value, f"{key}.")
            continue
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str):
                check_text(item, key)
        check_value(type(obj), f.name, value, key)


def check_run_name(name: str, source: str = "") -> None:
    """``name`` as a user gives it (a YAML layer, ``--set``): one folder under runs_root, so no
    '/', no '..', no leading '.' or '-'; letters, digits, '_', '.', '-' (as jobs/sweep.py's sweep
    names) and at most NAME_MAX characters. "" = the default ``<method>-<timestamp>``."""
    ok = bool(_NAME_PART.fullmatch(name)) and ".." not in name and len(name) <= NAME_MAX
    if name and not ok:
        raise ConfigError(f"name: {name!r}: a run name is a folder under runs_root: use letters, digits, '.', "
                          f"'_' and '-', starting with a letter or digit, at most {NAME_MAX} characters, "
                          f"no '/' or '..'{_where(source)}")


def check_saved_run_name(name: str) -> None:
    """``name`` of a run's saved config (``Config.validate``): a sweep cell's is
    ``<sweep>/<cell>`` (jobs/sweep_arrays.py). Only what would leave runs_root is refused (an
    absolute path, an empty, '.' or '..' part, more than two parts), so that a run queued
    before names were checked still resumes and evaluates."""
    pieces = name.split("/")
    ok = len(pieces) <= 2 and all(p not in ("", ".", "..") and len(p) <= 255 for p in pieces)
    if name and not ok:
        raise ConfigError(f"name: {name!r}: a run's folder under runs_root: <name> or <sweep>/<cell>, "
                          "no absolute path, no empty, '.' or '..' part")


def yaml_error(where: str, e: yaml.YAMLError) -> ConfigError:
    """A ConfigError naming the file (or ``--set`` text), line and column of a YAML syntax error."""
    mark = getattr(e, "problem_mark", None)
    at = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    return ConfigError(f"{where}{at}: malformed YAML: {problem}")
