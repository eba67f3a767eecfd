"""class_lse's forward kernel and its launcher, for both reductions (the op itself: metricloss_kernels.lse).

reduce="row" (ROW_REDUCE): out_i = LSE_{c != labels_i} z[i, c] over classes, per row of x (the row-wise losses).
One program per (row tile, split of the class tiles) streams its classes with a running (max, sum) per row.

reduce="col": out_c = LSE_{i : labels_i != c} z[i, c] over rows, per class (the class-wise losses). One program per
(class tile, split of the row tiles) loops over its rows with a running (max, sum) per class.

The backward of both (_backward.py): _dx_kernel (row tiles own dX, looping over the classes) and _dw_kernel (class
tiles own dW and dbias, looping over the rows); no atomics, deterministic, at the price of recomputing the logits
once per gradient.

The splits' partial LSEs ([num_splits, N] or [num_splits, C]) are merged by one logsumexp (FlashDecoding style), so
that a few output tiles still fill the GPU.
"""
import torch
import triton
import triton.language as tl

from . import _common
from ._tiles import _class_similarity, _logits_z, _lse_step, _lse_terms


@triton.jit
def _lse_fwd_kernel(
    x_ptr,  # [N, D] embeddings, normalised if the op normalises them
    w_ptr,  # [C*K, D] proxies, class-major
    bias_ptr,  # [C] class bias (read only if HAS_BIAS)
    labels_ptr,  # [N] int64: row i is left out of class labels_i's LSE terms
    offset_ptr,  # [N] the row offset, subtracted from row i's logits (read only if HAS_OFFSET: ROW_REDUCE)
    rx_ptr, rw_ptr,  # [N] inverse norms of x (read only if RAW_X), [C*K] of w (read only if NORM_W)
    lse_ptr,  # [num_splits, N] if ROW_REDUCE else [num_splits, C], out: LSE over the split's terms (-inf if empty)
    N, C, D,
    tiles_per_split,  # streamed tiles (class tiles if ROW_REDUCE, else row tiles) per program
    stride_xn, stride_xd, stride_wp, stride_wd,
    scale, shift, inv_gamma,  # z = scale * S - offset + shift (+ bias); 1 / gamma
    K: tl.constexpr,  # proxies per class
    POOL_MAX: tl.constexpr,  # S = max_k l (pool="max") rather than the intra-class softmax
    ROW_REDUCE: tl.constexpr,  # LSE over classes per row (else over rows per class)
    HAS_BIAS: tl.constexpr,
    HAS_OFFSET: tl.constexpr,
    RAW_X: tl.constexpr,  # x comes as it is (fp16), with its inverse norms rx
    NORM_W: tl.constexpr,
    ACC: tl.constexpr, OP: tl.constexpr, PRECISION: tl.constexpr,  # accumulation / dot operand dtypes
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (i, s): output tile i, split s of the streamed axis."""
    pid_s = tl.program_id(1)
    if ROW_REDUCE:  # own rows (loaded once), stream class tiles
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        labels = tl.load(labels_ptr + offs_n, mask=offs_n < N, other=-1)
        offs_out = offs_n
        n_out = N
        streamed_tiles = tl.cdiv(C, BLOCK_C)
    else:  # own classes, stream row tiles
        offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        offs_out = offs_c
        n_out = C
        streamed_tiles = tl.cdiv(N, BLOCK_N)
    AXIS: tl.constexpr = 1 if ROW_REDUCE else 0  # the reduced axis of a [BLOCK_N, BLOCK_C] tile
    BLOCK_OUT: tl.constexpr = BLOCK_N if ROW_REDUCE else BLOCK_C
    run_max = tl.full((BLOCK_OUT,), float("-inf"), ACC)
    run_sum = tl.zeros((BLOCK_OUT,), dtype=ACC)
    t0 = pid_s * tiles_per_split
    for t in range(t0, tl.minimum(t0 + tiles_per_split, streamed_tiles)):
        if ROW_REDUCE:
            offs_c = t * BLOCK_C + tl.arange(0, BLOCK_C)
        else:
            offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
            labels = tl.load(labels_ptr + offs_n, mask=offs_n < N, other=-1)
        s_cls = _class_similarity(x_ptr, w_ptr, rx_ptr, rw_ptr, offs_n, offs_c, N, C, D,
                                  stride_xn, stride_xd, stride_wp, stride_wd, inv_gamma,
                                  K, POOL_MAX, RAW_X, NORM_W, ACC, OP, PRECISION, BLOCK_N, BLOCK_C, BLOCK_D)
        z = _logits_z(s_cls, offs_n, offs_c, bias_ptr, offset_ptr, N, C, scale, shift, HAS_BIAS, HAS_OFFSET)
        z = tl.where(_lse_terms(offs_n, offs_c, labels, N, C), z, float("-inf"))
        run_max, run_sum = _lse_step(run_max, run_sum, z, AXIS)
    # run_sum == 0 only where run_max == -inf (no term): the sum is then -inf, without evaluating log(0).
    lse = run_max + tl.log(tl.where(run_sum > 0, run_sum, 1.0))
    tl.store(lse_ptr + pid_s * n_out + offs_out, lse, mask=offs_out < n_out)


def lse_forward(p: "_common.Problem") -> torch.Tensor:
    """LSE per row ([N], reduce="row") or per class ([C]) in the accumulation dtype."""
    cfg, row_reduce = p.config("fwd"), p.spec.row
    row_tiles, class_tiles = triton.cdiv(p.n, cfg.block_n), triton.cdiv(p.c, cfg.block_c)
    out_tiles, streamed_tiles, n_out = (row_tiles, class_tiles, p.n) if row_reduce else (class_tiles, row_tiles, p.c)
    splits = _common.num_splits(out_tiles, streamed_tiles, p.x.device, p.splits)
    partial = torch.empty((splits, n_out), dtype=p.acc, device=p.x.device)
    _lse_fwd_kernel[(out_tiles, splits)](
        p.x_in, p.w, p.bias_arg, p.labels, p.offset_arg, p.rx_arg, p.rw_arg, partial,
        p.n, p.c, p.d, triton.cdiv(streamed_tiles, splits),
        p.x_in.stride(0), p.x_in.stride(1), p.w.stride(0), p.w.stride(1),
        p.scale, p.shift, p.inv_gamma, **p.launch_meta(_lse_fwd_kernel, cfg))
    return partial[0] if splits == 1 else torch.logsumexp(partial, dim=0)


def forward(x, w, labels, bias, spec, offset=None):
    """The op's forward on the kernels (argument order of metricloss_kernels.lse; offset: the row offset [N] or
    None): [N] or [C], accumulation dtype."""
    return lse_forward(_common.Problem(x, w, labels, bias, spec, offset))


def compile_cases(D: int, K: int, reduce: str, dtype: torch.dtype, precision: str, arch: int) -> list[dict]:
    """tools/kernel_report.py's cases of this module: the forward kernel as lse_forward specialises it for inputs
    of `dtype` with a bias, normalised proxies and, for reduce="row", the row offset, for both pools when K > 1."""
    precision = _common.case_precision(precision)
    cfg = _common.tile_config("fwd", arch, dtype, precision, D, K)
    pointers = {"x_ptr": dtype, "w_ptr": dtype, "bias_ptr": dtype, "labels_ptr": torch.int64}
    return [_common.compile_case(_lse_fwd_kernel, _common.constexprs(
        _lse_fwd_kernel, cfg, K, reduce == "row", dtype, precision, has_offset=reduce == "row", pool_max=pool == "max"),
        cfg, pointers, pool=pool) for pool in _common.case_pools(K)]
