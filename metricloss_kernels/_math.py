"""Elementwise pieces shared by the reference and the streaming losses."""
import math

import torch


def softplus(v: torch.Tensor) -> torch.Tensor:
    """log(1 + e^v) = logaddexp(v, 0), exact at every v (F.softplus switches to v above 20, off by e^-v, which
    shows at float64 precision); softplus(-inf) = 0 with zero gradient."""
    return torch.logaddexp(v, v.new_zeros(()))


def arcface_target(cos: torch.Tensor, margin: float) -> torch.Tensor:
    """ArcFace target logit for target cosines `cos` [N], angular margin in radians (insightface torch version):
    cos(theta + m) where cos(theta) > cos(pi - m), else cos(theta) - sin(pi - m) * m. The cosines are clamped to
    [-1 + 1e-7, 1 - 1e-7] first so that the gradient of sin(theta) = sqrt(1 - cos^2) stays finite."""
    c = cos.clamp(-1.0 + 1e-7, 1.0 - 1e-7)
    sin = torch.sqrt(1.0 - c * c)
    th, mm = math.cos(math.pi - margin), math.sin(math.pi - margin) * margin
    return torch.where(c > th, c * math.cos(margin) - sin * math.sin(margin), c - mm)
