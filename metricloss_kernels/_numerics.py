"""The numerical rules every backend shares, in one place: the compute dtype, the result dtype (autocast
included), and the row normalisation x / max(||x||, NORM_EPS) with its backward.

- Half-precision inputs are computed in fp32, fp64 stays fp64 (`compute_dtype`).
- A loss returns the embeddings' dtype, except under an enabled `torch.autocast` for their device, where it
  returns the compute dtype (fp32), as torch's own losses do under autocast (`result_dtype`). Autocast never
  lowers the precision inside a loss: the losses run with it disabled (`upcast`, `fp32_region`).
- Gradients come back in each input's own dtype (autograd does that through the casts).
"""
import contextlib
import functools

import torch
import torch.nn.functional as F

# Norms are clamped below at NORM_EPS before dividing (F.normalize's rule and default eps).
NORM_EPS = 1e-12


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """fp64 if any input is fp64, else fp32 (for fp32, fp16 and bf16 inputs, mixed or not)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def result_dtype(embeddings: torch.Tensor) -> torch.dtype:
    """The dtype of a loss on `embeddings`: theirs, or the compute dtype under autocast on their device."""
    if torch.is_autocast_enabled(embeddings.device.type):
        return compute_dtype(embeddings.dtype)
    return embeddings.dtype


def fp32_region(device: torch.device):
    """Context in which autocast (if enabled for `device`) is off: ops keep the dtypes they are given."""
    if torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def upcast(fn=None, *, inputs: bool = True):
    """Decorator for a loss: run `fn` with autocast off and cast its floating tensor result(s) to `result_dtype` of
    the first floating tensor argument (the embeddings). With `inputs` (the reference), every floating tensor
    argument is first cast to the common compute dtype; without (the fused losses, which never copy W whole), the
    function handles its inputs' dtypes itself."""
    if fn is None:
        return functools.partial(upcast, inputs=inputs)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        floats = [a for a in (*args, *kwargs.values()) if torch.is_tensor(a) and a.is_floating_point()]
        if not floats:
            return fn(*args, **kwargs)
        out_dtype = result_dtype(floats[0])
        if inputs:
            cd = compute_dtype(*(a.dtype for a in floats))
            cast = lambda a: a.to(cd) if torch.is_tensor(a) and a.is_floating_point() else a  # noqa: E731
            args, kwargs = tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}
        with fp32_region(floats[0].device):
            out = fn(*args, **kwargs)
        if isinstance(out, tuple):
            return tuple(o.to(out_dtype) if torch.is_tensor(o) and o.is_floating_point() else o for o in out)
        return out.to(out_dtype)

    return wrapper


def normalize(t: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """t / max(||t||, NORM_EPS) along `dim` (differentiable; the reference's normalisation)."""
    return F.normalize(t, dim=dim, eps=NORM_EPS)


def inv_norm(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """1 / max(||t||, NORM_EPS) over the last dim, accumulated in `dtype` (default: t's), without copying t.
    Not differentiable by itself: `normalize_backward_` is its backward."""
    return torch.linalg.vector_norm(t, dim=-1, dtype=dtype).clamp_min_(NORM_EPS).reciprocal_()


def normalize_backward_(grad_hat: torch.Tensor, hat: torch.Tensor, inv: torch.Tensor,
                        tmp: torch.Tensor | None = None) -> torch.Tensor:
    """In place on grad_hat [..., D]: the gradient w.r.t. t of t_hat = t * inv, inv = inv_norm(t) [...].

    Unclamped rows: inv * (g - t_hat (t_hat . g)); clamped rows (inv == 1 / NORM_EPS, the norm is then a constant):
    inv * g. tmp: optional scratch shaped like hat."""
    prod = torch.mul(hat, grad_hat, out=tmp) if tmp is not None else hat * grad_hat
    dot = prod.sum(-1, keepdim=True).masked_fill_((inv >= 1.0 / NORM_EPS).unsqueeze(-1), 0)
    return grad_hat.addcmul_(hat, dot, value=-1).mul_(inv.unsqueeze(-1))
