"""The encoder in timm's format (hpc_mim/export.py, hpc_mim/models/timm_format.py, jobs/export.py):
every method's paper architecture exported from a run directory, loaded by timm itself, and the
same features as the project's encoder. (Pre-training writing it and logging it to MLflow:
tests/test_pipeline.py, for every method after a real pre-training.)"""
import json
import re
import socket
import stat
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from conftest import REPO
from hpc_mim.config import load_config, save_config
from hpc_mim.methods import REGISTRY, build_method
from hpc_mim.models.vit import ViTEncoder, save_encoder
from jobs import export

PLAIN = ("mae", "noised_mim", "latent_mim", "lut")           # their encoder is a plain timm ViT
TOL = 1e-5


def perturbed(encoder: ViTEncoder, seed: int = 0) -> ViTEncoder:
    """Every parameter moved off its init (UMD's AdaLN modulation starts at zero, which would make
    every block the identity and the test blind to how the gates are mapped)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return encoder.eval()


def make_run(tmp_path, method: str, encoder: ViTEncoder | None = None):
    """A run directory as pre-training leaves it: config.yaml, tracking.json, encoder.pt."""
    cfg = load_config(method)
    run = tmp_path / method
    run.mkdir()
    save_config(cfg, run / "config.yaml")
    encoder = encoder or perturbed(build_method(cfg.model, cfg.method).encoder)
    save_encoder(encoder, run / "encoder.pt", trained={"steps": 7, "epochs": 0.5})
    (run / "tracking.json").write_text(json.dumps({"provenance": {
        "git_commit": "abc123", "git_dirty": "false", "datasets": {cfg.data.dataset: "f" * 64}}}))
    return cfg, run, encoder


def images(encoder: ViTEncoder, n: int = 2) -> torch.Tensor:
    size = encoder.config["img_size"]
    return torch.randn(n, encoder.config["in_chans"], size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("method", PLAIN)
def test_paper_vit_loads_in_timm_by_its_registered_name(tmp_path, capsys, method):
    cfg, run, encoder = make_run(tmp_path, method)
    assert export.main(["--run-dir", str(run), "--format", "timm"]) == 0
    out = run / "timm"
    assert f"wrote {out / 'model.safetensors'}" in capsys.readouterr().out
    meta = json.loads((out / "config.json").read_text())
    assert meta["architecture"] == "vit_base_patch16_224"             # the papers' ViT-B/16 at 224
    info = cfg.dataset_info()
    assert meta["pretrained_cfg"]["mean"] == info["mean"] and meta["pretrained_cfg"]["std"] == info["std"]
    assert meta["pretrained_cfg"]["input_size"] == [3, 224, 224]
    assert meta["hpc_mim"] | {"run": None} == {
        "method": method, "run": None, "pretrain_epochs": cfg.train.epochs, "trained_steps": 7,
        "trained_epochs": 0.5, "dataset": "imagenet", "dataset_sha256": "f" * 64, "git_commit": "abc123",
        "git_dirty": "false", "global_feature": "forward(x): the cls token", "timestep": "none"}

    # the call, as a user of timm writes it
    file = out / "model.safetensors"
    model = timm.create_model(meta["architecture"], pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(file)), num_classes=0).eval()
    # timm loads non-strictly here (num_classes 0 vs its registered 1000), so the keys are compared
    # here: nothing missing, nothing unexpected, every tensor the file's
    saved, loaded = load_file(file), model.state_dict()
    assert sorted(saved) == sorted(loaded)
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    x = images(encoder)
    with torch.no_grad():
        ours, theirs = encoder(x), model.forward_features(x)                       # (2, 197, 768)
        assert theirs.shape == ours.shape == (2, 197, 768)
        assert (theirs - ours).abs().max() <= TOL
        assert (model(x) - encoder.pooled(x, "cls")).abs().max() <= TOL             # (2, 768)
    for f in out.iterdir():                       # the run's umask: the owner's only (0600)
        assert stat.S_IMODE(f.stat().st_mode) & 0o077 == 0, f


def test_umd_loads_through_its_config_with_adaln_folded_at_t0(tmp_path):
    cfg, run, encoder = make_run(tmp_path, "umd")
    gates = torch.cat([b.modulation(encoder.t_embed(torch.zeros(1, dtype=torch.long)))[0].chunk(6)[2]
                       for b in encoder.blocks])
    assert gates.abs().mean() > 1e-3                        # not the zero init: the gates matter
    assert export.main(["--run-dir", str(run)]) == 0
    meta = json.loads((run / "timm" / "config.json").read_text())
    assert meta["model_args"]["reg_tokens"] == 3 and meta["model_args"]["no_embed_class"] is True
    assert meta["pretrained_cfg"]["mean"] == [0.5] * 3                  # UMD's [-1, 1] pixels
    assert meta["hpc_mim"]["timestep"] == "t = 0 folded into the blocks"
    model = timm.create_model(f"local-dir:{run / 'timm'}", pretrained=True, num_classes=0).eval()
    assert sorted(load_file(run / "timm" / "model.safetensors")) == sorted(model.state_dict())
    x = images(encoder)
    with torch.no_grad():
        ours, theirs = encoder(x), model.forward_features(x)                 # (2, 4 + 256, 768)
        assert theirs.shape == ours.shape == (2, 260, 768)
        assert (theirs - ours).abs().max() <= TOL
        pooled = theirs[:, :4].mean(1)                   # what the config's global_feature says
        assert (pooled - encoder.pooled(x, "cls")).abs().max() <= TOL
    assert meta["hpc_mim"]["global_feature"] == "forward_features(x)[:, :4].mean(1)"


def test_any_shape_loads_from_its_folder_and_the_readme_line_works_as_written(tmp_path, monkeypatch):
    """A shape timm does not register (the demo's 28 px, patch 4, width 128 ViT) is built from the
    config's model_args; the README's one line is executed as it is printed there."""
    encoder = perturbed(ViTEncoder(img_size=28, patch_size=4, embed_dim=128, depth=6, num_heads=4))
    _, run, _ = make_run(tmp_path, "mae", encoder)
    assert export.main(["--run-dir", str(run)]) == 0
    readme = (REPO / "README.md").read_text()
    (line,) = [ln for ln in readme.splitlines() if "timm.create_model(" in ln and "local-dir:" in ln]
    assert re.search(r'"local-dir:runs/<run>/timm"', line), line
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "<run>").symlink_to(run)                                 # the line's path, literally
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec("import timm\n" + line.strip(), scope)
    model = next(v for v in scope.values() if isinstance(v, torch.nn.Module)).eval()
    x = images(encoder)
    with torch.no_grad():
        assert (model.forward_features(x) - encoder(x)).abs().max() <= TOL
        assert (model(x) - encoder.pooled(x, "cls")).abs().max() <= TOL


def test_export_refuses_what_is_not_a_finished_run(tmp_path, capsys):
    assert export.main(["--run-dir", str(tmp_path)]) == 2
    assert f"--run-dir {tmp_path}: no config.yaml" in capsys.readouterr().err
    _, run, _ = make_run(tmp_path, "mae", ViTEncoder(img_size=28, patch_size=4, embed_dim=32, depth=1,
                                                     num_heads=2))
    (run / "encoder.pt").unlink()
    assert export.main(["--run-dir", str(run)]) == 2
    assert "no encoder.pt" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        export.main(["--run-dir", str(run), "--format", "onnx"])
    assert e.value.code == 2


def test_every_method_is_covered():
    assert set(PLAIN) | {"umd"} == set(REGISTRY)


def test_a_new_export_replaces_the_folder_whole_and_clears_what_a_killed_one_left(tmp_path):
    encoder = ViTEncoder(img_size=28, patch_size=4, embed_dim=32, depth=1, num_heads=2)
    _, run, _ = make_run(tmp_path, "mae", encoder)
    assert export.main(["--run-dir", str(run)]) == 0
    (run / "timm" / "stray.txt").write_text("not part of an export")
    dead = run / f".timm.tmp-{socket.gethostname()}-{dead_pid()}"     # killed mid-export
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"partial")
    save_encoder(perturbed(encoder, seed=5), run / "encoder.pt", trained={"steps": 9, "epochs": 1.0})
    assert export.main(["--run-dir", str(run)]) == 0
    assert sorted(p.name for p in (run / "timm").iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((run / "timm" / "config.json").read_text())["hpc_mim"]["trained_steps"] == 9
    assert not dead.exists() and not [p for p in run.iterdir() if p.name.startswith(".timm")]


def dead_pid() -> int:
    """A pid no process on this host has or can have (pids stay below the kernel's pid_max):
    a finished child's pid could be handed out again meanwhile."""
    return int(Path("/proc/sys/kernel/pid_max").read_text())
