"""nn.Module wrappers: own the learnable proxies / weights / centres, call `functional`.

`loss = Loss(...); value = loss(embeddings [N, D], labels [N])` -> scalar tensor. Constructors follow
pytorch-metric-learning's classes of the same name; every module accepts `backend=` ("auto", "reference",
"chunked", "triton", "gemm"), and every proxy-loss module exposes its proxies as `.proxies` ([C*K, D], class-major).

`process_group=` (every loss): the batch is split over the group's ranks (metricloss_kernels/distributed.py). A
proxy-loss module then holds the proxies of its classes only, `.class_range` = (start, stop), `.proxies`
[(stop - start) * K, D], and its state_dict holds that shard with its class range (`distributed.gather_state_dict`
and `distributed.shard_state_dict` convert to and from the unsharded state_dict). Do not wrap such a module in
DistributedDataParallel. `sample_rate=` (row-wise proxy losses): PartialFC-style class sampling per rank.
"""
import math

import torch
from torch import nn

from . import _validation as V
from . import distributed
from . import functional as F
from .polytopes import regular_polytope
from .reference import updated_centers


def _save_class_range(module, state_dict, prefix, local_metadata):
    state_dict[prefix + "class_range"] = torch.tensor(module.class_range)
    state_dict[prefix + "num_classes"] = torch.tensor(module.num_classes)


def _check_class_range(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                       error_msgs):
    """A sharded module loads the shard of its own class range only (the keys are consumed here)."""
    saved, total = state_dict.pop(prefix + "class_range", None), state_dict.pop(prefix + "num_classes", None)
    expected = f"classes [{module.class_range[0]}, {module.class_range[1]}) of {module.num_classes}"
    hint = ("; convert with metricloss_kernels.distributed.shard_state_dict (from an unsharded state_dict, e.g. "
            "distributed.gather_state_dict of the saving world)")
    if saved is None:
        if strict:
            error_msgs.append(f"{prefix}class_range: missing from the state_dict; this sharded module holds "
                              f"{expected}{hint}")
    elif tuple(saved.tolist()) != module.class_range or int(total) != module.num_classes:
        error_msgs.append(f"{prefix}class_range: the state_dict holds classes [{int(saved[0])}, {int(saved[1])}) "
                          f"of {int(total)}, this module {expected}{hint}")


class _Sharded(nn.Module):
    """A module whose per-class tensors may be sharded over a process group: `class_range`, `process_group`, and
    for a sharded module the state_dict hooks that save and check the class range."""

    def _shard(self, num_classes, process_group):
        self.process_group = process_group
        self.class_range = distributed.module_class_range(num_classes, process_group)
        if process_group is not None:
            self.register_state_dict_post_hook(_save_class_range)
            self.register_load_state_dict_pre_hook(_check_class_range)
        return self.class_range[1] - self.class_range[0]

    def class_rows(self) -> dict:
        """The per-class tensors of the state_dict: name -> rows per class."""
        return {"proxies": getattr(self, "centers_per_class", 1)}

    def _shard_repr(self):
        return "" if self.process_group is None else f", class_range={self.class_range}"


class _ProxyLoss(_Sharded):
    """Owns `proxies` [C * centers_per_class, embedding_size], for the C = stop - start classes of `class_range`
    (all num_classes without a process group)."""

    def __init__(self, num_classes, embedding_size, centers_per_class=1, backend="auto", process_group=None,
                 sample_rate=1.0):
        super().__init__()
        F.check_arguments("", num_classes=num_classes, centers_per_class=centers_per_class, backend=backend,
                          sample_rate=sample_rate)
        self.num_classes, self.centers_per_class, self.backend = num_classes, centers_per_class, backend
        self.sample_rate = sample_rate
        self.embedding_size = V.positive_int(embedding_size, "embedding_size")
        local = self._shard(num_classes, process_group)
        self.proxies = nn.Parameter(torch.empty(local * centers_per_class, embedding_size))

    def _init_proxies(self, rule):
        """torch.nn.init's `rule` for the whole [num_classes * K, D] matrix, drawn for this module's rows:
        "fan_out" kaiming_normal_(mode="fan_out"); "xavier" xavier_normal_; "authors" kaiming_uniform_(a=sqrt(5))
        on the [D, C*K] view (SoftTriple's authors); "linear" kaiming_uniform_(a=sqrt(5)) (nn.Linear). Sharded,
        each rank draws from a generator seeded by the global RNG (advanced alike on every rank) plus its rank:
        different shards, reproducible under torch.manual_seed."""
        rows, d = self.num_classes * self.centers_per_class, self.embedding_size
        w, generator = self.proxies.data, None
        if self.process_group is not None:
            seed = int(torch.randint(2 ** 62, ())) + distributed.group_rank(self.process_group)[1]
            generator = torch.Generator(w.device).manual_seed(seed)
        if rule == "fan_out":
            w.normal_(0, nn.init.calculate_gain("leaky_relu", 0) / math.sqrt(rows), generator=generator)
        elif rule == "xavier":
            w.normal_(0, 1.0 * math.sqrt(2.0 / float(d + rows)), generator=generator)
        else:
            fan = rows if rule == "authors" else d
            bound = math.sqrt(3.0) * (nn.init.calculate_gain("leaky_relu", math.sqrt(5)) / math.sqrt(fan))
            (w.t() if rule == "authors" else w).uniform_(-bound, bound, generator=generator)

    def extra_repr(self):
        return (f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, "
                f"centers_per_class={self.centers_per_class}, backend={self.backend!r}{self._shard_repr()}")


class ProxyNCALoss(_ProxyLoss):
    def __init__(self, num_classes, embedding_size, scale=2.0, exclude_positive=True, backend="auto",
                 process_group=None, sample_rate=1.0):
        super().__init__(num_classes, embedding_size, backend=backend, process_group=process_group,
                         sample_rate=sample_rate)
        F.check_arguments("proxy_nca_loss", scale=scale)
        if exclude_positive:
            F.require_two_classes(num_classes, "num_classes", "ProxyNCALoss with exclude_positive=True")
        self.scale, self.exclude_positive = scale, exclude_positive
        self._init_proxies("fan_out")

    def forward(self, embeddings, labels):
        return F.proxy_nca_loss(embeddings, labels, self.proxies, self.scale, self.exclude_positive, self.backend,
                                self.process_group, self.sample_rate)


class ProxyAnchorLoss(_ProxyLoss):
    def __init__(self, num_classes, embedding_size, margin=0.1, alpha=32.0, backend="auto", process_group=None):
        super().__init__(num_classes, embedding_size, backend=backend, process_group=process_group)
        F.check_arguments("proxy_anchor_loss", margin=margin, alpha=alpha)
        self.margin, self.alpha = margin, alpha
        self._init_proxies("fan_out")

    def forward(self, embeddings, labels):
        return F.proxy_anchor_loss(embeddings, labels, self.proxies, self.margin, self.alpha, self.backend,
                                   self.process_group)


class SoftTripleLoss(_ProxyLoss):
    def __init__(self, num_classes, embedding_size, centers_per_class=10, la=20.0, gamma=0.1, margin=0.01, tau=0.2,
                 backend="auto", process_group=None, sample_rate=1.0):
        super().__init__(num_classes, embedding_size, centers_per_class, backend, process_group, sample_rate)
        F.check_arguments("soft_triple_loss", la=la, gamma=gamma, margin=margin, tau=tau)
        self.la, self.gamma, self.margin, self.tau = la, gamma, margin, tau
        self._init_proxies("authors")

    def forward(self, embeddings, labels):
        return F.soft_triple_loss(embeddings, labels, self.proxies, self.centers_per_class, self.la, self.gamma,
                                  self.margin, self.tau, self.backend, self.process_group, self.sample_rate)


class MPALoss(_ProxyLoss):
    """Multi-Proxy Anchor family; variant "mpa" (class-wise), "dw" (data-wise) or "ap" (all pairs)."""

    def __init__(self, num_classes, embedding_size, centers_per_class=10, alpha=32.0, margin=0.1, gamma=0.1,
                 tau=0.2, variant="mpa", backend="auto", process_group=None, sample_rate=1.0):
        super().__init__(num_classes, embedding_size, centers_per_class, backend, process_group, sample_rate)
        F.check_arguments("mpa_loss", alpha=alpha, margin=margin, gamma=gamma, tau=tau, variant=variant)
        if variant == "mpa":
            F.require_two_classes(num_classes, "num_classes", "MPALoss with variant='mpa'")
            if sample_rate != 1:
                raise ValueError(f"sample_rate must be 1 for variant='mpa' (class sampling applies to the "
                                 f"data-wise variants 'dw' and 'ap'), got {sample_rate!r}")
        self.alpha, self.margin, self.gamma, self.tau, self.variant = alpha, margin, gamma, tau, variant
        self._init_proxies("authors")

    def forward(self, embeddings, labels):
        return F.mpa_loss(embeddings, labels, self.proxies, self.centers_per_class, self.alpha, self.margin,
                          self.gamma, self.tau, self.variant, self.backend, self.process_group, self.sample_rate)


class ArcFaceLoss(_ProxyLoss):
    """ArcFace; `margin` in degrees (pytorch-metric-learning's convention)."""

    def __init__(self, num_classes, embedding_size, margin=28.6, scale=64.0, backend="auto", process_group=None,
                 sample_rate=1.0):
        super().__init__(num_classes, embedding_size, backend=backend, process_group=process_group,
                         sample_rate=sample_rate)
        F.check_arguments("arcface_loss", margin=margin, scale=scale)
        self.margin, self.scale = margin, scale
        self._init_proxies("xavier")

    def forward(self, embeddings, labels):
        return F.arcface_loss(embeddings, labels, self.proxies, self.margin, self.scale, self.backend,
                              self.process_group, self.sample_rate)


class SubCenterArcFaceLoss(_ProxyLoss):
    """Sub-centre ArcFace: `sub_centers` proxies per class (`.proxies` [C * sub_centers, D], class-major), ArcFace
    on the max cosine over a class's sub-centres; `margin` in degrees (pytorch-metric-learning's convention)."""

    def __init__(self, num_classes, embedding_size, sub_centers=3, margin=28.6, scale=64.0, backend="auto",
                 process_group=None, sample_rate=1.0):
        F.check_arguments("sub_center_arcface_loss", sub_centers=sub_centers, margin=margin, scale=scale)
        super().__init__(num_classes, embedding_size, sub_centers, backend, process_group, sample_rate)
        self.margin, self.scale = margin, scale
        self._init_proxies("xavier")

    @property
    def sub_centers(self) -> int:
        return self.centers_per_class

    def forward(self, embeddings, labels):
        return F.sub_center_arcface_loss(embeddings, labels, self.proxies, self.sub_centers, self.margin,
                                         self.scale, self.backend, self.process_group, self.sample_rate)


class CosFaceLoss(_ProxyLoss):
    def __init__(self, num_classes, embedding_size, margin=0.35, scale=64.0, backend="auto", process_group=None,
                 sample_rate=1.0):
        super().__init__(num_classes, embedding_size, backend=backend, process_group=process_group,
                         sample_rate=sample_rate)
        F.check_arguments("cosface_loss", margin=margin, scale=scale)
        self.margin, self.scale = margin, scale
        self._init_proxies("xavier")

    def forward(self, embeddings, labels):
        return F.cosface_loss(embeddings, labels, self.proxies, self.margin, self.scale, self.backend,
                              self.process_group, self.sample_rate)


class L2SoftmaxLoss(_ProxyLoss):
    """L2-constrained softmax: learnable unnormalised weights and bias; `normalize_weights=True` is NormFace
    (normalised weights, no bias)."""

    def __init__(self, num_classes, embedding_size, scale=16.0, normalize_weights=False, backend="auto",
                 process_group=None, sample_rate=1.0):
        super().__init__(num_classes, embedding_size, backend=backend, process_group=process_group,
                         sample_rate=sample_rate)
        F.check_arguments("l2_softmax_loss", scale=scale)
        self.scale, self.normalize_weights = scale, normalize_weights
        self._init_proxies("linear")
        self.bias = None if normalize_weights else nn.Parameter(torch.zeros(self.proxies.shape[0]))

    def class_rows(self):
        return {"proxies": 1} if self.bias is None else {"proxies": 1, "bias": 1}

    def forward(self, embeddings, labels):
        return F.l2_softmax_loss(embeddings, labels, self.proxies, self.bias, self.scale, self.normalize_weights,
                                 self.backend, self.process_group, self.sample_rate)


class RegularPolytopeLoss(_Sharded):
    """Margin-RePoNet with fixed regular-polytope weights (buffer `.proxies` [C, d], the rows of `class_range`);
    `.embedding_size` = d."""

    def __init__(self, num_classes, polytope="simplex", scale=30.0, margin="max", backend="auto",
                 process_group=None, sample_rate=1.0):
        super().__init__()
        F.check_arguments("regular_polytope_loss", num_classes=num_classes, polytope=polytope, scale=scale,
                          margin=margin, backend=backend, sample_rate=sample_rate)
        self.num_classes, self.polytope, self.scale, self.margin, self.backend = (
            num_classes, polytope, scale, margin, backend)
        self.sample_rate = sample_rate
        self._shard(num_classes, process_group)
        # for inspection and state_dict; the loss itself uses the same cached polytope (polytopes.polytope_weights)
        start, stop = self.class_range
        self.register_buffer("proxies", regular_polytope(polytope, num_classes)[start:stop].clone())
        self.embedding_size = self.proxies.shape[1]

    def forward(self, embeddings, labels):
        return F.regular_polytope_loss(embeddings, labels, self.num_classes, self.polytope, self.scale, self.margin,
                                       self.backend, self.process_group, self.sample_rate)


class ProxyRepelLoss(_ProxyLoss):
    """The thesis's proxy-repel loss; variant "proxies" (eq. 6.1) or "batch" (eq. 6.2)."""

    def __init__(self, num_classes, embedding_size, alpha=32.0, margin=0.1, variant="proxies", backend="auto",
                 process_group=None):
        super().__init__(num_classes, embedding_size, backend=backend, process_group=process_group)
        F.check_arguments("proxy_repel_loss", alpha=alpha, margin=margin, variant=variant)
        self.alpha, self.margin, self.variant = alpha, margin, variant
        self._init_proxies("fan_out")

    def forward(self, embeddings, labels):
        return F.proxy_repel_loss(embeddings, labels, self.proxies, self.alpha, self.margin, self.variant,
                                  self.backend, self.process_group)


class _PairLoss(nn.Module):
    """A pair loss: stores its keyword arguments and forwards them to `functional.<fn>`.
    `loss(embeddings, labels, ref_emb=None, ref_labels=None)`: with a reference [M, D] / [M], the embeddings are
    the anchors and the reference rows the candidates (every pair counts; functional's docstring)."""
    fn = None

    def __init__(self, backend="auto", process_group=None, **kwargs):
        super().__init__()
        F.check_arguments(type(self).fn.__name__, backend=backend, **kwargs)
        distributed.check_group(process_group)
        self.backend, self.process_group, self.kwargs = backend, process_group, kwargs

    def arguments(self) -> dict:
        """The functional loss's hyper-parameters."""
        return self.kwargs

    def forward(self, embeddings, labels, ref_emb=None, ref_labels=None):
        return self.compute(embeddings, labels, ref_emb=ref_emb, ref_labels=ref_labels)

    def compute(self, embeddings, labels, **reference):
        """The functional loss with this module's arguments; `reference`: ref_emb, ref_labels and ref_self (as
        `functional` takes them; CrossBatchMemory passes its slots as ref_self)."""
        return type(self).fn(embeddings, labels, **self.arguments(), backend=self.backend,
                             process_group=self.process_group, **reference)

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())


class ContrastiveLoss(_PairLoss):
    fn = F.contrastive_loss

    def __init__(self, pos_margin=1.0, neg_margin=0.5, backend="auto", process_group=None):
        super().__init__(backend, process_group, pos_margin=pos_margin, neg_margin=neg_margin)


class TripletMarginLoss(_PairLoss):
    fn = F.triplet_margin_loss

    def __init__(self, margin=0.1, distance="cosine", mining="all", backend="auto", process_group=None):
        super().__init__(backend, process_group, margin=margin, distance=distance, mining=mining)


class LiftedStructureLoss(_PairLoss):
    fn = F.lifted_structure_loss

    def __init__(self, margin=0.5, backend="auto", process_group=None):
        super().__init__(backend, process_group, margin=margin)


class NPairsLoss(_PairLoss):
    fn = F.npairs_loss

    def __init__(self, l2_reg=0.02, backend="auto", process_group=None):
        super().__init__(backend, process_group, l2_reg=l2_reg)


class MultiSimilarityLoss(_PairLoss):
    fn = F.multi_similarity_loss

    def __init__(self, alpha=2.0, beta=50.0, base=0.5, epsilon=0.1, backend="auto", process_group=None):
        super().__init__(backend, process_group, alpha=alpha, beta=beta, base=base, epsilon=epsilon)


class ExponentialTripletLoss(_PairLoss):
    """Exponential triplet loss; `num_classes` is the number of training classes (K_train)."""
    fn = F.exponential_triplet_loss

    def __init__(self, num_classes, overlap=1.2, distance="cosine", embedding_scale=1.0, pos_coef=1.0,
                 neg_coef=1.0, backend="auto", process_group=None):
        super().__init__(backend, process_group, num_classes=num_classes, overlap=overlap, distance=distance,
                         embedding_scale=embedding_scale, pos_coef=pos_coef, neg_coef=neg_coef)
        if overlap / num_classes >= 1:
            raise ValueError(f"overlap / num_classes must be < 1, got {overlap} / {num_classes}")


class MarginLoss(_PairLoss):
    """Margin loss (Wu et al.); `learn_beta=True` makes beta a parameter, per class when `num_classes` is given.
    With a process group, beta is replicated: every rank's gets the whole gradient (keep the generators, or the
    global RNGs, of the ranks in the same state to draw what one process would)."""
    fn = F.margin_loss

    def __init__(self, margin=0.2, beta=1.2, learn_beta=False, num_classes=None, generator=None, backend="auto",
                 process_group=None):
        super().__init__(backend, process_group, margin=margin, beta=beta)
        self.margin, self.generator = margin, generator
        if learn_beta:  # per class when num_classes is given, else one global learnable beta (0-d)
            shape = () if num_classes is None else (V.positive_int(num_classes, "num_classes"),)
            self.beta = nn.Parameter(torch.full(shape, float(beta)))
        else:
            self.beta = beta

    def arguments(self):
        return {"margin": self.margin, "beta": self.beta, "generator": self.generator}


class CenterLoss(nn.Module):
    """Center loss with margin (buffer `.centers` [C, D]); in training mode each call then moves the centres of
    the batch's classes towards their batch means: c_y <- c_y - alpha (c_y - mean). With a process group the
    centres are replicated (start every rank from the same ones) and move by the means of the whole batch."""

    def __init__(self, num_classes, embedding_size, margin=0.0, alpha=0.5, backend="auto", process_group=None):
        super().__init__()
        F.check_arguments("center_loss", margin=margin, backend=backend)
        distributed.check_group(process_group)
        self.margin, self.backend, self.process_group = margin, backend, process_group
        self.alpha = V.number(alpha, "alpha", nonnegative=True)
        if self.alpha > 1:
            raise ValueError(f"alpha must be in [0, 1] (the centre update rate), got {alpha!r}")
        self.register_buffer("centers", torch.randn(V.positive_int(num_classes, "num_classes"),
                                                    V.positive_int(embedding_size, "embedding_size")))

    def forward(self, embeddings, labels):
        loss = F.center_loss(embeddings, labels, self.centers, self.margin, self.backend, self.process_group)
        if self.training:
            if self.process_group is not None:  # the update uses the whole batch
                embeddings, labels = distributed.gather_batch(embeddings.detach(), labels, self.process_group)
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
