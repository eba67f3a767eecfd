"""The numerical rules every backend shares, in one place: the compute dtype, the result dtype (autocast
included), and the row normalisation x / max(||x||, NORM_EPS) with its backward.

- Half-precision inputs are computed in fp32, fp64 stays fp64 (`compute_dtype`).
- A loss returns the embeddings' dtype, except under an enabled `torch.autocast` for their device, where it
  returns the compute dtype (fp32), as torch's own losses do under autocast (`result_dtype`). Autocast never
  lowers the precision inside a loss: the losses run with it disabled (`upcast`, `fp32_region`).
- Gradients come back in each input's own dtype (autograd does that through the casts), summed over the input's
  uses in the compute dtype and rounded once: autograd adds the gradient terms of a tensor in its own dtype, so a
  half-precision input used by several terms (the LSE, the target logits, R(W)) would have each term rounded before
  the sum, and terms that cancel would keep only their rounding errors (3-15% of the gradient, bf16). So every
  floating input is cast on entry (`to_compute_dtype`) wherever the computation runs in the compute dtype anyway:
  the reference (`upcast`) and the streamed losses on the chunked op (functional.py). The Triton op reads half
  inputs as they are (tensor cores); its gradient terms are rounded to the input dtype before they are summed.
- Inputs made under torch.inference_mode (e.g. embeddings of a frozen backbone) are accepted by every backend.
- NaN rule: a loss (a scalar result of `upcast`) is NaN, and so is every gradient that flows through it, when any
  floating tensor input holds a NaN or Inf (`propagate_nonfinite`), whatever the loss would have selected or
  masked: propagation, since an error would need a host read of the data.
- Row normalisation: overflow-safe, with a zero gradient for dead rows (below).
"""
import contextlib
import functools

import torch

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


def _no_inference(values) -> tuple:
    return tuple(v.clone() if torch.is_tensor(v) and v.is_inference() else v for v in values)


def upcast(fn=None, *, inputs: bool = True):
    """Decorator for a loss: run `fn` with autocast off and cast its floating tensor result(s) to `result_dtype` of
    the first floating tensor argument (the embeddings). With `inputs` (the reference), every floating tensor
    argument is first cast to the common compute dtype; without (the fused losses: whether W is copied whole depends
    on the backend, functional.py), the function handles its inputs' dtypes itself."""
    if fn is None:
        return functools.partial(upcast, inputs=inputs)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        floats = [a for a in (*args, *kwargs.values()) if torch.is_tensor(a) and a.is_floating_point()]
        if not floats:
            return fn(*args, **kwargs)
        out_dtype = result_dtype(floats[0])
        if not torch.compiler.is_compiling() and torch.is_grad_enabled() and any(a.requires_grad for a in floats):
            # Autograd saves inputs (the streamed backends all of them, labels too), which inference tensors
            # (made under torch.inference_mode) cannot be: such inputs are copied, as torch's message advises.
            # (Eager only: dynamo cannot trace is_inference().)
            args, kwargs = _no_inference(args), dict(zip(kwargs, _no_inference(kwargs.values())))
        if inputs:
            args, kwargs = to_compute_dtype(args, kwargs)
        with fp32_region(floats[0].device):
            out = fn(*args, **kwargs)
            if torch.is_tensor(out) and out.dim() == 0:
                out = propagate_nonfinite(out, floats)
        if isinstance(out, tuple):
            return tuple(o.to(out_dtype) if torch.is_tensor(o) and o.is_floating_point() else o for o in out)
        return out.to(out_dtype)

    return wrapper


def to_compute_dtype(args: tuple, kwargs: dict) -> tuple:
    """(args, kwargs) with every floating tensor among them cast to their common compute dtype (the others as they
    are). A cast is one autograd node: the gradient terms of every use of the input are summed after it, in the
    compute dtype, and rounded to the input's dtype once."""
    floats = [a for a in (*args, *kwargs.values()) if torch.is_tensor(a) and a.is_floating_point()]
    cd = compute_dtype(*(a.dtype for a in floats))
    cast = lambda a: a.to(cd) if torch.is_tensor(a) and a.is_floating_point() else a  # noqa: E731
    return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}


def propagate_nonfinite(loss: torch.Tensor, inputs) -> torch.Tensor:
    """`loss` times a factor that is 1, or NaN when a tensor of `inputs` holds a NaN or Inf: the loss is then NaN
    and, the factor being the derivative of the result w.r.t. the loss, so is every gradient that flows through it.
    One pass per input (its min and max: no copy, no host read), each multiplied by 0 in the input's dtype, so
    that a finite input never trips it, however large."""
    factor = loss.new_ones(())
    for t in inputs:
        if t.numel():
            low, high = torch.aminmax(t.detach())
            factor = factor + (0 * high).to(loss.dtype) + (0 * low).to(loss.dtype)
    return loss * factor


# ------------------------------------------------------------------------------------------ row normalisation
# x^ = x / max(||x||, NORM_EPS), the normalisation of every loss and backend (reference, chunked, Triton), with two
# rules of its own:
# - Overflow-safe norms: a row whose plain sum of squares overflows in the compute dtype (norm above ~1.8e19 in fp32,
#   ~1.3e154 in fp64; fp16/bf16 rows are computed in fp32, where they cannot) is first multiplied by a power of two,
#   _RESCALE (exact): small enough that no square of a finite entry overflows, large enough that the squares of
#   such a row stay normal. x^ = (c x) / ||c x||, c = 1 or _RESCALE per row. A plain norm would normalise such
#   rows to 0. Finding them costs one plain norm (a max-abs scale for every row measured 20x slower on CPU).
# - Dead rows: a row of norm <= NORM_EPS (all zero, or underflowed to zero in its dtype) has no direction. Its
#   value is x / NORM_EPS (as F.normalize: 0 for a zero row) and it gets a ZERO gradient: the normalisation is
#   treated as constant there. (Through the clamp the gradient would be g / NORM_EPS = 1e12 g: Inf in fp16, and a
#   step that wrecks the weights in fp32.) Every other row gets the exact gradient (g - x^ (x^ . g)) / ||x||.
# - Non-finite rows propagate: a NaN or +-Inf entry makes the whole normalised row NaN, and its gradient NaN.


_RESCALE = {torch.float32: 2.0 ** -100, torch.float64: 2.0 ** -600}


def _row_scale(t: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """c (keepdim along `dim`, in `dtype`): 1, or _RESCALE for the rows whose plain norm overflows in `dtype` (rows
    holding an Inf included: they become NaN)."""
    plain = torch.linalg.vector_norm(t, dim=dim, keepdim=True, dtype=dtype)
    return torch.where(torch.isinf(plain), torch.full_like(plain, _RESCALE[dtype]), torch.ones_like(plain))


def normalize(t: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """t / max(||t||, NORM_EPS) along `dim`, differentiable, with the rules above (overflow-safe; zero gradient for
    dead rows; NaN rows for non-finite ones), in t's dtype (norms in its compute dtype). The reference's
    normalisation."""
    c = _row_scale(t.detach(), dim, compute_dtype(t.dtype))
    u = t * c
    n = torch.linalg.vector_norm(u, dim=dim, keepdim=True)
    dead = ((n <= NORM_EPS) & (c == 1)).detach()  # a rescaled row is far from dead
    return torch.where(dead, t.detach() / NORM_EPS, u / torch.where(dead, torch.ones_like(n), n)).to(t.dtype)


def unit_rows(t: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None):
    """The normalisation of `normalize` over the last dim, forward only, for the streamed backends:
    (t^ in `dtype` [..., D] (written into `out` if given), grad_scale [...]). grad_scale is 1 / ||t|| for live
    rows and 0 for dead rows: `normalize_backward_` turns it into the gradient. NaN rows have NaN."""
    c = _row_scale(t, -1, dtype)
    u = torch.mul(t, c, out=out) if out is not None else t * c
    n = torch.linalg.vector_norm(u, dim=-1, keepdim=True, dtype=dtype)
    dead = (n <= NORM_EPS) & (c == 1)
    inv_n = torch.where(dead, torch.full_like(n, 1.0 / NORM_EPS), n.reciprocal())  # u -> t^ (u = t if dead)
    grad_scale = torch.where(dead, torch.zeros_like(n), c * inv_n)
    return u.mul_(inv_n), grad_scale.squeeze(-1)


def normalize_backward_(grad_hat: torch.Tensor, hat: torch.Tensor, grad_scale: torch.Tensor,
                        tmp: torch.Tensor | None = None) -> torch.Tensor:
    """In place on grad_hat [..., D]: the gradient w.r.t. t of t^ = `unit_rows(t)`, from its (t^, grad_scale):
    grad_scale * (g - t^ (t^ . g)), 0 for dead rows. tmp: optional scratch shaped like hat."""
    prod = torch.mul(hat, grad_hat, out=tmp) if tmp is not None else hat * grad_hat
    dot = prod.sum(-1, keepdim=True)
    return grad_hat.addcmul_(hat, dot, value=-1).mul_(grad_scale.unsqueeze(-1))
