"""The report's figures as inline SVG data URIs (no files, nothing fetched): training curves
and evaluation curves (each seed interpolated onto a common step grid, mean line and a +-std
band, one colour per row), the diagnostics per layer, the singular value spectrum, and CKA
between each method and the baseline at every layer.
"""
from __future__ import annotations

import base64
import io
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from evaluation.report_data import Curve, RunResult  # noqa: E402
from evaluation.representation import linear_cka  # noqa: E402

MEASURES = {"layer/attn_distance": "mean attention distance (px)", "layer/attn_nmi": "attention NMI",
            "layer/fourier_high_freq": "Δ log amplitude, highest freq.",
            "layer/pairwise_cosine": "patch-token pairwise cosine", "layer/rankme": "RankMe of pooled tokens"}


MARKERS_UP_TO = 30             # curves of at most this many points are drawn with markers


def data_uri(fig: plt.Figure) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    return "data:image/svg+xml;base64," + base64.b64encode(buf.getvalue().encode()).decode()


def common_grid(curves: list[Curve], points: int = 200) -> tuple[np.ndarray, np.ndarray] | None:
    """Seeds on one step grid (their common range): (grid, values (seeds, points))."""
    curves = [c for c in curves if len(c[0])]
    if not curves:
        return None
    lo, hi = max(c[0].min() for c in curves), min(c[0].max() for c in curves)
    if hi < lo:
        return None
    grid = np.unique(np.concatenate([c[0] for c in curves]))
    grid = grid[(grid >= lo) & (grid <= hi)]
    if len(grid) > points:
        grid = np.linspace(lo, hi, points)
    return grid, np.stack([np.interp(grid, s, v) for s, v in curves])


def band(ax: plt.Axes, curves: list[Curve], label: str, color: Any, style: str = "-") -> None:
    grid = common_grid(curves)
    if grid is None:
        return
    x, ys = grid
    mean = ys.mean(axis=0)
    # markers where the points are few: a curve logged once (detection's val/* at its last step)
    # is a single point, which a line alone does not draw
    marker = "o" if len(x) <= MARKERS_UP_TO else None
    ax.plot(x, mean, style, color=color, label=f"{label} (n={len(ys)})", lw=1.4, marker=marker, ms=4)
    if len(ys) > 1:
        std = ys.std(axis=0, ddof=1)
        if len(x) == 1:         # a band of one point has no width: an error bar instead
            ax.errorbar(x, mean, yerr=std, color=color, capsize=3, lw=1)
        else:
            ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.2, lw=0)


def colours(groups: list[str]) -> dict[str, Any]:
    cmap = plt.get_cmap("tab10")
    return {g: cmap(i % 10) for i, g in enumerate(groups)}


def curve_figures(rows: list[Any]) -> list[tuple[str, str]]:
    """(title, data URI) per curve key found in any run: train/* then <job>/val/*."""
    keys = sorted({k for row in rows for r in row.cells for k in r.curves},
                  key=lambda k: (not k.startswith("train/loss"), not k.startswith("train/"),
                                 not k.startswith("pretrain/"), k))
    colour = colours([row.group for row in rows])
    out = []
    for key in keys:
        fig, ax = plt.subplots(figsize=(6.4, 3.4))
        for row in rows:
            band(ax, [r.curves[key] for r in row.cells if key in r.curves], row.group, colour[row.group])
        ax.set_xlabel("optimizer step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))      # steps, also around one point
        ax.set_ylabel(key)
        if key == "train/lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax.set_title(f"{key}: mean ± std over seeds", fontsize=9)
        out.append((key, data_uri(fig)))
    return out


def diagnostics_figure(rows: list[Any]) -> str | None:
    """One panel per measure, layer on x; solid: pre-trained, dashed: random init."""
    if not any(r.layers for row in rows for r in row.cells):
        return None
    colour = colours([row.group for row in rows])
    fig, axes = plt.subplots(1, len(MEASURES), figsize=(4.0 * len(MEASURES), 3.4))
    for ax, (key, title) in zip(axes, MEASURES.items()):
        for row in rows:
            for encoder, style in (("pretrained", "-"), ("random_init", "--")):
                curves = [r.layers[encoder][key] for r in row.cells if key in r.layers.get(encoder, {})]
                label = row.group if encoder == "pretrained" else f"{row.group} random init"
                band(ax, curves, label, colour[row.group], style)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("layer (block)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6)
    return data_uri(fig)


def spectrum_figure(rows: list[Any]) -> str | None:
    colour = colours([row.group for row in rows])
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    drawn = False
    for row in rows:
        spectra = [torch.load(r.diagnostics["pretrained"], weights_only=True)["spectrum"].numpy()
                   for r in row.cells if "pretrained" in r.diagnostics]
        if spectra:
            band(ax, [(np.arange(1, len(s) + 1, dtype=np.float64), np.log10(s + 1e-12)) for s in spectra],
                 row.group, colour[row.group])
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("singular value index")
    ax.set_ylabel("log10 σ / Σσ")
    ax.set_title("singular value spectrum of the pooled representation", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return data_uri(fig)


def layer_features(result: RunResult) -> torch.Tensor | None:
    path = result.diagnostics.get("pretrained")
    return torch.load(path, weights_only=True)["layer_features"].double() if path else None


def cka_between(rows: list[Any], baseline: Any) -> tuple[str | None, dict[str, list[float]]]:
    """Debiased linear CKA, per layer, of each row's features with the baseline's (same seed
    paired, averaged over seeds); the figure and row -> per-layer values."""
    if baseline is None:
        return None, {}
    base = {r.seed: layer_features(r) for r in baseline.cells}
    values: dict[str, list[float]] = {}
    for row in rows:
        per_seed = []
        for r in row.cells:
            mine, theirs = layer_features(r), base.get(r.seed)
            if mine is None or theirs is None or mine.shape[1] != theirs.shape[1]:
                continue
            depth = min(len(mine), len(theirs))
            per_seed.append([linear_cka(mine[i], theirs[i], debiased=True) for i in range(depth)])
        if per_seed:
            depth = min(len(p) for p in per_seed)
            values[row.group] = np.mean([p[:depth] for p in per_seed], axis=0).tolist()
    if not values:
        return None, {}
    colour = colours([row.group for row in rows])
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    for group, v in values.items():
        ax.plot(range(1, len(v) + 1), v, "o-", color=colour[group], label=group, ms=3)
    ax.set_xlabel("layer (block)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(f"CKA with {baseline.group}")
    ax.set_title("debiased linear CKA with the baseline at the same layer (same seed)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return data_uri(fig), values
