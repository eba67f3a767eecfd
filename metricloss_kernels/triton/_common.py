"""Launch plumbing shared by the row- and column-reduce kernels: tile configuration, dtypes, normalisations."""
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .._numerics import NORM_EPS, compute_dtype, unit_rows

# Kernels are decorated at import time, so this is the mode they run in (CPU tensors need the interpreter).
INTERPRET = bool(triton.knobs.runtime.interpret)

# Upper bound on the fp32 scratch that split reductions / half-precision dW accumulation may allocate.
SCRATCH_BYTES = 64 * 2**20

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
              torch.float64: tl.float64}


@dataclass(frozen=True)
class TileConfig:
    """Tile sizes and launch parameters of one class_lse call.

    block_n x block_c is the logit tile (rows x classes; each class brings its K proxies, one tl.dot each),
    block_d the chunk of the embedding dimension streamed through each dot."""
    block_n: int
    block_c: int
    block_d: int
    num_warps: int
    num_stages: int


def tile_config(x: torch.Tensor, block_n=None, block_c=None, block_d=None) -> TileConfig:
    """Default tiles. Interpreter: small fixed tiles (its cost is per op, not per element). GPU: 64 x 64 logit
    tiles over 8 warps, D streamed in 64-element chunks (32 for fp32/fp64, whose chunks take twice the shared
    memory) through a 3-stage pipeline. The intra-class softmax keeps four 64 x 64 fp32 tiles live besides the
    MMA accumulator: compiled offline for sm_90a this gives wgmma, no register spills in the forward and at most
    a few hundred bytes in the backward for K = 10, where 4 warps or 64 x 128 tiles spill kilobytes.
    Not timed: no GPU was available when these were chosen."""
    d = x.shape[1]
    if INTERPRET:
        bn, bc, bd, warps, stages = 16, 16, 64, 1, 1
    else:
        bn, bc, bd, warps, stages = 64, 64, (32 if x.element_size() >= 4 else 64), 8, 3
    bd = min(bd, max(16, triton.next_power_of_2(d)))  # tl.dot needs every tile dimension >= 16
    return TileConfig(block_n or bn, block_c or bc, block_d or bd, warps, stages)


def num_splits(parallel_tiles: int, streamed_tiles: int, device, requested=None, cap=None) -> int:
    """How many programs share the streamed axis (classes for the row forward and the dX kernel, rows for the col
    forward), FlashDecoding style, so that a small batch still fills the GPU: enough for ~4 programs per SM (2
    under the interpreter, so that the CPU tests exercise the split merge), at most one per streamed tile and
    at most `cap`."""
    if requested is None:
        if INTERPRET:
            requested = 2
        else:
            sms = torch.cuda.get_device_properties(device).multi_processor_count
            requested = triton.cdiv(4 * sms, parallel_tiles)
    splits = max(1, min(requested, streamed_tiles, cap or requested))
    # Re-derive from the tiles per split so that no split is empty.
    return triton.cdiv(streamed_tiles, triton.cdiv(streamed_tiles, splits))


def dtypes(x: torch.Tensor, w: torch.Tensor):
    """(accumulation torch dtype, the same as a tl dtype, tl.dot operand dtype, input_precision) for x, w.

    Accumulation is fp32 (fp64 for fp64 inputs). Operands keep the input dtype when x and w share it (tensor cores
    for fp16/bf16), else both are upcast. fp32 dots follow torch's matmul precision setting, so that a Triton/torch
    comparison in one process compares like with like: "highest" -> exact fp32 ("ieee"), otherwise TF32."""
    acc = compute_dtype(x.dtype, w.dtype)
    op = x.dtype if x.dtype == w.dtype else acc
    precision = "ieee" if op != torch.float32 or torch.get_float32_matmul_precision() == "highest" else "tf32"
    return acc, _TL_DTYPES[acc], _TL_DTYPES[op], precision


@triton.jit
def _inv_norm_kernel(
    t_ptr,  # [R, D] rows to measure, any float dtype
    inv_ptr,  # [R] out: 1 / max(||t_r||, eps) (0 for a zero row)
    grad_ptr,  # [R] out: the normalisation's backward factor, 1 / ||t_r||, 0 for a dead row (norm <= eps)
    R, D,  # rows, row length
    stride_r, stride_d,  # strides of t
    eps,  # clamp of the norm
    ACC: tl.constexpr,  # accumulation dtype
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """The row normalisation rule of _numerics (unit_rows) for the kernels, in one pass: ||t|| = s * ||t / s||
    with s = max |t| kept as a running maximum (the sum of squares is rescaled when it grows), so that no square
    overflows or underflows; NaN or Inf in a row makes its factors NaN."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    r_ok = offs_r < R
    ptrs = t_ptr + offs_r.to(tl.int64)[:, None] * stride_r + offs_d[None, :] * stride_d
    s = tl.zeros((BLOCK_R,), dtype=ACC)  # running max |t|
    sq = tl.zeros((BLOCK_R,), dtype=ACC)  # sum of (t / s)^2
    for d0 in range(0, D, BLOCK_D):
        t = tl.load(ptrs, mask=r_ok[:, None] & (d0 + offs_d < D)[None, :], other=0.0).to(ACC)
        s_new = tl.maximum(s, tl.max(tl.abs(t), axis=1))
        r = 1.0 / tl.where(s_new > 0, s_new, 1.0)
        u = t * r[:, None]
        sq = sq * (s * r) * (s * r) + tl.sum(u * u, axis=1)
        s = s_new
        ptrs += BLOCK_D * stride_d
    n = tl.sqrt(sq)  # ||t / s||, in [1, sqrt(D)] (0 for a zero row)
    dead = n * s <= eps
    # A zero row's factor is 0: any factor leaves it 0, and 1 / eps would overflow an fp16 dot operand.
    inv = tl.where(dead, tl.where(s > 0, 1.0 / eps, 0.0), (1.0 / tl.where(s > 0, s, 1.0)) / tl.where(dead, 1.0, n))
    tl.store(inv_ptr + offs_r, inv, mask=r_ok)
    tl.store(grad_ptr + offs_r, tl.where(dead, 0.0, inv), mask=r_ok)


def inv_norms(t: torch.Tensor, acc: torch.dtype):
    """(1 / max(||t_r||, eps) (0 for a zero row), the normalisation's backward factor) per row of t [R, D] (_numerics.unit_rows's
    rule), accumulated in `acc` without materialising a converted or normalised copy of t. Rows are independent and
    masked, so the row block only sets the number of programs: up to 1024 rows each under the interpreter (whose
    cost is per program), 32 on a GPU."""
    r, d = t.shape
    inv = torch.empty(r, dtype=acc, device=t.device)
    grad = torch.empty_like(inv)
    block_r = min(1024, max(16, triton.next_power_of_2(r))) if INTERPRET else 32
    block_d = min(256 if not INTERPRET else 64, max(16, triton.next_power_of_2(d)))
    _inv_norm_kernel[(triton.cdiv(r, block_r),)](t, inv, grad, r, d, t.stride(0), t.stride(1), NORM_EPS,
                                                 ACC=_TL_DTYPES[acc], BLOCK_R=block_r, BLOCK_D=block_d)
    return inv, grad


class Problem:
    """One class_lse call prepared for the kernels: inputs, the spec (metricloss_kernels.lse.LSESpec), dtypes,
    tiles, and the normalisations (recomputed by the backward rather than saved): x^ = x normalised, O(N*D), in the
    dot operand dtype (the kernels read it as x: `x_in`), with its backward factors gx [N]; for W only its inverse
    norms rw and backward factors gw [C*K] (never a normalised copy of W)."""

    def __init__(self, x, w, labels, bias, spec):
        self.x, self.w, self.labels, self.bias, self.spec = x, w, labels.contiguous(), bias, spec
        self.n, self.d = x.shape
        self.k = spec.centers_per_class
        self.c = w.shape[0] // self.k
        self.acc, self.acc_tl, self.op_tl, self.precision = dtypes(x, w)
        self.normalize_x, self.normalize_w = spec.normalize_x, spec.normalize_w
        self.scale, self.shift, self.inv_gamma = spec.scale, spec.shift, 1.0 / spec.gamma
        self.cfg = tile_config(x, spec.block_rows or None, spec.block_classes or None, spec.block_d or None)
        self.splits = spec.num_splits or None
        if self.normalize_x:
            self.x_hat, self.gx = unit_rows(x, self.acc)
            self.x_in = self.x_hat.to(x.dtype if x.dtype == w.dtype else self.acc)  # the dot operand dtype
        else:
            self.x_hat = self.gx = None
            self.x_in = x
        self.rw, self.gw = inv_norms(w, self.acc) if self.normalize_w else (None, None)
        # Kernels ignore the pointers of disabled features; x stands in for them.
        self.bias_arg, self.gx_arg, self.rw_arg, self.gw_arg = (
            x if t is None else t for t in (bias, self.gx, self.rw, self.gw))
