"""Every numeric config key has a range, checked where the value is read (issue 29, values).

The walk over every field of every section is the guard: a new numeric field without an entry
in its class's ``RANGES`` table fails ``test_every_numeric_field_has_a_range_and_refuses_nan``.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from pathlib import Path

import pytest

from hpc_mim.config import CONFIG_DIR, Config, ConfigError, load_config
from hpc_mim.config_checks import check_tree, parse_interval, ranges_of


def numeric_fields(cls: type = Config, prefix: str = "") -> list[tuple[type, str, str, type, bool]]:
    """(section class, field, dotted key, int | float, is a list) of every numeric field."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            out += numeric_fields(tp, f"{key}.")
            continue
        is_list = typing.get_origin(tp) is list
        item = typing.get_args(tp)[0] if is_list else tp
        if item in (int, float):
            out.append((cls, f.name, key, item, is_list))
    return out


FIELDS = numeric_fields()


def test_the_walk_sees_every_section():
    keys = {key for _, _, key, _, _ in FIELDS}
    assert len(FIELDS) > 150
    assert {"model.mlp_ratio", "method.umd.num_cls_tokens", "eval.detection.proposals_test",
            "eval.finetune.nodes", "cluster.time_min", "train.betas"} <= keys


@pytest.mark.parametrize("cls, name, key, tp, is_list", FIELDS, ids=[f[2] for f in FIELDS])
def test_every_numeric_field_has_a_range_and_refuses_nan(cls, name, key, tp, is_list):
    assert name in ranges_of(cls), f"{key}: add its range to {cls.__name__}.RANGES"
    wrap = "[{}]" if is_list else "{}"
    beyond_int64 = (str(2 ** 63),) if tp is int else ()
    for bad in (".nan", ".inf", *beyond_int64):          # never a value of any key
        with pytest.raises(ConfigError) as e:
            load_config(overrides=[f"{key}={wrap.format(bad)}"])
        assert str(e.value).startswith(f"{key}: ") and "(--set" in str(e.value), str(e.value)


def test_every_default_is_in_its_range():
    check_tree(Config())                 # raises ConfigError naming the first key out of range


@pytest.mark.parametrize("override, key", [
    # raw tracebacks before (ZeroDivisionError: a modulo before the range check)
    ("model.num_heads=0", "model.num_heads"),
    ("model.patch_size=0", "model.patch_size"),
    ("method.decoder_heads=0", "method.decoder_heads"),
    # accepted before, then wrong or failing inside the job
    ("train.max_steps=-5", "train.max_steps"),          # trained zero steps, exported as COMPLETED
    ("train.log_every=0", "train.log_every"),           # step % 0 at step 1
    ("model.mlp_ratio=.nan", "model.mlp_ratio"),
    ("train.betas=[.nan,2]", "train.betas"),
    ("method.decoder_dim=-512", "method.decoder_dim"),  # -512 % 16 == 0 passed the old check
    ("model.drop_path=-3", "model.drop_path"),
    ("eval.knn.ks=[0,-1]", "eval.knn.ks"),
    ("eval.knn.temperature=0", "eval.knn.temperature"),
    (f"cluster.time_min={10 ** 20}", "cluster.time_min"),
    ("train.seed=-1", "train.seed"),                    # numpy refuses negative seeds in the job
    (f"train.seed={2 ** 32}", "train.seed"),
    ("eval.knn.ks=[]", "eval.knn.ks"),                  # IndexError in evaluation/knn.py
    ("method.latent_mim.sim_target=[2,0]", "method.latent_mim.sim_target"),  # a cosine > 1
    (f"model.mlp_ratio={10 ** 400}", "model.mlp_ratio"),  # float() of it: OverflowError
])
def test_values_from_issue_29_are_refused_naming_key_value_and_source(override, key):
    with pytest.raises(ConfigError) as e:
        load_config("mae", overrides=[override])
    msg = str(e.value)
    assert msg.startswith(f"{key}: ") and (f"(--set {override})" in msg or key == "eval.knn.ks"), msg


def test_range_errors_keep_the_reason_and_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"method\.mask_ratio: 1\.0 must be in \[0, 1\): at least one patch"):
        load_config("mae", overrides=["method.mask_ratio=1.0"])
    extra = tmp_path / "extra.yaml"
    extra.write_text("train:\n  log_every: 0\n")
    with pytest.raises(ConfigError, match=rf"train\.log_every: 0 must be in \[1, \d+\] \({extra}\)"):
        load_config("mae", files=[str(extra)])


def test_a_config_changed_in_code_is_range_checked_before_any_division():
    for section, key in (("model", "num_heads"), ("model", "patch_size"), ("method", "decoder_heads")):
        cfg = load_config("mae", "smoke")
        setattr(getattr(cfg, section), key, 0)
        with pytest.raises(ConfigError, match=rf"^{section}\.{key}: 0 must be in"):
            cfg.validate()                           # was ZeroDivisionError
    cfg = load_config("mae", "smoke")
    cfg.train.blr = math.nan
    with pytest.raises(ConfigError, match=r"^train\.blr: nan is not a finite number"):
        cfg.validate()                               # nan > 0 is False, but so is nan <= 0


def test_interval_notation():
    half_open = parse_interval("[0, 1)")
    assert 0 in half_open and 0.999 in half_open and 1 not in half_open and -1e-9 not in half_open
    assert not half_open.__contains__(math.nan)          # NaN fails every comparison
    assert 5 in parse_interval("(0, inf)") and 0 not in parse_interval("(0, inf)")
    assert -1 in parse_interval("[-1, 1024]") and 1025 not in parse_interval("[-1, 1024]")
    with pytest.raises(ValueError):
        parse_interval("0..1")


METHODS = sorted(p.stem for p in (CONFIG_DIR / "methods").glob("*.yaml"))
PRESETS = [None, *sorted(p.stem for p in (CONFIG_DIR / "presets").glob("*.yaml"))]


@pytest.mark.parametrize("preset", PRESETS)
def test_every_method_and_preset_loads_within_the_ranges(preset):
    for method in METHODS:
        cfg = load_config(method, preset)
        assert cfg.method.name == method


@pytest.mark.parametrize("sweep", sorted((CONFIG_DIR / "sweeps").glob("*.yaml")), ids=lambda p: Path(p).stem)
def test_every_cell_of_every_sweep_file_loads(sweep):
    from jobs.sweep import enumerate_cells, load_sweep_file
    spec = load_sweep_file(sweep)
    for cell in enumerate_cells(spec):
        load_config(cell.method, spec.preset, spec.config, [*spec.set, *cell.overrides()])
