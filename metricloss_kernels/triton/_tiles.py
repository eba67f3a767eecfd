"""Device helpers shared by the class-LSE kernels: one BLOCK_N x BLOCK_C tile of class similarities and its
backward.

For rows i (embeddings x) and classes c of the tile, with K proxies per class (row c*K + k of W):
    l[i, c, k] = rw_{cK+k} * <x_i, w_{cK+k}>        (rw: inverse norms, or 1 when W is not normalised)
x arrives normalised when the op normalises it (x^, computed by _numerics.unit_rows): |<x^, w>| <= ||w||, so no dot
overflows while the proxies' norms are finite.
    S[i, c]    = sum_k softmax_k(l / gamma) * l            (S = l when K == 1)
    z[i, c]    = scale * S + shift (+ bias_c)
The softmax over k is an online loop, one tl.dot per proxy slot k on the rows c*K + k, so a tile never holds more
than three BLOCK_N x BLOCK_C accumulators whatever K is.
"""
import triton
import triton.language as tl


@triton.jit
def _load_inv(ptr, offs, n, ENABLED: tl.constexpr, ACC: tl.constexpr):
    """Inverse norms at offs (1 outside [0, n) and when normalisation is off)."""
    if ENABLED:
        inv = tl.load(ptr + offs, mask=offs < n, other=1.0).to(ACC)
    else:
        inv = tl.full(offs.shape, 1.0, ACC)
    return inv


@triton.jit
def _proxy_logits(
    x_ptr, w_ptr,  # [N, D] embeddings (normalised if the op normalises them), [C*K, D] proxies
    rw_ptr,  # [C*K] inverse norms of the proxies (read only if NORM_W)
    offs_n, offs_c,  # the tile's rows and classes
    k,  # proxy slot: the tile uses proxy rows c*K + k
    N, C, D,
    stride_xn, stride_xd, stride_wp, stride_wd,
    K: tl.constexpr, NORM_W: tl.constexpr,
    ACC: tl.constexpr,  # accumulation dtype (fp32, fp64 for fp64 inputs)
    OP: tl.constexpr,  # tl.dot operand dtype
    PRECISION: tl.constexpr,  # tl.dot input_precision for fp32 operands
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """l[i, c] = rw_p * <x_i, w_p>, p = c*K + k: [BLOCK_N, BLOCK_C], D streamed in BLOCK_D chunks."""
    offs_d = tl.arange(0, BLOCK_D)
    p = offs_c.to(tl.int64) * K + k
    n_ok = offs_n < N
    c_ok = offs_c < C
    x_ptrs = x_ptr + offs_n.to(tl.int64)[:, None] * stride_xn + offs_d[None, :] * stride_xd
    w_ptrs = w_ptr + p[:, None] * stride_wp + offs_d[None, :] * stride_wd
    acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        d_ok = (d0 + offs_d) < D
        xt = tl.load(x_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0).to(OP)
        wt = tl.load(w_ptrs, mask=c_ok[:, None] & d_ok[None, :], other=0.0).to(OP)
        acc = tl.dot(xt, tl.trans(wt), acc, input_precision=PRECISION, out_dtype=ACC)
        x_ptrs += BLOCK_D * stride_xd
        w_ptrs += BLOCK_D * stride_wd
    # Scaling the logits by the inverse norms is O(BLOCK_N * BLOCK_C); a normalised copy of W would be O(C*K*D).
    rw = _load_inv(rw_ptr, p, C * K, NORM_W, ACC)
    return acc * rw[None, :]


@triton.jit
def _class_similarity(
    x_ptr, w_ptr, rw_ptr, offs_n, offs_c, N, C, D,
    stride_xn, stride_xd, stride_wp, stride_wd,
    inv_gamma,  # 1 / gamma
    K: tl.constexpr, NORM_W: tl.constexpr, ACC: tl.constexpr, OP: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """(S, m, den) for the tile: S = sum_k softmax_k(l / gamma) l by an online softmax over k, m = max_k l / gamma,
    den = sum_k exp(l / gamma - m); the backward rebuilds softmax_k = exp(l_k / gamma - m) / den from them.
    For K == 1, S = l and m, den are unused."""
    s_cls = _proxy_logits(x_ptr, w_ptr, rw_ptr, offs_n, offs_c, 0, N, C, D,
                          stride_xn, stride_xd, stride_wp, stride_wd,
                          K, NORM_W, ACC, OP, PRECISION, BLOCK_N, BLOCK_C, BLOCK_D)
    # Seeding the running max with slot 0 keeps every exp() argument finite (no -inf - -inf).
    m = s_cls * inv_gamma
    den = tl.full((BLOCK_N, BLOCK_C), 1.0, ACC)
    if K > 1:
        num = s_cls  # sum_k exp(l_k / gamma - m) * l_k
        for k in range(1, K):
            l = _proxy_logits(x_ptr, w_ptr, rw_ptr, offs_n, offs_c, k, N, C, D,
                              stride_xn, stride_xd, stride_wp, stride_wd,
                              K, NORM_W, ACC, OP, PRECISION, BLOCK_N, BLOCK_C, BLOCK_D)
            m_new = tl.maximum(m, l * inv_gamma)
            alpha = tl.exp(m - m_new)
            e = tl.exp(l * inv_gamma - m_new)
            den = den * alpha + e
            num = num * alpha + e * l
            m = m_new
        s_cls = num / den
    return s_cls, m, den


@triton.jit
def _logits_z(s_cls, offs_c, bias_ptr, C, scale, shift, HAS_BIAS: tl.constexpr):
    """z = scale * S + shift (+ bias_c)."""
    z = s_cls * scale + shift
    if HAS_BIAS:
        z += tl.load(bias_ptr + offs_c, mask=offs_c < C, other=0.0).to(s_cls.dtype)[None, :]
    return z


@triton.jit
def _lse_terms(offs_n, offs_c, labels, N, C):
    """Which (i, c) of the tile enter an LSE: in bounds and c != labels_i (the same set for both reductions)."""
    return (offs_n < N)[:, None] & (offs_c < C)[None, :] & (labels[:, None] != offs_c[None, :])


@triton.jit
def _grad_z(z, terms, lse, g):
    """dL/dz = g * exp(z - lse) on the LSE's terms, 0 elsewhere. lse and g broadcast along the reduced axis
    ([BLOCK_N, 1] or [1, BLOCK_C]). An empty LSE (-inf) has no terms, so it yields 0 (never -inf - -inf), and
    so does whatever upstream gradient it was given."""
    return tl.exp(tl.where(terms, z - lse, float("-inf"))) * tl.where(terms, g, 0.0)


@triton.jit
def _slot_logits_grad(
    x_ptr, w_ptr, rw_ptr, offs_n, offs_c,
    k,  # proxy slot
    s_cls, m, den,  # the tile's (S, m, den) from _class_similarity
    d_s,  # dL/dS on the tile
    N, C, D,
    stride_xn, stride_xd, stride_wp, stride_wd,
    inv_gamma,  # 1 / gamma
    K: tl.constexpr, NORM_W: tl.constexpr, ACC: tl.constexpr, OP: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """(l_k, dL/dl_k) of proxy slot k on the tile, from dL/dS: dS/dl_k = p_k * (1 + (l_k - S) / gamma) with
    p_k = softmax_k(l / gamma). For K > 1 the slot's logits are recomputed (a second pass over the slots: the
    softmax weights need the final (m, den) of the first); for K == 1, l = S and dl = dL/dS."""
    l = s_cls
    dl = d_s
    if K > 1:
        l = _proxy_logits(x_ptr, w_ptr, rw_ptr, offs_n, offs_c, k, N, C, D,
                          stride_xn, stride_xd, stride_wp, stride_wd,
                          K, NORM_W, ACC, OP, PRECISION, BLOCK_N, BLOCK_C, BLOCK_D)
        p = tl.exp(l * inv_gamma - m) / den
        dl = d_s * p * (1.0 + (l - s_cls) * inv_gamma)
    return l, dl
