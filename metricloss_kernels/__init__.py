"""metricloss_kernels: deep-metric-learning losses with fused kernels, exact retrieval and its metrics."""
from . import functional, metrics
from ._backend import backends
from .losses import (ArcFaceLoss, CenterLoss, ContrastiveLoss, CosFaceLoss, ExponentialTripletLoss,
                     L2SoftmaxLoss, LiftedStructureLoss, MarginLoss, MPALoss, MultiSimilarityLoss, NPairsLoss,
                     ProxyAnchorLoss, ProxyNCALoss, ProxyRepelLoss, RegularPolytopeLoss, SoftTripleLoss,
                     SubCenterArcFaceLoss, TripletMarginLoss, WeightedSumLoss)
from .memory import CrossBatchMemory
from .metrics import evaluate
from .normalize import unit_bounce, unit_range
from .polytopes import polytope_margin, regular_polytope
from .retrieval import has_extension, knn
from .samplers import MPerClassSampler

__version__ = "0.1.0"

__all__ = [
    "ArcFaceLoss", "CenterLoss", "ContrastiveLoss", "CosFaceLoss", "CrossBatchMemory", "ExponentialTripletLoss",
    "L2SoftmaxLoss", "LiftedStructureLoss", "MarginLoss", "MPALoss", "MPerClassSampler", "MultiSimilarityLoss",
    "NPairsLoss", "ProxyAnchorLoss", "ProxyNCALoss", "ProxyRepelLoss", "RegularPolytopeLoss", "SoftTripleLoss",
    "SubCenterArcFaceLoss", "TripletMarginLoss", "WeightedSumLoss", "backends", "evaluate", "functional",
    "has_extension", "knn", "metrics", "polytope_margin", "regular_polytope", "unit_bounce", "unit_range",
]
