"""Public functional API: argument validation, then dispatch to a backend.

Shapes: embeddings [N, D] float; labels [N] integer; proxies [C*K, D] class-major (row c*K + k is proxy k of
class c); weight [C, D]. Every loss returns a scalar tensor in the embeddings' dtype. The mathematics of each
function is docs/formulas.md; the docstrings of `metricloss_kernels.reference` state it per loss.

`process_group=` (every loss): the batch is split over the ranks of a torch.distributed group (the same number of
rows on each) and the value is the loss of the whole batch on every rank. Proxy losses then take this rank's
proxies (its contiguous block of classes, in rank order) and labels stay global; pair losses use the other ranks'
rows as references. Gradient convention, communication and checks: metricloss_kernels/distributed.py.
`sample_rate=` (row-wise proxy losses): PartialFC-style class sampling per rank (`distributed.sampled`).

`ref_emb=None, ref_labels=None` (pair losses, PML's semantics): the anchors are the rows of `embeddings`, the
candidates the rows of `ref_emb` [M, D] with labels `ref_labels` [M], and every (i, j) pair counts; without a
reference the batch is compared with itself and the pairs (i, i) are left out. `ref_self` [N] (int, optional) names
the row of the reference that is embedding i itself (its slot in a cross-batch memory: `memory.CrossBatchMemory`),
left out of i's pairs; negative: none. Gradients reach both tensors. Over a process group each rank passes its
rows of the reference too (the same number on every rank; ref_self indexes them) and the candidates are the
gathered reference. Every pair loss (not the center loss) streams over blocks of the reference or of the anchors
(`streamed_pairs`, backend "chunked", chosen by "auto" when the [N, M] similarities would exceed 64 MiB): no [N, M]
tensor is held.
"""
import functools

import torch
import torch.distributed as dist

from . import _validation as V
from . import distributed, fused, reference, streamed_pairs
from ._backend import BACKENDS, resolve
from ._numerics import result_dtype, to_compute_dtype
from .lse import class_lse
from .polytopes import KINDS, polytope_dim

__all__ = [
    "arcface_loss", "center_loss", "contrastive_loss", "cosface_loss", "exponential_triplet_loss", "l2_softmax_loss",
    "lifted_structure_loss", "margin_loss", "mpa_loss", "multi_similarity_loss", "npairs_loss", "proxy_anchor_loss",
    "proxy_nca_loss", "proxy_repel_loss", "regular_polytope_loss", "soft_triple_loss", "sub_center_arcface_loss",
    "triplet_margin_loss",
]

PAIR_BACKENDS = ("auto", "reference")
STREAMED_PAIR_BACKENDS = ("auto", "reference", "chunked")  # the pair losses of `streamed_pairs`
MPA_VARIANTS = ("mpa", "dw", "ap")
REPEL_VARIANTS = ("proxies", "batch")
DISTANCES = ("cosine", "euclidean", "squared_euclidean")
MININGS = ("all", "semi-hard", "hard")


def _sample_rate(value, name):
    V.number(value, name, positive=True)
    if value > 1:
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")


def _degrees(value, name):
    V.number(value, name, nonnegative=True)
    if value >= 180:
        raise ValueError(f"{name} is in degrees and must be < 180, got {value!r}")


_POS = lambda v, n: V.number(v, n, positive=True)  # noqa: E731
_NONNEG = lambda v, n: V.number(v, n, nonnegative=True)  # noqa: E731
_RULES = {  # argument rules shared by the functions below and the modules' constructors
    "scale": _POS, "alpha": _POS, "la": _POS, "gamma": _POS, "overlap": _POS, "embedding_scale": _POS,
    "tau": _NONNEG, "l2_reg": _NONNEG, "epsilon": _NONNEG, "pos_coef": _NONNEG, "neg_coef": _NONNEG,
    "margin": V.number, "pos_margin": V.number, "neg_margin": V.number, "base": V.number,
    "centers_per_class": V.positive_int, "num_classes": V.positive_int, "sub_centers": V.positive_int,
    "mining": lambda v, n: V.choice(v, n, MININGS), "distance": lambda v, n: V.choice(v, n, DISTANCES),
    "polytope": lambda v, n: V.choice(v, n, KINDS),
    "backend": lambda v, n: V.choice(v, n, BACKENDS),
    "sample_rate": _sample_rate,
}
_PAIR_BACKEND = lambda v, n: V.choice(v, n, PAIR_BACKENDS)  # noqa: E731
_STREAMED_BACKEND = lambda v, n: V.choice(v, n, STREAMED_PAIR_BACKENDS)  # noqa: E731
_LOSS_RULES = {  # per loss, where an argument's rule differs from the shared one
    "mpa_loss": {"variant": lambda v, n: V.choice(v, n, MPA_VARIANTS)},
    "proxy_repel_loss": {"variant": lambda v, n: V.choice(v, n, REPEL_VARIANTS)},
    "arcface_loss": {"margin": _degrees},
    "sub_center_arcface_loss": {"margin": _degrees},
    "regular_polytope_loss": {"margin": lambda v, n: v == "max" or _degrees(v, n)},
    "center_loss": {"margin": _NONNEG, "backend": _PAIR_BACKEND},
    "multi_similarity_loss": {"beta": _POS, "backend": _STREAMED_BACKEND},
    "margin_loss": {"beta": lambda v, n: torch.is_tensor(v) or V.number(v, n), "backend": _STREAMED_BACKEND},
    **{name: {"backend": _STREAMED_BACKEND} for name in ("contrastive_loss", "lifted_structure_loss", "npairs_loss",
                                                         "triplet_margin_loss", "exponential_triplet_loss")},
}


def require_two_classes(num_classes: int, name: str, what: str) -> None:
    """Losses whose log-sum-exp over the other classes (ProxyNCA excluding the positive, MPA's C-) is empty with
    one class: ValueError naming `name` (the proxies, or a module's num_classes)."""
    if num_classes < 2:
        raise ValueError(f"{name} must cover at least 2 classes for {what} (the log-sum-exp over the other "
                         f"classes would be empty), got {num_classes}")


def check_arguments(loss: str, **arguments) -> None:
    """Validates the hyper-parameters of `loss` (a function name of this module; "" for the shared rules only):
    ValueError naming the argument. Tensors and arguments without a rule are checked where they are used."""
    rules = _LOSS_RULES.get(loss, {})
    for name, value in arguments.items():
        rule = rules.get(name, _RULES.get(name))
        if rule is not None:
            rule(value, name)


def _proxy_loss(reference_fn, fused_fn, backend, logits: int, embeddings, labels, *args, process_group=None,
                sample_rate=1.0, num_local=None, supported=BACKENDS, **kwargs):
    """reference_fn(embeddings, labels, *args, **kwargs), or fused_fn on the class_lse implementation of the chosen
    backend (among `supported`), for a loss whose reference would materialise `logits` values. Sharded over
    `process_group` (this rank's proxies hold `num_local` classes) or class-sampled, fused_fn composes
    `distributed`'s pieces, on the reference's materialised class_lse when the backend is "reference"."""
    if process_group is not None:
        logits *= dist.get_world_size(process_group)  # the gathered batch against this rank's classes
    chosen = resolve(backend, embeddings.device, logits, supported)
    if chosen == "reference" and process_group is None and sample_rate == 1:
        return reference_fn(embeddings, labels, *args, **kwargs)
    lse = reference.class_lse if chosen == "reference" else functools.partial(class_lse, impl=chosen)
    part = distributed.LOCAL
    out_dtype = result_dtype(embeddings)
    if process_group is not None:
        part = distributed.agree(process_group, embeddings, labels, num_local)
        embeddings, labels = part.gather(embeddings, labels)
    if chosen in ("chunked", "reference"):  # (compute in fp32 anyway: gradient terms summed in fp32, _numerics)
        (embeddings, *args), kwargs = to_compute_dtype((embeddings, *args), kwargs)
    lse = distributed.sampled(lse, sample_rate)
    return fused_fn(embeddings, labels, *args, **kwargs, lse=lse, part=part).to(out_dtype)


def _proxy_inputs(embeddings, labels, proxies, centers_per_class=1, name="proxies", process_group=None):
    """Validates a proxy loss's tensors; returns (labels as int64, number of classes of `proxies`). Sharded, the
    upper bound of the labels is checked by `distributed.agree` (every rank's classes count)."""
    V.embeddings(embeddings)
    V.positive_int(centers_per_class, "centers_per_class")
    if process_group is not None and torch.is_tensor(proxies) and proxies.dim() == 2 and proxies.shape[0] == 0:
        raise ValueError(f"{name} has no row on this rank: every rank of process_group must hold at least one "
                         f"class (fewer classes than ranks?)")
    num_classes = V.weights(proxies, embeddings.shape[1], embeddings.device, name, centers_per_class)
    bound = None if process_group is not None else num_classes
    return V.labels(labels, embeddings.shape[0], embeddings.device, bound), num_classes


def _two_classes(num_local, process_group, name, what):
    """require_two_classes on the number of classes, of which a sharded call knows a lower bound: every rank of
    the group holds at least one, and this one num_local."""
    world = 1 if process_group is None else dist.get_world_size(process_group)
    require_two_classes(max(num_local, world), name, what)


def _reference(embeddings, ref_emb, ref_labels, ref_self, num_classes):
    """The validated reference as keyword arguments of the reference losses ({} without one)."""
    if ref_emb is None and ref_labels is None:
        if ref_self is not None:
            raise ValueError("ref_self indexes rows of ref_emb: it needs ref_emb and ref_labels")
        return {}
    if ref_emb is None or ref_labels is None:
        missing = "ref_emb" if ref_emb is None else "ref_labels"
        raise ValueError(f"ref_emb and ref_labels must be given together (the reference rows and their labels); "
                         f"{missing} is None")
    V.embeddings(ref_emb, "ref_emb")
    if ref_emb.shape[1] != embeddings.shape[1] or ref_emb.device != embeddings.device:
        raise ValueError(f"ref_emb must have the embeddings' width {embeddings.shape[1]} and device "
                         f"{embeddings.device}, got shape {tuple(ref_emb.shape)} on {ref_emb.device}")
    ref_labels = V.labels(ref_labels, ref_emb.shape[0], embeddings.device, num_classes, "ref_labels")
    if ref_self is not None:
        V.tensor(ref_self, "ref_self")
        if ref_self.is_floating_point() or ref_self.is_complex() or ref_self.dtype == torch.bool:
            raise TypeError(f"ref_self must be an integer tensor, got dtype {ref_self.dtype}")
        if ref_self.shape != (embeddings.shape[0],) or ref_self.device != embeddings.device:
            raise ValueError(f"ref_self must have shape [{embeddings.shape[0]}] (one row of ref_emb per embedding) "
                             f"on {embeddings.device}, got {tuple(ref_self.shape)} on {ref_self.device}")
        ref_self = ref_self.long()
        V.require(ref_self < ref_emb.shape[0], f"ref_self must index rows of ref_emb (< {ref_emb.shape[0]})")
    return {"ref_emb": ref_emb, "ref_labels": ref_labels, "ref_self": ref_self}


def _pair_inputs(embeddings, labels, backend, ref_emb, ref_labels, ref_self, num_classes=None,
                 supported=PAIR_BACKENDS):
    """Validates a pair loss's tensors; returns (labels as int64, the reference's keyword arguments)."""
    V.embeddings(embeddings)
    resolve(backend, embeddings.device, 0, supported)
    labels = V.labels(labels, embeddings.shape[0], embeddings.device, num_classes)
    return labels, _reference(embeddings, ref_emb, ref_labels, ref_self, num_classes)


def _pair_loss(fn, embeddings, labels, reference_kwargs, backend="auto", process_group=None, label_bound=None,
               streamed=None, **kwargs):
    """fn(embeddings, labels, **reference_kwargs, **kwargs), or `streamed` (the same loss streamed over blocks of
    the reference) when the backend resolves to "chunked" for the [N, M] similarities. Over a process group, on the
    gathered batch (and reference) with this rank's rows as the anchors (`reference.pair.Anchors`) and the tensors
    that require grad (replicated parameters) made to receive the gradient of every rank's anchors."""
    ref = dict(reference_kwargs)
    anchors = None
    if process_group is not None:
        part = distributed.agree(process_group, embeddings, labels, num_classes=label_bound)
        embeddings, labels = part.gather(embeddings, labels)
        if ref:
            ref_part = distributed.agree(process_group, ref["ref_emb"], ref["ref_labels"], num_classes=label_bound)
            own = ref["ref_self"]
            ref["ref_emb"], ref["ref_labels"] = ref_part.gather(ref["ref_emb"], ref["ref_labels"])
            ref["ref_self"] = None if own is None else ref_part.gather_index(own)
        kwargs = {k: part.replicated(v) if torch.is_tensor(v) and v.requires_grad else v for k, v in kwargs.items()}
        anchors = part.anchors()
    supported = PAIR_BACKENDS if streamed is None else STREAMED_PAIR_BACKENDS
    rows = embeddings.shape[0] if anchors is None else anchors.stop - anchors.start
    candidates = (ref["ref_emb"] if ref else embeddings).shape[0]
    if resolve(backend, embeddings.device, rows * candidates, supported) == "chunked":
        fn = streamed
    return fn(embeddings, labels, **ref, **kwargs, anchors=anchors)


def proxy_nca_loss(embeddings, labels, proxies, scale=2.0, exclude_positive=True, backend="auto",
                   process_group=None, sample_rate=1.0):
    """ProxyNCA (K = 1): mean_i [-s S_iy + LSE_{c != y_i} s S_ic] (plain softmax CE if not exclude_positive)."""
    with distributed.agreement(process_group):
        labels, c = _proxy_inputs(embeddings, labels, proxies, process_group=process_group)
        check_arguments("proxy_nca_loss", scale=scale, sample_rate=sample_rate)
        if exclude_positive:
            _two_classes(c, process_group, "proxies", "proxy_nca_loss with exclude_positive=True")
    return _proxy_loss(reference.proxy_nca_loss, fused.proxy_nca_loss, backend, embeddings.shape[0] * c,
                       embeddings, labels, proxies, scale=scale, exclude_positive=bool(exclude_positive),
                       process_group=process_group, sample_rate=sample_rate, num_local=c)


def proxy_anchor_loss(embeddings, labels, proxies, margin=0.1, alpha=32.0, backend="auto", process_group=None):
    """ProxyAnchor (K = 1), negative term averaged over all C classes."""
    with distributed.agreement(process_group):
        labels, c = _proxy_inputs(embeddings, labels, proxies, process_group=process_group)
        check_arguments("proxy_anchor_loss", margin=margin, alpha=alpha)
    return _proxy_loss(reference.proxy_anchor_loss, fused.proxy_anchor_loss, backend, embeddings.shape[0] * c,
                       embeddings, labels, proxies, margin=margin, alpha=alpha, process_group=process_group,
                       num_local=c)


def soft_triple_loss(embeddings, labels, proxies, centers_per_class=10, la=20.0, gamma=0.1, margin=0.01, tau=0.2,
                     backend="auto", process_group=None, sample_rate=1.0):
    """SoftTriple: mean_i CE(la (S_i - margin onehot(y_i)), y_i) + tau R(W); proxies [C*K, D]."""
    with distributed.agreement(process_group):
        labels, c = _proxy_inputs(embeddings, labels, proxies, centers_per_class, process_group=process_group)
        check_arguments("soft_triple_loss", la=la, gamma=gamma, margin=margin, tau=tau, sample_rate=sample_rate)
    return _proxy_loss(reference.soft_triple_loss, fused.soft_triple_loss, backend,
                       embeddings.shape[0] * proxies.shape[0],
                       embeddings, labels, proxies, centers_per_class=centers_per_class, la=la, gamma=gamma,
                       margin=margin, tau=tau, process_group=process_group, sample_rate=sample_rate, num_local=c)


def mpa_loss(embeddings, labels, proxies, centers_per_class=10, alpha=32.0, margin=0.1, gamma=0.1, tau=0.2,
             variant="mpa", backend="auto", process_group=None, sample_rate=1.0):
    """Multi-Proxy Anchor family: variant "mpa" (class-wise), "dw" (data-wise), "ap" (all pairs); sample_rate < 1
    for the data-wise variants only."""
    with distributed.agreement(process_group):
        labels, c = _proxy_inputs(embeddings, labels, proxies, centers_per_class, process_group=process_group)
        check_arguments("mpa_loss", alpha=alpha, margin=margin, gamma=gamma, tau=tau, variant=variant,
                        sample_rate=sample_rate)
        if variant == "mpa":
            _two_classes(c, process_group, "proxies", "mpa_loss with variant='mpa'")
            if sample_rate != 1:
                raise ValueError(f"sample_rate must be 1 for variant='mpa' (class sampling applies to the data-wise "
                                 f"variants 'dw' and 'ap'), got {sample_rate!r}")
    return _proxy_loss(reference.mpa_loss, fused.mpa_loss, backend, embeddings.shape[0] * proxies.shape[0],
                       embeddings, labels, proxies, centers_per_class=centers_per_class, alpha=alpha,
                       margin=margin, gamma=gamma, tau=tau, variant=variant, process_group=process_group,
                       sample_rate=sample_rate, num_local=c)


def arcface_loss(embeddings, labels, weight, margin=28.6, scale=64.0, backend="auto", process_group=None,
                 sample_rate=1.0):
    """ArcFace: additive angular margin (degrees) on the target logit; weight [C, D]."""
    with distributed.agreement(process_group):
        labels, c = _proxy_inputs(embeddings, labels, weight, name="weight", process_group=process_group)
        check_arguments("arcface_loss", margin=margin, scale=scale, sample_rate=sample_rate)
    return _proxy_loss(reference.arcface_loss, fused.arcface_loss, backend, embeddings.shape[0] * c,
                       embeddings, labels, weight, margin=margin, scale=scale, process_group=process_group,
                       sample_rate=sample_rate, num_local=c)


def sub_center_arcface_loss(embeddings, labels, proxies, sub_centers=3, margin=28.6, scale=64.0, backend="auto",
                            process_group=None, sample_rate=1.0):
    """Sub-centre ArcFace: ArcFace (margin in degrees) on the max cosine over each class's K = sub_centers
    sub-centres; proxies [C*K, D]; every backend."""
    with distributed.agreement(process_group):
        check_arguments("sub_center_arcface_loss", sub_centers=sub_centers, margin=margin, scale=scale,
                        sample_rate=sample_rate)
        labels, c = _proxy_inputs(embeddings, labels, proxies, sub_centers, process_group=process_group)
    return _proxy_loss(reference.sub_center_arcface_loss, fused.sub_center_arcface_loss, backend,
                       embeddings.shape[0] * proxies.shape[0], embeddings, labels, proxies, sub_centers=sub_centers,
                       margin=margin, scale=scale, process_group=process_group, sample_rate=sample_rate,
                       num_local=c)


def cosface_loss(embeddings, labels, weight, margin=0.35, scale=64.0, backend="auto", process_group=None,
                 sample_rate=1.0):
    """CosFace: additive cosine margin on the target logit; weight [C, D]."""
    with distributed.agreement(process_group):
        labels, c = _proxy_inputs(embeddings, labels, weight, name="weight", process_group=process_group)
        check_arguments("cosface_loss", margin=margin, scale=scale, sample_rate=sample_rate)
    return _proxy_loss(reference.cosface_loss, fused.cosface_loss, backend, embeddings.shape[0] * c,
                       embeddings, labels, weight, margin=margin, scale=scale, process_group=process_group,
                       sample_rate=sample_rate, num_local=c)


def l2_softmax_loss(embeddings, labels, weight, bias=None, scale=16.0, normalize_weights=False, backend="auto",
                    process_group=None, sample_rate=1.0):
    """L2-constrained softmax: CE((s x̂) Wᵀ + b); weight [C, D] unnormalised unless normalize_weights; bias [C]
    (sharded: this rank's rows of both)."""
    with distributed.agreement(process_group):
        labels, c = _proxy_inputs(embeddings, labels, weight, name="weight", process_group=process_group)
        check_arguments("l2_softmax_loss", scale=scale, sample_rate=sample_rate)
        if bias is not None:
            V.tensor(bias, "bias")
            if bias.shape != (c,) or not bias.is_floating_point() or bias.device != embeddings.device:
                raise ValueError(f"bias must be a floating tensor of shape [{c}] on {embeddings.device}, "
                                 f"got {tuple(bias.shape)} {bias.dtype} on {bias.device}")
    return _proxy_loss(reference.l2_softmax_loss, fused.l2_softmax_loss, backend, embeddings.shape[0] * c,
                       embeddings, labels, weight, bias=bias, scale=scale,
                       normalize_weights=bool(normalize_weights), process_group=process_group,
                       sample_rate=sample_rate, num_local=c)


def regular_polytope_loss(embeddings, labels, num_classes, polytope="simplex", scale=30.0, margin="max",
                          backend="auto", process_group=None, sample_rate=1.0):
    """Margin-RePoNet: ArcFace on x̂ with the fixed polytope weights; margin "max" (the polytope's angle φ) or a
    number in degrees. The embedding width must be the polytope's dimension. Sharded, each rank uses the rows of
    its `distributed.class_range`."""
    with distributed.agreement(process_group):
        V.embeddings(embeddings)
        check_arguments("regular_polytope_loss", num_classes=num_classes, polytope=polytope, scale=scale,
                        margin=margin, sample_rate=sample_rate)
        d = polytope_dim(polytope, num_classes)  # raises for num_classes < 2
        if embeddings.shape[1] != d:
            raise ValueError(f"embeddings must have width {d} for a {polytope} of {num_classes} classes, "
                             f"got {embeddings.shape[1]}")
        labels = V.labels(labels, embeddings.shape[0], embeddings.device, num_classes)
        start, stop = distributed.module_class_range(num_classes, process_group)
    return _proxy_loss(reference.regular_polytope_loss, fused.regular_polytope_loss, backend,
                       embeddings.shape[0] * (stop - start),
                       embeddings, labels, num_classes, polytope=polytope, scale=scale, margin=margin,
                       process_group=process_group, sample_rate=sample_rate, num_local=stop - start)


def proxy_repel_loss(embeddings, labels, proxies, alpha=32.0, margin=0.1, variant="proxies", backend="auto",
                     process_group=None):
    """Proxy-repel (thesis eqs. 6.1 / 6.2): variant "proxies" or "batch"; proxies [C, D]."""
    with distributed.agreement(process_group):
        labels, c = _proxy_inputs(embeddings, labels, proxies, process_group=process_group)
        check_arguments("proxy_repel_loss", alpha=alpha, margin=margin, variant=variant)
    return _proxy_loss(reference.proxy_repel_loss, fused.proxy_repel_loss, backend,
                       max(embeddings.shape[0], c) * c,
                       embeddings, labels, proxies, alpha=alpha, margin=margin, variant=variant,
                       process_group=process_group, num_local=c)


def contrastive_loss(embeddings, labels, pos_margin=1.0, neg_margin=0.5, backend="auto", process_group=None,
                     ref_emb=None, ref_labels=None, ref_self=None):
    """Contrastive on cosine similarities: mean [m_pos - S]₊ over positive pairs + mean [S - m_neg]₊ over negatives."""
    with distributed.agreement(process_group):
        labels, ref = _pair_inputs(embeddings, labels, backend, ref_emb, ref_labels, ref_self,
                                   supported=STREAMED_PAIR_BACKENDS)
        check_arguments("contrastive_loss", pos_margin=pos_margin, neg_margin=neg_margin)
    return _pair_loss(reference.contrastive_loss, embeddings, labels, ref, backend, process_group,
                      streamed=streamed_pairs.contrastive_loss, pos_margin=pos_margin, neg_margin=neg_margin)


def triplet_margin_loss(embeddings, labels, margin=0.1, distance="cosine", mining="all", backend="auto",
                        process_group=None, ref_emb=None, ref_labels=None, ref_self=None):
    """Triplet margin loss with "all", "semi-hard" or "hard" mining; distance "cosine", "euclidean",
    "squared_euclidean" (on x̂)."""
    with distributed.agreement(process_group):
        labels, ref = _pair_inputs(embeddings, labels, backend, ref_emb, ref_labels, ref_self,
                                   supported=STREAMED_PAIR_BACKENDS)
        check_arguments("triplet_margin_loss", margin=margin, distance=distance, mining=mining)
    return _pair_loss(reference.triplet_margin_loss, embeddings, labels, ref, backend, process_group,
                      streamed=streamed_pairs.triplet_margin_loss, margin=margin, distance=distance, mining=mining)


def lifted_structure_loss(embeddings, labels, margin=0.5, backend="auto", process_group=None, ref_emb=None,
                          ref_labels=None, ref_self=None):
    """Generalised lifted structure loss (thesis eq. 2.21)."""
    with distributed.agreement(process_group):
        labels, ref = _pair_inputs(embeddings, labels, backend, ref_emb, ref_labels, ref_self,
                                   supported=STREAMED_PAIR_BACKENDS)
        check_arguments("lifted_structure_loss", margin=margin)
    return _pair_loss(reference.lifted_structure_loss, embeddings, labels, ref, backend, process_group,
                      streamed=streamed_pairs.lifted_structure_loss, margin=margin)


def npairs_loss(embeddings, labels, l2_reg=0.02, backend="auto", process_group=None, ref_emb=None, ref_labels=None,
                ref_self=None):
    """N-pair loss on raw dot products plus l2_reg * mean ‖x‖² (over the embeddings, not the reference)."""
    with distributed.agreement(process_group):
        labels, ref = _pair_inputs(embeddings, labels, backend, ref_emb, ref_labels, ref_self,
                                   supported=STREAMED_PAIR_BACKENDS)
        check_arguments("npairs_loss", l2_reg=l2_reg)
    return _pair_loss(reference.npairs_loss, embeddings, labels, ref, backend, process_group,
                      streamed=streamed_pairs.npairs_loss, l2_reg=l2_reg)


def margin_loss(embeddings, labels, margin=0.2, beta=1.2, generator=None, backend="auto", process_group=None,
                ref_emb=None, ref_labels=None, ref_self=None):
    """Margin loss with distance-weighted negative sampling; beta a float, a 0-d tensor (one learnable beta) or a
    per-class Tensor[C]. Sharded, every rank draws the [N, M] uniform matrix of the whole batch and uses its rows:
    with the generators (or the global RNGs) of all ranks in the same state the draws are those of one process."""
    with distributed.agreement(process_group):
        V.embeddings(embeddings)
        check_arguments("margin_loss", margin=margin, beta=beta)
        num_classes = None
        if torch.is_tensor(beta):
            if beta.dim() > 1 or not beta.is_floating_point() or beta.device != embeddings.device:
                raise ValueError(f"beta must be a float, or a floating 0-d or per-class 1-D tensor on "
                                 f"{embeddings.device}, got shape {tuple(beta.shape)} {beta.dtype} on {beta.device}")
            num_classes = beta.shape[0] if beta.dim() == 1 else None
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        labels, ref = _pair_inputs(embeddings, labels, backend, ref_emb, ref_labels, ref_self, num_classes,
                                   STREAMED_PAIR_BACKENDS)
    return _pair_loss(reference.margin_loss, embeddings, labels, ref, backend, process_group, num_classes,
                      streamed=streamed_pairs.margin_loss, margin=margin, beta=beta, generator=generator)


def multi_similarity_loss(embeddings, labels, alpha=2.0, beta=50.0, base=0.5, epsilon=0.1, backend="auto",
                          process_group=None, ref_emb=None, ref_labels=None, ref_self=None):
    """Multi-Similarity loss with its pair mining."""
    with distributed.agreement(process_group):
        labels, ref = _pair_inputs(embeddings, labels, backend, ref_emb, ref_labels, ref_self,
                                   supported=STREAMED_PAIR_BACKENDS)
        check_arguments("multi_similarity_loss", alpha=alpha, beta=beta, base=base, epsilon=epsilon)
    return _pair_loss(reference.multi_similarity_loss, embeddings, labels, ref, backend, process_group,
                      streamed=streamed_pairs.multi_similarity_loss, alpha=alpha, beta=beta, base=base,
                      epsilon=epsilon)


def exponential_triplet_loss(embeddings, labels, num_classes, overlap=1.2, distance="cosine", embedding_scale=1.0,
                             pos_coef=1.0, neg_coef=1.0, backend="auto", process_group=None, ref_emb=None,
                             ref_labels=None, ref_self=None):
    """Exponential triplet loss (Urtans et al.), batch-hard; num_classes = number of training classes."""
    with distributed.agreement(process_group):
        check_arguments("exponential_triplet_loss", num_classes=num_classes, overlap=overlap, distance=distance,
                        embedding_scale=embedding_scale, pos_coef=pos_coef, neg_coef=neg_coef)
        labels, ref = _pair_inputs(embeddings, labels, backend, ref_emb, ref_labels, ref_self, num_classes,
                                   STREAMED_PAIR_BACKENDS)
    return _pair_loss(reference.exponential_triplet_loss, embeddings, labels, ref, backend, process_group,
                      streamed=streamed_pairs.exponential_triplet_loss, num_classes=num_classes, overlap=overlap,
                      distance=distance, embedding_scale=embedding_scale, pos_coef=pos_coef, neg_coef=neg_coef)


def center_loss(embeddings, labels, centers, margin=0.0, backend="auto", process_group=None):
    """Center loss with margin: mean_i [‖x_i − c_{y_i}‖² − margin]₊; centers [C, D] (the same on every rank of a
    process group) receive no gradient."""
    with distributed.agreement(process_group):
        V.embeddings(embeddings)
        num_classes = V.weights(centers, embeddings.shape[1], embeddings.device, "centers")
        labels, _ = _pair_inputs(embeddings, labels, backend, None, None, None, num_classes)
        check_arguments("center_loss", margin=margin)
    return _pair_loss(reference.center_loss, embeddings, labels, {}, backend, process_group, num_classes,
                      centers=centers, margin=margin)
