"""eval.finetune.protocol: MAE's recipe (every method compared under it) or LUT's own, to
reproduce LUT's 84.2 (naver-ai/lut: docs/FINETUNE.md, main_finetune.py)."""
import math

import pytest

from hpc_mim.config_error import ConfigError
from hpc_mim.eval_options import FinetuneConfig


def lut_lr(blr: float, eff_batch_size: int) -> float:
    """naver-ai/lut:main_finetune.py: ``args.lr = args.blr * math.sqrt(eff_batch_size) / 8``."""
    return blr * math.sqrt(eff_batch_size) / 8


def mae_lr(blr: float, eff_batch_size: int) -> float:
    """facebookresearch/mae:main_finetune.py: ``args.lr = args.blr * eff_batch_size / 256``."""
    return blr * eff_batch_size / 256


def test_mae_protocol_is_the_default_and_scales_lr_linearly():
    c = FinetuneConfig()
    c.validate()
    assert (c.protocol, c.blr, c.layer_decay) == ("mae", 5e-4, 0.65)
    assert c.peak_lr() == pytest.approx(mae_lr(5e-4, 1024)) == pytest.approx(2e-3)


def test_lut_protocol_takes_luts_blr_layer_decay_and_sqrt_scaling():
    c = FinetuneConfig(protocol="lut")
    c.validate()
    # docs/FINETUNE.md, ViT-B: --blr 1e-3 --layer_decay 0.75, the rest as MAE's
    assert (c.blr, c.layer_decay, c.weight_decay, c.drop_path, c.epochs) == (1e-3, 0.75, 0.05, 0.1, 100)
    assert c.peak_lr() == pytest.approx(lut_lr(1e-3, 1024)) == pytest.approx(4e-3)
    c.validate()                                          # resolving again changes nothing
    assert (c.blr, c.layer_decay) == (1e-3, 0.75)
    mine = FinetuneConfig(protocol="lut", blr=2e-3, batch_size=256)   # a value set stays
    mine.validate()
    assert (mine.blr, mine.layer_decay) == (2e-3, 0.75)
    assert mine.peak_lr() == pytest.approx(lut_lr(2e-3, 256))


def test_unknown_protocol_is_a_config_error():
    with pytest.raises(ConfigError, match="eval.finetune.protocol"):
        FinetuneConfig(protocol="beit").validate()


def test_the_protocol_reaches_the_run_config():
    from hpc_mim.config import load_config
    cfg = load_config("lut", overrides=["eval.finetune.protocol=lut"])
    assert (cfg.eval.finetune.blr, cfg.eval.finetune.layer_decay) == (1e-3, 0.75)
    assert load_config("lut").eval.finetune.protocol == "mae"      # comparisons: one protocol
