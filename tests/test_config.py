import pytest

from hpc_mim.config import (Config, ConfigError, load_config, parse_override, read_config,
                            save_config)


def test_method_and_preset_layers_compose():
    cfg = load_config("mae", "smoke", overrides=["train.epochs=3", "model.depth=1"])
    assert cfg.method.name == "mae" and cfg.method.mask_ratio == 0.75      # from methods/mae.yaml
    assert cfg.model.img_size == 28 and cfg.model.embed_dim == 32          # from presets/smoke.yaml
    assert cfg.train.epochs == 3 and cfg.model.depth == 1                  # from --set


def test_paper_defaults_for_vit_b():
    cfg = load_config("mae")
    assert (cfg.model.embed_dim, cfg.model.depth, cfg.model.patch_size) == (768, 12, 16)
    assert (cfg.method.decoder_dim, cfg.method.decoder_depth, cfg.method.decoder_heads) == (512, 8, 16)
    assert cfg.train.blr == 1.5e-4 and cfg.train.batch_size == 4096 and cfg.train.betas == [0.9, 0.95]


def test_unknown_key_names_key_source_and_suggestion():
    with pytest.raises(ConfigError) as e:
        load_config("mae", overrides=["train.epochz=5"])
    msg = str(e.value)
    assert "train.epochz" in msg and "--set train.epochz=5" in msg and "train.epochs" in msg


def test_unknown_key_in_yaml_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  embed_dimm: 64\n")
    with pytest.raises(ConfigError, match=r"model\.embed_dimm.*bad\.yaml.*did you mean 'model\.embed_dim'"):
        load_config("mae", files=[str(bad)])


@pytest.mark.parametrize("override, key", [
    ("train.epochs=five", "train.epochs"),          # wrong type
    ("method.mask_ratio=1.0", "method.mask_ratio"),  # impossible: nothing visible
    ("train.micro_batch_size=48", "train.batch_size"),  # 4096 % 48 != 0
    ("model.img_size=225", "model.img_size"),        # not a multiple of the patch size
    ("train.precision=fp16", "train.precision"),
    ("data.dataset=nope", "data.dataset"),
    ("eval.run=[knn,segmentation_typo]", "eval.run"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("mae", overrides=[override])


def test_batch_must_divide_over_world_size():
    with pytest.raises(ConfigError, match="world size"):
        load_config("mae", "smoke", overrides=["cluster.nodes=3"])   # 64 / (32 x 3)


def test_unknown_method_and_preset_list_choices():
    with pytest.raises(ConfigError, match="mae"):
        load_config("maee")
    with pytest.raises(ConfigError, match="smoke"):
        load_config("mae", "nope")


def test_override_parsing():
    assert parse_override("a.b.c=1e-3") == {"a": {"b": {"c": 1e-3}}}
    assert parse_override("eval.run=[knn]") == {"eval": {"run": ["knn"]}}
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("train.epochs")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config("mae", "fmnist_tiny", overrides=["train.seed=7"])
    save_config(cfg, tmp_path / "config.yaml")
    assert read_config(tmp_path / "config.yaml") == cfg
    assert isinstance(cfg, Config)
