"""Backward kernels of class_lse, shared by both reductions (they differ only in whether the saved LSE and the
upstream gradient are indexed by row or by class, the ROW_REDUCE constexpr).

Both recompute the logits tile by tile from the inputs and the saved LSE (FlashAttention-2 style) and write the
gradient GEMMs chunk by chunk of D into fp32 accumulators:
  _dx_kernel: one program per (row tile, split of the class tiles); it owns its dX rows, so it accumulates them
      with plain read-modify-writes in a fixed order: deterministic, no atomics.
  _dw_kernel: one program per class tile, looping over every row tile; it owns its proxies' dW rows and the bias
      gradient of its classes (deterministic). With DX_ATOMIC it also emits the dX contributions of its classes
      with atomics, so that one logits recomputation serves both gradients.
Per-row (per-proxy) normalisation terms are O(N + C*K) side sums applied in each kernel's epilogue, so no
normalised W and no N x C tile ever reaches memory (x arrives normalised, x^: it is O(N*D)).

With dl = dL/dl[i, p] (_tiles._slot_logits_grad), w^ = rw w, and the normalisations' backward factors gx, gw
(1 / norm, 0 for a dead row: _numerics.unit_rows):
  dX_i = gx_i * (sum_p dl_ip w^_p - x^_i * sum_p dl_ip l_ip)
  dW_p = gw_p * (sum_i dl_ip x^_i - w^_p * sum_i dl_ip l_ip)
Written with w^ = rw w rather than with rw^2 (which underflows for huge norms).
"""
import torch
import triton
import triton.language as tl

from . import _common
from ._tiles import _class_similarity, _grad_z, _load_inv, _logits_z, _lse_terms, _slot_logits_grad


@triton.jit
def _dx_kernel(
    x_ptr,  # [N, D] embeddings, normalised if NORM_X
    w_ptr,  # [C*K, D] proxies, class-major
    bias_ptr,  # [C] class bias (read only if HAS_BIAS)
    labels_ptr,  # [N] int64 labels
    gx_ptr,  # [N] backward factors of x's normalisation (read only if NORM_X)
    rw_ptr,  # [C*K] inverse norms of w (read only if NORM_W)
    lse_ptr, g_ptr,  # forward result and upstream gradient: [N] if ROW_REDUCE else [C]
    dx_ptr,  # [num_splits, N, D] fp32, zeroed: each split's share of dX, finished in place
    N, C, D,
    tiles_per_split,  # class tiles per program
    stride_xn, stride_xd, stride_wp, stride_wd,
    stride_gs, stride_gn, stride_gd,  # strides of dx
    scale, shift, inv_gamma,  # z = scale * S + shift (+ bias); 1 / gamma
    K: tl.constexpr,  # proxies per class
    ROW_REDUCE: tl.constexpr,  # LSE over classes per row (else over rows per class)
    HAS_BIAS: tl.constexpr, NORM_X: tl.constexpr, NORM_W: tl.constexpr,
    ACC: tl.constexpr, OP: tl.constexpr, PRECISION: tl.constexpr,  # accumulation / dot operand dtypes
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < N
    labels = tl.load(labels_ptr + offs_n, mask=n_ok, other=-1)
    if ROW_REDUCE:
        lse = tl.load(lse_ptr + offs_n, mask=n_ok, other=float("-inf")).to(ACC)[:, None]
        g = tl.load(g_ptr + offs_n, mask=n_ok, other=0.0).to(ACC)[:, None]
    dx_rows = dx_ptr + pid_s * stride_gs + offs_n.to(tl.int64)[:, None] * stride_gn
    row_dot = tl.zeros((BLOCK_N,), dtype=ACC)  # sum_p dl_ip l_ip, for the normalisation backward

    t0 = pid_s * tiles_per_split
    for t in range(t0, tl.minimum(t0 + tiles_per_split, tl.cdiv(C, BLOCK_C))):
        offs_c = t * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = offs_c < C
        if not ROW_REDUCE:
            lse = tl.load(lse_ptr + offs_c, mask=c_ok, other=float("-inf")).to(ACC)[None, :]
            g = tl.load(g_ptr + offs_c, mask=c_ok, other=0.0).to(ACC)[None, :]
        s_cls, m, den = _class_similarity(x_ptr, w_ptr, rw_ptr, offs_n, offs_c, N, C, D,
                                          stride_xn, stride_xd, stride_wp, stride_wd, inv_gamma,
                                          K, NORM_W, ACC, OP, PRECISION, BLOCK_N, BLOCK_C, BLOCK_D)
        z = _logits_z(s_cls, offs_c, bias_ptr, C, scale, shift, HAS_BIAS)
        d_s = _grad_z(z, _lse_terms(offs_n, offs_c, labels, N, C), lse, g) * scale
        for k in range(K):
            l, dl = _slot_logits_grad(x_ptr, w_ptr, rw_ptr, offs_n, offs_c, k, s_cls, m, den, d_s, N, C, D,
                                      stride_xn, stride_xd, stride_wp, stride_wd, inv_gamma,
                                      K, NORM_W, ACC, OP, PRECISION, BLOCK_N, BLOCK_C, BLOCK_D)
            if NORM_X:
                row_dot += tl.sum(dl * l, axis=1)
            p = offs_c.to(tl.int64) * K + k
            a = (dl * _load_inv(rw_ptr, p, C * K, NORM_W, ACC)[None, :]).to(OP)  # dL/d<x_i, w_p>
            w_ptrs = w_ptr + p[:, None] * stride_wp + offs_d[None, :] * stride_wd
            for d0 in range(0, D, BLOCK_D):
                d_ok = (d0 + offs_d) < D
                wt = tl.load(w_ptrs, mask=c_ok[:, None] & d_ok[None, :], other=0.0).to(OP)
                acc_ptrs = dx_rows + (d0 + offs_d)[None, :] * stride_gd
                mask = n_ok[:, None] & d_ok[None, :]
                acc = tl.load(acc_ptrs, mask=mask, other=0.0)
                acc = tl.dot(a, wt, acc, input_precision=PRECISION, out_dtype=ACC)
                tl.store(acc_ptrs, acc, mask=mask)
                w_ptrs += BLOCK_D * stride_wd
            # The next read-modify-write of these rows may run on other threads of the program.
            tl.debug_barrier()

    if NORM_X:  # dX = gx * (acc - (sum_p dl l) * x^)
        gx = tl.load(gx_ptr + offs_n, mask=n_ok, other=0.0).to(ACC)
        x_ptrs = x_ptr + offs_n.to(tl.int64)[:, None] * stride_xn + offs_d[None, :] * stride_xd
        for d0 in range(0, D, BLOCK_D):
            mask = n_ok[:, None] & ((d0 + offs_d) < D)[None, :]
            acc_ptrs = dx_rows + (d0 + offs_d)[None, :] * stride_gd
            xt = tl.load(x_ptrs, mask=mask, other=0.0).to(ACC)
            acc = tl.load(acc_ptrs, mask=mask, other=0.0)
            tl.store(acc_ptrs, gx[:, None] * (acc - row_dot[:, None] * xt), mask=mask)
            x_ptrs += BLOCK_D * stride_xd


@triton.jit
def _dw_kernel(
    x_ptr,  # [N, D] embeddings, normalised if NORM_X
    w_ptr,  # [C*K, D] proxies, class-major
    bias_ptr,  # [C] class bias (read only if HAS_BIAS)
    labels_ptr,  # [N] int64 labels
    rw_ptr, gw_ptr,  # [C*K] inverse norms of w and its normalisation's backward factors (read only if NORM_W)
    lse_ptr, g_ptr,  # forward result and upstream gradient: [N] if ROW_REDUCE else [C]
    acc_ptr,  # [grid * BLOCK_C * K, D] ACC, zeroed: raw dW accumulators of this launch (may be dw_ptr itself)
    col_dot_ptr,  # [grid * BLOCK_C * K] ACC, zeroed: sum_i dl_ip l_ip per proxy (read only if NORM_W)
    dw_ptr,  # [C*K, D] out: dW in W's dtype
    dbias_ptr,  # [C] out: dbias in the bias dtype (HAS_BIAS)
    dxa_ptr,  # [N, D] ACC, zeroed: sum_p dl_ip w^_p over all classes, by atomics (DX_ATOMIC)
    row_dot_ptr,  # [N] ACC, zeroed: sum_p dl_ip l_ip, by atomics (DX_ATOMIC and NORM_X)
    N, C, D,
    tile0,  # class tile of program 0 (large W is processed in launches of bounded scratch)
    stride_xn, stride_xd, stride_wp, stride_wd,
    stride_ap, stride_ad,  # strides of acc
    stride_op, stride_od,  # strides of dw
    stride_dxn, stride_dxd,  # strides of dxa
    scale, shift, inv_gamma,  # z = scale * S + shift (+ bias); 1 / gamma
    K: tl.constexpr,  # proxies per class
    ROW_REDUCE: tl.constexpr,  # LSE over classes per row (else over rows per class)
    HAS_BIAS: tl.constexpr, NORM_X: tl.constexpr, NORM_W: tl.constexpr,
    DX_ATOMIC: tl.constexpr,  # also accumulate dX (atomics across class tiles)
    ACC_IS_OUT: tl.constexpr,  # acc_ptr is dw_ptr (W in the accumulation dtype): finish in place
    ACC: tl.constexpr, OP: tl.constexpr, PRECISION: tl.constexpr,  # accumulation / dot operand dtypes
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_c = (tile0 + pid) * BLOCK_C + tl.arange(0, BLOCK_C)
    slot = pid * BLOCK_C + tl.arange(0, BLOCK_C)  # the classes' place in this launch's scratch
    offs_d = tl.arange(0, BLOCK_D)
    c_ok = offs_c < C
    if not ROW_REDUCE:
        lse = tl.load(lse_ptr + offs_c, mask=c_ok, other=float("-inf")).to(ACC)[None, :]
        g = tl.load(g_ptr + offs_c, mask=c_ok, other=0.0).to(ACC)[None, :]
    dbias = tl.zeros((BLOCK_C,), dtype=ACC)

    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        labels = tl.load(labels_ptr + offs_n, mask=n_ok, other=-1)
        if ROW_REDUCE:
            lse = tl.load(lse_ptr + offs_n, mask=n_ok, other=float("-inf")).to(ACC)[:, None]
            g = tl.load(g_ptr + offs_n, mask=n_ok, other=0.0).to(ACC)[:, None]
        s_cls, m, den = _class_similarity(x_ptr, w_ptr, rw_ptr, offs_n, offs_c, N, C, D,
                                          stride_xn, stride_xd, stride_wp, stride_wd, inv_gamma,
                                          K, NORM_W, ACC, OP, PRECISION, BLOCK_N, BLOCK_C, BLOCK_D)
        z = _logits_z(s_cls, offs_c, bias_ptr, C, scale, shift, HAS_BIAS)
        dz = _grad_z(z, _lse_terms(offs_n, offs_c, labels, N, C), lse, g)
        if HAS_BIAS:
            dbias += tl.sum(dz, axis=0)
        d_s = dz * scale
        x_rows = x_ptr + offs_n.to(tl.int64)[:, None] * stride_xn
        for k in range(K):
            l, dl = _slot_logits_grad(x_ptr, w_ptr, rw_ptr, offs_n, offs_c, k, s_cls, m, den, d_s, N, C, D,
                                      stride_xn, stride_xd, stride_wp, stride_wd, inv_gamma,
                                      K, NORM_W, ACC, OP, PRECISION, BLOCK_N, BLOCK_C, BLOCK_D)
            p = offs_c.to(tl.int64) * K + k
            q = slot.to(tl.int64) * K + k
            if NORM_W:
                cd_ptrs = col_dot_ptr + q
                tl.store(cd_ptrs, tl.load(cd_ptrs, mask=c_ok, other=0.0) + tl.sum(dl * l, axis=0), mask=c_ok)
            b = tl.trans(dl).to(OP)  # dL/d<x_i, w_p> / rw_p, as [BLOCK_C, BLOCK_N]
            if DX_ATOMIC:
                a = (dl * _load_inv(rw_ptr, p, C * K, NORM_W, ACC)[None, :]).to(OP)
                if NORM_X:
                    tl.atomic_add(row_dot_ptr + offs_n, tl.sum(dl * l, axis=1), mask=n_ok, sem="relaxed")
            acc_rows = acc_ptr + q[:, None] * stride_ap
            w_ptrs = w_ptr + p[:, None] * stride_wp + offs_d[None, :] * stride_wd
            for d0 in range(0, D, BLOCK_D):
                d_ok = (d0 + offs_d) < D
                xt = tl.load(x_rows + (d0 + offs_d)[None, :] * stride_xd, mask=n_ok[:, None] & d_ok[None, :],
                             other=0.0).to(OP)
                acc_ptrs = acc_rows + (d0 + offs_d)[None, :] * stride_ad
                mask = c_ok[:, None] & d_ok[None, :]
                acc = tl.load(acc_ptrs, mask=mask, other=0.0)
                acc = tl.dot(b, xt, acc, input_precision=PRECISION, out_dtype=ACC)
                tl.store(acc_ptrs, acc, mask=mask)
                if DX_ATOMIC:
                    wt = tl.load(w_ptrs, mask=mask, other=0.0).to(OP)
                    dxa = tl.dot(a, wt, input_precision=PRECISION, out_dtype=ACC)
                    tl.atomic_add(dxa_ptr + offs_n.to(tl.int64)[:, None] * stride_dxn
                                  + (d0 + offs_d)[None, :] * stride_dxd,
                                  dxa, mask=n_ok[:, None] & d_ok[None, :], sem="relaxed")
                    w_ptrs += BLOCK_D * stride_wd
            # The next read-modify-write of these rows may run on other threads of the program.
            tl.debug_barrier()

    if NORM_W or not ACC_IS_OUT:  # dW = gw * (acc - (sum_i dl l) * rw * w), stored in W's dtype
        for k in range(K):
            p = offs_c.to(tl.int64) * K + k
            q = slot.to(tl.int64) * K + k
            if NORM_W:
                rw = _load_inv(rw_ptr, p, C * K, NORM_W, ACC)
                gw = tl.load(gw_ptr + p, mask=c_ok, other=0.0).to(ACC)
                col_dot = tl.load(col_dot_ptr + q, mask=c_ok, other=0.0)
            for d0 in range(0, D, BLOCK_D):
                mask = c_ok[:, None] & ((d0 + offs_d) < D)[None, :]
                acc = tl.load(acc_ptr + q[:, None] * stride_ap + (d0 + offs_d)[None, :] * stride_ad,
                              mask=mask, other=0.0)
                if NORM_W:
                    wt = tl.load(w_ptr + p[:, None] * stride_wp + (d0 + offs_d)[None, :] * stride_wd,
                                 mask=mask, other=0.0).to(ACC)
                    acc = gw[:, None] * (acc - (col_dot * rw)[:, None] * wt)
                tl.store(dw_ptr + p[:, None] * stride_op + (d0 + offs_d)[None, :] * stride_od, acc, mask=mask)
    if HAS_BIAS:
        tl.store(dbias_ptr + offs_c, dbias, mask=c_ok)


def backward(grad, out, x, w, labels, bias, spec, need_x, need_w, need_b):
    """(dX, dW, dbias) of class_lse (argument order of metricloss_kernels.lse) for the upstream gradient `grad` and
    the forward result `out`; each is None when not needed.

    Column reduce: dX comes by atomics from the class-tile programs when they run anyway (one logits recomputation
    instead of two), unless torch.are_deterministic_algorithms_enabled(); then from _dx_kernel (deterministic)."""
    p = _common.Problem(x, w, labels, bias, spec)
    row_reduce, splits, cfg, dev = spec.row, p.splits, p.cfg, x.device
    atomic_dx = not row_reduce and not torch.are_deterministic_algorithms_enabled()
    n, c, k, d = p.n, p.c, p.k, p.d
    g = grad.to(p.acc).contiguous()
    lse = out.contiguous()
    row_tiles, class_tiles = triton.cdiv(n, cfg.block_n), triton.cdiv(c, cfg.block_c)
    itemsize = torch.empty((), dtype=p.acc).element_size()
    meta = dict(K=k, ROW_REDUCE=row_reduce, HAS_BIAS=p.bias is not None, NORM_X=p.normalize_x,
                NORM_W=p.normalize_w, ACC=p.acc_tl, OP=p.op_tl, PRECISION=p.precision,
                BLOCK_N=cfg.block_n, BLOCK_C=cfg.block_c, BLOCK_D=cfg.block_d,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    run_dw = need_w or need_b
    fused_dx = need_x and run_dw and atomic_dx
    dx = dw = db = None

    if need_x and not fused_dx:
        cap = max(1, _common.SCRATCH_BYTES // (n * d * itemsize))
        num = _common.num_splits(row_tiles, class_tiles, dev, splits, cap)
        part = torch.zeros((num, n, d), dtype=p.acc, device=dev)
        _dx_kernel[(row_tiles, num)](
            p.x_in, p.w, p.bias_arg, p.labels, p.gx_arg, p.rw_arg, lse, g, part,
            n, c, d, triton.cdiv(class_tiles, num),
            p.x_in.stride(0), p.x_in.stride(1), p.w.stride(0), p.w.stride(1),
            part.stride(0), part.stride(1), part.stride(2),
            p.scale, p.shift, p.inv_gamma, **meta)
        dx = (part[0] if num == 1 else part.sum(0)).to(p.x.dtype)  # fixed-order sum over the splits

    if run_dw:
        acc_is_out = p.w.dtype == p.acc
        if acc_is_out:  # accumulate straight into the gradient, one launch
            dw = torch.zeros((c * k, d), dtype=p.acc, device=dev)
            acc, group = dw, class_tiles
        else:  # fp32 scratch for a bounded number of class tiles per launch; dW itself in W's dtype
            dw = torch.empty((c * k, d), dtype=p.w.dtype, device=dev)
            group = max(1, min(class_tiles, _common.SCRATCH_BYTES // (cfg.block_c * k * d * itemsize)))
            acc = torch.empty((group * cfg.block_c * k, d), dtype=p.acc, device=dev)
        col_dot = torch.empty(group * cfg.block_c * k if p.normalize_w else 1, dtype=p.acc, device=dev)
        db = torch.empty(c, dtype=p.bias.dtype, device=dev) if p.bias is not None else None
        if fused_dx:
            dxa = torch.zeros((n, d), dtype=p.acc, device=dev)
            row_dot = torch.zeros(n, dtype=p.acc, device=dev)
        else:
            dxa = row_dot = acc  # unused
        for tile0 in range(0, class_tiles, group):
            if not acc_is_out:
                acc.zero_()
            col_dot.zero_()
            _dw_kernel[(min(group, class_tiles - tile0),)](
                p.x_in, p.w, p.bias_arg, p.labels, p.rw_arg, p.gw_arg, lse, g,
                acc, col_dot, dw, db if db is not None else acc, dxa, row_dot,
                n, c, d, tile0,
                p.x_in.stride(0), p.x_in.stride(1), p.w.stride(0), p.w.stride(1),
                acc.stride(0), acc.stride(1), dw.stride(0), dw.stride(1), dxa.stride(0), dxa.stride(1),
                p.scale, p.shift, p.inv_gamma, DX_ATOMIC=fused_dx, ACC_IS_OUT=acc_is_out, **meta)
        if fused_dx:
            if p.normalize_x:  # the same epilogue as _dx_kernel's, on [N, D]
                dxa = dxa.sub_(p.x_hat * row_dot[:, None]).mul_(p.gx[:, None])
            dx = dxa.to(p.x.dtype)
        dw = dw.to(p.w.dtype) if need_w else None
        db = db if need_b else None
    return dx, dw, db
