"""UMD's few-shot least-squares probe against numpy and the authors' evaluator
(philippe-eecs/small-vision: big_vision/evaluators/fewshot_lsr.py, transcribed below in numpy),
and end to end on a tiny run directory."""
from dataclasses import asdict

import numpy as np
import pytest
import torch

from conftest import submitted_run
from evaluation.fewshot import RidgeProbe, draw_shots, fewshot_accuracy


def authors_lsr(x: np.ndarray, y: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                num_classes: int, l2_reg: float) -> tuple[np.ndarray, float]:
    """``_precompute_cache`` + ``_eig_fewshot_acc_fn`` of fewshot_lsr.py in numpy: whiten,
    pad a constant 100, +-1 one-hot targets, eigendecomposition of the smaller Gram matrix."""
    mean, std = x.mean(0, keepdims=True), x.std(0, keepdims=True) + 1e-5
    x = np.pad((x - mean) / std, ((0, 0), (0, 1)), constant_values=100.0)
    t = 2.0 * np.eye(num_classes)[y] - 1.0
    if x.shape[0] >= x.shape[1]:
        eigs, q = np.linalg.eigh(x.T @ x)
        rhs, lhs = q.T @ (x.T @ t), q
    else:
        eigs, q = np.linalg.eigh(x @ x.T)
        rhs, lhs = q.T @ t, x.T @ q
    w = (lhs * (1.0 / (eigs + l2_reg))[None, :]) @ rhs
    xt = np.pad((x_test - mean) / std, ((0, 0), (0, 1)), constant_values=100.0)
    return w, float(np.mean(np.argmax(xt @ w, axis=1) == y_test))


def authors_draw(labels: np.ndarray, num_classes: int, shots: int, seed: int) -> np.ndarray:
    """``compute_fewshot_metrics``'s draw of the shots."""
    rng = np.random.default_rng(seed)
    class_indices = [rng.permutation(np.where(labels == c)[0]) for c in range(num_classes)]
    return np.concatenate([ind[:shots] for ind in class_indices], axis=0)


@pytest.mark.parametrize("n, d", [(60, 8), (12, 30)])       # N >= D + 1 and N < D + 1
def test_solution_is_the_regularised_normal_equations_and_the_authors(n, d):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, d, generator=g) * 3 + 1
    y = torch.randint(0, 4, (n,), generator=g)
    probe = RidgeProbe(x, y, 4, l2_reg=7.0)
    # numpy: the whitened, bias-padded design A and (A^T A + l2 I) W = A^T T
    xn = x.double().numpy()
    a = np.pad((xn - xn.mean(0)) / (xn.std(0) + 1e-5), ((0, 0), (0, 1)), constant_values=100.0)
    t = 2.0 * np.eye(4)[y.numpy()] - 1.0
    w = np.linalg.solve(a.T @ a + 7.0 * np.eye(d + 1), a.T @ t)
    np.testing.assert_allclose(probe.w.numpy(), w, rtol=1e-7, atol=1e-9)
    x_test, y_test = torch.randn(50, d, generator=g), torch.randint(0, 4, (50,), generator=g)
    w_authors, acc = authors_lsr(xn, y.numpy(), x_test.double().numpy(), y_test.numpy(), 4, 7.0)
    np.testing.assert_allclose(probe.w.numpy(), w_authors, rtol=1e-6, atol=1e-8)
    assert (probe.predict(x_test, chunk=7) == y_test).double().mean().item() == pytest.approx(acc)


def test_draws_are_stratified_reproducible_and_the_authors():
    g = np.random.default_rng(5)
    labels = g.integers(0, 6, size=300)
    labels[labels == 5] = 4                       # class 5 empty
    labels[np.flatnonzero(labels == 3)[3:]] = 2   # class 3 has 3 images only
    a = draw_shots(labels, 6, [2, 10], seed=1)
    counts = np.bincount(labels[a[10]], minlength=6)
    assert counts.tolist() == [10, 10, 10, 3, 10, 0]          # n per class, or all a class has
    assert np.bincount(labels[a[2]], minlength=6).tolist() == [2, 2, 2, 2, 2, 0]
    assert len(set(a[10].tolist())) == len(a[10])             # no image twice
    assert set(a[2].tolist()) <= set(a[10].tolist())          # one permutation for every n
    np.testing.assert_array_equal(a[10], draw_shots(labels, 6, [10], seed=1)[10])  # reproducible
    for seed in (0, 1, 2):
        np.testing.assert_array_equal(draw_shots(labels, 6, [10], seed)[10],
                                      authors_draw(labels, 6, 10, seed))
    assert not np.array_equal(draw_shots(labels, 6, [10], 0)[10], a[10])


def test_accuracy_is_the_mean_over_draws_of_the_authors_figure():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(5, 16, generator=g) * 2
    train_y, val_y = torch.arange(5).repeat(40), torch.arange(5).repeat(8)
    train_f = centers[train_y] + torch.randn(200, 16, generator=g) * 2
    val_f = centers[val_y] + torch.randn(40, 16, generator=g) * 2
    out = fewshot_accuracy(train_f, train_y, val_f, val_y, 5, [4, 20], 1024.0, draws=3)
    for n in (4, 20):
        per_draw = []
        for seed in range(3):
            idx = authors_draw(train_y.numpy(), 5, n, seed)
            per_draw.append(100 * authors_lsr(train_f.double().numpy()[idx], train_y.numpy()[idx],
                                              val_f.double().numpy(), val_y.numpy(), 5, 1024.0)[1])
        assert out[f"top1_{n}shot"] == pytest.approx(np.mean(per_draw))
        assert out[f"top1_{n}shot_std"] == pytest.approx(np.std(per_draw, ddof=1))
    assert out["top1"] == out["top1_4shot"]                  # the first of `shots`
    assert out["top1_20shot"] > 60                            # separable: well above chance (20)


def test_fewshot_is_a_registered_classification_evaluation():
    from evaluation import EVALUATIONS
    from hpc_mim.config_error import ConfigError
    from hpc_mim.eval_options import EVAL_KINDS, FewshotConfig, parse_entry
    assert EVALUATIONS["fewshot"] == "evaluation.fewshot:main"
    assert EVAL_KINDS["fewshot"] == "classification" and parse_entry("fewshot:cub") == ("fewshot", "cub")
    c = FewshotConfig()
    assert (c.shots, c.l2_reg, c.draws, c.features()) == ([100], 1024.0, 1, ("cls", True))
    for bad in ({"shots": []}, {"shots": [0]}, {"l2_reg": 0.0}, {"draws": 0}):
        with pytest.raises(ConfigError, match="eval.fewshot"):
            FewshotConfig(**bad).validate()


def tiny_run(tmp_path, data_root, monkeypatch, overrides: list[str]):
    """A run directory as jobs/submit.py leaves it (config, MLflow parent run), no encoder.pt:
    the evaluations read the random-init encoder of the smoke preset."""
    from hpc_mim.config import load_config
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)   # join() exports them: not into later tests' jobs
    cfg = load_config("mae", "smoke", overrides=[f"data.root={data_root}", "eval.baselines=[]",
                                                 *overrides])
    return submitted_run(tmp_path, cfg)[0], cfg


def random_encoder(cfg):
    """The encoder evaluation/common.py::encoder_for builds for ``random_init``."""
    from hpc_mim.models import build_encoder
    torch.manual_seed(cfg.train.seed)
    return build_encoder(asdict(cfg.model))


def split(cfg, name: str, pooling: str, final_norm: bool):
    from evaluation.features import extract_features
    info = cfg.dataset_info("fmnist")                 # as run_eval reads it
    return extract_features({"": random_encoder(cfg)}, info[name], cfg, info, pooling, 0,
                            torch.device("cpu"), final_norm=final_norm)[""]


def test_fewshot_end_to_end_on_a_tiny_run(tmp_path, data_root, monkeypatch):
    from evaluation import fewshot
    run, cfg = tiny_run(tmp_path, data_root, monkeypatch,
                        ["eval.fewshot.shots=[20, 5]", "eval.fewshot.draws=2"])
    out = fewshot.main(str(run.root), baseline="random_init")["random_init"]
    train, val = split(cfg, "train", "cls", True), split(cfg, "val", "cls", True)
    expected = fewshot_accuracy(*train, *val, 10, [20, 5], 1024.0, 2)
    assert out == pytest.approx(expected)
    assert out["top1"] == out["top1_20shot"] and 0 <= out["top1"] <= 100
    assert sorted(p.name.split("-", 2)[2] for p in (run.evals / "features").glob("*.pt")) == \
        ["fmnist-train-cls-28px-all.pt", "fmnist-val-cls-28px-all.pt"]


def test_latentmim_knn_end_to_end_reads_prenorm_patch_means_of_val_only(tmp_path, data_root, monkeypatch):
    from evaluation import knn
    from evaluation.knn import loo_accuracy
    run, cfg = tiny_run(tmp_path, data_root, monkeypatch, ["eval.knn.protocol=latentmim"])
    out = knn.main(str(run.root), baseline="random_init")["random_init"]
    f, y = split(cfg, "val", "mean", False)
    assert set(out) == {"loo_top1"} and out["loo_top1"] == pytest.approx(loo_accuracy(f, y))
    normed, _ = split(cfg, "val", "mean", True)
    assert not torch.allclose(f, normed)                      # before the final norm: another readout
    # the validation split alone, cached under its own key (not the final-norm features')
    assert [p.name.split("-", 2)[2] for p in (run.evals / "features").glob("*.pt")] == \
        ["fmnist-val-mean-prenorm-28px-all.pt"]
