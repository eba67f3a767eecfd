"""Launch plumbing shared by the row- and column-reduce kernels: tile configuration, dtypes, normalisations."""
from dataclasses import asdict, dataclass

import torch
import triton
import triton.language as tl

from .._numerics import NORM_EPS, compute_dtype, unit_rows

# Kernels are decorated at import time, so this is the mode they run in (CPU tensors need the interpreter).
INTERPRET = bool(triton.knobs.runtime.interpret)

# Upper bound on the fp32 partial dX of the splits of the dX kernel (FlashDecoding style).
SCRATCH_BYTES = 64 * 2**20

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
              torch.float64: tl.float64}


def input_precision(op: torch.dtype) -> str:
    """tl.dot's input_precision for operands of dtype `op`, the one place it is chosen: fp32 operands run on the
    tensor cores as TF32, split in three ("tf32x3", fp32-accurate) under torch's default
    float32_matmul_precision("highest") and plain "tf32" under "high"/"medium", so that a Triton/torch comparison
    in one process compares like with like. Other dtypes ignore it ("ieee")."""
    if op != torch.float32:
        return "ieee"
    return "tf32x3" if torch.get_float32_matmul_precision() == "highest" else "tf32"


@dataclass(frozen=True)
class TileConfig:
    """Tile sizes and launch parameters of one kernel launch.

    block_n x block_c is the logit tile (rows x classes, each class with its K proxies), block_d the chunk of the
    embedding dimension streamed through the logit dots. The backward kernels hold the gradient of a
    block_out-wide slice of D on chip (the whole of D up to 512 columns on a GPU; wider D is split over programs,
    each recomputing the logits)."""
    block_n: int
    block_c: int
    block_d: int
    num_warps: int
    num_stages: int
    block_out: int = 0


# GPU tiles per (kernel, dot operand dtype, arch): (block_n, proxy slots, block_d, warps, stages, widest block_out);
# proxy slots: the forward's classes a tile (one dot per proxy slot k), the backward's proxy slots a class tile
# (tile_config). Every entry compiles for its architecture with MMA and without spills for D <= 256, for K = 1 and
# K = 10 (tools/kernel_report.py; benchmarks/results/kernel_report.json): fp32 on sm_80 runs tf32x3 as mma.sync with
# the split operands in registers, and fp16's gradient GEMMs hold a hi + lo pair (_tiles._grad_dot), hence their
# narrower tiles (fp32's serve tf32, tf32x3 and fp64). Not timed: no GPU was available.
_BF16, _FP16, _FP32 = torch.bfloat16, torch.float16, torch.float32
_GPU_TILES = {
    ("fwd", _BF16, 90): (64, 64, 64, 8, 3, 0), ("fwd", _FP16, 90): (64, 64, 64, 8, 3, 0),
    ("fwd", _FP32, 90): (64, 64, 32, 8, 3, 0),
    ("dx", _BF16, 90): (64, 64, 64, 8, 2, 256), ("dx", _FP16, 90): (64, 64, 64, 8, 2, 128),
    ("dx", _FP32, 90): (64, 64, 32, 8, 2, 128),
    ("dw", _BF16, 90): (64, 64, 64, 8, 2, 256), ("dw", _FP16, 90): (64, 64, 64, 8, 2, 128),
    ("dw", _FP32, 90): (64, 64, 16, 8, 1, 128),
    ("fwd", _BF16, 80): (64, 64, 64, 8, 3, 0), ("fwd", _FP16, 80): (64, 64, 64, 8, 3, 0),
    ("fwd", _FP32, 80): (64, 32, 16, 8, 3, 0),
    ("dx", _BF16, 80): (64, 64, 64, 8, 2, 256), ("dx", _FP16, 80): (64, 64, 64, 8, 2, 128),
    ("dx", _FP32, 80): (64, 32, 32, 8, 2, 64),
    ("dw", _BF16, 80): (64, 64, 64, 8, 2, 256), ("dw", _FP16, 80): (64, 64, 64, 8, 2, 128),
    ("dw", _FP32, 80): (64, 32, 32, 8, 2, 64),
}
# D wider than an entry's block_out: the backward kernels hold all of D (up to 512 columns) on chip rather than split
# D over programs that each recompute the logits (fp32 at D = 512 in slices of 128 made each backward kernel four
# logit GEMMs instead of one). Keyed by the dot operand: the half dtype, or fp32's input precision, as tf32x3 splits
# both gradient-GEMM operands into hi + lo in registers (fp16 one: _tiles._grad_dot). A [rows, 512] fp32
# accumulator is 64 registers a thread over 8 warps for 32 rows (bf16: 64 rows over 16 warps, within the 1 KiB of
# spills allowed at D = 512), and the gradient GEMM's other operand, [depth, 512], sits in registers beside it (twice
# when split), so the accumulator rows (dX: block_n; dW: the proxy slots) and the depth (dX: the slots; dW: block_n)
# are 16 to 64 (at most 32 on sm_8x, whose 99 KiB of shared memory (sm_86, sm_89) hold a [32, 512] fp32 operand
# and not a [64, 512] one). Compiled for sm_80 and sm_90a at block_out 256 and 512, K 1 and 10, both reductions
# (tools/kernel_report.py): MMA everywhere (mma.sync on sm_90a under wgmma's 64 rows), no spills but sm_90a fp16 dW
# (32-44 bytes at D = 512) and sm_80 tf32x3 dW (8); one stage where two spill. Not timed: no GPU was available.
_GPU_TILES_WIDE = {
    ("dx", _BF16, 90): (64, 64, 64, 16, 2, 512), ("dw", _BF16, 90): (64, 64, 64, 16, 2, 512),
    ("dx", _FP16, 90): (32, 32, 32, 8, 2, 512), ("dw", _FP16, 90): (64, 32, 32, 8, 1, 512),
    ("dx", "tf32", 90): (32, 64, 32, 8, 1, 512), ("dw", "tf32", 90): (64, 32, 32, 8, 1, 512),
    ("dx", "tf32x3", 90): (16, 32, 32, 8, 2, 512), ("dw", "tf32x3", 90): (16, 32, 32, 8, 2, 512),
    ("dx", _BF16, 80): (64, 64, 64, 16, 2, 512), ("dw", _BF16, 80): (64, 64, 64, 16, 2, 512),
    ("dx", _FP16, 80): (32, 32, 32, 8, 2, 512), ("dw", _FP16, 80): (32, 32, 32, 8, 2, 512),
    ("dx", "tf32", 80): (32, 32, 32, 8, 1, 512), ("dw", "tf32", 80): (32, 32, 32, 8, 2, 512),
    ("dx", "tf32x3", 80): (16, 32, 32, 8, 2, 512), ("dw", "tf32x3", 80): (16, 32, 32, 8, 1, 512),
}
# K not a power of two (two parts of proxy slots, k_parts) on sm_90a at the table's width: the dX kernel's class tile
# is wider than the table's (K = 10: 80 slots for 64) and its GEMM two dots; these entries replace the ones above
# (fp32: narrower D chunks, one stage, and for dW fewer rows; bf16 dX splits D beyond 256 rather than spill 1.3 KiB).
# The fp32 entries serve fp64 operands: fp32's tf32 and tf32x3 take the wide tiles there (tile_config).
_GPU_TILES_SPLIT = {("dx", _FP32, 90): (64, 64, 16, 8, 1, 128), ("dw", _FP32, 90): (32, 64, 16, 8, 1, 128),
                    ("dx", _BF16, 90): (64, 64, 64, 8, 2, 256)}
# The least reduction dimension of a tl.dot (Triton compiles 16 for 16-bit operands and 8 for fp32; one rule for
# every dtype): the logit dots' block_d, the dW GEMM's block_n and the dX GEMM's proxy slots of a part. (The other
# dimensions may be narrower: the dW kernel's second part for K = 10 is 8 slots.)
MIN_DOT = 16


def device_arch(device) -> int | None:
    """The architecture the tile table is keyed on: 90 (Hopper and later) or 80; None under the interpreter."""
    if INTERPRET:
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return 90 if major >= 9 else 80


def k_parts(k: int) -> tuple[int, int]:
    """(K_HI, K_LO): the backward kernels compute a class tile's K proxy slots in two parts, one dot each, so that
    no MMA works on padding slots beyond the second part's: K_HI = the largest power of two <= K, K_LO = K - K_HI
    padded to a power of two (0 when K is one). 10 = 8 + 2, 3 = 2 + 1, 7 = 4 + 4 (one padded slot)."""
    hi = 1 << (k.bit_length() - 1)
    return hi, triton.next_power_of_2(k - hi) if k > hi else 0


def tile_config(kernel: str, arch: int | None, dtype: torch.dtype, precision: str, d: int, k: int, block_n=None,
                block_c=None, block_d=None) -> TileConfig:
    """Tiles of `kernel` ("fwd", "dx" or "dw") for dot operands of `dtype` at input_precision `precision`, embedding
    width d and K proxies a class, on `arch` (None: the interpreter, whose cost is per op: small fixed tiles). The
    backward kernels hold all K_HI + K_LO proxy slots of a class tile at once (k_parts): the class tile is the
    largest power of two whose slots fit the table's (K = 10: 4 classes, 32 + 8 slots); the dX kernel's GEMM reduces
    over a part's slots, so there it is widened until the narrower part has MIN_DOT (8 classes, 64 + 16 slots) and
    the row tile narrowed as much (not below 64 rows on sm_90a where the table has 64, a wgmma's). D wider than the
    table's block_out takes the wide tiles (_GPU_TILES_WIDE) where there are some. The overrides (LSESpec's
    block_rows, block_classes, block_d) replace these values; they must be powers of two that keep every reduction
    at MIN_DOT or more, block_classes the dX kernel's in every kernel, so that a forward does not accept what its
    backward refuses (ValueError otherwise)."""
    hi, lo = k_parts(k)
    narrow = lo or hi  # the backward's narrower part
    if arch is None:
        bn, bc, bd, warps, stages, out = 16, 16, 64, 1, 1, 1 << 30
    else:
        half = dtype in (_BF16, _FP16)
        key = (kernel, dtype if half else _FP32, arch)
        wide = _GPU_TILES_WIDE.get((kernel, dtype if half else precision, arch))  # fp64 ("ieee"): none
        # On sm_90a fp32 with K not a power of two takes them at every D, in both backward kernels: beside the
        # widened dX class tile (below) the table's 64 rows spilled (tf32x3, D = 128: 12 bytes), their 16-32 do not.
        use_wide = wide and (max(MIN_DOT, triton.next_power_of_2(d)) > _GPU_TILES[key][-1]
                             or (lo and not half and arch >= 90))
        if use_wide:
            bn, slots, bd, warps, stages, out = wide
        else:
            table = _GPU_TILES_SPLIT if lo and key in _GPU_TILES_SPLIT else _GPU_TILES
            bn, slots, bd, warps, stages, out = table[key]
        bc = slots if kernel == "fwd" else 1 << (max(1, slots // (hi + lo)).bit_length() - 1)
        if kernel == "dx" and bc < triton.cdiv(MIN_DOT, narrow):
            # a wider class tile over fewer rows, down to the 64 of a wgmma on sm_90a
            wider = triton.cdiv(MIN_DOT, narrow) // bc
            bc, bn = bc * wider, max(min(bn, 64 if arch >= 90 else MIN_DOT), bn // wider)
            # and at most 256 columns of dX beside it: with the wide tiles' 512 it spilled 1.1-4.4 KiB (fp32 on
            # sm_8x: 131 KiB of shared memory), so D = 512 is two slices there (kernel report, K = 10). fp32's
            # wide tiles spill 0.5-0.7 KiB even so, within D = 512's allowance but not D <= 256's: there they hold
            # 128 columns in D chunks of 16, one stage.
            out = min(out, 256)
            if use_wide and not half and d <= 256:
                out, bd, stages = min(out, 128), 16, 1
    bd = min(bd, max(MIN_DOT, triton.next_power_of_2(d)))
    out = min(out, max(MIN_DOT, triton.next_power_of_2(d))) if kernel != "fwd" else 0
    for name, value, least in (("block_rows", block_n, MIN_DOT), ("block_d", block_d, MIN_DOT),
                               ("block_classes", block_c, triton.cdiv(MIN_DOT, narrow))):
        if value and (value & (value - 1) or value < least):
            why = (f"K={k}: the backward's narrower dot has {narrow} proxy slots a class" if name == "block_classes"
                   else "a dot's reduction dimension")
            raise ValueError(f"{name}={value}: the Triton kernels take a power of two >= {least} ({why})")
    return TileConfig(block_n or bn, block_c or bc, block_d or bd, warps, stages, out)


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


def constexprs(fn, cfg: TileConfig, k: int, row: bool, op: torch.dtype, precision: str, acc=torch.float32,
               has_bias=True, norm_x=True, norm_w=True, has_offset=False, pool_max=False) -> dict:
    """The constexpr arguments of class_lse kernel `fn` for tiles `cfg`, K proxies a class, the reduction (row),
    dot operands of dtype `op` at `precision`, the accumulation dtype and the features (has_offset: the row
    offset; pool_max: S = max_k l, LSESpec.max_pool); launchers and compile_cases both build them here."""
    k_hi, k_lo = k_parts(k)
    values = dict(K=k, K_HI=k_hi, K_LO=k_lo, POOL_MAX=pool_max, ROW_REDUCE=row, HAS_BIAS=has_bias,
                  HAS_OFFSET=has_offset, NORM_X=norm_x,
                  RAW_X=norm_x and op == torch.float16, NORM_W=norm_w, ACC=_TL_DTYPES[acc], OP=_TL_DTYPES[op],
                  PRECISION=precision,
                  SPLIT_FP16=op == torch.float16, BLOCK_N=cfg.block_n, BLOCK_C=cfg.block_c, BLOCK_D=cfg.block_d,
                  BLOCK_OUT=cfg.block_out)
    return {name: value for name, value in values.items() if name in fn.arg_names}


_SIGNATURE_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
                     torch.int64: "i64"}


def compile_case(fn, consts: dict, cfg: TileConfig, pointers: dict, has_dot=True, **config) -> dict:
    """One entry of a module's compile_cases (tools/kernel_report.py): kernel `fn` with the constexprs `consts`
    as its launcher specialises it. pointers: {argument: torch dtype} for the pointer arguments that are not fp32;
    the scalars scale, shift, inv_gamma and eps are fp32, the other integers i32, and the strides along D
    (stride_*d) are 1, which the launcher passes as the constant 1. `config`: extra JSON-able launch facts."""
    consts = dict(consts, **{a: 1 for a in fn.arg_names if a.startswith("stride_") and a.endswith("d")})

    def arg_type(name):
        if name in consts:
            return "constexpr"
        if name.endswith("_ptr"):
            return "*" + _SIGNATURE_DTYPES[pointers.get(name, torch.float32)]
        return "fp32" if name in ("scale", "shift", "inv_gamma", "eps") else "i32"

    return {"kernel": fn.__name__, "fn": fn, "signature": {a: arg_type(a) for a in fn.arg_names},
            "constexprs": consts, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
            "config": dict(asdict(cfg), **config), "has_dot": has_dot}


def case_pools(k: int) -> tuple[str, ...]:
    """The pools compile_cases cover for K proxies a class: both for K > 1 (for K = 1 they are the same kernel)."""
    return ("softmax", "max") if k > 1 else ("softmax",)


def case_precision(precision: str) -> str:
    """The PRECISION constexpr for compile_cases' `precision` ("native" for half types: not an input_precision)."""
    return "ieee" if precision == "native" else precision


def dtypes(x: torch.Tensor, w: torch.Tensor):
    """(accumulation torch dtype, the same as a tl dtype, dot operand torch dtype, input_precision) for x, w.

    Accumulation is fp32 (fp64 for fp64 inputs). Operands keep the input dtype when x and w share it (tensor cores
    for fp16/bf16), else both are upcast."""
    acc = compute_dtype(x.dtype, w.dtype)
    op = x.dtype if x.dtype == w.dtype else acc
    return acc, _TL_DTYPES[acc], op, input_precision(op)


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
    """(1 / max(||t_r||, eps) (0 for a zero row), the normalisation's backward factor) per row of t [R, D]
    (_numerics.unit_rows's rule), accumulated in `acc` without materialising a converted or normalised copy of t. Rows
    are independent and masked, so the row block only sets the number of programs: up to 1024 rows each under the
    interpreter (whose cost is per program), 32 on a GPU."""
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
    dot operand dtype (the kernels read it as x: `x_in`; fp16: x itself and its inverse norms rx [N]), with its
    backward factors gx [N]; for W only its inverse norms rw and backward factors gw [C*K] (never a normalised
    copy of W). offset: the op's row offset [N] or None."""

    def __init__(self, x, w, labels, bias, spec, offset=None):
        self.x, self.w, self.labels, self.bias, self.spec = x, w, labels.contiguous(), bias, spec
        self.offset = None if offset is None else offset.contiguous()
        self.n, self.d = x.shape
        self.k = spec.centers_per_class
        self.c = w.shape[0] // self.k
        self.acc, self.acc_tl, self.op, self.precision = dtypes(x, w)
        self.op_tl = _TL_DTYPES[self.op]
        self.normalize_x, self.normalize_w = spec.normalize_x, spec.normalize_w
        self.scale, self.shift, self.inv_gamma = spec.scale, spec.shift, 1.0 / spec.gamma
        self.arch = device_arch(x.device)
        self.splits = spec.num_splits or None
        # fp16 rows go into the dots as they are (exact), their inverse norms rx applied to the logits in fp32 like
        # W's: x^ rounded to fp16 is off by 2^-11 relative, and where x^ ~ w^ the gradient, a difference of two such
        # terms, is all rounding. (No product of fp16 values overflows the fp32 accumulator; bf16 and fp32 rows
        # could, so they go in normalised.)
        self.raw_x = self.normalize_x and self.op == torch.float16
        self.rx = None
        if self.raw_x:
            self.x_in = x
            self.rx, self.gx = inv_norms(x, self.acc)
        elif self.normalize_x:
            x_hat, self.gx = unit_rows(x, self.acc)
            self.x_in = x_hat.to(self.op)
        else:
            self.gx = None
            self.x_in = x
        self.rw, self.gw = inv_norms(w, self.acc) if self.normalize_w else (None, None)
        # Kernels ignore the pointers of disabled features; x stands in for them.
        self.bias_arg, self.offset_arg, self.gx_arg, self.rx_arg, self.rw_arg, self.gw_arg = (
            x if t is None else t for t in (bias, self.offset, self.gx, self.rx, self.rw, self.gw))

    def config(self, kernel: str) -> TileConfig:
        """The tiles of `kernel` ("fwd", "dx", "dw") for this problem, with the spec's overrides."""
        s = self.spec
        return tile_config(kernel, self.arch, self.op, self.precision, self.d, self.k, s.block_rows or None,
                           s.block_classes or None, s.block_d or None)

    def launch_meta(self, fn, cfg: TileConfig) -> dict:
        """The constexprs and launch options of kernel `fn` with tiles `cfg` for this problem."""
        return dict(constexprs(fn, cfg, self.k, self.spec.row, self.op, self.precision, self.acc,
                               self.bias is not None, self.normalize_x, self.normalize_w,
                               has_offset=self.offset is not None, pool_max=self.spec.max_pool),
                    num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def compile_cases(D: int, K: int, reduce: str, dtype: torch.dtype, precision: str, arch: int) -> list[dict]:
    """tools/kernel_report.py's cases of this module: the inverse-norm kernel (no dot) as inv_norms launches it on
    W of `dtype` (it does not depend on K, reduce or precision: served for K = 1, reduce="row" only)."""
    if K != 1 or reduce != "row":
        return []
    cfg = TileConfig(32, 0, min(256, max(16, triton.next_power_of_2(D))), 4, 3)
    consts = dict(ACC=tl.float32, BLOCK_R=cfg.block_n, BLOCK_D=cfg.block_d)
    return [compile_case(_inv_norm_kernel, consts, cfg, {"t_ptr": dtype}, has_dot=False)]
