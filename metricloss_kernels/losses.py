"""nn.Module wrappers: own the learnable proxies / weights / centres, call `functional`.

`loss = Loss(...); value = loss(embeddings [N, D], labels [N])` -> scalar tensor. Constructors follow
pytorch-metric-learning's classes of the same name; every module accepts `backend=` ("auto", "reference",
"chunked", "triton"), and every proxy-loss module exposes its proxies as `.proxies` ([C*K, D], class-major).
"""
import math

import torch
from torch import nn

from . import _validation as V
from . import functional as F
from .polytopes import regular_polytope
from .reference import updated_centers


class _ProxyLoss(nn.Module):
    """Owns `proxies` [num_classes * centers_per_class, embedding_size]."""

    def __init__(self, num_classes, embedding_size, centers_per_class=1, backend="auto"):
        super().__init__()
        F.check_arguments("", num_classes=num_classes, centers_per_class=centers_per_class, backend=backend)
        self.num_classes, self.centers_per_class, self.backend = num_classes, centers_per_class, backend
        self.embedding_size = V.positive_int(embedding_size, "embedding_size")
        self.proxies = nn.Parameter(torch.empty(num_classes * centers_per_class, embedding_size))

    def extra_repr(self):
        return (f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, "
                f"centers_per_class={self.centers_per_class}, backend={self.backend!r}")


def _init_kaiming_normal_fan_out(w):
    nn.init.kaiming_normal_(w, mode="fan_out")


def _init_authors_uniform(w):
    # SoftTriple authors: kaiming_uniform_(a=sqrt(5)) on the [D, C*K] view of the weights
    nn.init.kaiming_uniform_(w.data.t(), a=math.sqrt(5))


class ProxyNCALoss(_ProxyLoss):
    def __init__(self, num_classes, embedding_size, scale=2.0, exclude_positive=True, backend="auto"):
        super().__init__(num_classes, embedding_size, backend=backend)
        F.check_arguments("proxy_nca_loss", scale=scale)
        if exclude_positive:
            F.require_two_classes(num_classes, "num_classes", "ProxyNCALoss with exclude_positive=True")
        self.scale, self.exclude_positive = scale, exclude_positive
        _init_kaiming_normal_fan_out(self.proxies)

    def forward(self, embeddings, labels):
        return F.proxy_nca_loss(embeddings, labels, self.proxies, self.scale, self.exclude_positive, self.backend)


class ProxyAnchorLoss(_ProxyLoss):
    def __init__(self, num_classes, embedding_size, margin=0.1, alpha=32.0, backend="auto"):
        super().__init__(num_classes, embedding_size, backend=backend)
        F.check_arguments("proxy_anchor_loss", margin=margin, alpha=alpha)
        self.margin, self.alpha = margin, alpha
        _init_kaiming_normal_fan_out(self.proxies)

    def forward(self, embeddings, labels):
        return F.proxy_anchor_loss(embeddings, labels, self.proxies, self.margin, self.alpha, self.backend)


class SoftTripleLoss(_ProxyLoss):
    def __init__(self, num_classes, embedding_size, centers_per_class=10, la=20.0, gamma=0.1, margin=0.01, tau=0.2,
                 backend="auto"):
        super().__init__(num_classes, embedding_size, centers_per_class, backend)
        F.check_arguments("soft_triple_loss", la=la, gamma=gamma, margin=margin, tau=tau)
        self.la, self.gamma, self.margin, self.tau = la, gamma, margin, tau
        _init_authors_uniform(self.proxies)

    def forward(self, embeddings, labels):
        return F.soft_triple_loss(embeddings, labels, self.proxies, self.centers_per_class, self.la, self.gamma,
                                  self.margin, self.tau, self.backend)


class MPALoss(_ProxyLoss):
    """Multi-Proxy Anchor family; variant "mpa" (class-wise), "dw" (data-wise) or "ap" (all pairs)."""

    def __init__(self, num_classes, embedding_size, centers_per_class=10, alpha=32.0, margin=0.1, gamma=0.1,
                 tau=0.2, variant="mpa", backend="auto"):
        super().__init__(num_classes, embedding_size, centers_per_class, backend)
        F.check_arguments("mpa_loss", alpha=alpha, margin=margin, gamma=gamma, tau=tau, variant=variant)
        if variant == "mpa":
            F.require_two_classes(num_classes, "num_classes", "MPALoss with variant='mpa'")
        self.alpha, self.margin, self.gamma, self.tau, self.variant = alpha, margin, gamma, tau, variant
        _init_authors_uniform(self.proxies)

    def forward(self, embeddings, labels):
        return F.mpa_loss(embeddings, labels, self.proxies, self.centers_per_class, self.alpha, self.margin,
                          self.gamma, self.tau, self.variant, self.backend)


class ArcFaceLoss(_ProxyLoss):
    """ArcFace; `margin` in degrees (pytorch-metric-learning's convention)."""

    def __init__(self, num_classes, embedding_size, margin=28.6, scale=64.0, backend="auto"):
        super().__init__(num_classes, embedding_size, backend=backend)
        F.check_arguments("arcface_loss", margin=margin, scale=scale)
        self.margin, self.scale = margin, scale
        nn.init.xavier_normal_(self.proxies)

    def forward(self, embeddings, labels):
        return F.arcface_loss(embeddings, labels, self.proxies, self.margin, self.scale, self.backend)


class CosFaceLoss(_ProxyLoss):
    def __init__(self, num_classes, embedding_size, margin=0.35, scale=64.0, backend="auto"):
        super().__init__(num_classes, embedding_size, backend=backend)
        F.check_arguments("cosface_loss", margin=margin, scale=scale)
        self.margin, self.scale = margin, scale
        nn.init.xavier_normal_(self.proxies)

    def forward(self, embeddings, labels):
        return F.cosface_loss(embeddings, labels, self.proxies, self.margin, self.scale, self.backend)


class L2SoftmaxLoss(_ProxyLoss):
    """L2-constrained softmax: learnable unnormalised weights and bias; `normalize_weights=True` is NormFace
    (normalised weights, no bias)."""

    def __init__(self, num_classes, embedding_size, scale=16.0, normalize_weights=False, backend="auto"):
        super().__init__(num_classes, embedding_size, backend=backend)
        F.check_arguments("l2_softmax_loss", scale=scale)
        self.scale, self.normalize_weights = scale, normalize_weights
        nn.init.kaiming_uniform_(self.proxies, a=math.sqrt(5))  # as nn.Linear
        self.bias = None if normalize_weights else nn.Parameter(torch.zeros(num_classes))

    def forward(self, embeddings, labels):
        return F.l2_softmax_loss(embeddings, labels, self.proxies, self.bias, self.scale, self.normalize_weights,
                                 self.backend)


class RegularPolytopeLoss(nn.Module):
    """Margin-RePoNet with fixed regular-polytope weights (buffer `.proxies` [C, d]); `.embedding_size` = d."""

    def __init__(self, num_classes, polytope="simplex", scale=30.0, margin="max", backend="auto"):
        super().__init__()
        F.check_arguments("regular_polytope_loss", num_classes=num_classes, polytope=polytope, scale=scale,
                          margin=margin, backend=backend)
        self.num_classes, self.polytope, self.scale, self.margin, self.backend = (
            num_classes, polytope, scale, margin, backend)
        # for inspection and state_dict; the loss itself uses the same cached polytope (polytopes.polytope_weights)
        self.register_buffer("proxies", regular_polytope(polytope, num_classes))
        self.embedding_size = self.proxies.shape[1]

    def forward(self, embeddings, labels):
        return F.regular_polytope_loss(embeddings, labels, self.num_classes, self.polytope, self.scale, self.margin,
                                       self.backend)


class ProxyRepelLoss(_ProxyLoss):
    """The thesis's proxy-repel loss; variant "proxies" (eq. 6.1) or "batch" (eq. 6.2)."""

    def __init__(self, num_classes, embedding_size, alpha=32.0, margin=0.1, variant="proxies", backend="auto"):
        super().__init__(num_classes, embedding_size, backend=backend)
        F.check_arguments("proxy_repel_loss", alpha=alpha, margin=margin, variant=variant)
        self.alpha, self.margin, self.variant = alpha, margin, variant
        _init_kaiming_normal_fan_out(self.proxies)

    def forward(self, embeddings, labels):
        return F.proxy_repel_loss(embeddings, labels, self.proxies, self.alpha, self.margin, self.variant,
                                  self.backend)


class _PairLoss(nn.Module):
    """A loss with no weights: stores its keyword arguments and forwards them to `functional.<fn>`."""
    fn = None

    def __init__(self, backend="auto", **kwargs):
        super().__init__()
        F.check_arguments(type(self).fn.__name__, backend=backend, **kwargs)
        self.backend, self.kwargs = backend, kwargs

    def forward(self, embeddings, labels):
        return type(self).fn(embeddings, labels, **self.kwargs, backend=self.backend)

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())


class ContrastiveLoss(_PairLoss):
    fn = F.contrastive_loss

    def __init__(self, pos_margin=1.0, neg_margin=0.5, backend="auto"):
        super().__init__(backend, pos_margin=pos_margin, neg_margin=neg_margin)


class TripletMarginLoss(_PairLoss):
    fn = F.triplet_margin_loss

    def __init__(self, margin=0.1, distance="cosine", mining="all", backend="auto"):
        super().__init__(backend, margin=margin, distance=distance, mining=mining)


class LiftedStructureLoss(_PairLoss):
    fn = F.lifted_structure_loss

    def __init__(self, margin=0.5, backend="auto"):
        super().__init__(backend, margin=margin)


class NPairsLoss(_PairLoss):
    fn = F.npairs_loss

    def __init__(self, l2_reg=0.02, backend="auto"):
        super().__init__(backend, l2_reg=l2_reg)


class MultiSimilarityLoss(_PairLoss):
    fn = F.multi_similarity_loss

    def __init__(self, alpha=2.0, beta=50.0, base=0.5, epsilon=0.1, backend="auto"):
        super().__init__(backend, alpha=alpha, beta=beta, base=base, epsilon=epsilon)


class ExponentialTripletLoss(_PairLoss):
    """Exponential triplet loss; `num_classes` is the number of training classes (K_train)."""
    fn = F.exponential_triplet_loss

    def __init__(self, num_classes, overlap=1.2, distance="cosine", embedding_scale=1.0, pos_coef=1.0,
                 neg_coef=1.0, backend="auto"):
        super().__init__(backend, num_classes=num_classes, overlap=overlap, distance=distance,
                         embedding_scale=embedding_scale, pos_coef=pos_coef, neg_coef=neg_coef)
        if overlap / num_classes >= 1:
            raise ValueError(f"overlap / num_classes must be < 1, got {overlap} / {num_classes}")


class MarginLoss(nn.Module):
    """Margin loss (Wu et al.); `learn_beta=True` makes beta a parameter, per class when `num_classes` is given."""

    def __init__(self, margin=0.2, beta=1.2, learn_beta=False, num_classes=None, generator=None, backend="auto"):
        super().__init__()
        F.check_arguments("margin_loss", margin=margin, beta=beta, backend=backend)
        self.margin, self.generator, self.backend = margin, generator, backend
        if learn_beta:  # per class when num_classes is given, else one global learnable beta (0-d)
            shape = () if num_classes is None else (V.positive_int(num_classes, "num_classes"),)
            self.beta = nn.Parameter(torch.full(shape, float(beta)))
        else:
            self.beta = beta

    def forward(self, embeddings, labels):
        return F.margin_loss(embeddings, labels, self.margin, self.beta, self.generator, self.backend)


class CenterLoss(nn.Module):
    """Center loss with margin (buffer `.centers` [C, D]); in training mode each call then moves the centres of
    the batch's classes towards their batch means: c_y <- c_y - alpha (c_y - mean)."""

    def __init__(self, num_classes, embedding_size, margin=0.0, alpha=0.5, backend="auto"):
        super().__init__()
        F.check_arguments("center_loss", margin=margin, backend=backend)
        self.margin, self.backend = margin, backend
        self.alpha = V.number(alpha, "alpha", nonnegative=True)
        if self.alpha > 1:
            raise ValueError(f"alpha must be in [0, 1] (the centre update rate), got {alpha!r}")
        self.register_buffer("centers", torch.randn(V.positive_int(num_classes, "num_classes"),
                                                    V.positive_int(embedding_size, "embedding_size")))

    def forward(self, embeddings, labels):
        loss = F.center_loss(embeddings, labels, self.centers, self.margin, self.backend)
        if self.training:
            # One non-finite batch would poison the centres for good: refused, and (should the check be an
            # asynchronous one, see _validation.require) never written either.
            finite = torch.isfinite(embeddings).all()
            V.require(finite, "embeddings must be finite to update the centres (found NaN or inf)")
            with torch.no_grad():
                moved = updated_centers(self.centers, embeddings.detach(), labels, self.alpha)
                self.centers.copy_(torch.where(finite, moved, self.centers))
        return loss


class WeightedSumLoss(nn.Module):
    """The composite of the exponential-triplet paper (eq. 10): sum_name weights[name] * losses[name](x, y).
    `.last_terms` holds the detached value of each term from the last call."""

    def __init__(self, losses: dict, weights: dict | None = None):
        super().__init__()
        if not losses:
            raise ValueError("losses must be a non-empty dict of name -> loss module")
        self.losses = nn.ModuleDict(losses)
        self.weights = {name: 1.0 for name in losses} if weights is None else dict(weights)
        unknown = set(self.weights) ^ set(losses)
        if unknown:
            raise ValueError(f"weights must have exactly the keys of losses; mismatched: {sorted(unknown)}")
        self.last_terms = {}

    def forward(self, embeddings, labels):
        terms = {name: loss(embeddings, labels) for name, loss in self.losses.items()}
        self.last_terms = {name: t.detach() for name, t in terms.items()}
        return sum(self.weights[name] * t for name, t in terms.items())
