"""Sub-centre ArcFace (reference.sub_center_arcface_loss, the streamed loss on class_lse's max pool, the module):
against a float64 loop implementation written from the definition, every backend against the reference, and the
backends' boundaries (every backend has the max pool). The comparison with pytorch-metric-learning's class is in
test_pml_losses.py; sharding and class sampling in test_distributed*.py; torch.compile in test_compile.py."""
import functools
import math

import pytest
import torch

import metricloss_kernels as mlk
from metricloss_kernels import functional as F
from metricloss_kernels import fused, reference
from metricloss_kernels.lse import class_lse
from utils import TOL, assert_close

N, C, K, D = 37, 53, 3, 40


def loop_loss(x, labels, w, k, margin, scale):
    """The definition, one sample and one class at a time in float64 scalars (autograd gives the gradients): a
    class's cosine is the max over its k sub-centres; the target's gets the angular margin (insightface's rule, the
    cosine clamped to [-1 + 1e-7, 1 - 1e-7]); softmax cross-entropy of the scaled logits, averaged."""
    m = math.radians(margin)
    total = 0.0
    for i in range(x.shape[0]):
        xi = x[i] / x[i].norm()
        logits = []
        for c in range(w.shape[0] // k):
            cos = max(torch.dot(xi, w[c * k + j] / w[c * k + j].norm()) for j in range(k))
            if c == labels[i]:
                cos = cos.clamp(-1 + 1e-7, 1 - 1e-7)
                theta = torch.acos(cos)
                cos = torch.cos(theta + m) if theta < math.pi - m else cos - m * math.sin(m)
            logits.append(scale * cos)
        z = torch.stack(logits)
        total = total + torch.logsumexp(z, 0) - z[labels[i]]
    return total / x.shape[0]


def data(n=N, c=C, k=K, d=D, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    w = torch.randn(c * k, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    return x, torch.randint(0, c, (n,), generator=g), w


def grads(fn, x, labels, w):
    loss = fn(x, labels, w)
    return loss, torch.autograd.grad(loss, [x, w])


# margin 120 deg: targets at angles beyond 180 - 120 take the other branch of the rule
@pytest.mark.parametrize("k,margin,scale", [(3, 28.6, 64.0), (1, 28.6, 64.0), (2, 120.0, 5.0)])
@pytest.mark.parametrize("backend", ["reference", "chunked", "triton"])
def test_matches_the_loop_definition(backend, k, margin, scale):
    x, labels, w = data(n=9, c=5, k=k, d=6, seed=k)
    fn = functools.partial(F.sub_center_arcface_loss, sub_centers=k, margin=margin, scale=scale, backend=backend)
    loss, (dx, dw) = grads(fn, x, labels, w)
    want, (want_dx, want_dw) = grads(lambda *a: loop_loss(*a, k, margin, scale), x, labels, w)
    assert_close(loss, want, TOL[torch.float64], "loss", floor=1)
    assert_close(dx, want_dx, TOL[torch.float64], "d embeddings")
    assert_close(dw, want_dw, TOL[torch.float64], "d proxies")


STREAMED = [("chunked", {}), ("chunked", dict(block_classes=7)), ("chunked", dict(block_rows=8, block_classes=11)),
            ("triton", {}), ("triton", dict(block_rows=16, block_classes=16, block_d=16)),
            ("gemm", {}), ("gemm", dict(block_rows=8, block_classes=11))]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("impl,tiles", STREAMED, ids=[f"{i}-{t}" for i, t in STREAMED])
def test_streamed_matches_reference(impl, tiles, dtype):
    """The streamed loss (class_lse's max pool, several class and row tiles) against the float64 reference on the
    same values: value and gradients, in the inputs' dtypes."""
    x, labels, w = data(seed=5, dtype=dtype)
    lse = functools.partial(class_lse, impl=impl, **tiles)
    loss, (dx, dw) = grads(functools.partial(fused.sub_center_arcface_loss, lse=lse), x, labels, w)
    ref_x, ref_w = (t.detach().double().requires_grad_() for t in (x, w))
    want, (want_dx, want_dw) = grads(reference.sub_center_arcface_loss, ref_x, labels, ref_w)
    rtol = 5e-3 if dtype == torch.float16 else TOL[dtype]
    assert loss.dtype == dx.dtype == dw.dtype == dtype
    assert_close(loss.double(), want, rtol, "loss", floor=1)
    assert_close(dx, want_dx.to(dtype), rtol, "d embeddings")
    assert_close(dw, want_dw.to(dtype), rtol, "d proxies")


def test_one_sub_centre_is_arcface():
    x, labels, w = data(k=1, seed=6)
    for backend in ("reference", "chunked", "triton"):
        loss, (dx, dw) = grads(functools.partial(F.sub_center_arcface_loss, sub_centers=1, backend=backend),
                               x.float(), labels, w.float())
        want, (want_dx, want_dw) = grads(functools.partial(F.arcface_loss, backend="reference"), x, labels, w)
        for got, expected in ((loss, want), (dx, want_dx), (dw, want_dw)):
            assert_close(got.double(), expected, TOL[torch.float32], backend)


def test_backends_and_arguments():
    """Every backend runs the max pool (K > 1) and agrees with the reference; bad arguments name themselves."""
    x, labels, w = data(seed=7)
    for backend in ("auto", "chunked", "triton", "gemm"):
        assert_close(F.sub_center_arcface_loss(x, labels, w, backend=backend),
                     reference.sub_center_arcface_loss(x, labels, w), TOL[torch.float64], backend, floor=1)
    with pytest.raises(ValueError, match="sub_centers"):
        F.sub_center_arcface_loss(x, labels, w, sub_centers=0)
    with pytest.raises(ValueError, match="proxies"):
        F.sub_center_arcface_loss(x, labels, w[:-1])
    with pytest.raises(ValueError, match="margin"):
        F.sub_center_arcface_loss(x, labels, w, margin=180.0)
    with pytest.raises(ValueError, match="sub_centers"):
        mlk.SubCenterArcFaceLoss(C, D, sub_centers=1.5)


def test_module():
    torch.manual_seed(8)
    loss = mlk.SubCenterArcFaceLoss(C, D, backend="chunked").double()
    assert loss.sub_centers == 3 and loss.proxies.shape == (C * 3, D)
    x, labels, _ = data(seed=8)
    value = loss(x, labels)
    assert_close(value, reference.sub_center_arcface_loss(x, labels, loss.proxies), TOL[torch.float64], "module",
                 floor=1)
    value.backward()
    assert loss.proxies.grad.abs().sum() > 0
