"""Dtype policy shared by every backend: half-precision inputs are computed in fp32, results come back in the
input dtype (autograd then returns the gradients in the input dtype too)."""
import functools

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64; fp32, fp16 and bf16 compute in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def upcast(fn):
    """Decorator: cast every floating tensor argument to its compute dtype, and the tensor result(s) back to the
    dtype of the first floating tensor argument (the embeddings)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        in_dtype = next((a.dtype for a in args if torch.is_tensor(a) and a.is_floating_point()), None)
        if in_dtype is None or in_dtype in (torch.float32, torch.float64):
            return fn(*args, **kwargs)
        cd = compute_dtype(in_dtype)
        cast = lambda a: a.to(cd) if torch.is_tensor(a) and a.is_floating_point() else a  # noqa: E731
        out = fn(*(cast(a) for a in args), **{k: cast(v) for k, v in kwargs.items()})
        if isinstance(out, tuple):
            return tuple(o.to(in_dtype) if torch.is_tensor(o) and o.is_floating_point() else o for o in out)
        return out.to(in_dtype)

    return wrapper
