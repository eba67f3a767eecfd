"""impl="gemm" of the `class_lse` op (metricloss_kernels.lse: the formulas, the spec and the registration): the
chunked implementation's tile loop on the GPU, with cuBLAS for the GEMMs and one Triton epilogue per pass
(metricloss_kernels.triton.epilogue) in place of its torch-op epilogue.

Per chunk of classes (all K proxies of a class in one chunk; rows in blocks of at most chunked's row count):
  forward   L = X^ W_c^T (raw logits, one GEMM), then the epilogue reduces L to running row partials (max, sum) or
            to the chunk's column LSEs;
  backward  L again, the epilogue writes dL (in the GEMM dtype), dX^ += dL W_c (addmm), G = dL^T X^ (one GEMM),
            and a row pass turns G into the chunk's dW rows (W's normalisation backward, W's dtype).
That is exactly the four GEMMs of the floor (2NDP forward, 6NDP backward, P = C*K), nothing recomputed per K slot.
W is read as stored: its normalisation enters as inverse norms applied in the epilogues (triton._common.inv_norms),
never as a normalised copy. x is normalised once ([N, D]) and its normalisation backward is applied once at the end,
as in the chunked implementation.

Chunks come from chunked.plan with two byte budgets. L2: a chunk's logits (fp32) and dL blocks take at most
_L2_BLOCK_BYTES, about two thirds of an H100's 50 MB L2, so that the kernels after the GEMM that writes a block
read it from L2 (through HBM these blocks would cost more than the GEMMs: 22 bytes a logit against 8*D FLOPs);
N = 1024: ~5400 proxies a chunk in bf16, ~4000 in fp32. Memory: everything a call allocates (the [N, D] buffers,
and per chunk the logits, dL, the fp32 G and an upcast W chunk for mixed dtypes) stays under 64 MB + 5% of W's
bytes, the extra-memory target of docs/benchmarks.md. `spec.block_classes` / `spec.block_rows` override the plan;
`plan` also returns the extra memory of a call (`workspace_bytes`).

GEMM dtype: the inputs' when x and w share a half type on CUDA (tensor cores; cuBLAS writes fp32 results:
`torch.mm(..., out_dtype=torch.float32)`), else the compute dtype (fp32 follows torch's matmul precision, TF32
under "high"). On CPU tensors (under TRITON_INTERPRET=1, how CI runs it) torch has no half GEMM with an fp32
result, so half inputs are computed in fp32 there.
"""
import torch

from . import chunked
from ._numerics import compute_dtype, normalize_backward_, unit_rows
from .triton import epilogue
from .triton._common import inv_norms

__all__ = ["backward", "forward", "plan", "workspace_bytes"]

# The extra memory of a call: _FIXED_BYTES + _W_FRACTION * W's bytes (docs/benchmarks.md's target).
_FIXED_BYTES = 64 * 2**20
_W_FRACTION = 0.05
# A chunk's logits and dL blocks together (the L2 budget).
_L2_BLOCK_BYTES = 32 * 2**20


def _gemm_dtype(x_dtype, w_dtype, acc, cuda: bool) -> torch.dtype:
    return x_dtype if x_dtype == w_dtype and cuda else acc


def plan(n, d, num_classes, x_dtype, w_dtype, spec, t, cuda=True):
    """(rows per block, classes per chunk, chunks, extra bytes of a forward + backward call) for x [n, d] and
    w [num_classes * K, d] of these dtypes (on CUDA, or not: the GEMM dtype differs). t: a tensor of the call
    (chunked.plan's argument)."""
    k = spec.centers_per_class
    acc = compute_dtype(x_dtype, w_dtype)
    op = _gemm_dtype(x_dtype, w_dtype, acc, cuda)
    def size(dtype):
        return torch.empty((), dtype=dtype).element_size()

    fixed = n * d * (2 * size(acc) + size(op))  # x^, its GEMM copy, the dX accumulator
    logit_bytes = k * (size(acc) + size(op))  # per row and class: the logits and dL
    class_bytes = k * d * (size(acc) + (size(op) if w_dtype != op else 0))  # G, an upcast chunk of W
    memory = _FIXED_BYTES + int(_W_FRACTION * num_classes * k * d * size(w_dtype)) - fixed
    rows = min(n, spec.block_rows or chunked.MAX_ROWS)
    # the L2 budget of the blocks, as a budget on a chunk's bytes (blocks and G)
    l2 = _L2_BLOCK_BYTES * (rows * logit_bytes + class_bytes) // (rows * logit_bytes)
    rows, block, chunks, _ = chunked.plan(n, num_classes, spec, max(1, min(memory, l2)), t, logit_bytes,
                                          class_bytes, 0)
    return rows, block, chunks, fixed + block * (rows * logit_bytes + class_bytes)


def workspace_bytes(x, w, spec) -> int:
    """The extra memory of a forward + backward call on tensors like x [N, D] and w [C*K, D]."""
    return plan(x.shape[0], x.shape[1], w.shape[0] // spec.centers_per_class, x.dtype, w.dtype, spec, x,
                x.device.type == "cuda")[3]


def _gemm(a, b, out, accumulate=False):
    """a @ b in `out`'s dtype (the accumulation dtype), into `out` or added to it: half operands (CUDA) through
    cuBLAS's fp32 output."""
    if a.dtype == out.dtype:
        return out.addmm_(a, b) if accumulate else torch.mm(a, b, out=out)
    product = torch.mm(a, b, out_dtype=out.dtype)
    return out.add_(product) if accumulate else product


class _Pass:
    """One pass over the chunks: the inputs prepared for the GEMMs (x^ in the GEMM dtype, W's inverse norms), the
    plan, and the logits of each block."""

    def __init__(self, x, w, labels, bias, spec, offset):
        k = spec.centers_per_class
        self.spec, self.k, self.w, self.labels = spec, k, w, labels.contiguous()
        self.offset = None if offset is None else offset.contiguous()
        self.n, self.d = x.shape
        self.num_classes = w.shape[0] // k
        self.acc = compute_dtype(x.dtype, w.dtype)
        self.op = _gemm_dtype(x.dtype, w.dtype, self.acc, x.device.type == "cuda")
        self.x_hat, self.gx = unit_rows(x, self.acc) if spec.normalize_x else (x.to(self.acc), None)
        self.x_in = self.x_hat.to(self.op)
        self.rw, self.gw = inv_norms(w, self.acc) if spec.normalize_w else (None, None)
        # A per-column constant moves out of a column LSE: only a row reduction needs the bias in the epilogue.
        self.bias = bias if spec.row else None
        self.inv_gamma = 1.0 / spec.gamma
        self.rows, self.block, _, _ = plan(self.n, self.d, self.num_classes, x.dtype, w.dtype, spec, x,
                                           x.device.type == "cuda")
        self.logits_ws = chunked.Workspace(self.acc, x.device)

    def chunks(self):
        """(c0, c1, the chunk's proxies [(c1 - c0) * K, D] in the GEMM dtype, their inverse norms or None)."""
        for c0 in range(0, self.num_classes, self.block):
            c1 = min(c0 + self.block, self.num_classes)
            p0, p1 = c0 * self.k, c1 * self.k
            rw = self.rw[p0:p1] if self.rw is not None else None
            yield c0, c1, self.w[p0:p1].to(self.op), rw

    def row_blocks(self):
        """(r0, r1, the row offset of rows [r0, r1) or None)."""
        for r0 in range(0, self.n, self.rows):
            r1 = min(r0 + self.rows, self.n)
            yield r0, r1, self.offset[r0:r1] if self.offset is not None else None

    def logits(self, w_c, r0, r1):
        """The raw logits <x^_i, w_p> of rows [r0, r1) and the chunk's proxies, [R, B*K] in the accumulation dtype."""
        out = self.logits_ws.get("l", r1 - r0, w_c.shape[0])
        return _gemm(self.x_in[r0:r1], w_c.t(), out)

    def splits(self, reduce):
        return epilogue.partial_splits(self.rows, self.block, self.num_classes, reduce, self.w.device,
                                       self.spec.num_splits)


def forward(x, w, labels, bias, spec, offset=None):
    """class_lse (metricloss_kernels.lse) of x [N, D], w [C*K, D], labels [N], bias [C] or None under `spec`, with
    the row offset [N] or None: [N] (row) or [C] (col) in the compute dtype."""
    t, row = _Pass(x, w, labels, bias, spec, offset), spec.row
    part = torch.full((t.splits(spec.reduce), t.n if row else t.num_classes), float("-inf"), dtype=t.acc,
                      device=x.device)
    for c0, c1, w_c, rw in t.chunks():
        bias_c = t.bias[c0:c1] if t.bias is not None else None
        for r0, r1, offset_r in t.row_blocks():
            epilogue.lse_update(part[:, r0:r1] if row else part[:, c0:c1], t.logits(w_c, r0, r1), rw, bias_c,
                                offset_r, t.labels[r0:r1], c0, t.k, spec.scale, t.inv_gamma, row, spec.max_pool)
    out = part[0] if part.shape[0] == 1 else part.logsumexp(0)
    return out.add_(chunked.left_out(spec.shift, bias, spec, t.acc))


def backward(grad, out, x, w, labels, bias, spec, need_x, need_w, need_b, offset=None):
    """(dx, dw, dbias) of class_lse for the upstream gradient `grad` and the forward result `out` (of the same
    offset), each in its input's dtype, or None when not needed."""
    t, row, k = _Pass(x, w, labels, bias, spec, offset), spec.row, spec.centers_per_class
    g, lse = chunked.saved_lse(grad, out, bias, spec, t.acc)
    dl_ws, g_ws = chunked.Workspace(t.op, x.device), chunked.Workspace(t.acc, x.device)
    dx_hat = torch.zeros((t.n, t.d), dtype=t.acc, device=x.device) if need_x else None
    dw = torch.empty(w.shape, dtype=w.dtype, device=w.device) if need_w else None
    db_part = None
    if need_b and row:
        db_part = torch.zeros((t.splits("col"), t.num_classes), dtype=t.acc, device=x.device)
    # G = dL^T X^ straight into dW's rows when W is in the accumulation dtype (finished there in place)
    direct = need_w and dw.dtype == t.acc
    for c0, c1, w_c, rw in t.chunks() if need_x or need_w or db_part is not None else ():
        p0, p1 = c0 * k, c1 * k
        bias_c = t.bias[c0:c1] if t.bias is not None else None
        g_c = dw[p0:p1] if direct else g_ws.get("g", p1 - p0, t.d)
        for r0, r1, offset_r in t.row_blocks():
            logits = t.logits(w_c, r0, r1)
            dl = dl_ws.get("dl", *logits.shape)
            epilogue.grad_block(dl, logits, rw, bias_c, offset_r, t.labels[r0:r1], lse[r0:r1] if row else lse[c0:c1],
                                g[r0:r1] if row else g[c0:c1], db_part[:, c0:c1] if db_part is not None else None,
                                c0, k, spec.scale, t.inv_gamma, row, spec.max_pool, spec.num_splits)
            if need_x:
                _gemm(dl, w_c, dx_hat[r0:r1], accumulate=True)
            if need_w:
                g_c = _gemm(dl.t(), t.x_in[r0:r1], g_c, accumulate=r0 > 0)
        if need_w:
            if spec.normalize_w:
                epilogue.dw_norm(dw[p0:p1], g_c, w[p0:p1], rw, t.gw[p0:p1])
            elif not direct:
                dw[p0:p1].copy_(g_c)
    dx = db = None
    if need_x:
        if spec.normalize_x:
            normalize_backward_(dx_hat, t.x_hat, t.gx)
        dx = dx_hat.to(x.dtype)
    if need_b:  # a column reduction's bias is outside the LSE: d lse_c / d b_c = 1 (0 when empty)
        db = (db_part.sum(0) if row else g).to(bias.dtype)
    return dx, dw, db
