"""Fused Triton kernels for the streaming primitive `class_lse` of the proxy losses.

Kernels run on CUDA tensors, or on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1, set before
triton is imported). Files: lse.py (the forward kernel of both reductions, its launcher and the autograd
Function), _backward.py (the backward kernels), _tiles.py (the tile of class similarities, shared device code),
_common.py (tile configuration, dtypes, inverse norms).
"""
import torch

from ._common import INTERPRET, Options
from .lse import ClassLSE

__all__ = ["class_lse", "is_available", "unavailable_reason"]


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
    """Whether class_lse can run on tensors of `device` (default: CUDA if present)."""
    return unavailable_reason(device) is None


def class_lse(x, w, labels, *, centers_per_class=1, gamma=0.1, scale=1.0, shift=0.0, bias=None,
              normalize_x=True, normalize_w=True, reduce="row",
              block_n=None, block_c=None, block_d=None, num_splits=None):
    """Streaming log-sum-exp of class similarities, never materialising the N x C (or N x C*K) logits.

    With l[i, c, k] = x'_i . w'_{cK+k} (x' = x / max(||x||, 1e-12) if normalize_x else x; likewise w'),
    S[i, c] = sum_k softmax_k(l / gamma) l (S = l when K = centers_per_class = 1) and
    z[i, c] = scale * S + shift (+ bias_c):
      reduce="row" -> [N]: LSE_{c != labels_i} z[i, c]
      reduce="col" -> [C]: LSE_{i : labels_i != c} z[i, c]
    An empty LSE is -inf and gets gradient 0.

    x: [N, D] fp32/fp16/bf16 (fp64 works too); w: [C*K, D] class-major (row c*K + k is proxy k of class c);
    labels: [N] int64 in [0, C); bias: [C] or None. Returns fp32 (fp64 for fp64 inputs); differentiable w.r.t.
    x, w and bias, gradients in their dtypes. Arguments are assumed validated (functional.py does it).
    block_n / block_c / block_d / num_splits override the tile sizes and the number of programs that share the
    streamed axis (tests use them to exercise every loop; defaults suit the device).
    Determinism: the row reduce never uses atomics; the column reduce accumulates dX with atomics unless
    torch.are_deterministic_algorithms_enabled().
    """
    reason = unavailable_reason(x.device)
    if reason:
        raise RuntimeError(reason)
    if reduce not in ("row", "col"):
        raise ValueError(f"reduce must be 'row' or 'col', got {reduce!r}")
    options = Options(int(centers_per_class), float(gamma), float(scale), float(shift), bool(normalize_x),
                      bool(normalize_w), block_n, block_c, block_d, num_splits)
    return ClassLSE.apply(x, w, bias, labels.contiguous(), reduce == "row", options)
