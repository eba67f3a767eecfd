"""Exact k-nearest-neighbour search: the C++ op ``torch.ops.metricloss_kernels.knn`` (csrc/) when the extension
``metricloss_kernels._C`` is built, otherwise a chunked torch path with the same results and tie rule.

Both compute the selection in fp32 for fp16/bf16 inputs (fp64 stays fp64) and never hold more than a block of the
Q x R score matrix. The results are not differentiable (the search runs without autograd).
"""
import warnings

import torch

from . import _validation as check
from ._numerics import compute_dtype, normalize

METRICS = ("cosine", "dot", "euclidean")

try:
    from . import _C  # noqa: F401  (loading the library registers the op)
    _EXTENSION_ERROR = None
except ImportError as error:  # not built: the chunked torch path below takes over
    _EXTENSION_ERROR = error

_warned = False
# Score entries per query block of the torch path (64 Mi fp32 = 256 MiB).
_TORCH_BLOCK_ELEMENTS = 1 << 26


def has_extension() -> bool:
    """True when the C++ op is loaded (``metricloss_kernels._C`` imported)."""
    return _EXTENSION_ERROR is None


if has_extension():
    @torch.library.register_fake("metricloss_kernels::knn")
    def _knn_fake(queries, reference, k, metric, exclude_self):
        return queries.new_empty(queries.shape[0], k), queries.new_empty(queries.shape[0], k, dtype=torch.long)


def _op_available(device: torch.device) -> bool:
    """The op is registered for CPU, and for CUDA when the extension was built with CUDA."""
    if not has_extension():
        return False
    return device.type == "cpu" or torch._C._dispatch_has_kernel_for_dispatch_key(
        "metricloss_kernels::knn", device.type.upper())


def knn(queries: torch.Tensor, reference: torch.Tensor | None = None, k: int = 10, metric: str = "cosine"):
    """The k nearest reference rows of every query.

    Args:
        queries: [Q, D] floating tensor.
        reference: [R, D] tensor with the dtype and device of ``queries``; None (or ``queries`` itself) searches
            ``queries`` against itself and excludes each query's own row (leave-one-out).
        k: number of neighbours, 1 <= k <= R (R - 1 when reference is None).
        metric: "cosine" or "dot" (similarities, largest first) or "euclidean" (distances, smallest first).

    Returns:
        (scores [Q, k] in the input dtype, indices [Q, k] int64): best first, ties broken towards the lower index.
    """
    check.tensor(queries, "queries")
    if not queries.is_floating_point():
        raise TypeError(f"queries must be a floating-point tensor, got dtype {queries.dtype}")
    if queries.dim() != 2 or queries.shape[1] == 0:
        raise ValueError(f"queries must be 2-D [Q, D] with D >= 1, got shape {tuple(queries.shape)}")
    exclude_self = reference is None or reference is queries  # the query set as reference: leave-one-out
    if exclude_self:
        reference = queries
    else:
        check.tensor(reference, "reference")
        if reference.dtype != queries.dtype:
            raise TypeError(f"reference must have the dtype of queries ({queries.dtype}), got {reference.dtype}")
        if reference.dim() != 2 or reference.shape[1] != queries.shape[1]:
            raise ValueError(f"reference must have shape [R, {queries.shape[1]}] (the queries' D), "
                             f"got {tuple(reference.shape)}")
        if reference.device != queries.device:
            raise ValueError(f"reference must be on the queries' device {queries.device}, got {reference.device}")
    available = reference.shape[0] - 1 if exclude_self else reference.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= available:
        what = "the number of queries minus 1 (self excluded)" if exclude_self else "the reference size"
        raise ValueError(f"k must be an integer in [1, {available}] ({what}), got {k!r}")
    check.choice(metric, "metric", METRICS)
    for name, x in (("queries", queries), ("reference", reference)):
        if not exclude_self or name == "queries":
            if not bool(torch.isfinite(x).all()):
                raise ValueError(f"{name} contains NaN or infinite values")

    queries, reference = queries.detach(), reference.detach()
    if _op_available(queries.device):
        return torch.ops.metricloss_kernels.knn(queries, reference, k, metric, exclude_self)
    _warn_fallback(queries.device)
    return knn_torch(queries, reference, k, metric, exclude_self)


def _warn_fallback(device: torch.device) -> None:
    global _warned
    if not _warned:
        why = f"it failed to import ({_EXTENSION_ERROR})" if _EXTENSION_ERROR else f"it has no {device.type} kernel"
        warnings.warn(f"metricloss_kernels: the C++ knn op is not available ({why}); using the chunked torch path",
                      RuntimeWarning, stacklevel=3)
        _warned = True


@torch.no_grad()
def knn_torch(queries: torch.Tensor, reference: torch.Tensor, k: int, metric: str, exclude_self: bool,
              block_elements: int = _TORCH_BLOCK_ELEMENTS):
    """The chunked torch path of :func:`knn` (arguments already validated; same results as the C++ op).

    Scores a block of queries against the whole reference with one matmul (``block_elements`` bounds the block),
    selects with ``topk`` and then repairs ``topk``'s arbitrary tie order: every value above the k-th is kept,
    plus the lowest-index entries equal to it, sorted by (value, index).
    """
    out_dtype = queries.dtype
    compute = compute_dtype(out_dtype)
    q, r = queries.to(compute), reference.to(compute)
    if metric == "cosine":
        q, r = normalize(q, dim=1), normalize(r, dim=1)
    elif metric == "euclidean":  # select on 2 q.r - ||r||^2 = ||q||^2 - d^2, as the C++ op does
        offsets = r.square().sum(1)
        query_sq = q.square().sum(1)
        q = q * 2
    num_q, num_r = q.shape[0], r.shape[0]
    block = max(1, min(num_q, block_elements // max(num_r, 1)))
    values = torch.empty(num_q, k, dtype=compute, device=q.device)
    indices = torch.empty(num_q, k, dtype=torch.long, device=q.device)
    for q0 in range(0, num_q, block):
        s = q[q0:q0 + block] @ r.T
        if metric == "euclidean":
            s -= offsets
        if exclude_self:
            rows = torch.arange(s.shape[0], device=s.device)
            s[rows, rows + q0] = -torch.inf
        kth = s.topk(k, dim=1, sorted=False).values.min(dim=1, keepdim=True).values
        keep = s >= kth
        excess = keep.sum(dim=1) > k  # rows where entries tied with the k-th value overflow k
        if bool(excess.any()):
            rows_x = excess.nonzero()[:, 0]
            sx, kx = s[rows_x], kth[rows_x]
            need = k - (sx > kx).sum(dim=1, keepdim=True)
            keep[rows_x] = (sx > kx) | ((sx == kx) & (torch.cumsum(sx == kx, dim=1) <= need))
        picked = keep.nonzero()[:, 1].view(-1, k)  # k per row, in increasing index order
        v = s.gather(1, picked)
        v, order = v.sort(dim=1, descending=True, stable=True)
        values[q0:q0 + block] = v
        indices[q0:q0 + block] = picked.gather(1, order)
    if metric == "euclidean":
        values = (query_sq[:, None] - values).clamp_min(0).sqrt()
        # order by (distance, index): the clamp can tie neighbours that the selection value told apart
        indices, order = indices.sort(dim=1)
        values, order = values.gather(1, order).sort(dim=1, stable=True)
        indices = indices.gather(1, order)
    return values.to(out_dtype), indices
