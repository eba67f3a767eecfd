"""The pair losses whose mining is a per-anchor reduction, streamed over blocks of the reference (the pair losses'
"chunked" backend): contrastive, lifted structure, N-pair and multi-similarity. With a large reference (a
cross-batch memory, a gallery) no [N, M] tensor is held, forward or backward. Same arguments, mathematics and values
as metricloss_kernels/reference/pair.py, which states them.

Each loss adds up per-anchor reductions over the candidates: contrastive, sums of hinges; lifted structure and
N-pair, masked log-sum-exps over the positives and the negatives; multi-similarity, masked log-sum-exps whose masks
depend on per-anchor statistics (the least similar positive, the most similar negative), found by a first pass
without gradient. `_RowTerms` evaluates such reductions block by block of reference rows ([A, B] similarities, B
from `BLOCK_ELEMS`) with an online log-sum-exp, and in the backward recomputes each block's similarities from the
saved result (as FlashAttention does) to accumulate the gradients of the anchors and candidates; autograd
differentiates the normalisation and what follows the reductions.
torch.compile traces the blocks into one graph (the block plan depends on the shapes only).
"""
import torch
import torch.nn.functional as F

from ._numerics import normalize, upcast
from .reference.pair import _candidates, _masked_mean, _mean, _pair_masks, _total, _total_and_count, _zero

# Similarities per block ([A, B], 4 MiB in fp32): a block's masks and exponentials stay in cache-sized pieces.
BLOCK_ELEMS = 1 << 20


class _Pairs:
    """The anchors and candidates of reference.pair._candidates; as the `masks` of `_RowTerms`, called with a
    block's similarities s [A, B] (unused: these masks follow from the labels) and its candidates [j0, j1), the
    anchors' positives and negatives among them ([A, B] bool each, reference.pair._pair_masks)."""

    def __init__(self, *args):
        self.x, self.y, self.r, self.ry, self.own = _candidates(*args)

    def __call__(self, s, j0, j1):
        return _pair_masks(self.y, self.ry[j0:j1], self.own, j0)


def _blocks(a, m):
    step = max(1, BLOCK_ELEMS // max(1, a))
    return [(j0, min(j0 + step, m)) for j0 in range(0, m, step)]


class _RowTerms(torch.autograd.Function):
    """Per anchor i and term t of `terms` ((kind, a, b), z = a S_ij + b): over the candidates j of the mask t of
    `masks(s, j0, j1)`, kind "lse": log-sum-exp of z (0 for an empty mask), kind "hinge": sum of [z]₊.

    Args: x [A, D], r [M, D]; masks: (similarities [A, B], j0, j1) -> T bool masks [A, B]; terms: T
    triples. Returns (values [A, T], counts [A, T]: the size of each mask, in x's dtype).

    Every temporary is a block [A, B] in x's dtype or bool (no mask is summed or multiplied as such: torch would
    first copy it to int64 or float)."""

    @staticmethod
    def forward(ctx, x, r, masks, terms):
        a, t = x.shape[0], len(terms)
        values = x.new_zeros(a, t)
        peak = x.new_full((a, t), float("-inf"))  # running max of each log-sum-exp
        counts = x.new_zeros(a, t)
        for j0, j1 in _blocks(a, r.shape[0]):
            s = x @ r[j0:j1].T
            for k, ((kind, coef, shift), mask) in enumerate(zip(terms, masks(s, j0, j1))):
                z = s * coef + shift
                counts[:, k] += torch.ones_like(z).masked_fill_(~mask, 0).sum(dim=1)
                if kind == "hinge":
                    values[:, k] += z.clamp_min_(0).masked_fill_(~mask, 0).sum(dim=1)
                    continue
                z = z.masked_fill(~mask, float("-inf"))
                new = torch.maximum(peak[:, k], z.amax(dim=1))
                base = new.masked_fill(new == float("-inf"), 0)  # rows with no candidate yet
                values[:, k] = values[:, k] * torch.exp(peak[:, k] - base) + torch.exp(z - base[:, None]).sum(dim=1)
                peak[:, k] = new
        for k, (kind, _, _) in enumerate(terms):
            if kind == "lse":
                lse = values[:, k].log() + peak[:, k].masked_fill(peak[:, k] == float("-inf"), 0)
                values[:, k] = lse.masked_fill(counts[:, k] == 0, 0)
        ctx.save_for_backward(x, r, values, counts)
        ctx.masks, ctx.terms = masks, terms
        ctx.mark_non_differentiable(counts)
        return values, counts

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_values, grad_counts):
        x, r, values, counts = ctx.saved_tensors
        grad_x, grad_r = torch.zeros_like(x), torch.empty_like(r)
        for j0, j1 in _blocks(x.shape[0], r.shape[0]):
            s = x @ r[j0:j1].T
            grad_s = torch.zeros_like(s)
            for k, ((kind, coef, shift), mask) in enumerate(zip(ctx.terms, ctx.masks(s, j0, j1))):
                z = s * coef + shift
                if kind == "hinge":
                    dz = torch.ones_like(z).masked_fill_(~(mask & (z > 0)), 0)
                else:  # the softmax weights of the log-sum-exp
                    dz = torch.exp(z - values[:, k, None]).masked_fill_(~mask, 0)
                grad_s += dz.mul_(coef * grad_values[:, k, None])
            grad_x += grad_s @ r[j0:j1]
            grad_r[j0:j1] = grad_s.T @ x
        return grad_x, grad_r, None, None


@upcast
def contrastive_loss(embeddings, labels, pos_margin=1.0, neg_margin=0.5, ref_emb=None, ref_labels=None,
                     ref_self=None, anchors=None):
    """reference.pair.contrastive_loss, streamed over blocks of the candidates. Returns a scalar."""
    pairs = _Pairs(embeddings, labels, ref_emb, ref_labels, ref_self, anchors)
    sums, counts = _RowTerms.apply(normalize(pairs.x, dim=1), normalize(pairs.r, dim=1), pairs,
                                   (("hinge", -1.0, pos_margin), ("hinge", 1.0, -neg_margin)))
    zero = _zero(embeddings)
    return (_mean(sums[:, 0].sum(), counts[:, 0].sum(), zero, anchors)
            + _mean(sums[:, 1].sum(), counts[:, 1].sum(), zero, anchors))


@upcast
def lifted_structure_loss(embeddings, labels, margin=0.5, ref_emb=None, ref_labels=None, ref_self=None,
                          anchors=None):
    """reference.pair.lifted_structure_loss, streamed over blocks of the candidates. Returns a scalar."""
    pairs = _Pairs(embeddings, labels, ref_emb, ref_labels, ref_self, anchors)
    lse, counts = _RowTerms.apply(normalize(pairs.x, dim=1), normalize(pairs.r, dim=1), pairs,
                                  (("lse", -1.0, margin), ("lse", 1.0, 0.0)))
    return _masked_mean(F.relu(lse.sum(dim=1)), (counts > 0).all(dim=1), embeddings, anchors)


@upcast
def npairs_loss(embeddings, labels, l2_reg=0.02, ref_emb=None, ref_labels=None, ref_self=None, anchors=None):
    """reference.pair.npairs_loss (raw dot products), streamed over blocks of the candidates. Returns a scalar."""
    pairs = _Pairs(embeddings, labels, ref_emb, ref_labels, ref_self, anchors)
    reg = l2_reg * _total((pairs.x * pairs.x).sum(), anchors) / len(labels)
    lse, counts = _RowTerms.apply(pairs.x, pairs.r, pairs, (("lse", -1.0, 0.0), ("lse", 1.0, 0.0)))
    return _masked_mean(F.softplus(lse.sum(dim=1)), (counts > 0).all(dim=1), embeddings, anchors) + reg


@upcast
def multi_similarity_loss(embeddings, labels, alpha=2.0, beta=50.0, base=0.5, epsilon=0.1, ref_emb=None,
                          ref_labels=None, ref_self=None, anchors=None):
    """reference.pair.multi_similarity_loss, streamed over blocks of the candidates in two passes (the mining's
    per-anchor statistics, then the log-sum-exps). Returns a scalar."""
    pairs = _Pairs(embeddings, labels, ref_emb, ref_labels, ref_self, anchors)
    x, r = normalize(pairs.x, dim=1), normalize(pairs.r, dim=1)

    def unmined(s, j0, j1):  # positives below 1 - 1e-5 (duplicates of the anchor are not positives), negatives
        pos, neg = pairs(s, j0, j1)
        return pos & (s < 1.0 - 1e-5), neg

    min_pos = x.new_full((x.shape[0],), float("inf"))
    max_neg = x.new_full((x.shape[0],), float("-inf"))
    with torch.no_grad():
        for j0, j1 in _blocks(x.shape[0], r.shape[0]):
            s = x @ r[j0:j1].T
            pos, neg = unmined(s, j0, j1)
            min_pos = torch.minimum(min_pos, s.masked_fill(~pos, float("inf")).amin(dim=1))
            max_neg = torch.maximum(max_neg, s.masked_fill(~neg, float("-inf")).amax(dim=1))

    def mined(s, j0, j1):
        pos, neg = unmined(s, j0, j1)
        return pos & (s - epsilon < max_neg[:, None]), neg & (s + epsilon > min_pos[:, None])

    lse, counts = _RowTerms.apply(x, r, mined, (("lse", -alpha, alpha * base), ("lse", beta, -beta * base)))
    keep = (counts > 0).all(dim=1)
    terms = F.softplus(lse[:, 0]) / alpha + F.softplus(lse[:, 1]) / beta
    total, kept = _total_and_count(torch.where(keep, terms, 0).sum(), keep.sum(), anchors)
    return torch.where(kept > 0, total / len(labels), _zero(embeddings))
