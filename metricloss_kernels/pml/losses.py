"""pytorch-metric-learning's proxy and classification losses on metricloss_kernels' streaming kernels.

Each class subclasses PML's class of the same name and overrides only `compute_loss`: the constructor, the
parameters (names, shapes, initialisation), the state_dict, distance, reducer, regularisers, `get_logits()`, the
move of the weights to the input's device, and every error are PML's. When the configuration is one that
metricloss_kernels computes exactly, the loss is `metricloss_kernels.functional.<loss>(..., backend=loss.backend)`
(backend "auto": Triton for CUDA tensors; on CPU the chunked streaming backend once the N x C logits would exceed
64 MiB, the reference below that), so the N x C similarity matrix is never held; otherwise PML's own compute_loss runs,
and the first such call of each instance warns (a UserWarning with the reason).

Accelerated configurations (anything else falls back to PML's code; `loss.fallback_reason` says why):

    class                  PML configuration                                computed as (metricloss_kernels.functional)
    ProxyAnchorLoss        cosine distance, default reducer (DivisorReducer) proxy_anchor_loss(margin, alpha)
    ProxyNCALoss           LpDistance(power=2) (the default) or cosine       proxy_nca_loss(scale=2*softmax_scale, or
                           distance, MeanReducer, no underflow (below)        softmax_scale for cosine; positive
                                                                             included)
    SoftTripleLoss         cosine distance, MeanReducer                      soft_triple_loss(la, gamma, margin, tau=0)
    ArcFaceLoss            cosine distance, MeanReducer, margin in [0, 180)  arcface_loss(margin in degrees, scale)
    SubCenterArcFaceLoss   as ArcFaceLoss (any sub_centers)                  sub_center_arcface_loss(sub_centers,
                                                                              margin in degrees, scale)
    CosFaceLoss            cosine distance, MeanReducer                      cosface_loss(margin, scale)
    NormalizedSoftmaxLoss  cosine distance (the default                      l2_softmax_loss(scale=1/temperature,
                           DotProductSimilarity normalises), MeanReducer      normalize_weights=True)

"cosine distance": CosineSimilarity() or DotProductSimilarity(normalize_embeddings=True), with p=2 and power=1.
Every configuration also needs collect_stats off (loss, distance, reducer) and hyper-parameters that the functional
accepts (e.g. alpha > 0, temperature > 0). A call falls back when it has a miner's `indices_tuple` (per-sample
weights), `ref_emb`, no labels, labels that are not a 1-D int64 tensor, or embeddings that are not a non-empty 2-D
floating tensor. ProxyNCALoss also needs 2 s + ln C < -ln(finfo(dtype).tiny) (s the cosine scale): beyond that, PML
drops the samples whose target probability underflows to 0, which the kernels do not. The decision reads shapes,
dtypes and attributes only, never tensor values (no host synchronisation on CUDA).

Labels outside [0, num_classes) in an accelerated call are therefore rejected by metricloss_kernels.functional's
check, not by PML's code: eagerly on CPU a ValueError "labels must be in [0, num_classes = C), got values from a to
b"; on CUDA and under torch.compile a RuntimeError "labels must be in [0, num_classes = C)" from torch._assert_async
(on CUDA a device-side assert, reported at a later synchronisation and fatal to the CUDA context, as cross_entropy's
is). PML itself raises a RuntimeError (ProxyAnchorLoss's one_hot) or an IndexError (the others), and its
ProxyNCALoss accepts such labels without an error.

PML's semantics, kept: ProxyNCA is a softmax over all proxies (the positive included) of -softmax_scale ||x^ - w^||^2,
i.e. cross-entropy on 2 softmax_scale cos; SoftTriple has no built-in regulariser (PML's SparseCentersRegularizer is a
weight_regularizer); ArcFace's margin is in degrees. Regularisers are PML's code, given the same weights as in PML
([C*K, D] views of `proxies`, `fc` or `W`). Differences: ArcFace clamps the target cosine to [-1 + 1e-7, 1 - 1e-7]
(PML clamps to [-1, 1], where the gradient of acos is infinite), so values differ for a target cosine within 1e-7 of
+-1. Dtypes, on both paths: the parameters keep theirs (PML casts them to the embeddings' dtype in place, for good:
after one fp16 call an fp32 model trains fp16 weights). The embeddings are cast to the parameters' dtype instead
(fp32 master weights: the loss is computed and returned in fp32, fp16/bf16 embeddings get their gradient in their
own dtype through the cast; fp64 embeddings need an fp64 module for an fp64 loss), and the accelerated path
computes half precision in fp32 whatever the parameters' dtype; results agree with PML's to the lower dtype's
rounding, not bit for bit. PML's own tests that compute their expected value from the weights after a call in
another dtype (assuming PML's cast) fail for that reason alone. The accelerated ProxyAnchorLoss hands its reducer
the sum of its two terms as one already-reduced "pos_loss" entry instead of "pos_loss" and "neg_loss"; the reduced
value is the same.
"""
import math
import warnings

import torch
from pytorch_metric_learning import losses as pml
from pytorch_metric_learning.distances import CosineSimilarity, DotProductSimilarity, LpDistance
from pytorch_metric_learning.reducers import DivisorReducer, MeanReducer, MultipleReducers

from .. import functional as F


def _is_cosine(distance) -> bool:
    """The distance is the dot product of L2-normalised vectors (PML's CosineSimilarity and its defaults)."""
    return (type(distance) in (CosineSimilarity, DotProductSimilarity) and distance.normalize_embeddings
            and distance.p == 2 and distance.power == 1)


class _Accelerated:
    """Mixin placed before a PML loss class: `compute_loss` runs `_functional` (a metricloss_kernels.functional
    loss) when `_call_reason` finds nothing against it, else PML's `compute_loss`.

    Subclasses set `_functional = staticmethod(F.<loss>)` and override `_arguments()` (the functional's
    hyper-parameters) and, where they differ from the defaults below, `_weights()`, `_centers()`, `_num_classes()`,
    `_loss_reason()`.
    """
    _functional: staticmethod  # the metricloss_kernels.functional loss (tests wrap it here to see the calls)
    _reducers = {"loss": MeanReducer}  # PML's loss-dict entries -> the reducer type the accelerated value stands for
    _key = "loss"  # the entry that holds the accelerated (already reduced) value

    def __init__(self, *args, backend="auto", **kwargs):
        F.check_arguments("", backend=backend)
        super().__init__(*args, **kwargs)
        self.backend = backend
        self._warned = False  # a fallback warns once per instance

    # -- what a subclass describes
    def _weights(self) -> torch.Tensor:
        """The weights as [C*K, D], class-major (the tensor PML hands its weight_regularizer)."""
        return self.W.t()

    def _centers(self) -> int:
        return 1

    def _num_classes(self) -> int:
        return self.num_classes

    def _arguments(self) -> dict:
        raise NotImplementedError

    def _loss_reason(self) -> str | None:
        if not _is_cosine(self.distance):
            return f"distance {type(self.distance).__name__} is not the cosine similarity of normalised vectors"
        return None

    def _input_reason(self, embeddings: torch.Tensor, num_classes: int) -> str | None:
        return None

    # -- the decision
    def _reducer_reason(self) -> str | None:
        reducer = self.reducer
        if len(self._reducers) > 1 and type(reducer) is not MultipleReducers:
            return f"reducer {type(reducer).__name__} (accelerated: PML's default)"
        for key, kind in self._reducers.items():
            sub = reducer
            if isinstance(reducer, MultipleReducers):
                sub = reducer.reducers[key] if key in reducer.reducers else reducer.default_reducer
            if type(sub) is not kind:
                return (f"reducer {type(sub).__name__} for {key!r} needs per-element losses "
                        f"(accelerated: {kind.__name__})")
        return None

    @property
    def fallback_reason(self) -> str | None:
        """Why this configuration runs PML's own code; None when it runs on metricloss_kernels' kernels."""
        if any(getattr(m, "collect_stats", False) for m in (self, self.distance, *self.reducer.modules())):
            return "collect_stats is on (PML's statistics need the full similarity matrix)"
        reason = self._loss_reason() or self._reducer_reason()
        if reason:
            return reason
        try:
            F.check_arguments(self._functional.__name__, **self._arguments())
        except ValueError as error:
            return f"{error} (outside what metricloss_kernels.functional.{self._functional.__name__} accepts)"
        return None

    @property
    def accelerated(self) -> bool:
        """True when calls without a miner's indices_tuple, with 1-D int64 labels, run on metricloss_kernels'
        kernels (see the module docstring)."""
        return self.fallback_reason is None

    def _call_reason(self, embeddings, labels, indices_tuple, ref_emb, ref_labels) -> str | None:
        reason = self.fallback_reason
        if reason:
            return reason
        if labels is None or indices_tuple is not None or ref_emb is not embeddings or ref_labels is not labels:
            return "labels missing, a miner's indices_tuple, or ref_emb"
        if not (torch.is_tensor(embeddings) and embeddings.is_floating_point() and embeddings.dim() == 2
                and embeddings.shape[0] > 0):
            return "embeddings are not a non-empty 2-D floating tensor"
        num_classes, weights = self._num_classes(), self._weights()
        if weights.shape != (num_classes * self._centers(), embeddings.shape[1]):
            return f"weights of shape {tuple(weights.shape)} do not match num_classes and the embedding size"
        if labels.dtype != torch.long or labels.dim() != 1:
            return "labels are not a 1-D int64 tensor"
        return self._input_reason(embeddings, num_classes)

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        # The weights keep their dtype and the embeddings take it (see the module docstring), so that PML's
        # cast_types, here and in its own compute_loss, only moves the weights to the embeddings' device.
        dtype = self._weights().dtype
        if torch.is_tensor(embeddings) and embeddings.is_floating_point() and embeddings.dtype != dtype:
            same = ref_emb is embeddings
            embeddings = embeddings.to(dtype)
            ref_emb = embeddings if same else ref_emb
        reason = self._call_reason(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        if reason is not None:
            if not self._warned:
                self._warned = True
                warnings.warn(f"{type(self).__name__} runs pytorch-metric-learning's own code, not "
                              f"metricloss_kernels': {reason}", UserWarning, stacklevel=5)
            return super().compute_loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        self.cast_types(dtype, embeddings.device)  # PML's: here the device only
        weights = self._weights()
        with torch.autocast(embeddings.device.type, enabled=False):  # the kernels set their own precision
            loss = self._functional(embeddings, labels, weights, **self._arguments(), backend=self.backend)
        loss_dict = {self._key: {"losses": loss, "indices": None, "reduction_type": "already_reduced"}}
        self.add_weight_regularization_to_loss_dict(loss_dict, weights)
        return loss_dict


class ProxyAnchorLoss(_Accelerated, pml.ProxyAnchorLoss):
    """PML's ProxyAnchorLoss (proxies [C, D]) on `functional.proxy_anchor_loss`; extra argument `backend`."""
    _functional = staticmethod(F.proxy_anchor_loss)
    _reducers = {"pos_loss": DivisorReducer, "neg_loss": DivisorReducer}
    _key = "pos_loss"

    def _weights(self):
        return self.proxies

    def _arguments(self):
        return {"margin": self.margin, "alpha": self.alpha}


class ProxyNCALoss(_Accelerated, pml.ProxyNCALoss):
    """PML's ProxyNCALoss (proxies [C, D]) on `functional.proxy_nca_loss`; extra argument `backend`."""
    _functional = staticmethod(F.proxy_nca_loss)

    def _weights(self):
        return self.proxies

    def _num_classes(self):
        return self.proxies.shape[0]  # PML's ProxyNCALoss leaves its num_classes attribute at 0

    def _squared_euclidean(self) -> bool:
        d = self.distance
        return type(d) is LpDistance and d.normalize_embeddings and d.p == 2 and d.power == 2

    def _loss_reason(self):
        if self._squared_euclidean():
            return None
        return super()._loss_reason()

    def _arguments(self):
        # -s ||x^ - w^||^2 = 2 s cos - 2 s, and the softmax ignores the constant
        factor = 2 if self._squared_euclidean() else 1
        return {"scale": factor * self.softmax_scale, "exclude_positive": False}

    def _input_reason(self, embeddings, num_classes):
        # the target probability is at least exp(-2 s) / C: PML's exp != 0 filter then keeps every sample
        if 2 * self._arguments()["scale"] + math.log(num_classes) >= -math.log(torch.finfo(embeddings.dtype).tiny):
            return f"softmax_scale too large for {embeddings.dtype}: PML drops samples whose probability underflows"
        return None


class SoftTripleLoss(_Accelerated, pml.SoftTripleLoss):
    """PML's SoftTripleLoss (fc [D, C*K]) on `functional.soft_triple_loss` with tau=0; extra argument `backend`."""
    _functional = staticmethod(F.soft_triple_loss)

    def _weights(self):
        return self.fc.t()

    def _centers(self):
        return self.centers_per_class

    def _arguments(self):
        return {"centers_per_class": self.centers_per_class, "la": self.la, "gamma": 1.0 / self.gamma,
                "margin": self.margin, "tau": 0.0}  # PML stores 1 / gamma


class ArcFaceLoss(_Accelerated, pml.ArcFaceLoss):
    """PML's ArcFaceLoss (W [D, C]) on `functional.arcface_loss`; extra argument `backend`."""
    _functional = staticmethod(F.arcface_loss)

    def _arguments(self):
        return {"margin": math.degrees(self.margin), "scale": self.scale}  # PML stores the margin in radians


class SubCenterArcFaceLoss(ArcFaceLoss, pml.SubCenterArcFaceLoss):
    """PML's SubCenterArcFaceLoss (W [D, C*sub_centers], class-major columns) on
    `functional.sub_center_arcface_loss`; extra argument `backend`."""
    _functional = staticmethod(F.sub_center_arcface_loss)

    def _centers(self):
        return self.sub_centers

    def _arguments(self):
        return {"sub_centers": self.sub_centers, **super()._arguments()}


class CosFaceLoss(_Accelerated, pml.CosFaceLoss):
    """PML's CosFaceLoss (W [D, C]) on `functional.cosface_loss`; extra argument `backend`."""
    _functional = staticmethod(F.cosface_loss)

    def _arguments(self):
        return {"margin": self.margin, "scale": self.scale}


class NormalizedSoftmaxLoss(_Accelerated, pml.NormalizedSoftmaxLoss):
    """PML's NormalizedSoftmaxLoss (W [D, C]) on `functional.l2_softmax_loss` (NormFace: normalised W, no bias,
    scale 1 / temperature); extra argument `backend`."""
    _functional = staticmethod(F.l2_softmax_loss)

    def _num_classes(self):
        return self.W.shape[1]  # PML's NormalizedSoftmaxLoss leaves its num_classes attribute at 0

    def _loss_reason(self):
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
            return f"temperature {t!r} is not a positive number"
        return super()._loss_reason()

    def _arguments(self):
        return {"scale": 1.0 / self.temperature, "normalize_weights": True}
