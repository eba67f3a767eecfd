"""Retrieval over a process group: `knn(..., process_group=)` and the pieces of `evaluate(..., process_group=)`
(metrics.py) for embeddings sharded over the ranks (docs/sharding.md, "Evaluation over a process group").

Setting. W ranks; rank r holds queries q_r [Q_r, D] and a shard of the reference s_r [R_r, D], or no reference on any
rank: the queries are the reference, each query's own row excluded (leave-one-out). The sizes may differ between
ranks and be 0. Global indices number the ranks' rows concatenated in rank order.

Search: queries travel, candidates come back. In rounds of at most B queries per rank, every rank's queries are
all-gathered ([W, B, D]); each rank searches them in its shard with the exact kNN op (k candidates each, as global
indices); one all-to-all returns every query's W x k candidates to its owner, which keeps the k best by (score,
global index). A rank holds its shard, one round's queries and candidates and its own result: never the whole
reference set, nor a Q x R block. Leave-one-out, a rank searches its own queries in its own shard once, its own row
excluded, instead of sending them to itself.

Scores travel in the dtype the single-process op ranks by (fp32 for fp16 / bf16 / fp32, fp64 for fp64; euclidean:
the fp64 distances, the shard searched in fp64), so the merge ranks exactly as one process on the concatenations.

Checks: every rank's local checks pass inside `distributed.agreement`, then one exchange of six int64 per rank
(`distributed.exchange_checks`) and the same checks on every rank: a ValueError on every rank, never a hang.
"""
import math

import torch
import torch.distributed._functional_collectives as funcol

from . import _validation as check
from . import _knn as retrieval
from ._numerics import compute_dtype
from ._validation import require
from .distributed import _all_gather, _all_reduce, _all_to_all, _group_device, agreement, exchange_checks, group_rank

# The exchanged sizes: local checks passed, queries Q_r, reference rows R_r (-1: leave-one-out), then per call.
_OK, _QUERIES, _REFERENCE = range(3)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Queries gathered per round, W B D entries in all (16 MiB of fp32), and as many candidates W B k.
_BLOCK_ELEMENTS = 1 << 22
_PAD_INDEX = torch.iinfo(torch.long).max  # the index of a missing candidate (a shard with fewer than k rows)


def _collective(op, t, group, *args):
    """op(t) (a collective of `distributed`) on the group's device, waited for, on t's device (eager: the result
    is used at once)."""
    out = op(t.to(_group_device(group)), group, *args)
    return (out.wait() if isinstance(out, funcol.AsyncCollectiveTensor) else out).to(t.device)


def all_gather(t, group):
    """cat_r t_r (the same shape on every rank), waited for, on t's device."""
    return _collective(_all_gather, t, group)


def all_reduce(t, group, op="sum"):
    """op_r t_r, waited for, on t's device."""
    return _collective(_all_reduce, t, group, op)


def _same(info, column, what, describe=str):
    """ValueError on every rank unless every rank passed the same value in `column` (quoted through `describe`,
    unless None)."""
    def detail():
        return ", got " + ", ".join(f"rank {r}: {describe(v)}" for r, v in enumerate(info[:, column].tolist()))

    require(info[:, column] == info[0, column], f"{what} must be the same on every rank of process_group",
            None if describe is None else detail)


def _agree_knn(queries, reference, k, metric, group):
    """Local checks, the exchange and the checks made on every rank. Returns (leave_one_out, reference, info)."""
    with agreement(group):
        leave_one_out, reference = retrieval.check_inputs(queries, reference, metric)
        check.positive_int(k, "k")
        if queries.dtype not in _DTYPES:
            raise TypeError(f"queries must have one of the dtypes {_DTYPES}, got {queries.dtype}")
    kind = _DTYPES.index(queries.dtype) * len(retrieval.METRICS) + retrieval.METRICS.index(metric)
    sizes = [1, queries.shape[0], -1 if leave_one_out else reference.shape[0], queries.shape[1], kind, k]
    info = exchange_checks(group, torch.tensor(sizes))
    width, kind_column, k_column = 3, 4, 5
    require((info[:, _REFERENCE] < 0) == leave_one_out, "reference must be given on every rank of process_group "
            "(an empty shard is a [0, D] tensor) or on none (leave-one-out)")
    _same(info, width, "the width D of queries and reference")
    _same(info, kind_column, "the dtype and the metric",
          lambda v: f"{_DTYPES[v // len(retrieval.METRICS)]}, {retrieval.METRICS[v % len(retrieval.METRICS)]!r}")
    _same(info, k_column, "k")
    available = info[:, _QUERIES].sum() - 1 if leave_one_out else info[:, _REFERENCE].sum()
    what = "the number of queries of all ranks minus 1" if leave_one_out else "the reference rows of all ranks"
    require(available >= k, f"k must be at most {what}", lambda: f" = {int(available)}, got {k}")
    return leave_one_out, reference, info


def sharded_knn(queries, reference, k, metric, group):
    """`retrieval.knn` over a process group (see the module docstring): (scores [Q_r, k] in the queries' dtype,
    global indices [Q_r, k]) of this rank's queries."""
    scores, indices, _ = search(queries, reference, k, metric, group)
    return scores, indices


def search(queries, reference, k, metric, group, reference_labels=None):
    """The sharded search: (scores [Q_r, k], global indices [Q_r, k], and with `reference_labels` [R_r] (the
    queries' labels when leave-one-out) the neighbours' labels [Q_r, k], else None). The labels travel with the
    candidates, so no rank gathers the reference labels either."""
    leave_one_out, reference, info = _agree_knn(queries, reference, k, metric, group)
    world, rank = group_rank(group)
    query_sizes = info[:, _QUERIES].tolist()
    shard_sizes = query_sizes if leave_one_out else info[:, _REFERENCE].tolist()
    offset = sum(shard_sizes[:rank])
    largest = metric != "euclidean"
    worst = -math.inf if largest else math.inf
    dtype = torch.float64 if metric == "euclidean" else compute_dtype(queries.dtype)
    q = queries.detach().to(dtype)
    shard = q if leave_one_out else reference.detach().to(dtype)
    columns = 1 if reference_labels is None else 2  # global index (and label) of every candidate

    def candidates(rows, kk, exclude_self):
        values, found = retrieval.search(rows, shard, kk, metric, exclude_self)
        ids = (found + offset)[..., None]
        if reference_labels is not None:
            ids = torch.cat([ids, reference_labels.long()[found][..., None]], dim=-1)
        return values, ids

    if leave_one_out and len(q) > 1:  # this rank's own queries, their own rows excluded
        own = candidates(q, min(k, len(q) - 1), True)
    num_q, dim = q.shape
    scores = q.new_empty(num_q, k)
    ids = torch.empty(num_q, k, columns, dtype=torch.long, device=q.device)
    per_round = max(1, _BLOCK_ELEMENTS // (world * max(dim, k)))
    for start in range(0, max(query_sizes), per_round):
        rows = min(per_round, max(query_sizes) - start)
        counts = [min(rows, max(0, n - start)) for n in query_sizes]
        sent = torch.nn.functional.pad(q[start:start + rows], (0, 0, 0, rows - counts[rank]))
        gathered = all_gather(sent, group).view(world, rows, dim)
        values = q.new_full((world, rows, k), worst)
        found = torch.full((world, rows, k, columns), _PAD_INDEX, dtype=torch.long, device=q.device)
        sources = [r for r in range(world) if counts[r] and not (leave_one_out and r == rank)]
        kk = min(k, len(shard))
        if sources and kk:
            v, i = candidates(torch.cat([gathered[r, :counts[r]] for r in sources]), kk, False)
            for r, v_r, i_r in zip(sources, v.split([counts[r] for r in sources]),
                                   i.split([counts[r] for r in sources])):
                values[r, :counts[r], :kk], found[r, :counts[r], :kk] = v_r, i_r
        values = _collective(_all_to_all, values, group)
        found = _collective(_all_to_all, found, group)
        mine = slice(start, start + counts[rank])
        if leave_one_out and num_q > 1:
            values[rank, :counts[rank], :own[0].shape[1]] = own[0][mine]
            found[rank, :counts[rank], :own[0].shape[1]] = own[1][mine]
        scores[mine], ids[mine] = _merge(values[:, :counts[rank]], found[:, :counts[rank]], k, largest)
    labels = ids[..., 1] if reference_labels is not None else None
    # rounded as the op rounds: to its compute dtype (euclidean: from fp64), then to the input dtype
    return scores.to(compute_dtype(queries.dtype)).to(queries.dtype), ids[..., 0], labels


def _merge(values, ids, k, largest):
    """The k best of every query's candidates values [W, n, k], ids [W, n, k, columns] (id 0: the global index),
    ties to the lower index: ([n, k], [n, k, columns])."""
    world, n, k_in, columns = ids.shape
    values = values.transpose(0, 1).reshape(n, world * k_in)
    ids = ids.transpose(0, 1).reshape(n, world * k_in, columns)
    order = ids[..., 0].argsort(dim=1)  # by index (distinct, padding last), then stably by score
    values, ids = values.gather(1, order), ids.gather(1, order[..., None].expand_as(ids))
    order = values.argsort(dim=1, descending=largest, stable=True)[:, :k]
    return values.gather(1, order), ids.gather(1, order[..., None].expand(-1, -1, columns))


# ------------------------------------------------------------------------------------------------ evaluate
def _gather_varying(t, group):
    """cat_r t_r of 1-D tensors whose lengths differ between ranks (padded to the longest for the all-gather)."""
    sizes = all_gather(torch.tensor([len(t)]), group).tolist()
    padded = torch.nn.functional.pad(t, (0, max(sizes) - len(t)))
    stacked = all_gather(padded, group).view(len(sizes), -1)
    return torch.cat([stacked[r, :s] for r, s in enumerate(sizes)])


def global_classes(labels, group):
    """(the sorted classes of every rank's labels [C], their counts over all ranks [C], this rank's labels as indices
    into the classes)."""
    classes = torch.unique(_gather_varying(torch.unique(labels), group))
    inverse = torch.searchsorted(classes, labels)
    counts = torch.bincount(inverse, minlength=len(classes))
    return classes, all_reduce(counts, group) if len(classes) else counts, inverse
