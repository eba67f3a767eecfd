"""The public API: names and defaults of README.md's Losses table, validation errors, backend dispatch, module
wrappers."""
import importlib
import inspect
import math

import pytest
import torch

import metricloss_kernels as mlk
from metricloss_kernels import functional as F
from metricloss_kernels import reference
from utils import proxy_inputs

N, C, K, D = 37, 53, 3, 40


def data(n=N, c=C, k=1, d=D, seed=0, dtype=torch.float64):
    """(embeddings, labels, proxies) of utils.proxy_inputs, in this file's order."""
    x, w, _, y = proxy_inputs(n, c, k, d, seed=seed, dtype=dtype)
    return x, y, w


# ---- names and defaults are a contract ------------------------------------------------------------------------

FUNCTIONAL_DEFAULTS = {
    "proxy_nca_loss": dict(scale=2.0, exclude_positive=True, backend="auto"),
    "proxy_anchor_loss": dict(margin=0.1, alpha=32.0, backend="auto"),
    "soft_triple_loss": dict(centers_per_class=10, la=20.0, gamma=0.1, margin=0.01, tau=0.2, backend="auto"),
    "mpa_loss": dict(centers_per_class=10, alpha=32.0, margin=0.1, gamma=0.1, tau=0.2, variant="mpa",
                     backend="auto"),
    "arcface_loss": dict(margin=28.6, scale=64.0, backend="auto"),
    "sub_center_arcface_loss": dict(sub_centers=3, margin=28.6, scale=64.0, backend="auto"),
    "cosface_loss": dict(margin=0.35, scale=64.0, backend="auto"),
    "l2_softmax_loss": dict(bias=None, scale=16.0, normalize_weights=False, backend="auto"),
    "regular_polytope_loss": dict(polytope="simplex", scale=30.0, margin="max", backend="auto"),
    "proxy_repel_loss": dict(alpha=32.0, margin=0.1, variant="proxies", backend="auto"),
    "contrastive_loss": dict(pos_margin=1.0, neg_margin=0.5),
    "triplet_margin_loss": dict(margin=0.1, distance="cosine", mining="all"),
    "lifted_structure_loss": dict(margin=0.5),
    "npairs_loss": dict(l2_reg=0.02),
    "margin_loss": dict(margin=0.2, beta=1.2, generator=None),
    "multi_similarity_loss": dict(alpha=2.0, beta=50.0, base=0.5, epsilon=0.1),
    "exponential_triplet_loss": dict(overlap=1.2, distance="cosine", embedding_scale=1.0, pos_coef=1.0,
                                     neg_coef=1.0),
    "center_loss": dict(margin=0.0),
}

MODULE_DEFAULTS = {
    "ProxyNCALoss": dict(scale=2.0, exclude_positive=True),
    "ProxyAnchorLoss": dict(margin=0.1, alpha=32.0),
    "SoftTripleLoss": dict(centers_per_class=10, la=20.0, gamma=0.1, margin=0.01, tau=0.2),
    "MPALoss": dict(centers_per_class=10, alpha=32.0, margin=0.1, gamma=0.1, tau=0.2, variant="mpa"),
    "ArcFaceLoss": dict(margin=28.6, scale=64.0),
    "SubCenterArcFaceLoss": dict(sub_centers=3, margin=28.6, scale=64.0),
    "CosFaceLoss": dict(margin=0.35, scale=64.0),
    "L2SoftmaxLoss": dict(scale=16.0, normalize_weights=False),
    "RegularPolytopeLoss": dict(polytope="simplex", scale=30.0, margin="max"),
    "ProxyRepelLoss": dict(alpha=32.0, margin=0.1, variant="proxies"),
    "ContrastiveLoss": dict(pos_margin=1.0, neg_margin=0.5),
    "TripletMarginLoss": dict(margin=0.1, distance="cosine", mining="all"),
    "LiftedStructureLoss": dict(margin=0.5),
    "NPairsLoss": dict(l2_reg=0.02),
    "MarginLoss": dict(margin=0.2, beta=1.2, learn_beta=False, num_classes=None),
    "MultiSimilarityLoss": dict(alpha=2.0, beta=50.0, base=0.5, epsilon=0.1),
    "ExponentialTripletLoss": dict(overlap=1.2, distance="cosine", embedding_scale=1.0, pos_coef=1.0, neg_coef=1.0),
    "CenterLoss": dict(margin=0.0, alpha=0.5),
}


def _defaults(fn):
    return {k: p.default for k, p in inspect.signature(fn).parameters.items() if p.default is not p.empty}


@pytest.mark.parametrize("name", sorted(FUNCTIONAL_DEFAULTS))
def test_functional_defaults(name):
    got = _defaults(getattr(F, name))
    for key, value in FUNCTIONAL_DEFAULTS[name].items():
        assert got[key] == value, (name, key)
    assert "backend" in got


def test_functional_all_lists_every_loss():
    assert sorted(F.__all__) == sorted(FUNCTIONAL_DEFAULTS)
    assert all(callable(getattr(F, name)) for name in F.__all__)


@pytest.mark.parametrize("name", sorted(MODULE_DEFAULTS))
def test_module_defaults(name):
    got = _defaults(getattr(mlk, name).__init__)
    for key, value in MODULE_DEFAULTS[name].items():
        assert got[key] == value, (name, key)
    assert got["backend"] == "auto"


@pytest.mark.parametrize("cls, k", [(mlk.ProxyNCALoss, 1), (mlk.ProxyAnchorLoss, 1), (mlk.SoftTripleLoss, 10),
                                    (mlk.MPALoss, 10), (mlk.ArcFaceLoss, 1), (mlk.SubCenterArcFaceLoss, 3),
                                    (mlk.CosFaceLoss, 1),
                                    (mlk.L2SoftmaxLoss, 1), (mlk.ProxyRepelLoss, 1)])
def test_modules_expose_proxies_and_match_functional(cls, k):
    torch.manual_seed(0)
    loss = cls(7, 12).double()
    assert isinstance(loss.proxies, torch.nn.Parameter) and loss.proxies.shape == (7 * k, 12)
    assert torch.isfinite(loss.proxies).all() and loss.proxies.std() > 0
    x, y, _ = data(n=20, c=7, d=12)
    value = loss(x, y)
    assert value.dim() == 0 and torch.isfinite(value)
    value.backward()
    assert loss.proxies.grad is not None and torch.isfinite(loss.proxies.grad).all()


def test_proxy_anchor_init_is_kaiming_normal_fan_out():
    torch.manual_seed(0)
    w = mlk.ProxyAnchorLoss(2000, 64).proxies  # fan_out of a [C, D] weight is C: std = sqrt(2 / C)
    assert abs(w.std().item() / math.sqrt(2 / 2000) - 1) < 0.05


def test_soft_triple_init_is_authors_uniform():
    torch.manual_seed(0)
    w = mlk.SoftTripleLoss(100, 64, centers_per_class=10).proxies  # on the [D, C*K] view: bound 1/sqrt(C*K)
    bound = 1 / math.sqrt(1000)
    assert w.abs().max() <= bound and w.abs().max() > 0.95 * bound


def test_regular_polytope_module():
    loss = mlk.RegularPolytopeLoss(10, polytope="cube")
    assert loss.embedding_size == 4 and not loss.proxies.requires_grad
    x = torch.randn(16, 4, requires_grad=True)
    loss(x, torch.randint(0, 10, (16,))).backward()
    assert torch.isfinite(x.grad).all() and list(loss.parameters()) == []


def test_center_loss_module_updates_centres_in_training_only():
    torch.manual_seed(0)
    loss = mlk.CenterLoss(3, 5)
    x, y = torch.randn(12, 5), torch.tensor([0, 0, 1, 1] * 3)
    before = loss.centers.clone()
    loss.eval()
    loss(x, y)
    assert torch.equal(loss.centers, before)
    loss.train()
    loss(x, y)
    expected0 = before[0] - 0.5 * (before[0] - x[y == 0].mean(0))
    torch.testing.assert_close(loss.centers[0], expected0)
    assert torch.equal(loss.centers[2], before[2])  # class 2 is not in the batch


def test_weighted_sum_loss_is_weighted_sum_of_terms():
    torch.manual_seed(0)
    terms = {"exp": mlk.ExponentialTripletLoss(5), "center": mlk.CenterLoss(5, 8).eval(),
             "class": mlk.L2SoftmaxLoss(5, 8)}
    total = mlk.WeightedSumLoss(terms, weights={"exp": 1.0, "center": 0.5, "class": 2.0})
    x, y = torch.randn(20, 8), torch.arange(20) % 5
    value = total(x, y)
    expected = terms["exp"](x, y) + 0.5 * terms["center"](x, y) + 2.0 * terms["class"](x, y)
    torch.testing.assert_close(value, expected)
    assert set(total.last_terms) == {"exp", "center", "class"}
    with pytest.raises(ValueError, match="weights"):
        mlk.WeightedSumLoss(terms, weights={"exp": 1.0})


def test_learnable_margin_beta_gets_gradient():
    loss = mlk.MarginLoss(learn_beta=True, num_classes=4, generator=torch.Generator().manual_seed(0))
    x, y = torch.randn(16, 6), torch.arange(16) % 4
    loss(x, y).backward()
    assert loss.beta.shape == (4,) and loss.beta.grad is not None and loss.beta.grad.abs().sum() > 0
    single = mlk.MarginLoss(learn_beta=True, generator=torch.Generator().manual_seed(0))
    single(x, y).backward()
    assert single.beta.shape == () and single.beta.grad is not None and single.beta.grad != 0


# ---- validation: each error names its argument ----------------------------------------------------------------

def _proxy_calls(x, y, w):
    return {
        "proxy_nca": lambda **kw: F.proxy_nca_loss(kw.get("x", x), kw.get("y", y), kw.get("w", w)),
        "proxy_anchor": lambda **kw: F.proxy_anchor_loss(kw.get("x", x), kw.get("y", y), kw.get("w", w)),
        "soft_triple": lambda **kw: F.soft_triple_loss(kw.get("x", x), kw.get("y", y), kw.get("w", w),
                                                       centers_per_class=1),
        "mpa": lambda **kw: F.mpa_loss(kw.get("x", x), kw.get("y", y), kw.get("w", w), centers_per_class=1),
        "arcface": lambda **kw: F.arcface_loss(kw.get("x", x), kw.get("y", y), kw.get("w", w)),
        "cosface": lambda **kw: F.cosface_loss(kw.get("x", x), kw.get("y", y), kw.get("w", w)),
        "l2_softmax": lambda **kw: F.l2_softmax_loss(kw.get("x", x), kw.get("y", y), kw.get("w", w)),
        "proxy_repel": lambda **kw: F.proxy_repel_loss(kw.get("x", x), kw.get("y", y), kw.get("w", w)),
    }


PROXY_FUNCS = sorted(_proxy_calls(None, None, None))


@pytest.mark.parametrize("name", PROXY_FUNCS)
def test_proxy_validation(name):
    x, y, w = data(n=8, c=5, d=6)
    call = _proxy_calls(x, y, w)[name]
    call()  # valid
    with pytest.raises(ValueError, match="embeddings"):
        call(x=x[0])
    with pytest.raises(TypeError, match="embeddings"):
        call(x=x.long())
    with pytest.raises(TypeError, match="embeddings"):
        call(x=x.tolist())
    with pytest.raises(TypeError, match="labels"):
        call(y=y.double())
    with pytest.raises(ValueError, match="labels"):
        call(y=y[:-1])
    with pytest.raises(ValueError, match="labels"):
        call(y=torch.full_like(y, 5))
    with pytest.raises(ValueError, match="labels"):
        call(y=torch.full_like(y, -1))
    with pytest.raises(ValueError, match="proxies|weight"):
        call(w=w[:, :-1])
    with pytest.raises(TypeError, match="proxies|weight"):
        call(w=w.long())


def test_centers_per_class_validation():
    x, y, w = data(n=8, c=4, k=3, d=6)
    with pytest.raises(ValueError, match="centers_per_class"):
        F.soft_triple_loss(x, y, w, centers_per_class=0)
    with pytest.raises(ValueError, match="centers_per_class"):
        F.mpa_loss(x, y, w[:-1], centers_per_class=3)
    with pytest.raises(ValueError, match="centers_per_class"):
        mlk.SoftTripleLoss(4, 6, centers_per_class=-2)


@pytest.mark.parametrize("call, arg", [
    (lambda x, y, w: F.proxy_nca_loss(x, y, w, backend="cuda"), "backend"),
    (lambda x, y, w: F.mpa_loss(x, y, w, centers_per_class=1, variant="xx"), "variant"),
    (lambda x, y, w: F.proxy_repel_loss(x, y, w, variant="rows"), "variant"),
    (lambda x, y, w: F.triplet_margin_loss(x, y, mining="easy"), "mining"),
    (lambda x, y, w: F.triplet_margin_loss(x, y, distance="manhattan"), "distance"),
    (lambda x, y, w: F.exponential_triplet_loss(x, y, 5, distance="manhattan"), "distance"),
    (lambda x, y, w: F.regular_polytope_loss(x, y, 5, polytope="cross"), "polytope"),
    (lambda x, y, w: F.contrastive_loss(x, y, backend="triton"), "backend"),
    (lambda x, y, w: F.arcface_loss(x, y, w, margin=200.0), "margin"),
    (lambda x, y, w: F.soft_triple_loss(x, y, w, centers_per_class=1, gamma=0.0), "gamma"),
    (lambda x, y, w: F.l2_softmax_loss(x, y, w, bias=torch.zeros(3, dtype=x.dtype)), "bias"),
    (lambda x, y, w: F.center_loss(x, y, w[:, :3]), "centers"),
    (lambda x, y, w: F.margin_loss(x, y, beta=torch.ones(2, dtype=x.dtype)), "labels"),
])
def test_argument_errors_name_the_argument(call, arg):
    x, y, w = data(n=8, c=5, d=6)
    with pytest.raises(ValueError, match=arg):
        call(x, y, w)


def test_polytope_width_mismatch():
    x, y, _ = data(n=8, c=5, d=6)
    with pytest.raises(ValueError, match="width 4"):
        F.regular_polytope_loss(x, y, 5, polytope="simplex")


def test_labels_on_other_device_or_2d():
    x, y, w = data(n=8, c=5, d=6)
    with pytest.raises(ValueError, match="labels"):
        F.proxy_anchor_loss(x, y[:, None], w)
    with pytest.raises(ValueError, match="labels"):
        F.contrastive_loss(x, y.repeat(2))


@pytest.mark.parametrize("name", PROXY_FUNCS)
@pytest.mark.parametrize("dtype,c,top", [(torch.int8, 200, 127), (torch.uint8, 300, 255), (torch.int16, 40_000,
                                                                                             32_767)], ids=str)
def test_narrow_integer_labels_are_accepted_when_num_classes_exceeds_their_range(name, dtype, c, top):
    """The range check is made in int64: num_classes beyond the labels' dtype must not wrap (int8: 200 -> -56)."""
    x, y, w = data(n=8, c=c, d=6)
    y[0], y[1] = 0, top  # the dtype's largest value, a valid class
    y = y % (top + 1)
    call = _proxy_calls(x, y, w)[name]
    torch.testing.assert_close(call(y=y.to(dtype)), call(), rtol=0, atol=0)


@pytest.mark.parametrize("dtype,c,bad", [(torch.int8, 100, 120), (torch.int8, 200, -1), (torch.uint8, 200, 255),
                                         (torch.int16, 300, 300)], ids=str)
def test_narrow_integer_labels_out_of_range_still_raise(dtype, c, bad):
    x, y, w = data(n=8, c=c, d=6)
    y = y % 100
    y[3] = bad
    with pytest.raises(ValueError, match=rf"labels must be in \[0, num_classes = {c}\), got values"):
        F.proxy_anchor_loss(x, y.to(dtype), w)
    if bad < 0:  # without num_classes (pair losses) only the sign is checked
        with pytest.raises(ValueError, match="labels must be >= 0"):
            F.contrastive_loss(x, y.to(dtype))


# ---- backends ---------------------------------------------------------------------------------------------------

def test_backends_report():
    info = mlk.backends()
    assert set(info) == {"reference", "chunked", "triton", "gemm"}
    assert info["reference"][0] and info["chunked"][0]
    assert all(isinstance(why, str) and why for _, why in info.values())


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_explicit_backends_agree(backend):
    x, y, w = data(n=19, c=11, k=3, d=9)
    ref = reference.soft_triple_loss(x, y, w, centers_per_class=3)
    got = F.soft_triple_loss(x, y, w, centers_per_class=3, backend=backend)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("impl", ["chunked", "gemm"])
def test_env_variable_sets_default_backend(monkeypatch, impl):
    module = importlib.import_module(f"metricloss_kernels.{impl}")
    calls = []
    original = module.forward
    monkeypatch.setattr(module, "forward", lambda *a, **k: calls.append(1) or original(*a, **k))
    x, y, w = data(n=9, c=6, d=5)
    monkeypatch.setenv("METRICLOSS_BACKEND", impl)
    torch.testing.assert_close(F.proxy_anchor_loss(x, y, w), reference.proxy_anchor_loss(x, y, w))
    assert calls == [1]
    # a loss without that backend (the center loss: reference only) falls back to the automatic choice
    torch.testing.assert_close(F.center_loss(x, y, w), reference.center_loss(x, y, w))
    monkeypatch.setenv("METRICLOSS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="METRICLOSS_BACKEND"):
        F.proxy_nca_loss(x, y, w)


def test_auto_picks_chunked_for_large_logits(monkeypatch):
    from metricloss_kernels import _backend
    assert _backend.resolve("auto", torch.device("cpu"), 10) == "reference"
    assert _backend.resolve("auto", torch.device("cpu"), _backend.AUTO_CHUNK_BYTES) == "chunked"
    assert _backend.resolve("auto", torch.device("cpu"), 10**9, ("auto", "reference")) == "reference"


@pytest.mark.parametrize("backend", ["triton", "gemm"])
def test_triton_on_cpu_without_interpreter_raises(monkeypatch, backend):
    """Both need Triton (gemm for its epilogues): an explicit request says why it cannot run, and backends()
    reports them unavailable; the automatic choice falls back quietly."""
    from metricloss_kernels import _backend
    from metricloss_kernels import triton as kernels
    from metricloss_kernels.lse import class_lse
    monkeypatch.setattr(kernels, "INTERPRET", False)
    x, y, w = data(n=9, c=6, d=5)
    with pytest.raises(RuntimeError, match=f"backend='{backend}' cannot run: .*TRITON_INTERPRET"):
        F.proxy_nca_loss(x, y, w, backend=backend)
    with pytest.raises(RuntimeError, match=f"impl='{backend}' cannot run: .*TRITON_INTERPRET"):
        class_lse(x, w, y, impl=backend)
    available, why = mlk.backends()[backend]
    assert not available and "TRITON_INTERPRET" in why
    assert _backend.resolve("auto", torch.device("cpu"), 10) == "reference"


def test_half_precision_result_dtype():
    x, y, w = data(n=16, c=6, d=8, dtype=torch.float32)
    for dtype in (torch.float16, torch.bfloat16):
        xh = x.to(dtype).requires_grad_()
        out = F.proxy_anchor_loss(xh, y, w.to(dtype), backend="reference")
        out.backward()
        assert out.dtype == dtype and xh.grad.dtype == dtype
        torch.testing.assert_close(out.float(), F.proxy_anchor_loss(x, y, w), rtol=2e-2, atol=2e-2)


def test_normalisation_arguments():
    for fn in (mlk.unit_range, mlk.unit_bounce):
        with pytest.raises(ValueError, match="scale"):
            fn(torch.randn(3, 4), scale=0.0)
        with pytest.raises(TypeError, match="x"):
            fn(torch.ones(3, 4, dtype=torch.long))


def test_mpa_needs_two_classes_and_exp_triplet_needs_the_ball():
    x, y, w = data(n=8, c=1, d=6)
    with pytest.raises(ValueError, match="at least 2 classes"):
        F.mpa_loss(x, y, w, centers_per_class=1)
    x, y, _ = data(n=8, c=3, d=6)
    with pytest.raises(ValueError, match="embedding_scale"):
        F.exponential_triplet_loss(10 * x, y, 10, distance="euclidean")
    inside = mlk.unit_range(10 * x)
    assert torch.isfinite(F.exponential_triplet_loss(inside, y, 10, distance="euclidean"))


def test_center_loss_alpha_range():
    with pytest.raises(ValueError, match="alpha"):
        mlk.CenterLoss(3, 4, alpha=1.5)


def test_polytope_loss_uses_cached_weights():
    from metricloss_kernels import polytopes
    a = polytopes.polytope_weights("simplex", 12, torch.device("cpu"), torch.float32)
    assert a is polytopes.polytope_weights("simplex", 12, torch.device("cpu"), torch.float32)
    torch.testing.assert_close(a, mlk.RegularPolytopeLoss(12).proxies)


@pytest.mark.parametrize("make, arg", [
    (lambda: mlk.ProxyAnchorLoss(5, 4, alpha=-1.0), "alpha"),
    (lambda: mlk.SoftTripleLoss(5, 4, gamma=0.0), "gamma"),
    (lambda: mlk.ArcFaceLoss(5, 4, margin=200.0), "margin"),
    (lambda: mlk.ProxyNCALoss(5, 4, backend="cuda"), "backend"),
    (lambda: mlk.MPALoss(5, 4, variant="x"), "variant"),
    (lambda: mlk.ProxyRepelLoss(5, 4, variant="x"), "variant"),
    (lambda: mlk.ContrastiveLoss(pos_margin="a"), "pos_margin"),
    (lambda: mlk.TripletMarginLoss(mining="easy"), "mining"),
    (lambda: mlk.MarginLoss(margin="a"), "margin"),
    (lambda: mlk.CenterLoss(3, 4, margin=-1.0), "margin"),
    (lambda: mlk.ExponentialTripletLoss(10, overlap="a"), "overlap"),
    (lambda: mlk.ExponentialTripletLoss(1), "overlap"),
    (lambda: mlk.RegularPolytopeLoss(5, margin=-10.0), "margin"),
    (lambda: mlk.RegularPolytopeLoss(5.0), "num_classes"),
    (lambda: mlk.MultiSimilarityLoss(beta=0.0), "beta"),
    (lambda: mlk.SoftTripleLoss(5, 4, centers_per_class=0), "centers_per_class"),
])
def test_module_constructors_validate(make, arg):
    with pytest.raises(ValueError, match=arg):
        make()


def test_center_loss_refuses_to_update_centres_from_nan():
    loss = mlk.CenterLoss(3, 4)
    before = loss.centers.clone()
    x = torch.randn(6, 4)
    x[1, 2] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        loss(x, torch.tensor([0, 0, 1, 1, 2, 2]))
    assert torch.equal(loss.centers, before)


def test_polytope_cache_survives_inference_mode():
    from metricloss_kernels import polytopes
    polytopes.polytope_weights.cache_clear()
    loss = mlk.RegularPolytopeLoss(10)
    x, y = torch.randn(16, loss.embedding_size), torch.arange(16) % 10
    with torch.inference_mode():
        loss(x, y)
    for backend in ("reference", "chunked"):
        loss.backend = backend
        xg = x.clone().requires_grad_()
        loss(xg, y).backward()
        assert torch.isfinite(xg.grad).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_exponential_triplet_accepts_half_precision_ball(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 16, generator=g)
    x = torch.cat([x, -x])  # antipodal pairs: distances at D_max exactly, up to rounding
    y = torch.cat([torch.arange(8) % 4, 4 + torch.arange(8) % 4])
    out = F.exponential_triplet_loss(mlk.unit_range(x.to(dtype)), y, 10, distance="euclidean")
    assert out.dtype == dtype and torch.isfinite(out)


def test_evaluate_query_set_as_reference_needs_its_labels():
    x, y = torch.randn(30, 4), torch.arange(30) % 3
    with pytest.raises(ValueError, match="reference_labels"):
        mlk.evaluate(x, y, x, torch.zeros(30, dtype=torch.long))


@pytest.mark.parametrize("make, arg", [
    (lambda: mlk.ContrastiveLoss(backend="triton"), "backend"),
    (lambda: mlk.CenterLoss(3, 4, backend="chunked"), "backend"),
    (lambda: mlk.MarginLoss(backend="triton"), "backend"),
    (lambda: mlk.ProxyNCALoss(1, 4), "num_classes"),
    (lambda: mlk.MPALoss(1, 4, centers_per_class=2), "num_classes"),
])
def test_constructors_reject_what_forward_would(make, arg):
    with pytest.raises(ValueError, match=arg):
        make()


def test_class_lse_rejects_unknown_arguments():
    from metricloss_kernels.lse import class_lse
    x, y, w = data(n=5, c=3, d=4)
    for impl in ("chunked", "triton", "gemm"):
        with pytest.raises(ValueError, match="reduce"):
            class_lse(x.float(), w.float(), y, reduce="rows", impl=impl)
    with pytest.raises(ValueError, match="impl"):
        class_lse(x, w, y, impl="cuda")
    with pytest.raises(ValueError, match="block_classes"):
        class_lse(x, w, y, block_classes=-1)


# ---- the NaN rule: NaN or Inf in any floating input -> NaN loss and NaN gradients, every loss ---------------------
NAN_RULE_LOSSES = {  # (x, y, w [C*K, D], b) -> loss; "w" also stands for a weight, a bias, centres or a beta
    "proxy_nca": lambda x, y, w, b: F.proxy_nca_loss(x, y, w[::2], backend=b),
    "proxy_anchor": lambda x, y, w, b: F.proxy_anchor_loss(x, y, w[::2], backend=b),
    "soft_triple": lambda x, y, w, b: F.soft_triple_loss(x, y, w, centers_per_class=2, backend=b),
    "mpa": lambda x, y, w, b: F.mpa_loss(x, y, w, centers_per_class=2, backend=b),
    "arcface": lambda x, y, w, b: F.arcface_loss(x, y, w[::2], backend=b),
    "cosface": lambda x, y, w, b: F.cosface_loss(x, y, w[::2], backend=b),
    "l2_softmax": lambda x, y, w, b: F.l2_softmax_loss(x, y, w[::2], bias=w[1::2, 0], backend=b),
    "regular_polytope": lambda x, y, w, b: F.regular_polytope_loss(x[:, :4], y, 5, backend=b),
    "proxy_repel": lambda x, y, w, b: F.proxy_repel_loss(x, y, w[::2], variant="batch", backend=b),
    "contrastive": lambda x, y, w, b: F.contrastive_loss(x, y, backend=b),
    "triplet_semi_hard": lambda x, y, w, b: F.triplet_margin_loss(x, y, mining="semi-hard", backend=b),
    "triplet_hard": lambda x, y, w, b: F.triplet_margin_loss(x, y, distance="euclidean", mining="hard", backend=b),
    "lifted_structure": lambda x, y, w, b: F.lifted_structure_loss(x, y, backend=b),
    "npairs": lambda x, y, w, b: F.npairs_loss(x, y, backend=b),
    "margin": lambda x, y, w, b: F.margin_loss(x, y, beta=w[:5, 0], generator=torch.Generator().manual_seed(0),
                                               backend=b),
    "multi_similarity": lambda x, y, w, b: F.multi_similarity_loss(x, y, backend=b),
    "exponential_triplet": lambda x, y, w, b: F.exponential_triplet_loss(x, y, 10, backend=b),
    "center": lambda x, y, w, b: F.center_loss(x, y, w[::2]),
}
STREAMED_NAN_RULE = ("contrastive", "triplet_semi_hard", "triplet_hard", "lifted_structure", "npairs", "margin",
                     "multi_similarity", "exponential_triplet")  # the pair losses with a chunked backend
PROXY_NAN_RULE = ("proxy_nca", "proxy_anchor", "soft_triple", "mpa", "arcface", "cosface", "l2_softmax",
                  "regular_polytope", "proxy_repel")


@pytest.mark.parametrize("backend", ["reference", "chunked", "gemm"])
@pytest.mark.parametrize("where", ["nan_embedding", "inf_embedding", "nan_weight"])
@pytest.mark.parametrize("name", sorted(NAN_RULE_LOSSES))
def test_nan_or_inf_input_gives_nan_loss_and_gradients(name, where, backend):
    """One rule for every loss (docs/formulas.md, Numerical rules): a NaN or Inf entry in any floating input makes
    the loss NaN and every gradient through it NaN. margin_loss returned a finite 0.75 (the NaN row was never
    sampled), semi-hard triplets a finite loss; the others had NaN in one row's gradient only."""
    streamed = STREAMED_NAN_RULE if backend == "chunked" else ()
    if backend != "reference" and name not in PROXY_NAN_RULE + streamed:
        pytest.skip("this pair loss has no such backend")
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(12, 8, generator=g), torch.randn(10, 8, generator=g)
    y = torch.tensor([0, 1, 2, 3, 4] * 2 + [0, 1])
    if where == "nan_weight":
        if name not in PROXY_NAN_RULE + ("margin", "center") or name == "regular_polytope":
            pytest.skip("this loss has no floating input besides the embeddings")
        w[2, 0] = math.nan  # a proxy, a weight row, a learnable beta of margin, a centre
    else:
        x[3, 2] = math.nan if where == "nan_embedding" else math.inf
    x, w = x.requires_grad_(), w.requires_grad_()
    loss = NAN_RULE_LOSSES[name](x, y, w, backend)
    gx, gw = torch.autograd.grad(loss, [x, w], allow_unused=True)
    assert torch.isnan(loss)
    # every entry the loss depends on has a NaN gradient; the others (rows of w a loss does not use) exactly 0
    for grad in (gx, gw):
        assert grad is None or not (torch.isfinite(grad) & (grad != 0)).any()
    assert torch.isnan(gx).any() and (gw is None or name == "center" or torch.isnan(gw).any())


@pytest.mark.parametrize("backend", ["reference", "chunked", "triton", "gemm"])
def test_inference_mode_embeddings_train_learnable_proxies(backend):
    """Embeddings and labels made under torch.inference_mode (a frozen backbone) given to a module with learnable
    proxies: the streamed backends saved them for backward ("Inference tensors cannot be saved for backward")."""
    with torch.inference_mode():
        x, y = torch.randn(12, 8, generator=torch.Generator().manual_seed(9)), torch.arange(12) % 5
    loss_fn = mlk.SoftTripleLoss(5, 8, centers_per_class=2, backend=backend)
    loss = loss_fn(x, y)
    loss.backward()
    expected = reference.soft_triple_loss(x.clone(), y.clone(), loss_fn.proxies.detach(), 2)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=0)
    assert torch.isfinite(loss_fn.proxies.grad).all() and loss_fn.proxies.grad.abs().sum() > 0
