"""Retrieval evaluation over a process group (metricloss_kernels/distributed_eval.py) against one process on the
concatenations: knn bit for bit in float64 (scores and global indices), evaluate's metrics of the union, the
checks (every rank raises, the group stays usable) and the memory bound (no rank allocates the whole reference).

One world per size (gloo on 127.0.0.1, spawned, bounded by test_distributed's TIMEOUT_S), many checks each.
"""
import importlib.util

import pytest
import torch
import torch.distributed as dist
from test_distributed import run_world

import metricloss_kernels as mlk
from metricloss_kernels import distributed_eval
from utils import TOL, assert_close, largest_allocation

D = 12
METRICS = ("cosine", "dot", "euclidean")
RTOL = 1e-12  # means over queries, summed in another order than one process's


def _split(x, sizes, rank):
    start = sum(sizes[:rank])
    return x[start:start + sizes[rank]]


def _data(seed, num_rows, duplicates=0, dtype=torch.float64):
    """[num_rows, D] random rows whose last `duplicates` rows copy rows of the first half (exact ties across
    shards) and labels [num_rows] of 5 classes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_rows, D, generator=g, dtype=torch.float64)
    if duplicates:
        x[num_rows - duplicates:] = x[torch.randint(0, num_rows // 2, (duplicates,), generator=g)]
    return x.to(dtype), torch.randint(0, 5, (num_rows,), generator=g)


def _layouts(world):
    """(query sizes, reference sizes) per rank: unequal, with empty shards."""
    if world == 2:
        return [([23, 14], [0, 41]), ([9, 30], [26, 17]), ([0, 19], [33, 1])]
    return [([10, 0, 27], [20, 0, 33]), ([6, 13, 5], [1, 40, 7])]


def _assert_same(got, expected, query_sizes, rank, what, exact_scores=True):
    expected = [_split(e, query_sizes, rank) for e in expected]
    assert torch.equal(got[1], expected[1]), what + ": indices"
    if exact_scores:
        assert torch.equal(got[0], expected[0]), what + ": scores"
    else:
        assert_close(got[0], expected[0], TOL[got[0].dtype], what + ": scores")


def _check_knn(rank, world, group):
    """Every metric, leave-one-out and with a separate reference, every layout, ks up to the union's size:
    scores and indices equal to one process's bit for bit (float64); fp32 and fp16 likewise. Except: the cosine
    and dot scores of a one-row shard come from the BLAS's matrix-vector path, whose last bit may differ from the
    matrix product's (docs/sharding.md); their indices are still exact."""
    for seed, (query_sizes, ref_sizes) in enumerate(_layouts(world)):
        queries, _ = _data(seed, sum(query_sizes), duplicates=4)
        reference, _ = _data(seed + 100, sum(ref_sizes) - 5)
        reference = torch.cat([reference, queries[:5]])  # queries with an exact copy in the reference
        mine, shard = _split(queries, query_sizes, rank), _split(reference, ref_sizes, rank)
        for metric in METRICS:
            exact = metric == "euclidean" or 1 not in ref_sizes
            for k in (2, len(reference)):
                what = f"{metric} k={k} sizes {query_sizes} / {ref_sizes} rank {rank}"
                got = mlk.knn(mine, shard, k, metric, process_group=group)
                _assert_same(got, mlk.knn(queries, reference, k, metric), query_sizes, rank, what, exact)
            for k in (3, len(queries) - 1):
                what = f"{metric} leave-one-out k={k} sizes {query_sizes} rank {rank}"
                got = mlk.knn(mine, None, k, metric, process_group=group)
                _assert_same(got, mlk.knn(queries, None, k, metric), query_sizes, rank, what)
    # several rounds of 3 queries per rank, the ranks running out of queries in different rounds. Blocks of < 4
    # queries take the BLAS's small-matrix path: the cosine and dot scores' last bit as above, and so the order of
    # exact duplicates (tied scores) too, hence no duplicates here
    query_sizes, ref_sizes = _layouts(world)[0]
    queries, _ = _data(5, sum(query_sizes))
    reference, _ = _data(6, sum(ref_sizes))
    block, distributed_eval._BLOCK_ELEMENTS = distributed_eval._BLOCK_ELEMENTS, world * D * 3
    try:
        for metric in METRICS:
            got = mlk.knn(_split(queries, query_sizes, rank), _split(reference, ref_sizes, rank), 5, metric,
                          process_group=group)
            _assert_same(got, mlk.knn(queries, reference, 5, metric), query_sizes, rank, f"rounds {metric}",
                         metric == "euclidean")
            got = mlk.knn(_split(queries, query_sizes, rank), None, 5, metric, process_group=group)
            _assert_same(got, mlk.knn(queries, None, 5, metric), query_sizes, rank, f"rounds {metric} loo",
                         metric == "euclidean")
    finally:
        distributed_eval._BLOCK_ELEMENTS = block
    for dtype in (torch.float32, torch.float16):
        queries, _ = _data(7, sum(query_sizes), duplicates=3, dtype=dtype)
        for metric in METRICS:
            got = mlk.knn(_split(queries, query_sizes, rank), None, 6, metric, process_group=group)
            _assert_same(got, mlk.knn(queries, None, 6, metric), query_sizes, rank, f"{dtype} {metric}")


def _check_evaluate(rank, world, group):
    """evaluate's metrics of the union on every rank, leave-one-out and with a separate reference (unequal and
    empty shards), "nmi" left out."""
    query_sizes, ref_sizes = _layouts(world)[0]
    queries, labels = _data(11, sum(query_sizes), duplicates=3)
    reference, ref_labels = _data(12, sum(ref_sizes))
    mine, my_labels = _split(queries, query_sizes, rank), _split(labels, query_sizes, rank)
    for metric in ("cosine", "euclidean"):  # (the search of every metric: _check_knn)
        for args, sharded in (((), ()), ((reference, ref_labels),
                                         (_split(reference, ref_sizes, rank), _split(ref_labels, ref_sizes, rank)))):
            expected = mlk.evaluate(queries, labels, *args, ks=(1, 3, 5), metric=metric)
            got = mlk.evaluate(mine, my_labels, *sharded, ks=(1, 3, 5), metric=metric, process_group=group)
            del expected["nmi"]
            assert got.keys() == expected.keys()
            for name, value in expected.items():
                assert got[name] == pytest.approx(value, rel=RTOL, abs=RTOL), f"{metric} {name} rank {rank}"
    # map@r capped by max_k: the same lower bound and the same warning on every rank
    with pytest.warns(UserWarning, match="lower bounds"):
        got = mlk.evaluate(mine, my_labels, ks=(1,), max_k=2, process_group=group)
    with pytest.warns(UserWarning, match="lower bounds"):
        expected = mlk.evaluate(queries, labels, ks=(1,), max_k=2)
    assert got["map@r"] == pytest.approx(expected["map@r"], rel=RTOL)


def _check_pml(rank, world, group):
    """pml.AccuracyCalculator(process_group=): every ranking metric of one process on the concatenations (PML's
    own and the extras, plain means, avg_of_avgs and per class), leave-one-out and with a reference; NMI and AMI
    left out."""
    from metricloss_kernels import pml

    query_sizes, ref_sizes = _layouts(world)[-1]
    queries, labels = _data(40, sum(query_sizes), duplicates=2)
    reference, ref_labels = _data(41, sum(ref_sizes))
    mine, my_labels = _split(queries, query_sizes, rank), _split(labels, query_sizes, rank)
    shards = (_split(reference, ref_sizes, rank), _split(ref_labels, ref_sizes, rank))
    for options in ({}, {"k": 5, "avg_of_avgs": True, "include": ("precision_at_1", "mean_average_precision",
                                                                     "ndcg_at_3")},
                    {"k": "max_bin_count", "return_per_class": True,
                     "include": ("mean_average_precision_at_r", "recall_at_2")}):
        for args, sharded in (((), ()), ((reference, ref_labels), shards)):
            no_kmeans = {} if "include" in options else {"exclude": ("NMI", "AMI")}
            expected = pml.AccuracyCalculator(**options, **no_kmeans).get_accuracy(queries, labels, *args)
            got = pml.AccuracyCalculator(**options, process_group=group).get_accuracy(mine, my_labels, *sharded)
            assert got.keys() == expected.keys(), (got.keys(), expected.keys())
            for name, value in expected.items():
                assert got[name] == pytest.approx(value, rel=RTOL, abs=RTOL), f"{options} {name} rank {rank}"
    with pytest.raises(ValueError, match="ref_includes_query: with a process_group"):
        pml.AccuracyCalculator(process_group=group).get_accuracy(mine, my_labels, *shards, ref_includes_query=True)
    with pytest.raises(ValueError, match="knn_func: with a process_group"):
        pml.AccuracyCalculator(knn_func=lambda *args: None, process_group=group)
    with pytest.raises(ValueError, match="label_comparison_fn: with a process_group"):
        pml.AccuracyCalculator(label_comparison_fn=torch.eq, process_group=group)


def _check_errors(rank, world, group):
    """Bad input on one rank: a ValueError (or TypeError) on every rank, and the group is usable afterwards."""
    query_sizes = [5 + r for r in range(world)]
    queries, labels = _data(20, sum(query_sizes))
    mine, my_labels = _split(queries, query_sizes, rank), _split(labels, query_sizes, rank)
    with pytest.raises(ValueError, match="k must be at most the number of queries of all ranks minus 1"):
        mlk.knn(mine, None, len(queries), process_group=group)
    with pytest.raises(ValueError, match="k must be the same on every rank"):
        mlk.knn(mine, None, 3 + (rank == 0), process_group=group)
    with pytest.raises(ValueError, match="width D of queries and reference must be the same"):
        mlk.knn(mine[:, :D - (rank == world - 1)], None, 3, process_group=group)
    with pytest.raises(ValueError, match="dtype and the metric must be the same.*float32"):
        mlk.knn(mine.float() if rank == 1 else mine, None, 3, process_group=group)
    with pytest.raises(ValueError, match="dtype and the metric must be the same.*'dot'"):
        mlk.knn(mine, None, 3, "dot" if rank == 0 else "cosine", process_group=group)
    with pytest.raises(ValueError, match="reference must be given on every rank"):
        mlk.knn(mine, mine.clone() if rank == 0 else None, 3, process_group=group)
    with pytest.raises(ValueError, match="queries contains NaN"):  # the failing rank's message, quoted by all
        mlk.knn(torch.where(torch.tensor(rank == 1), torch.nan, mine), None, 3, process_group=group)
    with pytest.raises(ValueError, match="labels must have shape"):
        mlk.evaluate(mine, my_labels[:len(my_labels) - (rank == 0)], ks=(1,), process_group=group)
    with pytest.raises(ValueError, match="ks must be the same on every rank"):
        mlk.evaluate(mine, my_labels, ks=(1, 2 + rank), process_group=group)
    with pytest.raises(ValueError, match="ks must be <= the number of embeddings minus 1"):
        mlk.evaluate(mine, my_labels, ks=(len(queries),), max_k=len(queries), process_group=group)
    with pytest.raises(TypeError, match="process_group must be"):
        mlk.knn(mine, None, 3, process_group="world")
    # still in step: one process's answer
    expected = mlk.knn(queries, None, 4)
    got = mlk.knn(mine, None, 4, process_group=group)
    assert torch.equal(got[1], _split(expected[1], query_sizes, rank))


def _check_memory(rank, world, group):
    """No rank allocates the whole reference set: the largest allocation of a sharded search stays below it,
    where the single-process search on the union allocates at least that much (its normalised copy)."""
    rows, queries = 20000, 50  # the shard outweighs the op's score buffer (block_q x 512)
    reference, _ = _data(30, world * rows)
    query, _ = _data(31, queries)
    whole = reference.numel() * reference.element_size()
    single = largest_allocation(lambda: mlk.knn(query, reference, 10))
    assert single >= whole, (single, whole)
    shard = _split(reference, [rows] * world, rank)
    sharded = largest_allocation(lambda: mlk.knn(query, shard, 10, process_group=group))
    assert sharded < whole / world * 1.01, (sharded, whole)


def _worker(rank, world):
    group = dist.group.WORLD
    _check_knn(rank, world, group)
    _check_evaluate(rank, world, group)
    if importlib.util.find_spec("pytorch_metric_learning") is not None:  # (an optional dependency)
        _check_pml(rank, world, group)
    _check_errors(rank, world, group)
    _check_memory(rank, world, group)


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_evaluation_equals_one_process(world):
    run_world(_worker, world)

