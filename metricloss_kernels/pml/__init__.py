"""An accelerated drop-in for pytorch-metric-learning (PML): its class names, arguments, parameters and state_dicts,
with the losses on metricloss_kernels' streaming kernels and retrieval accuracy on the exact kNN op.

    from metricloss_kernels.pml import ProxyAnchorLoss      # was: from pytorch_metric_learning.losses import ...
    from metricloss_kernels.pml import AccuracyCalculator
    # was: from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

Every loss class subclasses PML's class of the same name (PML >= 2.0 must be installed: it is an optional dependency
of metricloss_kernels, imported only by this subpackage). See `losses` for which configurations run on the kernels
(`loss.accelerated`, `loss.fallback_reason`) and `accuracy` for the calculator. `CrossBatchMemory` is
metricloss_kernels.CrossBatchMemory: PML's constructor arguments (loss, embedding_size, memory_size; no miner),
semantics and buffer names, wrapping metricloss_kernels' pair losses (ContrastiveLoss, TripletMarginLoss,
MultiSimilarityLoss, ...), not PML's; PML's own losses keep PML's CrossBatchMemory.
"""
try:
    import pytorch_metric_learning  # noqa: F401
except ImportError as error:
    raise ImportError(
        "metricloss_kernels.pml needs pytorch-metric-learning, which is not installed: "
        "pip install pytorch-metric-learning (or pip install 'metricloss_kernels[pml]')") from error

from ..memory import CrossBatchMemory
from .accuracy import AccuracyCalculator, ExactKNN, KMeans, SklearnKMeans
from .losses import (ArcFaceLoss, CosFaceLoss, NormalizedSoftmaxLoss, ProxyAnchorLoss, ProxyNCALoss,
                     SoftTripleLoss, SubCenterArcFaceLoss)

__all__ = ["AccuracyCalculator", "ArcFaceLoss", "CosFaceLoss", "CrossBatchMemory", "ExactKNN", "KMeans",
           "NormalizedSoftmaxLoss", "ProxyAnchorLoss", "ProxyNCALoss", "SklearnKMeans", "SoftTripleLoss",
           "SubCenterArcFaceLoss"]
