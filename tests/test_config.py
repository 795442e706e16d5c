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
    ("evals=[knn,segmentation_typo]", "evals"),     # unknown evaluation
    ("evals=[knn,linear_probe:nope]", "evals"),      # unknown dataset
    ("evals=[segmentation:fmnist]", "evals"),        # a classification set for segmentation
    ("evals=[knn,knn]", "evals"),                    # the same job twice
    ("eval.segmentation.rescales=[4,3,1,0.5]", "eval.segmentation.rescales"),
    ("eval.detection.anchor_sizes=[8,16]", "eval.detection.anchor_sizes"),
    ("eval.finetune.micro_batch_size=1000", "eval.finetune.batch_size"),
    ("train.zero_bucket_size=0", "train.zero_bucket_size"),
    ("train.zero_bucket_size=5e7", "train.zero_bucket_size"),    # a count of elements: an int
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
    assert parse_override("evals=[knn, linear_probe:cub]") == {"evals": ["knn", "linear_probe:cub"]}
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("train.epochs")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config("mae", "fmnist_tiny", overrides=["train.seed=7"])
    save_config(cfg, tmp_path / "config.yaml")
    assert read_config(tmp_path / "config.yaml").to_dict() == cfg.to_dict()
    assert isinstance(cfg, Config)


def test_zero_overlap_and_bucket_size_reach_deepspeed_from_yaml_and_set(tmp_path):
    from hpc_mim.distributed.deepspeed import ds_config
    default = load_config("mae", "smoke").train
    assert (default.zero_overlap_comm, default.zero_bucket_size) == (True, 25_000_000)
    extra = tmp_path / "zero.yaml"
    extra.write_text("train:\n  zero_stage: 1\n  zero_bucket_size: 40_000_000\n")
    cfg = load_config("mae", "smoke", files=[str(extra)], overrides=["train.zero_overlap_comm=false"])
    save_config(cfg, tmp_path / "config.yaml")
    again = read_config(tmp_path / "config.yaml")
    assert (again.train.zero_overlap_comm, again.train.zero_bucket_size) == (False, 40_000_000)
    zero = ds_config(again.train, world_size=1)["zero_optimization"]
    assert zero["stage"] == 1 and zero["overlap_comm"] is False
    assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == 40_000_000


def test_saved_config_keeps_only_the_chosen_methods_section(tmp_path):
    cfg = load_config("latent_mim", "fmnist_tiny")
    save_config(cfg, tmp_path / "config.yaml")
    method = read_config(tmp_path / "config.yaml").method
    assert method.latent_mim.gap == 1 and method.latent_mim.head_hidden_dim == 512  # from the preset
    assert set(cfg.to_dict()["method"]) >= {"latent_mim"}
    assert not {"lut", "umd", "noised_mim"} & set(cfg.to_dict()["method"])


@pytest.mark.parametrize("method, expected", [
    ("noised_mim", {"method.noised_mim.noise_block": 2, "method.noised_mim.style": "encoder",
                    "method.noised_mim.noise_scale": "rms", "method.noised_mim.noise_max_t": 500,
                    "train.epochs": 400}),
    ("latent_mim", {"method.mask_ratio": 0.898, "method.latent_mim.temperature": 0.2,
                    "method.latent_mim.momentum": 0.99, "method.decoder_depth": 3,
                    "train.min_lr_ratio": 0.25, "train.warmup_from_floor": True,
                    "train.no_weight_decay": ["embed"], "train.epochs": 800}),
    ("lut", {"method.lut.cross_view_weight": 0.25, "method.lut.momentum": 0.996,
             "train.lr_scaling": "sqrt", "train.epochs": 1600}),
    ("umd", {"method.umd.noised_mask_ratio": 0.375, "method.umd.no_noise_prob": 0.5,
             "method.umd.num_cls_tokens": 4, "model.patch_size": 4, "model.img_size": 64,
             "train.clip_grad": 1.0, "train.batch_size": 1024, "method.decoder_dim": 768,
             "data.crop_scale": [0.8, 1.0], "data.normalize": "symmetric", "model.pos_embed": "learned",
             "train.no_weight_decay": ["cls_token", "mask_token"]}),
])
def test_method_recipes_carry_the_papers_settings(method, expected):
    cfg = load_config(method)
    for dotted, value in expected.items():
        node = cfg
        for part in dotted.split("."):
            node = getattr(node, part)
        assert node == value, dotted


def test_lr_scaling_rules():
    cfg = load_config("lut", overrides=["train.batch_size=1024", "train.micro_batch_size=64"])
    assert cfg.train.peak_lr() == pytest.approx(1.5e-4 * 32 / 4)        # blr * sqrt(bs) / 4
    cfg = load_config("latent_mim")
    assert cfg.train.peak_lr() == pytest.approx(1.5e-4 * 16)            # blr * bs / 256
    assert cfg.train.floor_lr() == pytest.approx(0.25 * cfg.train.peak_lr())


@pytest.mark.parametrize("method, override, key", [
    ("noised_mim", "method.noised_mim.noise_block=12", "method.noised_mim.noise_block"),  # depth 12
    ("noised_mim", "method.noised_mim.noise_ratio=0.5", "method.mask_ratio"),  # 0.6 + 0.5 >= 1
    ("noised_mim", "method.noised_mim.style=sideways", "method.noised_mim.style"),
    ("noised_mim", "method.noised_mim.noise_blok=2", "did you mean 'method.noised_mim.noise_block'"),
    ("noised_mim", "method.noised_mim.noise_max_t=1001", "method.noised_mim.noise_max_t"),  # > steps
    ("noised_mim", "method.noised_mim.noise_scale=norm", "method.noised_mim.noise_scale"),
    ("lut", "method.mask_ratio=0.4", "method.mask_ratio"),          # no two disjoint 60% sets
    ("umd", "method.umd.no_noise_prob=1.5", "method.umd.no_noise_prob"),
    ("latent_mim", "train.min_lr=1e-6", "train.min_lr"),            # and min_lr_ratio 0.25
])
def test_method_options_are_validated(method, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(method, overrides=[override])


def test_evals_list_resolves_each_job_and_its_dataset():
    cfg = load_config("mae", "fmnist_tiny", overrides=[
        "evals=[knn, linear_probe, linear_probe:cub, segmentation:ade20k, detection]"])
    assert cfg.eval_jobs() == [("knn", "knn", "fmnist"), ("linear_probe", "linear_probe", "fmnist"),
                               ("linear_probe:cub", "linear_probe", "cub"),
                               ("segmentation:ade20k", "segmentation", "ade20k"),
                               ("detection", "detection", "fmnist_scenes_coco")]   # the preset's
    info = cfg.dataset_info("cub")
    assert info["kind"] == "classification" and info["num_classes"] == 200
    assert info["train"].endswith("data/cub/train.beton")


def test_symmetric_normalisation_gives_pixels_in_minus_one_one_to_training_and_evaluations():
    """UMD's authors train on [-1, 1] pixels: data.normalize=symmetric is that option, and every
    consumer (trainer, evaluations) reads mean/std through Config.dataset_info."""
    cfg = load_config("mae", "smoke", overrides=["data.normalize=symmetric"])
    for name in ("", "fmnist"):
        info = cfg.dataset_info(name)
        assert info["mean"] == [0.5] * 3 and info["std"] == [0.5] * 3
    assert load_config("umd", "smoke").dataset_info()["mean"] == [0.5] * 3      # umd.yaml's
    assert load_config("umd", "smoke", overrides=["data.normalize=dataset"]).dataset_info()["mean"] \
        == [0.2860] * 3
    with pytest.raises(ConfigError, match="data.normalize"):
        load_config("umd", "smoke", overrides=["data.normalize=unit"])


def test_a_preset_builds_on_its_base(tmp_path, monkeypatch):
    compare, tiny = load_config("lut", "compare"), load_config("lut", "fmnist_tiny")
    assert compare.model == tiny.model and compare.data == tiny.data        # from the base
    assert (compare.train.epochs, tiny.train.epochs) == (1, 16)             # its own keys win
    assert compare.evals == ["knn", "linear_probe", "diagnostics"] and compare.eval.baselines == []
    import hpc_mim.config as config
    (tmp_path / "presets").mkdir()
    (tmp_path / "presets" / "a.yaml").write_text("base: b\n")
    (tmp_path / "presets" / "b.yaml").write_text("base: a\n")
    (tmp_path / "presets" / "c.yaml").write_text("base: nope\n")
    monkeypatch.setattr(config, "CONFIG_DIR", tmp_path)
    with pytest.raises(ConfigError, match="base presets form a cycle: a -> b -> a"):
        load_config(preset="a")
    with pytest.raises(ConfigError, match="'nope' \\(base of c\\): no such preset"):
        load_config(preset="c")
