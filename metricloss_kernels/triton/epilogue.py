"""The Triton epilogues of class_lse's impl="gemm" (metricloss_kernels.gemm: the tile loop and the GEMMs), kernels
and launchers. Each reads one block of raw logits that cuBLAS wrote, L[i, p] = <x^_i, w_{p0+p}> ([R, B*K], rows
r0.. of the batch, the proxies of the classes c0..c0+B), once (the backward reads a tile's K slots a second time,
right after the first, for their gradients):

  _lse_epilogue_kernel   forward: per (i, c) l_k = rw_k L[i, cK+k], S = sum_k softmax_k(l / gamma) l_k (the max
                         pool, POOL_MAX: S = max_k l_k),
                         z = scale * S (+ bias_c for a row reduction; the shift and a column reduction's bias are
                         added to the result instead), the target mask, and the LSE of the block, less the op's row
                         offset t_i (LSE(z - t) = LSE(z) - t: t comes off the running max, exact where z ties with
                         it), merged into a running [splits, N] (row) or [splits, C] (column) partial: no atomics,
                         each partial entry belongs to one program of a launch and launches run in order.
  _grad_epilogue_kernel  backward: dL/dL[i, p] = rw_p dL/dl[i, p] written in the GEMM dtype for the two GEMMs
                         that follow (dX += dL W_chunk, dW_chunk = dL^T X^), and the row reduction's bias gradient
                         as [splits, C] partials.
  _dw_norm_kernel        the normalisation backward of the chunk's dW rows, from G = dL^T X^ (fp32):
                         dW_p = G_p - w^_p <w^_p, G_p> with w^_p = rw_p w_p (0 for a dead row), in W's dtype.

rw are the inverse norms of W (1 when W is not normalised): with them the GEMMs read W as it is, never a normalised
copy. x arrives normalised (x^, O(N*D)); its normalisation backward, like the sum over chunks of dX, is torch work
on [N, D] done once. No kernel here has a tl.dot: they are bandwidth-bound passes over the block.

`compile_cases` lists every (kernel, configuration) the launchers can pick, for tools/kernel_report.py.
"""
import torch
import triton
import triton.language as tl

from ._common import _TL_DTYPES, INTERPRET, num_splits
from ._tiles import _lse_step, _minus_row_offset, _softmax_step

# Bound on the [splits, C] partials of a column reduction (and of the row reduction's bias gradient).
_PARTIAL_BYTES = 16 * 2**20


@triton.jit
def _slot(l_ptr, stride_l, rw_ptr, offs_n, offs_c, k, R, B, K: tl.constexpr, NORM_W: tl.constexpr):
    """l_k = rw_p L[i, p], p = c*K + k, on the [BLOCK_N, BLOCK_C] tile (0 outside the block)."""
    p = offs_c * K + k
    c_ok = offs_c < B
    l = tl.load(l_ptr + offs_n.to(tl.int64)[:, None] * stride_l + p[None, :],
                mask=(offs_n < R)[:, None] & c_ok[None, :], other=0.0)
    if NORM_W:
        l = l * tl.load(rw_ptr + p, mask=c_ok, other=1.0).to(l.dtype)[None, :]
    return l


@triton.jit
def _tile(l_ptr, stride_l, rw_ptr, bias_ptr, labels, offs_n, offs_c, R, B, c0, scale, inv_gamma,
          K: tl.constexpr, HAS_BIAS: tl.constexpr, NORM_W: tl.constexpr, POOL_MAX: tl.constexpr):
    """(z, terms, S, m, den) of the tile: z = scale * S (+ bias) with -inf off the LSE's terms (outside the block,
    or c0 + c == labels_i); m = max_k l_k / gamma and den = sum_k exp(l_k / gamma - m) by an online softmax over k,
    for the backward's softmax weights (unused when K == 1). POOL_MAX: S = max_k l_k and den = the number of slots
    k with l_k = S, which share dL/dS (the limit gamma -> 0 of the softmax weights; m unused)."""
    s = _slot(l_ptr, stride_l, rw_ptr, offs_n, offs_c, 0, R, B, K, NORM_W)
    m = s * inv_gamma
    den = tl.full(s.shape, 1.0, s.dtype)
    if K > 1:
        if POOL_MAX:
            for k in range(1, K):
                l = _slot(l_ptr, stride_l, rw_ptr, offs_n, offs_c, k, R, B, K, NORM_W)
                den = tl.where(l > s, 1.0, den + (l == s).to(s.dtype))
                s = tl.maximum(s, l, propagate_nan=tl.PropagateNan.ALL)  # NaN as torch.amax
        else:
            num = s  # sum_k exp(l_k / gamma - m) l_k
            for k in range(1, K):
                l = _slot(l_ptr, stride_l, rw_ptr, offs_n, offs_c, k, R, B, K, NORM_W)
                m, den, num = _softmax_step(m, den, num, l, inv_gamma)
            s = num / den
    z = s * scale
    if HAS_BIAS:
        z += tl.load(bias_ptr + offs_c, mask=offs_c < B, other=0.0).to(s.dtype)[None, :]
    terms = (offs_n < R)[:, None] & (offs_c < B)[None, :] & (labels[:, None] != (c0 + offs_c)[None, :])
    return tl.where(terms, z, float("-inf")), terms, s, m, den


@triton.jit
def _lse_epilogue_kernel(
    l_ptr,  # [R, B*K] raw logits of the block (fp32; fp64 for fp64 inputs), row stride stride_l
    rw_ptr,  # [B*K] inverse norms of the block's proxies (read only if NORM_W)
    bias_ptr,  # [B] the block's class bias (read only if HAS_BIAS)
    offset_ptr,  # [R] the row offset of the block's rows (read only if HAS_OFFSET: ROW_REDUCE)
    labels_ptr,  # [R] int64 labels of the block's rows
    part_ptr,  # [splits, R] (ROW_REDUCE) or [splits, B] running LSE partials, row stride stride_part: merged into
    R, B,  # rows, classes of the block
    c0,  # the block's first class (labels are global)
    stride_l, stride_part,
    tiles_per_split,  # streamed tiles (class tiles if ROW_REDUCE, else row tiles) per program
    scale, inv_gamma,  # z = scale * S (+ bias); 1 / gamma
    K: tl.constexpr,  # proxies per class
    ROW_REDUCE: tl.constexpr,  # LSE over classes per row (else over rows per class)
    HAS_BIAS: tl.constexpr, HAS_OFFSET: tl.constexpr, NORM_W: tl.constexpr,
    POOL_MAX: tl.constexpr,  # S = max_k l_k (else the softmax pool)
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Program (i, s): output tile i, split s of the streamed axis; a running (max, sum) per output entry."""
    pid_s = tl.program_id(1)
    if ROW_REDUCE:
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        labels = tl.load(labels_ptr + offs_n, mask=offs_n < R, other=-1)
        offs_out = offs_n
        n_out = R
        streamed = tl.cdiv(B, BLOCK_C)
    else:
        offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        offs_out = offs_c
        n_out = B
        streamed = tl.cdiv(R, BLOCK_N)
    AXIS: tl.constexpr = 1 if ROW_REDUCE else 0
    BLOCK_OUT: tl.constexpr = BLOCK_N if ROW_REDUCE else BLOCK_C
    run_max = tl.full((BLOCK_OUT,), float("-inf"), l_ptr.dtype.element_ty)
    run_sum = tl.zeros((BLOCK_OUT,), dtype=l_ptr.dtype.element_ty)
    t0 = pid_s * tiles_per_split
    for t in range(t0, tl.minimum(t0 + tiles_per_split, streamed)):
        if ROW_REDUCE:
            offs_c = t * BLOCK_C + tl.arange(0, BLOCK_C)
        else:
            offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
            labels = tl.load(labels_ptr + offs_n, mask=offs_n < R, other=-1)
        z, _, _, _, _ = _tile(l_ptr, stride_l, rw_ptr, bias_ptr, labels, offs_n, offs_c, R, B, c0, scale,
                              inv_gamma, K, HAS_BIAS, NORM_W, POOL_MAX)
        run_max, run_sum = _lse_step(run_max, run_sum, z, AXIS)
    if HAS_OFFSET:  # the LSE of z - t is that of z less t: t comes off the running max, not off every logit
        run_max -= tl.load(offset_ptr + offs_out, mask=offs_out < n_out, other=0.0).to(run_max.dtype)
    # Merge with the partial of the earlier blocks: logaddexp, -inf (no term yet) on either side included.
    ptrs = part_ptr + pid_s * stride_part + offs_out
    old = tl.load(ptrs, mask=offs_out < n_out, other=float("-inf"))
    top = tl.maximum(old, run_max)
    top = tl.where(top == float("-inf"), 0.0, top)
    total = tl.exp(old - top) + run_sum * tl.exp(run_max - top)
    # total == 0 only where both sides are empty: the result is then -inf, without evaluating log(0).
    merged = tl.where(total > 0, top + tl.log(tl.where(total > 0, total, 1.0)), float("-inf"))
    tl.store(ptrs, merged, mask=offs_out < n_out)


@triton.jit
def _grad_epilogue_kernel(
    l_ptr,  # [R, B*K] raw logits of the block (fp32; fp64 for fp64 inputs), row stride stride_l
    dl_ptr,  # [R, B*K] out: dL/dL in the GEMM dtype, row stride stride_dl
    rw_ptr,  # [B*K] inverse norms of the block's proxies (read only if NORM_W)
    bias_ptr,  # [B] the block's class bias (read only if HAS_BIAS)
    offset_ptr,  # [R] the row offset of the block's rows (read only if HAS_OFFSET: ROW_REDUCE)
    labels_ptr,  # [R] int64 labels of the block's rows
    lse_ptr, g_ptr,  # the forward result (less the shift) and the upstream gradient: [R] if ROW_REDUCE else [B]
    dbias_ptr,  # [splits, B] partial bias gradients, row stride stride_db, accumulated into (DBIAS)
    R, B, c0,
    stride_l, stride_dl, stride_db,
    tiles_per_split,  # row tiles per program
    scale, inv_gamma,
    K: tl.constexpr, ROW_REDUCE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_OFFSET: tl.constexpr,
    NORM_W: tl.constexpr,
    POOL_MAX: tl.constexpr,  # S = max_k l_k (else the softmax pool)
    DBIAS: tl.constexpr,  # accumulate the bias gradient (a row reduction's; a column's is the upstream gradient)
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Program (j, s): class tile j, split s of the row tiles. With p = g exp((z - t) - lse) on the terms (t: the row
    offset, subtracted from each logit first):
    dL/dS = scale * p, dL/dl_k = dL/dS softmax_k (1 + (l_k - S) / gamma) (= dL/dS for K == 1; the max pool:
    dL/dS / den on the slots with l_k = S, 0 on the others)."""
    pid_s = tl.program_id(1)
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < B
    if not ROW_REDUCE:
        lse = tl.load(lse_ptr + offs_c, mask=c_ok, other=0.0)[None, :]
        g = tl.load(g_ptr + offs_c, mask=c_ok, other=0.0)[None, :]
    dbias = tl.zeros((BLOCK_C,), dtype=l_ptr.dtype.element_ty)
    t0 = pid_s * tiles_per_split
    for t in range(t0, tl.minimum(t0 + tiles_per_split, tl.cdiv(R, BLOCK_N))):
        offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < R
        labels = tl.load(labels_ptr + offs_n, mask=n_ok, other=-1)
        z, terms, s, m, den = _tile(l_ptr, stride_l, rw_ptr, bias_ptr, labels, offs_n, offs_c, R, B, c0, scale,
                                    inv_gamma, K, HAS_BIAS, NORM_W, POOL_MAX)
        z = _minus_row_offset(z, offset_ptr, offs_n, R, HAS_OFFSET)  # z - t before exp(z - t - lse): exact
        if ROW_REDUCE:  # (loaded after the tile's softmax: fewer values live through it)
            lse = tl.load(lse_ptr + offs_n, mask=n_ok, other=0.0)[:, None]
            g = tl.load(g_ptr + offs_n, mask=n_ok, other=0.0)[:, None]
        # exp(-inf) = 0 off the terms, where g is also zeroed: an empty LSE passes on nothing, NaN included.
        dz = tl.exp(tl.where(terms, z - lse, float("-inf"))) * tl.where(terms, g, 0.0)
        if DBIAS:
            dbias += tl.sum(dz, axis=0)
        coef = dz * scale  # dL/dS, over den for K > 1
        if K > 1:
            coef = coef / den
        rows = dl_ptr + offs_n.to(tl.int64)[:, None] * stride_dl
        for k in range(K):
            p = offs_c * K + k
            dl = coef
            if K > 1:
                l = _slot(l_ptr, stride_l, rw_ptr, offs_n, offs_c, k, R, B, K, NORM_W)
                if POOL_MAX:  # (l recomputed as _tile computed it: l == S exactly at its maxima)
                    dl = tl.where(l == s, coef, 0.0)
                else:
                    dl = coef * tl.exp(l * inv_gamma - m) * (1.0 + (l - s) * inv_gamma)
            if NORM_W:  # dL/d<x^_i, w_p> = rw_p dL/dl
                dl = dl * tl.load(rw_ptr + p, mask=c_ok, other=0.0).to(dl.dtype)[None, :]
            tl.store(rows + p[None, :], dl.to(dl_ptr.dtype.element_ty), mask=n_ok[:, None] & c_ok[None, :])
    if DBIAS:
        ptrs = dbias_ptr + pid_s * stride_db + offs_c
        tl.store(ptrs, tl.load(ptrs, mask=c_ok, other=0.0) + dbias, mask=c_ok)


@triton.jit
def _dw_norm_kernel(
    g_ptr,  # [P, D] G = dL^T X^ of the chunk (fp32; fp64 for fp64 inputs), row stride stride_g
    w_ptr,  # [P, D] the chunk's proxies, as stored (any float dtype)
    rw_ptr, gw_ptr,  # [P] inverse norms of w, the normalisation's backward factors (0 for a dead row)
    dw_ptr,  # [P, D] out: dW in W's dtype (may be g_ptr itself: each program reads its rows before writing them)
    P, D,
    stride_g, stride_w, stride_wd, stride_dw,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dW_p = G_p - w^_p <w^_p, G_p> (w^ = rw w: G = rw times the gradient w.r.t. w^, so no 1 / rw), 0 for a dead
    row; w^ is formed as rw * w, never with rw^2 (which underflows for huge norms)."""
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, BLOCK_D)
    p_ok = offs_p < P
    acc_t = g_ptr.dtype.element_ty
    rw = tl.load(rw_ptr + offs_p, mask=p_ok, other=0.0).to(acc_t)[:, None]
    live = tl.load(gw_ptr + offs_p, mask=p_ok, other=0.0) != 0  # NaN rows stay NaN
    g_rows = g_ptr + offs_p.to(tl.int64)[:, None] * stride_g
    w_rows = w_ptr + offs_p.to(tl.int64)[:, None] * stride_w
    dot = tl.zeros((BLOCK_P,), dtype=acc_t)
    for d0 in range(0, D, BLOCK_D):
        mask = p_ok[:, None] & ((d0 + offs_d) < D)[None, :]
        g = tl.load(g_rows + (d0 + offs_d)[None, :], mask=mask, other=0.0)
        w = tl.load(w_rows + (d0 + offs_d)[None, :] * stride_wd, mask=mask, other=0.0).to(acc_t)
        dot += tl.sum(rw * w * g, axis=1)
    for d0 in range(0, D, BLOCK_D):
        mask = p_ok[:, None] & ((d0 + offs_d) < D)[None, :]
        g = tl.load(g_rows + (d0 + offs_d)[None, :], mask=mask, other=0.0)
        w = tl.load(w_rows + (d0 + offs_d)[None, :] * stride_wd, mask=mask, other=0.0).to(acc_t)
        dw = tl.where(live[:, None], g - (rw * w) * dot[:, None], 0.0)
        tl.store(dw_ptr + offs_p.to(tl.int64)[:, None] * stride_dw + (d0 + offs_d)[None, :],
                 dw.to(dw_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------------- launchers
def blocks() -> dict:
    """Tiles and warps of the two block epilogues. Interpreter: large tiles, few programs (its cost is per
    operation). GPU: 32 x 64 fp32 tiles over 8 warps, 8 entries a thread per tile, of which the K > 1 softmax keeps
    five live (S, m, den, the running numerator, one slot) besides their addresses: compiled offline for sm_80 and
    sm_90a, no spills (with 4 warps, 168-254 registers and spills for K = 10). Not timed: no GPU was available
    when they were chosen."""
    if INTERPRET:
        return dict(BLOCK_N=32, BLOCK_C=32, num_warps=1, num_stages=1)
    return dict(BLOCK_N=32, BLOCK_C=64, num_warps=8, num_stages=1)


def _dw_blocks(d: int) -> dict:
    """The dW row pass: 16 rows x up to 128 entries of D a step, 8 a thread."""
    return dict(BLOCK_P=16, BLOCK_D=min(128, max(16, triton.next_power_of_2(d))), num_warps=1 if INTERPRET else 8,
                num_stages=1)


def partial_splits(rows: int, classes: int, num_classes: int, reduce: str, device, requested: int = 0) -> int:
    """The split count of a call's partial LSEs ([splits, N] for a row reduction, [splits, C] for a column one),
    from its largest block (`rows` x `classes`), by the fused kernels' rule (_common.num_splits); a column
    reduction's partials take at most _PARTIAL_BYTES."""
    cfg = blocks()
    row_tiles, class_tiles = triton.cdiv(rows, cfg["BLOCK_N"]), triton.cdiv(classes, cfg["BLOCK_C"])
    if reduce == "row":
        return num_splits(row_tiles, class_tiles, device, requested or None)
    return num_splits(class_tiles, row_tiles, device, requested or None, max(1, _PARTIAL_BYTES // (8 * num_classes)))


def lse_update(part, logits, rw, bias, offset, labels, c0, k, scale, inv_gamma, row, pool_max):
    """Merges the LSEs of the block `logits` [R, B*K] into `part` ([splits, R] if row else [splits, B], views
    into the call's partials). rw [B*K] or None (W not normalised), bias [B] or None, offset (the row offset) [R]
    or None, labels [R]; pool_max: S = max_k l_k (K > 1)."""
    r, b = logits.shape[0], logits.shape[1] // k
    cfg = blocks()
    bn, bc = cfg["BLOCK_N"], cfg["BLOCK_C"]
    out_tiles, streamed = (triton.cdiv(r, bn), triton.cdiv(b, bc)) if row else (triton.cdiv(b, bc), triton.cdiv(r, bn))
    num = part.shape[0]
    _lse_epilogue_kernel[(out_tiles, num)](
        logits, rw if rw is not None else logits, bias if bias is not None else logits,
        offset if offset is not None else logits, labels, part,
        r, b, c0, logits.stride(0), part.stride(0), triton.cdiv(streamed, num), scale, inv_gamma,
        K=k, ROW_REDUCE=row, HAS_BIAS=bias is not None, HAS_OFFSET=offset is not None, NORM_W=rw is not None,
        POOL_MAX=pool_max, BLOCK_N=bn, BLOCK_C=bc, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def grad_block(dl, logits, rw, bias, offset, labels, lse, g, dbias, c0, k, scale, inv_gamma, row, pool_max,
               requested=0):
    """Writes dL/dL of the block into dl [R, B*K] (the GEMM dtype) and, for dbias ([splits, B] partials, or None),
    accumulates the bias gradient. lse, g: [R] (row) or [B] (column), the views of saved_lse's for the block;
    offset: the row offset [R] of the forward, or None."""
    r, b = logits.shape[0], logits.shape[1] // k
    cfg = blocks()
    bn, bc = cfg["BLOCK_N"], cfg["BLOCK_C"]
    row_tiles, class_tiles = triton.cdiv(r, bn), triton.cdiv(b, bc)
    num = dbias.shape[0] if dbias is not None else num_splits(class_tiles, row_tiles, logits.device, requested or None)
    _grad_epilogue_kernel[(class_tiles, num)](
        logits, dl, rw if rw is not None else logits, bias if bias is not None else logits,
        offset if offset is not None else logits, labels, lse, g,
        dbias if dbias is not None else logits,
        r, b, c0, logits.stride(0), dl.stride(0), dbias.stride(0) if dbias is not None else 0,
        triton.cdiv(row_tiles, num), scale, inv_gamma,
        K=k, ROW_REDUCE=row, HAS_BIAS=bias is not None, HAS_OFFSET=offset is not None, NORM_W=rw is not None,
        POOL_MAX=pool_max, DBIAS=dbias is not None,
        BLOCK_N=bn, BLOCK_C=bc, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def dw_norm(dw, g, w, rw, gw):
    """dw [P, D] (W's dtype; may be g itself) = the normalisation backward of g [P, D] = dL^T X^ for the proxies
    w [P, D] with inverse norms rw [P] and backward factors gw [P]."""
    p, d = g.shape
    cfg = _dw_blocks(d)
    _dw_norm_kernel[(triton.cdiv(p, cfg["BLOCK_P"]),)](
        g, w, rw, gw, dw, p, d, g.stride(0), w.stride(0), w.stride(1), dw.stride(0),
        BLOCK_P=cfg["BLOCK_P"], BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return dw


# ------------------------------------------------------------------------------ offline compile report cases
def _ptr(dtype: torch.dtype) -> str:
    return "*" + str(_TL_DTYPES[dtype])


def _signature(fn, constexprs: dict, pointers: dict) -> dict:
    """The ASTSource signature of `fn`: constexprs, the given pointer types, fp32 scale and inv_gamma, i32 else."""
    return {a: "constexpr" if a in constexprs else pointers.get(a, "fp32" if a in ("scale", "inv_gamma") else "i32")
            for a in fn.arg_names}


def compile_cases(D: int, K: int, reduce: str, dtype: torch.dtype, precision: str, arch: int) -> list[dict]:
    """Every (kernel, configuration) the launchers can pick for inputs of `dtype` with K proxies a class and
    embeddings of width D (the shared interface of the offline compile report, tools/kernel_report.py). The GEMM
    dtype (dL's) is `dtype`: half types as they are, fp32 whatever the precision (it only changes cuBLAS's
    mode); the logits are fp32. Bias, normalised proxies and (reduce="row") the row offset on (the largest
    variant); for K > 1 both pools. No kernel has a dot."""
    acc = torch.float32
    cases = []
    cfg = blocks()
    tiles = {"BLOCK_N": cfg["BLOCK_N"], "BLOCK_C": cfg["BLOCK_C"]}
    row = reduce == "row"
    common = {"l_ptr": _ptr(acc), "rw_ptr": _ptr(acc), "bias_ptr": _ptr(dtype), "offset_ptr": _ptr(acc),
              "labels_ptr": "*i64"}
    for pool_max in (False, True) if K > 1 else (False,):
        flags = dict(K=K, ROW_REDUCE=row, HAS_BIAS=row, HAS_OFFSET=row, NORM_W=True, POOL_MAX=pool_max)
        for fn, const, pointers in (
                (_lse_epilogue_kernel, dict(flags, **tiles), dict(common, part_ptr=_ptr(acc))),
                (_grad_epilogue_kernel, dict(flags, DBIAS=row, **tiles),
                 dict(common, dl_ptr=_ptr(dtype), lse_ptr=_ptr(acc), g_ptr=_ptr(acc), dbias_ptr=_ptr(acc)))):
            cases.append(dict(kernel=fn.__name__, fn=fn, signature=_signature(fn, const, pointers), constexprs=const,
                              num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                              config=dict(const, precision=precision),
                              has_dot=False))
    dw_cfg = _dw_blocks(D)
    const = {"BLOCK_P": dw_cfg["BLOCK_P"], "BLOCK_D": dw_cfg["BLOCK_D"]}
    pointers = {"g_ptr": _ptr(acc), "w_ptr": _ptr(dtype), "rw_ptr": _ptr(acc), "gw_ptr": _ptr(acc),
                "dw_ptr": _ptr(dtype)}
    cases.append(dict(kernel=_dw_norm_kernel.__name__, fn=_dw_norm_kernel,
                      signature=_signature(_dw_norm_kernel, const, pointers), constexprs=const,
                      num_warps=dw_cfg["num_warps"], num_stages=dw_cfg["num_stages"], config=dict(const, D=D),
                      has_dot=False))
    return cases
