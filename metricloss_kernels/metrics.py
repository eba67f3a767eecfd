"""Retrieval and clustering metrics (docs/formulas.md, "Retrieval metrics") and :func:`evaluate`.

The ranking metrics take the relevance of ranked neighbours and return one value per query:

    relevance:    bool [Q, L]  relevance[q, i] = the (i+1)-th nearest neighbour of query q has q's label
    num_relevant: long [Q]     R_q = number of reference items with q's label (excluding q itself when the
                               reference set is the query set)

A query with R_q = 0 (no relevant neighbour) scores 0 on every ranking metric; :func:`evaluate` leaves such queries
out of its means.
Neighbours missing from the list (positions past L) count as not relevant, so map@r and r_precision are lower
bounds when R_q > L (see :func:`evaluate`'s ``max_k``).
"""
import math
import re
import warnings

import torch

from . import _validation as check
from ._kmeans import kmeans
from . import distributed_eval as shards
from .distributed import agreement, exchange_checks
from .retrieval import knn

# evaluate() computes the ranking metrics over blocks of queries of at most this many ranked neighbours in all.
_METRIC_BLOCK_ELEMENTS = 1 << 22


def _ranking_args(relevance, num_relevant, k=None):
    check.tensor(relevance, "relevance")
    check.tensor(num_relevant, "num_relevant")
    if relevance.dtype != torch.bool:
        raise TypeError(f"relevance must be a bool tensor, got dtype {relevance.dtype}")
    if relevance.dim() != 2:
        raise ValueError(f"relevance must be 2-D [Q, L], got shape {tuple(relevance.shape)}")
    if num_relevant.dtype.is_floating_point or num_relevant.dtype in (torch.bool, torch.complex64,
                                                                        torch.complex128):
        raise TypeError(f"num_relevant must be an integer tensor, got dtype {num_relevant.dtype}")
    if num_relevant.shape != relevance.shape[:1]:
        raise ValueError(f"num_relevant must have shape [{relevance.shape[0]}] (one count per query), "
                         f"got {tuple(num_relevant.shape)}")
    if num_relevant.device != relevance.device:
        raise ValueError(f"num_relevant must be on relevance's device {relevance.device}, got {num_relevant.device}")
    if num_relevant.numel() and int(num_relevant.min()) < 0:
        raise ValueError(f"num_relevant must be >= 0, got {int(num_relevant.min())}")
    if relevance.numel() and bool((relevance.sum(dim=1) > num_relevant).any()):
        raise ValueError("relevance marks more relevant neighbours than num_relevant allows for some query")
    if k is not None:
        check.positive_int(k, "k")
        if k > relevance.shape[1]:
            raise ValueError(f"k must be <= the number of ranked neighbours L = {relevance.shape[1]}, got {k}")


def _dtype(tensor):
    """Float dtype of the metrics' arithmetic on tensor's device: float64 on CPU, float32 on accelerators (some
    lack float64)."""
    return torch.float64 if tensor.device.type == "cpu" else torch.float32


def _precision_at_each_rank(rel: torch.Tensor) -> torch.Tensor:
    """P(i) for i = 1..L: [Q, L] float."""
    ranks = torch.arange(1, rel.shape[1] + 1, dtype=rel.dtype, device=rel.device)
    return rel.cumsum(dim=1) / ranks


def recall_at_k(relevance: torch.Tensor, num_relevant: torch.Tensor, k: int) -> torch.Tensor:
    """1 if any of the first k neighbours is relevant, else 0 (the DML definition). Returns float [Q]."""
    _ranking_args(relevance, num_relevant, k)
    return relevance[:, :k].any(dim=1).to(_dtype(relevance))


def precision_at_k(relevance: torch.Tensor, num_relevant: torch.Tensor, k: int) -> torch.Tensor:
    """(1/k) sum_{i<=k} rel(i). Returns float [Q]."""
    _ranking_args(relevance, num_relevant, k)
    return relevance[:, :k].sum(dim=1).to(_dtype(relevance)) / k


def map_at_k(relevance: torch.Tensor, num_relevant: torch.Tensor, k: int) -> torch.Tensor:
    """(1/k) sum_{i<=k} P(i) rel(i) (divided by k, as Saeki et al. define it). Returns float [Q]."""
    _ranking_args(relevance, num_relevant, k)
    rel = relevance[:, :k].to(_dtype(relevance))
    return (_precision_at_each_rank(rel) * rel).sum(dim=1) / k


def ndcg_at_k(relevance: torch.Tensor, num_relevant: torch.Tensor, k: int) -> torch.Tensor:
    """DCG@k / IDCG@k with binary gains, DCG@k = sum_{i<=k} rel(i) / log2(i + 1) and IDCG@k the DCG of
    min(k, R_q) relevant items at the top (0 when R_q = 0). Returns float [Q]."""
    _ranking_args(relevance, num_relevant, k)
    dtype = _dtype(relevance)
    discount = 1.0 / torch.log2(torch.arange(2, k + 2, dtype=dtype, device=relevance.device))
    dcg = (relevance[:, :k].to(dtype) * discount).sum(dim=1)
    # the same masked sum as dcg, so a perfect ranking gives exactly 1
    ideal = torch.arange(1, k + 1, device=relevance.device) <= num_relevant[:, None]
    idcg = (ideal.to(dtype) * discount).sum(dim=1)
    return torch.where(idcg > 0, dcg / idcg.clamp_min(torch.finfo(dtype).tiny), torch.zeros_like(dcg))


def map_at_r(relevance: torch.Tensor, num_relevant: torch.Tensor) -> torch.Tensor:
    """(1/R_q) sum_{i<=R_q} P(i) rel(i) (Musgrave et al.); ranks past L count as not relevant. Returns float [Q]."""
    _ranking_args(relevance, num_relevant)
    rel = relevance.to(_dtype(relevance))
    within_r = _ranks(relevance) <= num_relevant[:, None]
    total = (_precision_at_each_rank(rel) * rel * within_r).sum(dim=1)
    return total / num_relevant.clamp_min(1)


def r_precision(relevance: torch.Tensor, num_relevant: torch.Tensor) -> torch.Tensor:
    """precision@R_q = (1/R_q) sum_{i<=R_q} rel(i); ranks past L count as not relevant. Returns float [Q]."""
    _ranking_args(relevance, num_relevant)
    within_r = _ranks(relevance) <= num_relevant[:, None]
    return (relevance & within_r).sum(dim=1).to(_dtype(relevance)) / num_relevant.clamp_min(1)


def _ranks(relevance: torch.Tensor) -> torch.Tensor:
    """1-based ranks [L] (broadcasts against [Q, 1])."""
    return torch.arange(1, relevance.shape[1] + 1, device=relevance.device)


def _embedding_args(embeddings, labels, min_rows=1):
    check.embeddings(embeddings, min_rows=min_rows)
    if not check.all_finite(embeddings):
        raise ValueError("embeddings must be finite (found NaN or inf)")
    check.labels(labels, embeddings.shape[0], embeddings.device)


def normalized_mutual_info(labels: torch.Tensor, clusters: torch.Tensor) -> float:
    """Normalised mutual information of two labellings (integer [N] each): I(labels; clusters) divided by the mean
    of their entropies (the arithmetic normalisation, scikit-learn's default); 1 when both have a single class,
    0 when they share no information. Computed from the non-zero cells of the contingency table only."""
    n = labels.shape[0]
    _, a = torch.unique(labels, return_inverse=True)
    _, b = torch.unique(clusters, return_inverse=True)
    size_a, size_b = torch.bincount(a).double(), torch.bincount(b).double()
    if len(size_a) == len(size_b) == 1:
        return 1.0
    cells, joint = torch.unique(a * len(size_b) + b, return_counts=True)
    joint = joint.double()
    expected = size_a[cells // len(size_b)] * size_b[cells % len(size_b)]
    mutual = float((joint * (joint.log() + math.log(n) - expected.log())).sum() / n)
    if mutual <= 0:
        return 0.0

    def entropy(sizes):
        return float(-(sizes / n * (sizes / n).log()).sum())

    return mutual / max((entropy(size_a) + entropy(size_b)) / 2, torch.finfo(torch.float64).eps)


def nmi(embeddings: torch.Tensor, labels: torch.Tensor, seed: int = 0) -> float:
    """Normalised mutual information between the labels and a k-means clustering of the embeddings (as given,
    not normalised) with n_clusters = number of distinct labels (greedy k-means++ seeded with ``seed``, Lloyd
    iterations on the kNN op: :mod:`metricloss_kernels._kmeans`), by :func:`normalized_mutual_info`."""
    _embedding_args(embeddings, labels)
    n_clusters = len(torch.unique(labels))
    return normalized_mutual_info(labels, kmeans(embeddings, n_clusters, seed=seed))


def _statistics_input(embeddings):
    """The embeddings in the dtype of the class statistics: float64 where ``_dtype`` allows, as float32 class sums
    of data far from the origin lose the spread."""
    return embeddings.detach().to(torch.float64 if embeddings.dtype == torch.float64 else _dtype(embeddings))


def _centroids(embeddings, labels):
    """(x in the statistics dtype [N, D], the class index of every sample [N], the class centroids [C, D])."""
    classes, inverse = torch.unique(labels, return_inverse=True)
    x = _statistics_input(embeddings)
    sums = torch.zeros(len(classes), x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, inverse, x)
    counts = torch.bincount(inverse, minlength=len(classes)).to(x.dtype)
    return x, inverse, sums / counts[:, None]


def _centroid_distances(x, centroids, block_elements=1 << 24):
    """Yields (rows, distances [rows, C]) from every sample to every class centroid in bounded blocks. Exact
    per-pair differences (no ||a||^2 - 2ab + ||b||^2 cancellation), so a sample's distance to its own centroid is
    the same number in every pass."""
    block = max(1, block_elements // max(len(centroids), 1))
    for i0 in range(0, x.shape[0], block):
        yield slice(i0, i0 + block), torch.cdist(x[i0:i0 + block], centroids,
                                                 compute_mode="donot_use_mm_for_euclid_dist")


def _closest_center(x, inverse, centroids):
    """Per sample: 1.0 if the nearest centroid is its own class's (ties to the lower class index), else 0.0."""
    out = torch.empty(x.shape[0], dtype=torch.float64, device=x.device)
    for rows, d in _centroid_distances(x, centroids):
        out[rows] = (d.argmin(dim=1) == inverse[rows]).to(out.dtype)
    return out


def _own_distances(x, inverse, centroids):
    """Per sample: the distance to its own class's centroid, float64 [N]."""
    own = torch.empty(x.shape[0], dtype=torch.float64, device=x.device)
    for rows, d in _centroid_distances(x, centroids):
        own[rows] = d.gather(1, inverse[rows, None])[:, 0].to(own.dtype)
    return own


def _range_values(x, inverse, centroids, radius):
    """Per sample: 1/m if it lies inside the balls (centroids, radius [C]) of m classes including its own, else 0."""
    out = torch.empty(x.shape[0], dtype=torch.float64, device=x.device)
    for rows, d in _centroid_distances(x, centroids):
        inside = d.to(out.dtype) <= radius
        m = inside.sum(dim=1).to(out.dtype)
        own_inside = inside.gather(1, inverse[rows, None])[:, 0]
        out[rows] = torch.where(own_inside, 1.0 / m.clamp_min(1), torch.zeros_like(m))
    return out


def closest_center_accuracy(embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per sample [N]: 1 if the nearest class centroid (Euclidean, centroids of the given set) is the sample's
    own class's, else 0. A tie between centroids counts as correct only if the own class has the lowest index
    among the tied classes (sorted labels)."""
    _embedding_args(embeddings, labels)
    return _closest_center(*_centroids(embeddings, labels))


def range_accuracy(embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per sample [N]: 1/m if the sample lies inside the ranges of m classes including its own, else 0. The range
    of a class is the ball around its centroid whose radius is the largest distance of its samples to it
    (Euclidean); a ball includes its boundary."""
    _embedding_args(embeddings, labels)
    x, inverse, centroids = _centroids(embeddings, labels)
    own = _own_distances(x, inverse, centroids)
    radius = own.new_zeros(len(centroids)).scatter_reduce_(0, inverse, own, reduce="amax")
    return _range_values(x, inverse, centroids, radius)


# evaluate()'s metrics. Per-k families (one key "{family}@{k}" per k), the other ranking metrics, and the metrics
# of the query set alone, which need no neighbours.
_PER_K = {"recall": recall_at_k, "precision": precision_at_k, "map": map_at_k, "ndcg": ndcg_at_k}
_RANKED = {"r_precision": r_precision, "map@r": map_at_r}
_UNRANKED = {"nmi": nmi, "closest_center_accuracy": lambda x, y: float(closest_center_accuracy(x, y).mean()),
             "range_accuracy": lambda x, y: float(range_accuracy(x, y).mean())}
# pytorch-metric-learning's AccuracyCalculator names for the same metrics (docs/formulas.md, "Retrieval metrics");
# its "<family>_at_<k>" spelling of the per-k metrics is accepted too
PML_NAMES = {"precision_at_1": "precision@1", "r_precision": "r_precision", "mean_average_precision_at_r": "map@r",
             "NMI": "nmi"}
_PML_ONLY = ("AMI", "mean_average_precision", "mean_reciprocal_rank")  # metricloss_kernels.pml computes these
_PER_K_NAME = re.compile(r"(recall|precision|map|ndcg)(?:@|_at_)([1-9][0-9]*)")


def _metric_name(name, argument: str) -> str:
    """evaluate()'s name for a metric name of evaluate's or of PML's AccuracyCalculator."""
    if not isinstance(name, str):
        raise TypeError(f"{argument} must hold metric names (str), got {name!r}")
    name = PML_NAMES.get(name, name)
    per_k = _PER_K_NAME.fullmatch(name)
    if per_k:
        return f"{per_k[1]}@{per_k[2]}"
    if name in _RANKED or name in _UNRANKED:
        return name
    if name in _PML_ONLY:
        raise ValueError(f"{argument}: {name!r} is a metric of PML's AccuracyCalculator that evaluate does not "
                         f"compute (metricloss_kernels.pml.AccuracyCalculator does)")
    raise ValueError(f"{argument}: unknown metric {name!r}; evaluate computes recall@k, precision@k, map@k, "
                     f"ndcg@k (any k), {', '.join((*_RANKED, *_UNRANKED))}, or PML's names for them: "
                     f"{', '.join(PML_NAMES)}")


def select_metrics(ks=(1, 2, 4, 8), include=None, exclude=()) -> list:
    """The names of the metrics :func:`evaluate` computes, in the order of its result: ``include`` (None or empty:
    the per-k metrics of every k in ``ks``, then r_precision, map@r, nmi, closest_center_accuracy,
    range_accuracy) less ``exclude``. Names are evaluate's or PML's (``PML_NAMES``); a ValueError names an
    unknown one, or a selection that leaves no metric."""
    for argument, names in (("include", include), ("exclude", exclude)):
        if isinstance(names, str) or not (names is None or hasattr(names, "__iter__")):
            raise TypeError(f"{argument} must be a sequence of metric names, got {names!r}")
    if include is None or not len(include := tuple(include)):
        include = [f"{family}@{k}" for k in ks for family in _PER_K] + [*_RANKED, *_UNRANKED]
    excluded = {_metric_name(name, "exclude") for name in exclude}
    chosen = [name for name in dict.fromkeys(_metric_name(name, "include") for name in include)
              if name not in excluded]
    if not chosen:
        raise ValueError(f"include / exclude leave no metric to compute (include={include!r}, exclude={exclude!r})")
    return chosen


def _evaluate_args(embeddings, labels, reference, reference_labels, ks, max_k, min_rows=1):
    """evaluate's checks of its arguments on their own (the sizes they imply are checked by the caller). Returns
    (the reference, None for leave-one-out; ks as a tuple)."""
    _embedding_args(embeddings, labels, min_rows)
    if (reference is None) != (reference_labels is None):
        raise ValueError("reference and reference_labels must be given together (or both None), got "
                         f"reference={'None' if reference is None else 'a tensor'} and reference_labels="
                         f"{'None' if reference_labels is None else 'a tensor'}")
    if reference is embeddings:
        _embedding_args(reference, reference_labels, min_rows)
        if not torch.equal(reference_labels, labels):
            raise ValueError("reference_labels must equal labels when reference is embeddings itself")
        reference = None
    elif reference is not None:
        _embedding_args(reference, reference_labels, min_rows)
        if reference.shape[1] != embeddings.shape[1]:
            raise ValueError(f"reference must have shape [R, {embeddings.shape[1]}] (the embeddings' D), "
                             f"got {tuple(reference.shape)}")
        if reference.device != embeddings.device:
            raise ValueError(f"reference must be on the embeddings' device {embeddings.device}, "
                             f"got {reference.device}")
        if reference.dtype != embeddings.dtype:
            raise TypeError(f"reference must have the embeddings' dtype {embeddings.dtype}, got {reference.dtype}")
    if isinstance(ks, int) or not hasattr(ks, "__iter__"):
        raise TypeError(f"ks must be a sequence of positive integers, got {ks!r}")
    ks = tuple(ks)
    if not ks:
        raise ValueError("ks must contain at least one k")
    for k in ks:
        check.positive_int(k, "ks entries")
    check.positive_int(max_k, "max_k")
    if max_k < max(ks):
        raise ValueError(f"max_k must be >= max(ks) = {max(ks)}, got {max_k}")
    return reference, ks


def _count_matches(labels, classes, counts):
    """For each label, the count of its class (classes sorted [C], counts [C]; 0 for a label not among them)."""
    if len(classes) == 0:
        return torch.zeros_like(labels)
    pos = torch.searchsorted(classes, labels).clamp(max=len(classes) - 1)
    return torch.where(classes[pos] == labels, counts[pos], torch.zeros_like(counts[pos]))


def _ranking_sums(neighbour_labels, labels, num_relevant, valid, names, num_neighbours) -> dict:
    """{metric name: the sum of its per-query values over the valid queries} for the ranking metrics `names`
    (evaluate's names, :func:`select_metrics`); neighbour_labels(rows) gives the labels [rows, L] of the ranked
    neighbours of the queries `rows`."""
    ranked = {name: _per_k(name) for name in names}
    sums = dict.fromkeys(names, 0.0)
    # the metrics' float temporaries are [rows, L]: bound them by working through blocks of queries
    block = max(1, _METRIC_BLOCK_ELEMENTS // num_neighbours)
    for q0 in range(0, len(labels), block):
        rows = slice(q0, q0 + block)
        relevance = neighbour_labels(rows) == labels[rows, None]
        counted, keep = num_relevant[rows], valid[rows]
        for name, (family, k) in ranked.items():
            v = _RANKED[name](relevance, counted) if k is None else _PER_K[family](relevance, counted, k)
            sums[name] += float(v[keep].sum())
    return sums


def _per_k(name: str):
    """(family, k) of a per-k metric name of evaluate's ("recall@4" -> ("recall", 4)), else (name, None)."""
    family, _, k = name.partition("@")
    return (family, int(k)) if k.isdigit() else (name, None)


def _num_neighbours(ks, max_k, available, num_valid, most_relevant, leave_one_out, stacklevel) -> int:
    """L, the neighbours evaluate fetches per query, from the sizes of the whole query and reference sets (with
    its errors, and its warning when map@r and r_precision become lower bounds)."""
    if max(ks) > available:
        what = "number of embeddings minus 1 (leave-one-out)" if leave_one_out else "reference size"
        raise ValueError(f"ks must be <= the {what} = {available}, got max(ks) = {max(ks)}")
    if num_valid == 0:
        raise ValueError("labels: no query has a relevant item in the reference set (every class has a single "
                         "sample, or no query label occurs in reference_labels)")
    if most_relevant > max_k:
        warnings.warn(f"evaluate: some queries have up to {most_relevant} relevant items but only max_k = {max_k} "
                      f"neighbours are fetched, so map@r and r_precision are lower bounds; raise max_k for exact "
                      f"values", stacklevel=stacklevel + 1)
    return min(max(max(ks), most_relevant), max_k, available)


def evaluate(embeddings: torch.Tensor, labels: torch.Tensor, reference: torch.Tensor | None = None,
             reference_labels: torch.Tensor | None = None, ks=(1, 2, 4, 8), metric: str = "cosine",
             max_k: int = 1024, include=None, exclude=(), process_group=None) -> dict:
    """Retrieval and clustering metrics of ``embeddings`` [Q, D] (queries) with integer ``labels`` [Q].

    Neighbours are searched in ``reference`` [R, D] (labels ``reference_labels`` [R]) or, when both are None or
    ``reference`` is ``embeddings`` itself, in the queries with each query's own row excluded (leave-one-out). One
    :func:`~.retrieval.knn` call fetches L = min(max(largest k, max_q R_q), max_k, reference size) neighbours per
    query, so memory is O(Q * L): when a query has more than ``max_k`` relevant items, "map@r" and "r_precision"
    count only the first ``max_k`` neighbours (missing ranks count as not relevant, so they are lower bounds);
    raise ``max_k`` for exact values.

    The ranking metrics are averaged over the queries with R_q > 0. "nmi", "closest_center_accuracy" and
    "range_accuracy" are computed on the query embeddings and labels only (the reference set is not used).

    ``include`` / ``exclude`` select the metrics as PML's AccuracyCalculator does (:func:`select_metrics`): by
    evaluate's names ("recall@16", "map@r", "nmi", ...; a per-k name need not have its k in ``ks``) or PML's
    ("precision_at_1", "mean_average_precision_at_r", "r_precision", "NMI"). ``include`` None or empty: every
    metric of ``ks``. E.g. ``exclude=("nmi",)`` skips the k-means; without a ranking metric no neighbour is searched.

    ``process_group``: a torch.distributed group; every rank passes its own queries and labels (and its own shard
    of the reference, any size, possibly empty) and gets the metrics of the union: the neighbours are searched
    with ``knn(..., process_group=)``, the centroid accuracies from all-reduced class statistics. "nmi" is left
    out (a k-means of the union is not computed; docs/sharding.md), and so is the metric selection (include /
    exclude raise a ValueError there).

    Returns:
        dict of Python floats in [0, 1], keyed by evaluate's names in :func:`select_metrics`'s order; by default
        "recall@{k}", "precision@{k}", "map@{k}", "ndcg@{k}" for each k in ks, "r_precision", "map@r", "nmi",
        "closest_center_accuracy", "range_accuracy".
    """
    if process_group is not None:
        if include or exclude:
            raise ValueError("include / exclude are not supported with process_group (the sharded evaluation "
                             "returns its fixed set of metrics)")
        return _sharded_evaluate(embeddings, labels, reference, reference_labels, ks, metric, max_k, process_group)
    reference, ks = _evaluate_args(embeddings, labels, reference, reference_labels, ks, max_k)
    names = select_metrics(ks, include, exclude)
    ranked = [name for name in names if name not in _UNRANKED]
    if not ranked:  # no neighbour search
        return {name: _UNRANKED[name](embeddings, labels) for name in names}
    largest_k = max((k for _, k in map(_per_k, ranked) if k is not None), default=1)
    if max_k < largest_k:
        raise ValueError(f"max_k must be >= the largest k of the metrics (ks, include) = {largest_k}, got {max_k}")
    leave_one_out = reference is None
    labels = labels.long()
    ref_labels = labels if leave_one_out else reference_labels.long()
    classes, counts = torch.unique(ref_labels, return_counts=True)
    num_relevant = _count_matches(labels, classes, counts) - int(leave_one_out)
    valid = num_relevant > 0
    available = embeddings.shape[0] - 1 if leave_one_out else reference.shape[0]
    num_neighbours = _num_neighbours((largest_k,), max_k, available, int(valid.sum()), int(num_relevant.max()),
                                     leave_one_out, stacklevel=2)
    _, indices = knn(embeddings, reference, num_neighbours, metric)
    sums = _ranking_sums(lambda rows: ref_labels[indices[rows]], labels, num_relevant, valid, ranked,
                         num_neighbours)
    out = {name: total / int(valid.sum()) for name, total in sums.items()}
    return {name: out[name] if name in out else _UNRANKED[name](embeddings, labels) for name in names}


def _sharded_evaluate(embeddings, labels, reference, reference_labels, ks, metric, max_k, group) -> dict:
    """`evaluate` over a process group: every rank passes its queries (and its reference shard) and gets
    the metrics of the union (docs/sharding.md). "nmi" is left out: k-means over shards is not the single-process
    k-means (see docs/sharding.md)."""
    with agreement(group):
        reference, ks = _evaluate_args(embeddings, labels, reference, reference_labels, ks, max_k,
                                               min_rows=0)
    leave_one_out = reference is None
    ks_key = hash(ks) & (2 ** 62 - 1)  # ints hash alike in every process
    info = exchange_checks(group, torch.tensor([1, len(embeddings), -1 if leave_one_out else len(reference),
                                                ks_key, max_k, 0]))
    shards._same(info, 3, "ks", None)
    shards._same(info, 4, "max_k")
    labels = labels.long()
    ref_labels = labels if leave_one_out else reference_labels.long()
    classes, counts, _ = shards.global_classes(ref_labels, group)
    num_relevant = _count_matches(labels, classes, counts) - int(leave_one_out)
    valid = num_relevant > 0
    mine = torch.tensor([int(valid.sum()), int(num_relevant.max()) if len(labels) else 0])
    summary = shards.all_gather(mine, group).view(-1, 2)
    num_valid = int(summary[:, 0].sum())
    available = int(info[:, shards._QUERIES].sum()) - 1 if leave_one_out else int(info[:, shards._REFERENCE].sum())
    num_neighbours = _num_neighbours(ks, max_k, available, num_valid, int(summary[:, 1].max()),
                                             leave_one_out, stacklevel=3)
    _, _, neighbour_labels = shards.search(embeddings, reference, num_neighbours, metric, group, ref_labels)
    ranked = [name for name in select_metrics(ks) if name not in _UNRANKED]
    sums = _ranking_sums(lambda rows: neighbour_labels[rows], labels, num_relevant, valid, ranked,
                                 num_neighbours)
    totals = shards.all_reduce(torch.tensor(list(sums.values()), dtype=torch.float64), group)
    out = {name: float(total) / num_valid for name, total in zip(sums, totals)}
    out.update(_centroid_metrics(embeddings, labels, group, int(info[:, shards._QUERIES].sum())))
    return out


def _centroid_metrics(embeddings, labels, group, total):
    """"closest_center_accuracy" and "range_accuracy" of the union of the ranks' queries: the class sums and
    counts (and the classes' radii) all-reduced over the classes of every rank, each sample scored where it lives."""
    classes, counts, inverse = shards.global_classes(labels, group)
    x = _statistics_input(embeddings)
    sums = torch.zeros(len(classes), x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, inverse, x)
    centroids = shards.all_reduce(sums, group) / counts.to(x.dtype)[:, None]
    closest = _closest_center(x, inverse, centroids).sum()
    own = _own_distances(x, inverse, centroids)
    radius = own.new_zeros(len(classes)).scatter_reduce_(0, inverse, own, reduce="amax")
    radius = shards.all_reduce(radius, group, "max")
    ranged = _range_values(x, inverse, centroids, radius).sum()
    totals = shards.all_reduce(torch.stack([closest, ranged]), group) / total
    return {"closest_center_accuracy": float(totals[0]), "range_accuracy": float(totals[1])}
