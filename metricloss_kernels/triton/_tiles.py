"""Device helpers shared by the class-LSE kernels: one BLOCK_N x BLOCK_C tile of class similarities and its
backward.

For rows i (embeddings x) and classes c of the tile, with K proxies per class (row c*K + k of W):
    l[i, c, k] = rx_i * rw_{cK+k} * <x_i, w_{cK+k}>   (rx, rw: inverse norms, or 1 when not normalised)
x arrives normalised when the op normalises it (x^, computed by _numerics.unit_rows; rx = 1): |<x^, w>| <= ||w||, so
no dot overflows while the proxies' norms are finite. fp16 x arrives as it is, with its inverse norms rx: exact
operands, and no product of fp16 values overflows the fp32 accumulator.
    S[i, c]    = sum_k softmax_k(l / gamma) * l            (S = l when K == 1)
    S[i, c]    = max_k l                                    (POOL_MAX: pool="max", sub-centre ArcFace)
    z[i, c]    = scale * S - offset_i + shift (+ bias_c)      (offset: the op's row offset, or 0)
The forward's softmax over k is an online loop (the max pool's a running max), one tl.dot per proxy slot k on the
rows c*K + k, so a tile never holds more than three BLOCK_N x BLOCK_C accumulators whatever K is. The backward
(_tile_grads) needs every slot's logits at once (dS/dl_k takes the softmax's final max and sum), in two parts of a
power of two slots each (K_HI, the largest power of two <= K, and K_LO, the rest padded to a power of two:
10 = 8 + 2, _common.k_parts): one tl.dot over each part's SLOTS * BLOCK_C proxy slots, viewed as
[BLOCK_N, SLOTS, BLOCK_C] for the softmax, whose max and sums run over both parts. (K padded to one power of two,
16 slots for K = 10, put 1.6x the MMA work into every backward GEMM.)
"""
import triton
import triton.language as tl


@triton.jit
def _load_inv(ptr, offs, mask, ENABLED: tl.constexpr, ACC: tl.constexpr):
    """Inverse norms at offs (1 where ~mask and when normalisation is off)."""
    if ENABLED:
        inv = tl.load(ptr + offs, mask=mask, other=1.0).to(ACC)
    else:
        inv = tl.full(offs.shape, 1.0, ACC)
    return inv


@triton.jit
def _dots(
    x_ptr, w_ptr,  # [N, D] embeddings (normalised if the op normalises them), [C*K, D] proxies
    offs_n, p,  # the tile's rows [BLOCK_N] and proxy rows [BLOCK_P] (int64)
    n_ok, p_ok,  # their masks
    D, stride_xn, stride_xd, stride_wp, stride_wd,
    ACC: tl.constexpr,  # accumulation dtype (fp32, fp64 for fp64 inputs)
    OP: tl.constexpr,  # tl.dot operand dtype
    PRECISION: tl.constexpr,  # tl.dot input_precision (_common.input_precision)
    BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """<x_i, w_p>: [BLOCK_N, BLOCK_P], D streamed in BLOCK_D chunks (0 outside the masks)."""
    offs_d = tl.arange(0, BLOCK_D)
    x_ptrs = x_ptr + offs_n.to(tl.int64)[:, None] * stride_xn + offs_d[None, :] * stride_xd
    w_ptrs = w_ptr + p[:, None] * stride_wp + offs_d[None, :] * stride_wd
    acc = tl.zeros((BLOCK_N, BLOCK_P), dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        d_ok = (d0 + offs_d) < D
        xt = tl.load(x_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0).to(OP)
        wt = tl.load(w_ptrs, mask=p_ok[:, None] & d_ok[None, :], other=0.0).to(OP)
        acc = tl.dot(xt, tl.trans(wt), acc, input_precision=PRECISION, out_dtype=ACC)
        x_ptrs += BLOCK_D * stride_xd
        w_ptrs += BLOCK_D * stride_wd
    return acc


@triton.jit
def _proxy_logits(
    x_ptr, w_ptr,  # [N, D] embeddings (normalised if the op normalises them, unless RAW_X), [C*K, D] proxies
    rx_ptr, rw_ptr,  # [N] inverse norms of x (read only if RAW_X), [C*K] of the proxies (read only if NORM_W)
    offs_n, offs_c,  # the tile's rows and classes
    k,  # proxy slot: the tile uses proxy rows c*K + k
    N, C, D,
    stride_xn, stride_xd, stride_wp, stride_wd,
    K: tl.constexpr, RAW_X: tl.constexpr, NORM_W: tl.constexpr, ACC: tl.constexpr, OP: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """l[i, c] = rx_i * rw_p * <x_i, w_p>, p = c*K + k: [BLOCK_N, BLOCK_C]."""
    p = offs_c.to(tl.int64) * K + k
    c_ok = offs_c < C
    acc = _dots(x_ptr, w_ptr, offs_n, p, offs_n < N, c_ok, D, stride_xn, stride_xd, stride_wp, stride_wd,
                ACC, OP, PRECISION, BLOCK_N, BLOCK_C, BLOCK_D)
    # Scaling the logits by the inverse norms is O(BLOCK_N * BLOCK_C); a normalised copy of W would be O(C*K*D).
    return _scale_logits(acc, rx_ptr, rw_ptr, offs_n, p, offs_n < N, c_ok, RAW_X, NORM_W, ACC)


@triton.jit
def _scale_logits(acc, rx_ptr, rw_ptr, offs_n, p, n_ok, p_ok, RAW_X: tl.constexpr, NORM_W: tl.constexpr,
                  ACC: tl.constexpr):
    """The dots <x_i, w_p> [BLOCK_N, BLOCK_P] times the inverse norms that were not applied to the operands."""
    return acc * _load_inv(rx_ptr, offs_n, n_ok, RAW_X, ACC)[:, None] * _load_inv(rw_ptr, p, p_ok, NORM_W, ACC)[None, :]


@triton.jit
def _softmax_step(m, den, num, l, inv_gamma):
    """One proxy slot l into a running intra-class softmax over k: (m, den, num) = (max_k l_k / gamma,
    sum_k exp(l_k / gamma - m), sum_k exp(l_k / gamma - m) l_k), rescaled to the new max."""
    m_new = tl.maximum(m, l * inv_gamma)
    alpha = tl.exp(m - m_new)
    e = tl.exp(l * inv_gamma - m_new)
    return m_new, den * alpha + e, num * alpha + e * l


@triton.jit
def _lse_step(run_max, run_sum, z, AXIS: tl.constexpr):
    """One tile z of logits (-inf off the LSE's terms) into a running LSE along AXIS of z: (max, sum of
    exp(z - max)), rescaled to the new max. While an entry has seen no term its max is -inf: it is shifted by 0
    instead, so that exp() never sees -inf - -inf."""
    new_max = tl.maximum(run_max, tl.max(z, axis=AXIS))
    shift_by = tl.where(new_max == float("-inf"), 0.0, new_max)
    run_sum = run_sum * tl.exp(run_max - shift_by) + tl.sum(tl.exp(z - tl.expand_dims(shift_by, AXIS)), axis=AXIS)
    return new_max, run_sum


@triton.jit
def _class_similarity(
    x_ptr, w_ptr, rx_ptr, rw_ptr, offs_n, offs_c, N, C, D,
    stride_xn, stride_xd, stride_wp, stride_wd,
    inv_gamma,  # 1 / gamma
    K: tl.constexpr, POOL_MAX: tl.constexpr, RAW_X: tl.constexpr, NORM_W: tl.constexpr, ACC: tl.constexpr,
    OP: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """S = sum_k softmax_k(l / gamma) l for the tile, by an online softmax over k, or max_k l (POOL_MAX), by a
    running max (S = l for K == 1)."""
    s_cls = _proxy_logits(x_ptr, w_ptr, rx_ptr, rw_ptr, offs_n, offs_c, 0, N, C, D,
                          stride_xn, stride_xd, stride_wp, stride_wd,
                          K, RAW_X, NORM_W, ACC, OP, PRECISION, BLOCK_N, BLOCK_C, BLOCK_D)
    if K > 1:
        if not POOL_MAX:
            # Seeding the running max with slot 0 keeps every exp() argument finite (no -inf - -inf).
            m = s_cls * inv_gamma
            den = tl.full((BLOCK_N, BLOCK_C), 1.0, ACC)
            num = s_cls  # sum_k exp(l_k / gamma - m) * l_k
        for k in range(1, K):
            l = _proxy_logits(x_ptr, w_ptr, rx_ptr, rw_ptr, offs_n, offs_c, k, N, C, D,
                              stride_xn, stride_xd, stride_wp, stride_wd,
                              K, RAW_X, NORM_W, ACC, OP, PRECISION, BLOCK_N, BLOCK_C, BLOCK_D)
            if POOL_MAX:  # NaN propagates, as in torch.amax
                s_cls = tl.maximum(s_cls, l, propagate_nan=tl.PropagateNan.ALL)
            else:
                m, den, num = _softmax_step(m, den, num, l, inv_gamma)
        if not POOL_MAX:
            s_cls = num / den
    return s_cls


@triton.jit
def _minus_row_offset(z, offset_ptr, offs_n, N, HAS_OFFSET: tl.constexpr):
    """z - offset_i on a [BLOCK_N, BLOCK_C] tile of logits (the op's row offset [N], read only if HAS_OFFSET; z as
    it is otherwise), taken before the LSE's terms: where z ties with the offset (a cross-entropy's target logit)
    the difference is exact at any magnitude, and the LSE sees O(1) values."""
    if HAS_OFFSET:
        z -= tl.load(offset_ptr + offs_n, mask=offs_n < N, other=0.0).to(z.dtype)[:, None]
    return z


@triton.jit
def _logits_z(s_cls, offs_n, offs_c, bias_ptr, offset_ptr, N, C, scale, shift, HAS_BIAS: tl.constexpr,
              HAS_OFFSET: tl.constexpr):
    """z = scale * S - offset_i + shift (+ bias_c) (the row offset: _minus_row_offset)."""
    z = _minus_row_offset(s_cls * scale, offset_ptr, offs_n, N, HAS_OFFSET) + shift
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
def _part_proxies(c0, C, K: tl.constexpr, K0: tl.constexpr, SLOTS: tl.constexpr, BLOCK_C: tl.constexpr):
    """The proxy slots K0 .. K0 + SLOTS - 1 of the class tile starting at class c0, slot-major: entry j is proxy
    K0 + j // BLOCK_C of class c0 + j % BLOCK_C. (its row of W [SLOTS * BLOCK_C] int64, in bounds and k < K)."""
    j = tl.arange(0, SLOTS * BLOCK_C)
    cls = c0 + j % BLOCK_C
    k = K0 + j // BLOCK_C
    return cls.to(tl.int64) * K + k, (cls < C) & (k < K)


@triton.jit
def _part_logits(
    x_ptr, w_ptr, rx_ptr, rw_ptr, offs_n, c0, N, C, D,
    stride_xn, stride_xd, stride_wp, stride_wd,
    K: tl.constexpr, K0: tl.constexpr, SLOTS: tl.constexpr, RAW_X: tl.constexpr, NORM_W: tl.constexpr,
    ACC: tl.constexpr, OP: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """l = rx_i * rw_p * <x_i, w_p> on the part's slots (_part_proxies), one dot: [BLOCK_N, SLOTS * BLOCK_C], 0 on
    padding."""
    p, p_ok = _part_proxies(c0, C, K, K0, SLOTS, BLOCK_C)
    l = _dots(x_ptr, w_ptr, offs_n, p, offs_n < N, p_ok, D, stride_xn, stride_xd, stride_wp, stride_wd,
              ACC, OP, PRECISION, BLOCK_N, SLOTS * BLOCK_C, BLOCK_D)
    return _scale_logits(l, rx_ptr, rw_ptr, offs_n, p, offs_n < N, p_ok, RAW_X, NORM_W, ACC)


@triton.jit
def _part_view(l, inv_gamma, K: tl.constexpr, K0: tl.constexpr, SLOTS: tl.constexpr, POOL_MAX: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """The part's logits l viewed as [BLOCK_N, SLOTS, BLOCK_C], and t = l / gamma (the max pool: l) on its slots
    k < K, -inf on padding."""
    l3 = tl.reshape(l, (BLOCK_N, SLOTS, BLOCK_C))
    t = l3 if POOL_MAX else l3 * inv_gamma
    return l3, tl.where((K0 + tl.arange(0, SLOTS) < K)[None, :, None], t, float("-inf"))


@triton.jit
def _part_weights(t, m, POOL_MAX: tl.constexpr):
    """The part's unnormalised intra-class weights against the max m of t over all the class's slots (0 on
    padding): exp(t_k - m), or [t_k == m] for the max pool (the limit gamma -> 0: tied maxima share the weight)."""
    if POOL_MAX:
        e = (t == m[:, None, :]).to(t.dtype)
    else:
        e = tl.exp(t - m[:, None, :])
    return e


@triton.jit
def _part_grad(l3, prob, s_cls, ds, inv_gamma, POOL_MAX: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_P: tl.constexpr):
    """dL/dl on the part's slots (l3, prob: [BLOCK_N, SLOTS, BLOCK_C]), flattened to [BLOCK_N, BLOCK_P]:
    ds * p_k * (1 + (l_k - S) / gamma), ds = dL/dS [BLOCK_N, BLOCK_C]; ds * p_k for the max pool (l_k = S
    wherever p_k != 0)."""
    if POOL_MAX:
        dl = ds[:, None, :] * prob
    else:
        dl = ds[:, None, :] * prob * (1.0 + (l3 - s_cls[:, None, :]) * inv_gamma)
    return tl.reshape(dl, (BLOCK_N, BLOCK_P))


@triton.jit
def _tile_grads(
    x_ptr, w_ptr, bias_ptr, rx_ptr, rw_ptr,
    offset_ptr,  # [N] the row offset (read only if HAS_OFFSET)
    offs_n,  # [BLOCK_N] the tile's rows
    c0,  # its first class (classes c0 .. c0 + BLOCK_C - 1)
    labels,  # [BLOCK_N] the rows' labels
    lse, g,  # the saved LSE and the upstream gradient: [BLOCK_N, 1] (row reduce) or [1, BLOCK_C] (col reduce)
    N, C, D,
    stride_xn, stride_xd, stride_wp, stride_wd,
    scale, shift, inv_gamma,  # z = scale * S - offset + shift (+ bias); 1 / gamma
    K: tl.constexpr, K_HI: tl.constexpr, K_LO: tl.constexpr, POOL_MAX: tl.constexpr, HAS_BIAS: tl.constexpr,
    RAW_X: tl.constexpr, NORM_W: tl.constexpr, ACC: tl.constexpr, OP: tl.constexpr, PRECISION: tl.constexpr,
    HAS_OFFSET: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """The tile's logits recomputed from the inputs and their gradient, all K slots in one pass of two parts (one
    dot each): slots 0 .. K_HI - 1 and K_HI .. K_HI + K_LO - 1 (_part_proxies; no second part when K_LO = 0).
    (l_a, dl_a, l_b, dl_b, dz): each part's l and dl = dL/dl [BLOCK_N, part * BLOCK_C] (0 on padding; part b is
    (0, 0) when K_LO = 0), dz = dL/dz [BLOCK_N, BLOCK_C]. dS/dl_k = p_k * (1 + (l_k - S) / gamma),
    p_k = softmax_k(l / gamma) over both parts; the max pool's dS/dl_k = p_k = [l_k == S] / #ties."""
    offs_c = c0 + tl.arange(0, BLOCK_C)
    l_b, dl_b = 0.0, 0.0
    if K_LO > 0:  # the narrower part first: its logits are what stays live through the other part's dot
        l_b = _part_logits(x_ptr, w_ptr, rx_ptr, rw_ptr, offs_n, c0, N, C, D, stride_xn, stride_xd, stride_wp,
                           stride_wd, K, K_HI, K_LO, RAW_X, NORM_W, ACC, OP, PRECISION, BLOCK_N, BLOCK_C, BLOCK_D)
    l_a = _part_logits(x_ptr, w_ptr, rx_ptr, rw_ptr, offs_n, c0, N, C, D, stride_xn, stride_xd, stride_wp,
                       stride_wd, K, 0, K_HI, RAW_X, NORM_W, ACC, OP, PRECISION, BLOCK_N, BLOCK_C, BLOCK_D)
    if K > 1:
        l3_a, t_a = _part_view(l_a, inv_gamma, K, 0, K_HI, POOL_MAX, BLOCK_N, BLOCK_C)
        m = tl.max(t_a, axis=1)
        if K_LO > 0:
            l3_b, t_b = _part_view(l_b, inv_gamma, K, K_HI, K_LO, POOL_MAX, BLOCK_N, BLOCK_C)
            m = tl.maximum(m, tl.max(t_b, axis=1))
        e_a = _part_weights(t_a, m, POOL_MAX)
        den = tl.sum(e_a, axis=1)
        if K_LO > 0:
            e_b = _part_weights(t_b, m, POOL_MAX)
            den += tl.sum(e_b, axis=1)
        prob_a = e_a / den[:, None, :]
        s_cls = m if POOL_MAX else tl.sum(prob_a * l3_a, axis=1)
        if K_LO > 0:
            prob_b = e_b / den[:, None, :]
            if not POOL_MAX:
                s_cls += tl.sum(prob_b * l3_b, axis=1)
    else:
        s_cls = l_a
    z = _logits_z(s_cls, offs_n, offs_c, bias_ptr, offset_ptr, N, C, scale, shift, HAS_BIAS, HAS_OFFSET)
    dz = _grad_z(z, _lse_terms(offs_n, offs_c, labels, N, C), lse, g)
    ds = dz * scale  # dL/dS
    if K > 1:
        dl_a = _part_grad(l3_a, prob_a, s_cls, ds, inv_gamma, POOL_MAX, BLOCK_N, K_HI * BLOCK_C)
        if K_LO > 0:
            dl_b = _part_grad(l3_b, prob_b, s_cls, ds, inv_gamma, POOL_MAX, BLOCK_N, K_LO * BLOCK_C)
    else:
        dl_a = ds
    return l_a, dl_a, l_b, dl_b, dz


@triton.jit
def _grad_dot(a, b, acc, OP: tl.constexpr, PRECISION: tl.constexpr, SPLIT_FP16: tl.constexpr):
    """acc + a @ b for a gradient GEMM, a [M, R] in the accumulation dtype, b [R, S] already in OP.

    SPLIT_FP16 (fp16 operands): each row of a is prescaled by a power of two to a maximum in [1, 2) (small entries,
    dL/dl times an inverse proxy norm, would otherwise be fp16 subnormals of a few bits), then split into two fp16
    terms, hi + lo (22 bits, two MMAs), and the product scaled back in fp32. Where x ~ w a gradient is the
    difference of two nearly equal terms, one of them this product: rounded to fp16's 11 bits, the difference is
    rounding, of the order of 2^-11 * scale (the fused fp16 ArcFace gradients were several percent off)."""
    if SPLIT_FP16:
        amax = tl.max(tl.abs(a), axis=1)
        # (a row below 1e-30 keeps its scale: 2^100 and more would overflow, and its products are 0 in fp16 anyway)
        e = tl.floor(tl.log2(tl.where(amax > 1e-30, amax, 1.0)))[:, None]
        a = a * tl.exp2(-e)
        hi = a.to(OP)
        prod = tl.dot(hi, b, input_precision=PRECISION, out_dtype=acc.dtype)
        prod = tl.dot((a - hi.to(a.dtype)).to(OP), b, prod, input_precision=PRECISION, out_dtype=acc.dtype)
        acc += prod * tl.exp2(e)
    else:
        acc = tl.dot(a.to(OP), b, acc, input_precision=PRECISION, out_dtype=acc.dtype)
    return acc
