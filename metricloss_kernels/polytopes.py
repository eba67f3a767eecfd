"""Fixed regular-polytope classifier weights and their neighbour angles (Pernici et al., CVPRW 2019).

See docs/formulas.md, "Regular-polytope fixed classifiers". Rows are class weights, unit length, class-major.
"""
import functools
import math

import torch

KINDS = ("simplex", "orthoplex", "cube")


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def polytope_dim(kind: str, num_classes: int) -> int:
    """Embedding dimension d of the `kind` polytope with `num_classes` vertices:
    simplex C - 1, orthoplex ceil(C / 2), cube ceil(log2 C)."""
    _check_kind(kind)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if kind == "simplex":
        return num_classes - 1
    if kind == "orthoplex":
        return (num_classes + 1) // 2
    return (num_classes - 1).bit_length()  # ceil(log2 C) for C >= 2, exact in integers


def regular_polytope(kind: str, num_classes: int) -> torch.Tensor:
    """Fixed classifier weights: the first `num_classes` vertices of a regular polytope, row-normalised.

    Args:
        kind: "simplex" (d = C - 1), "orthoplex" (d = ceil(C / 2)) or "cube" (d = ceil(log2 C)).
        num_classes: C >= 2.
    Returns:
        float32 tensor [C, d] with unit rows (CPU).
        - simplex: rows e_1..e_d and a*(1,..,1), a = (1 - sqrt(d + 1)) / d, centred on their centroid, normalised.
        - orthoplex: rows +e_1..+e_d, -e_1..-e_d, first C kept.
        - cube: row t has coordinate j equal to -1/sqrt(d) iff bit j of t is set, else +1/sqrt(d); first C kept.
    Raises:
        ValueError: unknown `kind` or `num_classes` < 2.
    """
    d = polytope_dim(kind, num_classes)
    if kind == "simplex":
        a = (1.0 - math.sqrt(d + 1)) / d
        w = torch.cat([torch.eye(d, dtype=torch.float64), torch.full((1, d), a, dtype=torch.float64)])
        w = w - w.mean(dim=0)  # built in float64 so the float32 result is the correctly rounded vertex set
    elif kind == "orthoplex":
        eye = torch.eye(d, dtype=torch.float64)
        w = torch.cat([eye, -eye])[:num_classes]
    else:
        bits = (torch.arange(num_classes).unsqueeze(1) >> torch.arange(d)) & 1  # [C, d], bit j of row t
        w = (1 - 2 * bits).to(torch.float64)
    return torch.nn.functional.normalize(w, dim=1).to(torch.float32)


def polytope_margin(kind: str, d: int) -> float:
    """Angle phi (radians) between neighbouring vertices of the d-dimensional `kind` polytope, the "maximal" margin
    of Margin-RePoNet: simplex arccos(-1/d), orthoplex pi/2, cube arccos((d - 2)/d).

    Note (as docs/formulas.md states it): the orthoplex value is pi/2 for every d, including d = 1 (C = 2), whose two
    vertices +e_1, -e_1 are in fact antipodal.

    Raises:
        ValueError: unknown `kind` or `d` < 1.
    """
    _check_kind(kind)
    if isinstance(d, bool) or not isinstance(d, int) or d < 1:
        raise ValueError(f"d must be an integer >= 1, got {d!r}")
    if kind == "simplex":
        return math.acos(-1.0 / d)
    if kind == "orthoplex":
        return math.pi / 2
    return math.acos((d - 2) / d)


@functools.lru_cache(maxsize=4)
def polytope_weights(kind: str, num_classes: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """regular_polytope(kind, num_classes) on `device` in `dtype`, built once per (kind, C, device, dtype): the
    simplex costs O(C^2) to build and the losses call this every step. Read-only: never modify it in place."""
    with torch.inference_mode(False), torch.no_grad():  # a normal tensor even if first built in inference mode
        return regular_polytope(kind, num_classes).to(device, dtype)


def margin_radians(kind: str, num_classes: int, margin) -> float:
    """The Margin-RePoNet margin in radians: "max" is the polytope's neighbour angle, a number is in degrees."""
    return polytope_margin(kind, polytope_dim(kind, num_classes)) if margin == "max" else math.radians(margin)
