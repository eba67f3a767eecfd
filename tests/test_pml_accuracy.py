"""metricloss_kernels.pml.AccuracyCalculator against pytorch-metric-learning's (faiss kNN) on random and tied data,
its extra metrics, blocking, and that it needs no faiss."""
import subprocess
import sys

import pytest
import torch

pml_ac = pytest.importorskip("pytorch_metric_learning.utils.accuracy_calculator")
pytest.importorskip("faiss")  # PML's own calculator (the reference here) searches with faiss
from pytorch_metric_learning.distances import LpDistance  # noqa: E402
from pytorch_metric_learning.utils.inference import CustomKNN  # noqa: E402

import metricloss_kernels as mlk  # noqa: E402
from metricloss_kernels import pml  # noqa: E402
from utils import largest_allocation  # noqa: E402  (tests/ is on sys.path)

CPU = torch.device("cpu")
# PML computes the mean reciprocal rank in float32 (every other metric in float64, as here)
RTOL = {"mean_reciprocal_rank": 1e-6}


def _random(n=301, d=8, classes=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g)


def _tied(n=301, seed=0):
    """Small-integer coordinates: every distance is exact in fp32 (for faiss and for us), with many exact ties and
    duplicated points of different labels."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 3, (n, 3), generator=g).float(), torch.randint(0, 5, (n,), generator=g)


def _assert_same(actual, expected, rtol):
    assert list(actual) == list(expected)
    for name, value in expected.items():
        tol = max(rtol, RTOL.get(name, 0))
        assert actual[name] == pytest.approx(value, rel=tol, abs=tol, nan_ok=True), name


def _compare(data, rtol, query_rows=None, **kwargs):
    """Ours and PML's calculator (default faiss kNN) on the same inputs and arguments."""
    x, y = data
    args = (x, y) if query_rows is None else (x[:query_rows], y[:query_rows], x, y, True)
    kwargs = {"exclude": ("NMI", "AMI"), "device": CPU, **kwargs}
    ours = pml.AccuracyCalculator(**kwargs)
    _assert_same(ours.get_accuracy(*args), pml_ac.AccuracyCalculator(**kwargs).get_accuracy(*args), rtol)
    return ours


@pytest.mark.parametrize("k", [None, 1, 7, "max_bin_count"])
@pytest.mark.parametrize("averaging", [{}, {"avg_of_avgs": True}, {"return_per_class": True}])
@pytest.mark.parametrize("data", ["tied", "random"])
def test_same_values_as_pml(data, averaging, k):
    """Tied data: exactly PML's values (ties go to the lower index in faiss and here). Random data: the same up to
    neighbours whose fp32 distances differ by rounding (faiss and the kNN op round differently)."""
    sample, rtol = (_tied(), 1e-12) if data == "tied" else (_random(), 1e-6)
    _compare(sample, rtol, k=k, **averaging)


@pytest.mark.parametrize("data", ["tied", "random"])
def test_reference_that_includes_the_queries(data):
    """ref_includes_query with a reference larger than the query set: each query is removed from its own neighbours
    (PML's rule when duplicates tie with it)."""
    sample, rtol = (_tied(), 1e-12) if data == "tied" else (_random(), 1e-6)
    _compare(sample, rtol, query_rows=120, k="max_bin_count")
    _compare(sample, rtol, query_rows=120, k=None, include=("precision_at_1", "mean_average_precision"))


def test_separate_reference_and_lone_queries():
    """Queries whose label is absent from the reference are left out of the averages (PML's lone queries); all lone
    gives NaN (a list of NaN per class with return_per_class)."""
    x, y = _tied()
    for kwargs in ({}, {"avg_of_avgs": True}, {"return_per_class": True}):
        expected = pml_ac.AccuracyCalculator(exclude=("NMI", "AMI"), device=CPU, **kwargs)
        ours = pml.AccuracyCalculator(exclude=("NMI", "AMI"), device=CPU, **kwargs)
        for reference_labels in (y.clamp(max=3), y + 10):
            args = (x[:100], y[:100], x[100:], reference_labels[100:], False)
            _assert_same(ours.get_accuracy(*args), expected.get_accuracy(*args), 1e-12)
    singletons = torch.arange(len(x))
    for k in ("max_bin_count", 3):
        expected = pml_ac.AccuracyCalculator(exclude=("NMI", "AMI"), device=CPU, k=k).get_accuracy(x, singletons)
        _assert_same(pml.AccuracyCalculator(exclude=("NMI", "AMI"), device=CPU, k=k).get_accuracy(x, singletons),
                     expected, 1e-12)
        assert all(v != v for v in expected.values())  # NaN


def test_custom_label_comparison_and_multidimensional_labels():
    x, _ = _tied()
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 3, (len(x), 2), generator=g)

    def compare(a, b):
        return (a[..., 0] == b[..., 0]) & (a[..., 1] != b[..., 1])

    for k in (None, "max_bin_count"):
        _compare((x, y), 1e-12, label_comparison_fn=compare, k=k)


def test_blocks_give_the_same_values(monkeypatch):
    """Small blocks (one kNN call per block of queries) give the values of one block."""
    x, y = _tied(seed=2)
    whole = pml.AccuracyCalculator(device=CPU, exclude=("NMI", "AMI"), k="max_bin_count").get_accuracy(x, y)
    monkeypatch.setattr(pml.AccuracyCalculator, "block_elements", 5000)  # 5 blocks
    assert pml.AccuracyCalculator(device=CPU, exclude=("NMI", "AMI"), k="max_bin_count").get_accuracy(x, y) == whole


def test_user_knn_func_and_overridden_metric_get_pmls_arguments():
    """A user knn_func (PML's CustomKNN) and a subclass's own metric run as in PML."""
    class WithCustomMetric(pml.AccuracyCalculator):
        def calculate_top_label(self, knn_labels, query_labels, not_lone_query_mask, **kwargs):
            assert knn_labels.shape[0] == query_labels.shape[0]  # every query at once, as in PML
            return float((knn_labels[:, 0] == query_labels).double().mean())

    x, y = _random(seed=3)
    kwargs = {"device": CPU, "exclude": ("NMI", "AMI"), "k": 5}
    custom = CustomKNN(LpDistance(normalize_embeddings=False, power=2))
    expected = pml_ac.AccuracyCalculator(knn_func=custom, **kwargs).get_accuracy(x, y)
    actual = WithCustomMetric(knn_func=custom, **kwargs).get_accuracy(x, y)
    assert actual.pop("top_label") == pytest.approx(expected["precision_at_1"], rel=1e-12)
    _assert_same(actual, expected, 1e-12)


def test_extra_metrics_are_opt_in_and_match_the_metrics_module():
    x, y = _random(seed=4)
    default = pml.AccuracyCalculator(device=CPU).get_accuracy(x, y)
    assert set(default) == set(pml_ac.AccuracyCalculator(device=CPU).get_accuracy(x, y))
    include = ("precision_at_1", "ndcg_at_10", "recall_at_4", "precision_at_3")
    got = pml.AccuracyCalculator(device=CPU, include=include).get_accuracy(x, y)
    assert list(got) == list(include)
    _, idx = mlk.knn(x, None, 10, metric="euclidean")
    relevance = y[idx] == y[:, None]
    counts = torch.bincount(y)[y] - 1
    assert got["ndcg_at_10"] == pytest.approx(mlk.metrics.ndcg_at_k(relevance, counts, 10).mean().item(), rel=1e-12)
    assert got["recall_at_4"] == pytest.approx(mlk.metrics.recall_at_k(relevance, counts, 4).mean().item(), rel=1e-12)
    assert got["precision_at_3"] == pytest.approx(relevance[:, :3].double().mean().item(), rel=1e-12)
    assert pml.AccuracyCalculator(device=CPU, k=5).get_accuracy(x, y, include=("ndcg_at_5",)) == {
        "ndcg_at_5": pytest.approx(mlk.metrics.ndcg_at_k(relevance, counts, 5).mean().item(), rel=1e-12)}


@pytest.mark.parametrize("kmeans_func", [None, pml.SklearnKMeans()], ids=["default", "sklearn"])
def test_clustering_metrics_without_faiss(kmeans_func):
    """NMI and AMI on the library's k-means (the default) or scikit-learn's: well separated blobs are found."""
    g = torch.Generator().manual_seed(5)
    x = torch.cat([torch.randn(200, 4, generator=g) + 10 * k for k in range(3)])
    y = torch.arange(3).repeat_interleave(200)
    calculator = pml.AccuracyCalculator(device=CPU, include=("NMI", "AMI"), kmeans_func=kmeans_func)
    assert isinstance(calculator.kmeans_func, pml.KMeans if kmeans_func is None else pml.SklearnKMeans)
    assert calculator.get_accuracy(x, y) == {"AMI": pytest.approx(1.0), "NMI": pytest.approx(1.0)}


def test_errors():
    x, y = _random(n=50)
    with pytest.raises(ValueError, match="k must be at most 49"):
        pml.AccuracyCalculator(device=CPU, k=60, exclude=("NMI", "AMI")).get_accuracy(x, y)
    with pytest.raises(ValueError, match="ndcg_at_60 needs 60 neighbours|k must be at most"):
        pml.AccuracyCalculator(device=CPU, include=("ndcg_at_60",)).get_accuracy(x, y)
    with pytest.raises(ValueError):  # PML's check of metric names
        pml.AccuracyCalculator(include=("ndcg",))
    with pytest.raises(ValueError, match="metric"):
        pml.ExactKNN(metric="l1")
    with pytest.raises(ValueError, match="same length"):
        pml.AccuracyCalculator(device=CPU).get_accuracy(x, y[:-1])
    with pytest.raises(ValueError, match="must equal query"):  # ref_includes_query: the queries come first
        pml.AccuracyCalculator(device=CPU).get_accuracy(x[:10], y[:10], x.flip(0), y.flip(0), True)


def test_memory_is_bounded_by_blocks(monkeypatch):
    """k=None ranks the whole reference for every query: PML holds Q x R float64 temporaries, the blocks here
    never allocate half of one."""
    x, y = _random(n=1000, d=4, classes=3, seed=6)
    monkeypatch.setattr(pml.AccuracyCalculator, "block_elements", 1 << 17)  # 8 blocks
    kwargs = {"device": CPU, "exclude": ("NMI", "AMI")}
    limit = 1000 * 999 * 8 // 2
    assert largest_allocation(lambda: pml_ac.AccuracyCalculator(**kwargs).get_accuracy(x, y)) >= limit
    assert largest_allocation(lambda: pml.AccuracyCalculator(**kwargs).get_accuracy(x, y)) < limit


def test_works_without_faiss():
    code = """
import sys
sys.modules["faiss"] = None  # as if faiss were not installed
import torch
from metricloss_kernels import pml
x, y = torch.randn(100, 4), torch.randint(0, 3, (100,))
out = pml.AccuracyCalculator(device=torch.device("cpu")).get_accuracy(x, y)
assert set(out) == {"AMI", "NMI", "mean_average_precision", "mean_average_precision_at_r", "mean_reciprocal_rank",
                    "precision_at_1", "r_precision"}, out
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
