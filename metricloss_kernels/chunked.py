"""Chunked (streaming) torch implementation of the `class_lse` op (metricloss_kernels.lse: the formulas, the
spec and the registration), evaluated over tiles of classes x rows; the op's choice on every device but CUDA.

No N x C (or N x C*K) tensor is ever allocated: the forward pass streams over tiles of at most
`spec.block_classes` classes (all K proxies of a class in the same tile) and returns only the [N] / [C] result;
the backward pass recomputes each tile's logits from the inputs and that result (FlashAttention-2 style) and writes
dW tile by tile. No tensor data is read on the host: the tiles follow from the shapes alone, and the entries a
tile leaves out (z[labels_i, i]) are masked by a gather / scatter of one entry per row.

Design notes (CPU first, device-agnostic torch ops):
- Tiles are computed transposed, as [classes*K, rows]: with the batch on the contiguous axis the reductions over the
  K proxies of a class vectorise, and `W_blk @ X^T` is the faster GEMM orientation on CPU.
- W is normalised per tile on its [B*K, D] slice (cheaper than rescaling the [B*K, N] logits when D < N); fp16/bf16
  proxies are thus converted to fp32 one tile at a time. Scalars are folded into the small [N, D] operand: for
  K == 1 the scale (a tile's logits are one GEMM), for K > 1 the 1/gamma (exp needs no extra pass). Constants of an
  LSE (the shift; the bias of a column reduction) are added to the result instead of to every logit.
- Every tile-sized temporary lives in a workspace allocated once per call (and worker): fresh multi-MB allocations
  per tile cost page faults on CPU that rival the arithmetic.
- On CPU, from two tiles a thread on, the tiles are tasks of the intra-op threads, each tile's ops
  single-threaded (metricloss_kernels._parallel: a tile's dozens of small ops split over every thread would each
  wait for the slowest, which on a shared machine is the one just descheduled). The tiles form contiguous groups,
  each with its own accumulators of what sums over classes (a row LSE's [N] partials, dX [N, D]), added in group
  order at the end: the result does not depend on which thread ran which group.
- All arithmetic is in the compute dtype (_numerics.compute_dtype); gradients come back in the input dtypes.
"""

import math

import torch

from . import _parallel
from ._numerics import compute_dtype, normalize_backward_, unit_rows

__all__ = ["forward", "backward", "plan", "left_out", "saved_lse", "Workspace"]

# Bytes of logits per tile (classes*K x rows). On CPU about a core's L2 for a tile's elementwise passes, and no
# smaller: each tile costs a few dozen ops of Python, and a fresh workspace per thread (of 2, 3, 4 and 6 MB, 4 MB
# measured best overall on 2 cores). On GPUs large enough to fill the device.
_TILE_BYTES = {"cpu": 4 * 2**20}
_TILE_BYTES_DEFAULT = 64 * 2**20
# Rows per tile: the batch is normally processed whole; only row-heavy calls (e.g. proxies as rows) are split.
MAX_ROWS = 4096
# Threads (CPU, metricloss_kernels._parallel.plan): a thread's unit of work is a group of tiles. The backward gives
# each group its own dX accumulator: a group per tile as long as a thread's accumulators fit in this many bytes (the
# finest balance on a loaded machine), several tiles a group beyond, tiles in order when one does not fit.
_GROUP_BYTES = 32 * 2**20
# With both sides normalised |l| <= 1, so exp(l / gamma) cannot overflow while 1/gamma is at most this: the
# intra-class softmax then skips its max-subtraction pass.
_MAX_UNSHIFTED_INV_GAMMA = 60.0


def _lse_(z: torch.Tensor, dim: int) -> torch.Tensor:
    """logsumexp of z along dim, destroying z; an all -inf slice gives -inf."""
    m = z.amax(dim, keepdim=True)
    m.masked_fill_(m == float("-inf"), 0)
    return z.sub_(m).exp_().sum(dim, keepdim=True).log_().add_(m).squeeze(dim)


def plan(n, num_classes, spec, budget, t, logit_bytes, class_bytes=0, per_worker=None):
    """The tiles of a pass over the classes, shared with the gemm implementation: (rows per tile, classes per tile,
    tiles, groups of tiles). A tile of R rows and B classes costs B * (R * logit_bytes + class_bytes) bytes of
    `budget`; spec.block_rows / spec.block_classes override; the groups are `_parallel.plan`'s tasks on tensors like
    `t` (one group for per_worker=0)."""
    rows = min(n, spec.block_rows or MAX_ROWS)
    fixed = spec.block_classes
    tiles = math.ceil(num_classes / fixed) if fixed else math.ceil(
        num_classes * (rows * logit_bytes + class_bytes) / budget)
    return (rows, *_parallel.plan(num_classes, tiles, t, per_worker, fixed))


class Workspace:
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
    """Everything a pass over the tiles needs, recomputed in forward and backward; the plan (tile bounds, groups)
    depends on the shapes, the thread count and whether dX is accumulated (`accumulate_x`) only.

    Tile layout: for K > 1 a block's proxies are reordered proxy-major ([K, B] rows instead of the class-major
    [B, K]), so the logits come out as [K, B, R] and the reductions over K add K contiguous [B, R] slabs."""

    def __init__(self, x, w, labels, bias, spec, offset=None, accumulate_x=False):
        k = spec.centers_per_class
        self.cdtype = compute_dtype(x.dtype, w.dtype)
        self.n, self.num_classes, self.k = x.shape[0], w.shape[0] // k, k
        self.w, self.labels, self.scale = w, labels, spec.scale
        # A per-column constant moves out of a column LSE: only a row reduction needs the bias inside the tiles.
        self.bias = bias if spec.row else None
        # minus the row offset, added with the GEMM (K == 1) or the scaling (K > 1): no pass of its own
        self.row_shift = None if offset is None else -offset.to(self.cdtype)
        self.normalize_w = spec.normalize_w
        self.bounded = spec.normalize_x and spec.normalize_w and 1.0 / spec.gamma <= _MAX_UNSHIFTED_INV_GAMMA
        self.pool_max = spec.max_pool
        self.device, self.workspaces = x.device, {}

        xc = x.to(self.cdtype)
        # x_grad: the normalisation's backward factor per row (_numerics.unit_rows)
        self.x_hat, self.x_grad = unit_rows(xc, self.cdtype) if spec.normalize_x else (xc, None)
        # The GEMM operand: K == 1 folds the scale (z is one GEMM), K > 1 the softmax's 1/gamma (l' = l / gamma;
        # the max pool takes l' = l).
        self.inv_t = 1.0 if self.pool_max else 1.0 / spec.gamma
        self.x_in = self.x_hat * (spec.scale if k == 1 else self.inv_t)

        itemsize = self.x_in.element_size()
        per_worker = _GROUP_BYTES // max(1, self.x_in.numel() * itemsize) if accumulate_x else None
        self.rows, self.block, self.tiles, self.groups = plan(
            self.n, self.num_classes, spec, _TILE_BYTES.get(x.device.type, _TILE_BYTES_DEFAULT), self.x_in,
            k * itemsize, per_worker=per_worker)

    def run(self, fn):
        """fn(group, workspace) for every group in range(self.groups), spread over the threads; a workspace is
        one worker's own."""
        def task(group, worker):
            if worker not in self.workspaces:
                self.workspaces[worker] = Workspace(self.cdtype, self.device)
            fn(group, self.workspaces[worker])
        _parallel.run(self.groups, task, self.x_in)

    def class_blocks(self, group):
        """The class tiles [c0, c1) of `group`: a contiguous share of the tiles."""
        for tile in _parallel.share(group, self.groups, self.tiles):
            c0 = tile * self.block
            yield c0, min(c0 + self.block, self.num_classes)

    def row_chunks(self):
        for r0 in range(0, self.n, self.rows):
            yield r0, min(r0 + self.rows, self.n)

    def w_block(self, c0, c1, ws):
        """Proxies of classes [c0, c1) in compute dtype, proxy-major, normalised if asked:
        (w_hat [K*B, D], the normalisation's backward factors [K*B] (_numerics.unit_rows) or None)."""
        wb = self.w[c0 * self.k:c1 * self.k]
        if self.k > 1:
            wb = wb.unflatten(0, (c1 - c0, self.k)).transpose(0, 1)  # [K, B, D] strided view
        if not self.normalize_w:
            if wb.dtype == self.cdtype and self.k == 1:
                return wb, None
            return ws.get("w", *wb.shape).copy_(wb).flatten(0, -2), None
        w_hat, grad_scale = unit_rows(wb, self.cdtype, out=ws.get("w", *wb.shape))
        return w_hat.flatten(0, -2), grad_scale.flatten()

    def mask_(self, z, c0, r0, r1):
        """Sets z[labels_i - c0, i - r0] = -inf on the tile z [B, R] for its rows whose label lies in the tile's
        classes (one gather and one scatter of R entries; other labels, in or outside [0, C), leave z as it is)."""
        rel = self.labels[r0:r1] - c0
        inside = (rel >= 0) & (rel < z.shape[0])
        index = rel.clamp(0, z.shape[0] - 1).unsqueeze(0)
        z.scatter_(0, index, z.gather(0, index).masked_fill_(inside.unsqueeze(0), float("-inf")))

    def logits(self, c0, c1, w_hat, r0, r1, ws, backward=False):
        """Masked tile z [B, R] (in workspace; scale * S (+ bias for a row reduction) - the row offset, without the
        shift), and for K > 1 the pieces of S the backward needs.

        K > 1: l' = l / gamma [K, B, R], e = exp(l' - max_k l') (max taken as 0 when bounded), den = sum_k e,
        S' = S / gamma = sum_k e l' / den. Forward only: l' is overwritten by e * l' (not needed afterwards).
        The max pool: l' = l, S' = max_k l, e = [l' == S'] (the limit of the softmax weights), den = sum_k e; the
        backward's formula for dS/dl is then that limit as it stands."""
        b, r = c1 - c0, r1 - r0
        xt = self.x_in[r0:r1].t()
        shift = None if self.row_shift is None else self.row_shift[None, r0:r1]
        if self.k == 1:
            if shift is None:
                z = torch.mm(w_hat, xt, out=ws.get("l", b, r))
            else:
                z = torch.addmm(shift, w_hat, xt, out=ws.get("l", b, r))
            parts = None
        else:
            l3 = torch.mm(w_hat, xt, out=ws.get("l", self.k * b, r)).view(self.k, b, r)
            if self.pool_max:
                s = torch.amax(l3, 0, out=ws.get("s", b, r))
                e = torch.eq(l3, s, out=ws.get("e", self.k, b, r)) if backward else None
                den = e.sum(0) if backward else None
            else:
                e = ws.get("e", self.k, b, r)
                if self.bounded:
                    torch.exp(l3, out=e)
                else:
                    torch.sub(l3, l3.amax(0), out=e).exp_()
                den = e.sum(0)
                el = torch.mul(e, l3, out=ws.get("g", self.k, b, r)) if backward else l3.mul_(e)
                s = el.sum(0).div_(den)  # S' = S / gamma
            parts = (l3, e, den, s)
            if shift is None:
                z = torch.mul(s, self.scale / self.inv_t, out=ws.get("z", b, r))
            else:
                z = torch.add(shift, s, alpha=self.scale / self.inv_t, out=ws.get("z", b, r))
        if self.bias is not None:
            z.add_(self.bias[c0:c1, None].to(self.cdtype))
        self.mask_(z, c0, r0, r1)
        return z, parts


def left_out(shift, bias, spec, dtype):
    """What the tiles leave out of the result: the shift, and the bias of a column reduction ([C] or scalar)."""
    if not spec.row and bias is not None:
        return bias.to(dtype) + shift
    return shift


def saved_lse(grad, out, bias, spec, dtype):
    """(g, lse) for a backward pass over the tiles, in `dtype`: the upstream gradient with 0 at the empty LSEs (-inf:
    they have no term for any gradient, NaN included, to flow into), and the result without `left_out` (the tiles'
    z leave it out) with 0 at the empty ones (their z are all -inf: any finite stand-in makes exp(z - lse) = 0
    there, never NaN)."""
    empty = out == float("-inf")
    g = grad.to(dtype).masked_fill(empty, 0)
    return g, (out - left_out(spec.shift, bias, spec, dtype)).masked_fill_(empty, 0)


def forward(x, w, labels, bias, spec, offset=None):
    """class_lse (metricloss_kernels.lse) of x [N, D], w [C*K, D], labels [N], bias [C] or None under `spec`, with
    the row offset [N] or None: [N] (row) or [C] (col) in the compute dtype."""
    t, row = _Tiling(x, w, labels, bias, spec, offset), spec.row
    # A row LSE runs over every class: one partial per group, merged at the end. A column's classes are one tile's.
    out = torch.full((t.groups, t.n) if row else (1, t.num_classes), float("-inf"), dtype=t.cdtype, device=x.device)

    def group(g, ws):
        acc = out[g if row else 0]
        for c0, c1 in t.class_blocks(g):
            w_hat, _ = t.w_block(c0, c1, ws)
            for r0, r1 in t.row_chunks():
                z, _ = t.logits(c0, c1, w_hat, r0, r1, ws)
                seg = acc[r0:r1] if row else acc[c0:c1]
                seg.copy_(torch.logaddexp(seg, _lse_(z, 0 if row else 1)))

    t.run(group)
    out = out.logsumexp(0) if out.shape[0] > 1 else out[0]
    return out.add_(left_out(spec.shift, bias, spec, t.cdtype))


def backward(grad, out, x, w, labels, bias, spec, need_x, need_w, need_b, offset=None):
    """(dx, dw, dbias) of class_lse for the upstream gradient `grad` and the forward result `out` (of the same
    offset), each in its input's dtype, or None when not needed."""
    k, row = spec.centers_per_class, spec.row
    t = _Tiling(x, w, labels, bias, spec, offset, accumulate_x=need_x)
    cd = t.cdtype
    g, lse = saved_lse(grad, out, bias, spec, cd)
    # dX sums over every class: one accumulator per group, added at the end. dW and dbias are a tile's own.
    dx_parts = torch.zeros((t.groups, *t.x_hat.shape), dtype=cd, device=x.device) if need_x else None
    dw = torch.empty_like(w) if need_w else None
    db = None
    if need_b:  # a column reduction's bias is outside the LSE: d lse_c / d b_c = 1 (0 when empty)
        db = torch.zeros(t.num_classes, dtype=cd, device=w.device) if row else g.clone()

    def group(gi, ws):
        for c0, c1 in t.class_blocks(gi):
            w_hat, w_grad = t.w_block(c0, c1, ws)
            dw_hat = None
            if need_w:  # K == 1 in the weight's dtype: dW is computed in place
                direct = k == 1 and dw.dtype == cd
                dw_hat = dw[c0:c1] if direct else ws.get("dw", *w_hat.shape)
            for r0, r1 in t.row_chunks():
                z, parts = t.logits(c0, c1, w_hat, r0, r1, ws, backward=True)
                if row:
                    p = z.sub_(lse[None, r0:r1]).exp_().mul_(g[None, r0:r1])
                else:
                    p = z.sub_(lse[c0:c1, None]).exp_().mul_(g[c0:c1, None])
                if need_b and row:
                    db[c0:c1].add_(p.sum(1))
                if k == 1:
                    grad_l, x_w = p, t.x_in  # scale folded into x_in (for dW); dx_hat gets it at the end
                else:
                    # dz/dl_k = scale * p_k (1 + (l_k - S) / gamma) = coef * e_k (1 + l'_k - S'),
                    # coef = scale * P / den, p_k = e_k / den (the max pool: coef * e_k, as l'_k = S' where e_k = 1)
                    l3, e, den, s = parts
                    coef = p.mul_(spec.scale).div_(den)
                    grad_l = torch.addcmul(torch.addcmul(coef, coef, s, value=-1), coef, l3,
                                           out=ws.get("g", *l3.shape)).mul_(e).view(-1, r1 - r0)
                    x_w = t.x_hat
                if need_x:
                    dx_parts[gi, r0:r1].addmm_(grad_l.t(), w_hat)
                if need_w:
                    if r0 == 0:
                        torch.mm(grad_l, x_w[r0:r1], out=dw_hat)
                    else:
                        dw_hat.addmm_(grad_l, x_w[r0:r1])
            if need_w:
                if spec.normalize_w:
                    normalize_backward_(dw_hat, w_hat, w_grad, ws.get("tmp", *w_hat.shape))
                if k > 1:  # back from proxy-major to class-major
                    dw_block = dw[c0 * k:c1 * k].unflatten(0, (c1 - c0, k))
                    dw_block.copy_(dw_hat.unflatten(0, (k, c1 - c0)).transpose(0, 1))
                elif not direct:  # (copy_ runs without the GIL, unlike a slice assignment)
                    dw[c0:c1].copy_(dw_hat)

    t.run(group)
    dx = None
    if need_x:
        dx_hat = dx_parts.sum(0) if t.groups > 1 else dx_parts[0]
        if k == 1:
            dx_hat.mul_(spec.scale)
        if spec.normalize_x:
            normalize_backward_(dx_hat, t.x_hat, t.x_grad, torch.empty_like(dx_hat))
        dx = dx_hat.to(x.dtype)
    return dx, dw, db.to(bias.dtype) if need_b else None
