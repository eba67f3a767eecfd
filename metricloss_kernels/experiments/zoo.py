"""Every loss of the library by a short name, with the settings the demo and the tournament use on small data.

Defaults are the library's (those of the papers) except where small batches of few classes need otherwise:
ProxyNCA's scale 8 (2 gives almost no gradient), 3 proxies per class for SoftTriple and MPA (10 is tuned for
hundreds of images per class), scale 16 for ArcFace and CosFace (64 saturates with 40 classes), the orthoplex
for the polytope loss (a simplex of C classes needs C - 1 dimensions), semi-hard mining for the triplet loss.
"""
import torch

from .. import losses as L

# name -> (module class, constructor takes (num_classes, embedding_size) "cd", (num_classes,) "c" or nothing "",
#          keyword settings)
_RECIPES = {
    "proxy_anchor": (L.ProxyAnchorLoss, "cd", {}),
    "proxy_nca": (L.ProxyNCALoss, "cd", {"scale": 8.0}),
    "soft_triple": (L.SoftTripleLoss, "cd", {"centers_per_class": 3}),
    "mpa": (L.MPALoss, "cd", {"centers_per_class": 3}),
    "mpa_dw": (L.MPALoss, "cd", {"centers_per_class": 3, "variant": "dw"}),
    "mpa_ap": (L.MPALoss, "cd", {"centers_per_class": 3, "variant": "ap"}),
    "arcface": (L.ArcFaceLoss, "cd", {"scale": 16.0}),
    "cosface": (L.CosFaceLoss, "cd", {"scale": 16.0}),
    "l2_softmax": (L.L2SoftmaxLoss, "cd", {}),
    "polytope": (L.RegularPolytopeLoss, "c", {"polytope": "orthoplex"}),
    "proxy_repel": (L.ProxyRepelLoss, "cd", {}),
    "contrastive": (L.ContrastiveLoss, "", {}),
    "triplet": (L.TripletMarginLoss, "", {"mining": "semi-hard"}),
    "lifted": (L.LiftedStructureLoss, "", {}),
    "npairs": (L.NPairsLoss, "", {}),
    "margin": (L.MarginLoss, "", {}),
    "multi_similarity": (L.MultiSimilarityLoss, "", {}),
    "exp_triplet": (L.ExponentialTripletLoss, "c", {}),
}
LOSSES = (*_RECIPES, "composite")
# Fixed embedding width (the polytope's dimension): cannot take part in comparisons across embedding sizes.
FIXED_WIDTH = ("polytope",)


def make_loss(name: str, num_classes: int, embedding_size: int, **overrides) -> torch.nn.Module:
    """The loss module `name` for `num_classes` training classes and embeddings of `embedding_size`, with this
    module's settings updated by `overrides` (keyword arguments of the module's constructor)."""
    if name == "composite":  # the exponential-triplet paper's eq. 10, with a light centre term
        if overrides:
            raise ValueError(f"overrides are not supported for the composite loss, got {sorted(overrides)}")
        return L.WeightedSumLoss(
            {"exp": L.ExponentialTripletLoss(num_classes),
             "center": L.CenterLoss(num_classes, embedding_size, margin=0.1),
             "class": L.L2SoftmaxLoss(num_classes, embedding_size)},
            weights={"exp": 1.0, "center": 0.1, "class": 1.0})
    if name not in _RECIPES:
        raise ValueError(f"name must be one of {', '.join(LOSSES)}; got {name!r}")
    cls, takes, settings = _RECIPES[name]
    args = {"cd": (num_classes, embedding_size), "c": (num_classes,), "": ()}[takes]
    return cls(*args, **{**settings, **overrides})


def optimizer(net: torch.nn.Module, loss_fn: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """Adam over the network (lr) and the loss's learnable parameters (10 lr: proxies learn faster than the network,
    as in the ProxyAnchor authors' recipe)."""
    groups = [{"params": net.parameters(), "lr": lr}]
    learnable = [p for p in loss_fn.parameters() if p.requires_grad]
    if learnable:
        groups.append({"params": learnable, "lr": lr * 10})
    return torch.optim.Adam(groups)
