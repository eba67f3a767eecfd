"""The class_lse op (metricloss_kernels.lse) and every proxy loss built on it, for each implementation ("chunked",
"triton", "gemm"): the op against a materialised float64 oracle (forward and every gradient), opcheck, no N x C
allocation; every proxy loss against the reference.

Without CUDA the Triton kernels run under the interpreter on CPU tensors (TRITON_INTERPRET, set by conftest.py).
The interpreter is slow and its tl.dot cannot do bf16, so the shapes are small and awkward (N=37, C=53, K=3, D=40:
nothing a multiple of a tile) and bf16 Triton is tested on a GPU only (test_triton_bf16_on_gpu).
"""
import functools
import importlib.util
import itertools
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import metricloss_kernels as mlk
from metricloss_kernels import chunked, fused, reference
from metricloss_kernels._numerics import compute_dtype
from metricloss_kernels.lse import LSESpec, class_lse
from metricloss_kernels.polytopes import regular_polytope
from utils import TOL, assert_close, largest_allocation, proxy_inputs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["chunked", "triton", "gemm"]
N, C, K, D = 37, 53, 3, 40
F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
cuda_only = pytest.mark.cuda


def tol(backend, dtype):
    """Max error relative to the largest |expected| entry. Triton's fp32 dots and gemm's cuBLAS GEMMs on a GPU follow
    torch's matmul precision (TF32 by default), hence 1e-3 there."""
    return 1e-3 if backend in ("triton", "gemm") and dtype == F32 and DEVICE == "cuda" else TOL[dtype]


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------ the op
def oracle(x, w, labels, bias=None, *, centers_per_class=1, gamma=0.1, scale=1.0, shift=0.0, normalize_x=True,
           normalize_w=True, reduce="row", pool="softmax"):
    """class_lse materialised in float64: the [N, C, K] logits and a masked logsumexp. Labels outside [0, C) leave
    nothing out; an empty LSE is -inf with zero gradient. pool="max": torch.amax over K (its gradient split evenly
    between ties)."""
    x, w = x.double(), w.double()
    xh = F.normalize(x, dim=1) if normalize_x else x
    wh = F.normalize(w, dim=1) if normalize_w else w
    l = (xh @ wh.T).unflatten(1, (-1, centers_per_class))
    s = l.amax(-1) if pool == "max" else (torch.softmax(l / gamma, dim=-1) * l).sum(-1)
    z = scale * s + shift
    if bias is not None:
        z = z + bias.double()
    own = labels[:, None] == torch.arange(z.shape[1], device=z.device)
    dim = 1 if reduce == "row" else 0
    empty = own.all(dim)
    out = torch.logsumexp(z.masked_fill(own, float("-inf")).masked_fill(empty.unsqueeze(dim), 0), dim)
    return out.masked_fill(empty, float("-inf"))


make_inputs = functools.partial(proxy_inputs, n=N, c=C, k=K, d=D, device=DEVICE, requires_grad=True)


def check_op(backend, x, w, b, labels, rtol=None, seed=1, **kw):
    """Forward and every gradient (one random upstream gradient, which also reaches the -inf entries) of class_lse
    with impl=backend against the float64 oracle on the same values. Returns (out, grads)."""
    rtol = rtol or tol(backend, x.dtype)
    out = class_lse(x, w, labels, bias=b, impl=backend, **kw)
    oracle_kw = {a: v for a, v in kw.items() if a not in ("block_rows", "block_classes", "block_d", "num_splits")}
    # float64 leaves for the oracle, one per distinct input (x and w may be the same tensor)
    leaves = {id(t): t.detach().double().requires_grad_() for t in (x, w, b) if t is not None}
    expected = oracle(leaves[id(x)], leaves[id(w)], labels, leaves.get(id(b)), **oracle_kw)
    assert out.dtype == (F64 if F64 in (x.dtype, w.dtype) else F32)
    assert_close(out, expected, rtol, "forward")
    upstream = torch.randn(expected.shape, generator=gen(seed), dtype=F64).to(DEVICE)
    inputs = list({id(t): t for t in (x, w, b) if t is not None and t.requires_grad}.values())
    grads = torch.autograd.grad(out, inputs, upstream.to(out.dtype))
    ref_grads = torch.autograd.grad(expected, [leaves[id(t)] for t in inputs], upstream)
    for name, got, ref, inp in zip("xwb", grads, ref_grads, inputs):
        assert got.dtype == inp.dtype and got.shape == inp.shape, name
        assert_close(got, ref, rtol, f"grad {name}")
    return out, grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduce", ["row", "col"])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_oracle(backend, reduce, k, bias):
    x, w, b, labels = make_inputs(k=k, bias=bias, seed=k + 10 * bias)
    check_op(backend, x, w, b, labels, centers_per_class=k, gamma=0.1, scale=8.0, shift=0.3, reduce=reduce)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduce", ["row", "col"])
@pytest.mark.parametrize("normalize_x,normalize_w", [(False, False), (True, False), (False, True)])
def test_normalize_flags(backend, reduce, normalize_x, normalize_w):
    x, w, b, labels = make_inputs(k=2, bias=True, seed=3)
    with torch.no_grad():  # unnormalised dot products: keep z moderate
        x.mul_(0.3), w.mul_(0.3)
    check_op(backend, x, w, b, labels, centers_per_class=2, gamma=0.5, scale=2.0, reduce=reduce,
             normalize_x=normalize_x, normalize_w=normalize_w)


# Tile overrides per implementation: one class per tile up to one tile for all, short last tiles, row tiles
# (37 rows in tiles of 8), D in several chunks (40 = 16 + 16 + 8), several programs per streamed axis.
TILINGS = [("chunked", dict(block_classes=b)) for b in (1, 5, 52, 53, 1000)] + [
    ("chunked", {}), ("chunked", dict(block_rows=8, block_classes=11)),
    ("triton", dict(block_d=16, num_splits=1)), ("triton", dict(block_d=16, num_splits=3)),
    ("triton", dict(block_rows=32, block_classes=32)),
    ("gemm", dict(block_classes=5, num_splits=1)), ("gemm", dict(block_classes=52, num_splits=3)),
    ("gemm", dict(block_rows=8, block_classes=11))]


@pytest.mark.parametrize("backend,tiles", TILINGS, ids=[f"{b}-{t}" for b, t in TILINGS])
@pytest.mark.parametrize("reduce", ["row", "col"])
def test_tilings(backend, tiles, reduce):
    x, w, b, labels = make_inputs(bias=True, seed=2)
    check_op(backend, x, w, b, labels, centers_per_class=K, scale=3.0, shift=0.5, reduce=reduce, **tiles)


# K's proxy slots in the Triton backward's two parts (_common.k_parts): 2 (one part), 5 = 4 + 1, 7 = 4 + 4 (one
# padded slot), 10 = 8 + 2; class tiles of the fewest classes that give the narrower part 16 slots: 53 classes make
# several tiles and a short last one, 37 rows three row tiles, D = 40 three chunks.
SLOT_SPLITS = [(2, 8), (5, 16), (7, 4), (10, 8)]


@pytest.mark.parametrize("k,block_classes", SLOT_SPLITS, ids=[f"K{k}" for k, _ in SLOT_SPLITS])
@pytest.mark.parametrize("reduce", ["row", "col"])
def test_triton_proxy_slots_in_two_parts(k, block_classes, reduce):
    x, w, b, labels = make_inputs(k=k, bias=True, seed=20 + k)
    check_op("triton", x, w, b, labels, centers_per_class=k, gamma=0.2, scale=6.0, shift=0.3, reduce=reduce,
             block_rows=16, block_classes=block_classes, block_d=16)


def test_triton_tile_overrides_are_validated():
    """A tile override that no kernel can take is refused by name: not a power of two, or a class tile too narrow
    for the backward's dots (K = 10: its 2-slot part needs 8 classes for 16 slots)."""
    x, w, b, labels = make_inputs(k=10, seed=24)
    for tiles, name in ((dict(block_classes=4), "block_classes"), (dict(block_classes=12), "block_classes"),
                        (dict(block_rows=24), "block_rows"), (dict(block_d=8), "block_d")):
        with pytest.raises(ValueError, match=name):
            class_lse(x, w, labels, centers_per_class=10, impl="triton", **tiles)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k,gamma", [(1, 0.1), (K, 0.1), (K, 0.005)])  # 1/gamma = 200: max-subtracted softmax
@pytest.mark.parametrize("reduce", ["row", "col"])
def test_temperatures(backend, k, gamma, reduce):
    x, w, b, labels = make_inputs(k=k, bias=True, seed=3)
    check_op(backend, x, w, b, labels, centers_per_class=k, gamma=gamma, scale=3.0, shift=0.5, reduce=reduce)


# (backend, K, tiles): one class a tile up to the default, short last tiles; Triton's two parts of proxy slots
# (K = 3: 2 + 1, K = 10: 8 + 2) over several class tiles, row tiles and D chunks.
MAX_POOL = [("chunked", K, {}), ("chunked", K, dict(block_classes=1)), ("chunked", K, dict(block_classes=7)),
            ("chunked", K, dict(block_rows=8, block_classes=11)), ("triton", K, {}),
            ("triton", K, dict(block_rows=16, block_classes=16, block_d=16)), ("triton", 10, dict(block_classes=8)),
            ("gemm", K, {}), ("gemm", K, dict(block_classes=7, num_splits=3)),
            ("gemm", K, dict(block_rows=8, block_classes=11))]


@pytest.mark.parametrize("reduce", ["row", "col"])
@pytest.mark.parametrize("backend,k,tiles", MAX_POOL, ids=[f"{b}-K{k}-{t}" for b, k, t in MAX_POOL])
@pytest.mark.parametrize("dtype", [F64, F32])
def test_max_pool_matches_oracle(backend, k, tiles, reduce, dtype):
    """pool="max" (sub-centre ArcFace's class similarity, S = max_k l)."""
    x, w, b, labels = make_inputs(k=k, dtype=dtype, bias=True, seed=40)
    check_op(backend, x, w, b, labels, centers_per_class=k, pool="max", scale=3.0, shift=0.5, reduce=reduce, **tiles)


@pytest.mark.parametrize("backend,tiles", [("chunked", dict(block_classes=7)), ("triton", dict(block_classes=16)),
                                           ("gemm", dict(block_classes=7))])
@pytest.mark.parametrize("reduce", ["row", "col"])
def test_max_pool_splits_the_gradient_of_tied_proxies(backend, tiles, reduce):
    """Two identical sub-centres of every class tie exactly (integer data, no normalisation: every dot product is
    exact whatever the summation order): each gets half of the max's gradient, the limit gamma -> 0 of the
    softmax's, as torch.amax in the oracle and the reference. (Triton: the tied proxies 0 and 2 sit in its two
    parts of proxy slots, 2 + 1.)"""
    g = gen(41)
    x = torch.randint(-3, 4, (N, D), generator=g).double().requires_grad_()
    w = torch.randint(-3, 4, (C, K, D), generator=g).double()
    w[:, 2] = w[:, 0]
    w = w.flatten(0, 1).requires_grad_()
    labels = torch.randint(0, C, (N,), generator=g)
    kw = dict(centers_per_class=K, pool="max", scale=0.05, normalize_x=False, normalize_w=False, reduce=reduce)
    _, (_, dw) = check_op(backend, x, w, None, labels, **tiles, **kw)
    pair = dw.view(C, K, D)
    assert pair[:, 0].abs().sum() > 0 and torch.equal(pair[:, 0], pair[:, 2])
    out = reference.class_lse(x, w, labels, **kw)
    mine = class_lse(x, w, labels, impl=backend, **tiles, **kw)
    assert_close(torch.autograd.grad(out.sum(), w)[0], torch.autograd.grad(mine.sum(), w)[0], TOL[F64], "reference")


def test_max_pool_auto_runs_where_the_softmax_pool_runs(monkeypatch):
    """Every implementation has the max pool: "auto" picks for it as for the softmax pool (the Triton kernels on
    CUDA); an unknown pool is refused by name."""
    from metricloss_kernels import lse
    from metricloss_kernels import triton as kernels

    monkeypatch.setattr(lse, "triton_reason", lambda device: None)
    assert lse._implementation(LSESpec(K, pool="max"), torch.device("cuda")) is kernels
    with pytest.raises(ValueError, match="pool"):
        LSESpec(pool="mean")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduce", ["row", "col"])
@pytest.mark.parametrize("k", [1, 3])
def test_labels_outside_the_classes_leave_nothing_out(backend, reduce, k):
    """A label outside [0, C) excludes no class: that row's LSE runs over all C classes and it enters every
    column. This is how a holder of the classes [s, s + C_local) of a larger problem calls the op: with its
    shard of the proxies and the labels minus s."""
    x, w_all, b_all, labels = make_inputs(k=k, bias=True, seed=4)
    labels[:4] = torch.tensor([-1, -7, C, C + 5])
    check_op(backend, x, w_all, b_all, labels, centers_per_class=k, scale=4.0, reduce=reduce)
    start, stop = 20, 33  # a shard of the classes: most rows' labels fall outside it
    w = w_all.detach()[start * k:stop * k].clone().requires_grad_()
    b = b_all.detach()[start:stop].clone().requires_grad_()
    check_op(backend, x, w, b, labels - start, centers_per_class=k, scale=4.0, reduce=reduce)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 3])
def test_empty_lse_is_minus_inf_with_zero_grad(backend, k):
    """Column reduce: a class that every row carries has no term. Row reduce with C = 1: no row has a term."""
    x, w, b, labels = make_inputs(k=k, bias=True, seed=5, labels=torch.full((N,), 4))
    out, _ = check_op(backend, x, w, b, labels, centers_per_class=k, scale=4.0, reduce="col")
    assert out[4] == float("-inf") and torch.isfinite(out[torch.arange(C, device=DEVICE) != 4]).all()
    # Whatever gradient reaches the empty entry (here NaN), it has no term to flow into.
    out = class_lse(x, w, labels, bias=b, centers_per_class=k, scale=4.0, reduce="col", impl=backend)
    up = torch.ones_like(out).masked_fill(~torch.isfinite(out), 0.0)
    clean = torch.autograd.grad(out, (x, w, b), up, retain_graph=True)
    up[4] = float("nan")
    for got, ref in zip(torch.autograd.grad(out, (x, w, b), up), clean):
        assert torch.equal(got, ref)
    x, w, b, labels = make_inputs(c=1, k=k, bias=True, seed=6, labels=torch.zeros(N, dtype=torch.long))
    out, grads = check_op(backend, x, w, b, labels, centers_per_class=k, reduce="row")
    assert torch.isneginf(out).all() and all(torch.equal(g, torch.zeros_like(g)) for g in grads)


# bf16 Triton: GPU only (the interpreter's tl.dot is wrong for bf16), see test_triton_bf16_on_gpu.
HALF = [("chunked", F16), ("chunked", BF16), ("triton", F16), ("gemm", F16)]


@pytest.mark.parametrize("backend,dtype", HALF, ids=[f"{b}-{str(t)[6:]}" for b, t in HALF])
@pytest.mark.parametrize("reduce", ["row", "col"])
def test_half_precision_inputs(backend, dtype, reduce):
    x, w, b, labels = make_inputs(dtype=dtype, bias=True, seed=7)
    check_op(backend, x, w, b, labels, centers_per_class=K, scale=8.0, reduce=reduce)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs(backend):
    """Row-strided views (no copy needed) and N below one row tile."""
    g = gen(8)
    x = torch.randn(7, 64, generator=g, dtype=F64)[:, 3:43].to(DEVICE).requires_grad_()
    w = torch.randn(17 * 2, 50, generator=g, dtype=F64)[:, :40].to(DEVICE).requires_grad_()
    labels = torch.randint(0, 17, (7,), generator=g).to(DEVICE)
    for reduce in ("row", "col"):
        check_op(backend, x, w, None, labels, centers_per_class=2, scale=3.0, reduce=reduce)


@pytest.mark.parametrize("backend", BACKENDS)
def test_proxies_as_rows(backend):
    """The proxy-repel use: x and w the same tensor, labels = arange(C) (each proxy leaves itself out)."""
    x, _, _, _ = make_inputs(n=21, k=1, seed=9)
    for reduce in ("row", "col"):
        check_op(backend, x, x, None, torch.arange(21, device=DEVICE), scale=16.0, shift=1.6, reduce=reduce)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduce", ["row", "col"])
def test_large_scale_aligned(backend, reduce):
    """scale=64, gamma=0.1 on nearly aligned fp32 vectors: z close to 64 everywhere, no overflow."""
    g = gen(10)
    base = torch.randn(1, D, generator=g)
    x = (base + 1e-2 * torch.randn(N, D, generator=g)).to(DEVICE).requires_grad_()
    w = (base + 1e-2 * torch.randn(C * K, D, generator=g)).to(DEVICE).requires_grad_()
    labels = torch.randint(0, C, (N,), generator=g).to(DEVICE)
    out, _ = check_op(backend, x, w, None, labels, rtol=1e-3, centers_per_class=K, scale=64.0, shift=6.4,
                      reduce=reduce)
    assert out.min() > 64.0  # every term is near 64 + 6.4, so no term was lost to overflow


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduce", ["row", "col"])
@pytest.mark.parametrize("wanted", ["x", "w"])
def test_partial_requires_grad(backend, reduce, wanted):
    x, w, b, labels = make_inputs(seed=11)
    (w if wanted == "x" else x).requires_grad_(False)
    check_op(backend, x, w, b, labels, centers_per_class=K, scale=4.0, reduce=reduce)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduce", ["row", "col"])
def test_gradcheck(backend, reduce):
    x, w, b, labels = make_inputs(n=6, c=5, k=2, d=4, bias=True, seed=12)
    labels = torch.tensor([0, 1, 1, 3, 0, 7], device=DEVICE)  # 7: outside the classes
    fn = functools.partial(class_lse, labels=labels, centers_per_class=2, gamma=0.5, scale=2.0, shift=0.1,
                           reduce=reduce, impl=backend, block_classes=2 if backend == "chunked" else 0)
    assert torch.autograd.gradcheck(lambda x, w, b: fn(x, w, bias=b), (x, w, b))


OPCHECK = [(impl, dtype, k, bias, reduce) for impl in ("auto", "triton", "gemm") for dtype in (F32, F64) for k in (1, 3)
           for bias in (False, True) for reduce in ("row", "col")]


@pytest.mark.parametrize("impl,dtype,k,bias,reduce", OPCHECK,
                         ids=[f"{i}-{str(t)[6:]}-K{k}-{'bias' if b else 'nobias'}-{r}" for i, t, k, b, r in OPCHECK])
def test_opcheck(impl, dtype, k, bias, reduce):
    """torch.library.opcheck: schema, fake kernel, autograd registration and AOT dispatch (dynamic shapes) of
    metricloss_kernels::class_lse ("auto" runs the device's implementation: chunked on CPU, Triton on CUDA)."""
    x, w, b, labels = make_inputs(n=9, c=5, k=k, d=6, dtype=dtype, bias=bias, seed=13)
    labels[0] = 5  # outside the classes
    spec = LSESpec(k, 0.5, 2.0, 0.1, True, True, reduce, impl)
    torch.library.opcheck(torch.ops.metricloss_kernels.class_lse.default, (x, w, labels, b, *spec.args()))


@pytest.mark.parametrize("impl", ["auto", "triton", "gemm"])
@pytest.mark.parametrize("k", [1, 3])
def test_opcheck_row_offset(impl, k):
    """The op and its backward op with the optional row offset (the last argument)."""
    x, w, b, labels = make_inputs(n=9, c=5, k=k, d=6, dtype=F32, bias=True, seed=15)
    offset = torch.randn(9, generator=gen(16)).requires_grad_()
    spec = LSESpec(k, 0.5, 2.0, 0.1, True, True, "row", impl)
    torch.library.opcheck(torch.ops.metricloss_kernels.class_lse.default, (x, w, labels, b, *spec.args(), offset))
    out = class_lse(x, w, labels, bias=b, centers_per_class=k, gamma=0.5, scale=2.0, shift=0.1, impl=impl,
                    offset=offset)
    torch.library.opcheck(torch.ops.metricloss_kernels.class_lse_backward.default,
                          (torch.randn_like(out), out.detach(), x.detach(), w.detach(), labels, b.detach(),
                           *spec.args(), True, True, True, offset.detach()),
                          test_utils=("test_schema", "test_faketensor"))


# Several row and class tiles, and several programs on the streamed axis, for each implementation.
OFFSET_TILINGS = [("chunked", {}), ("chunked", dict(block_rows=8, block_classes=11)),
                  ("triton", {}), ("triton", dict(block_d=16, num_splits=3)),
                  ("gemm", {}), ("gemm", dict(block_rows=8, block_classes=11, num_splits=3))]


@pytest.mark.parametrize("backend,tiles", OFFSET_TILINGS, ids=[f"{b}-{t}" for b, t in OFFSET_TILINGS])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("c", [C, 1], ids=["classes", "one_class"])
def test_row_offset_is_subtracted_inside_the_lse(backend, tiles, k, c):
    """offset [N] (random, of the size of the logits): out_i = LSE_{c != y_i} (z_ic - offset_i), forward and every
    gradient (d out_i / d offset_i = -1; 0 for an empty LSE: one class) against the float64 oracle minus the
    offset."""
    one_class = torch.zeros(N, dtype=torch.long) if c == 1 else None
    x, w, b, labels = make_inputs(c=c, k=k, bias=True, seed=17, labels=one_class)
    offset = (4 * torch.randn(N, generator=gen(18), dtype=F64)).to(DEVICE).requires_grad_()
    kw = dict(centers_per_class=k, scale=3.0, shift=0.2)
    out = class_lse(x, w, labels, bias=b, impl=backend, offset=offset, **kw, **tiles)
    leaves = [t.detach().requires_grad_() for t in (x, w, b, offset)]
    expected = oracle(*leaves[:2], labels, leaves[2], **kw) - leaves[3]
    assert_close(out, expected, tol(backend, x.dtype), "forward")
    upstream = torch.randn(N, generator=gen(20), dtype=F64).to(DEVICE)
    got = torch.autograd.grad(out, (x, w, b, offset), upstream)
    want = torch.autograd.grad(expected, leaves, upstream.masked_fill(expected == float("-inf"), 0))
    for name, g, e in zip(("x", "w", "bias", "offset"), got, want):
        assert_close(g, e, tol(backend, x.dtype), f"grad {name}")


@pytest.mark.parametrize("impl", ["auto", "triton", "gemm"])
def test_opcheck_backward_op(impl):
    """The backward is a registered op too: its schema and fake kernel (empty tensors for unneeded gradients)."""
    x, w, b, labels = make_inputs(n=9, c=5, k=2, d=6, dtype=F32, bias=True, seed=14)
    x, w, b = x.detach(), w.detach(), b.detach()
    spec = LSESpec(2, 0.5, 2.0, 0.1, True, True, "col", impl)
    out = class_lse(x, w, labels, bias=b, centers_per_class=2, gamma=0.5, scale=2.0, shift=0.1, reduce="col",
                    impl=impl)
    op = torch.ops.metricloss_kernels.class_lse_backward.default
    for need in ((True, True, True), (True, False, False), (False, True, False)):
        torch.library.opcheck(op, (torch.randn_like(out), out, x, w, labels, b, *spec.args(), *need),
                              test_utils=("test_schema", "test_faketensor"))


def test_chunked_reads_no_tensor_data():
    """The chunked implementation runs, forward and backward, on fake tensors (which have no data): its tile plan
    and masks follow from the shapes alone, so nothing is read back to the host."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, w = torch.randn(N, D), torch.randn(C * K, D)
        labels, bias = torch.randint(0, C, (N,)), torch.randn(C)
        for reduce, pool in (("row", "softmax"), ("col", "softmax"), ("row", "max"), ("col", "max")):
            spec = LSESpec(K, 0.1, 3.0, 0.5, True, True, reduce, "chunked", 8, 11, pool=pool)
            out = chunked.forward(x, w, labels, bias, spec)
            dx, dw, db = chunked.backward(torch.ones_like(out), out, x, w, labels, bias, spec, True, True, True)
            assert (dx.shape, dw.shape, db.shape) == (x.shape, w.shape, bias.shape)


# --------------------------------------------------------------------------------------- implementation details
class GlobalTraffic:
    """Counts, through the Triton interpreter's builder (one method per masked load, store, atomic and dot), the
    bytes every kernel stores to global memory, the atomic operations it issues and the multiply-adds of its
    tl.dots."""

    def __init__(self, monkeypatch):
        from triton.runtime.interpreter import interpreter_builder as builder

        self.stored, self.atomics, self.macs = 0, 0, 0
        store, dot = builder.create_masked_store, builder.create_dot

        def counted_store(ptrs, value, mask, cache_policy):
            self.stored += int(mask.data.sum()) * ptrs.get_element_ty().primitive_bitwidth // 8
            return store(ptrs, value, mask, cache_policy)

        def atomic(method):
            def counted(*args, **kwargs):
                self.atomics += 1
                return method(*args, **kwargs)
            return counted

        def counted_dot(a, b, *args):
            (m, r), n = a.data.shape, b.data.shape[1]
            self.macs += m * r * n
            return dot(a, b, *args)

        monkeypatch.setattr(builder, "create_masked_store", counted_store)
        monkeypatch.setattr(builder, "create_dot", counted_dot)
        for name in ("create_atomic_rmw", "create_atomic_cas"):
            monkeypatch.setattr(builder, name, atomic(getattr(builder, name)))


@pytest.mark.skipif(DEVICE == "cuda", reason="counts through the Triton interpreter")
@pytest.mark.parametrize("reduce", ["row", "col"])
def test_triton_backward_writes_each_gradient_once(monkeypatch, reduce):
    """With small forced tiles and one split, the backward stores at most 1.5x the bytes of dX, dW and dbias in
    fp32 (plus 64 KiB for the per-row and per-class vectors) however many tiles it streams (classes for the row
    reduce, rows for the column reduce), and no kernel issues an atomic, forward or backward. (The kernels this
    replaced read-modify-wrote dX or dW once per streamed tile and added the column reduce's dX by atomics.)"""
    traffic = GlobalTraffic(monkeypatch)
    k, d, tiles = 3, 64, dict(block_rows=16, block_classes=16, block_d=32, num_splits=1)
    for streamed in (2, 8):
        n, c = (64, 16 * streamed) if reduce == "row" else (16 * streamed, 20)
        x, w, b, labels = make_inputs(n=n, c=c, k=k, d=d, dtype=F32, bias=True, seed=18 + streamed)
        out = class_lse(x, w, labels, bias=b, centers_per_class=k, scale=4.0, reduce=reduce, impl="triton", **tiles)
        traffic.stored = 0
        torch.autograd.grad(out, (x, w, b), torch.randn(out.shape, generator=gen(streamed)).to(DEVICE))
        gradients = (n * d + c * k * d + c) * 4
        assert 0 < traffic.stored <= 1.5 * gradients + 64 * 2**10, (streamed, traffic.stored, gradients)
    assert traffic.atomics == 0


@pytest.mark.skipif(DEVICE == "cuda", reason="counts through the Triton interpreter")
@pytest.mark.parametrize("k,slots", [(1, 1), (3, 3), (7, 8), (10, 10)])
def test_triton_backward_dots_skip_padding_slots(monkeypatch, k, slots):
    """The backward's four GEMMs (each kernel's recomputed logits, dX, dW) run over `slots` proxy slots a class:
    K itself, or K = 7 as 4 + 4 (one padded slot), where padding K to the next power of two in one dot made
    K = 3 and K = 10 pay 4 and 16 (tiles that divide the sizes: no masked rows or classes)."""
    traffic = GlobalTraffic(monkeypatch)
    n, c, d = 32, 16, 32
    x, w, b, labels = make_inputs(n=n, c=c, k=k, d=d, dtype=F32, bias=True, seed=25)
    out = class_lse(x, w, labels, bias=b, centers_per_class=k, scale=4.0, impl="triton", block_rows=16,
                    block_classes=16, block_d=16, num_splits=1)
    traffic.macs = 0
    torch.autograd.grad(out, (x, w, b), torch.ones_like(out))
    assert traffic.macs == 4 * n * d * c * slots


@cuda_only
def test_triton_backward_is_deterministic():
    """Several splits of the class tiles (dX partials summed in split order), both reductions: the same bits from
    call to call (on a GPU, where atomics would reorder the sums; the interpreter runs programs in order)."""
    n, c = 1000, 3001
    x, w, b, labels = make_inputs(n=n, c=c, k=K, d=200, dtype=F32, bias=True, seed=16)
    for reduce in ("row", "col"):
        kw = dict(centers_per_class=K, scale=8.0, bias=b, reduce=reduce, impl="triton", num_splits=3)
        up = torch.randn(n if reduce == "row" else c, generator=gen(0)).to(DEVICE)
        first, second = (torch.autograd.grad(class_lse(x, w, labels, **kw), (x, w, b), up) for _ in range(2))
        assert all(torch.equal(a, r) for a, r in zip(first, second))


def test_triton_availability():
    from metricloss_kernels import triton as kernels
    assert kernels.is_available(DEVICE) and kernels.unavailable_reason(DEVICE) is None


def test_auto_impl_follows_the_device(monkeypatch):
    """impl="auto": chunked for CPU tensors, whatever Triton can do under the interpreter."""
    calls = []
    original = chunked.forward
    monkeypatch.setattr(chunked, "forward", lambda *a: calls.append(1) or original(*a))
    x, w, b, labels = make_inputs(k=1, seed=17)
    class_lse(x.detach().cpu(), w.detach().cpu(), labels.cpu())
    assert calls == [1]


# ------------------------------------------------------------------------------------------------ memory
# (backend, loss, N, C, K, D, tiles): sizes where the N x C logits dwarf W, dW and everything else; the
# interpreter's are smaller (it is slow), with tiles larger than its defaults to keep the program count low.
MEMORY = [("chunked", "soft_triple_loss", 256, 16000, 4, 8, {}), ("chunked", "proxy_anchor_loss", 256, 32000, 1, 8, {}),
          ("triton", "soft_triple_loss", 128, 2000, 4, 4, dict(block_rows=64, block_classes=128)),
          ("triton", "proxy_anchor_loss", 128, 8000, 1, 4, dict(block_rows=64, block_classes=128))]


@pytest.mark.parametrize("backend,name,n,c,k,d,tiles", MEMORY, ids=[f"{m[0]}-{m[1]}" for m in MEMORY])
def test_no_n_by_c_allocation(backend, name, n, c, k, d, tiles):
    """Forward + backward of the streamed loss never allocates N*C*4/2 bytes at once, while the reference does (so
    the check can fail). On a GPU the sizes are 8 x 10 times larger, so that the peak of all temporaries together
    stays far below the limit too."""
    if DEVICE == "cuda":
        n, c = 8 * n, 10 * c
    g = gen(30)
    x = torch.randn(n, d, generator=g).to(DEVICE).requires_grad_()
    w = torch.randn(c * k, d, generator=g).to(DEVICE).requires_grad_()
    labels = torch.randint(0, c, (n,), generator=g).to(DEVICE)
    kw = {"centers_per_class": k} if k > 1 else {}
    lse = functools.partial(class_lse, impl=backend, **tiles)

    def step(fn):
        return lambda: torch.autograd.grad(fn(x, labels, w, **kw), (x, w))

    limit = n * c * 4 // 2
    assert largest_allocation(step(getattr(reference, name))) >= limit
    assert largest_allocation(step(functools.partial(getattr(fused, name), lse=lse))) < limit


def test_chunked_half_proxies_are_not_copied_to_fp32_whole():
    """fp16 proxies are converted tile by tile: no allocation as large as an fp32 copy of W."""
    g = gen(31)
    x = torch.randn(64, 16, generator=g).half().requires_grad_()
    w = torch.randn(256_000, 16, generator=g).half().requires_grad_()  # 8 MB; in fp32 16 MB, the tiles 4 MB
    labels = torch.randint(0, 256_000, (64,), generator=g)

    def run():
        out = class_lse(x, w, labels, scale=10.0, reduce="row", impl="chunked")
        torch.autograd.grad(out.sum(), (x, w))

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    largest = max(e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    assert largest < w.numel() * 4 * 3 // 4  # the fp16 gradient (numel * 2) is fine


# ----------------------------------------------------------------------------------- every proxy loss
# (name, K, kwargs): K = 0 for the polytope loss (fixed weights: no proxies, width polytope_dim(C)); bias=True stands
# for a random [C] bias.
LOSS_CASES = [
    ("proxy_nca_loss", 1, dict(exclude_positive=True)),
    ("proxy_nca_loss", 1, dict(scale=8.0, exclude_positive=False)),
    ("proxy_anchor_loss", 1, {}),
    ("soft_triple_loss", K, dict(centers_per_class=K)),
    ("mpa_loss", K, dict(centers_per_class=K, variant="mpa")),
    ("mpa_loss", K, dict(centers_per_class=K, variant="dw")),
    ("mpa_loss", K, dict(centers_per_class=K, variant="ap")),
    ("mpa_loss", 1, dict(centers_per_class=1, tau=0.0)),
    ("arcface_loss", 1, {}),
    ("cosface_loss", 1, {}),
    ("l2_softmax_loss", 1, {}),
    ("l2_softmax_loss", 1, dict(bias=True)),
    ("l2_softmax_loss", 1, dict(normalize_weights=True)),
    ("l2_softmax_loss", 1, dict(bias=True, normalize_weights=True)),
    ("regular_polytope_loss", 0, dict(polytope="simplex")),
    ("regular_polytope_loss", 0, dict(polytope="orthoplex", margin=0.0)),
    ("regular_polytope_loss", 0, dict(polytope="cube", margin=20.0)),
    ("proxy_repel_loss", 1, dict(variant="proxies")),
    ("proxy_repel_loss", 1, dict(variant="batch")),
]
LOSS_IDS = [name.removesuffix("_loss") + "".join(f"-{a}={v}" for a, v in kw.items() if a != "centers_per_class")
            for name, _, kw in LOSS_CASES]
# name: (labels, geometry, dtype, tolerance against the float64 reference on the same values). "aligned": every
# proxy within ~3 degrees of one direction and each embedding within ~3 degrees of a proxy of its class, so that
# every logit is near the (large default) scale: no overflow, no NaN. (Closer than that, ArcFace's
# d sqrt(1 - c^2) / dc ~ 1 / angle amplifies fp32's rounding of the target cosine past 1e-3 in the fp32 reference
# as well: that is conditioning, not the kernels.)
SETTINGS = {
    "random": ("random", "random", F64, 1e-10),
    "one_per_class": ("one_per_class", "random", F32, 1e-4),
    "one_class": ("one_class", "random", F32, 1e-4),
    "aligned": ("random", "aligned", F32, 1e-3),
    "fp16": ("random", "random", F16, 5e-3),
}
# Tiles for the streamed losses: several class tiles at C = 53 (Triton's interpreter default, 16 classes, already
# does that; its tiles must be powers of two).
LOSS_TILES = {"chunked": dict(block_classes=7), "triton": {}, "gemm": dict(block_classes=7)}


def loss_inputs(name, k, kwargs, labels_kind, geometry, dtype, seed, n=N, c=C, d=D):
    """(embeddings, labels, weights or num_classes, kwargs) in `dtype`, leaves requiring grad, on DEVICE."""
    g = gen(seed)
    labels = {"random": lambda: torch.randint(0, c, (n,), generator=g),
              "one_per_class": lambda: torch.randperm(c, generator=g)[:n],
              "one_class": lambda: torch.full((n,), 3, dtype=torch.long)}[labels_kind]()
    if name == "regular_polytope_loss":
        w = regular_polytope(kwargs["polytope"], c).double()
        d = w.shape[1]
    else:
        w = torch.randn(c * k, d, generator=g, dtype=F64)
    if geometry == "aligned":
        if name != "regular_polytope_loss":
            w = torch.randn(d, generator=g, dtype=F64) + 0.05 * w
        x = F.normalize(w, dim=1)[labels * max(k, 1)] + 1e-2 * torch.randn(n, d, generator=g, dtype=F64)
    else:
        x = torch.randn(n, d, generator=g, dtype=F64)
    x = x.to(DEVICE, dtype).requires_grad_()
    kwargs = dict(kwargs)
    if kwargs.get("bias") is True:
        kwargs["bias"] = torch.randn(c, generator=g, dtype=F64).to(DEVICE, dtype).requires_grad_()
    if name == "regular_polytope_loss":
        return x, labels.to(DEVICE), c, kwargs
    return x, labels.to(DEVICE), w.to(DEVICE, dtype).requires_grad_(), kwargs


def loss_and_grads(fn, x, labels, w, kwargs, upstream):
    """fn(x, labels, w, **kwargs) and its gradients w.r.t. every leaf (embeddings, proxies, bias)."""
    loss = fn(x, labels, w, **kwargs)
    leaves = [t for t in (x, w, kwargs.get("bias")) if torch.is_tensor(t)]
    return loss, leaves, torch.autograd.grad(loss, leaves, torch.full_like(loss, upstream))


def check_loss(name, k, kwargs, setting, fn, seed=20):
    """fn (the loss on some backend) against the reference in float64 on the same values: value and gradients."""
    labels_kind, geometry, dtype, rtol = SETTINGS[setting]
    if geometry == "aligned" and name == "proxy_nca_loss":
        kwargs = dict(kwargs, scale=64.0)
    x, labels, w, kwargs = loss_inputs(name, k, kwargs, labels_kind, geometry, dtype, seed)
    upstream = 0.5 + torch.rand((), generator=gen(seed + 1)).item()
    loss, leaves, grads = loss_and_grads(fn, x, labels, w, kwargs, upstream)
    ref_x = x.detach().double().requires_grad_()
    ref_w = w.detach().double().requires_grad_() if torch.is_tensor(w) else w
    ref_kwargs = {a: v.detach().double().requires_grad_() if torch.is_tensor(v) else v for a, v in kwargs.items()}
    ref, _, ref_grads = loss_and_grads(getattr(reference, name), ref_x, labels, ref_w, ref_kwargs, upstream)
    assert loss.dtype == dtype and loss.shape == ()
    assert torch.isfinite(loss) and torch.isfinite(ref)
    assert_close(loss.detach(), ref.detach(), rtol, f"{name} loss")
    for what, got, want, leaf in zip(("embeddings", "proxies", "bias"), grads, ref_grads, leaves):
        assert got.dtype == leaf.dtype and got.shape == leaf.shape, what
        assert torch.isfinite(got).all(), f"{name} d{what}: non-finite"
        assert_close(got, want, rtol, f"{name} d{what}")


# gemm (its epilogues interpreted on CPU) takes every loss through the settings that change its code path: the
# public API, large logits, fp16 (the label layouts are the other implementations' and the oracle tests' concern).
LOSS_SETTINGS = [(b, s) for b in BACKENDS for s in SETTINGS if b != "gemm" or s in ("random", "aligned", "fp16")]


@pytest.mark.parametrize("backend,setting", LOSS_SETTINGS, ids=[f"{s}-{b}" for b, s in LOSS_SETTINGS])
@pytest.mark.parametrize("name,k,kwargs", LOSS_CASES, ids=LOSS_IDS)
def test_streamed_loss_matches_reference(backend, name, k, kwargs, setting):
    """"random": through the public functional API with backend= (default tiles); the other settings through
    fused's function with several class tiles."""
    if setting == "random":
        fn = functools.partial(getattr(mlk.functional, name), backend=backend)
    else:
        lse = functools.partial(class_lse, impl=backend, **LOSS_TILES[backend])
        fn = functools.partial(getattr(fused, name), lse=lse)
    check_loss(name, k, kwargs, setting, fn)


@pytest.mark.parametrize("dtype", [F64, F16])
def test_streamed_regularizer_matches_reference(monkeypatch, dtype):
    """fused's streamed R(W) (several blocks, the last one short) against reference.proxy_regularizer."""
    monkeypatch.setattr(fused, "_REGULARIZER_BLOCK_BYTES", 7 * K * D * 4)
    w = torch.randn(C * K, D, generator=gen(21), dtype=F64)
    if dtype == F64:
        w[5] = 0  # a zero proxy: its norm is clamped (its 1e12-scaled gradient would overflow fp16)
    w = w.to(dtype).requires_grad_()
    w_ref = w.detach().to(F64).requires_grad_()
    value, ref = fused._ProxyRegularizer.apply(w, K, compute_dtype(dtype)), reference.proxy_regularizer(w_ref, K)
    (grad,), (ref_grad,) = torch.autograd.grad(value, w), torch.autograd.grad(ref, w_ref)
    assert grad.dtype == dtype
    assert_close(value, ref, TOL[dtype], "R(W)")
    assert_close(grad, ref_grad, TOL[dtype], "grad R(W)")
    if dtype == F64:
        sub = w[12:24, :4].detach().clone().requires_grad_()
        assert torch.autograd.gradcheck(lambda v: fused._ProxyRegularizer.apply(v, 3, F64), (sub,))


@pytest.mark.parametrize("margin", [28.6, 120.0])
def test_triton_fp16_arcface_aligned_rows_and_huge_proxies(margin):
    """fp16 ArcFace through the kernels, every embedding equal to another class's proxy (the LSE's gradient of a
    cosine at angle 0 is the difference of two equal terms, so it is all rounding), beside proxies of norm ~1e4:
    within the fp16 tolerance of the reference, relative to max(0.1, the largest entry) as the fuzz suite checks
    it. The proxies' gradients were 6-17% off: x^ was rounded to fp16 before the dots and the gradient operands
    were plain fp16. (Along their own proxy, ArcFace's target term is ill-conditioned, d theta / d cos =
    -1 / sin theta, in every backend: not a kernel matter.)"""
    g = gen(50)
    c, d = 5, 8
    w = torch.randn(c, d, generator=g, dtype=F64)
    w[::2] *= 3e3  # (fp16 overflows at 65504)
    w[1::2] *= 0.2
    other = torch.tensor([1, 3, 1, 3])
    labels = (other + 1) % c
    x = w[other]
    x, w = x.half(), w.half()
    results = []
    for backend in ("reference", "triton"):
        leaves = (x.clone().to(DEVICE).requires_grad_(), w.clone().to(DEVICE).requires_grad_())
        loss = mlk.functional.arcface_loss(*leaves[:1], labels.to(DEVICE), leaves[1], margin=margin, backend=backend)
        results.append((loss, *torch.autograd.grad(loss, leaves)))
    (ref, *ref_grads), (loss, *grads) = results
    assert_close(loss.double(), ref.double(), TOL[F16], "loss", floor=1.0)
    for what, got, want in zip(("embeddings", "proxies"), grads, ref_grads):
        assert_close(got.double(), want.double(), TOL[F16], f"d {what}", floor=0.1)


# ------------------------------------------------------------- the normalisation rules (_numerics), every backend
ALL_BACKENDS = ["reference", *BACKENDS]
# One loss per code path of the normalisation: row LSE (x and W normalised), column LSE, K > 1 (+ R(W)), ArcFace
# (target cosines), NormFace (W normalised, no margin).
RULE_CASES = [case for case in LOSS_CASES if case[0] in ("proxy_nca_loss", "proxy_anchor_loss", "soft_triple_loss",
                                                         "arcface_loss")
              and case[2].get("exclude_positive", True)] + [("l2_softmax_loss", 1, dict(normalize_weights=True))]
RULE_IDS = [name.removesuffix("_loss") for name, *_ in RULE_CASES]


def rule_loss(backend, name, kwargs):
    """The loss `name` of the public API on `backend` ("reference" included), tiled for the streamed backends."""
    if backend == "reference":
        return getattr(reference, name)
    return functools.partial(getattr(fused, name), lse=functools.partial(class_lse, impl=backend,
                                                                         **LOSS_TILES[backend]))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("x_dtype,w_dtype", [(F16, F16), (F16, F32), (F32, F32)], ids=["fp16", "fp16-fp32", "fp32"])
@pytest.mark.parametrize("name,k,kwargs", RULE_CASES, ids=RULE_IDS)
def test_dead_rows_get_zero_gradient_not_inf(backend, name, k, kwargs, x_dtype, w_dtype):
    """A zero or underflowing row (a dead embedding or proxy) has no direction: its normalisation is constant there
    and the row gets a zero gradient, in every backend. Through the clamp of max(||x||, 1e-12) the gradient was
    1e12 g: Inf/NaN in fp16, a wrecking step in fp32."""
    n, c, d = 12, 7, 16
    g = gen(30)
    x = torch.randn(n, d, generator=g, dtype=F64)
    x[2] = 0
    x[5] = 1e-14  # norm 4e-14 <= eps; 0 in fp16
    w = torch.randn(c * k, d, generator=g, dtype=F64)
    w[1] = 0
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 1])
    x, w = x.to(DEVICE, x_dtype).requires_grad_(), w.to(DEVICE, w_dtype).requires_grad_()
    fn = rule_loss(backend, name, kwargs)
    loss, _, (gx, gw) = loss_and_grads(fn, x, labels.to(DEVICE), w, kwargs, 1.0)
    assert torch.isfinite(loss) and torch.isfinite(gx).all() and torch.isfinite(gw).all()
    assert (gx[[2, 5]] == 0).all() and (gw[1] == 0).all()
    assert (gx.abs().sum(1) > 0).sum() == n - 2  # every live row learns
    ref_x, ref_w = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref, _, ref_grads = loss_and_grads(getattr(reference, name), ref_x, labels.to(DEVICE), ref_w, kwargs, 1.0)
    rtol = 5e-3 if F16 in (x_dtype, w_dtype) else 1e-4
    assert_close(loss.double(), ref, rtol, "loss")
    assert_close(gx, ref_grads[0].to(gx.dtype), rtol, "d embeddings")
    assert_close(gw, ref_grads[1].to(gw.dtype), rtol, "d proxies")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("w_dtype", [F32, F64])
@pytest.mark.parametrize("name,k,kwargs", RULE_CASES, ids=RULE_IDS)
def test_overflowing_norms_are_normalised(backend, name, k, kwargs, w_dtype):
    """fp32 rows of norm 1e20..1e36 (their squared norms overflow fp32) are normalised like any other row: the loss
    is that of the unscaled rows and the gradient that of the unscaled rows divided by the scale (L(s x) = L(x)).
    A plain sum of squares normalised them to 0 (every backend), and Triton's gradients were non-finite."""
    n, c, d = 12, 7, 16
    g = gen(31)
    x = torch.randn(n, d, generator=g, dtype=F64)
    w = torch.randn(c * k, d, generator=g, dtype=F64)
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 1], device=DEVICE)
    x_scale = 10.0 ** torch.linspace(20, 36, n, dtype=F64)[:, None]
    w_scale = 10.0 ** torch.linspace(20, 30, c * k, dtype=F64)[:, None]
    fn = rule_loss(backend, name, kwargs)
    results = []
    for xs, ws in ((1.0, 1.0), (x_scale, w_scale)):
        xi = (x * xs).to(DEVICE, F32).requires_grad_()
        wi = (w * ws).to(DEVICE, w_dtype).requires_grad_()
        loss, _, (gx, gw) = loss_and_grads(fn, xi, labels, wi, kwargs, 1.0)
        assert torch.isfinite(loss) and torch.isfinite(gx).all() and torch.isfinite(gw).all()
        results.append((loss, gx.double() * xs, gw.double() * ws))
    for what, big, small in zip(("loss", "d embeddings", "d proxies"), results[1], results[0]):
        assert_close(big.double(), small.double(), 1e-4, what)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("x_dtype,w_dtype", [(F64, F32), (F32, F64)], ids=["fp64-fp32", "fp32-fp64"])
def test_mixed_precision_losses_compute_in_the_wider_dtype(backend, x_dtype, w_dtype):
    """fp64 embeddings with fp32 proxies (or the reverse) are computed in fp64, as the reference casts them: the
    target cosines and R(W) took their dtype from one input only (relative error ~2e-9 against the reference)."""
    x, labels, w, kwargs = loss_inputs("soft_triple_loss", K, dict(centers_per_class=K), "random", "random", F64, 32)
    x = x.detach().to(x_dtype).requires_grad_()
    w = w.detach().to(w_dtype).requires_grad_()
    fn = rule_loss(backend, "soft_triple_loss", kwargs)
    loss, _, grads = loss_and_grads(fn, x, labels, w, kwargs, 1.0)
    ref_x, ref_w = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref, _, ref_grads = loss_and_grads(reference.soft_triple_loss, ref_x, labels, ref_w, kwargs, 1.0)
    # each result in its own dtype (the loss in the embeddings'): fp32 ones match up to their final rounding
    for what, got, want in zip(("loss", "d embeddings", "d proxies"), (loss, *grads), (ref, *ref_grads)):
        assert_close(got.double(), want.to(got.dtype).double(), 1e-12 if got.dtype == F64 else 1e-6, what)

@pytest.mark.parametrize("dtype", [BF16, F16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name,kwargs", [("soft_triple_loss", {}), ("mpa_loss", dict(variant="mpa")),
                                         ("mpa_loss", dict(variant="dw"))], ids=["soft_triple", "mpa", "mpa-dw"])
def test_half_gradient_terms_are_summed_before_rounding(name, kwargs, dtype):
    """Half-precision embeddings and proxies on the chunked backend, clustered (embeddings around one direction,
    proxies around another): each gradient of x and W is the sum of terms of O(scale) from the LSE, the target
    similarities and R(W) that nearly cancel. Rounded to bf16 term by term before autograd added them, the
    gradients were up to 68% (x) and 26% (W) off; summed in fp32 and rounded once, they are within the dtype's
    tolerance of the float64 reference on the same values, relative to their own scale."""
    g = gen(1)
    n, c, k, d = 35, 7, 3, 40  # balanced classes: the terms cancel
    u, v = torch.randn(2, d, generator=g, dtype=F64)
    x = (u + 0.02 * torch.randn(n, d, generator=g, dtype=F64)).to(dtype)
    w = (v + 0.02 * torch.randn(c * k, d, generator=g, dtype=F64)).to(dtype)
    labels = torch.randperm(n, generator=g) % c
    fn = getattr(mlk.functional, name)
    grads = {}
    for backend, t in (("chunked", dtype), ("reference", F64)):
        leaves = [x.to(t).requires_grad_(), w.to(t).requires_grad_()]
        loss = fn(*leaves[:1], labels, leaves[1], centers_per_class=k, backend=backend, **kwargs)
        grads[backend] = torch.autograd.grad(loss, leaves)
    for what, got, want in zip(("d embeddings", "d proxies"), grads["chunked"], grads["reference"]):
        assert got.dtype == dtype
        assert_close(got.double(), want, TOL[dtype], what)


def tied_huge_logits(dtype, huge, n=N, c=C, d=D, directions=5, seed=0):
    """Cross-entropy inputs whose logits are exact and tied at a huge magnitude: unit embeddings e_j and proxies
    huge * e_k (every norm a power of two: x^ and w^ are exact), j and k among a few directions, each label a class
    of its row's direction. The logits s x^ . w (s huge * 16 for L2-softmax, `huge` for the proxy losses) are that
    or 0; row i's target ties with the `ties[i]` classes of its direction. Returns (x, labels, w, ties)."""
    g = gen(seed)
    k = torch.randint(0, directions, (c,), generator=g)
    k[:directions] = torch.arange(directions)  # every direction has a class
    j = k[torch.randint(0, c, (n,), generator=g)]
    same = j[:, None] == k[None, :]  # [N, C]: the classes tied with row i's target
    labels = torch.multinomial(same.double(), 1, generator=g).squeeze(1)
    x = torch.eye(d, dtype=F64)[j]
    w = huge * torch.eye(d, dtype=F64)[k]
    return x.to(DEVICE, dtype), labels.to(DEVICE), w.to(DEVICE, dtype), same.sum(1)


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
@pytest.mark.parametrize("dtype,huge", [(F32, 2.0 ** 100), (F64, 2.0 ** 600)], ids=["fp32", "fp64"])
@pytest.mark.parametrize("name,kwargs", [("l2_softmax_loss", {}), ("proxy_nca_loss", dict(exclude_positive=False)),
                                         ("proxy_nca_loss", dict(exclude_positive=True))],
                         ids=["l2_softmax", "proxy_nca-softmax", "proxy_nca"])
def test_cross_entropy_of_huge_tied_logits(backend, dtype, huge, name, kwargs):
    """A row-wise CE is LSE_c z_c - t relative to the target logit t. With |t| = 2^104 (fp32) the LSE taken first
    and t subtracted after keeps nothing below 2^81: the loss came out 0 where it is log(number of classes tied
    with the target) (minus one without the positive). Loss and gradients against the float64 CE of the same
    (exact) logits, computed relative to t; both against the count. (Triton and gemm subtracted t after their LSE;
    Triton's dX kept ~2^-24 |t| where its terms along x^ cancel: its normalisation backward took <x^, dX^> from
    the logits, a sum rounded apart from the accumulator's.)"""
    x, labels, w, ties = tied_huge_logits(dtype, huge)
    if name == "proxy_nca_loss":
        kwargs = dict(kwargs, scale=huge)
    leaves = [x.requires_grad_(), w.requires_grad_()]
    loss = getattr(mlk.functional, name)(x, labels, w, backend=backend, **kwargs)
    grads = torch.autograd.grad(loss, leaves)

    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    s = kwargs.get("scale", 16.0)
    w_hat = w64 if name == "l2_softmax_loss" else F.normalize(w64 / huge, dim=1)  # (||w||^2 overflows)
    z = s * (x64 / x64.norm(dim=1, keepdim=True)) @ w_hat.T
    own = labels[:, None] == torch.arange(z.shape[1], device=z.device)
    t = z.gather(1, labels[:, None])
    exclude = kwargs.get("exclude_positive", False)
    expected = torch.logsumexp((z - t).masked_fill(own & exclude, float("-inf")), dim=1).mean()
    assert_close(expected.detach(), (ties - int(exclude)).double().log().mean(), 1e-12, "oracle vs the count")
    assert_close(loss.double(), expected.detach(), TOL[dtype], "loss", floor=1.0)
    for what, got, want in zip(("d embeddings", "d proxies"), grads, torch.autograd.grad(expected, (x64, w64))):
        assert torch.isfinite(got).all(), what
        assert_close(got.double(), want, TOL[dtype], what)


# ------------------------------------------------------------------------------------------------ GPU only
@cuda_only
@pytest.mark.parametrize("backend", ["triton", "gemm"])
@pytest.mark.parametrize("reduce", ["row", "col"])
@pytest.mark.parametrize("k", [1, 10])
def test_triton_bf16_on_gpu(reduce, k, backend):
    """bf16 Triton, and gemm's bf16 GEMMs with fp32 results, at a DESIGN-sized shape (gemm: several chunks). GPU
    only: under the interpreter (CPU) tl.dot computes bf16 products wrongly, and torch has no CPU GEMM of bf16
    into fp32; the CPU suite covers fp16, fp32 and fp64."""
    x, w, b, labels = make_inputs(n=1024, c=2000, k=k, d=512, dtype=BF16, bias=True, seed=40)
    tiles = dict(block_classes=300) if backend == "gemm" else {}
    check_op(backend, x, w, b, labels, centers_per_class=k, scale=32.0, reduce=reduce, **tiles)


@cuda_only
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduce", ["row", "col"])
def test_fp32_large_awkward_on_gpu(backend, reduce):
    x, w, b, labels = make_inputs(n=1000, c=3001, k=3, d=200, dtype=F32, bias=True, seed=41)
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # exact fp32 dots (the kernels follow torch's setting)
    try:
        check_op(backend, x, w, b, labels, rtol=1e-4, centers_per_class=3, scale=64.0, reduce=reduce)
    finally:
        torch.set_float32_matmul_precision(precision)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA tests compile and run the kernels")
def test_kernel_report_subset(tmp_path):
    """tools/kernel_report.py on its heaviest cases (D = 512, K = 10, fp32 as tf32x3 and tf32, fp16; sm_80 and
    sm_90a): every kernel compiles for the GPU as its launcher specialises it, with MMA, within the spill limit and
    the target's shared memory (the interpreter accepts programs the compiler rejects, so this is CI's check of the
    GPU code path). The full grid is benchmarks/results/kernel_report.json."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "report.json"
    run = subprocess.run([sys.executable, os.path.join(root, "tools", "kernel_report.py"), "--out", str(out),
                          "--arch", "80", "90", "--D", "512", "--K", "10", "--reduce", "row",
                          "--dtype", "float32", "float16", "--precision", "tf32x3", "tf32", "native", "--jobs", "2"],
                         capture_output=True, text=True, timeout=600)
    if "No module named 'triton.backends.nvidia" in run.stderr:
        pytest.skip("triton was built without its NVIDIA backend")
    assert run.returncode == 0, run.stdout + run.stderr[-4000:]
    entries = json.loads(out.read_text())["entries"]
    kernels = {e["kernel"] for e in entries}
    assert {"_lse_fwd_kernel", "_dx_kernel", "_dw_kernel"} <= kernels
    assert all(e["mma"] is not False and e["spill_bytes"] <= 1024 and e["registers"] > 0 for e in entries)


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype,precision", [(BF16, "ieee"), (F16, "ieee"), (F32, "tf32"), (F32, "tf32x3")],
                         ids=["bf16", "fp16", "tf32", "tf32x3"])
def test_gpu_backward_tiles_hold_all_of_d(arch, dtype, precision):
    """On a GPU the backward kernels keep the whole of D <= 512 on chip for every dot operand: fp16 and fp32 split
    D = 512 into slices of 128 (64) that each recomputed the logits, four logit GEMMs a kernel instead of one. (The
    dX kernel of a K that is not a power of two, whose class tile is widened for its narrower part, holds 256, and
    fp32's 128 up to D = 256.) That the tiles compile with MMA, within the spill limit and the shared memory, is
    test_kernel_report_subset's."""
    from metricloss_kernels.triton._common import tile_config
    for kernel, d, k in itertools.product(("dx", "dw"), (100, 256, 512), (1, 10)):
        held = 512 if (kernel, k) != ("dx", 10) else 256 if dtype != F32 or d > 256 else 128
        assert tile_config(kernel, arch, dtype, precision, d, k).block_out >= min(d, held), (kernel, d, k)


def test_kernel_report_flags_shared_memory_beyond_the_target():
    """A kernel asking for more shared memory than its GPU has compiles, then fails to launch: the report flags it.
    Its sm_80 stands for every sm_8x, so 99 KiB (sm_86, sm_89), not sm_80's 163."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "kernel_report.py")
    spec = importlib.util.spec_from_file_location("kernel_report", path)
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    entry = dict(kernel="_dx_kernel", arch=80, D=512, mma=True, spill_bytes=0, shared_bytes=139264)
    assert report.problems(entry) == ["needs 139264 bytes of shared memory"]
    assert report.problems(dict(entry, arch=90)) == []
    assert report.problems(dict(entry, shared_bytes=99 * 1024)) == []
