"""Backward kernels of class_lse, shared by both reductions (they differ only in whether the saved LSE and the
upstream gradient are indexed by row or by class, the ROW_REDUCE constexpr), as FlashAttention-2 does it:

  _dx_kernel: one program per (row tile, slice of D, split of the class tiles). It walks its class tiles,
      recomputes each tile's logits from the inputs and the saved LSE (_tiles._tile_grads) and keeps its
      [BLOCK_N, BLOCK_OUT] fp32 dX accumulator on chip; it writes its dX once. The splits' partial dX (fp32,
      [num_splits, N, D]) are summed by torch in split order.
  _dw_kernel: one program per (class tile with all K proxies of its classes, slice of D). It walks the row tiles
      the same way, keeps dW ([K_HI * BLOCK_C, BLOCK_OUT] and [K_LO * BLOCK_C, BLOCK_OUT]) and dbias on chip and
      writes them once, in W's dtype.
No atomics, no accumulator read back from global memory: both gradients are deterministic by construction. Each
kernel recomputes the logits once, the K proxy slots of a tile in two parts of a power of two slots each (K_HI +
K_LO, _common.k_parts; one part when K is a power of two), three GEMMs per part: logits, dX, dW.
D wider than block_out (512 columns on a GPU: _common._GPU_TILES_WIDE) is split over programs, each recomputing the
logits of its tiles.

Per-row (per-proxy) normalisation terms are O(N + C*K) side sums applied in each kernel's epilogue, so no
normalised W and no N x C tile ever reaches memory (x arrives normalised, x^: it is O(N*D)). With dl = dL/dl[i, p],
w^ = rw w and the normalisations' backward factors gx, gw (1 / norm, 0 for a dead row: _numerics.unit_rows):
  dX_i = gx_i * (sum_p dl_ip w^_p - x^_i * sum_p dl_ip l_ip)    (sum_p dl_ip l_ip = <x^_i, sum_p dl_ip w^_p>: from
                                                                the accumulator when one program holds all of D,
                                                                up to 256 columns)
  dW_p = gw_p * (sum_i dl_ip x^_i - w^_p * sum_i dl_ip l_ip)
Written with w^ = rw w rather than with rw^2 (which underflows for huge norms).
"""
import torch
import triton
import triton.language as tl

from . import _common
from ._tiles import _grad_dot, _load_inv, _part_proxies, _tile_grads


@triton.jit
def _dx_part(
    acc, row_dot,  # [BLOCK_N, BLOCK_OUT] sum_p dl_ip w^_p and [BLOCK_N] sum_p dl_ip l_ip so far
    l, dl,  # one part's logits and dL/dl (_tiles._tile_grads), [BLOCK_N, SLOTS * BLOCK_C]
    w_ptr, rw_ptr, c0, C, offs_o, o_ok, stride_wp, stride_wd,
    K: tl.constexpr, K0: tl.constexpr, SLOTS: tl.constexpr, NORM_X: tl.constexpr, NORM_W: tl.constexpr,
    ACC: tl.constexpr, OP: tl.constexpr, PRECISION: tl.constexpr, SPLIT_FP16: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One part's terms of dX (slots K0 .. K0 + SLOTS - 1 of the class tile, _tiles._part_proxies): one GEMM with
    its proxy rows."""
    if NORM_X:
        row_dot += tl.sum(dl * l, axis=1)
    p, p_ok = _part_proxies(c0, C, K, K0, SLOTS, BLOCK_C)
    wt = tl.load(w_ptr + p[:, None] * stride_wp + offs_o[None, :] * stride_wd,
                 mask=p_ok[:, None] & o_ok[None, :], other=0.0).to(OP)
    acc = _grad_dot(dl * _load_inv(rw_ptr, p, p_ok, NORM_W, ACC)[None, :], wt, acc, OP, PRECISION, SPLIT_FP16)
    return acc, row_dot


@triton.jit
def _dx_kernel(
    x_ptr,  # [N, D] embeddings, normalised if NORM_X
    w_ptr,  # [C*K, D] proxies, class-major
    bias_ptr,  # [C] class bias (read only if HAS_BIAS)
    labels_ptr,  # [N] int64 labels
    offset_ptr,  # [N] the row offset (read only if HAS_OFFSET: ROW_REDUCE)
    gx_ptr,  # [N] backward factors of x's normalisation (read only if NORM_X)
    rx_ptr, rw_ptr,  # [N] inverse norms of x (read only if RAW_X), [C*K] of w (read only if NORM_W)
    lse_ptr, g_ptr,  # forward result and upstream gradient: [N] if ROW_REDUCE else [C]
    dx_ptr,  # [num_splits, N, D] out: each split's share of dX
    N, C, D,
    tiles_per_split,  # class tiles per program
    stride_xn, stride_xd, stride_wp, stride_wd,
    stride_os, stride_on, stride_od,  # strides of dx
    scale, shift, inv_gamma,  # z = scale * S - offset + shift (+ bias); 1 / gamma
    K: tl.constexpr,  # proxies per class
    K_HI: tl.constexpr, K_LO: tl.constexpr,  # proxy slots a class in the two parts of a tile (_common.k_parts)
    POOL_MAX: tl.constexpr,  # S = max_k l (pool="max") rather than the intra-class softmax
    ROW_REDUCE: tl.constexpr,  # LSE over classes per row (else over rows per class)
    HAS_BIAS: tl.constexpr, HAS_OFFSET: tl.constexpr, NORM_X: tl.constexpr,
    RAW_X: tl.constexpr,  # x comes as it is (fp16), with its inverse norms rx
    NORM_W: tl.constexpr,
    ACC: tl.constexpr, OP: tl.constexpr, PRECISION: tl.constexpr,  # accumulation / dot operand dtypes
    SPLIT_FP16: tl.constexpr,  # gradient operand as a prescaled hi + lo pair (fp16: _tiles._grad_dot)
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_OUT: tl.constexpr,  # the slice of D this program's dX covers
):
    pid_n, pid_o, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_o = pid_o * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    n_ok, o_ok = offs_n < N, offs_o < D
    labels = tl.load(labels_ptr + offs_n, mask=n_ok, other=-1)
    if ROW_REDUCE:
        lse = tl.load(lse_ptr + offs_n, mask=n_ok, other=float("-inf")).to(ACC)[:, None]
        g = tl.load(g_ptr + offs_n, mask=n_ok, other=0.0).to(ACC)[:, None]
    acc = tl.zeros((BLOCK_N, BLOCK_OUT), dtype=ACC)  # sum_p dl_ip w^_p
    row_dot = tl.zeros((BLOCK_N,), dtype=ACC)  # sum_p dl_ip l_ip, for the normalisation backward

    t0 = pid_s * tiles_per_split
    for t in range(t0, tl.minimum(t0 + tiles_per_split, tl.cdiv(C, BLOCK_C))):
        c0 = t * BLOCK_C
        if not ROW_REDUCE:
            offs_c = c0 + tl.arange(0, BLOCK_C)
            lse = tl.load(lse_ptr + offs_c, mask=offs_c < C, other=float("-inf")).to(ACC)[None, :]
            g = tl.load(g_ptr + offs_c, mask=offs_c < C, other=0.0).to(ACC)[None, :]
        l_a, dl_a, l_b, dl_b, _ = _tile_grads(
            x_ptr, w_ptr, bias_ptr, rx_ptr, rw_ptr, offset_ptr, offs_n, c0, labels, lse, g, N, C, D,
            stride_xn, stride_xd, stride_wp, stride_wd, scale, shift, inv_gamma,
            K, K_HI, K_LO, POOL_MAX, HAS_BIAS, RAW_X, NORM_W, ACC, OP, PRECISION, HAS_OFFSET, BLOCK_N, BLOCK_C, BLOCK_D)
        if K_LO > 0:
            # Each part's GEMM in a branch of its own: Triton lays a dot whose result feeds another dot out for a
            # chain (all warps along the rows, as attention's P @ V wants), so with the two GEMMs into one
            # accumulator in sequence only the first would be, and the [BLOCK_N, BLOCK_OUT] accumulator would be
            # converted between the two layouts twice a tile (bf16, D = 512, sm_90a: 17 KiB of spills).
            for part in range(2):
                if part == 0:
                    acc, row_dot = _dx_part(acc, row_dot, l_a, dl_a, w_ptr, rw_ptr, c0, C, offs_o, o_ok, stride_wp,
                                            stride_wd, K, 0, K_HI, NORM_X, NORM_W, ACC, OP, PRECISION, SPLIT_FP16,
                                            BLOCK_C)
                else:
                    acc, row_dot = _dx_part(acc, row_dot, l_b, dl_b, w_ptr, rw_ptr, c0, C, offs_o, o_ok, stride_wp,
                                            stride_wd, K, K_HI, K_LO, NORM_X, NORM_W, ACC, OP, PRECISION,
                                            SPLIT_FP16, BLOCK_C)
        else:
            acc, row_dot = _dx_part(acc, row_dot, l_a, dl_a, w_ptr, rw_ptr, c0, C, offs_o, o_ok, stride_wp,
                                    stride_wd, K, 0, K_HI, NORM_X, NORM_W, ACC, OP, PRECISION, SPLIT_FP16, BLOCK_C)

    mask = n_ok[:, None] & o_ok[None, :]
    if NORM_X:  # dX = gx * (acc - (sum_p dl l) * x^)
        gx = tl.load(gx_ptr + offs_n, mask=n_ok, other=0.0).to(ACC)
        xt = tl.load(x_ptr + offs_n.to(tl.int64)[:, None] * stride_xn + offs_o[None, :] * stride_xd, mask=mask,
                     other=0.0).to(ACC) * _load_inv(rx_ptr, offs_n, n_ok, RAW_X, ACC)[:, None]  # x^
        # sum_p dl l = <x^, acc>: a program that holds all of D takes it from acc, so that the terms of acc along
        # x^ cancel exactly (with huge tied logits, two sums of ~|t| rounded apart were left, ~2^-24 |t|). Not the
        # 512-wide bf16 accumulator: holding x^ beside it spills (sm_80: 676 -> 1104 bytes).
        if BLOCK_OUT <= 256:
            row_dot = tl.where(D <= BLOCK_OUT, tl.sum(acc * xt, axis=1), row_dot)
        acc = gx[:, None] * (acc - row_dot[:, None] * xt)
    tl.store(dx_ptr + pid_s * stride_os + offs_n.to(tl.int64)[:, None] * stride_on + offs_o[None, :] * stride_od,
             acc, mask=mask)


@triton.jit
def _dw_store(
    acc, col_dot,  # one part's [P, BLOCK_OUT] sum_i dl_ip x^_i and [P] sum_i dl_ip l_ip over all the rows
    p, p_ok,  # [P] its proxies' rows of W and their mask (_tiles._part_proxies)
    w_ptr, rw_ptr, gw_ptr, dw_ptr, offs_o, o_ok, stride_wp, stride_wd, stride_op, stride_od,
    NORM_W: tl.constexpr, ACC: tl.constexpr,
):
    """Writes one part's rows of dW once, in W's dtype."""
    mask = p_ok[:, None] & o_ok[None, :]
    if NORM_W:  # dW = gw * (acc - (sum_i dl l) * rw * w)
        rw = _load_inv(rw_ptr, p, p_ok, NORM_W, ACC)
        gw = tl.load(gw_ptr + p, mask=p_ok, other=0.0).to(ACC)
        wt = tl.load(w_ptr + p[:, None] * stride_wp + offs_o[None, :] * stride_wd, mask=mask, other=0.0).to(ACC)
        acc = gw[:, None] * (acc - (col_dot * rw)[:, None] * wt)
    tl.store(dw_ptr + p[:, None] * stride_op + offs_o[None, :] * stride_od, acc, mask=mask)


@triton.jit
def _dw_kernel(
    x_ptr,  # [N, D] embeddings, normalised if NORM_X
    w_ptr,  # [C*K, D] proxies, class-major
    bias_ptr,  # [C] class bias (read only if HAS_BIAS)
    labels_ptr,  # [N] int64 labels
    offset_ptr,  # [N] the row offset (read only if HAS_OFFSET: ROW_REDUCE)
    rx_ptr,  # [N] inverse norms of x (read only if RAW_X)
    rw_ptr, gw_ptr,  # [C*K] inverse norms of w and its normalisation's backward factors (read only if NORM_W)
    lse_ptr, g_ptr,  # forward result and upstream gradient: [N] if ROW_REDUCE else [C]
    dw_ptr,  # [C*K, D] out: dW in W's dtype
    dbias_ptr,  # [C] out: dbias in the bias dtype (HAS_BIAS)
    N, C, D,
    stride_xn, stride_xd, stride_wp, stride_wd,
    stride_op, stride_od,  # strides of dw
    scale, shift, inv_gamma,  # z = scale * S - offset + shift (+ bias); 1 / gamma
    K: tl.constexpr,  # proxies per class
    K_HI: tl.constexpr, K_LO: tl.constexpr,  # proxy slots a class in the two parts of a tile (_common.k_parts)
    POOL_MAX: tl.constexpr,  # S = max_k l (pool="max") rather than the intra-class softmax
    ROW_REDUCE: tl.constexpr,  # LSE over classes per row (else over rows per class)
    HAS_BIAS: tl.constexpr, HAS_OFFSET: tl.constexpr,
    RAW_X: tl.constexpr,  # x comes as it is (fp16), with its inverse norms rx
    NORM_W: tl.constexpr,
    ACC: tl.constexpr, OP: tl.constexpr, PRECISION: tl.constexpr,  # accumulation / dot operand dtypes
    SPLIT_FP16: tl.constexpr,  # gradient operand as a prescaled hi + lo pair (fp16: _tiles._grad_dot)
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_OUT: tl.constexpr,  # the slice of D this program's dW covers
):
    pid_c, pid_o = tl.program_id(0), tl.program_id(1)
    c0 = pid_c * BLOCK_C
    offs_c = c0 + tl.arange(0, BLOCK_C)
    offs_o = pid_o * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    c_ok, o_ok = offs_c < C, offs_o < D
    p_a, ok_a = _part_proxies(c0, C, K, 0, K_HI, BLOCK_C)
    if K_LO > 0:
        p_b, ok_b = _part_proxies(c0, C, K, K_HI, K_LO, BLOCK_C)
    if not ROW_REDUCE:
        lse = tl.load(lse_ptr + offs_c, mask=c_ok, other=float("-inf")).to(ACC)[None, :]
        g = tl.load(g_ptr + offs_c, mask=c_ok, other=0.0).to(ACC)[None, :]
    # per part: sum_i dl_ip x^_i [part * BLOCK_C, BLOCK_OUT] and sum_i dl_ip l_ip (the normalisation backward)
    acc_a = tl.zeros((K_HI * BLOCK_C, BLOCK_OUT), dtype=ACC)
    col_a = tl.zeros((K_HI * BLOCK_C,), dtype=ACC)
    if K_LO > 0:
        acc_b = tl.zeros((K_LO * BLOCK_C, BLOCK_OUT), dtype=ACC)
        col_b = tl.zeros((K_LO * BLOCK_C,), dtype=ACC)
    dbias = tl.zeros((BLOCK_C,), dtype=ACC)

    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        labels = tl.load(labels_ptr + offs_n, mask=n_ok, other=-1)
        if ROW_REDUCE:
            lse = tl.load(lse_ptr + offs_n, mask=n_ok, other=float("-inf")).to(ACC)[:, None]
            g = tl.load(g_ptr + offs_n, mask=n_ok, other=0.0).to(ACC)[:, None]
        l_a, dl_a, l_b, dl_b, dz = _tile_grads(
            x_ptr, w_ptr, bias_ptr, rx_ptr, rw_ptr, offset_ptr, offs_n, c0, labels, lse, g, N, C, D,
            stride_xn, stride_xd, stride_wp, stride_wd, scale, shift, inv_gamma,
            K, K_HI, K_LO, POOL_MAX, HAS_BIAS, RAW_X, NORM_W, ACC, OP, PRECISION, HAS_OFFSET, BLOCK_N, BLOCK_C, BLOCK_D)
        if HAS_BIAS:
            dbias += tl.sum(dz, axis=0)
        if NORM_W:
            col_a += tl.sum(dl_a * l_a, axis=0)
            if K_LO > 0:
                col_b += tl.sum(dl_b * l_b, axis=0)
        xt = tl.load(x_ptr + offs_n.to(tl.int64)[:, None] * stride_xn + offs_o[None, :] * stride_xd,
                     mask=n_ok[:, None] & o_ok[None, :], other=0.0).to(OP)
        # dL/d<x_i, w_p> / rw_p, against the rows of x as they come (times rx_i when they come raw)
        rx = _load_inv(rx_ptr, offs_n, n_ok, RAW_X, ACC)[:, None]
        acc_a = _grad_dot(tl.trans(dl_a * rx), xt, acc_a, OP, PRECISION, SPLIT_FP16)
        if K_LO > 0:
            acc_b = _grad_dot(tl.trans(dl_b * rx), xt, acc_b, OP, PRECISION, SPLIT_FP16)

    _dw_store(acc_a, col_a, p_a, ok_a, w_ptr, rw_ptr, gw_ptr, dw_ptr, offs_o, o_ok, stride_wp, stride_wd,
              stride_op, stride_od, NORM_W, ACC)
    if K_LO > 0:
        _dw_store(acc_b, col_b, p_b, ok_b, w_ptr, rw_ptr, gw_ptr, dw_ptr, offs_o, o_ok, stride_wp, stride_wd,
                  stride_op, stride_od, NORM_W, ACC)
    if HAS_BIAS:
        if pid_o == 0:
            tl.store(dbias_ptr + offs_c, dbias, mask=c_ok)


def backward(grad, out, x, w, labels, bias, spec, need_x, need_w, need_b, offset=None):
    """(dX, dW, dbias) of class_lse (argument order of metricloss_kernels.lse) for the upstream gradient `grad` and
    the forward result `out` (of the same row offset [N] or None); each is None when not needed. Deterministic: no
    atomics, fixed summation orders."""
    p = _common.Problem(x, w, labels, bias, spec, offset)
    n, c, k, d, dev = p.n, p.c, p.k, p.d, x.device
    g = grad.to(p.acc).contiguous()
    lse = out.contiguous()
    args = (p.scale, p.shift, p.inv_gamma)
    dx = dw = db = None

    if need_x:
        cfg = p.config("dx")
        row_tiles, class_tiles, slices = triton.cdiv(n, cfg.block_n), triton.cdiv(c, cfg.block_c), triton.cdiv(
            d, cfg.block_out)
        cap = max(1, _common.SCRATCH_BYTES // (n * d * 4))
        num = _common.num_splits(row_tiles * slices, class_tiles, dev, p.splits, cap)
        # One split writes dX in x's dtype; several write fp32 partials, summed in split order.
        part = torch.empty((num, n, d), dtype=x.dtype if num == 1 else p.acc, device=dev)
        _dx_kernel[(row_tiles, slices, num)](
            p.x_in, p.w, p.bias_arg, p.labels, p.offset_arg, p.gx_arg, p.rx_arg, p.rw_arg, lse, g, part,
            n, c, d, triton.cdiv(class_tiles, num),
            p.x_in.stride(0), p.x_in.stride(1), p.w.stride(0), p.w.stride(1),
            part.stride(0), part.stride(1), part.stride(2), *args, **p.launch_meta(_dx_kernel, cfg))
        dx = part[0] if num == 1 else part.sum(0).to(x.dtype)

    if need_w or need_b:
        cfg = p.config("dw")
        dw = torch.empty((c * k, d), dtype=w.dtype, device=dev)
        db = torch.empty(c, dtype=bias.dtype, device=dev) if bias is not None else None
        _dw_kernel[(triton.cdiv(c, cfg.block_c), triton.cdiv(d, cfg.block_out))](
            p.x_in, p.w, p.bias_arg, p.labels, p.offset_arg, p.rx_arg, p.rw_arg, p.gw_arg, lse, g, dw,
            db if db is not None else dw,
            n, c, d, p.x_in.stride(0), p.x_in.stride(1), p.w.stride(0), p.w.stride(1), dw.stride(0), dw.stride(1),
            *args, **p.launch_meta(_dw_kernel, cfg))
    return dx, dw if need_w else None, db if need_b else None


def compile_cases(D: int, K: int, reduce: str, dtype: torch.dtype, precision: str, arch: int) -> list[dict]:
    """tools/kernel_report.py's cases of this module: _dx_kernel (dX stored in the input dtype by a single split,
    in fp32 by several) and _dw_kernel, as the launcher specialises them for inputs of `dtype` with a bias, both
    normalisations and, for reduce="row", the row offset (the variant with the most live values), for both pools
    when K > 1."""
    cases, precision = [], _common.case_precision(precision)
    for name, fn in (("dx", _dx_kernel), ("dw", _dw_kernel)):
        cfg = _common.tile_config(name, arch, dtype, precision, D, K)
        pointers = {"x_ptr": dtype, "w_ptr": dtype, "bias_ptr": dtype, "labels_ptr": torch.int64,
                    "dw_ptr": dtype, "dbias_ptr": dtype}
        outputs = [dtype, torch.float32] if name == "dx" and dtype != torch.float32 else [dtype]
        for pool in _common.case_pools(K):
            consts = _common.constexprs(fn, cfg, K, reduce == "row", dtype, precision, has_offset=reduce == "row",
                                        pool_max=pool == "max")
            for out in outputs:
                extra = {"dx_dtype": str(out).removeprefix("torch.")} if name == "dx" else {}
                cases.append(_common.compile_case(fn, consts, cfg, dict(pointers, dx_ptr=out), pool=pool, **extra))
    return cases
