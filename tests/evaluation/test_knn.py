import math

import torch

from evaluation.knn import knn_accuracy, knn_predict


def test_knn_votes_match_hand_computation():
    # 2-D features; after L2 normalisation the cosine similarities are easy to write down
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 0])
    test = torch.tensor([[2.0, 0.0]])          # cos = 1, 0, 1/sqrt2, -1
    T = 0.5
    votes = knn_predict(train, labels, test, k=3, temperature=T, num_classes=2)
    # top-3 neighbours: #0 (cos 1, class 0), #2 (cos .707, class 1), #1 (cos 0, class 1)
    expected = torch.tensor([[math.exp(1 / T), math.exp(2 ** -0.5 / T) + math.exp(0 / T)]])
    assert torch.allclose(votes, expected, rtol=1e-5)
    assert votes.argmax(1).item() == 0         # exp(2) = 7.39 > exp(1.41) + 1 = 5.11
    # with k = 4 the far class-0 point adds exp(-2)
    votes4 = knn_predict(train, labels, test, k=4, temperature=T, num_classes=2)
    assert math.isclose(votes4[0, 0].item(), math.exp(2) + math.exp(-2), rel_tol=1e-5)


def test_knn_accuracy_on_separable_clusters():
    g = torch.Generator().manual_seed(0)
    centers = torch.eye(3) * 5
    train_y = torch.arange(3).repeat(20)
    test_y = torch.arange(3).repeat(5)
    train = centers[train_y] + torch.randn(60, 3, generator=g) * 0.1
    test = centers[test_y] + torch.randn(15, 3, generator=g) * 0.1
    acc = knn_accuracy(train, train_y, test, test_y, [1, 20], 0.07, 3)
    assert acc == {"knn_top1_k1": 100.0, "knn_top1_k20": 100.0}


def test_knn_chunking_does_not_change_votes():
    g = torch.Generator().manual_seed(1)
    train, test = torch.randn(50, 8, generator=g), torch.randn(13, 8, generator=g)
    labels = torch.randint(0, 4, (50,), generator=g)
    a = knn_predict(train, labels, test, 7, 0.07, 4, chunk=1000)
    b = knn_predict(train, labels, test, 7, 0.07, 4, chunk=3)
    assert torch.allclose(a, b)


# --- LatentMIM's protocol: 1-NN leave-one-out within one split -------------------------------

def loo_reference(f: torch.Tensor, y: torch.Tensor) -> float:
    """Brute force, one query at a time in Python: cosine to every other position, the first
    of the maximal ones (lowest position) is the neighbour."""
    g = f.double() / f.double().norm(dim=1, keepdim=True)
    correct = 0
    for i in range(len(g)):
        sims = [(float(g[i] @ g[j]), j) for j in range(len(g)) if j != i]
        best = max(s for s, _ in sims)
        j = min(j for s, j in sims if s == best)
        correct += int(y[j] == y[i])
    return 100.0 * correct / len(g)


def test_loo_matches_brute_force_on_random_features_for_any_chunk():
    from evaluation.knn import loo_accuracy, loo_nearest
    g = torch.Generator().manual_seed(2)
    f, y = torch.randn(37, 6, generator=g), torch.randint(0, 3, (37,), generator=g)
    expected = loo_reference(f, y)
    for chunk in (1, 5, 37, 1000):
        assert loo_accuracy(f, y, chunk=chunk) == expected
    nearest = loo_nearest(f, chunk=4)
    assert not torch.any(nearest == torch.arange(37))                   # never the query itself


def test_loo_excludes_the_query_by_position_not_its_duplicates_and_ties_go_to_the_lowest():
    from evaluation.knn import loo_nearest
    a, b = [1.0, 0.0], [0.0, 1.0]
    # rows 0 and 2 are the same vector: each is the other's neighbour (another image), not
    # excluded as "the query"; rows 1 and 3 are b and 2b (cosine 1 to each other), row 4 is a
    # vector at equal cosine to rows 0 and 2: the tie goes to the lower position, 0
    f = torch.tensor([a, b, a, [0.0, 2.0], [1.0, 0.1]])
    assert loo_nearest(f).tolist() == [2, 3, 0, 1, 0]
    y = torch.tensor([0, 1, 1, 1, 0])
    from evaluation.knn import loo_accuracy
    assert loo_accuracy(f, y) == loo_reference(f, y) == 60.0            # rows 1, 3, 4 right


def test_loo_needs_two_samples():
    import pytest

    from evaluation.knn import loo_nearest
    with pytest.raises(ValueError, match="at least 2"):
        loo_nearest(torch.randn(1, 4))


def test_knn_protocol_picks_the_readout_and_only_known_names():
    import pytest

    from hpc_mim.config_error import ConfigError
    from hpc_mim.eval_options import KNNConfig
    assert KNNConfig().features() == ("cls", True)                       # DINO: as configured
    assert KNNConfig(pooling="mean").features() == ("mean", True)
    # LatentMIM: mean of the patch tokens before the final norm, whatever `pooling` says
    assert KNNConfig(protocol="latentmim").features() == ("mean", False)
    with pytest.raises(ConfigError, match="eval.knn.protocol"):
        KNNConfig(protocol="loo").validate()
