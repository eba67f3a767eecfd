"""Exact k-nearest-neighbour search, `knn`: in one process by the C++ op ``torch.ops.metricloss_kernels.knn``
(csrc/; a chunked torch path with the same results and tie rule where the extension is not built,
`metricloss_kernels._knn`), or over the shards of a process group (`metricloss_kernels.distributed_eval`).

Both compute the selection in fp32 for fp16/bf16 inputs (fp64 stays fp64), re-rank euclidean candidates by their
direct fp64 distance, and never hold more than a block of the Q x R score matrix. The results are not
differentiable (the search runs without autograd).
"""
import torch

from ._knn import METRICS, check_inputs, has_extension, knn_torch, search
from .distributed_eval import sharded_knn

__all__ = ["METRICS", "has_extension", "knn", "knn_torch"]


def knn(queries: torch.Tensor, reference: torch.Tensor | None = None, k: int = 10, metric: str = "cosine",
        process_group=None):
    """The k nearest reference rows of every query.

    Args:
        queries: [Q, D] floating tensor.
        reference: [R, D] tensor with the dtype and device of ``queries``; None (or ``queries`` itself) searches
            ``queries`` against itself and excludes each query's own row (leave-one-out).
        k: number of neighbours, 1 <= k <= R (R - 1 when reference is None).
        metric: "cosine" or "dot" (similarities, largest first) or "euclidean" (distances, smallest first).
        process_group: a torch.distributed group (e.g. ``torch.distributed.group.WORLD``): every rank passes its own
            queries [Q_r, D] and its own shard of the reference [R_r, D] (either may be empty), or None everywhere
            for leave-one-out over the union of the ranks' queries; each rank gets its queries' neighbours in the
            union of the shards, with global indices (the ranks' rows concatenated in rank order). See
            :mod:`.distributed_eval` and docs/sharding.md.

    Returns:
        (scores [Q, k] in the input dtype, indices [Q, k] int64): best first, ties broken towards the lower index.

    Exactness: "cosine" and "dot" rank by GEMM scores (fp32, or fp64 for fp64 inputs). "euclidean" returns the k
    nearest by the distance ||q - r|| computed directly from the inputs in fp64, wherever the data lie (an exact
    copy is at distance 0), and that distance rounded to the input dtype: a centred GEMM only proposes
    candidates, and every row within the GEMM's rounding-error bound of the k-th best is measured directly. Rows
    crowding that bound (tight clusters far apart relative to their spread) cost time, never accuracy.
    """
    if process_group is not None:
        return sharded_knn(queries, reference, k, metric, process_group)
    exclude_self, reference = check_inputs(queries, reference, metric)
    available = reference.shape[0] - 1 if exclude_self else reference.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= available:
        what = "the number of queries minus 1 (self excluded)" if exclude_self else "the reference size"
        raise ValueError(f"k must be an integer in [1, {available}] ({what}), got {k!r}")
    return search(queries, reference, k, metric, exclude_self)
