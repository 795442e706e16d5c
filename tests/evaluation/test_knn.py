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
