"""PartialFC-style class sampling (`sample_rate`, metricloss_kernels.distributed.sampled) in one process: the sampled
loss is the full loss on the sampled classes, every positive class is kept, rate 1 is the full loss, and the
sampled losses compile into one graph."""
import math

import pytest
import torch

import metricloss_kernels as mlk
from metricloss_kernels import distributed
from metricloss_kernels import functional as F
from utils import assert_close

N, C, K, D = 37, 53, 3, 40
RATE = 0.3

ROW_WISE = [  # (functional name, keyword arguments, centers per class); tau = 0: R(W) is over all the proxies
    ("proxy_nca_loss", {}, 1),
    ("proxy_nca_loss", dict(exclude_positive=False), 1),
    ("soft_triple_loss", dict(centers_per_class=K, tau=0.0), K),
    ("mpa_loss", dict(centers_per_class=K, variant="dw", tau=0.0), K),
    ("mpa_loss", dict(centers_per_class=K, variant="ap", tau=0.0), K),
    ("arcface_loss", {}, 1),
    ("sub_center_arcface_loss", dict(sub_centers=K), K),
    ("cosface_loss", {}, 1),
    ("l2_softmax_loss", dict(bias=True), 1),
]


def data(seed=0, n=N, classes=C):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=g)
    w = torch.randn(C * K, D, generator=g, dtype=torch.float64)
    bias = torch.randn(C, generator=g, dtype=torch.float64)
    return x, y, w, bias


def test_sample_classes_keeps_every_positive_in_a_fixed_shape():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        labels = torch.randint(-3, C + 3, (N,), generator=g)  # outside [0, C): another rank's classes
        size = distributed.sample_size(C, RATE, N)
        index, local = distributed.sample_classes(labels, C, size)
        inside = (labels >= 0) & (labels < C)
        assert index.shape == (size,) and torch.equal(index, index.unique())  # sorted, distinct
        assert torch.isin(labels[inside], index).all()
        assert torch.equal(index[local[inside]], labels[inside])
        assert (local[~inside] == -1).all()


def test_sample_size():
    assert distributed.sample_size(1000, 0.1, 37) == 100
    assert distributed.sample_size(1000, 0.01, 37) == 37  # every positive must fit
    assert distributed.sample_size(30, 0.5, 37) == 30
    assert distributed.sample_size(1001, 0.1, 1) == math.ceil(100.1)


def _loss(name, kwargs, x, y, w, bias, **extra):
    kwargs = dict(kwargs)
    if kwargs.pop("bias", False):
        kwargs["bias"] = bias
    return getattr(F, name)(x, y, w, **kwargs, **extra)


@pytest.mark.parametrize("backend", ["reference", "chunked"])
@pytest.mark.parametrize("name,kwargs,k", ROW_WISE, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(ROW_WISE)])
def test_sampled_loss_is_the_loss_on_the_sampled_classes(name, kwargs, k, backend):
    """Value and gradients: those of the reference loss on the rows of the sampled classes (labels re-indexed),
    zero gradient for the classes left out."""
    x, y, w, bias = data(classes=C // 4)  # a quarter of the classes positive: the sample has negatives to draw
    w = w[:C * k].clone().requires_grad_()
    bias = bias.clone().requires_grad_()
    x = x.clone().requires_grad_()
    torch.manual_seed(3)
    got = _loss(name, kwargs, x, y, w, bias, backend=backend, sample_rate=RATE)
    got.backward()
    torch.manual_seed(3)
    index, local = distributed.sample_classes(y, C, distributed.sample_size(C, RATE, N))
    assert index.shape[0] < C
    rows = (index[:, None] * k + torch.arange(k)).flatten()
    xs, ws = x.detach().clone().requires_grad_(), w.detach()[rows].clone().requires_grad_()
    bs = bias.detach()[index].clone().requires_grad_()
    expected = _loss(name, kwargs, xs, local, ws, bs, backend="reference")
    expected.backward()
    assert_close(got.detach(), expected.detach(), 1e-12, "value")
    assert_close(x.grad, xs.grad, 1e-10, "embeddings' gradient")
    dw = torch.zeros_like(w)
    dw[rows] = ws.grad
    assert_close(w.grad, dw, 1e-10, "proxies' gradient")
    if "bias" in kwargs:
        db = torch.zeros_like(bias)
        db[index] = bs.grad
        assert_close(bias.grad, db, 1e-10, "bias' gradient")


@pytest.mark.parametrize("name,kwargs,k", ROW_WISE[:3], ids=[n for n, _, _ in ROW_WISE[:3]])
def test_rate_one_is_exactly_the_full_loss(name, kwargs, k):
    x, y, w, bias = data()
    for backend in ("reference", "chunked"):
        full = _loss(name, kwargs, x, y, w[:C * k], bias, backend=backend)
        assert torch.equal(_loss(name, kwargs, x, y, w[:C * k], bias, backend=backend, sample_rate=1.0), full)


def test_bad_sample_rates():
    x, y, w, _ = data()
    for rate in (0, -0.5, 1.5, float("nan")):
        with pytest.raises(ValueError, match="sample_rate"):
            F.arcface_loss(x, y, w[:C], sample_rate=rate)
        with pytest.raises(ValueError, match="sample_rate"):
            mlk.CosFaceLoss(C, D, sample_rate=rate)
    with pytest.raises(ValueError, match="sample_rate must be 1 for variant='mpa'"):
        F.mpa_loss(x, y, w, centers_per_class=K, sample_rate=0.5)
    with pytest.raises(ValueError, match="sample_rate must be 1 for variant='mpa'"):
        mlk.MPALoss(C, D, centers_per_class=K, sample_rate=0.5)


def test_sampled_module_compiles_into_one_graph():
    loss = mlk.ArcFaceLoss(C, D, backend="chunked", sample_rate=RATE).double()
    x, y, _, _ = data()
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(loss)(x, y)
    assert explanation.graph_break_count == 0, [str(r.reason) for r in explanation.break_reasons]
    torch.manual_seed(1)
    expected = loss(x, y)
    torch.manual_seed(1)
    got = torch.compile(loss, backend="aot_eager", fullgraph=True)(x, y)
    assert_close(got.detach(), expected.detach(), 1e-12, "value")
    torch._dynamo.reset()
