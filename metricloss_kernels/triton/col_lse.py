"""reduce="col": out_c = LSE_{i : labels_i != c} z[i, c] over rows, per class (the class-wise loss family).

Forward: one program per (class tile, split of the row tiles) loops over its rows with a running (max, sum) per
class; the partial LSEs ([num_splits, C]) are merged by one logsumexp (one split when C fills the GPU).
Backward: _dw_kernel, one program per class tile looping over the batch: dW and dbias are tile-local, and dX,
which sums over every class tile, is accumulated by atomics from the same programs, so the logits are recomputed
once. Under torch.use_deterministic_algorithms(True), dX comes instead from _dx_kernel (row tiles own their dX
and loop over the classes in a fixed order): no atomics, bit-reproducible, one more logits recomputation.
"""
import torch
import triton
import triton.language as tl

from . import _common
from ._backward import backward
from ._tiles import _class_similarity, _load_inv, _logits_z, _lse_terms


@triton.jit
def _col_lse_fwd_kernel(
    x_ptr,  # [N, D] embeddings
    w_ptr,  # [C*K, D] proxies, class-major
    bias_ptr,  # [C] class bias (read only if HAS_BIAS)
    labels_ptr,  # [N] int64: rows labelled c are left out of class c's LSE
    rx_ptr,  # [N] inverse norms of x (read only if NORM_X)
    rw_ptr,  # [C*K] inverse norms of w (read only if NORM_W)
    lse_ptr,  # [num_splits, C] out: each class's LSE over the split's rows (-inf if empty)
    N, C, D,
    tiles_per_split,  # row tiles per program
    stride_xn, stride_xd, stride_wp, stride_wd,
    scale, shift, inv_gamma,  # z = scale * S + shift (+ bias); 1 / gamma
    K: tl.constexpr,  # proxies per class
    HAS_BIAS: tl.constexpr, NORM_X: tl.constexpr, NORM_W: tl.constexpr,
    ACC: tl.constexpr, OP: tl.constexpr, PRECISION: tl.constexpr,  # accumulation / dot operand dtypes
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    run_max = tl.full((BLOCK_C,), float("-inf"), ACC)
    run_sum = tl.zeros((BLOCK_C,), dtype=ACC)
    t0 = pid_s * tiles_per_split
    for t in range(t0, tl.minimum(t0 + tiles_per_split, tl.cdiv(N, BLOCK_N))):
        offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        labels = tl.load(labels_ptr + offs_n, mask=n_ok, other=-1)
        rx = _load_inv(rx_ptr, offs_n, N, NORM_X, ACC)
        s_cls, _, _ = _class_similarity(x_ptr, w_ptr, rx, rw_ptr, offs_n, offs_c, N, C, D,
                                        stride_xn, stride_xd, stride_wp, stride_wd, inv_gamma,
                                        K, NORM_W, ACC, OP, PRECISION, BLOCK_N, BLOCK_C, BLOCK_D)
        z = _logits_z(s_cls, offs_c, bias_ptr, C, scale, shift, HAS_BIAS)
        z = tl.where(_lse_terms(offs_n, offs_c, labels, N, C), z, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(z, axis=0))
        # While a class has seen no term its max is -inf: shift by 0 instead, so exp() never sees -inf - -inf.
        shift_by = tl.where(new_max == float("-inf"), 0.0, new_max)
        run_sum = run_sum * tl.exp(run_max - shift_by) + tl.sum(tl.exp(z - shift_by[None, :]), axis=0)
        run_max = new_max
    # run_sum == 0 only where run_max == -inf (no term): the sum is then -inf, without evaluating log(0).
    lse = run_max + tl.log(tl.where(run_sum > 0, run_sum, 1.0))
    tl.store(lse_ptr + pid_s * C + offs_c, lse, mask=c_ok)


def col_lse_forward(p: "_common.Problem", splits=None) -> torch.Tensor:
    """LSE per class, [C] in the accumulation dtype."""
    cfg = p.cfg
    row_tiles, class_tiles = triton.cdiv(p.n, cfg.block_n), triton.cdiv(p.c, cfg.block_c)
    splits = _common.num_splits(class_tiles, row_tiles, p.x.device, splits)
    partial = torch.empty((splits, p.c), dtype=p.acc, device=p.x.device)
    _col_lse_fwd_kernel[(class_tiles, splits)](
        p.x, p.w, p.bias_arg, p.labels, p.rx_arg, p.rw_arg, partial,
        p.n, p.c, p.d, triton.cdiv(row_tiles, splits),
        p.x.stride(0), p.x.stride(1), p.w.stride(0), p.w.stride(1),
        p.scale, p.shift, p.inv_gamma,
        K=p.k, HAS_BIAS=p.bias is not None, NORM_X=p.normalize_x, NORM_W=p.normalize_w,
        ACC=p.acc_tl, OP=p.op_tl, PRECISION=p.precision,
        BLOCK_N=cfg.block_n, BLOCK_C=cfg.block_c, BLOCK_D=cfg.block_d,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return partial[0] if splits == 1 else torch.logsumexp(partial, dim=0)


class ColLSE(torch.autograd.Function):
    """class_lse(reduce="col") with a streaming backward; see metricloss_kernels.triton.class_lse."""

    @staticmethod
    def forward(ctx, x, w, bias, labels, options):
        p = _common.Problem(x, w, labels, bias, options)
        lse = col_lse_forward(p, options.num_splits)
        ctx.save_for_backward(*p.tensors(), lse)
        ctx.options = options
        return lse

    @staticmethod
    def backward(ctx, grad):
        *tensors, lse = ctx.saved_tensors
        p = _common.Problem.restore(tensors, ctx.options)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx, dw, db = backward(p, lse, grad, row_reduce=False, need_x=need_x, need_w=need_w, need_b=need_b,
                              atomic_dx=not torch.are_deterministic_algorithms_enabled(),
                              splits=ctx.options.num_splits)
        return dx, dw, db, None, None
