"""What a careless or hostile user types reaches no job: control characters, run names that
leave runs_root, malformed YAML, bad --seeds / --set sweep values, and the report's arguments
(issue 29, values). Each is a ConfigError naming the key, value and source, and the CLI says
``error: ...`` and exits 2 before anything is created."""
from __future__ import annotations

import pytest

from hpc_mim import config
from hpc_mim.config import ConfigError, load_config, read_config, save_config
from jobs.sweep import from_cli, load_sweep_file

INJECTED = "gpu\n#SBATCH --x"


def test_a_newline_in_a_set_value_is_refused_before_yaml_folds_it_away():
    # YAML reads 'gpu\n#SBATCH --x' as 'gpu' (the rest is a comment): the raw text is checked
    assert config.yaml_load(INJECTED) == "gpu"
    with pytest.raises(ConfigError, match=r"^cluster\.partition: .*control character '\\n'.*\(--set\)"):
        load_config("mae", overrides=[f"cluster.partition={INJECTED}"])
    for text in ("name=a\x00b", "runs_root=runs\x1b[2J", "data.root=data\tx"):
        with pytest.raises(ConfigError, match="control character"):
            load_config("mae", overrides=[text])


def test_a_control_character_in_a_preset_names_the_preset_file(tmp_path, monkeypatch):
    (tmp_path / "presets").mkdir()
    evil = tmp_path / "presets" / "evil.yaml"
    evil.write_text('cluster:\n  partition: "gpu\\n#SBATCH --x"\n')
    monkeypatch.setattr(config, "CONFIG_DIR", tmp_path)
    with pytest.raises(ConfigError, match=rf"^cluster\.partition: 'gpu\\n#SBATCH --x' .* \({evil}\)"):
        load_config(preset="evil")


@pytest.mark.parametrize("text, key", [
    ("runs_root: |\n  runs\n  #SBATCH --x\n", "runs_root"),            # a block scalar keeps the newline
    ("train:\n  no_weight_decay: [embed, \"bias\\r\"]\n", "train.no_weight_decay"),  # inside a list
    ("tracking:\n  experiment: \"a\\x7fb\"\n", "tracking.experiment"),
])
def test_a_control_character_in_a_config_file_names_the_key_and_file(tmp_path, text, key):
    f = tmp_path / "extra.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=rf"^{key}: .*control character.*\({f}\)"):
        load_config("mae", files=[str(f)])


@pytest.mark.parametrize("old, new, error", [
    ("partition: ''", 'partition: "gpu\\n#SBATCH --x"', r"^cluster\.partition: .*control character"),
    ("max_steps: 0", "max_steps: -5", r"^train\.max_steps: -5 must be in"),
])
def test_a_resumed_config_is_checked_as_a_new_one_naming_the_file(tmp_path, old, new, error):
    """A run's saved config.yaml (read again by every job and by --resume) passes the same
    checks as --set: a control character, a value out of range."""
    path = tmp_path / "config.yaml"
    save_config(load_config("mae", "smoke"), path)
    path.write_text(path.read_text().replace(old, new))
    with pytest.raises(ConfigError, match=rf"{error}.*\({path}\)"):
        read_config(path)


@pytest.mark.parametrize("name", ["zz/../old-run", "/abs/path", "../../x", ".hidden", "a..b",
                                  "x" * 129, "a b", "-rf", "a/b"])
def test_a_run_name_must_be_a_plain_folder_name(name, tmp_path):
    with pytest.raises(ConfigError, match=r"^name: .*no '/' or '\.\.' \(--set name="):
        load_config("mae", overrides=[f"name={name}"])
    f = tmp_path / "named.yaml"
    f.write_text(f"name: '{name}'\n")
    with pytest.raises(ConfigError, match=rf"^name: .*\({f}\)"):
        load_config("mae", files=[str(f)])


def test_plain_names_and_a_sweep_cells_saved_name_are_accepted(tmp_path):
    for name in ("mae-20240101-120000", "run_1.5", "x" * 128):
        assert load_config("mae", overrides=[f"name={name}"]).name == name
    cfg = load_config("mae", "smoke")
    cfg.name = "compare/mae-noise_block0.5-seed0"        # jobs/sweep_arrays.py: <sweep>/<cell>
    save_config(cfg, tmp_path / "config.yaml")
    assert read_config(tmp_path / "config.yaml").name == cfg.name
    cfg.name = "my old run"             # queued before names were checked: still resumes
    save_config(cfg, tmp_path / "config.yaml")
    assert read_config(tmp_path / "config.yaml").name == cfg.name
    for escaping in ("compare/../other", "/abs/run", "a/b/c", "a//b"):
        cfg.name = escaping
        save_config(cfg, tmp_path / "config.yaml")
        with pytest.raises(ConfigError, match=rf"^name: '{escaping}'"):
            read_config(tmp_path / "config.yaml")


def test_method_and_preset_names_cannot_leave_their_folders():
    with pytest.raises(ConfigError, match=r"--method '\.\./presets/smoke'"):
        load_config("../presets/smoke")                  # was loaded as if it were a method file
    with pytest.raises(ConfigError, match=r"--preset '\.\./methods/mae'"):
        load_config("mae", "../methods/mae")


def test_malformed_yaml_names_the_file_and_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("model:\n  depth: 2\n  embed_dim: [64\n")
    with pytest.raises(ConfigError, match=rf"^{f}, line \d+, column \d+: malformed YAML"):
        load_config("mae", files=[str(f)])
    with pytest.raises(ConfigError, match=r"^--set 'train.epochs=\[2', line 1, column 3: malformed YAML"):
        load_config("mae", overrides=["train.epochs=[2"])
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("methods: [mae\nseeds: [0]\n")
    with pytest.raises(ConfigError, match=rf"^{sweep}, line 2, column \d+: malformed YAML"):
        load_sweep_file(sweep)


def test_short_form_sweep_values_and_seeds_are_checked():
    with pytest.raises(ConfigError, match=r"^--set 'k=1,\[2': the value '\[2'.*malformed YAML"):
        from_cli("mae", None, ["k=1,[2"], None, [])
    with pytest.raises(ConfigError, match=r"^--seeds '0,x': 'x' is not an integer"):
        from_cli("mae", "0,x", [], None, [])
    with pytest.raises(ConfigError, match=r"^cluster\.partition: .*control character"):
        from_cli("mae", None, [f"cluster.partition=a,{INJECTED}"], None, [])


@pytest.mark.parametrize("args, expected", [
    (["--set", "model.num_heads=0"], "error: model.num_heads: 0 must be in"),
    (["--set", "model.patch_size=0"], "error: model.patch_size: 0 must be in"),
    (["--set", "method.decoder_heads=0"], "error: method.decoder_heads: 0 must be in"),
    (["--set", "train.max_steps=-5"], "error: train.max_steps: -5 must be in"),
    (["--set", "train.epochs=[2"], "error: --set 'train.epochs=[2', line 1"),
    (["--set", f"cluster.partition={INJECTED}"], "error: cluster.partition:"),
    (["--set", "name=zz/../x"], "error: name: 'zz/../x'"),
    (["--seeds", "0,x"], "error: --seeds '0,x'"),
    (["--set", "train.epochs=1,[2"], "error: --set 'train.epochs=1,[2'"),
])
def test_submit_says_error_and_exits_2_with_nothing_created(args, expected, tmp_path, capsys):
    from jobs import submit
    code = submit.main(["--method", "mae", "--preset", "smoke", "--cluster", "local", "--dry-run",
                        "--set", f"runs_root={tmp_path}", *args])
    err = capsys.readouterr().err
    assert code == 2 and expected in err, err
    assert list(tmp_path.iterdir()) == []


def test_submit_with_a_malformed_sweep_file_exits_2(tmp_path, capsys):
    from jobs import submit
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("methods: [mae\n")
    assert submit.main(["--sweep", str(sweep), "--dry-run"]) == 2
    assert f"error: {sweep}, line 2" in capsys.readouterr().err


@pytest.mark.parametrize("args, expected", [
    (["--rule", "foo"], "--rule 'foo': expected COLUMN=last|best"),
    (["--rule", "knn/top1=max"], "--rule 'knn/top1=max'"),
    (["--html", "{tmp}/missing/report.html"], "--html {tmp}/missing/report.html: the folder {tmp}/missing"),
    (["--md", "{tmp}"], "is a folder"),
    (["--alpha", "nan"], "--alpha nan"),
])
def test_report_arguments_are_usage_errors_before_anything_is_read(args, expected, tmp_path, capsys):
    from evaluation import report
    args = [a.format(tmp=tmp_path) for a in args]
    with pytest.raises(SystemExit) as e:
        report.main(["--run-dir", str(tmp_path / "no-such-run"), "--no-mlflow", *args])
    assert e.value.code == 2
    assert expected.format(tmp=tmp_path) in capsys.readouterr().err
    assert not (tmp_path / "missing").exists()
