"""Pure-torch references of the exponential-triplet family (Urtans et al.; docs/formulas.md, "Exponential triplet
family"): the exponential triplet loss, the center loss with margin and its centre update rule.

Shapes: ``embeddings`` [N, D] float, ``labels`` [N] int64, ``centers`` [C, D]. The losses take ``anchors`` like the
pair losses (reference/pair.py, `Anchors`).
"""
import torch
import torch.nn.functional as F

from .._numerics import compute_dtype, normalize, upcast
from .._validation import require
from .pair import _masked_mean, _rows, _sides, _total, _zero

_DISTANCES = ("cosine", "euclidean", "squared_euclidean")
_EPS = 1e-20
# Euclidean distances may exceed D_max by this relative amount (half-precision radii are rounded by ~0.4%) before
# the embeddings count as outside the ball; below it they are clamped to D_max.
_BALL_TOLERANCE = 1e-2


def _distances(x, r, distance, embedding_scale):
    """Distance matrix [..., A, M] of the anchors x [..., A, D] to the candidates r [..., M, D] and its maximum
    D_max.
    cosine: 1 - x̂_i·x̂_j = ||x̂_i - x̂_j||² / 2 (D_max = 2); euclidean: ||x_i - x_j|| on the embeddings as given
    (D_max = 2 c_s); squared_euclidean: ||x_i - x_j||² (D_max = (2 c_s)²).
    All from the differences x_i - x_j (cdist without its matmul expansion), never from |a|² + |b|² - 2 a·b: the
    distance of duplicated rows is exactly 0 (not a rounding error of either sign, which the log of the loss
    turns into a NaN or a value that depends on the dtype), and its gradient is 0."""
    if distance == "cosine":
        x, r = normalize(x, dim=-1), normalize(r, dim=-1)
    d = torch.cdist(x, r, compute_mode="donot_use_mm_for_euclid_dist")
    if distance == "cosine":
        return d.square() / 2, 2.0
    if distance == "squared_euclidean":
        return d.square(), (2.0 * embedding_scale) ** 2
    return d, 2.0 * embedding_scale


@upcast
def exponential_triplet_loss(embeddings, labels, num_classes, overlap=1.2, distance="cosine",
                             embedding_scale=1.0, pos_coef=1.0, neg_coef=1.0, ref_emb=None, ref_labels=None,
                             ref_self=None, anchors=None):
    """Exponential triplet loss (Urtans et al., following the authors' code), batch-hard.

    Per anchor a: ``d_ap`` = distance to its farthest positive (j != a, same label), ``d_an`` = distance to its
    closest negative; ``p = d_ap / D_max``, ``n = d_an / D_max``, ``c_pos = overlap / num_classes``:
    ``L = -pos_coef * log(1 - mean_a([p - c_pos]₊) / (1 - c_pos) + ε)
          - neg_coef * log(1 - mean_a([0.5 - n]₊) / 0.5 + ε)``, ε = 1e-20,
    computed as ``-pos_coef * log(mean_a(min(1, (1 - p) / (1 - c_pos))) + ε) - neg_coef * log(mean_a(min(1, 2n))
    + ε)`` (equal for 0 <= p, n <= 1): a close negative's 2n keeps its relative precision, where 1 - (0.5 - n) / 0.5
    would round it away in fp32.
    The batch mean sits inside the log, as the authors' code does **(resolved)**. Each mean runs over the anchors
    that have a positive (resp. a negative); a term with no such anchor is 0 **(resolved)**; with neither, the
    loss is a 0 that carries a graph. Euclidean distances are taken on the embeddings as given (expected from
    ``unit_range``/``unit_bounce`` or an L2 normalisation scaled by ``embedding_scale``); cosine normalises.

    Args: embeddings [N, D]; labels [N] int64; num_classes: the number of training classes K_train;
    distance in {"cosine", "euclidean", "squared_euclidean"}; ref_emb [M, D], ref_labels [M], ref_self [N] or None
    (candidates, as for the pair losses: reference/pair.py); anchors: `Anchors` or None. Returns a scalar.
    Raises ValueError when ``overlap / num_classes >= 1`` (c_pos must be below 1), and when a Euclidean distance
    leaves the ball (checked by ``_validation.require``: a ValueError on eager CPU tensors, an asynchronous
    RuntimeError on other devices and under torch.compile).
    """
    c_pos = _c_pos(overlap, num_classes, distance)
    x, r, pos, neg = _sides(embeddings, labels, ref_emb, ref_labels, ref_self, anchors)
    d, d_max = _distances(x, r, distance, embedding_scale)
    _check_ball(d.max(), d_max, distance, embedding_scale, anchors)
    d = d.clamp(max=d_max)  # what passed the check is out of the ball by rounding only: keep p, n <= 1
    # Anchors without a positive (negative) have d_ap = -inf (d_an = inf) and are left out of the mean.
    d_ap = d.masked_fill(~pos, float("-inf")).amax(dim=1)
    d_an = d.masked_fill(~neg, float("inf")).amin(dim=1)
    return _exponential_value(d_ap, d_an, pos.any(dim=1), neg.any(dim=1), d_max, c_pos, pos_coef, neg_coef,
                              embeddings, anchors)


def _c_pos(overlap, num_classes, distance):
    """c_pos = overlap / num_classes, after the checks of `exponential_triplet_loss`'s arguments."""
    if distance not in _DISTANCES:
        raise ValueError(f"distance must be one of {_DISTANCES}, got {distance!r}")
    c_pos = overlap / num_classes
    if c_pos >= 1.0:
        raise ValueError(f"overlap / num_classes must be < 1 (c_pos = overlap / K_train), got overlap={overlap}, "
                         f"num_classes={num_classes}: c_pos = {c_pos}")
    return c_pos


def _check_ball(largest, d_max, distance, embedding_scale, anchors):
    """Euclidean distances: the largest distance of this call (a 0-d tensor) must not exceed D_max by more than the
    tolerance, over every call that shares the anchors."""
    if distance == "cosine":
        return
    if anchors is not None:
        largest = anchors.max(largest)
    # written as "not above" so that NaN distances pass (the NaN rule is not this check's)
    require(~(largest > d_max * (1 + _BALL_TOLERANCE)),
            f"embeddings must lie in the ball of radius embedding_scale = {embedding_scale} for the {distance} "
            f"distance (D_max = {d_max:.4g}); map them with unit_range / unit_bounce(x, scale=embedding_scale) "
            f"or a scaled L2 normalisation", lambda: f" (largest distance {largest.item():.4g})")


def _exponential_value(d_ap, d_an, has_pos, has_neg, d_max, c_pos, pos_coef, neg_coef, embeddings, anchors):
    """The loss from each anchor's farthest positive and closest negative distances d_ap, d_an [A] (clamped to
    D_max), over the anchors that have a positive (has_pos [A]), resp. a negative (has_neg [A]). An empty mean (no
    such anchor in the whole batch) counts as 1 (no hinge), and its term -log(1 + eps) is 0."""
    pos_term = _masked_mean(((1.0 - d_ap / d_max) / (1.0 - c_pos)).clamp(max=1.0), has_pos, embeddings, anchors,
                            empty=1.0)
    neg_term = _masked_mean((2.0 * d_an / d_max).clamp(max=1.0), has_neg, embeddings, anchors, empty=1.0)
    return _zero(embeddings) - pos_coef * torch.log(pos_term + _EPS) - neg_coef * torch.log(neg_term + _EPS)


@upcast
def center_loss(embeddings, labels, centers, margin=0.0, anchors=None):
    """Center loss with margin (Urtans et al. eq. 9): ``L = mean_i [ ||x_i - c_{y_i}||² - margin ]₊``
    (``margin`` = c_d / 2; 0 gives Wen's center loss). No gradient reaches the centres (they are detached;
    move them with ``updated_centers``, as CenterLoss does in training mode).

    Args: embeddings [N, D]; labels [N] int64; centers [C, D]; anchors: `Anchors` or None (the rows this call
    sums). Returns a scalar.
    """
    # F.embedding rather than centers[labels]: under torch.compile, PyTorch's partitioner may recompute an indexing
    # read of the centres in the backward, i.e. after CenterLoss has updated them in the same graph (wrong
    # gradients); embedding is not among the ops it recomputes, so the gathered rows are saved instead.
    rows = _rows(anchors)
    diff = embeddings[rows] - F.embedding(labels[rows], centers.detach())
    return _total(F.relu((diff * diff).sum(dim=1) - margin).sum(), anchors) / len(labels)


@torch.no_grad()
def updated_centers(centers, embeddings, labels, alpha=0.5):
    """The centres after one update (a new tensor, no gradient): for every class y present in the batch,
    ``c_y - alpha * (c_y - mean_{i : y_i = y} x_i)``; the other centres as they are. The class sums and counts
    go through [C] buffers (fixed shapes, no host read), accumulated in fp32 (fp64 for fp64 tensors); the result
    is in the centres' dtype.

    Args: centers [C, D]; embeddings [N, D]; labels [N] int64. Returns [C, D].
    """
    acc = compute_dtype(centers.dtype, embeddings.dtype)
    sums = torch.zeros(centers.shape, dtype=acc, device=centers.device).index_add_(0, labels, embeddings.to(acc))
    counts = torch.zeros(centers.shape[0], dtype=acc, device=centers.device).index_add_(
        0, labels, torch.ones(labels.shape, dtype=acc, device=centers.device))
    c = centers.to(acc)
    moved = c - alpha * (c - sums / counts.clamp_min(1)[:, None])
    return torch.where((counts > 0)[:, None], moved, c).to(centers.dtype)
