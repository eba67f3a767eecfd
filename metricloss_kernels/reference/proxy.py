"""Pure-torch reference (the test oracle) of the proxy-based losses of docs/formulas.md.

Every function materialises the full N x C (or N x C*K) similarity matrix: readable and exact, not memory-bounded.
Conventions: embeddings x [N, D] float, labels [N] int64 in [0, C), proxies [C*K, D] class-major (row c*K + k is
proxy k of class c). Inputs are assumed valid (the functional layer validates). fp16/bf16 inputs are computed in
fp32 and the result comes back in the input dtype (`upcast`). Averages over a data-dependent set of classes (C+,
C-) are sums over [C] divided by tensor counts: no host read, one graph under torch.compile.
"""
import math

import torch
import torch.nn.functional as F

from metricloss_kernels import polytopes
from metricloss_kernels._math import arcface_target, softplus
from metricloss_kernels._numerics import compute_dtype, normalize, upcast


def _cosines(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [N, D], w [P, D] -> [N, P] cosines x^ . w^ with x^ = x / max(||x||, 1e-12)."""
    return normalize(x, dim=1) @ normalize(w, dim=1).T


def _softplus_lse(z: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """softplus(LSE_{j : mask_j} z_j) along `dim`; an empty set gives softplus(-inf) = 0 with zero gradient.

    Computed as LSE over {0} and the masked entries (log(1 + sum e^z) = LSE(0, z)): stable, and no NaN appears
    anywhere in the backward pass (an all -inf logsumexp would produce NaN before the mask drops it).
    """
    zero_shape = list(z.shape)
    zero_shape[dim] = 1
    z = torch.cat([z.masked_fill(~mask, float("-inf")), z.new_zeros(zero_shape)], dim=dim)
    return torch.logsumexp(z, dim=dim)


def _target(s: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """s [N, C] -> s[i, labels_i], [N]."""
    return s.gather(1, labels.unsqueeze(1)).squeeze(1)


def _positive_mask(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[N, C] bool, True where c == labels_i (a comparison: unlike one_hot, no range check that reads the labels)."""
    return labels[:, None] == torch.arange(num_classes, device=labels.device)


def _subset_mean(values: torch.Tensor, subset: torch.Tensor) -> torch.Tensor:
    """Mean of the per-class `values` [C] over the classes of the non-empty bool `subset` [C] (values outside the
    subset are 0: the softplus of an empty LSE)."""
    return values.sum() / subset.sum()


@upcast
def class_similarity(embeddings: torch.Tensor, proxies: torch.Tensor, centers_per_class: int,
                     gamma: float) -> torch.Tensor:
    """SoftTriple / MPA class similarity S_{i,c} = sum_k softmax_k(l_{i,c,k} / gamma) * l_{i,c,k}.

    Args:
        embeddings: [N, D]; proxies: [C*K, D] class-major, K = centers_per_class; gamma: softmax temperature.
    Returns:
        S [N, C] (equals the cosines l when K = 1).
    """
    return _softmax_weighted(_cosines(embeddings, proxies).unflatten(1, (-1, centers_per_class)), gamma)


def _softmax_weighted(l: torch.Tensor, gamma: float) -> torch.Tensor:
    """sum_k softmax_k(l / gamma) l over the last dim: [N, C, K] -> [N, C]."""
    return (torch.softmax(l / gamma, dim=-1) * l).sum(dim=-1)


def class_lse(x, w, labels, *, bias=None, centers_per_class=1, gamma=0.1, scale=1.0, shift=0.0, normalize_x=True,
              normalize_w=True, reduce="row", offset=None, pool="softmax"):
    """The streaming primitive `metricloss_kernels.lse.class_lse` (same arguments but the tiling ones), computed by
    materialising its [N, C] logits z = scale * S + shift (+ bias): the reference backend of the class-sharded
    losses, which compose it like the streamed one (metricloss_kernels.fused). S pools each class's K cosines by
    the softmax (temperature gamma) or, pool="max", by their max.

    Returns [N] (reduce="row": LSE_{c != labels_i} (z_ic - offset_i), offset [N] or None) or [C] (reduce="col":
    LSE_{i: labels_i != c} z_ic) in the compute dtype; a label outside [0, C) leaves nothing out; an empty LSE is
    -inf with zero gradient.
    """
    cd = compute_dtype(x.dtype, w.dtype)
    x, w = x.to(cd), w.to(cd)
    l = ((normalize(x, dim=1) if normalize_x else x) @ (normalize(w, dim=1) if normalize_w else w).T)
    l = l.unflatten(1, (-1, centers_per_class))
    z = scale * (l.amax(-1) if pool == "max" else _softmax_weighted(l, gamma)) + shift
    if bias is not None:
        z = z + bias.to(cd)
    if offset is not None:
        z = z - offset.to(cd)[:, None]
    dim = 1 if reduce == "row" else 0
    excluded = _positive_mask(labels, z.shape[1])
    empty = excluded.all(dim=dim)
    out = torch.logsumexp(z.masked_fill(excluded, float("-inf")).masked_fill(empty.unsqueeze(dim), 0), dim=dim)
    return out.masked_fill(empty, float("-inf"))


@upcast
def proxy_regularizer(proxies: torch.Tensor, centers_per_class: int) -> torch.Tensor:
    """SoftTriple regulariser R(W) = sum_c sum_{t<s} sqrt(2 + 1e-5 - 2 w^_{c,t} . w^_{c,s}) / (C*K*(K-1)).

    Unordered intra-class pairs are summed and divided by C*K*(K-1), as the SoftTriple authors' code does.
    Batched over the [C, K, D] view (O(C*K^2*D), never a (C*K)^2 matrix).

    Args:
        proxies: [C*K, D] class-major; centers_per_class: K.
    Returns:
        scalar; 0 when K = 1.
    """
    k = centers_per_class
    w = normalize(proxies, dim=1).unflatten(0, (-1, k))  # [C, K, D]
    gram = w @ w.transpose(1, 2)  # [C, K, K]
    t, s = torch.triu_indices(k, k, offset=1, device=proxies.device)
    dist = torch.sqrt(2.0 + 1e-5 - 2.0 * gram[:, t, s])  # [C, K(K-1)/2]
    # K = 1: no pairs, the (empty) sum is 0; max() only avoids 0/0.
    return dist.sum() / max(w.shape[0] * k * (k - 1), 1)


def _with_regularizer(loss: torch.Tensor, proxies: torch.Tensor, centers_per_class: int,
                      tau: float) -> torch.Tensor:
    """loss + tau * R(W); R is skipped when it is 0 by definition (tau = 0 or K = 1)."""
    if tau == 0 or centers_per_class == 1:
        return loss
    return loss + tau * proxy_regularizer(proxies, centers_per_class)


@upcast
def proxy_nca_loss(embeddings: torch.Tensor, labels: torch.Tensor, proxies: torch.Tensor, scale: float = 2.0,
                   exclude_positive: bool = True) -> torch.Tensor:
    """ProxyNCA: mean_i [ -s*S_{i,y_i} + LSE_{c != y_i} s*S_{i,c} ], K = 1, S = cosines.

    Args:
        embeddings: [N, D]; labels: [N]; proxies: [C, D]; scale: s.
        exclude_positive: False puts the positive in the LSE (plain softmax cross-entropy).
    Returns:
        scalar.
    """
    z = scale * _cosines(embeddings, proxies)  # [N, C]
    if not exclude_positive:
        return F.cross_entropy(z, labels)
    # relative to the target logit inside the LSE: exact however large the logits (LSE - t would keep nothing below
    # the last bit of |t|)
    neg = (z - _target(z, labels).unsqueeze(1)).masked_fill(_positive_mask(labels, z.shape[1]), float("-inf"))
    return torch.logsumexp(neg, dim=1).mean()


def _anchor_terms(s: torch.Tensor, labels: torch.Tensor, alpha: float, margin: float):
    """Class-wise ProxyAnchor terms of the similarity s [N, C].

    Returns:
        pos [C]: softplus(LSE_{i: y_i = c} -alpha (s_ic - margin)), 0 for classes absent from the batch;
        neg [C]: softplus(LSE_{i: y_i != c} alpha (s_ic + margin)), 0 for classes without negatives;
        present [C] bool (c in C+), has_neg [C] bool (c in C-).
    """
    pos_mask = _positive_mask(labels, s.shape[1])
    pos = _softplus_lse(-alpha * (s - margin), pos_mask, dim=0)
    neg = _softplus_lse(alpha * (s + margin), ~pos_mask, dim=0)
    return pos, neg, pos_mask.any(dim=0), (~pos_mask).any(dim=0)


@upcast
def proxy_anchor_loss(embeddings: torch.Tensor, labels: torch.Tensor, proxies: torch.Tensor, margin: float = 0.1,
                      alpha: float = 32.0) -> torch.Tensor:
    """ProxyAnchor (Kim et al., authors' code), K = 1:

        L = (1/|C+|) sum_{c in C+} softplus(LSE_{i: y_i=c} -alpha(S_ic - delta))
            + (1/C) sum_{c=0}^{C-1} softplus(LSE_{i: y_i!=c} alpha(S_ic + delta)).

    The second average runs over all C classes; an empty LSE is -inf and contributes softplus(-inf) = 0.

    Args:
        embeddings: [N, D]; labels: [N]; proxies: [C, D]; margin: delta; alpha: scale.
    Returns:
        scalar.
    """
    pos, neg, present, _ = _anchor_terms(_cosines(embeddings, proxies), labels, alpha, margin)
    return _subset_mean(pos, present) + neg.mean()


@upcast
def soft_triple_loss(embeddings: torch.Tensor, labels: torch.Tensor, proxies: torch.Tensor,
                     centers_per_class: int = 10, la: float = 20.0, gamma: float = 0.1, margin: float = 0.01,
                     tau: float = 0.2) -> torch.Tensor:
    """SoftTriple (Qian et al., authors' code): mean_i CE(la * (S_i - delta * onehot(y_i)), y_i) + tau * R(W).

    Args:
        embeddings: [N, D]; labels: [N]; proxies: [C*K, D] class-major, K = centers_per_class;
        la: scale lambda; gamma: temperature of S; margin: delta; tau: weight of R(W) (see proxy_regularizer).
    Returns:
        scalar.
    """
    s = class_similarity(embeddings, proxies, centers_per_class, gamma)
    logits = la * (s - margin * _positive_mask(labels, s.shape[1]).to(s.dtype))
    return _with_regularizer(F.cross_entropy(logits, labels), proxies, centers_per_class, tau)


@upcast
def mpa_loss(embeddings: torch.Tensor, labels: torch.Tensor, proxies: torch.Tensor, centers_per_class: int = 10,
             alpha: float = 32.0, margin: float = 0.1, gamma: float = 0.1, tau: float = 0.2,
             variant: str = "mpa") -> torch.Tensor:
    """Multi-Proxy Anchor family (Saeki et al. 2023), on the class similarity S (temperature gamma), plus tau*R(W):

    - "mpa" (eq. 6): (1/|C+|) sum_{c in C+} softplus(LSE_{i: y_i=c} -alpha(S_ic - delta))
                     + (1/|C-|) sum_{c in C-} softplus(LSE_{i: y_i!=c} alpha(S_ic + delta)),
      C- = classes with at least one negative sample in the batch (all C once the batch holds two labels).
    - "dw" (eq. 12): mean_i [softplus(-alpha(S_{i,y_i} - delta)) + softplus(LSE_{c!=y_i} alpha(S_ic + delta))].
    - "ap" (eq. 16): mean_i softplus(LSE_c alpha S'_ic), S'_ic = delta - S_ic if c = y_i else S_ic + delta.
    With K = 1 and tau = 0, "mpa" equals ProxyAnchor whenever the batch holds two labels.

    Args:
        embeddings: [N, D]; labels: [N]; proxies: [C*K, D] class-major, K = centers_per_class;
        alpha: scale; margin: delta; gamma: temperature of S; tau: weight of R(W); variant: "mpa" | "dw" | "ap".
    Returns:
        scalar.
    """
    s = class_similarity(embeddings, proxies, centers_per_class, gamma)
    if variant == "mpa":
        pos, neg, present, has_neg = _anchor_terms(s, labels, alpha, margin)
        loss = _subset_mean(pos, present) + _subset_mean(neg, has_neg)
    elif variant == "dw":
        pos_mask = _positive_mask(labels, s.shape[1])
        pos = softplus(-alpha * (_target(s, labels) - margin))
        loss = (pos + _softplus_lse(alpha * (s + margin), ~pos_mask, dim=1)).mean()
    elif variant == "ap":
        pos_mask = _positive_mask(labels, s.shape[1])
        s_prime = torch.where(pos_mask, margin - s, s + margin)
        loss = softplus(torch.logsumexp(alpha * s_prime, dim=1)).mean()
    else:
        raise ValueError(f"variant must be 'mpa', 'dw' or 'ap', got {variant!r}")
    return _with_regularizer(loss, proxies, centers_per_class, tau)


def _additive_angular_margin_ce(cos: torch.Tensor, labels: torch.Tensor, margin: float,
                                scale: float) -> torch.Tensor:
    """ArcFace cross-entropy on cosines cos [N, C] with angular margin `margin` in radians (insightface torch version):
    the target logit is cos(theta + m) where cos(theta) > cos(pi - m), else cos(theta) - sin(pi - m) * m.

    Only the target cosines are clamped to [-1 + 1e-7, 1 - 1e-7] (they feed the sqrt of sin(theta), whose gradient
    is infinite at +-1); the other logits are the raw cosines.
    """
    phi = arcface_target(_target(cos, labels), margin)
    logits = cos.scatter(1, labels.unsqueeze(1), phi.unsqueeze(1))
    return F.cross_entropy(scale * logits, labels)


@upcast
def arcface_loss(embeddings: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, margin: float = 28.6,
                 scale: float = 64.0) -> torch.Tensor:
    """ArcFace (additive angular margin): mean_i CE(s * [phi on y_i, cos(theta) elsewhere], y_i) on normalised
    embeddings and weights; phi = cos(theta + m) if cos(theta) > cos(pi - m) else cos(theta) - sin(pi - m) * m.

    Args:
        embeddings: [N, D]; labels: [N]; weight: [C, D].
        margin: angular margin in DEGREES (pytorch-metric-learning convention; 28.6 deg ~ 0.4992 rad).
        scale: s.
    Returns:
        scalar. Only the target cosines are clamped to [-1 + 1e-7, 1 - 1e-7] (finite gradient of sin(theta)).
    """
    return _additive_angular_margin_ce(_cosines(embeddings, weight), labels, math.radians(margin), scale)


@upcast
def sub_center_arcface_loss(embeddings: torch.Tensor, labels: torch.Tensor, proxies: torch.Tensor,
                            sub_centers: int = 3, margin: float = 28.6, scale: float = 64.0) -> torch.Tensor:
    """Sub-centre ArcFace (Deng et al. 2020; pytorch-metric-learning's SubCenterArcFaceLoss): ArcFace on the class
    cosines cos_{i,c} = max_k x^_i . w^_{c,k} over each class's K sub-centres (the target's margin included).

    Args:
        embeddings: [N, D]; labels: [N]; proxies: [C*K, D] class-major, K = sub_centers.
        margin: angular margin in DEGREES, as arcface_loss; scale: s.
    Returns:
        scalar; equals arcface_loss for K = 1. The max's gradient is split evenly between tied sub-centres.
    """
    cos = _cosines(embeddings, proxies).unflatten(1, (-1, sub_centers)).amax(-1)
    return _additive_angular_margin_ce(cos, labels, math.radians(margin), scale)


@upcast
def cosface_loss(embeddings: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, margin: float = 0.35,
                 scale: float = 64.0) -> torch.Tensor:
    """CosFace (additive cosine margin): mean_i CE(s * (cos_i - m * onehot(y_i)), y_i), normalised x and weight.

    Args:
        embeddings: [N, D]; labels: [N]; weight: [C, D]; margin: m (on the cosine); scale: s.
    Returns:
        scalar.
    """
    cos = _cosines(embeddings, weight)
    return F.cross_entropy(scale * (cos - margin * _positive_mask(labels, cos.shape[1]).to(cos.dtype)), labels)


@upcast
def l2_softmax_loss(embeddings: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor,
                    bias: torch.Tensor | None = None, scale: float = 16.0,
                    normalize_weights: bool = False) -> torch.Tensor:
    """L2-constrained softmax (Ranjan et al.): mean_i CE((s * x^_i) W^T + b, y_i), W unnormalised.

    Args:
        embeddings: [N, D]; labels: [N]; weight: W [C, D]; bias: b [C] or None (no bias); scale: s.
        normalize_weights: True gives the NormFace variant (W row-normalised). NormFace has no bias: the caller
            passes bias=None there; a bias that is given is added in either case.
    Returns:
        scalar.
    """
    w = normalize(weight, dim=1) if normalize_weights else weight
    logits = (scale * normalize(embeddings, dim=1)) @ w.T
    if bias is not None:
        logits = logits + bias
    return F.cross_entropy(logits, labels)


@upcast
def regular_polytope_loss(embeddings: torch.Tensor, labels: torch.Tensor, num_classes: int,
                          polytope: str = "simplex", scale: float = 30.0, margin="max") -> torch.Tensor:
    """Margin-RePoNet (Pernici et al.): ArcFace on x^ with the fixed weights W = regular_polytope(polytope, C), bias 0.

    Args:
        embeddings: [N, d], d = polytopes.polytope_dim(polytope, num_classes); labels: [N]; num_classes: C >= 2.
        polytope: "simplex" | "orthoplex" | "cube"; scale: kappa.
        margin: "max" for the polytope's neighbour angle phi (polytope_margin), or a float in DEGREES like ArcFace
            (0 gives plain normalised RePoNet: cross-entropy of kappa * cosines).
    Returns:
        scalar.
    """
    w = polytopes.polytope_weights(polytope, num_classes, embeddings.device, embeddings.dtype)
    m = polytopes.margin_radians(polytope, num_classes, margin)
    return _additive_angular_margin_ce(normalize(embeddings, dim=1) @ w.T, labels, m, scale)


@upcast
def proxy_repel_loss(embeddings: torch.Tensor, labels: torch.Tensor, proxies: torch.Tensor, alpha: float = 32.0,
                     margin: float = 0.1, variant: str = "proxies") -> torch.Tensor:
    """Proxy-repel loss (Psomas, eqs. 6.1 / 6.2; (resolved naming)), K = 1, all C proxies:

        L = (1/|W+|) sum_{w in W+} softplus(LSE_{x in X_w} -alpha(w^.x^ - delta))
            + (1/C) sum_w softplus(LSE_{w' != w} alpha(P_{w,w'} + delta)),

    W+ = proxies of the classes in the batch, X_w = the batch samples of w's class;
    "proxies" (6.1): P_{w,w'} = w^ . w'^;
    "batch" (6.2): P_{w,w'} = sum_{x in batch} (w^ . x^)(x^ . w'^) -- a sum over the batch, not a mean, as written.

    Args:
        embeddings: [N, D]; labels: [N]; proxies: [C, D]; alpha: scale; margin: delta;
        variant: "proxies" | "batch".
    Returns:
        scalar.
    """
    l = _cosines(embeddings, proxies)  # [N, C]
    pos_mask = _positive_mask(labels, l.shape[1])
    pos = _softplus_lse(-alpha * (l - margin), pos_mask, dim=0)
    if variant == "proxies":
        p = _cosines(proxies, proxies)
    elif variant == "batch":
        p = l.T @ l
    else:
        raise ValueError(f"variant must be 'proxies' or 'batch', got {variant!r}")
    others = ~torch.eye(p.shape[0], dtype=torch.bool, device=p.device)
    neg = _softplus_lse(alpha * (p + margin), others, dim=1)
    return _subset_mean(pos, pos_mask.any(dim=0)) + neg.mean()
