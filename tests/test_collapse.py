"""Pre-training's collapse curves (hpc_mim/train/collapse.py) against the diagnostics'
definitions, on a collapsed encoder, and on a compiled one (the points of a real run in MLflow:
tests/test_checkpoint.py)."""
import pytest
import torch

import evaluation.representation as rep
from evaluation.diagnostics import layer_statistics
from hpc_mim.config import load_config
from hpc_mim.methods import build_method
from hpc_mim.train.collapse import collapse_measures


@pytest.mark.parametrize("method", ["mae", "umd"])        # a plain ViT; AdaLN with 4 cls tokens
def test_the_curves_measure_what_the_diagnostics_report_at_the_end(method):
    cfg = load_config(method, "smoke")
    torch.manual_seed(0)
    encoder = build_method(cfg.model, cfg.method).encoder.train()
    images = torch.randn(20, 3, 28, 28)
    got = collapse_measures(encoder, images, batch_size=7)
    assert encoder.training                                  # put back as it was
    stats = layer_statistics(encoder.eval(), images, "mean", 7)
    assert got["rankme"] == pytest.approx(rep.rankme(stats["representation"]), rel=1e-6)
    assert got["pairwise_cosine"] == pytest.approx(float(stats["pairwise_cosine"][-1]), rel=1e-6)


def test_a_collapsed_encoder_reads_rank_one_and_cosine_one():
    """Every patch token the same vector for every image: no direction left to tell them apart."""
    cfg = load_config("mae", "smoke")
    encoder = build_method(cfg.model, cfg.method).encoder
    with torch.no_grad():
        for p in [*encoder.parameters(), *encoder.buffers()]:      # the sin-cos table too
            p.zero_()
        encoder.norm.bias.fill_(1.0)         # the normed tokens: the bias alone, for every token
        encoder.blocks[-1].mlp.fc2.bias.copy_(torch.linspace(-1, 1, encoder.embed_dim))
    got = collapse_measures(encoder, torch.randn(16, 3, 28, 28), batch_size=16)
    assert got["pairwise_cosine"] == pytest.approx(1.0)
    assert got["rankme"] == pytest.approx(1.0, abs=1e-3)


def test_a_compiled_encoder_is_measured_eagerly_without_compiling_anything():
    """train.compile compiles the encoder; the measures (eval mode, a hook on the final norm)
    must not make dynamo compile, let alone recompile at every log point."""
    from torch._dynamo.utils import counters
    cfg = load_config("mae", "smoke")
    torch.manual_seed(0)
    encoder = build_method(cfg.model, cfg.method).encoder
    images = torch.randn(8, 3, 28, 28)
    eager = collapse_measures(encoder, images, batch_size=8)
    encoder.compile()
    torch._dynamo.reset()
    counters.clear()
    for _ in range(3):
        assert collapse_measures(encoder, images, batch_size=8) == pytest.approx(eager)
    assert counters["stats"]["calls_captured"] == 0 and not counters["frames"], dict(counters)


def test_a_diverged_encoder_reads_nan_instead_of_ending_the_job():
    """train.blr=1e30 (tests/test_pipeline.py's NaN run): at the log step before the loss turns
    non-finite the features already overflow; the SVD raised and the job ended with the wrong
    error, before the loop's NaN check could name the step."""
    cfg = load_config("mae", "smoke")
    encoder = build_method(cfg.model, cfg.method).encoder
    with torch.no_grad():
        encoder.patch_embed.proj.weight.fill_(float("inf"))
    got = collapse_measures(encoder, torch.randn(8, 3, 28, 28), batch_size=8)
    assert got["rankme"] != got["rankme"] and got["pairwise_cosine"] != got["pairwise_cosine"]  # nan
