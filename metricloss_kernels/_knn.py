"""The single-process exact k-nearest-neighbour search behind `metricloss_kernels.retrieval.knn`: the C++ op
``torch.ops.metricloss_kernels.knn`` (csrc/) when the extension ``metricloss_kernels._C`` is built, otherwise a
chunked torch path with the same results and tie rule.

Both compute the selection in fp32 for fp16/bf16 inputs (fp64 stays fp64), re-rank euclidean candidates by their
direct fp64 distance, and never hold more than a block of the Q x R score matrix. The results are not
differentiable (the search runs without autograd).
"""
import math
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


def check_inputs(queries, reference, metric):
    """Checks knn's queries, reference and metric (not k). Returns (exclude_self, the reference: queries when
    leave-one-out)."""
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
    check.choice(metric, "metric", METRICS)
    for name, x in (("queries", queries), ("reference", reference)):
        if (not exclude_self or name == "queries") and not check.all_finite(x):
            raise ValueError(f"{name} contains NaN or infinite values")
    return exclude_self, reference


def search(queries, reference, k, metric, exclude_self):
    """`retrieval.knn` on checked arguments: the C++ op, or the chunked torch path where the op is missing."""
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
                      RuntimeWarning, stacklevel=4)
        _warned = True


@torch.no_grad()
def knn_torch(queries: torch.Tensor, reference: torch.Tensor, k: int, metric: str, exclude_self: bool,
              block_elements: int = _TORCH_BLOCK_ELEMENTS):
    """The chunked torch path of :func:`knn` (arguments already validated; same results as the C++ op).

    Scores a block of queries against the whole reference with one matmul (``block_elements`` bounds the block),
    selects with ``topk`` and then repairs ``topk``'s arbitrary tie order: every value above the k-th is kept,
    plus the lowest-index entries equal to it, sorted by (value, index). Euclidean: see ``_euclidean_torch``.
    """
    out_dtype = queries.dtype
    compute = compute_dtype(out_dtype)
    q, r = queries.to(compute), reference.to(compute)
    if metric == "euclidean":
        values, indices = _euclidean_torch(q, r, k, exclude_self, block_elements)
        return values.to(out_dtype), indices
    if metric == "cosine":
        q, r = normalize(q, dim=1), normalize(r, dim=1)
    num_q, num_r = q.shape[0], r.shape[0]
    block = max(1, min(num_q, block_elements // max(num_r, 1)))
    values = torch.empty(num_q, k, dtype=compute, device=q.device)
    indices = torch.empty(num_q, k, dtype=torch.long, device=q.device)
    for q0 in range(0, num_q, block):
        s = q[q0:q0 + block] @ r.T
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
    return values.to(out_dtype), indices


def _gemm_input_roundoff(x: torch.Tensor) -> float:
    """Unit roundoff of a matmul's inputs: torch.set_float32_matmul_precision("medium" / "high") lets fp32
    matmuls round them to bf16 (8 significant bits) / tf32 (11)."""
    if x.dtype != torch.float32:
        return 0.0
    backend = torch.backends.cuda.matmul if x.device.type == "cuda" else torch.backends.mkldnn.matmul
    return {"bf16": 2.0 ** -8, "tf32": 2.0 ** -11}.get(backend.fp32_precision, 0.0)


def _euclidean_torch(q, r, k, exclude_self, block_elements):
    """The euclidean search of :func:`knn_torch` (q, r in the compute dtype), as the C++ op does it
    (csrc/cpu/knn_kernel.cpp, "Euclidean exactness"): centred GEMM values 2 a.b - ||b||^2 keep, per query, every
    reference row within the GEMM's error bound (slack) of the k-th best value, and those rows are ranked by
    their direct fp64 distance. Returns (distances, indices) [Q, k]."""
    centre = r[::max(1, r.shape[0] // 1024)].mean(0, keepdim=True)  # any centre is exact: it only sets rho
    a, b = q - centre, r - centre
    offsets = b.square().sum(1)
    u = torch.finfo(q.dtype).eps / 2
    du = q.shape[1] * u
    gamma = du / (1 - du) if du < 0.5 else math.inf
    rho = a.double().square().sum(1).sqrt() + offsets.max().double().sqrt()
    slack = (6 * (gamma + _gemm_input_roundoff(q) + 4 * u) * rho.square()).to(q.dtype)  # inf where it overflows
    a = a * 2  # exact: the matmul yields 2 a.b
    num_q, num_r = q.shape[0], r.shape[0]
    block = max(1, min(num_q, block_elements // max(num_r, 1)))
    values = torch.empty(num_q, k, dtype=q.dtype, device=q.device)
    indices = torch.empty(num_q, k, dtype=torch.long, device=q.device)
    for q0 in range(0, num_q, block):
        s = a[q0:q0 + block] @ b.T
        s -= offsets
        rows = torch.arange(s.shape[0], device=s.device)
        if exclude_self:
            s[rows, rows + q0] = -torch.inf
        kth = s.topk(k, dim=1, sorted=False).values.min(dim=1, keepdim=True).values
        window = ~(s < kth - slack[q0:q0 + block, None])  # a value the bound cannot place (nan) stays in
        if exclude_self:
            window[rows, rows + q0] = False
        del s
        d2, indices[q0:q0 + block] = _nearest_in_window(q[q0:q0 + block], r, window, k, block_elements)
        values[q0:q0 + block] = d2.sqrt().to(q.dtype)  # the op takes this sqrt too (ATen's, not libm's)
    return values, indices


def _nearest_in_window(q, r, window, k, block_elements):
    """The k nearest (squared fp64 distance [Q, k], index [Q, k]) of every query q[i] among the reference rows
    where window[i] is True (at least k per query), ties to the lower index. The (query, row) pairs are taken
    about block_elements / (2 D) at a time (whole queries; one query's pairs measured that many at a time)."""
    counts = window.sum(dim=1)
    ends = counts.cumsum(0)
    budget = max(1, block_elements // (2 * q.shape[1]))
    d2_out = torch.empty(q.shape[0], k, dtype=torch.float64, device=q.device)
    indices = torch.empty(q.shape[0], k, dtype=torch.long, device=q.device)
    i0 = 0
    while i0 < q.shape[0]:
        before = int(ends[i0 - 1]) if i0 else 0
        limit = torch.tensor([before + budget], device=ends.device)
        i1 = max(i0 + 1, int(torch.searchsorted(ends, limit, right=True)))
        rows, cols = window[i0:i1].nonzero(as_tuple=True)
        d2 = torch.cat([_squared_distances(q[i0 + rows[p:p + budget]], r[cols[p:p + budget]])
                        for p in range(0, len(rows), budget)])
        # pairs come ordered by (row, col): two stable sorts order them by (row, d2, col)
        order = torch.sort(d2, stable=True).indices
        order = order[torch.sort(rows[order], stable=True).indices]
        rows = rows[order]
        rank = torch.arange(len(order), device=rows.device) - (ends[i0 + rows] - counts[i0 + rows] - before)
        keep = rank < k
        d2_out[i0:i1] = d2[order][keep].view(-1, k)
        indices[i0:i1] = cols[order][keep].view(-1, k)
        i0 = i1
    return d2_out, indices


def _squared_distances(x, y):
    """||x_p - y_p||^2 [P] in fp64 for rows x, y [P, D], summed in coordinate order (as the C++ op sums, so the
    two paths give the same bits)."""
    diff = (x.double() - y.double()).T
    total = torch.zeros(diff.shape[1], dtype=torch.float64, device=diff.device)
    for column in diff:
        total += column * column
    return total
