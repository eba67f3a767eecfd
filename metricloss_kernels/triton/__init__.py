"""Fused Triton kernels implementing the `class_lse` op (metricloss_kernels.lse: the formulas, the spec and the
registration; the op picks these for CUDA tensors).

Kernels run on CUDA tensors, or on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1, set before
triton is imported). Files: lse.py (the forward kernel of both reductions and its launcher), _backward.py (the
backward kernels and their launcher), _tiles.py (the tile of class similarities, shared device code), _common.py
(tile configuration, dtypes, inverse norms). `forward` and `backward` take the op's argument order.
"""
import torch

from ._backward import backward
from ._common import INTERPRET
from .lse import forward

__all__ = ["backward", "forward", "is_available", "unavailable_reason"]


def unavailable_reason(device=None) -> str | None:
    """None when the kernels can run on tensors of `device` (default: CUDA if present), else why not."""
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and torch.cuda.is_available():
        return None
    if INTERPRET:
        return None
    return (f"Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 set before triton is imported for CPU "
            f"tensors; got {device.type} tensors")


def is_available(device=None) -> bool:
    """Whether the kernels can run on tensors of `device` (default: CUDA if present)."""
    return unavailable_reason(device) is None
