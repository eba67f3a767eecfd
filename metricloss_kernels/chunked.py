"""Chunked (streaming) PyTorch backend: the `class_lse` primitive evaluated over tiles of classes x rows.

    l_{i,c,k} = x'_i . w'_{c,k}        (x' = x / max(||x||, 1e-12) if normalize_x, likewise w')
    S_{i,c}   = sum_k softmax_k(l_{i,c,k} / gamma) l_{i,c,k}         (S = l when K == 1)
    z_{i,c}   = scale * S_{i,c} + shift (+ bias_c)
    reduce="row": out_i = LSE_{c != labels_i} z_{i,c}     -> [N]
    reduce="col": out_c = LSE_{i : labels_i != c} z_{i,c} -> [C]

No N x C (or N x C*K) tensor is ever allocated: the forward pass streams over tiles of at most `block_size` classes
(all K proxies of a class in the same tile) and saves only its inputs and the [N] / [C] result; the backward pass
recomputes each tile's logits from them (FlashAttention-2 style) and writes dW tile by tile.

Design notes (CPU first, device-agnostic torch ops):
- Tiles are computed transposed, as [classes*K, rows]: with the batch on the contiguous axis the reductions over the
  K proxies of a class vectorise, and `W_blk @ X^T` is the faster GEMM orientation on CPU.
- W is normalised per tile on its [B*K, D] slice (cheaper than rescaling the [B*K, N] logits when D < N); fp16/bf16
  proxies are thus converted to fp32 one tile at a time. Scalars are folded into the small [N, D] operand: for
  K == 1 the scale (a tile's logits are one GEMM), for K > 1 the 1/gamma (exp needs no extra pass). Constants of an
  LSE (the shift; the bias of a column reduction) are added to the result instead of to every logit.
- Every tile-sized temporary lives in a workspace allocated once per call: fresh multi-MB allocations per tile cost
  page faults on CPU that rival the arithmetic.
- All arithmetic is fp32 (fp64 for fp64 inputs); gradients come back in the input dtypes.
"""
import torch

__all__ = ["class_lse"]

# Bytes of logits per tile (classes*K x rows). On CPU small enough that a tile's elementwise passes stay in L2
# (1-4 MB measured equally fast on 2 cores), and no smaller: every tile costs ~20 parallel regions, which a loaded
# machine makes expensive. On GPUs large enough to fill the device.
_TILE_BYTES = {"cpu": 4 * 2**20}
_TILE_BYTES_DEFAULT = 64 * 2**20
# Rows per tile: the batch is normally processed whole; only row-heavy calls (e.g. proxies as rows) are split.
_MAX_ROWS = 4096
_NORM_EPS = 1e-12
# With both sides normalised |l| <= 1, so exp(l / gamma) cannot overflow while 1/gamma is at most this: the
# intra-class softmax then skips its max-subtraction pass.
_MAX_UNSHIFTED_INV_GAMMA = 60.0


def _inv_norm(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """1 / max(||t_r||, eps) over the last dim, computed in `dtype`."""
    return torch.linalg.vector_norm(t, dim=-1, dtype=dtype).clamp_min_(_NORM_EPS).reciprocal_()


def _normalize_backward_(grad_hat: torch.Tensor, hat: torch.Tensor, inv: torch.Tensor, tmp: torch.Tensor):
    """In place on grad_hat: gradient w.r.t. t of t_hat = t * inv, inv = 1 / max(||t||, eps).

    Unclamped rows: inv * (g - t_hat (t_hat . g)); clamped rows (inv == 1/eps): inv * g. tmp: scratch like hat."""
    dot = torch.mul(hat, grad_hat, out=tmp).sum(1, keepdim=True)
    dot.masked_fill_((inv >= 1.0 / _NORM_EPS)[:, None], 0)
    return grad_hat.addcmul_(hat, dot, value=-1).mul_(inv[:, None])


def _lse_(z: torch.Tensor, dim: int) -> torch.Tensor:
    """logsumexp of z along dim, destroying z; an all -inf slice gives -inf."""
    m = z.amax(dim, keepdim=True)
    m.masked_fill_(m == float("-inf"), 0)
    return z.sub_(m).exp_().sum(dim, keepdim=True).log_().add_(m).squeeze(dim)


class _Workspace:
    """Named scratch buffers, allocated at the first (largest) tile and reused as views by the smaller last ones."""

    def __init__(self, dtype, device):
        self.dtype, self.device, self.bufs = dtype, device, {}

    def get(self, name, *shape):
        numel = 1
        for s in shape:
            numel *= s
        buf = self.bufs.get(name)
        if buf is None or buf.numel() < numel:
            buf = self.bufs[name] = torch.empty(numel, dtype=self.dtype, device=self.device)
        return buf[:numel].view(shape)


class _Tiling:
    """Everything a pass over the tiles needs, recomputed identically in forward and backward.

    Tile layout: for K > 1 a block's proxies are reordered proxy-major ([K, B] rows instead of the class-major
    [B, K]), so the logits come out as [K, B, R] and the reductions over K add K contiguous [B, R] slabs."""

    def __init__(self, x, w, labels, bias, k, gamma, scale, normalize_x, normalize_w, reduce, block_size):
        self.cdtype = torch.float64 if torch.float64 in (x.dtype, w.dtype) else torch.float32
        self.n, self.num_classes, self.k = x.shape[0], w.shape[0] // k, k
        self.w, self.gamma, self.scale = w, gamma, scale
        # A per-column constant moves out of a column LSE: only a row reduction needs the bias inside the tiles.
        self.bias = bias if reduce == "row" else None
        self.normalize_w = normalize_w
        self.bounded = normalize_x and normalize_w and 1.0 / gamma <= _MAX_UNSHIFTED_INV_GAMMA
        self.ws = _Workspace(self.cdtype, x.device)

        xc = x.to(self.cdtype)
        self.x_inv = _inv_norm(xc, self.cdtype) if normalize_x else None
        self.x_hat = xc * self.x_inv[:, None] if normalize_x else xc
        # The GEMM operand: K == 1 folds the scale (z is one GEMM), K > 1 folds 1/gamma (l' = l / gamma).
        self.x_in = self.x_hat * (scale if k == 1 else 1.0 / gamma)

        self.rows = min(self.n, _MAX_ROWS)
        budget = _TILE_BYTES.get(x.device.type, _TILE_BYTES_DEFAULT)
        per_tile = max(1, budget // (self.rows * k * self.x_in.element_size()))
        self.block = min(self.num_classes, int(block_size) if block_size is not None else per_tile)

        # Rows grouped by label, so each tile finds the (label, row) entries it must mask without a scan.
        self.order = torch.argsort(labels)
        self.sorted_labels = labels[self.order]
        self.class_starts = list(range(0, self.num_classes, self.block)) + [self.num_classes]
        starts = torch.tensor(self.class_starts, dtype=labels.dtype, device=labels.device)
        self.label_bounds = torch.searchsorted(self.sorted_labels, starts).tolist()

    def class_blocks(self):
        for j in range(len(self.class_starts) - 1):
            yield j, self.class_starts[j], self.class_starts[j + 1]

    def row_chunks(self):
        for r0 in range(0, self.n, self.rows):
            yield r0, min(r0 + self.rows, self.n)

    def w_block(self, c0, c1):
        """Proxies of classes [c0, c1) in compute dtype, proxy-major, normalised if asked:
        (w_hat [K*B, D], inverse norms [K*B] or None)."""
        wb = self.w[c0 * self.k:c1 * self.k]
        if self.k > 1:
            wb = wb.unflatten(0, (c1 - c0, self.k)).transpose(0, 1)  # [K, B, D] strided view
        if not self.normalize_w:
            if wb.dtype == self.cdtype and self.k == 1:
                return wb, None
            return self.ws.get("w", *wb.shape).copy_(wb).flatten(0, -2), None
        inv = _inv_norm(wb, self.cdtype)
        w_hat = torch.mul(wb, inv.unsqueeze(-1), out=self.ws.get("w", *wb.shape))
        return w_hat.flatten(0, -2), inv.flatten()

    def mask_index(self, j, c0, r0, r1):
        """(class-in-block, row-in-chunk) index of the entries z[labels_i, i] of tile (block j, rows [r0, r1))."""
        a, b = self.label_bounds[j], self.label_bounds[j + 1]
        rows, cls = self.order[a:b], self.sorted_labels[a:b] - c0
        if r0 > 0 or r1 < self.n:
            keep = (rows >= r0) & (rows < r1)
            rows, cls = rows[keep] - r0, cls[keep]
        return cls, rows

    def logits(self, j, c0, c1, w_hat, r0, r1, backward=False):
        """Masked tile z [B, R] (in workspace; scale * S (+ bias for a row reduction), without the shift), and for
        K > 1 the pieces of S the backward needs.

        K > 1: l' = l / gamma [K, B, R], e = exp(l' - max_k l') (max taken as 0 when bounded), den = sum_k e,
        S' = S / gamma = sum_k e l' / den. Forward only: l' is overwritten by e * l' (not needed afterwards)."""
        ws, b, r = self.ws, c1 - c0, r1 - r0
        xt = self.x_in[r0:r1].t()
        if self.k == 1:
            z = torch.mm(w_hat, xt, out=ws.get("l", b, r))
            parts = None
        else:
            l3 = torch.mm(w_hat, xt, out=ws.get("l", self.k * b, r)).view(self.k, b, r)
            e = ws.get("e", self.k, b, r)
            if self.bounded:
                torch.exp(l3, out=e)
            else:
                torch.sub(l3, l3.amax(0), out=e).exp_()
            den = e.sum(0)
            el = torch.mul(e, l3, out=ws.get("g", self.k, b, r)) if backward else l3.mul_(e)
            s = el.sum(0).div_(den)  # S' = S / gamma
            parts = (l3, e, den, s)
            z = torch.mul(s, self.scale * self.gamma, out=ws.get("z", b, r))
        if self.bias is not None:
            z.add_(self.bias[c0:c1, None].to(self.cdtype))
        cls, rows = self.mask_index(j, c0, r0, r1)
        z.index_put_((cls, rows), z.new_tensor(float("-inf")))
        return z, parts


def _offset(lse, shift, bias, reduce):
    """What the tiles leave out of the result: the shift, and the bias of a column reduction ([C] or scalar)."""
    if reduce == "col" and bias is not None:
        return bias.to(lse.dtype) + shift
    return shift


class _ClassLSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, labels, bias, k, gamma, scale, shift, normalize_x, normalize_w, reduce, block_size):
        t = _Tiling(x, w, labels, bias, k, gamma, scale, normalize_x, normalize_w, reduce, block_size)
        size = t.n if reduce == "row" else t.num_classes
        out = torch.full((size,), float("-inf"), dtype=t.cdtype, device=x.device)
        for j, c0, c1 in t.class_blocks():
            w_hat, _ = t.w_block(c0, c1)
            for r0, r1 in t.row_chunks():
                z, _ = t.logits(j, c0, c1, w_hat, r0, r1)
                seg = out[r0:r1] if reduce == "row" else out[c0:c1]
                seg.copy_(torch.logaddexp(seg, _lse_(z, 0 if reduce == "row" else 1)))
        out += _offset(out, shift, bias, reduce)
        ctx.save_for_backward(x, w, labels, bias, out)
        ctx.args = (k, gamma, scale, shift, normalize_x, normalize_w, reduce, block_size)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, w, labels, bias, lse = ctx.saved_tensors
        k, gamma, scale, shift, normalize_x, normalize_w, reduce, block_size = ctx.args
        need_x, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[3]
        t = _Tiling(x, w, labels, bias, k, gamma, scale, normalize_x, normalize_w, reduce, block_size)
        cd, ws, row = t.cdtype, t.ws, reduce == "row"
        g = grad_out.to(cd)
        empty = lse == float("-inf")
        # The tiles' z leave out _offset; an empty LSE (-inf) has all its z = -inf, and any finite stand-in makes
        # exp(z - lse) = 0 there, never NaN.
        lse = (lse - _offset(lse, shift, bias, reduce)).masked_fill_(empty, 0)
        dx_hat = torch.zeros_like(t.x_hat) if need_x else None
        dw = torch.empty_like(w) if need_w else None
        db = None
        if need_b:  # a column reduction's bias is outside the LSE: d lse_c / d b_c = 1 (0 when empty)
            db = torch.zeros(t.num_classes, dtype=cd, device=w.device) if row else g.masked_fill(empty, 0)

        for j, c0, c1 in t.class_blocks():
            w_hat, w_inv = t.w_block(c0, c1)
            dw_hat = None
            if need_w:  # K == 1 in the weight's dtype: dW is computed in place
                direct = k == 1 and dw.dtype == cd
                dw_hat = dw[c0:c1] if direct else ws.get("dw", *w_hat.shape)
            for r0, r1 in t.row_chunks():
                z, parts = t.logits(j, c0, c1, w_hat, r0, r1, backward=True)
                if row:
                    p = z.sub_(lse[None, r0:r1]).exp_().mul_(g[None, r0:r1])
                else:
                    p = z.sub_(lse[c0:c1, None]).exp_().mul_(g[c0:c1, None])
                if need_b and row:
                    db[c0:c1] += p.sum(1)
                if k == 1:
                    grad_l, x_w = p, t.x_in  # scale folded into x_in (for dW); dx_hat gets it at the end
                else:
                    # dz/dl_k = scale * p_k (1 + (l_k - S) / gamma) = coef * e_k (1 + l'_k - S'),
                    # coef = scale * P / den, p_k = e_k / den
                    l3, e, den, s = parts
                    coef = p.mul_(scale).div_(den)
                    grad_l = torch.addcmul(torch.addcmul(coef, coef, s, value=-1), coef, l3,
                                           out=ws.get("g", *l3.shape)).mul_(e).view(-1, r1 - r0)
                    x_w = t.x_hat
                if need_x:
                    dx_hat[r0:r1].addmm_(grad_l.t(), w_hat)
                if need_w:
                    if r0 == 0:
                        torch.mm(grad_l, x_w[r0:r1], out=dw_hat)
                    else:
                        dw_hat.addmm_(grad_l, x_w[r0:r1])
            if need_w:
                if normalize_w:
                    _normalize_backward_(dw_hat, w_hat, w_inv, ws.get("tmp", *w_hat.shape))
                if k > 1:  # back from proxy-major to class-major
                    dw_block = dw[c0 * k:c1 * k].unflatten(0, (c1 - c0, k))
                    dw_block.copy_(dw_hat.unflatten(0, (k, c1 - c0)).transpose(0, 1))
                elif not direct:
                    dw[c0:c1] = dw_hat

        dx = None
        if need_x:
            if k == 1:
                dx_hat.mul_(scale)
            if normalize_x:
                _normalize_backward_(dx_hat, t.x_hat, t.x_inv, torch.empty_like(dx_hat))
            dx = dx_hat.to(x.dtype)
        return (dx, dw, None, db.to(bias.dtype) if need_b else None) + (None,) * 8


def class_lse(x, w, labels, *, centers_per_class=1, gamma=0.1, scale=1.0, shift=0.0, bias=None,
              normalize_x=True, normalize_w=True, reduce="row", block_size=None):
    """Streaming masked log-sum-exp of the class logits, without materialising them.

    Args:
        x: [N, D] rows (any float dtype).
        w: [C*K, D] proxies, class-major (row c*K + k is proxy k of class c).
        labels: [N] int64 in [0, C); z[i, labels_i] is excluded from both reductions.
        centers_per_class: K. gamma: temperature of the intra-class softmax (unused when K == 1).
        scale, shift, bias ([C] or None): z = scale * S + shift + bias.
        normalize_x, normalize_w: L2-normalise the rows of x / w first (F.normalize semantics, eps 1e-12).
        reduce: "row" -> [N], LSE over classes c != labels_i;  "col" -> [C], LSE over rows i with labels_i != c.
        block_size: classes per tile (default: from a budget of 4 MB of logits per tile on CPU, 64 MB elsewhere).

    Returns:
        float32 tensor ([N] or [C]; float64 for float64 inputs). An empty LSE is -inf and gets zero gradient.
        Differentiable w.r.t. x, w and bias; their gradients come back in their own dtypes.
    """
    if reduce not in ("row", "col"):
        raise ValueError(f"reduce must be 'row' or 'col', got {reduce!r}")
    if block_size is not None and int(block_size) < 1:
        raise ValueError(f"block_size must be a positive number of classes, got {block_size!r}")
    return _ClassLSE.apply(x, w, labels, bias, int(centers_per_class), float(gamma), float(scale), float(shift),
                           bool(normalize_x), bool(normalize_w), reduce, block_size)
