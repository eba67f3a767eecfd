"""k-means for the clustering metrics (NMI): greedy k-means++ seeding, then Lloyd iterations whose assignment step
is the library's exact kNN op (a blocked GEMM with a per-row selection, k = 1), so no [N, n_clusters] matrix is
held. Deterministic for a given seed (a torch.Generator drives the seeding; Lloyd has no randomness).

The rules follow scikit-learn's KMeans (lloyd, n_init=1) so that the clusterings are comparable: the data are centred
first, the seeding tries 2 + floor(ln n_clusters) candidates per centre and keeps the one that lowers the potential
most, iterations stop when the summed squared centre shift falls to tol x the mean per-feature variance (or the
labels stop changing), an empty cluster takes the point farthest from its centre, and the returned labels are the
assignment to the final centres. The data are centred in fp64 and then clustered in fp32 whatever their dtype (so an
fp32 tensor and its fp64 copy get the same clusters); centre sums in fp64.
"""
import math

import torch

from . import _parallel
from .retrieval import knn


def _sq_distances(x: torch.Tensor, x_sq: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Squared distances [c, N] of c centres to every row of x [N, D] (x_sq = ||x||^2 [N]), clamped at 0."""
    return torch.addmm(x_sq, centres, x.T, alpha=-2).add_(centres.square().sum(1, keepdim=True)).clamp_min_(0)


def _seed(x: torch.Tensor, n_clusters: int, generator: torch.Generator) -> torch.Tensor:
    """Greedy k-means++: centres [n_clusters, D] chosen among the rows of x."""
    trials = 2 + int(math.log(n_clusters))
    x_sq = x.square().sum(1)
    chosen = torch.empty(n_clusters, dtype=torch.long, device=x.device)
    chosen[0] = torch.randint(x.shape[0], (1,), generator=generator, device=x.device)
    closest = _sq_distances(x, x_sq, x[chosen[:1]])[0]
    for c in range(1, n_clusters):
        # candidates drawn with probability proportional to the squared distance to the nearest centre so far
        cumulative = closest.double().cumsum(0)
        u = torch.rand(trials, generator=generator, dtype=torch.float64, device=x.device) * cumulative[-1]
        candidates = torch.searchsorted(cumulative, u).clamp_max_(x.shape[0] - 1)
        with_candidate = torch.minimum(closest, _sq_distances(x, x_sq, x[candidates]))
        best = with_candidate.double().sum(1).argmin()
        chosen[c], closest = candidates[best], with_candidate[best]
    return x[chosen]


def _update(x64: torch.Tensor, labels: torch.Tensor, distances: torch.Tensor, n_clusters: int) -> torch.Tensor:
    """Centres [n_clusters, D] (fp32) = the means of their points (x64 [N, D] fp64); an empty cluster takes the
    point farthest from its centre."""
    sums = torch.zeros(n_clusters, x64.shape[1], dtype=torch.float64, device=x64.device).index_add_(0, labels, x64)
    counts = torch.bincount(labels, minlength=n_clusters)
    empty = (counts == 0).nonzero()[:, 0]
    centres = (sums / counts.clamp_min(1)[:, None]).float()
    if len(empty):
        centres[empty] = x64[distances.topk(len(empty)).indices].float()
    return centres


def kmeans(x: torch.Tensor, n_clusters: int, seed: int = 0, max_iter: int = 300, tol: float = 1e-4) -> torch.Tensor:
    """Cluster the rows of ``x`` [N, D] (finite, floating; N >= n_clusters >= 1) into ``n_clusters`` clusters.

    Returns the cluster of every row: long [N] with values in [0, n_clusters). Arguments are not validated here
    (the callers do it).
    """
    x = x.detach().double()
    x = (x - x.mean(0)).float()  # centred, ||x||^2 - 2 x.c + ||c||^2 does not cancel for data far from the origin
    generator = torch.Generator(device=x.device).manual_seed(seed)
    # a few small ops per centre: single-threaded, so that none waits for a descheduled thread
    centres = _parallel.serial(lambda: _seed(x, n_clusters, generator), x)
    x64 = x.double()  # the centre sums' operand
    threshold = tol * float(x64.var(0, unbiased=False).mean())
    for _ in range(max_iter):
        distances, labels = knn(x, centres, 1, "euclidean")
        new = _update(x64, labels[:, 0], distances[:, 0], n_clusters)
        shift = float((new - centres).double().square().sum())
        centres = new
        if shift <= threshold:
            break
    return knn(x, centres, 1, "euclidean")[1][:, 0]
