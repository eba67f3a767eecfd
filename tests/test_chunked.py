"""Chunked backend: chunked.class_lse against a materialised oracle, every fused loss (with lse=chunked.class_lse)
against the reference, and the memory bound (no N x C allocation) checked with the profiler."""
import functools

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from metricloss_kernels import chunked, fused, reference
from metricloss_kernels.polytopes import polytope_dim

N, C, K, D = 37, 53, 3, 40
TOL = {torch.float32: 1e-4, torch.float64: 1e-10}


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _assert_close(actual, expected, tol, what=""):
    """max |actual - expected| <= tol * max(1e-3, max |expected|): relative to the tensor's scale, so near-zero
    entries of a gradient do not need a relative match of their own."""
    assert actual.shape == expected.shape, what
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    if actual.numel() == 0:
        return
    err = (actual.double() - expected.double()).abs().max().item()
    ref = expected.double().abs().max().item()
    assert err <= tol * max(ref, 1e-3), f"{what}: max error {err:.3g} vs scale {ref:.3g} (tol {tol:g})"


# ------------------------------------------------------------------------------------------ class_lse vs oracle
def _oracle_lse(x, w, labels, k, gamma, scale, shift, bias, normalize_x, normalize_w, reduce):
    """Materialised [N, C] version of class_lse; empty LSEs are -inf with zero gradient."""
    xh = F.normalize(x, dim=1) if normalize_x else x
    wh = F.normalize(w, dim=1) if normalize_w else w
    l = (xh @ wh.T).unflatten(1, (-1, k))
    z = scale * (torch.softmax(l / gamma, -1) * l).sum(-1) + shift
    if bias is not None:
        z = z + bias
    keep = ~F.one_hot(labels, z.shape[1]).bool()
    dim = 1 if reduce == "row" else 0
    empty = ~keep.any(dim)
    out = torch.logsumexp(z.masked_fill(~keep, float("-inf")).masked_fill(empty.unsqueeze(dim), 0), dim)
    return out.masked_fill(empty, float("-inf"))


def _lse_inputs(seed, n=N, c=C, k=K, d=D, dtype=torch.float64, bias=False, labels=None):
    g = _gen(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    w = torch.randn(c * k, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    b = torch.randn(c, generator=g, dtype=torch.float64).to(dtype).requires_grad_() if bias else None
    if labels is None:
        labels = torch.randint(0, c, (n,), generator=g)
    return x, w, b, labels


def _check_lse(x, w, b, labels, tol, *, k, gamma=0.1, scale=3.0, shift=0.5, normalize_x=True, normalize_w=True,
               reduce="row", block_size=7, seed=0):
    kw = dict(gamma=gamma, scale=scale, shift=shift, bias=b, normalize_x=normalize_x, normalize_w=normalize_w,
              reduce=reduce)
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    # The oracle runs on the same (possibly rounded) values in the compute dtype.
    xo, wo = x.detach().to(cd).requires_grad_(), w.detach().to(cd).requires_grad_()
    bo = b.detach().to(cd).requires_grad_() if b is not None else None
    expected = _oracle_lse(xo, wo, labels, k, **{**kw, "bias": bo})
    actual = chunked.class_lse(x, w, labels, centers_per_class=k, block_size=block_size, **kw)
    assert actual.dtype == cd
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(actual), finite)
    _assert_close(actual[finite], expected[finite], tol, "forward")
    upstream = torch.randn(expected.shape, generator=_gen(seed + 1), dtype=cd)
    # Upstream gradient also reaches the -inf entries: their gradient must be exactly zero, never NaN.
    inputs = [t for t in (x, w, b) if t is not None]
    grads = torch.autograd.grad(actual, inputs, upstream)
    ref_inputs = [t for t in (xo, wo, bo) if t is not None]
    ref_grads = torch.autograd.grad(expected, ref_inputs, upstream)
    for name, got, ref, inp in zip("xwb", grads, ref_grads, inputs):
        assert got.dtype == inp.dtype, name
        _assert_close(got, ref.to(got.dtype), tol, f"grad {name}")
    return actual


@pytest.mark.parametrize("reduce", ["row", "col"])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("normalize", [(True, True), (False, True), (True, False)])
def test_class_lse_matches_oracle(reduce, k, bias, normalize):
    x, w, b, labels = _lse_inputs(1, k=k, bias=bias)
    _check_lse(x, w, b, labels, 1e-10, k=k, reduce=reduce, normalize_x=normalize[0], normalize_w=normalize[1])


@pytest.mark.parametrize("block_size", [1, 5, 52, 53, 1000, None])
@pytest.mark.parametrize("reduce", ["row", "col"])
def test_class_lse_block_sizes(block_size, reduce):
    x, w, b, labels = _lse_inputs(2, bias=True)
    _check_lse(x, w, b, labels, 1e-10, k=K, reduce=reduce, block_size=block_size)


@pytest.mark.parametrize("k,gamma", [(1, 0.1), (K, 0.1), (K, 0.005)])  # 1/gamma = 200: max-subtracted softmax
@pytest.mark.parametrize("reduce", ["row", "col"])
def test_class_lse_row_tiles_and_temperature(monkeypatch, k, gamma, reduce):
    monkeypatch.setattr(chunked, "_MAX_ROWS", 8)  # 37 rows -> 5 row tiles, the last one short
    x, w, b, labels = _lse_inputs(3, k=k, bias=True)
    _check_lse(x, w, b, labels, 1e-10, k=k, gamma=gamma, reduce=reduce, block_size=11)


@pytest.mark.parametrize("k", [1, 3])
def test_class_lse_empty_columns_are_minus_inf_with_zero_grad(k):
    labels = torch.full((N,), 4, dtype=torch.long)  # every row has label 4: column 4 is empty
    x, w, b, labels = _lse_inputs(4, k=k, bias=True, labels=labels)
    out = _check_lse(x, w, b, labels, 1e-10, k=k, reduce="col")
    assert out[4] == float("-inf") and torch.isfinite(out[torch.arange(C) != 4]).all()
    # one class only: every row LSE is empty
    x, w, b, labels = _lse_inputs(5, c=1, k=k, bias=True, labels=torch.zeros(N, dtype=torch.long))
    out = _check_lse(x, w, b, labels, 1e-10, k=k, reduce="row")
    assert (out == float("-inf")).all()  # and _check_lse compared the gradients with the oracle's zeros


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduce", ["row", "col"])
def test_class_lse_half_inputs(dtype, reduce):
    x, w, b, labels = _lse_inputs(6, dtype=dtype, bias=True)
    # Exact fp32 math on the rounded inputs; only the gradients' final rounding to half precision differs.
    _check_lse(x, w, b, labels, 1e-2, k=K, reduce=reduce)


def test_class_lse_gradcheck():
    x, w, b, labels = _lse_inputs(7, n=6, c=5, k=2, d=4, bias=True)
    for reduce in ("row", "col"):
        fn = functools.partial(chunked.class_lse, labels=labels, centers_per_class=2, scale=2.0, shift=0.1,
                               reduce=reduce, block_size=2)
        assert torch.autograd.gradcheck(lambda x, w, b: fn(x, w, bias=b), (x, w, b))


# --------------------------------------------------------------------------------- fused losses vs reference
LOSSES = [
    ("proxy_nca_loss", 1, {}),
    ("proxy_nca_loss", 1, {"scale": 8.0, "exclude_positive": False}),
    ("proxy_anchor_loss", 1, {}),
    ("soft_triple_loss", K, {"centers_per_class": K}),
    ("mpa_loss", K, {"centers_per_class": K, "variant": "mpa"}),
    ("mpa_loss", K, {"centers_per_class": K, "variant": "dw"}),
    ("mpa_loss", K, {"centers_per_class": K, "variant": "ap"}),
    ("mpa_loss", 1, {"centers_per_class": 1, "tau": 0.0}),
    ("arcface_loss", 1, {}),
    ("cosface_loss", 1, {}),
    ("l2_softmax_loss", 1, {}),
    ("l2_softmax_loss", 1, {"normalize_weights": True}),
    ("l2_softmax_loss", 1, {"bias": True}),
    ("proxy_repel_loss", 1, {"variant": "proxies"}),
    ("proxy_repel_loss", 1, {"variant": "batch"}),
]
LOSS_IDS = [f"{name}-{'-'.join(f'{a}={v}' for a, v in kw.items())}" for name, _, kw in LOSSES]
def _labels(kind, gen, n=N, c=C):
    if kind == "random":
        return torch.randint(0, c, (n,), generator=gen)
    if kind == "one_per_class":
        return torch.randperm(c, generator=gen)[:n]
    return torch.full((n,), 3, dtype=torch.long)  # "one_class"


def _loss_inputs(k, kwargs, dtype, seed, labels_kind="random", aligned=False):
    g = _gen(seed)
    w = torch.randn(C * k, D, generator=g, dtype=torch.float64)
    labels = _labels(labels_kind, g)
    if aligned:  # embeddings within ~1e-3 of a proxy of their class: logits at their extreme values
        x = F.normalize(w, dim=1)[labels * k] + 1e-3 * torch.randn(N, D, generator=g, dtype=torch.float64)
    else:
        x = torch.randn(N, D, generator=g, dtype=torch.float64)
    kwargs = dict(kwargs)
    tensors = [x.to(dtype).requires_grad_(), w.to(dtype).requires_grad_()]
    if kwargs.get("bias") is True:
        tensors.append(torch.randn(C, generator=g, dtype=torch.float64).to(dtype).requires_grad_())
        kwargs["bias"] = tensors[-1]
    return tensors, labels, kwargs


def _value_and_grads(fn, tensors, labels, kwargs, upstream):
    loss = fn(tensors[0], labels, tensors[1], **kwargs)
    return loss, torch.autograd.grad(loss * upstream, tensors)


def _compare_loss(name, k, kwargs, dtype, tol, *, labels_kind="random", aligned=False, block_size=7, seed=10,
                  ref_dtype=None):
    tensors, labels, kwargs = _loss_inputs(k, kwargs, dtype, seed, labels_kind, aligned)
    upstream = 0.5 + torch.rand((), generator=_gen(seed + 1)).item()
    lse = functools.partial(chunked.class_lse, block_size=block_size)
    loss, grads = _value_and_grads(functools.partial(getattr(fused, name), lse=lse), tensors, labels, kwargs,
                                   upstream)
    # The reference runs on the same values, in ref_dtype when given (a float64 truth for low-precision runs).
    ref_tensors = [t.detach().to(ref_dtype or dtype).requires_grad_() for t in tensors]
    ref_kwargs = {**kwargs, "bias": ref_tensors[2]} if "bias" in kwargs else kwargs
    ref_loss, ref_grads = _value_and_grads(getattr(reference, name), ref_tensors, labels, ref_kwargs, upstream)
    assert loss.dtype == dtype and loss.shape == ()
    _assert_close(loss, ref_loss.to(dtype), tol, f"{name} loss")
    for what, got, ref in zip(("embeddings", "proxies", "bias"), grads, ref_grads):
        assert got.dtype == dtype
        _assert_close(got, ref.to(dtype), tol, f"{name} grad {what}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("labels_kind", ["random", "one_per_class", "one_class"])
@pytest.mark.parametrize("name,k,kwargs", LOSSES, ids=LOSS_IDS)
def test_fused_loss_matches_reference(name, k, kwargs, dtype, labels_kind):
    _compare_loss(name, k, kwargs, dtype, TOL[dtype], labels_kind=labels_kind)


@pytest.mark.parametrize("name,k,kwargs", LOSSES, ids=LOSS_IDS)
def test_fused_loss_default_block(name, k, kwargs):
    _compare_loss(name, k, kwargs, torch.float64, TOL[torch.float64], block_size=None)


@pytest.mark.parametrize("name,k,kwargs", LOSSES, ids=LOSS_IDS)
def test_fused_loss_half_precision(name, k, kwargs):
    _compare_loss(name, k, kwargs, torch.float16, 2e-2, ref_dtype=torch.float64)


LARGE_SCALES = [
    ("soft_triple_loss", K, {"centers_per_class": K, "la": 20.0, "gamma": 0.1}),
    ("mpa_loss", K, {"centers_per_class": K, "alpha": 32.0, "gamma": 0.1, "variant": "mpa"}),
    ("mpa_loss", K, {"centers_per_class": K, "alpha": 32.0, "gamma": 0.1, "variant": "ap"}),
    ("proxy_anchor_loss", 1, {"alpha": 32.0}),
    ("arcface_loss", 1, {"scale": 64.0}),
    ("cosface_loss", 1, {"scale": 64.0}),
    ("proxy_nca_loss", 1, {"scale": 64.0}),
]


@pytest.mark.parametrize("name,k,kwargs", LARGE_SCALES, ids=[c[0] + "-" + str(c[2]) for c in LARGE_SCALES])
def test_fused_loss_large_scales_aligned(name, k, kwargs):
    """Nearly aligned embeddings at la=20 / alpha=32 / s=64 in fp32: no overflow, no NaN, still the fp64 truth."""
    _compare_loss(name, k, kwargs, torch.float32, 1e-3, aligned=True, ref_dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("polytope", ["simplex", "orthoplex", "cube"])
@pytest.mark.parametrize("margin", ["max", 0.0, 20.0])
def test_fused_regular_polytope(dtype, polytope, margin):
    d = polytope_dim(polytope, C)
    g = _gen(20)
    x = torch.randn(N, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    labels = torch.randint(0, C, (N,), generator=g)
    kw = dict(polytope=polytope, scale=30.0, margin=margin)
    lse = functools.partial(chunked.class_lse, block_size=7)
    loss = fused.regular_polytope_loss(x, labels, C, **kw, lse=lse)
    ref = reference.regular_polytope_loss(x, labels, C, **kw)
    (grad,), (ref_grad,) = torch.autograd.grad(loss, x), torch.autograd.grad(ref, x)
    _assert_close(loss, ref, TOL[dtype], "loss")
    _assert_close(grad, ref_grad, TOL[dtype], "grad")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_streamed_regularizer_matches_reference(monkeypatch, dtype):
    """fused's streamed R(W) (several blocks, the last one short) against reference.proxy_regularizer."""
    monkeypatch.setattr(fused, "_REGULARIZER_BLOCK_BYTES", 7 * K * D * 4)
    w = torch.randn(C * K, D, generator=_gen(21), dtype=torch.float64)
    if dtype == torch.float64:
        w[5] = 0  # a zero proxy: its norm is clamped (its 1e12-scaled gradient would overflow fp16)
    w = w.to(dtype).requires_grad_()
    w_ref = w.detach().to(torch.float64).requires_grad_()
    value, ref = fused._ProxyRegularizer.apply(w, K), reference.proxy_regularizer(w_ref, K)
    (grad,), (ref_grad,) = torch.autograd.grad(value, w), torch.autograd.grad(ref, w_ref)
    tol = 1e-10 if dtype == torch.float64 else 1e-2
    assert grad.dtype == dtype
    _assert_close(value, ref, tol, "R(W)")
    _assert_close(grad, ref_grad.to(dtype), tol, "grad R(W)")
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(lambda v: fused._ProxyRegularizer.apply(v, 3), (w[12:24, :4].detach().clone()
                                                                                    .requires_grad_(),))


# ------------------------------------------------------------------------------------------------ memory bound
def _largest_allocation(fn) -> int:
    """Bytes of the largest single CPU allocation made while fn() runs (profiler memory events)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Every allocation is a "[memory]" event with its size (frees are negative).
    events = prof.profiler.kineto_results.events()
    return max((e.nbytes() for e in events if e.name() == "[memory]"), default=0)


def _forward_backward(fn, x, labels, w):
    def run():
        loss = fn(x, labels, w)
        torch.autograd.grad(loss, (x, w))
    return run


@pytest.mark.parametrize("name,n,c,k", [("soft_triple_loss", 256, 16000, 4), ("proxy_anchor_loss", 256, 32000, 1)])
def test_no_n_by_c_allocation(name, n, c, k):
    """At sizes where the N x C logits dwarf everything else (D = 8), the chunked loss (default tiles) never
    allocates N*C*4/2 bytes at once, while the reference does (so the check can fail)."""
    g = _gen(30)
    x = torch.randn(n, 8, generator=g, requires_grad=True)
    w = torch.randn(c * k, 8, generator=g, requires_grad=True)
    labels = torch.randint(0, c, (n,), generator=g)
    kw = {"centers_per_class": k} if k > 1 else {}
    limit = n * c * 4 // 2
    chunked_fn = functools.partial(getattr(fused, name), lse=chunked.class_lse, **kw)
    reference_fn = functools.partial(getattr(reference, name), **kw)
    assert _largest_allocation(_forward_backward(reference_fn, x, labels, w)) >= limit
    assert _largest_allocation(_forward_backward(chunked_fn, x, labels, w)) < limit


def test_half_proxies_are_not_copied_to_fp32_whole():
    """fp16 proxies are converted tile by tile: no allocation as large as an fp32 copy of W."""
    g = _gen(31)
    x = torch.randn(64, 16, generator=g).half().requires_grad_()
    w = torch.randn(256_000, 16, generator=g).half().requires_grad_()  # 8 MB; in fp32 16 MB, the tiles 4 MB
    labels = torch.randint(0, 256_000, (64,), generator=g)

    def run():
        out = chunked.class_lse(x, w, labels, scale=10.0, reduce="row")
        torch.autograd.grad(out.sum(), (x, w))

    assert _largest_allocation(run) < w.numel() * 4 * 3 // 4  # the fp16 gradient (numel * 2) is fine
