"""reduce="col": out_c = LSE_{i : labels_i != c} z[i, c] over rows, per class (the class-wise loss family).

Forward (_forward.py, not ROW_REDUCE): one program per (class tile, split of the row tiles) loops over its rows with
a running (max, sum) per class; the partial LSEs ([num_splits, C]) are merged by one logsumexp (one split when C
fills the GPU). Backward: _dw_kernel, one program per class tile looping over the batch: dW and dbias are
tile-local, and dX, which sums over every class tile, is accumulated by atomics from the same programs, so the
logits are recomputed once. Under torch.use_deterministic_algorithms(True), dX comes instead from _dx_kernel (row
tiles own their dX and loop over the classes in a fixed order): no atomics, bit-reproducible, one more logits
recomputation.
"""
import torch
import triton
import triton.language as tl

from ._forward import _lse_fwd_program, function_backward, function_forward


@triton.jit
def _col_lse_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, labels_ptr, rx_ptr, rw_ptr,  # inputs, as _lse_fwd_program
    lse_ptr,  # [num_splits, C] out: each class's LSE over the split's rows (-inf if empty)
    N, C, D,
    tiles_per_split,  # row tiles per program
    stride_xn, stride_xd, stride_wp, stride_wd,
    scale, shift, inv_gamma,  # z = scale * S + shift (+ bias); 1 / gamma
    K: tl.constexpr, HAS_BIAS: tl.constexpr, NORM_X: tl.constexpr, NORM_W: tl.constexpr,  # as _lse_fwd_program
    ACC: tl.constexpr, OP: tl.constexpr, PRECISION: tl.constexpr,  # accumulation / dot operand dtypes
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """The column reduce's forward: _lse_fwd_program without ROW_REDUCE, one program per (class tile, split)."""
    _lse_fwd_program(x_ptr, w_ptr, bias_ptr, labels_ptr, rx_ptr, rw_ptr, lse_ptr, N, C, D, tiles_per_split,
                     stride_xn, stride_xd, stride_wp, stride_wd, scale, shift, inv_gamma,
                     K, False, HAS_BIAS, NORM_X, NORM_W, ACC, OP, PRECISION, BLOCK_N, BLOCK_C, BLOCK_D)


class ColLSE(torch.autograd.Function):
    """class_lse(reduce="col") with a streaming backward; see metricloss_kernels.triton.class_lse."""

    @staticmethod
    def forward(ctx, x, w, bias, labels, options):
        return function_forward(ctx, _col_lse_fwd_kernel, False, x, w, bias, labels, options)

    @staticmethod
    def backward(ctx, grad):
        # Atomics unless deterministic algorithms are required (see the module docstring).
        return function_backward(ctx, grad, atomic_dx=not torch.are_deterministic_algorithms_enabled())
