"""Pure-torch references of the pair-based losses (docs/formulas.md, "Pair losses").

Every loss compares anchors with candidates through the similarity matrix ``S_ij = x̂_i · r̂_j`` (N-pair: raw dot
products), with boolean masks for positives ``P_i = {j : y_j = y_i, j not i's own row}`` and negatives
``N_i = {j : y_j != y_i}``. Without a reference the candidates are the batch itself and i's own row is row i
(self-pairs are left out); with ``ref_emb`` [M, D], ``ref_labels`` [M] the candidates are the reference rows and
every (i, j) pair counts (PML's semantics), unless ``ref_self`` [N] names each anchor's own row of the reference
(a cross-batch memory's slot; negative: none). The matrices are [N, M] here: N is a batch and M a reference the
caller sized (metricloss_kernels/streamed_pairs.py streams the large ones). Every shape is fixed by N and M: pairs,
triplets and anchors are selected by masks (masked means with tensor counts, ``torch.where``, masked min/max),
never by boolean indexing, so that nothing is read back to the host and the losses compile into one graph. When no
pair / triplet / anchor is valid, a loss returns ``embeddings.sum() * 0``: a zero that still carries a graph, so
``backward()`` works.

Shapes: ``embeddings`` [N, D] float, ``labels`` [N] int64; every loss returns a scalar in the embeddings' dtype
(half precision is computed in fp32, see ``metricloss_kernels._numerics.upcast``). Gradients reach the embeddings
and the reference.

Every loss is a sum of per-anchor terms over global normalisers, so it also takes ``anchors`` (`Anchors`): the rows
of the batch that this call uses as anchors, with the partial sums and counts combined by ``anchors.sum`` before
the division. A process group splits the anchors between its ranks this way (metricloss_kernels.distributed): each
rank computes [A, M] matrices, A its local rows, against the gathered batch or reference, and the value is exact.
"""
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .._numerics import normalize, upcast

_DISTANCES = ("cosine", "euclidean", "squared_euclidean")
_MINING = ("all", "semi-hard", "hard")
# Anchor block size for the all-triplets loss: bounds the [B, N, N] intermediate.
_TRIPLET_BLOCK_ELEMS = 1 << 24


class Anchors(NamedTuple):
    """The anchor rows [start, stop) of the batch that one call computes (against every candidate), `sum`, which
    adds up a tensor of partial sums over the calls that split the anchors between them, and `max` (no gradient),
    their maximum. None in place of an Anchors: every row, one call."""
    start: int
    stop: int
    sum: Callable
    max: Callable


def _rows(anchors):
    return slice(None) if anchors is None else slice(anchors.start, anchors.stop)


def _total(t, anchors):
    """t summed over the calls that share the anchors."""
    return t if anchors is None else anchors.sum(t)


def _candidates(embeddings, labels, ref_emb, ref_labels, ref_self, anchors):
    """(x [A, D], y [A], r [M, D], ry [M], own [A] or None): this call's anchor rows and their labels, the
    candidates (the reference, or the embeddings themselves) with theirs, and each anchor's own row among the
    candidates (row i without a reference, ref_self[i] with one; None: no such row)."""
    rows = _rows(anchors)
    if ref_emb is None:
        ref_emb, ref_labels = embeddings, labels
        ref_self = torch.arange(len(labels), device=labels.device)
    return embeddings[rows], labels[rows], ref_emb, ref_labels, None if ref_self is None else ref_self[rows]


def _pair_masks(y, ry, own, start=0):
    """(pos, neg) [A, B] bool: the positives (same label, not the anchor's own row) and the negatives (different
    label) of the anchors y [A] among the candidates ry [B], numbered from `start`."""
    same = y[:, None] == ry[None, :]
    if own is None:
        return same, ~same
    index = torch.arange(start, start + len(ry), device=ry.device)
    return same & (index[None, :] != own[:, None]), ~same


def _sides(embeddings, labels, ref_emb, ref_labels, ref_self, anchors):
    """(x [A, D], r [M, D], pos [A, M], neg [A, M]): the anchors, the candidates and the masks of `_pair_masks`."""
    x, y, r, ry, own = _candidates(embeddings, labels, ref_emb, ref_labels, ref_self, anchors)
    return (x, r, *_pair_masks(y, ry, own))


def _cosine(x, r):
    """S = x̂ r̂ᵀ, [A, M]."""
    return normalize(x, dim=1) @ normalize(r, dim=1).T


def _safe_sqrt(z):
    """sqrt(max(z, 0)) with a finite gradient (0) where z <= 0: the diagonal of a distance matrix has z = 0."""
    pos = z > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, z, torch.ones_like(z))), torch.zeros_like(z))


def _sq_dist(x, r):
    """Squared Euclidean distances ||x_a - r_j||², [..., A, M] of x [..., A, D] and r [..., M, D], through the Gram
    matrix (clamped at 0)."""
    return ((x * x).sum(dim=-1)[..., :, None] + (r * r).sum(dim=-1)[..., None, :] - 2.0 * (x @ r.mT)).clamp_min(0.0)


def _zero(embeddings, *extra):
    """A scalar 0 connected to the graph of the inputs."""
    z = embeddings.sum() * 0
    for t in extra:
        if torch.is_tensor(t):
            z = z + t.sum() * 0
    return z


def _masked_lse(z, mask):
    """Row-wise log-sum-exp of z over mask, [R]. A row without any True gives a finite placeholder with a finite
    gradient (never -inf, whose gradient is NaN): the caller leaves such rows out (`_masked_mean`)."""
    empty = ~mask.any(dim=1, keepdim=True)
    return torch.logsumexp(z.masked_fill(~mask, float("-inf")).masked_fill(empty, 0), dim=1)


def _total_and_count(total, count, anchors):
    """(total, count) summed over the anchors' calls (one collective for both)."""
    if anchors is None:
        return total, count
    return anchors.sum(torch.stack([total, count.to(total.dtype)])).unbind()


def _mean(total, count, zero, anchors):
    """total / count, both summed over the anchors' calls first; `zero` (a 0 carrying a graph) when count is 0."""
    total, count = _total_and_count(total, count, anchors)
    return torch.where(count > 0, total / count.clamp_min(1), zero)


def _masked_sum(values, mask):
    """(sum, count) of `values` over the True entries of `mask` (same shape)."""
    return torch.where(mask, values, 0).sum(), mask.sum()


def _masked_mean(values, mask, embeddings, anchors=None, empty=0.0):
    """Mean of `values` over the True entries of `mask` (same shape), or `empty` carrying a graph when there is
    none."""
    return _mean(*_masked_sum(values, mask), _zero(embeddings) + empty, anchors)


@upcast
def contrastive_loss(embeddings, labels, pos_margin=1.0, neg_margin=0.5, ref_emb=None,
                     ref_labels=None, ref_self=None, anchors=None):
    """Contrastive loss on cosine similarities.

    ``L = mean_{pos pairs (i != j)} [m_pos - S_ij]₊ + mean_{neg pairs} [S_ij - m_neg]₊``.
    Each mean is a plain mean over all pairs of its kind (not over the non-zero ones); an empty kind of pair
    contributes 0 **(resolved)**; with neither kind (N = 1) the loss is a 0 that carries a graph.

    Args: embeddings [N, D]; labels [N] int64; ref_emb [M, D], ref_labels [M], ref_self [N] or None (module
    docstring); anchors: `Anchors` or None. Returns a scalar.
    """
    x, r, pos, neg = _sides(embeddings, labels, ref_emb, ref_labels, ref_self, anchors)
    s = _cosine(x, r)
    return (_masked_mean(F.relu(pos_margin - s), pos, embeddings, anchors)
            + _masked_mean(F.relu(s - neg_margin), neg, embeddings, anchors))


def _dissimilarity(x, r, distance):
    """Returns (S, G) of unit rows x [..., A, D], r [..., M, D]: cosine similarities [..., A, M] and the matrix G
    the triplet loss is linear in: G = -S for "cosine", ||x_i - r_j|| for "euclidean", ||x_i - r_j||² for
    "squared_euclidean"."""
    s = x @ r.mT
    if distance == "cosine":
        return s, -s
    d2 = _sq_dist(x, r)
    return s, (_safe_sqrt(d2) if distance == "euclidean" else d2)


def _check_triplet(distance, mining):
    if distance not in _DISTANCES:
        raise ValueError(f"distance must be one of {_DISTANCES}, got {distance!r}")
    if mining not in _MINING:
        raise ValueError(f"mining must be one of {_MINING}, got {mining!r}")


def _triplet_sums(x, r, pos, neg, margin, distance, mining):
    """(sum of the triplet losses, number of triplets) of the anchors x [A, D] against the candidates r [M, D], unit
    rows, with their masks pos, neg [A, M] (`triplet_margin_loss` states the mining)."""
    s, g = _dissimilarity(x, r, distance)
    sd = s.detach()
    m = r.shape[0]

    if mining == "all":
        block = max(1, _TRIPLET_BLOCK_ELEMS // max(1, m * m))  # a plan from the shape only
        total, count = x.new_zeros(()), pos.new_zeros((), dtype=torch.long)
        for a0 in range(0, pos.shape[0], block):
            gb = g[a0:a0 + block]
            valid = pos[a0:a0 + block, :, None] & neg[a0:a0 + block, None, :]  # [B, P, N]
            total = total + torch.where(valid, F.relu(gb[:, :, None] - gb[:, None, :] + margin), 0).sum()
            count = count + valid.sum()
        return total, count

    if mining == "semi-hard":
        # For each (a, p): the first negative of a, in descending similarity, that is below S_ap. A stable sort
        # puts equal similarities in index order, so ties go to the lower index (as an argmax would). NaN
        # similarities are never candidates, and a NaN S_ap has no negative below it.
        valid_s = ~torch.isnan(sd)
        desc, order = sd.masked_fill(~(neg & valid_s), float("-inf")).sort(dim=1, descending=True, stable=True)
        first = torch.searchsorted(-desc, -sd, right=True)  # [a, p]: how many negatives of a have S >= S_ap
        at = first.clamp(max=m - 1)
        found = (first < m) & (desc.gather(1, at) > float("-inf"))
        n_idx = order.gather(1, at)
        return _masked_sum(F.relu(g - g.gather(1, n_idx) + margin), pos & valid_s & found)

    # hard: per anchor, its least similar positive and most similar negative
    p_idx = sd.masked_fill(~pos, float("inf")).argmin(dim=1, keepdim=True)
    n_idx = sd.masked_fill(~neg, float("-inf")).argmax(dim=1, keepdim=True)
    return _masked_sum(F.relu(g.gather(1, p_idx) - g.gather(1, n_idx) + margin).squeeze(1),
                       pos.any(dim=1) & neg.any(dim=1))


@upcast
def triplet_margin_loss(embeddings, labels, margin=0.1, distance="cosine", mining="all", ref_emb=None,
                        ref_labels=None, ref_self=None, anchors=None):
    """Triplet margin loss on normalised embeddings, mean over the triplets used.

    Per triplet (a, p, n): ``[S_an - S_ap + m]₊`` for ``distance="cosine"``, ``[d_ap - d_an + m]₊`` for
    ``"euclidean"`` (d = ||x̂_a - x̂_b||) and ``"squared_euclidean"`` (d = ||x̂_a - x̂_b||²).
    Mining (the selection always compares cosine similarities S, which orders pairs exactly like the distances on
    unit vectors):
      * ``"all"``: every (a, p, n) with p in P_a, n in N_a;
      * ``"semi-hard"``: for each ordered positive pair (a, p), the most similar negative among those with
        ``S_an < S_ap`` (strict); pairs with no such negative are dropped;
      * ``"hard"`` (batch-hard): per anchor, the least similar positive and the most similar negative (ties: the
        first index); anchors lacking either are dropped.
    No triplet: a 0 that carries a graph.

    Args: embeddings [N, D]; labels [N] int64; distance in {"cosine", "euclidean", "squared_euclidean"};
    mining in {"all", "semi-hard", "hard"}; ref_emb [M, D], ref_labels [M], ref_self [N] or None (module docstring);
    anchors: `Anchors` or None. Returns a scalar.
    """
    _check_triplet(distance, mining)
    x, r, pos, neg = _sides(embeddings, labels, ref_emb, ref_labels, ref_self, anchors)
    total, count = _triplet_sums(normalize(x, dim=1), normalize(r, dim=1), pos, neg, margin, distance, mining)
    return _mean(total, count, _zero(embeddings), anchors)


@upcast
def lifted_structure_loss(embeddings, labels, margin=0.5, ref_emb=None, ref_labels=None, ref_self=None, anchors=None):
    """Generalised lifted structure loss (thesis eq. 2.21) on cosine similarities.

    Per anchor i with at least one positive and one negative:
    ``[ LSE_{k in P_i}(λ - S_ik) + LSE_{k in N_i}(S_ik) ]₊``, λ = ``margin``; mean over those anchors.
    No such anchor: a 0 that carries a graph.

    Args: embeddings [N, D]; labels [N] int64; ref_emb [M, D], ref_labels [M], ref_self [N] or None (module
    docstring); anchors: `Anchors` or None. Returns a scalar.
    """
    x, r, pos, neg = _sides(embeddings, labels, ref_emb, ref_labels, ref_self, anchors)
    keep = pos.any(dim=1) & neg.any(dim=1)
    s = _cosine(x, r)
    return _masked_mean(F.relu(_masked_lse(margin - s, pos) + _masked_lse(s, neg)), keep, embeddings, anchors)


@upcast
def npairs_loss(embeddings, labels, l2_reg=0.02, ref_emb=None, ref_labels=None, ref_self=None, anchors=None):
    """N-pair loss (Sohn) on raw dot products ``S = x xᵀ`` (no normalisation).

    Per anchor i with positives and negatives: ``softplus( LSE_{j in P_i, k in N_i} (S_ik - S_ij) )``, computed as
    ``softplus(LSE_{k in N_i} S_ik + LSE_{j in P_i} (-S_ij))`` (the double LSE separates); mean over those anchors,
    plus ``l2_reg * mean_i ||x_i||²`` over all N samples. With no such anchor the first term is 0 and the
    regulariser is still added **(resolved)**.

    Args: embeddings [N, D]; labels [N] int64; ref_emb [M, D], ref_labels [M], ref_self [N] or None (module
    docstring); anchors: `Anchors` or None. Returns a scalar.
    """
    x, r, pos, neg = _sides(embeddings, labels, ref_emb, ref_labels, ref_self, anchors)
    reg = l2_reg * _total((x * x).sum(), anchors) / len(labels)
    keep = pos.any(dim=1) & neg.any(dim=1)
    s = x @ r.T
    return _masked_mean(F.softplus(_masked_lse(s, neg) + _masked_lse(-s, pos)), keep, embeddings, anchors) + reg


def _distance_weighted_probs(dist, neg, dim, cutoff, nonzero_loss_cutoff):
    """Sampling probabilities [N, N] of distance-weighted sampling (Wu et al., Section 4; authors' code):
    q(d) ∝ d^(2-D) (1 - d²/4)^(-(D-3)/2) with d clamped below at ``cutoff``, restricted to negatives with
    d < ``nonzero_loss_cutoff``. Rows with no such negative fall back to uniform over the anchor's negatives
    (resolved); rows without negatives are all 0."""
    d = dist.clamp_min(cutoff)
    log_w = (2.0 - dim) * torch.log(d) - ((dim - 3.0) / 2.0) * torch.log(1.0 - 0.25 * d * d)
    allowed = neg & (dist < nonzero_loss_cutoff)
    fallback = ~allowed.any(dim=1, keepdim=True)
    allowed = torch.where(fallback, neg, allowed)
    log_w = torch.where(fallback, torch.zeros_like(log_w), log_w)
    has = allowed.any(dim=1, keepdim=True)
    probs = torch.softmax(log_w.masked_fill(~allowed, float("-inf")), dim=1)
    return torch.where(has, probs, torch.zeros_like(probs))


@upcast
def margin_loss(embeddings, labels, margin=0.2, beta=1.2, generator=None, ref_emb=None, ref_labels=None,
                ref_self=None, anchors=None):
    """Margin loss (Wu et al.) with distance-weighted negative sampling.

    ``D_ij = ||x̂_i - x̂_j||``, ``ℓ_ij = [α + t_ij (D_ij - β)]₊``, t = +1 for positives, -1 for negatives,
    α = ``margin``. ``beta``: float, 0-d Tensor (one learnable β) or Tensor [C] of per-class values (learnable if
    it requires grad); a pair (a, b) uses β of the anchor's class y_a.
    Pairs: every ordered positive pair (a, p), p in P_a, and for each of them one negative n of anchor a drawn by
    distance-weighted sampling (cutoff 0.5, nonzero_loss_cutoff 1.4, weights computed without gradient). The draw
    **(resolved)** is by inverse CDF: one uniform number per ordered pair, ``u = torch.rand(N, M,
    generator=generator)`` (M = N without a reference), and pair (a, p) takes the first n whose cumulative
    probability exceeds ``u[a, p]`` times anchor a's total. The loss is the plain mean of ℓ over all positive and
    sampled negative pairs **(resolved: not over the non-zero ones)**. Resolved edge cases: an anchor whose negatives
    all lie at distance >= 1.4 samples uniformly among its negatives (the authors' code falls back to uniform
    sampling); a positive pair whose anchor has no negative keeps its positive term and has no negative term. No
    positive pair: a 0 that carries a graph.

    Args: embeddings [N, D]; labels [N] int64; generator: torch.Generator on the embeddings' device, or None;
    ref_emb [M, D], ref_labels [M], ref_self [N] or None (module docstring); anchors: `Anchors` or None (every call
    draws the whole [N, M] matrix u and uses its anchors' rows: calls whose generators are in the same state draw
    what one call on the whole batch draws). Returns a scalar.
    """
    x, r, pos, neg = _sides(embeddings, labels, ref_emb, ref_labels, ref_self, anchors)
    rows, shape = _rows(anchors), (len(labels), r.shape[0])
    # (the generator overload of rand needs concrete sizes, which a compiled graph with a dynamic batch size does
    # not have)
    u = torch.rand(shape, dtype=x.dtype, device=x.device) if generator is None else torch.rand(
        shape, generator=generator, dtype=x.dtype, device=x.device)
    total, count = _margin_sums(normalize(x, dim=1), normalize(r, dim=1), pos, neg, u[rows],
                                _margin_betas(beta, labels[rows], x), margin)
    return _mean(total, count, _zero(embeddings, beta), anchors)


def _margin_betas(beta, y, x):
    """β per anchor [A] of the anchors' labels y [A] (x [A, D]: the dtype and device of a float β)."""
    if not torch.is_tensor(beta):
        return x.new_full(y.shape, beta)
    return beta[y] if beta.dim() else beta.expand(y.shape)


def _margin_sums(x, r, pos, neg, u, b, margin):
    """(sum of the pair losses, number of pairs) of the anchors x [A, D] against the candidates r [M, D], unit rows,
    with their masks pos, neg [A, M], the uniform numbers u [A, M] that draw a negative for each pair (a, p) and β
    per anchor b [A] (`margin_loss` states them)."""
    m = r.shape[0]
    dist = _safe_sqrt(_sq_dist(x, r))
    with torch.no_grad():
        probs = _distance_weighted_probs(dist.detach(), neg, x.shape[1], 0.5, 1.4)  # [A, M] per anchor
        cdf = probs.cumsum(dim=1)
        total = cdf[:, -1:]
        # Strictly below the total, so that the first n with cdf > u * total has a non-zero probability.
        target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
        n_idx = torch.searchsorted(cdf, target, right=True).clamp_(max=m - 1)  # [a, p]
    pos_loss = F.relu(margin + dist - b[:, None])  # [a, p]
    neg_loss = F.relu(margin - dist.gather(1, n_idx) + b[:, None])  # [a, p]: the negative drawn for (a, p)
    sampled = pos & neg.any(dim=1, keepdim=True)
    return (torch.where(pos, pos_loss, 0).sum() + torch.where(sampled, neg_loss, 0).sum(),
            pos.sum() + sampled.sum())


@upcast
def multi_similarity_loss(embeddings, labels, alpha=2.0, beta=50.0, base=0.5, epsilon=0.1, ref_emb=None,
                          ref_labels=None, ref_self=None, anchors=None):
    """Multi-Similarity loss (Wang et al.; authors' code) on cosine similarities.

    Per anchor i: ``pos = {S_ij : j in P_i, S_ij < 1 - 1e-5}``, ``neg = {S_ik : k in N_i}``; mining keeps the
    negatives with ``S + ε > min(pos)`` and the positives with ``S - ε < max(neg)`` (strict, on the unmined sets).
    ``L = (1/N) Σ_i [ (1/α) softplus(LSE -α(S_pos - λ)) + (1/β) softplus(LSE β(S_neg - λ)) ]``, λ = ``base``.
    An anchor whose mined positive or mined negative set is empty contributes 0 to both terms **(resolved: the
    authors' code skips such an anchor entirely)**; the sum is still divided by N. No anchor left: a 0 that carries
    a graph.

    Args: embeddings [N, D]; labels [N] int64; ref_emb [M, D], ref_labels [M], ref_self [N] or None (module
    docstring); anchors: `Anchors` or None. Returns a scalar.
    """
    x, r, pos, neg = _sides(embeddings, labels, ref_emb, ref_labels, ref_self, anchors)
    s = _cosine(x, r)
    sd = s.detach()
    pos = pos & (sd < 1.0 - 1e-5)
    min_pos = sd.masked_fill(~pos, float("inf")).amin(dim=1, keepdim=True)
    max_neg = sd.masked_fill(~neg, float("-inf")).amax(dim=1, keepdim=True)
    neg_keep = neg & (sd + epsilon > min_pos)
    pos_keep = pos & (sd - epsilon < max_neg)
    keep = pos_keep.any(dim=1) & neg_keep.any(dim=1)
    pos_term = F.softplus(_masked_lse(-alpha * (s - base), pos_keep)) / alpha
    neg_term = F.softplus(_masked_lse(beta * (s - base), neg_keep)) / beta
    total, kept = _total_and_count(torch.where(keep, pos_term + neg_term, 0).sum(), keep.sum(), anchors)
    return torch.where(kept > 0, total / len(labels), _zero(embeddings))
