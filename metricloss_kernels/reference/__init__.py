"""The pure-torch reference of every loss: readable, materialises what it needs, the oracle for the tests and the
fallback backend. Same signatures as `metricloss_kernels.functional` minus `backend`; inputs are assumed valid."""
from .exponential import center_loss, exponential_triplet_loss, updated_centers
from .pair import (contrastive_loss, lifted_structure_loss, margin_loss, multi_similarity_loss, npairs_loss,
                   triplet_margin_loss)
from .proxy import (arcface_loss, class_lse, class_similarity, cosface_loss, l2_softmax_loss, mpa_loss,
                    proxy_anchor_loss, proxy_nca_loss, proxy_regularizer, proxy_repel_loss, regular_polytope_loss,
                    soft_triple_loss, sub_center_arcface_loss)

__all__ = [
    "arcface_loss", "center_loss", "class_lse", "class_similarity", "contrastive_loss", "cosface_loss",
    "exponential_triplet_loss", "l2_softmax_loss", "lifted_structure_loss", "margin_loss", "mpa_loss",
    "multi_similarity_loss", "npairs_loss", "proxy_anchor_loss", "proxy_nca_loss", "proxy_regularizer",
    "proxy_repel_loss", "regular_polytope_loss", "soft_triple_loss", "sub_center_arcface_loss",
    "triplet_margin_loss", "updated_centers",
]
