"""reduce="row": out_i = LSE_{c != labels_i} z[i, c] over classes, per row of x (the row-wise loss family).

Forward (_forward.py, ROW_REDUCE): one program per (row tile, split of the class tiles) streams its classes with a
running (max, sum) per row; the splits' partial LSEs ([num_splits, N]) are merged by one logsumexp (FlashDecoding
style), so a batch of a few row tiles still fills the GPU. Backward: _dx_kernel (row tiles own dX, deterministic)
and _dw_kernel (class tiles own dW and dbias, looping over the rows, deterministic); no atomics anywhere, at the
price of recomputing the logits once per gradient. The row reduce has few row tiles and many class tiles, so the
alternative (dX by atomics from the class-tile programs) would add O(C/BLOCK_C * N * D) atomic traffic for that
one saved pass.
"""
import torch
import triton
import triton.language as tl

from ._forward import _lse_fwd_program, function_backward, function_forward


@triton.jit
def _row_lse_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, labels_ptr, rx_ptr, rw_ptr,  # inputs, as _lse_fwd_program
    lse_ptr,  # [num_splits, N] out: each row's LSE over the split's classes (-inf if empty)
    N, C, D,
    tiles_per_split,  # class tiles per program
    stride_xn, stride_xd, stride_wp, stride_wd,
    scale, shift, inv_gamma,  # z = scale * S + shift (+ bias); 1 / gamma
    K: tl.constexpr, HAS_BIAS: tl.constexpr, NORM_X: tl.constexpr, NORM_W: tl.constexpr,  # as _lse_fwd_program
    ACC: tl.constexpr, OP: tl.constexpr, PRECISION: tl.constexpr,  # accumulation / dot operand dtypes
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """The row reduce's forward: _lse_fwd_program with ROW_REDUCE, one program per (row tile, split)."""
    _lse_fwd_program(x_ptr, w_ptr, bias_ptr, labels_ptr, rx_ptr, rw_ptr, lse_ptr, N, C, D, tiles_per_split,
                     stride_xn, stride_xd, stride_wp, stride_wd, scale, shift, inv_gamma,
                     K, True, HAS_BIAS, NORM_X, NORM_W, ACC, OP, PRECISION, BLOCK_N, BLOCK_C, BLOCK_D)


class RowLSE(torch.autograd.Function):
    """class_lse(reduce="row") with a streaming backward; see metricloss_kernels.triton.class_lse."""

    @staticmethod
    def forward(ctx, x, w, bias, labels, options):
        return function_forward(ctx, _row_lse_fwd_kernel, True, x, w, bias, labels, options)

    @staticmethod
    def backward(ctx, grad):
        return function_backward(ctx, grad, atomic_dx=False)
