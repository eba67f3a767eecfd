"""pytorch-metric-learning's AccuracyCalculator on metricloss_kernels' exact kNN op: no faiss, bounded memory, the
same keys and values.

`AccuracyCalculator` subclasses PML's: the same constructor (include, exclude, avg_of_avgs, return_per_class, k,
label_comparison_fn, device, knn_func, kmeans_func), metric names, warnings and errors. It differs in:

- defaults that need no faiss: knn_func=ExactKNN() (`metricloss_kernels.knn`; squared Euclidean distances like PML's
  default faiss IndexFlatL2, ties broken towards the lower reference index like faiss's flat indexes) and
  kmeans_func=KMeans() (for "NMI" and "AMI": the library's k-means, `metricloss_kernels._kmeans`; SklearnKMeans()
  runs scikit-learn's instead; k-means differs from faiss's, so these two agree with PML's only as two k-means
  runs agree);
- memory: `get_accuracy` works through blocks of queries. With ExactKNN the neighbours themselves are searched one
  block at a time, so memory is O(block * k + Q + R) instead of PML's O(Q * k) neighbour lists and float64
  temporaries; a user knn_func is called once for all queries (PML's protocol) and the metrics still run by blocks.
  Label counts and per-class averages (avg_of_avgs, return_per_class) use sorting and scatter-adds, never a
  (labels x samples) mask. Metrics a subclass defines or overrides get PML's full arguments (knn_labels for all
  queries), as in PML;
- `process_group=`: a torch.distributed group (our keyword): every rank passes its own queries (and its own shard
  of the reference, or reference=None for leave-one-out over the union of the ranks' queries) and gets the
  metrics of the union; the neighbours come from the sharded exact search (`knn(..., process_group=)`), the means
  from all-reduced sums. Needs the default knn_func and label_comparison_fn, 1-D labels and metrics that run by
  blocks; "NMI" and "AMI" are left out of the result (no k-means over shards; docs/sharding.md);
- extra metrics, opt in by name: "ndcg_at_<n>", "recall_at_<n>" (1 if any of the first n is relevant) and
  "precision_at_<n>" (n > 1; "precision_at_1" is PML's), as defined in `metricloss_kernels.metrics`, e.g.
  include=("precision_at_1", "mean_average_precision_at_r", "ndcg_at_10"). They average over the queries PML
  averages over (those with a relevant reference item), with PML's avg_of_avgs / return_per_class.
"""
import functools
import re

import torch
from pytorch_metric_learning.utils import accuracy_calculator as pml_ac
from pytorch_metric_learning.utils import common_functions as c_f

from .. import _validation as V
from .. import distributed_eval, metrics
from .._kmeans import kmeans
from ..distributed import agreement, check_group
from ..retrieval import knn

_EXTRA = re.compile(r"(ndcg|recall|precision)_at_([1-9][0-9]*)")
_EXTRA_FUNCTIONS = {"ndcg": metrics.ndcg_at_k, "recall": metrics.recall_at_k, "precision": metrics.precision_at_k}


def _extra(name: str):
    """(function, n) for an extra metric's name, else None ("precision_at_1" is PML's own)."""
    match = _EXTRA.fullmatch(name) if isinstance(name, str) else None
    if match is None or name == "precision_at_1":
        return None
    return _EXTRA_FUNCTIONS[match.group(1)], int(match.group(2))


class ExactKNN:
    """PML's knn_func protocol on `metricloss_kernels.knn` (exact search, bounded memory, no faiss):
    ``knn_func(query [Q, D], k, reference [R, D], ref_includes_query) -> (distances [Q, k], indices [Q, k])``.

    Args:
        metric: "squared_euclidean" (default; the distances of faiss's IndexFlatL2, PML's default), "euclidean",
            "dot" (IndexFlatIP) or "cosine"; similarities come largest first. Ties go to the lower reference index.

    With ref_includes_query, query row q is reference row q (PML's convention): k + 1 neighbours are searched and q
    itself is removed from them, or the last one when q is not among them (PML's rule).
    """
    METRICS = ("squared_euclidean", "euclidean", "dot", "cosine")

    def __init__(self, metric: str = "squared_euclidean"):
        self.metric = V.choice(metric, "metric", self.METRICS)

    def __call__(self, query, k, reference=None, ref_includes_query=False):
        if reference is None:
            raise TypeError("ExactKNN needs the reference embeddings (it keeps no index to add them to)")
        return self.search(query, k, reference, ref_includes_query)

    def search(self, query, k, reference, ref_includes_query=False, first_query_row=0):
        """As __call__, for a block of queries: with ref_includes_query, query row i is reference row
        first_query_row + i."""
        metric = "euclidean" if self.metric == "squared_euclidean" else self.metric
        # a view, so that knn() never takes this for its own leave-one-out search
        scores, indices = knn(query, reference[:], k + 1 if ref_includes_query else k, metric)
        if self.metric == "squared_euclidean":
            scores = scores.square()
        if ref_includes_query:
            own = indices == torch.arange(first_query_row, first_query_row + len(query),
                                          device=indices.device)[:, None]
            own[~own.any(dim=1), -1] = True
            scores, indices = scores[~own].view(len(query), k), indices[~own].view(len(query), k)
        return scores, indices


class KMeans:
    """PML's kmeans_func protocol on the library's k-means (greedy k-means++ seeded with ``seed``, Lloyd iterations
    on the exact kNN op, as for `metricloss_kernels.metrics.nmi`): ``kmeans_func(x [N, D], n_clusters) -> cluster
    ids [N]``."""

    def __init__(self, seed: int = 0):
        self.seed = seed

    def __call__(self, x, nmb_clusters):
        return kmeans(x, nmb_clusters, seed=self.seed)


class SklearnKMeans:
    """PML's kmeans_func protocol on scikit-learn: ``kmeans_func(x [N, D], n_clusters) -> cluster ids [N]``
    (KMeans with k-means++, n_init=1, ``random_state=seed``, on float64)."""

    def __init__(self, seed: int = 0):
        self.seed = seed

    def __call__(self, x, nmb_clusters):
        from sklearn import cluster

        clusters = cluster.KMeans(n_clusters=nmb_clusters, n_init=1, random_state=self.seed).fit_predict(
            x.detach().to(torch.float64).cpu().numpy())
        return torch.as_tensor(clusters, dtype=torch.long, device=x.device)


# ------------------------------------------------------------------ PML's ranking metrics, one value per query
# relevant: bool [b, k] (PML's k neighbours); counts: long [b], PML's R_q (reference items with the query's label,
# less one with ref_includes_query). Values in float64, as PML computes them.
def _precision_at_1(relevant, counts):
    return relevant[:, 0].to(torch.float64)


def _r_precision(relevant, counts):
    within = metrics._ranks(relevant) <= counts[:, None]  # the first min(R_q, k) neighbours
    return (relevant & within).sum(dim=1).to(torch.float64) / within.sum(dim=1)


def _average_precision(relevant, counts):
    """sum_{i <= k} P(i) rel(i) / R_q (PML divides by R_q even when k < R_q)."""
    hits = relevant.cumsum(dim=1) * relevant
    return (hits.to(torch.float64) / metrics._ranks(relevant)).sum(dim=1) / counts


def _map_at_r(relevant, counts):
    return _average_precision(relevant & (metrics._ranks(relevant) <= counts[:, None]), counts)


def _reciprocal_rank(relevant, counts):
    first = relevant.to(torch.uint8).argmax(dim=1) + 1
    return torch.where(relevant.any(dim=1), 1.0 / first.to(torch.float64), 0.0)


_PML_METRICS = {"precision_at_1": _precision_at_1, "r_precision": _r_precision,
                "mean_average_precision": _average_precision, "mean_average_precision_at_r": _map_at_r,
                "mean_reciprocal_rank": _reciprocal_rank}


def _match_counts(labels, reference_labels):
    """For each row of labels [U(, ...)], the number of reference_labels rows equal to it: long [U]."""
    _, inverse = torch.unique(torch.cat([reference_labels, labels]), dim=0, return_inverse=True)
    counts = torch.bincount(inverse[:len(reference_labels)], minlength=int(inverse.max()) + 1)
    return counts[inverse[len(reference_labels):]]


class AccuracyCalculator(pml_ac.AccuracyCalculator):
    """PML's AccuracyCalculator with an exact kNN and bounded memory (see the module docstring). Same arguments as
    PML's; knn_func defaults to ExactKNN() and kmeans_func to KMeans(). ``process_group``: a
    torch.distributed group over whose ranks the queries and the reference are sharded (module docstring)."""

    # a block holds at most this many (query, neighbour) entries: with the kNN output and the metrics' temporaries,
    # about 64 bytes each, so 64 MiB
    block_elements = 1 << 20

    def __init__(self, include=(), exclude=(), avg_of_avgs=False, return_per_class=False, k=None,
                 label_comparison_fn=None, device=None, knn_func=None, kmeans_func=None, process_group=None):
        check_group(process_group)
        if process_group is not None and not (knn_func is None or type(knn_func) is ExactKNN):
            raise ValueError("knn_func: with a process_group the search is the sharded ExactKNN; a custom knn_func "
                             "cannot search the ranks' shards")
        if process_group is not None and label_comparison_fn is not None:
            raise ValueError("label_comparison_fn: with a process_group only label equality (the default) is "
                             "supported")
        self.process_group = process_group
        super().__init__(include=include, exclude=exclude, avg_of_avgs=avg_of_avgs,
                         return_per_class=return_per_class, k=k, label_comparison_fn=label_comparison_fn,
                         device=device, knn_func=ExactKNN() if knn_func is None else knn_func,
                         kmeans_func=KMeans() if kmeans_func is None else kmeans_func)

    # -- metric names: PML's plus the opt-in extras
    def check_primary_metrics(self, include=(), exclude=()):
        def pml_names(names):
            return type(names)(n for n in names if _extra(n) is None) if isinstance(names, (tuple, list)) else names
        super().check_primary_metrics(pml_names(include), pml_names(exclude))

    def get_function_dict(self, include=(), exclude=()):
        names = include if len(include) else list(self.original_function_dict)
        available = {**self.original_function_dict,
                     **{n: functools.partial(self._calculate_extra, n) for n in names if _extra(n) is not None}}
        ordered = [n for n in available if n in names and n not in exclude]  # PML's order, then the extras
        return {n: available[n] for n in ordered}

    def _calculate_extra(self, name, knn_labels, query_labels, not_lone_query_mask, label_counts,
                         ref_includes_query, **kwargs):
        """An extra metric from PML's full arguments (as PML's calculate_* methods receive them)."""
        kept = torch.as_tensor(not_lone_query_mask, device=query_labels.device)
        relevant = self.label_comparison_fn(query_labels[kept, None], knn_labels[kept])
        counts = self._counts_per_query(query_labels, label_counts, ref_includes_query)[kept]
        return self._average(self._metric_values(name, relevant, counts), query_labels[kept], label_counts)

    # -- the pieces
    def _counts_per_query(self, query_labels, label_counts, ref_includes_query):
        """PML's R_q: the match count of the query's own label (label_counts from get_label_match_counts, whose
        unique labels are torch.unique(query_labels, dim=0)), less one with ref_includes_query."""
        unique, inverse = torch.unique(query_labels, dim=0, return_inverse=True)
        counts = torch.as_tensor(label_counts[1], device=query_labels.device)
        if counts.shape[0] != unique.shape[0]:
            raise ValueError("label_counts must count the unique query labels, as get_label_match_counts does")
        return counts[inverse] - int(ref_includes_query)

    def _metric_values(self, name, relevant, counts):
        """Per-query values of a built-in or extra metric: float [b]."""
        if name in _PML_METRICS:
            return _PML_METRICS[name](relevant, counts)
        function, n = _extra(name)
        if n > relevant.shape[1]:
            raise ValueError(f"{name} needs {n} neighbours, but only {relevant.shape[1]} were retrieved")
        return function(relevant, counts, n).to(torch.float64)

    def _average(self, values, labels, label_counts):
        """PML's averaging of per-query values (float64 [b]) over the queries it keeps: the mean, the mean of the
        per-class means (avg_of_avgs) or the per-class means as a list (return_per_class); NaN when none is kept."""
        if values.shape[0] == 0:
            return pml_ac.nan_accuracy(label_counts[0], self.return_per_class)
        if not (self.avg_of_avgs or self.return_per_class):
            return torch.mean(values).item()
        _, inverse = torch.unique(labels, dim=0, return_inverse=True)
        sums = values.new_zeros(int(inverse.max()) + 1).index_add_(0, inverse, values)
        per_class = sums / torch.bincount(inverse).to(values.dtype)
        return per_class.cpu().tolist() if self.return_per_class else torch.mean(per_class).item()

    def _blocked(self, name) -> bool:
        """The metric runs by blocks here: an extra, or one of PML's that the class has not overridden."""
        if _extra(name) is not None:
            return True
        method = "calculate_" + name
        return name in _PML_METRICS and getattr(type(self), method) is getattr(pml_ac.AccuracyCalculator, method)

    def _rows_allclose(self, rows, reference):
        """torch.allclose(rows, reference[:len(rows)]) (PML's check), a block of rows at a time."""
        if rows is reference:
            return True
        if len(reference) < len(rows):
            return False
        reference = reference[:len(rows)]
        step = max(1, self.block_elements // max(1, rows[:1].numel()))
        return all(torch.allclose(rows[i:i + step], reference[i:i + step]) for i in range(0, len(rows), step))

    def _neighbours(self, query, reference, k, ref_includes_query, rows_per_block):
        """Yields (rows, distances [b, k], indices [b, k]) for consecutive blocks of queries."""
        c_f.LOGGER.info("running k-nn with k=%d", k)
        if k == 0:  # every query is alone with its label (k="max_bin_count"): nothing to search
            yield slice(None), query.new_empty(len(query), 0), torch.empty(len(query), 0, dtype=torch.long,
                                                                           device=query.device)
        elif type(self.knn_func) is ExactKNN:
            for q0 in range(0, len(query), rows_per_block):
                rows = slice(q0, q0 + rows_per_block)
                yield (rows, *self.knn_func.search(query[rows], k, reference, ref_includes_query, q0))
        else:
            distances, indices = self.knn_func(query, k, reference, ref_includes_query)
            for q0 in range(0, len(query), rows_per_block):
                rows = slice(q0, q0 + rows_per_block)
                yield rows, distances[rows], indices[rows]

    # -- the entry point
    def get_accuracy(self, query, query_labels, reference=None, reference_labels=None, ref_includes_query=False,
                     include=(), exclude=()):
        """PML's get_accuracy: {metric name: value} for the metrics chosen by include / exclude (or at
        construction). query [Q, D], query_labels [Q(, ...)] (tensors or numpy arrays); reference [R, D] and
        reference_labels default to the query set (then ref_includes_query=True: the first Q reference rows are the
        queries, each excluded from its own neighbours)."""
        if self.process_group is not None:
            return self._sharded_accuracy(query, query_labels, reference, reference_labels, ref_includes_query,
                                          include, exclude)
        if reference is None:
            reference, reference_labels, ref_includes_query = query, query_labels, True
        query, reference, query_labels, reference_labels = (
            c_f.numpy_to_torch(x).to(self.device).type(torch.float)
            for x in (query, reference, query_labels, reference_labels))
        if len(query) != len(query_labels) or len(reference) != len(reference_labels):
            raise ValueError("embeddings and labels must have the same length")
        if ref_includes_query and not (self._rows_allclose(query, reference)
                                       and self._rows_allclose(query_labels, reference_labels)):
            raise ValueError("With ref_includes_query=True, the first len(query) rows of reference (and of "
                             "reference_labels) must equal query (and query_labels).")
        self.curr_function_dict = self.get_function_dict(include, exclude)
        kwargs = {"query": query, "reference": reference, "query_labels": query_labels,
                  "reference_labels": reference_labels, "ref_includes_query": ref_includes_query,
                  "label_comparison_fn": self.label_comparison_fn}
        names = self.get_curr_metrics()
        results = {}
        ranked = [n for n in names if n not in self.requires_clustering()]
        if ranked:
            results.update(self._ranking_metrics(ranked, kwargs))
        if len(ranked) < len(names):
            kwargs["cluster_labels"] = self.get_cluster_labels(**kwargs)
            results.update({n: self.curr_function_dict[n](**kwargs) for n in names if n not in ranked})
        return {n: results[n] for n in names}

    def _ranking_metrics(self, names, kwargs):
        query, reference = kwargs["query"], kwargs["reference"]
        query_labels, reference_labels = kwargs["query_labels"], kwargs["reference_labels"]
        ref_includes_query, compare = kwargs["ref_includes_query"], self.label_comparison_fn
        unique = pml_ac.get_unique_labels(query_labels)
        if compare is pml_ac.EQUALITY:
            label_counts = (unique, _match_counts(unique, reference_labels))
        else:
            label_counts = pml_ac.get_label_match_counts(query_labels, reference_labels, compare)
        counts = self._counts_per_query(query_labels, label_counts, ref_includes_query)
        if compare is pml_ac.EQUALITY:
            keep = counts > 0  # PML's "not lone" queries: their label occurs in the reference (besides themselves)
        else:
            keep = pml_ac.get_lone_query_labels(query_labels, label_counts, ref_includes_query, compare)[1]
        if not bool(keep.any()):
            c_f.LOGGER.warning("None of the query labels are in the reference set.")

        num_k = self.determine_k(label_counts[1], len(reference), ref_includes_query)
        extra_ks = [_extra(n)[1] for n in names if _extra(n) is not None]
        fetch = max([num_k, *extra_ks])
        available = len(reference) - int(ref_includes_query)
        if fetch > available:
            raise ValueError(f"k must be at most {available} (the reference size"
                             f"{' less the query itself' if ref_includes_query else ''}), got {fetch}")

        blocked = [n for n in names if self._blocked(n)]
        full = [n for n in names if n not in blocked]  # metrics that take PML's arguments for all queries
        values = {n: [query.new_empty(0, dtype=torch.float64)] for n in blocked}
        knn_parts = []
        for rows, distances, indices in self._neighbours(query, reference, fetch, ref_includes_query,
                                                         max(1, self.block_elements // max(fetch, 1))):
            knn_labels = reference_labels[indices]
            kept = keep[rows]
            if blocked and bool(kept.any()):
                relevant = compare(query_labels[rows][kept, None], knn_labels[kept])
                for n in blocked:
                    columns = relevant if _extra(n) is not None else relevant[:, :num_k]
                    values[n].append(self._metric_values(n, columns, counts[rows][kept]))
            if full:
                knn_parts.append((distances[:, :num_k], knn_labels[:, :num_k]))
        results = {n: self._average(torch.cat(v), query_labels[keep], label_counts) for n, v in values.items()}
        if full:
            lone, not_lone = pml_ac.get_lone_query_labels(query_labels, label_counts, ref_includes_query, compare)
            full_kwargs = {**kwargs, "label_counts": label_counts, "lone_query_labels": lone,
                           "not_lone_query_mask": not_lone, "knn_distances": torch.cat([d for d, _ in knn_parts]),
                           "knn_labels": torch.cat([lab for _, lab in knn_parts])}
            results.update({n: self.curr_function_dict[n](**full_kwargs) for n in full})
        return results

    # -- over a process group
    def _sharded_accuracy(self, query, query_labels, reference, reference_labels, ref_includes_query, include,
                          exclude):
        """get_accuracy of the union of the ranks' queries (and reference shards); see the module docstring."""
        group = self.process_group
        leave_one_out = reference is None
        with agreement(group):
            if ref_includes_query and not leave_one_out:
                raise ValueError("ref_includes_query: with a process_group, pass reference=None for leave-one-out "
                                 "over the union of the ranks' queries")
            if leave_one_out:
                reference, reference_labels = query, query_labels
            query, reference = (c_f.numpy_to_torch(x).to(self.device).type(torch.float) for x in (query, reference))
            query_labels, reference_labels = (c_f.numpy_to_torch(x).to(self.device).long()
                                              for x in (query_labels, reference_labels))
            if query_labels.dim() != 1 or len(query) != len(query_labels) or len(reference) != len(reference_labels):
                raise ValueError("embeddings and labels must have the same length (labels 1-D with a process_group)")
            self.curr_function_dict = self.get_function_dict(include, exclude)
            names = [n for n in self.get_curr_metrics() if n not in self.requires_clustering()]
            unblocked = [n for n in names if not self._blocked(n)]
            if unblocked:
                raise ValueError(f"include: {unblocked} are computed by methods of this subclass, which take every "
                                 "query at once and cannot run over a process_group")
        classes, counts, _ = distributed_eval.global_classes(reference_labels, group)
        matches = metrics._count_matches(query_labels, classes, counts)
        per_query = matches - int(leave_one_out)
        keep = per_query > 0
        mine = torch.tensor([len(reference), int(matches.max()) if len(matches) else 0])
        sizes = distributed_eval.all_gather(mine, group).view(-1, 2)
        num_reference, most = int(sizes[:, 0].sum()), int(sizes[:, 1].max())
        num_k = self.determine_k(torch.tensor([most]), num_reference, leave_one_out)
        fetch = max([num_k, *(_extra(n)[1] for n in names if _extra(n) is not None)])
        available = num_reference - int(leave_one_out)
        if not 1 <= fetch <= available:
            raise ValueError(f"k must be in [1, {available}] (the reference size of all ranks"
                             f"{' less the query itself' if leave_one_out else ''}), got {fetch}")
        metric = "euclidean" if self.knn_func.metric == "squared_euclidean" else self.knn_func.metric
        _, _, found = distributed_eval.search(query, None if leave_one_out else reference, fetch, metric, group,
                                              reference_labels)
        relevant = found[keep] == query_labels[keep, None]
        results = {}
        for n in names:
            columns = relevant if _extra(n) is not None else relevant[:, :num_k]
            results[n] = self._sharded_average(self._metric_values(n, columns, per_query[keep]), query_labels[keep])
        return results

    def _sharded_average(self, values, labels):
        """`_average` over the ranks: all-reduced sums, per class of the union's kept queries where asked."""
        group = self.process_group
        classes, counts, inverse = distributed_eval.global_classes(labels, group)
        if len(classes) == 0:  # no rank kept a query
            return pml_ac.nan_accuracy(classes, self.return_per_class)
        if not (self.avg_of_avgs or self.return_per_class):  # one bucket: the mean over every kept query
            counts, inverse = counts.sum(0, keepdim=True), torch.zeros_like(inverse)
        sums = values.new_zeros(len(counts)).index_add_(0, inverse, values)
        per_class = distributed_eval.all_reduce(sums, group) / counts.to(sums.dtype)
        if self.return_per_class:
            return per_class.cpu().tolist()
        return torch.mean(per_class).item()
