"""Embedding normalisations of the exponential-triplet paper (Urtans et al.): Unit-Range and Unit-Bounce.

Both act on the last dimension: ``x`` [..., D] -> [..., D], in the dtype of ``x`` (half precision computed in fp32).
"""
import torch

from . import _validation as V
from ._numerics import upcast


def _check(x, scale):
    V.tensor(x, "x")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    V.number(scale, "scale", positive=True)


def _norm(x):
    return torch.linalg.vector_norm(x, dim=-1, keepdim=True)


@upcast
def unit_range(x, scale=1.0):
    """Unit-Range: ``f(x) = x * min(1, c_s / ||x||)``, c_s = ``scale``: the identity inside the ball of radius
    c_s, the radial projection onto its sphere outside. ``f(0) = 0`` (no NaN); the gradient is exact.

    Args: x [..., D]; scale > 0. Returns [..., D].
    """
    _check(x, scale)
    # scale / max(r, scale) equals min(1, scale / r) and is 1 (not 0/0) at r = 0.
    return x * (scale / _norm(x).clamp_min(scale))


def _triangle(t):
    """Period-4 triangle wave: T(t) = t on [0, 1], 2 - t on [1, 3], t - 4 on [3, 5], T(t + 4) = T(t)."""
    return torch.abs(torch.remainder(t - 1.0, 4.0) - 2.0) - 1.0


@upcast
def unit_bounce(x, scale=1.0):
    """Unit-Bounce **(resolved: the continuous reading of the paper's description)**: with r = ||x||,
    u = x / r, t = r / c_s (c_s = ``scale``), ``f(x) = c_s * T(t) * u`` where T is the period-4 triangle wave
    (``T(t) = t`` on [0, 1], ``2 - t`` on [1, 3], ``t - 4`` on [3, 5], ...): the point moves outwards, bounces back
    from the sphere of radius c_s, crosses the centre (t = 2) to the opposite side, bounces again at t = 3, and
    is back at the centre at t = 4. The gradient flows through ||x|| (exact, one-sided at the kinks); inside the
    ball f is the identity, so ``f(0) = 0`` without NaN.

    Args: x [..., D]; scale > 0. Returns [..., D].
    """
    _check(x, scale)
    r = _norm(x)
    inside = r < scale
    # Outside the ball r >= scale > 0, so dividing by the masked radius never produces 0/0 (nor a NaN gradient).
    r_out = torch.where(inside, torch.full_like(r, scale), r)
    factor = torch.where(inside, torch.ones_like(r), scale * _triangle(r_out / scale) / r_out)
    return x * factor
