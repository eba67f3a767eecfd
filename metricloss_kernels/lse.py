"""The streaming primitive of the proxy losses, registered as one op: ``torch.ops.metricloss_kernels.class_lse``.

    l_{i,c,k} = x'_i . w'_{cK+k}        (x' = x / max(||x||, 1e-12) if normalize_x, else x; likewise w')
    S_{i,c}   = sum_k softmax_k(l_{i,c,k} / gamma) l_{i,c,k}        (pool="softmax"; S = l when K = 1)
    S_{i,c}   = max_k l_{i,c,k}                                    (pool="max": the limit gamma -> 0)
    z_{i,c}   = scale * S_{i,c} + shift (+ bias_c)
    reduce="row": out_i = LSE_{c != labels_i} (z_{i,c} - offset_i)      -> [N]   (offset: [N] or None = 0)
    reduce="col": out_c = LSE_{i : labels_i != c} z_{i,c}                -> [C]

computed without ever holding the N x C (or N x C*K) logits. This file owns the op: its schema, the frozen spec of
its non-tensor arguments (`LSESpec`), the fake (meta) kernels, the autograd formula (the backward is the registered
op ``metricloss_kernels::class_lse_backward``) and the choice of implementation. The implementations take the same
arguments in the same order, ``(x, w, labels, bias, spec, offset=None)`` and ``(grad, out, x, w, labels, bias, spec,
need_x, need_w, need_b, offset=None)``:
  - `metricloss_kernels.chunked`: torch ops over tiles of classes; CPU and every device other than CUDA;
  - `metricloss_kernels.triton`: fused Triton kernels; CUDA tensors (CPU tensors under TRITON_INTERPRET=1);
  - `metricloss_kernels.gemm`: cuBLAS GEMMs over chunks of classes with one Triton epilogue per pass; the same
    devices as "triton".
``impl="auto"`` picks by device (CUDA -> Triton when it imports, anything else -> chunked; not "gemm" until a GPU has
measured the rule between the two, docs/benchmarks.md); "chunked", "triton" or "gemm" forces one. Under
``torch.compile`` the op is one opaque node of the graph, with the same fake and backward. pool="max" with K > 1
(sub-centre ArcFace) is implemented by every implementation ("auto" picks as for the softmax pool).

The row offset (a cross-entropy passes its target logits t_i) is subtracted from each logit inside the LSE: the
result LSE_c z_ic - t_i is then exact at any magnitude of the logits, where an LSE computed first and t subtracted
after keeps nothing below the last bit of |t| (|t| = 1e31: a CE of log C comes out 0). Every implementation takes
it: chunked and Triton subtract it from the scaled similarities in their tiles, z' = (scale * S - t_i) + shift
(+ bias_c); gemm's forward takes it off each row's running max (LSE_c z_ic - t_i, z without it) and its backward off
each logit. A backward forms z' first, then dz = g exp(z' - out) (never with out + t_i).
"""
import dataclasses

import torch

from ._backend import triton_reason
from ._numerics import compute_dtype

IMPLS = ("auto", "chunked", "triton", "gemm")
REDUCES = ("row", "col")
POOLS = ("softmax", "max")


@dataclasses.dataclass(frozen=True)
class LSESpec:
    """The non-tensor arguments of class_lse, in the op's argument order.

    centers_per_class: K >= 1 (rows c*K .. c*K+K-1 of w are class c's proxies). gamma: temperature of the
    intra-class softmax (unused when K = 1). scale, shift: z = scale * S + shift (+ bias). normalize_x /
    normalize_w: L2-normalise the rows first. reduce: "row" or "col". impl: "auto", "chunked", "triton" or "gemm".
    Tile overrides, 0 = the implementation's default: block_rows (rows per tile), block_classes (classes per tile,
    all K proxies of a class in one tile; gemm: per chunk), block_d (Triton: chunk of D per dot), num_splits
    (Triton, gemm: programs sharing the streamed axis). pool: how a class's K similarities make S, "softmax"
    (weighted by softmax_k(l / gamma)) or "max" (gamma unused; its gradient is split evenly between tied maxima, the
    limit of the softmax's); last, so that positional specs of the other fields keep their meaning."""
    centers_per_class: int = 1
    gamma: float = 0.1
    scale: float = 1.0
    shift: float = 0.0
    normalize_x: bool = True
    normalize_w: bool = True
    reduce: str = "row"
    impl: str = "auto"
    block_rows: int = 0
    block_classes: int = 0
    block_d: int = 0
    num_splits: int = 0
    pool: str = "softmax"

    def __post_init__(self):
        if self.reduce not in REDUCES:
            raise ValueError(f"reduce must be 'row' or 'col', got {self.reduce!r}")
        if self.pool not in POOLS:
            raise ValueError(f"pool must be 'softmax' or 'max', got {self.pool!r}")
        if self.impl not in IMPLS:
            raise ValueError(f"impl must be one of {', '.join(map(repr, IMPLS))}; got {self.impl!r}")
        if self.centers_per_class < 1:
            raise ValueError(f"centers_per_class must be >= 1, got {self.centers_per_class}")
        for name in ("block_rows", "block_classes", "block_d", "num_splits"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be a positive number (or 0 for the default), got "
                                 f"{getattr(self, name)}")

    @property
    def row(self) -> bool:
        return self.reduce == "row"

    @property
    def max_pool(self) -> bool:
        """S is the max over K > 1 proxies (for K = 1 both pools give S = l)."""
        return self.pool == "max" and self.centers_per_class > 1

    def args(self) -> tuple:
        """The field values in the op's argument order."""
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))


_SCHEMA_TYPES = {int: "int", float: "float", bool: "bool", str: "str"}
_SPEC_SCHEMA = ", ".join(f"{_SCHEMA_TYPES[f.type]} {f.name}" for f in dataclasses.fields(LSESpec))


def _implementation(spec: LSESpec, device: torch.device):
    """The module (chunked, triton or gemm) that runs `spec` on tensors of `device`."""
    impl = spec.impl
    if impl == "auto":
        impl = "triton" if device.type == "cuda" and triton_reason(device) is None else "chunked"
    if impl == "chunked":
        from . import chunked
        return chunked
    reason = triton_reason(device)  # gemm's epilogues are Triton kernels too
    if reason:
        raise RuntimeError(f"class_lse with impl={impl!r} cannot run: {reason}")
    if impl == "gemm":
        from . import gemm
        return gemm
    from . import triton as kernels
    return kernels


# ------------------------------------------------------------------------------------------------ the op
_NUM_SPEC = len(dataclasses.fields(LSESpec))


def _spec_and_offset(args):
    """(LSESpec, the arguments between the spec and the offset, offset or None) from the arguments of an op after
    bias (the offset, last, may be left out)."""
    rest = args[_NUM_SPEC:]
    has_offset = len(rest) > 0 and (rest[-1] is None or torch.is_tensor(rest[-1]))
    return LSESpec(*args[:_NUM_SPEC]), rest[:-1] if has_offset else rest, rest[-1] if has_offset else None


@torch.library.custom_op("metricloss_kernels::class_lse", mutates_args=(),
                         schema=f"(Tensor x, Tensor w, Tensor labels, Tensor? bias, {_SPEC_SCHEMA}, "
                                f"Tensor? offset=None) -> Tensor")
def _class_lse(x, w, labels, bias, *args):
    spec, _, offset = _spec_and_offset(args)
    return _implementation(spec, x.device).forward(x, w, labels, bias, spec, offset)


@_class_lse.register_fake
def _class_lse_fake(x, w, labels, bias, *args):
    spec, _, _ = _spec_and_offset(args)
    size = x.shape[0] if spec.row else w.shape[0] // spec.centers_per_class
    return x.new_empty(size, dtype=compute_dtype(x.dtype, w.dtype))


@torch.library.custom_op("metricloss_kernels::class_lse_backward", mutates_args=(),
                         schema=f"(Tensor grad, Tensor out, Tensor x, Tensor w, Tensor labels, Tensor? bias, "
                                f"{_SPEC_SCHEMA}, bool need_x, bool need_w, bool need_b, Tensor? offset=None) "
                                f"-> (Tensor, Tensor, Tensor)")
def _class_lse_backward(grad, out, x, w, labels, bias, *args):
    """(dx, dw, dbias); a gradient that is not needed (or a bias that is None) comes back as an empty tensor."""
    spec, (need_x, need_w, need_b), offset = _spec_and_offset(args)
    need_b = need_b and bias is not None
    impl = _implementation(spec, x.device)
    dx, dw, db = impl.backward(grad, out, x, w, labels, bias, spec, need_x, need_w, need_b, offset)
    return (dx if need_x else x.new_empty(0), dw if need_w else w.new_empty(0),
            db if need_b else x.new_empty(0))


@_class_lse_backward.register_fake
def _class_lse_backward_fake(grad, out, x, w, labels, bias, *args):
    _, (need_x, need_w, need_b), _ = _spec_and_offset(args)
    return (torch.empty_like(x) if need_x else x.new_empty(0), torch.empty_like(w) if need_w else w.new_empty(0),
            torch.empty_like(bias) if need_b and bias is not None else x.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, w, labels, bias, *spec_args, offset = inputs
    ctx.save_for_backward(x, w, labels, bias, output, offset)
    ctx.spec_args = spec_args


def _backward(ctx, grad):
    x, w, labels, bias, out, offset = ctx.saved_tensors
    need_x, need_w, _, need_b = ctx.needs_input_grad[:4]
    dx, dw, db = torch.ops.metricloss_kernels.class_lse_backward(grad, out, x, w, labels, bias, *ctx.spec_args,
                                                                 need_x, need_w, need_b, offset)
    # d out_i / d offset_i = -1 (the softmax weights of a row sum to 1); 0 for an empty LSE
    d_offset = -grad.masked_fill(out == float("-inf"), 0).to(offset.dtype) if ctx.needs_input_grad[-1] else None
    return (dx if need_x else None, dw if need_w else None, None,
            db if need_b else None) + (None,) * len(ctx.spec_args) + (d_offset,)


_class_lse.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------- Python entry point
def class_lse(x, w, labels, *, bias=None, centers_per_class=1, gamma=0.1, scale=1.0, shift=0.0, normalize_x=True,
              normalize_w=True, reduce="row", impl="auto", block_rows=0, block_classes=0, block_d=0,
              num_splits=0, offset=None, pool="softmax"):
    """Streaming masked log-sum-exp of the class logits (the formulas of this module's docstring), through the
    registered op ``torch.ops.metricloss_kernels.class_lse``.

    Args:
        x: [N, D] rows, any float dtype. w: [C*K, D] proxies, class-major (row c*K + k is proxy k of class c).
        labels: [N] int64. z[i, labels_i] is left out of both reductions; a label outside [0, C) leaves nothing
            out: that row's LSE runs over all C classes and it enters every class's column LSE (so that a caller
            holding the classes [s, s + C) of a larger problem passes its rows' labels minus s as they are).
        bias: [C] or None. offset: [N] or None, reduce="row" only: subtracted from row i's logits inside the LSE
            (the module docstring), differentiable. The other keywords are the fields of `LSESpec`.

    Returns:
        float32 tensor, [N] (reduce="row") or [C] (reduce="col"); float64 for float64 inputs. An empty LSE is -inf
        and gets zero gradient. Differentiable w.r.t. x, w and bias; their gradients come back in their dtypes.
        Inputs are assumed validated (the public functional layer does it).
    """
    spec = LSESpec(int(centers_per_class), float(gamma), float(scale), float(shift), bool(normalize_x),
                   bool(normalize_w), reduce, impl, int(block_rows), int(block_classes), int(block_d),
                   int(num_splits), pool)
    if offset is not None and not spec.row:
        raise ValueError("offset applies to reduce='row' only")
    return torch.ops.metricloss_kernels.class_lse(x, w, labels, bias, *spec.args(), offset)
