"""Retrieval and clustering metrics: hand-worked rankings, evaluate() against a brute-force oracle, validation."""
import math

import pytest
import torch

from metricloss_kernels import metrics

# Four ranked lists of L = 5 neighbours (worked by hand below).
REL = torch.tensor([[1, 0, 1, 0, 0],    # R = 3
                    [0, 0, 0, 1, 1],    # R = 2
                    [0, 0, 0, 0, 0],    # R = 0
                    [1, 1, 1, 1, 1]],   # R = 7 > L
                   dtype=torch.bool)
NUM_REL = torch.tensor([3, 2, 0, 7])


def _check(values, expected):
    torch.testing.assert_close(values, torch.tensor(expected, dtype=values.dtype), rtol=0, atol=1e-12)


def test_recall_at_k():
    _check(metrics.recall_at_k(REL, NUM_REL, 1), [1, 0, 0, 1])
    _check(metrics.recall_at_k(REL, NUM_REL, 3), [1, 0, 0, 1])
    _check(metrics.recall_at_k(REL, NUM_REL, 4), [1, 1, 0, 1])


def test_precision_at_k():
    _check(metrics.precision_at_k(REL, NUM_REL, 2), [1 / 2, 0, 0, 1])
    _check(metrics.precision_at_k(REL, NUM_REL, 5), [2 / 5, 2 / 5, 0, 1])


def test_map_at_k_divides_by_k():
    # q0: P(1) = 1, P(3) = 2/3;  q1: P(4) = 1/4, P(5) = 2/5
    _check(metrics.map_at_k(REL, NUM_REL, 1), [1, 0, 0, 1])
    _check(metrics.map_at_k(REL, NUM_REL, 2), [1 / 2, 0, 0, 1])
    _check(metrics.map_at_k(REL, NUM_REL, 3), [(1 + 2 / 3) / 3, 0, 0, 1])
    _check(metrics.map_at_k(REL, NUM_REL, 5), [(1 + 2 / 3) / 5, (1 / 4 + 2 / 5) / 5, 0, 1])


def test_ndcg_at_k():
    lg = math.log2
    _check(metrics.ndcg_at_k(REL, NUM_REL, 1), [1, 0, 0, 1])
    # q0 @3: DCG = 1 + 1/log2(4); IDCG = 3 relevant on top
    _check(metrics.ndcg_at_k(REL, NUM_REL, 3), [(1 + 1 / lg(4)) / (1 + 1 / lg(3) + 1 / lg(4)), 0, 0, 1])
    # q1 @5: DCG = 1/log2(5) + 1/log2(6); IDCG = min(5, R=2) relevant on top
    _check(metrics.ndcg_at_k(REL, NUM_REL, 5), [(1 + 1 / lg(4)) / (1 + 1 / lg(3) + 1 / lg(4)),
                                                 (1 / lg(5) + 1 / lg(6)) / (1 + 1 / lg(3)), 0, 1])


def test_map_at_r():
    # q0: (1/3)(P(1) + P(3)) with P(3) = 2/3; q1: nothing relevant in the first R = 2; q3: 5 of R = 7 found
    _check(metrics.map_at_r(REL, NUM_REL), [(1 + 2 / 3) / 3, 0, 0, 5 / 7])


def test_r_precision():
    _check(metrics.r_precision(REL, NUM_REL), [2 / 3, 0, 0, 5 / 7])


def test_map_at_r_counts_precision_inside_r_only():
    rel = torch.tensor([[0, 1, 0, 1, 1]], dtype=torch.bool)
    # R = 3: only ranks 1..3 count: P(2) = 1/2; the relevant items at ranks 4 and 5 do not
    _check(metrics.map_at_r(rel, torch.tensor([3])), [(1 / 2) / 3])
    _check(metrics.r_precision(rel, torch.tensor([3])), [1 / 3])


def test_ranking_rejects_more_relevant_than_num_relevant():
    with pytest.raises(ValueError, match="num_relevant"):
        metrics.ndcg_at_k(torch.tensor([[True, True, False]]), torch.tensor([1]), 2)


def test_embedding_metrics_reject_nan():
    x = torch.randn(6, 3)
    x[2, 1] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        metrics.closest_center_accuracy(x, torch.tensor([0, 0, 1, 1, 2, 2]))


@pytest.mark.parametrize("fn", [metrics.recall_at_k, metrics.precision_at_k, metrics.map_at_k, metrics.ndcg_at_k])
def test_ranking_validation_with_k(fn):
    with pytest.raises(ValueError, match="k"):
        fn(REL, NUM_REL, 6)
    with pytest.raises(ValueError, match="k"):
        fn(REL, NUM_REL, 0)
    with pytest.raises(TypeError, match="relevance"):
        fn(REL.long(), NUM_REL, 1)
    with pytest.raises(ValueError, match="relevance"):
        fn(REL[0], NUM_REL, 1)
    with pytest.raises(ValueError, match="num_relevant"):
        fn(REL, NUM_REL[:3], 1)
    with pytest.raises(TypeError, match="num_relevant"):
        fn(REL, NUM_REL.float(), 1)
    with pytest.raises(ValueError, match="num_relevant"):
        fn(REL, -NUM_REL, 1)


@pytest.mark.parametrize("fn", [metrics.map_at_r, metrics.r_precision])
def test_ranking_validation_without_k(fn):
    with pytest.raises(TypeError, match="relevance"):
        fn(REL.float(), NUM_REL)
    with pytest.raises(ValueError, match="num_relevant"):
        fn(REL, NUM_REL[:, None])


# --- evaluate -----------------------------------------------------------------------------------------------------

# 1-D points: a a b b c; with Euclidean leave-one-out rankings worked by hand:
#   q0 (0.0):  1(a) 2 3 4      rel 1 0 0 0   R = 1
#   q1 (1.0):  0(a) 2 3 4      rel 1 0 0 0   R = 1
#   q2 (3.0):  1 0 3(b) 4      rel 0 0 1 0   R = 1
#   q3 (10.0): 4 2(b) 1 0      rel 0 1 0 0   R = 1
#   q4 (11.5): no other c      R = 0: left out of every mean
LINE_X = torch.tensor([[0.0], [1.0], [3.0], [10.0], [11.5]], dtype=torch.float64)
LINE_Y = torch.tensor([5, 5, 8, 8, 2])


def test_evaluate_leave_one_out_by_hand():
    out = metrics.evaluate(LINE_X, LINE_Y, ks=(1, 2), metric="euclidean")
    assert out["recall@1"] == pytest.approx(2 / 4)          # not 1.0: each query's own row is excluded
    assert out["recall@2"] == pytest.approx(3 / 4)
    assert out["precision@2"] == pytest.approx((1 / 2 + 1 / 2 + 0 + 1 / 2) / 4)
    assert out["map@2"] == pytest.approx((1 / 2 + 1 / 2 + 0 + (1 / 2) / 2) / 4)
    assert out["ndcg@2"] == pytest.approx((1 + 1 + 0 + 1 / math.log2(3)) / 4)
    assert out["map@r"] == pytest.approx(2 / 4)
    assert out["r_precision"] == pytest.approx(2 / 4)
    assert set(out) == {"recall@1", "recall@2", "precision@1", "precision@2", "map@1", "map@2", "ndcg@1", "ndcg@2",
                        "r_precision", "map@r", "nmi", "closest_center_accuracy", "range_accuracy"}
    assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in out.values())


def test_evaluate_with_reference_set_by_hand():
    ref = torch.tensor([[0.0], [2.0], [4.0], [6.0]], dtype=torch.float64)
    ref_y = torch.tensor([0, 1, 0, 1])
    queries = torch.tensor([[0.9], [5.2], [100.0]], dtype=torch.float64)
    y = torch.tensor([1, 0, 3])             # the last query's label is not in the reference: left out
    out = metrics.evaluate(queries, y, ref, ref_y, ks=(1, 3), metric="euclidean")
    # q0 (0.9): 0(a) 1(b) 2(a) 3(b)  rel 0 1 0 1, R = 2;  q1 (5.2): 3(b) 2(a) 1(b) 0(a)  rel 0 1 0 1, R = 2
    assert out["recall@1"] == 0.0
    assert out["recall@3"] == 1.0
    assert out["precision@3"] == pytest.approx(1 / 3)
    assert out["map@3"] == pytest.approx((1 / 2) / 3)
    assert out["map@r"] == pytest.approx((1 / 2) / 2)
    assert out["r_precision"] == pytest.approx(1 / 2)


def test_evaluate_map_at_r_truncated_by_max_k():
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.zeros(6, dtype=torch.long)    # one class: R = 5 for every query, every neighbour relevant
    assert metrics.evaluate(x, y, ks=(1, 2))["map@r"] == 1.0
    with pytest.warns(UserWarning, match="lower bounds"):
        truncated = metrics.evaluate(x, y, ks=(1, 2), max_k=2)     # only 2 of R = 5 neighbours fetched
    assert truncated["map@r"] == pytest.approx(2 / 5)
    assert truncated["r_precision"] == pytest.approx(2 / 5)


def _oracle(x, y, ref, ref_y, ks, leave_one_out):
    """Every metric from a full stable sort of the cosine similarity matrix, written loop by loop."""
    xn = torch.nn.functional.normalize(x, dim=1)
    rn = torch.nn.functional.normalize(ref, dim=1)
    sim = xn @ rn.T
    if leave_one_out:
        sim.fill_diagonal_(-math.inf)
    order = torch.sort(sim, dim=1, descending=True, stable=True).indices
    sums = {}
    count = 0
    for q in range(x.shape[0]):
        num_rel = int((ref_y == y[q]).sum()) - int(leave_one_out)
        if num_rel == 0:
            continue
        count += 1
        rel = [bool(ref_y[i] == y[q]) for i in order[q, :ref.shape[0] - int(leave_one_out)]]
        prec = [sum(rel[:i + 1]) / (i + 1) for i in range(len(rel))]
        vals = {"map@r": sum(prec[i] for i in range(num_rel) if rel[i]) / num_rel,
                "r_precision": sum(rel[:num_rel]) / num_rel}
        for k in ks:
            vals[f"recall@{k}"] = float(any(rel[:k]))
            vals[f"precision@{k}"] = sum(rel[:k]) / k
            vals[f"map@{k}"] = sum(prec[i] for i in range(k) if rel[i]) / k
            dcg = sum(1 / math.log2(i + 2) for i in range(k) if rel[i])
            vals[f"ndcg@{k}"] = dcg / sum(1 / math.log2(i + 2) for i in range(min(k, num_rel)))
        for name, v in vals.items():
            sums[name] = sums.get(name, 0.0) + v
    return {name: v / count for name, v in sums.items()}


@pytest.mark.parametrize("leave_one_out", [True, False])
def test_evaluate_matches_oracle(leave_one_out):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(37, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (37,), generator=g)
    ref, ref_y = (x, y) if leave_one_out else (torch.randn(53, 8, generator=g, dtype=torch.float64),
                                               torch.randint(0, 6, (53,), generator=g))
    ks = (1, 3, 10)
    got = metrics.evaluate(x, y, None if leave_one_out else ref, None if leave_one_out else ref_y, ks=ks)
    expected = _oracle(x, y, ref, ref_y, ks, leave_one_out)
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, abs=1e-12), name


def test_evaluate_in_blocks_of_queries(monkeypatch):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(50, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (50,), generator=g)
    whole = metrics.evaluate(x, y, ks=(1, 4))
    monkeypatch.setattr(metrics, "_METRIC_BLOCK_ELEMENTS", 7 * 20)   # L = max R_q ~ 20: blocks of ~7 queries
    blocked = metrics.evaluate(x, y, ks=(1, 4))
    assert blocked == pytest.approx(whole, abs=1e-12)


def test_evaluate_validation():
    x, y = LINE_X, LINE_Y
    with pytest.raises(ValueError, match="ks"):
        metrics.evaluate(x, y, ks=(1, 0))
    with pytest.raises(ValueError, match="ks"):
        metrics.evaluate(x, y, ks=())
    with pytest.raises(TypeError, match="ks"):
        metrics.evaluate(x, y, ks=2)
    with pytest.raises(ValueError, match="ks"):
        metrics.evaluate(x, y, ks=(5,))             # 4 neighbours with leave-one-out
    with pytest.raises(ValueError, match="max_k"):
        metrics.evaluate(x, y, ks=(1, 2), max_k=1)
    with pytest.raises(ValueError, match="reference"):
        metrics.evaluate(x, y, reference=x)
    with pytest.raises(ValueError, match="labels"):
        metrics.evaluate(x, y[:4])
    with pytest.raises(TypeError, match="labels"):
        metrics.evaluate(x, y.float())
    with pytest.raises(ValueError, match="embeddings"):
        metrics.evaluate(x[:, 0], y)
    with pytest.raises(ValueError, match="reference"):
        metrics.evaluate(x, y, torch.randn(4, 2, dtype=torch.float64), torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="reference"):
        metrics.evaluate(x, y, x.float(), y)
    with pytest.raises(ValueError, match="metric"):
        metrics.evaluate(x, y, ks=(1,), metric="manhattan")
    with pytest.raises(ValueError, match="relevant"):
        metrics.evaluate(x, torch.arange(5), ks=(1,))  # every class has a single sample


def _random_set(seed=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(37, 6, generator=g), torch.randint(0, 5, (37,), generator=g)


def test_evaluate_include_exclude_select_metrics():
    x, y = _random_set()
    full = metrics.evaluate(x, y, ks=(1, 3, 10))
    # PML's names map to evaluate's, the result follows include's order, duplicates count once
    got = metrics.evaluate(x, y, include=("mean_average_precision_at_r", "recall@3", "NMI", "precision_at_1",
                                          "map@r", "ndcg_at_10"))
    assert list(got) == ["map@r", "recall@3", "nmi", "precision@1", "ndcg@10"]
    assert got == {name: full[name] for name in got}
    # a per-k metric need not have its k in ks
    assert metrics.evaluate(x, y, include=("map@5",)) == {"map@5": metrics.evaluate(x, y, ks=(5,))["map@5"]}
    left = metrics.evaluate(x, y, ks=(1, 3, 10), exclude=("nmi", "range_accuracy", "recall@3", "recall@7"))
    assert list(left) == [n for n in full if n not in ("nmi", "range_accuracy", "recall@3")]
    assert left == {name: full[name] for name in left}
    assert metrics.evaluate(x, y, ks=(1, 3, 10), include=()) == full      # empty include: everything, as PML's


def test_evaluate_runs_only_what_is_selected(monkeypatch):
    x, y = _random_set()
    expected = metrics.evaluate(x, y)

    def forbidden(*args, **kwargs):
        raise AssertionError("not selected, must not run")

    monkeypatch.setattr(metrics, "knn", forbidden)        # no ranking metric: no neighbour search
    got = metrics.evaluate(x, y, include=("nmi", "closest_center_accuracy"))
    assert got == {"nmi": expected["nmi"], "closest_center_accuracy": expected["closest_center_accuracy"]}
    monkeypatch.undo()
    monkeypatch.setattr(metrics, "kmeans", forbidden)     # NMI excluded: no k-means
    assert metrics.evaluate(x, y, exclude=("NMI",)) == {n: v for n, v in expected.items() if n != "nmi"}


def test_evaluate_selection_errors():
    x, y = _random_set()
    with pytest.raises(ValueError, match="include: unknown metric 'recall'"):
        metrics.evaluate(x, y, include=("recall",))
    with pytest.raises(ValueError, match="include: unknown metric 'recall@0'"):
        metrics.evaluate(x, y, include=("recall@0",))
    with pytest.raises(ValueError, match="exclude: unknown metric 'nmi_score'"):
        metrics.evaluate(x, y, exclude=("nmi_score",))
    with pytest.raises(ValueError, match="'AMI' is a metric of PML's AccuracyCalculator"):
        metrics.evaluate(x, y, include=("AMI",))
    with pytest.raises(TypeError, match="include must be a sequence"):
        metrics.evaluate(x, y, include="nmi")
    with pytest.raises(TypeError, match="exclude must hold metric names"):
        metrics.evaluate(x, y, exclude=(1,))
    with pytest.raises(ValueError, match="no metric"):
        metrics.evaluate(x, y, include=("nmi",), exclude=("NMI",))
    with pytest.raises(ValueError, match="must be <= the number of embeddings minus 1"):
        metrics.evaluate(x, y, include=("recall@37",))
    with pytest.raises(ValueError, match="max_k"):
        metrics.evaluate(x, y, include=("ndcg@20",), max_k=10)


# --- clustering and centroid metrics --------------------------------------------------------------------------------

def test_nmi_perfect_clustering_is_one():
    g = torch.Generator().manual_seed(0)
    centers = 20 * torch.randn(6, 5, generator=g, dtype=torch.float64)
    y = torch.arange(60) % 6
    x = centers[y] + 0.01 * torch.randn(60, 5, generator=g, dtype=torch.float64)
    assert metrics.nmi(x, y + 10) == pytest.approx(1.0)
    # labels unrelated to the clusters share little information with them
    assert metrics.nmi(x, torch.randint(0, 6, (60,), generator=g)) < 0.5


# Two overlapping classes and an isolated one (1-D, Euclidean):
#   a = {0, 4}: centroid 2, radius 2;  b = {3, 5}: centroid 4, radius 1;  c = {10}: radius 0
CENTRE_X = torch.tensor([[0.0, 0.0], [4.0, 0.0], [3.0, 0.0], [5.0, 0.0], [10.0, 0.0]], dtype=torch.float64)
CENTRE_Y = torch.tensor([7, 7, 9, 9, 20])


def test_closest_center_accuracy_by_hand():
    # 4 is nearer b's centroid; 3 is equidistant (1) from both: the tie goes to the lower class (a), wrong for b
    _check(metrics.closest_center_accuracy(CENTRE_X, CENTRE_Y), [1, 0, 0, 1, 1])


def test_range_accuracy_by_hand():
    # 4 lies in a's and b's ranges (2 classes: 1/2); 3 too (|3-2| <= 2, |3-4| <= 1); 0, 5, 10 in their own only
    _check(metrics.range_accuracy(CENTRE_X, CENTRE_Y), [1, 1 / 2, 1 / 2, 1, 1])
    out = metrics.evaluate(CENTRE_X, torch.tensor([7, 7, 9, 9, 9]), ks=(1,), metric="euclidean")
    # with 10 in class b: b = {3, 5, 10} has centroid 6 and radius 4 (covers 3, 4, 5, 10); a covers 0, 3, 4
    assert out["range_accuracy"] == pytest.approx((1 + 1 / 2 + 1 / 2 + 1 + 1) / 5)
    # 4 is 2 from both centroids (tie to the lower class, a: right); 3 is 1 from a, 3 from b: wrong
    assert out["closest_center_accuracy"] == pytest.approx(4 / 5)


def test_centroid_metrics_validation():
    with pytest.raises(ValueError, match="labels"):
        metrics.range_accuracy(CENTRE_X, CENTRE_Y[:3])
    with pytest.raises(TypeError, match="labels"):
        metrics.closest_center_accuracy(CENTRE_X, CENTRE_Y.double())
    with pytest.raises(TypeError, match="embeddings"):
        metrics.nmi(CENTRE_X.long(), CENTRE_Y)


def test_query_set_as_its_own_reference_is_leave_one_out():
    import metricloss_kernels as mlk
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(40, 6, generator=g), torch.randint(0, 4, (40,), generator=g)
    assert mlk.evaluate(x, y, x, y) == mlk.evaluate(x, y)
    s1, i1 = mlk.knn(x, x, k=3)
    s2, i2 = mlk.knn(x, k=3)
    assert torch.equal(i1, i2) and torch.equal(s1, s2)
    assert not (i1 == torch.arange(40)[:, None]).any()


def _offset_classes(n, offset, seed):
    """fp32 embeddings [n, 16] of 6 classes whose centres (spread 0.01) and samples (spread 0.01) lie at offset."""
    g = torch.Generator().manual_seed(seed)
    centres = 0.01 * torch.randn(6, 16, generator=g, dtype=torch.float64)
    y = torch.arange(n) % 6
    return (offset + centres[y] + 0.01 * torch.randn(n, 16, generator=g, dtype=torch.float64)).float(), y


@pytest.mark.parametrize("offset", [100.0, 1e4])
def test_centroid_metrics_exact_for_offset_data(offset):
    # fp32 class sums of data at 1e4 lose the 0.01 spread: the float32 input must score as its float64 copy
    x, y = _offset_classes(3000, offset, seed=6)
    assert torch.equal(metrics.closest_center_accuracy(x, y), metrics.closest_center_accuracy(x.double(), y))
    assert torch.equal(metrics.range_accuracy(x, y), metrics.range_accuracy(x.double(), y))


@pytest.mark.parametrize("offset", [10.0, 1e4])
def test_evaluate_euclidean_exact_for_offset_data(offset):
    # euclidean neighbours and centroid distances of fp32 inputs far from the origin are those of their float64
    # copy (the fp32 GEMM form ||q||^2 - 2 q.r + ||r||^2 cancels there)
    x, y = _offset_classes(600, offset, seed=7)
    assert metrics.evaluate(x, y, ks=(1, 4), metric="euclidean") == \
        metrics.evaluate(x.double(), y, ks=(1, 4), metric="euclidean")


def test_metric_selection_is_refused_over_a_process_group():
    """The sharded evaluation returns its fixed set of metrics: include / exclude with a group is an error, raised
    before any collective (so on every rank alike)."""
    x, y = torch.randn(10, 4), torch.arange(10) % 3
    for selection in (dict(include=("map@r",)), dict(exclude=("nmi",))):
        with pytest.raises(ValueError, match="include / exclude are not supported with process_group"):
            metrics.evaluate(x, y, process_group=object(), **selection)
