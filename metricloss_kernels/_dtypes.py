"""Dtype policy shared by every backend: half-precision inputs are computed in fp32 (fp64 stays fp64), results
come back in the embeddings' dtype, and autograd returns each input's gradient in that input's dtype."""
import functools

import torch


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """fp64 if any input is fp64, else fp32 (for fp32, fp16 and bf16 inputs, mixed or not)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def upcast(fn):
    """Decorator: cast every floating tensor argument to the common compute dtype, and the floating tensor
    result(s) back to the dtype of the first floating tensor argument (the embeddings)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        floats = [a for a in (*args, *kwargs.values()) if torch.is_tensor(a) and a.is_floating_point()]
        if not floats:
            return fn(*args, **kwargs)
        out_dtype = floats[0].dtype
        cd = compute_dtype(*(a.dtype for a in floats))
        if all(a.dtype == cd for a in floats):
            return fn(*args, **kwargs)
        cast = lambda a: a.to(cd) if torch.is_tensor(a) and a.is_floating_point() else a  # noqa: E731
        out = fn(*(cast(a) for a in args), **{k: cast(v) for k, v in kwargs.items()})
        if isinstance(out, tuple):
            return tuple(o.to(out_dtype) if torch.is_tensor(o) and o.is_floating_point() else o for o in out)
        return out.to(out_dtype)

    return wrapper
