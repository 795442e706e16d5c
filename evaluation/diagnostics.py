"""Representation diagnostics of the pre-trained and the random-init encoder, per layer
(evaluation/representation.py has the measures and their papers).

On a fixed set of validation images (the first ``eval.diagnostics.num_images``, centre crop,
the same for every run), full unmasked input, eval mode: after every block, the mean attention
distance and attention NMI of the block's attention, the high-frequency log-amplitude of the
patch-token maps, the mean pairwise cosine of the patch tokens, and the effective rank (RankMe)
of the mean-pooled patch tokens; linear CKA between every pair of layers; the singular value
spectrum and RankMe of the pooled representation. Each encoder is an MLflow child run
(``diagnostics``, ``diagnostics[random_init]``) with the per-layer values as metrics
``layer/<measure>`` at step = layer (1..depth), ``cka/<j>`` at step i (layer i vs layer j) and
``spectrum`` at step = index; every recipe choice is a param ``recipe.<measure>``. The per-layer
pooled features go to run/evals/diagnostics/<child>.pt, from which evaluation/report.py computes
CKA between methods at the same layer.

    python -m evaluation.diagnostics --run-dir runs/<name> [--set eval.diagnostics.num_images=512]
"""
from __future__ import annotations

import os
from typing import Iterator

import torch

from evaluation import representation as rep
from evaluation.common import EvalContext, child_name, encoder_for, parse_args, run_eval
from hpc_mim.data.ffcv_io import build_loader, iterate
from hpc_mim.models.vit import attention_probs

RECIPE = {
    "images": "the first num_images validation images, centre crop, in file order",
    "attention_distance": "cls row and column dropped, rows renormalised; pixels between patch "
                          "centres; mean over queries and images, then over heads",
    "attention_nmi": "uniform queries, p(k|q) = attention row; I(q;k) / sqrt(H(q) H(k)); mean "
                     "over images, then heads",
    "fourier": "patch tokens as (D, h, w) maps; log |FFT2| mean over images and channels, "
               "fftshift; diagonal: highest frequency minus zero frequency",
    "pairwise_cosine": "patch tokens of one image, all T x T pairs incl. the diagonal, mean over "
                       "images (LatentMIM avg_pairwise_sim)",
    "rankme": "exp entropy of sigma / ||sigma||_1 + 1e-7 (Garrido et al.); per layer on "
              "mean-pooled patch tokens, headline on the pooled representation",
    "cka": "linear, debiased (unbiased HSIC); mean-pooled patch tokens per layer",
    "layers": "block outputs 1..depth before the final norm; the representation after it",
}


@torch.no_grad()
def layer_statistics(encoder: torch.nn.Module, images: torch.Tensor, pooling: str,
                     batch_size: int) -> dict[str, torch.Tensor]:
    """Per-layer measures (depth,) of ``encoder`` on ``images`` (N, C, H, W), plus the per-layer
    mean-pooled patch tokens (depth, N, D) and the pooled representation (N, D)."""
    depth, p, patch = encoder.depth, encoder.num_prefix, encoder.patch_size
    grid = encoder.grid_of(images.shape[-2:])
    dist, nmi, cos = torch.zeros(depth), torch.zeros(depth), torch.zeros(depth)
    spectra = [0.0] * depth
    pooled: list[list[torch.Tensor]] = [[] for _ in range(depth)]
    final = []
    n = images.shape[0]
    for start in range(0, n, batch_size):
        x = images[start:start + batch_size]
        b = x.shape[0]
        c = encoder.condition(x, None)
        tokens = encoder.embed(x)
        for i, block in enumerate(encoder.blocks):
            attn = rep.patch_attention(attention_probs(block, tokens, c), p)     # (b, h, L, L)
            dist[i] += float(rep.attention_distance(attn, grid, patch).mean()) * b
            nmi[i] += float(rep.attention_nmi(attn).mean()) * b
            tokens = block(tokens) if c is None else block(tokens, c)
            patches = tokens[:, p:]                                              # (b, L, D)
            maps = patches.transpose(1, 2).reshape(b, -1, *grid)
            spectra[i] = spectra[i] + rep.log_amplitude_spectrum(maps) * b
            cos[i] += rep.pairwise_cosine(patches) * b
            pooled[i].append(patches.mean(dim=1).float().cpu())
        out = encoder.norm(tokens)
        final.append((out[:, :p].mean(dim=1) if pooling == "cls" else out[:, p:].mean(dim=1)).float().cpu())
    layers = torch.stack([torch.cat(f) for f in pooled])                         # (depth, N, D)
    return {"attn_distance": dist / n, "attn_nmi": nmi / n, "pairwise_cosine": cos / n,
            "fourier_high_freq": torch.tensor([rep.high_freq_from_spectrum(s / n) for s in spectra]),
            "rankme": torch.tensor([rep.rankme(f) for f in layers]),
            "layer_features": layers, "representation": torch.cat(final)}


def diagnose(ctx: EvalContext, baseline: str, images: torch.Tensor) -> dict[str, float]:
    """All measures of one encoder; logged per layer into its child run (rank 0)."""
    encoder = encoder_for(ctx.run, ctx.cfg, baseline).to(ctx.device).eval()
    stats = layer_statistics(encoder, images.to(ctx.device), ctx.section.pooling, ctx.cfg.eval.batch_size)
    layers = stats["layer_features"]
    cka = torch.tensor([[rep.linear_cka(a, b, debiased=True) for b in layers] for a in layers])
    spectrum = rep.singular_spectrum(stats["representation"])
    per_layer = ("attn_distance", "attn_nmi", "fourier_high_freq", "pairwise_cosine", "rankme")
    logger = ctx.loggers.get(baseline)
    if logger is not None:
        logger.log_params({f"recipe.{k}": v for k, v in RECIPE.items()})
        for i in range(encoder.depth):
            logger.log_metrics({f"layer/{k}": float(stats[k][i]) for k in per_layer}, step=i + 1)
            logger.log_metrics({f"cka/{j + 1}": float(cka[i, j]) for j in range(encoder.depth)}, step=i + 1)
        for k, value in enumerate(spectrum.tolist()):
            logger.log_metrics({"spectrum": value}, step=k + 1)
    if ctx.proc.env.is_main:
        folder = ctx.run.evals / "diagnostics"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{child_name(ctx.label, baseline)}.pt"
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        torch.save({"layer_features": layers.half(), "spectrum": spectrum.float(), "cka": cka.float(),
                    **{k: stats[k] for k in per_layer}}, tmp)
        os.replace(tmp, path)
    return {"rankme": rep.rankme(stats["representation"]),
            "attn_distance_mean": float(stats["attn_distance"].mean()),
            "attn_nmi_mean": float(stats["attn_nmi"].mean()),
            "fourier_high_freq_first": float(stats["fourier_high_freq"][0]),
            "pairwise_cosine_last": float(stats["pairwise_cosine"][-1]),
            "cka_first_last": float(cka[0, -1])}


def body(ctx: EvalContext) -> Iterator[tuple[str, dict[str, float]]]:
    if not ctx.baselines:
        return
    s, info, cfg = ctx.section, ctx.info, ctx.cfg
    loader = build_loader(info["val"], cfg.eval.batch_size, cfg.model.img_size, info["mean"],
                          info["std"], train=False, eval_crop_ratio=info.get("eval_crop_ratio", 1.0),
                          num_workers=cfg.data.num_workers, max_samples=s.num_images, device=ctx.device)
    # clone: FFCV recycles its batch buffers
    images = torch.cat([batch["image"].float().clone() for batch in iterate(loader)])
    for baseline in ctx.baselines:
        # every rank computes the same (a few hundred images); rank 0 logs and writes
        yield baseline, diagnose(ctx, baseline, images)


def main(run_dir: str, dataset: str = "", baseline: str | None = None, label: str = "",
         overrides: list[str] = ()) -> dict[str, dict[str, float]]:
    return run_eval(run_dir, "diagnostics", body, dataset, baseline, label, pixels=False,
                    overrides=overrides, always=("random_init",),
                    cacheable=False)     # its per-layer file (evals/diagnostics/) is an output too


if __name__ == "__main__":
    args = parse_args(__doc__)
    main(args.run_dir, args.dataset, args.baseline, overrides=args.set)
