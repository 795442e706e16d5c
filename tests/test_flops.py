"""The analytic FLOP count behind the GPU check's MFU figure equals what torch counts on a real
MAE training step (forward + backward; attention through the math kernel so its products are
visible to the counter)."""
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from hpc_mim.config import load_config
from hpc_mim.methods import build_method
from hpc_mim.models.flops import mae_flops


def test_mae_flops_match_torchs_count_of_a_training_step():
    cfg = load_config("mae", "smoke", overrides=["model.img_size=32", "model.depth=3",
                                                 "method.decoder_depth=2"])
    method = build_method(cfg.model, cfg.method)
    images = torch.randn(4, 3, 32, 32)
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):
        method({"image": images})["loss"].backward()
    expected = mae_flops(cfg.model, cfg.method)
    assert counter.get_total_flops() == 4 * expected["train"]
    assert expected["train"] < 3 * expected["forward"]
