"""The claims file (hpc_mim/claims.py) and the sweep of its arms (jobs/sweep.py): the shipped
file is coherent with the claims preset, and every mistake is an error naming the claim or arm
and the key."""
import textwrap
from pathlib import Path

import pytest
import yaml

from hpc_mim.claims import load_claims, parse_metric
from hpc_mim.config import ConfigError, load_config
from jobs.sweep import enumerate_cells, load_sweep_file

REPO = Path(__file__).resolve().parent.parent
GOOD_ARMS = {"mae": {"method": "mae"}, "lut": {"method": "lut"},
             "mae-high_mask": {"method": "mae", "set": ["method.mask_ratio=0.9"]}}
GOOD_CLAIM = {"id": "lut.probe", "paper": "LUT", "sentence": "LUT beats MAE", "treatment": "lut",
              "control": "mae", "metric": "linear_probe/top1", "direction": "higher", "min_effect": 1.0}


def write(tmp_path: Path, arms=None, claims=None, text: str | None = None) -> Path:
    path = tmp_path / "claims.yaml"
    path.write_text(text if text is not None else
                    yaml.safe_dump({"arms": arms or GOOD_ARMS, "claims": claims or [GOOD_CLAIM]}, sort_keys=False))
    return path


def test_the_shipped_claims_cover_the_issue_and_the_preset_runs_what_they_read():
    claims = load_claims(REPO / "configs" / "claims.yaml")
    ids = {c.id for c in claims.claims}
    assert {"noised_mim.feature_noise", "noised_mim.disruption_loss", "latent_mim.momentum_target.cosine",
            "latent_mim.momentum_target.knn", "latent_mim.sim_reg", "lut.discriminative",
            "lut.attention_span", "lut.spectrum", "umd.mixed_vs_clean", "umd.mixed_vs_noise"} <= ids
    assert [a.name for a in claims.used_arms()] == list(claims.arms)      # no arm left unused
    for arm in claims.arms.values():                                      # the preset's depth etc.
        cfg = load_config(arm.method, "claims", overrides=list(arm.set))
        for claim in claims.claims:
            if arm.name in (claim.treatment, claim.control):
                assert claim.metric.job in cfg.evals, (claim.id, claim.metric.job)
    assert load_config("noised_mim", "claims").method.noised_mim.noise_block == 2
    for claim in claims.claims:
        assert claim.sentence and claim.paper and claim.min_effect > 0


def test_metrics_final_or_at_a_layer():
    m = parse_metric("diagnostics/layer/pairwise_cosine@last", "f")
    assert (m.job, m.key, m.layer) == ("diagnostics", "layer/pairwise_cosine", "last")
    assert parse_metric("diagnostics/layer/rankme@3", "f").layer == 3
    assert parse_metric("knn/top1", "f").layer is None
    for bad in ("top1", "knn/", "diagnostics/layer/rankme@0", "diagnostics/layer/rankme@first"):
        with pytest.raises(ConfigError, match="metric"):
            parse_metric(bad, "f")


@pytest.mark.parametrize("change, message", [
    ({"colour": "red"}, r"claim lut.probe: unknown key 'colour'"),
    ({"metric": None}, r"claim lut.probe: metric must be a str, got None"),
    ({"treatment": "lut_v2"}, r"claim lut.probe: treatment 'lut_v2' is not an arm; arms: \['lut', 'mae', "),
    ({"control": "lut"}, r"claim lut.probe: treatment and control are both 'lut'"),
    ({"direction": "up"}, r"claim lut.probe: direction 'up': choose higher or lower"),
    ({"min_effect": -1}, r"claim lut.probe: min_effect -1 must be >= 0"),
    ({"min_effect": True}, r"claim lut.probe: min_effect must be a number, got True"),
    ({"metric": "linear probe"}, r"claim lut.probe: metric 'linear probe': write <job>/<metric>"),
    ({"sentence": "a\x1b[2Jb"}, r"claim lut.probe: sentence: .* control character"),
    ({"id": "../x"}, r"claims\[0\]: id '../x'"),
])
def test_a_claim_error_names_the_file_the_claim_and_the_key(tmp_path, change, message):
    path = write(tmp_path, claims=[{**GOOD_CLAIM, **change}])
    with pytest.raises(ConfigError, match=message) as e:
        load_claims(path)
    assert str(path) in str(e.value)


def test_missing_keys_duplicate_ids_and_bad_arms_are_named(tmp_path):
    claim = {k: v for k, v in GOOD_CLAIM.items() if k != "min_effect"}
    with pytest.raises(ConfigError, match="claim lut.probe: missing key 'min_effect'"):
        load_claims(write(tmp_path, claims=[claim]))
    with pytest.raises(ConfigError, match="claim lut.probe: the id is used twice"):
        load_claims(write(tmp_path, claims=[GOOD_CLAIM, GOOD_CLAIM]))
    arms = {**GOOD_ARMS, "mae-typo": {"method": "mae", "set": ["method.mask_ratoi=0.9"]}}
    with pytest.raises(ConfigError, match=r"arm mae-typo: .*mask_ratoi"):
        load_claims(write(tmp_path, arms=arms))
    arms = {**GOOD_ARMS, "mae-bad": {"method": "mae", "set": ["method.mask_ratio=1.5"]}}
    with pytest.raises(ConfigError, match=r"arm mae-bad: .*mask_ratio"):
        load_claims(write(tmp_path, arms=arms))
    with pytest.raises(ConfigError, match=r"arm name 'x/y': letters"):
        load_claims(write(tmp_path, arms={**GOOD_ARMS, "x/y": {"method": "mae"}}))
    with pytest.raises(ConfigError, match=r"arm nope: .*no configs/methods/dino.yaml"):
        load_claims(write(tmp_path, arms={**GOOD_ARMS, "nope": {"method": "dino"}}))
    with pytest.raises(ConfigError, match=r"claims.yaml, line 3, column 7: malformed YAML"):
        load_claims(write(tmp_path, text="arms:\n  mae: {method: mae\nclaims: []\n"))
    with pytest.raises(ConfigError, match="no such file"):
        load_claims(tmp_path / "nothing.yaml")


def test_a_claims_sweep_runs_every_used_arm_with_each_seed_seed_major(tmp_path):
    claims = write(tmp_path, claims=[GOOD_CLAIM, {**GOOD_CLAIM, "id": "mask", "treatment": "mae-high_mask"}])
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(textwrap.dedent(f"""\
        name: claims-test
        claims: {claims}
        seeds: [0, 1]
        preset: smoke
    """))
    spec = load_sweep_file(sweep)
    cells = enumerate_cells(spec)
    assert [c.id for c in cells] == ["mae-seed0", "lut-seed0", "mae-high_mask-seed0",
                                     "mae-seed1", "lut-seed1", "mae-high_mask-seed1"]
    high = cells[2]
    assert (high.method, high.overrides()) == ("mae", ["method.mask_ratio=0.9", "train.seed=0"])
    assert spec.methods == ["mae", "lut"]
    sweep.write_text(f"name: x\nmethods: [mae]\nclaims: {claims}\n")
    with pytest.raises(ConfigError, match="give methods or claims, not both"):
        load_sweep_file(sweep)
    sweep.write_text("name: x\nclaims: configs/nothing.yaml\n")
    with pytest.raises(ConfigError, match="claims file .*nothing.yaml: no such file"):
        load_sweep_file(sweep)


def test_the_shipped_claims_sweep_has_33_cells_with_three_seeds():
    spec = load_sweep_file(REPO / "configs" / "sweeps" / "claims.yaml")
    cells = enumerate_cells(spec)
    assert len(cells) == 33 and sorted({c.seed for c in cells}) == [0, 1, 2]
    assert spec.preset == "claims"
