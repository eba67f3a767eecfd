"""The pair losses without an [N, M] tensor, forward or backward (the pair losses' "chunked" backend): with a large
reference (a cross-batch memory, a gallery) they stream over blocks of it, or of the anchors. Same arguments,
mathematics and values as metricloss_kernels/reference/pair.py and reference/exponential.py, which state them.
Three schemes, after what the mining needs:

- Per-anchor reductions over the candidates (contrastive: sums of hinges; lifted structure and N-pair: masked
  log-sum-exps; multi-similarity: masked log-sum-exps whose masks depend on per-anchor statistics, the least similar
  positive and the most similar negative, found by a first pass without gradient). `_RowTerms` evaluates them block
  by block of reference rows ([A, B] similarities, B from `BLOCK_ELEMS`) with an online log-sum-exp, and in the
  backward recomputes each block's similarities from the saved result (as FlashAttention does) to accumulate the
  gradients of the anchors and candidates; autograd differentiates the normalisation and what follows.
- Per-anchor selections (batch-hard triplets, the exponential triplet loss): a first pass without gradient over
  blocks of candidates finds each anchor's chosen rows (`_first_extremes`), then the loss is computed on those
  rows only, O(A·D).
- Mining that needs each anchor's whole row of candidates (semi-hard triplets: a sort; all triplets: the [P, N]
  pairs; margin: a cumulative sum): the reference's own code on blocks of anchors, [A', M] each (`_anchor_blocks`),
  recomputed in the backward (torch.utils.checkpoint) so that no block's intermediates outlive it.
torch.compile traces the blocks into one graph (the block plan depends on the shapes only), except margin's: its
draws go through a generator's state, a graph break.
"""
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ._numerics import normalize, upcast
from .reference.exponential import _c_pos, _check_ball, _distances, _exponential_value
from .reference.pair import (_candidates, _check_triplet, _dissimilarity, _margin_betas, _margin_sums, _masked_mean,
                             _mean, _pair_masks, _total, _total_and_count, _triplet_sums, _zero)

# Elements per block ([A, B] similarities, 4 MiB in fp32): a block's masks and exponentials stay in cache-sized
# pieces. Blocks of anchors hold [A', M] (A'·M² for all triplets).
BLOCK_ELEMS = 1 << 20


class _Pairs:
    """The anchors and candidates of reference.pair._candidates; as the `masks` of `_RowTerms`, called with a
    block's similarities s [A, B] (unused: these masks follow from the labels) and its candidates [j0, j1), the
    anchors' positives and negatives among them ([A, B] bool each, reference.pair._pair_masks)."""

    def __init__(self, *args):
        self.x, self.y, self.r, self.ry, self.own = _candidates(*args)

    def __call__(self, s, j0, j1):
        return _pair_masks(self.y, self.ry[j0:j1], self.own, j0)

    def of_anchors(self, a0, a1):
        """(pos, neg) [a1 - a0, M]: the masks of the anchors [a0, a1) against every candidate."""
        return _pair_masks(self.y[a0:a1], self.ry, None if self.own is None else self.own[a0:a1])


def _blocks(width, length):
    """Blocks [i0, i1) of range(length) that hold about BLOCK_ELEMS elements, `width` per index."""
    step = max(1, BLOCK_ELEMS // max(1, width))
    return [(i0, min(i0 + step, length)) for i0 in range(0, length, step)]


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


@torch.no_grad()
def _first_extremes(x, r, score, masks, signs):
    """Per anchor and mask t: the candidate that minimises signs[t] * score over mask t, the first one (lowest
    index) of equal values, and a NaN before any number, as argmin over the whole row would choose; streamed over
    blocks of candidates, without gradient.

    Args: x [A, D], r [M, D]; score: (x, r[j0:j1]) -> [A, B]; masks: (scores [A, B], j0, j1) -> T bool masks
    [A, B]; signs: T numbers, ±1. Returns (index [A, T] int64 (0 for an empty mask), the extreme scores [A, T],
    found [A, T] bool: the mask is not empty)."""
    a, t = x.shape[0], len(signs)
    best = x.new_full((a, t), float("inf"))
    index = torch.zeros((a, t), dtype=torch.long, device=x.device)
    found = torch.zeros((a, t), dtype=torch.bool, device=x.device)
    for j0, j1 in _blocks(a, r.shape[0]):
        s = score(x, r[j0:j1])
        for k, (sign, mask) in enumerate(zip(signs, masks(s, j0, j1))):
            value, at = (s * sign).masked_fill_(~mask, float("inf")).min(dim=1)
            # min over (so far, this block) keeps the earlier of equal values, and of NaNs
            best[:, k], later = torch.stack([best[:, k], value], dim=1).min(dim=1)
            index[:, k] = torch.where(later == 1, at + j0, index[:, k])
            found[:, k] |= mask.any(dim=1)
    return index, best * best.new_tensor(signs), found


def _anchor_blocks(sums, a, width):
    """(total, count): sums(a0, a1) -> (total, count) added up over blocks [a0, a1) of the A anchors, `width`
    elements per anchor (`_blocks`), each block under torch.utils.checkpoint: what it saves for the backward is
    recomputed there, block by block, so no [A, M] intermediate outlives its block. `sums` draws no random numbers
    from the global generators (whose state checkpoint would otherwise keep for each block)."""
    total = count = 0
    for a0, a1 in _blocks(width, a):
        t, c = checkpoint(sums, a0, a1, use_reentrant=False, preserve_rng_state=False)
        total, count = total + t, count + c
    return total, count


@upcast
def triplet_margin_loss(embeddings, labels, margin=0.1, distance="cosine", mining="all", ref_emb=None,
                        ref_labels=None, ref_self=None, anchors=None):
    """reference.pair.triplet_margin_loss without an [N, M] tensor. "hard": a first pass over blocks of candidates
    finds each anchor's least similar positive and most similar negative (argmin / argmax's ties: the first), then
    the loss is computed on those rows; "semi-hard" and "all": the reference's sums over blocks of anchors, [A', M]
    each ([A', M, M] for all triplets, as the reference's own anchor blocks). Returns a scalar."""
    _check_triplet(distance, mining)
    pairs = _Pairs(embeddings, labels, ref_emb, ref_labels, ref_self, anchors)
    x = normalize(pairs.x, dim=1)
    if mining == "hard":  # (only the chosen rows of the reference are normalised with gradient)
        index, _, found = _first_extremes(x, pairs.r, lambda a, b: a @ normalize(b, dim=1).T, pairs, (1.0, -1.0))
        _, g = _dissimilarity(x[:, None], normalize(pairs.r[index], dim=-1), distance)  # [A, 1, 2]: p, n
        return _masked_mean(F.relu(g[:, 0, 0] - g[:, 0, 1] + margin), found.all(dim=1), embeddings, anchors)
    r = normalize(pairs.r, dim=1)
    m = r.shape[0]
    total, count = _anchor_blocks(
        lambda a0, a1: _triplet_sums(x[a0:a1], r, *pairs.of_anchors(a0, a1), margin, distance, mining),
        x.shape[0], m * m if mining == "all" else m)
    return _mean(total, count, _zero(embeddings), anchors)


def _default_generator(device):
    """The generator that torch.rand draws from on `device` when given none."""
    if device.type == "cpu":
        return torch.default_generator
    return torch.get_device_module(device).default_generators[device.index]


@upcast
def margin_loss(embeddings, labels, margin=0.2, beta=1.2, generator=None, ref_emb=None, ref_labels=None,
                ref_self=None, anchors=None):
    """reference.pair.margin_loss over blocks of anchors, [A', M] each. The uniform numbers u [N, M] are drawn
    block by block of rows from the generator (the global one when None): on CPU, whose draws are serial, these are
    the numbers of the reference's one draw, and the generator ends in the same state; on other devices they may
    be other numbers of the same distribution. A block's backward redraws its rows from the generator state saved
    before them. Returns a scalar."""
    pairs = _Pairs(embeddings, labels, ref_emb, ref_labels, ref_self, anchors)
    x, r = normalize(pairs.x, dim=1), normalize(pairs.r, dim=1)
    b = _margin_betas(beta, pairs.y, x)
    n, m = len(labels), r.shape[0]
    start, stop = (0, n) if anchors is None else (anchors.start, anchors.stop)
    generator = _default_generator(x.device) if generator is None else generator

    def draw(gen, rows):
        return torch.rand((rows, m), generator=gen, dtype=x.dtype, device=x.device)

    def sums(a0, a1, state):
        gen = torch.Generator(x.device).set_state(state)
        u = draw(gen, a1 - a0)
        return *_margin_sums(x[a0:a1], r, *pairs.of_anchors(a0, a1), u, b[a0:a1], margin), gen.get_state()

    for i0, i1 in _blocks(m, start):  # every call draws the rows of the whole batch (the reference's rule)
        draw(generator, i1 - i0)
    total = count = 0
    for a0, a1 in _blocks(m, x.shape[0]):
        t, c, state = checkpoint(sums, a0, a1, generator.get_state(), use_reentrant=False, preserve_rng_state=False)
        generator.set_state(state)
        total, count = total + t, count + c
    for i0, i1 in _blocks(m, n - stop):
        draw(generator, i1 - i0)
    return _mean(total, count, _zero(embeddings, beta), anchors)


@upcast
def exponential_triplet_loss(embeddings, labels, num_classes, overlap=1.2, distance="cosine", embedding_scale=1.0,
                             pos_coef=1.0, neg_coef=1.0, ref_emb=None, ref_labels=None, ref_self=None,
                             anchors=None):
    """reference.exponential.exponential_triplet_loss without an [N, M] tensor: a first pass over blocks of
    candidates finds each anchor's farthest positive, closest negative and farthest candidate (the ball check),
    then the distances to the chosen rows are recomputed with gradient. The reference's values; at an exact
    tie of the farthest positives (closest negatives) the gradient goes to the first of them, where the reference's
    amax shares it equally. Returns a scalar."""
    c_pos = _c_pos(overlap, num_classes, distance)
    pairs = _Pairs(embeddings, labels, ref_emb, ref_labels, ref_self, anchors)

    def dist(a, b):
        return _distances(a, b, distance, embedding_scale)[0]

    def masks(d, j0, j1):  # the positives, the negatives, every candidate
        return *pairs(d, j0, j1), torch.ones_like(d, dtype=torch.bool)

    index, extreme, found = _first_extremes(pairs.x, pairs.r, dist, masks, (-1.0, 1.0, -1.0))
    d, d_max = _distances(pairs.x[:, None], pairs.r[index[:, :2]], distance, embedding_scale)  # [A, 1, 2]
    _check_ball(extreme[:, 2].max(), d_max, distance, embedding_scale, anchors)
    d = d.clamp(max=d_max)
    return _exponential_value(d[:, 0, 0], d[:, 0, 1], found[:, 0], found[:, 1], d_max, c_pos, pos_coef, neg_coef,
                              embeddings, anchors)
