"""The k-means of the clustering metrics (metricloss_kernels._kmeans) and the NMI score: Lloyd against a float64 loop,
the seeding's properties, agreement with scikit-learn, edge cases."""
import math

import pytest
import torch

from metricloss_kernels import _kmeans, metrics


def _blobs(n, classes, d, spread, seed):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=g)
    return centres[y] + spread * torch.randn(n, d, generator=g, dtype=torch.float64), y


def _lloyd_loop(x, centres, max_iter=300, tol=1e-4):
    """Lloyd's iterations, point by point in float64 (x [N, D], starting centres [C, D]): the labels [N]."""
    threshold = tol * float(x.var(0, unbiased=False).mean())
    n, c = x.shape[0], centres.shape[0]

    def assign(centres):
        labels = []
        for i in range(n):
            d = [float(((x[i] - centres[j]) ** 2).sum()) for j in range(c)]
            labels.append(min(range(c), key=lambda j: (d[j], j)))
        return labels

    for _ in range(max_iter):
        labels = assign(centres)
        new = centres.clone()
        members = [[i for i in range(n) if labels[i] == j] for j in range(c)]
        for j in range(c):
            if members[j]:
                new[j] = sum(x[i] for i in members[j]) / len(members[j])
        assert all(members), "the data of this test leave no cluster empty"
        shift = float(((new - centres) ** 2).sum())
        centres = new
        if shift <= threshold:
            break
    return torch.tensor(assign(centres))


@pytest.mark.parametrize("seed", [0, 1])
def test_lloyd_matches_float64_loop(seed):
    x, _ = _blobs(n=137, classes=9, d=5, spread=0.6, seed=seed)
    centred = (x - x.mean(0)).float()
    seeds = _kmeans._seed(centred, 9, torch.Generator().manual_seed(seed))
    expected = _lloyd_loop(centred.double(), seeds.double())
    assert torch.equal(_kmeans.kmeans(x, 9, seed=seed), expected)


def test_seeding_picks_distinct_rows_one_per_blob():
    x, y = _blobs(n=300, classes=12, d=8, spread=0.01, seed=2)
    x = x * 10
    centred = (x - x.mean(0)).float()
    seeds = _kmeans._seed(centred, 12, torch.Generator().manual_seed(0))
    rows = [int((centred == s).all(1).nonzero()[0, 0]) for s in seeds]
    assert len(set(rows)) == 12
    assert sorted(y[rows].tolist()) == sorted(y.unique().tolist())   # k-means++ spreads the seeds over the blobs
    again = _kmeans._seed(centred, 12, torch.Generator().manual_seed(0))
    other = _kmeans._seed(centred, 12, torch.Generator().manual_seed(1))
    assert torch.equal(seeds, again) and not torch.equal(seeds, other)


def test_empty_cluster_takes_the_farthest_point():
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [5.0, 5.0], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 0, 1])
    distances = torch.tensor([0.5, 0.4, 9.0, 0.0])
    centres = _kmeans._update(x.double(), labels, distances, 3)
    torch.testing.assert_close(centres, torch.tensor([[2.0, 5 / 3], [0.0, 1.0], [5.0, 5.0]]))


def test_kmeans_edge_cases():
    x, _ = _blobs(n=40, classes=4, d=3, spread=1.0, seed=3)
    assert torch.equal(_kmeans.kmeans(x, 1), torch.zeros(40, dtype=torch.long))
    every = _kmeans.kmeans(x, 40)                       # as many clusters as points: one point each
    assert sorted(every.tolist()) == list(range(40))
    labels = _kmeans.kmeans(x, 7, seed=5)
    assert labels.dtype == torch.long and labels.shape == (40,) and 0 <= labels.min() and labels.max() < 7
    assert torch.equal(labels, _kmeans.kmeans(x.float(), 7, seed=5))   # fp32 and fp64 copies: same clusters


def test_kmeans_nmi_close_to_scikit_learn():
    cluster = pytest.importorskip("sklearn.cluster")
    from sklearn.metrics import normalized_mutual_info_score
    x, y = _blobs(n=1500, classes=150, d=16, spread=0.45, seed=4)
    ours = metrics.nmi(x.float(), y)
    for seed in range(3):
        theirs = normalized_mutual_info_score(y, cluster.KMeans(150, n_init=1, random_state=seed).fit_predict(x))
        assert abs(ours - theirs) < 0.03, (seed, ours, theirs)
    assert 0.5 < ours < 0.999      # neither trivial nor perfect


@pytest.mark.parametrize("sizes", [(37, 5, 8), (53, 3, 3), (40, 1, 6), (29, 29, 4)])
def test_normalized_mutual_info_matches_scikit_learn(sizes):
    sk = pytest.importorskip("sklearn.metrics")
    n, a, b = sizes
    g = torch.Generator().manual_seed(n)
    labels = torch.randint(0, a, (n,), generator=g) * 7 - 3       # arbitrary label values
    clusters = torch.randint(0, b, (n,), generator=g) + 100
    expected = sk.normalized_mutual_info_score(labels.numpy(), clusters.numpy())
    assert metrics.normalized_mutual_info(labels, clusters) == pytest.approx(expected, abs=1e-12)
    assert metrics.normalized_mutual_info(labels, labels * 2) == pytest.approx(1.0)


def test_normalized_mutual_info_degenerate():
    one = torch.zeros(10, dtype=torch.long)
    assert metrics.normalized_mutual_info(one, one + 4) == 1.0        # a single class on both sides
    assert metrics.normalized_mutual_info(one, torch.arange(10)) == 0.0
    halves = torch.arange(12) // 6
    assert metrics.normalized_mutual_info(halves, torch.arange(12) % 2) == pytest.approx(0.0, abs=1e-12)
    # by hand: cells (0, 0), (0, 1), (1, 1) hold 1, 1, 2 of the 4 points; marginals 1/2, 1/2 and 1/4, 3/4
    a, b = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 1, 1])
    mi = 0.25 * math.log(0.25 / (0.5 * 0.25)) + 0.25 * math.log(0.25 / (0.5 * 0.75)) \
        + 0.5 * math.log(0.5 / (0.5 * 0.75))
    h_a, h_b = math.log(2), -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert metrics.normalized_mutual_info(a, b) == pytest.approx(mi / ((h_a + h_b) / 2), abs=1e-12)
