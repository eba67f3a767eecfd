"""Every proxy loss written on top of one streaming primitive, the registered op `class_lse` (metricloss_kernels.lse;
its implementations: chunked.py, triton/, gemm.py), so that no N x C (or N x C*K) tensor is ever held.

Each loss is O(N) / O(C) torch work around one or two `lse` calls:
- the target-class similarities S_{i,y_i} are gathered in torch: O(N*K*D);
- row-wise losses (ProxyNCA, SoftTriple, MPA-DW/AP, ArcFace, sub-centre ArcFace, CosFace, L2-softmax,
  polytopes) combine the row LSE over the other classes with the target logit t_i: CE_i = softplus(r_i),
  r_i = LSE_{c != y_i} z_ic - t_i taken relative to t_i inside the op (`_relative_row_lse`);
- class-wise losses (ProxyAnchor, MPA, proxy-repel) take their negative term from the column LSE and their positive
  term from a segment log-sum-exp over the samples of each class (scatters into [C] buffers, O(N + C));
- R(W) is streamed over blocks of classes too (bmm of [B, K, D] blocks), forward and backward.
Signatures are those of `metricloss_kernels.reference` plus the keywords `lse`, a callable with the signature of
`lse.class_lse` (the functional layer passes it with the backend's `impl`, possibly class-sampled:
`distributed.sampled`), and `part`: `distributed.LOCAL`, or a `distributed.Shard` when the classes are sharded over a
process group (then the embeddings and labels are the gathered batch, the proxies this rank's; every class-wise sum,
count, target logit and row LSE goes through `part`, see metricloss_kernels/distributed.py). Inputs are assumed
valid (the functional layer validates). No tensor data is read on the host: every shape follows from the inputs'
shapes. fp16/bf16 inputs are computed in fp32: the op converts W tile by tile; on the chunked backend the functional
layer casts the inputs on entry all the same, so that their gradient terms are summed in fp32 (`_numerics`). Autocast
is off inside, and the loss comes back in `_numerics.result_dtype` of the embeddings.
"""
import math

import torch

from metricloss_kernels import _parallel, polytopes
from metricloss_kernels._math import arcface_target, softplus
from metricloss_kernels._numerics import compute_dtype, normalize, normalize_backward_, unit_rows, upcast
from metricloss_kernels.distributed import LOCAL
from metricloss_kernels.lse import class_lse

# Classes per block of the regulariser: [B, K, D] blocks of about this many bytes.
_REGULARIZER_BLOCK_BYTES = 4 * 2**20


def _unit_rows(embeddings: torch.Tensor, proxies: torch.Tensor) -> torch.Tensor:
    """x^ [N, D] in the compute dtype of the embeddings and proxies together (as the reference casts them)."""
    return normalize(embeddings.to(compute_dtype(embeddings.dtype, proxies.dtype)), dim=1)


class _TargetCosines(torch.autograd.Function):
    """l [N, K] = x^ [N, D] . w^ of the proxies at `rows` [N, K] of W [C*K, D] (w^ = w if not normalize_w; the
    normalisation of _numerics, its rules included). Forward and backward each run single-threaded inside one
    parallel region (_parallel.serial): a dozen [N, K, D] ops, too small to split over threads, each of which would
    wait for a descheduled thread on a loaded machine."""

    @staticmethod
    def forward(ctx, x_hat, proxies, rows, normalize_w):
        def run():
            w = proxies[rows].to(x_hat.dtype)  # [N, K, D]
            w_hat, grad_scale = unit_rows(w, x_hat.dtype) if normalize_w else (w, None)
            return w_hat, grad_scale, torch.bmm(w_hat, x_hat.unsqueeze(-1)).squeeze(-1)

        w_hat, grad_scale, l = _parallel.serial(run, proxies)
        ctx.save_for_backward(x_hat, w_hat, grad_scale, rows)
        ctx.proxies = (proxies.shape, proxies.dtype)
        return l

    @staticmethod
    def backward(ctx, grad):
        x_hat, w_hat, grad_scale, rows = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[:2]
        shape, dtype = ctx.proxies
        dw = torch.zeros(shape, dtype=dtype, device=grad.device) if need_w else None  # W-sized: multi-threaded

        def run():
            dx = torch.bmm(grad.unsqueeze(1), w_hat).squeeze(1) if need_x else None
            if need_w:
                dw_hat = grad.unsqueeze(-1) * x_hat.unsqueeze(1)  # [N, K, D]
                if grad_scale is not None:
                    normalize_backward_(dw_hat, w_hat, grad_scale)
                dw.index_put_((rows,), dw_hat.to(dtype), accumulate=True)
            return dx

        return _parallel.serial(run, x_hat), dw, None, None


def _target_cosines(x_hat: torch.Tensor, proxies: torch.Tensor, labels: torch.Tensor, k: int,
                    normalize_w: bool = True) -> torch.Tensor:
    """l_{i, y_i, k} = x^_i . w^_{y_i, k} -> [N, K] (w^ = w if not normalize_w), gathering only the N*K target
    proxies. Labels outside the classes of `proxies` (another rank's) read a valid row whose value is not used."""
    c = proxies.shape[0] // k
    rows = labels.clamp(0, c - 1)[:, None] * k + torch.arange(k, device=labels.device)
    return _TargetCosines.apply(x_hat, proxies, rows, normalize_w)


def _target_similarity(x_hat, proxies, labels, k, gamma):
    """S_{i, y_i} = sum_k softmax_k(l / gamma) l over the target class's proxies -> [N]."""
    l = _target_cosines(x_hat, proxies, labels, k)
    return l.squeeze(1) if k == 1 else (torch.softmax(l / gamma, dim=-1) * l).sum(-1)


def _relative_row_lse(lse, part, embeddings, weight, labels, target, **kwargs):
    """r_i = LSE_{c != y_i} z_ic - t_i [N] for the target logits t [N]: the op subtracts t from the logits inside the
    LSE (its `offset`), so r is exact at any magnitude of the logits (an LSE taken first keeps nothing of a CE below
    the last bit of |t|: with |t| = 1e31, log C became 0). t enters the op as a constant and its gradient, -1, is
    added here, where every rank of a sharded loss has it (`part.row_lse` gathers the ranks' relative LSEs)."""
    t = target.detach()
    return part.row_lse(lse(embeddings, weight, labels, reduce="row", offset=t, **kwargs)) + (t - target)


def _row_ce(*args, **kwargs) -> torch.Tensor:
    """mean_i CE_i, CE_i = LSE_c z_ic - t_i = softplus(r_i) (arguments of `_relative_row_lse`)."""
    return softplus(_relative_row_lse(*args, **kwargs)).mean()


def _class_softplus_lse(t: torch.Tensor, labels: torch.Tensor, num_classes: int):
    """softplus(LSE_{i: y_i = c} t_i) for every class c, 0 for the classes absent from the batch, and the number of
    samples of each class: ([C], [C]). A segment LSE through scatters into [C + 1] buffers, O(N + C); rows whose
    label lies outside [0, C) (another rank's classes) go to the extra slot, which is dropped."""
    labels = torch.where((labels >= 0) & (labels < num_classes), labels, num_classes)
    counts = t.new_zeros(num_classes + 1).index_add_(0, labels, torch.ones_like(t))
    present = counts > 0
    m = t.new_full((num_classes + 1,), float("-inf")).scatter_reduce_(0, labels, t.detach(), "amax")
    m = m.masked_fill_(~present, 0)  # any finite shift for the absent classes
    s = t.new_zeros(num_classes + 1).index_add_(0, labels, torch.exp(t - m[labels]))
    lse = m + torch.log(torch.where(present, s, 1.0))  # absent: log(1), never log(0) (whose gradient is NaN)
    return torch.where(present, softplus(lse), 0.0)[:num_classes], counts[:num_classes]


class _ProxyRegularizer(torch.autograd.Function):
    """R(W) = sum_c sum_{t<s} sqrt(2 + 1e-5 - 2 w^_{c,t} . w^_{c,s}) / (C*K*(K-1)) (as reference.proxy_regularizer),
    streamed over blocks of classes: [B, K, K] Gram matrices by bmm, only W saved, each block recomputed in
    backward. Autograd through the whole-W version holds ~5 W-sized temporaries and costs as much time as the
    streamed logits of SoftTriple; this holds block-sized ones. The blocks are spread over the threads like the
    tiles of class_lse (metricloss_kernels._parallel)."""

    @staticmethod
    def _plan(w, k):
        """(classes per block, blocks, tasks of the threads: _parallel.plan; the pairs (t, s), t < s, of a class's
        K proxies)."""
        classes = w.shape[0] // k
        chunks = math.ceil(classes * k * w.shape[1] * 4 / _REGULARIZER_BLOCK_BYTES)
        step, blocks, tasks = _parallel.plan(classes, chunks, w)
        return step, blocks, tasks, tuple(torch.triu_indices(k, k, offset=1, device=w.device))

    @staticmethod
    def _block(w, k, dtype, c0, step, pairs):
        """w^ [B, K, D], its backward factors [B, K] and the distances [B, pairs] of the `pairs` (t, s) of the
        classes [c0, c0 + step)."""
        w_hat, grad_scale = unit_rows(w.unflatten(0, (-1, k))[c0:c0 + step], dtype)
        t, s = pairs
        dist = torch.sqrt(2.0 + 1e-5 - 2.0 * torch.bmm(w_hat, w_hat.transpose(1, 2))[:, t, s])
        return w_hat, grad_scale, dist

    @staticmethod
    def forward(ctx, w, k, dtype):
        ctx.save_for_backward(w)
        ctx.k, ctx.dtype = k, dtype
        step, blocks, tasks, pairs = _ProxyRegularizer._plan(w, k)
        sums = torch.empty(blocks, dtype=dtype, device=w.device)

        def task(i, _):
            for b in _parallel.share(i, tasks, blocks):
                sums[b] = _ProxyRegularizer._block(w, k, dtype, b * step, step, pairs)[2].sum()

        _parallel.run(tasks, task, w)
        return sums.sum() / (w.shape[0] * (k - 1))

    @staticmethod
    def backward(ctx, grad):
        (w,), k = ctx.saved_tensors, ctx.k
        # dW is returned whole, not as a view of a [C, K, D] tensor: autograd then adds the other gradients of W
        # into it in place (a view shares its storage, which makes autograd allocate a fresh W-sized sum).
        dw = torch.empty_like(w)
        dw3 = dw.unflatten(0, (-1, k))
        scale = grad / (w.shape[0] * (k - 1))
        step, blocks, tasks, (t, s) = _ProxyRegularizer._plan(w, k)

        def task(i, _):
            for b in _parallel.share(i, tasks, blocks):
                w_hat, grad_scale, dist = _ProxyRegularizer._block(w, k, ctx.dtype, b * step, step, (t, s))
                # d dist_ts / d (w^_t . w^_s) = -1 / dist_ts, for both proxies of the pair
                coef = torch.zeros(w_hat.shape[0], k, k, dtype=w_hat.dtype, device=w.device)
                coef[:, t, s] = -scale / dist
                grad_hat = torch.bmm(coef + coef.transpose(1, 2), w_hat)
                dw3[b * step:b * step + w_hat.shape[0]].copy_(normalize_backward_(grad_hat, w_hat, grad_scale))

        _parallel.run(tasks, task, w)
        return dw, None, None


def _with_regularizer(loss, proxies, k, tau, part):
    """loss + tau * R(W); R is 0 by definition when tau = 0 or K = 1. R is a mean over the classes: each rank's
    R of its classes, combined by `part`. R is computed in the loss's dtype, the compute dtype of the embeddings and
    proxies together (fp64 embeddings make it fp64 for fp32 proxies, as in the reference)."""
    if tau == 0 or k == 1:
        return loss
    return loss + tau * part.classes_mean(_ProxyRegularizer.apply(proxies, k, loss.dtype), proxies.shape[0] // k)


def _arcface_ce(embeddings, labels, weight, margin_rad, scale, *, lse, part, normalize_w=True, k=1):
    """ArcFace CE with the angular margin in radians (insightface rule): target phi = cos(theta + m) where
    cos(theta) > cos(pi - m), else cos(theta) - sin(pi - m) * m; only the target cosine is clamped to
    [-1 + 1e-7, 1 - 1e-7]. `weight` [C*k, D]: a class's cosine is the max over its k sub-centres (the op's max
    pool). `labels` are the classes' indices in `weight` (`part.local`)."""
    c = weight.shape[0] // k
    cos = _target_cosines(_unit_rows(embeddings, weight), weight, labels, k, normalize_w).amax(1)
    t = scale * arcface_target(part.target(cos, labels, c), margin_rad)
    return _row_ce(lse, part, embeddings, weight, labels, t, centers_per_class=k, pool="max", scale=scale,
                   normalize_w=normalize_w)


@upcast(inputs=False)
def proxy_nca_loss(embeddings, labels, proxies, scale=2.0, exclude_positive=True, *, lse=class_lse, part=LOCAL):
    """ProxyNCA (K = 1): mean_i [-s S_{i,y_i} + LSE_{c != y_i} s S_{i,c}]; exclude_positive=False puts the positive
    in the LSE (softmax CE). embeddings [N, D], labels [N], proxies [C, D] -> scalar."""
    y, c = part.local(labels), proxies.shape[0]
    t = scale * part.target(_target_cosines(_unit_rows(embeddings, proxies), proxies, y, 1).squeeze(1), y, c)
    if exclude_positive:
        return _relative_row_lse(lse, part, embeddings, proxies, y, t, scale=scale).mean()
    return _row_ce(lse, part, embeddings, proxies, y, t, scale=scale)


@upcast(inputs=False)
def proxy_anchor_loss(embeddings, labels, proxies, margin=0.1, alpha=32.0, *, lse=class_lse, part=LOCAL):
    """ProxyAnchor (K = 1): (1/|C+|) sum_{c in C+} softplus(LSE_{y_i=c} -alpha(S_ic - delta))
    + (1/C) sum_c softplus(LSE_{y_i!=c} alpha(S_ic + delta)). proxies [C, D] -> scalar."""
    y, c = part.local(labels), proxies.shape[0]
    s = _target_cosines(_unit_rows(embeddings, proxies), proxies, y, 1).squeeze(1)
    pos, counts = _class_softplus_lse(-alpha * (s - margin), y, c)
    neg = softplus(lse(embeddings, proxies, y, scale=alpha, shift=alpha * margin, reduce="col"))
    return part.subset_mean(pos, counts > 0) + part.classes_mean(neg.mean(), c)


@upcast(inputs=False)
def soft_triple_loss(embeddings, labels, proxies, centers_per_class=10, la=20.0, gamma=0.1, margin=0.01, tau=0.2,
                     *, lse=class_lse, part=LOCAL):
    """SoftTriple: mean_i CE(la (S_i - delta onehot(y_i)), y_i) + tau R(W). proxies [C*K, D] -> scalar."""
    k = centers_per_class
    y, c = part.local(labels), proxies.shape[0] // k
    t = la * (part.target(_target_similarity(_unit_rows(embeddings, proxies), proxies, y, k, gamma), y, c) - margin)
    loss = _row_ce(lse, part, embeddings, proxies, y, t, centers_per_class=k, gamma=gamma, scale=la)
    return _with_regularizer(loss, proxies, k, tau, part)


@upcast(inputs=False)
def mpa_loss(embeddings, labels, proxies, centers_per_class=10, alpha=32.0, margin=0.1, gamma=0.1, tau=0.2,
             variant="mpa", *, lse=class_lse, part=LOCAL):
    """Multi-Proxy Anchor family on S (temperature gamma) + tau R(W): "mpa" class-wise (negatives averaged over the
    classes that have a negative in the batch), "dw" data-wise, "ap" data-wise all pairs. -> scalar."""
    k = centers_per_class
    y, c = part.local(labels), proxies.shape[0] // k
    s = _target_similarity(_unit_rows(embeddings, proxies), proxies, y, k, gamma)
    kw = dict(centers_per_class=k, gamma=gamma, scale=alpha, shift=alpha * margin)
    if variant == "mpa":
        pos, counts = _class_softplus_lse(-alpha * (s - margin), y, c)
        neg = softplus(lse(embeddings, proxies, y, reduce="col", **kw))
        # C- = the classes with a negative in the batch, those with fewer than N samples (an empty LSE adds 0).
        loss = part.subset_mean(pos, counts > 0) + part.subset_mean(neg, counts < labels.shape[0])
    elif variant in ("dw", "ap"):
        s = part.target(s, y, c)
        row = part.row_lse(lse(embeddings, proxies, y, reduce="row", **kw))
        if variant == "dw":
            loss = (softplus(-alpha * (s - margin)) + softplus(row)).mean()
        else:
            loss = softplus(torch.logaddexp(row, alpha * (margin - s))).mean()
    else:
        raise ValueError(f"variant must be 'mpa', 'dw' or 'ap', got {variant!r}")
    return _with_regularizer(loss, proxies, k, tau, part)


@upcast(inputs=False)
def arcface_loss(embeddings, labels, weight, margin=28.6, scale=64.0, *, lse=class_lse, part=LOCAL):
    """ArcFace, angular margin in DEGREES (28.6 deg ~ 0.4992 rad). weight [C, D] -> scalar."""
    return _arcface_ce(embeddings, part.local(labels), weight, math.radians(margin), scale, lse=lse, part=part)


@upcast(inputs=False)
def sub_center_arcface_loss(embeddings, labels, proxies, sub_centers=3, margin=28.6, scale=64.0, *, lse=class_lse,
                            part=LOCAL):
    """Sub-centre ArcFace: ArcFace on the max cosine over each class's K sub-centres. proxies [C*K, D] -> scalar."""
    return _arcface_ce(embeddings, part.local(labels), proxies, math.radians(margin), scale, lse=lse, part=part,
                       k=sub_centers)


@upcast(inputs=False)
def cosface_loss(embeddings, labels, weight, margin=0.35, scale=64.0, *, lse=class_lse, part=LOCAL):
    """CosFace: mean_i CE(s (cos_i - m onehot(y_i)), y_i). weight [C, D] -> scalar."""
    y, c = part.local(labels), weight.shape[0]
    t = scale * (part.target(_target_cosines(_unit_rows(embeddings, weight), weight, y, 1).squeeze(1), y, c) - margin)
    return _row_ce(lse, part, embeddings, weight, y, t, scale=scale)


@upcast(inputs=False)
def l2_softmax_loss(embeddings, labels, weight, bias=None, scale=16.0, normalize_weights=False, *, lse=class_lse,
                    part=LOCAL):
    """L2-constrained softmax: mean_i CE((s x^_i) W^T + b, y_i); W unnormalised unless normalize_weights
    (NormFace); a bias that is given is added in either case. weight [C, D], bias [C] or None -> scalar."""
    y, c = part.local(labels), weight.shape[0]
    t = scale * _target_cosines(_unit_rows(embeddings, weight), weight, y, 1, normalize_weights).squeeze(1)
    if bias is not None:
        t = t + bias[y.clamp(0, c - 1)].to(t.dtype)
    return _row_ce(lse, part, embeddings, weight, y, part.target(t, y, c), scale=scale, bias=bias,
                   normalize_w=normalize_weights)


@upcast(inputs=False)
def regular_polytope_loss(embeddings, labels, num_classes, polytope="simplex", scale=30.0, margin="max", *,
                          lse=class_lse, part=LOCAL):
    """Margin-RePoNet: ArcFace on x^ with the fixed unit-row weights regular_polytope(polytope, C); margin "max"
    (the polytope's neighbour angle) or a number in DEGREES. embeddings [N, d] -> scalar. Sharded, each rank uses
    its rows of the polytope (`distributed.class_range`)."""
    w = polytopes.polytope_weights(polytope, num_classes, embeddings.device, compute_dtype(embeddings.dtype))
    m = polytopes.margin_radians(polytope, num_classes, margin)
    # The rows are unit vectors by construction: used as they are, like the reference.
    return _arcface_ce(embeddings, part.local(labels), part.rows_of(w, num_classes), m, scale, lse=lse, part=part,
                       normalize_w=False)


@upcast(inputs=False)
def proxy_repel_loss(embeddings, labels, proxies, alpha=32.0, margin=0.1, variant="proxies", *, lse=class_lse,
                     part=LOCAL):
    """Proxy-repel (K = 1): ProxyAnchor's positive term + (1/C) sum_w softplus(LSE_{w' != w} alpha(P_ww' + delta)),
    P = W^ W^T ("proxies") or W^ (X^T X^) W^T ("batch", a sum over the batch). proxies [C, D] -> scalar.
    Sharded, each rank's proxies are the rows against every rank's proxies (`part.all_proxies`)."""
    x_hat = _unit_rows(embeddings, proxies)
    y, c = part.local(labels), proxies.shape[0]
    s = _target_cosines(x_hat, proxies, y, 1).squeeze(1)
    pos, counts = _class_softplus_lse(-alpha * (s - margin), y, c)
    columns, start = part.all_proxies(proxies, 1)
    itself = torch.arange(start, start + c, device=proxies.device)  # each row's own column, left out
    kw = dict(scale=alpha, shift=alpha * margin, reduce="row")
    if variant == "proxies":
        row = lse(proxies, columns, itself, **kw)
    elif variant == "batch":
        # Row w of the "x" operand is w^ (X^T X^), so that its dot product with w'^ is P_ww'.
        rows = normalize(proxies.to(x_hat.dtype), dim=1) @ (x_hat.T @ x_hat)
        row = lse(rows, columns, itself, normalize_x=False, **kw)
    else:
        raise ValueError(f"variant must be 'proxies' or 'batch', got {variant!r}")
    return part.subset_mean(pos, counts > 0) + part.classes_mean(softplus(row).mean(), c)
