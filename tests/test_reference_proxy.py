"""Reference proxy losses (metricloss_kernels.reference.proxy) against docs/formulas.md.

The `_naive_*` functions below are written from the formulas with explicit Python loops over i, c, k on Python floats
(float64), independently of the implementation, and the reference must match them to rel 1e-6.
"""
import math

import pytest
import torch

from metricloss_kernels.polytopes import polytope_dim, polytope_margin, regular_polytope
from metricloss_kernels.reference.proxy import (arcface_loss, class_similarity, cosface_loss, l2_softmax_loss,
                                                mpa_loss, proxy_anchor_loss, proxy_nca_loss, proxy_regularizer,
                                                proxy_repel_loss, regular_polytope_loss, soft_triple_loss)
from utils import proxy_inputs

N, C, K, D = 37, 53, 3, 40
NEG_INF = float("-inf")


# ---------------------------------------------------------------- naive float64 loops, written from docs/formulas.md
def _unit(row):
    n = max(math.sqrt(sum(v * v for v in row)), 1e-12)
    return [v / n for v in row]


def _dot(a, b):
    return sum(p * q for p, q in zip(a, b))


def _lse(values):
    values = list(values)
    if not values:
        return NEG_INF
    m = max(values)
    return m + math.log(sum(math.exp(v - m) for v in values))


def _softplus(v):
    return 0.0 if v == NEG_INF else max(v, 0.0) + math.log1p(math.exp(-abs(v)))


def _ce(logits, y):
    return _lse(logits) - logits[y]


def _mean(values):
    values = list(values)
    return sum(values) / len(values)


def _naive_cosines(x, w):
    """x [N, D], w [P, D] tensors -> list of lists l[i][p]."""
    xs, ws = [_unit(r) for r in x.tolist()], [_unit(r) for r in w.tolist()]
    return [[_dot(xi, wp) for wp in ws] for xi in xs]


def _naive_similarity(x, w, k, gamma):
    """S[i][c] = sum_k softmax_k(l_ick / gamma) l_ick."""
    l = _naive_cosines(x, w)
    s = []
    for i in range(len(l)):
        row = []
        for c in range(len(l[i]) // k):
            lc = [l[i][c * k + t] for t in range(k)]
            m = max(lc)
            e = [math.exp((v - m) / gamma) for v in lc]
            row.append(sum(ei * v for ei, v in zip(e, lc)) / sum(e))
        s.append(row)
    return s


def _naive_regularizer(w, k):
    ws = [_unit(r) for r in w.tolist()]
    num_classes = len(ws) // k
    if k == 1:
        return 0.0
    total = 0.0
    for c in range(num_classes):
        for t in range(k):
            for u in range(t + 1, k):
                total += math.sqrt(2 + 1e-5 - 2 * _dot(ws[c * k + t], ws[c * k + u]))
    return total / (num_classes * k * (k - 1))


def _naive_nca(x, y, w, scale, exclude_positive):
    s, y = _naive_cosines(x, w), y.tolist()
    terms = []
    for i, yi in enumerate(y):
        others = [scale * s[i][c] for c in range(len(s[i])) if c != yi or not exclude_positive]
        terms.append(-scale * s[i][yi] + _lse(others))
    return _mean(terms)


def _naive_anchor_terms(s, y, alpha, margin):
    """Per class c: (positive term, negative term, c in batch, c has a negative)."""
    out = []
    for c in range(len(s[0])):
        pos = [-alpha * (s[i][c] - margin) for i in range(len(y)) if y[i] == c]
        neg = [alpha * (s[i][c] + margin) for i in range(len(y)) if y[i] != c]
        out.append((_softplus(_lse(pos)), _softplus(_lse(neg)), bool(pos), bool(neg)))
    return out


def _naive_anchor(x, y, w, margin, alpha):
    terms = _naive_anchor_terms(_naive_cosines(x, w), y.tolist(), alpha, margin)
    return _mean(p for p, _, present, _ in terms if present) + _mean(n for _, n, _, _ in terms)


def _naive_soft_triple(x, y, w, k, la, gamma, margin, tau):
    s, y = _naive_similarity(x, w, k, gamma), y.tolist()
    ce = _mean(_ce([la * (s[i][c] - (margin if c == yi else 0.0)) for c in range(len(s[i]))], yi)
               for i, yi in enumerate(y))
    return ce + tau * _naive_regularizer(w, k)


def _naive_mpa(x, y, w, k, alpha, margin, gamma, tau, variant):
    s, y = _naive_similarity(x, w, k, gamma), y.tolist()
    if variant == "mpa":
        terms = _naive_anchor_terms(s, y, alpha, margin)
        loss = _mean(p for p, _, present, _ in terms if present) + _mean(n for _, n, _, has in terms if has)
    elif variant == "dw":
        loss = _mean(_softplus(-alpha * (s[i][yi] - margin))
                     + _softplus(_lse(alpha * (s[i][c] + margin) for c in range(len(s[i])) if c != yi))
                     for i, yi in enumerate(y))
    else:
        loss = _mean(_softplus(_lse(alpha * ((margin - s[i][c]) if c == yi else (s[i][c] + margin))
                                    for c in range(len(s[i]))))
                     for i, yi in enumerate(y))
    return loss + tau * _naive_regularizer(w, k)


def _naive_arcface_from_cosines(cos, y, margin_rad, scale):
    th = math.cos(math.pi - margin_rad)
    mm = math.sin(math.pi - margin_rad) * margin_rad
    terms = []
    for i, yi in enumerate(y):
        c = min(max(cos[i][yi], -1 + 1e-7), 1 - 1e-7)
        phi = math.cos(math.acos(c) + margin_rad) if c > th else c - mm
        terms.append(_ce([scale * (phi if j == yi else cos[i][j]) for j in range(len(cos[i]))], yi))
    return _mean(terms)


def _naive_cosface(x, y, w, margin, scale):
    cos, y = _naive_cosines(x, w), y.tolist()
    return _mean(_ce([scale * (cos[i][c] - (margin if c == yi else 0.0)) for c in range(len(cos[i]))], yi)
                 for i, yi in enumerate(y))


def _naive_l2_softmax(x, y, w, b, scale, normalize_weights):
    xs = [_unit(r) for r in x.tolist()]
    ws = [_unit(r) for r in w.tolist()] if normalize_weights else w.tolist()
    bs = b.tolist() if b is not None else [0.0] * len(ws)
    return _mean(_ce([scale * _dot(xi, wc) + bc for wc, bc in zip(ws, bs)], yi) for xi, yi in zip(xs, y.tolist()))


def _naive_repel(x, y, w, alpha, margin, variant):
    y = y.tolist()
    xs, ws = [_unit(r) for r in x.tolist()], [_unit(r) for r in w.tolist()]
    pos = []
    for c, wc in enumerate(ws):
        members = [-alpha * (_dot(wc, xs[i]) - margin) for i in range(len(y)) if y[i] == c]
        if members:
            pos.append(_softplus(_lse(members)))
    neg = []
    for c, wc in enumerate(ws):
        sims = []
        for c2, wc2 in enumerate(ws):
            if c2 == c:
                continue
            p = _dot(wc, wc2) if variant == "proxies" else sum(_dot(wc, xi) * _dot(xi, wc2) for xi in xs)
            sims.append(alpha * (p + margin))
        neg.append(_softplus(_lse(sims)))
    return _mean(pos) + _mean(neg)


# ---------------------------------------------------------------- inputs
def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _data(seed, n=N, num_classes=C, k=K, d=D, num_labels=20, dtype=torch.float64):
    """(embeddings, labels, proxies) of utils.proxy_inputs, labels drawn from the first `num_labels` classes (so some
    classes repeat and some are absent)."""
    x, w, _, y = proxy_inputs(n, num_classes, k, d, seed=seed, dtype=dtype, num_labels=num_labels)
    return x, y, w


REL = 1e-6


def _check(value, expected):
    assert value.dtype == torch.float64 and value.shape == ()
    assert value.item() == pytest.approx(expected, rel=REL)


# ---------------------------------------------------------------- exact values against the loops
def test_class_similarity_and_regularizer():
    x, _, w = _data(0)
    s = class_similarity(x, w, K, 0.1)
    assert s.shape == (N, C)
    torch.testing.assert_close(s, torch.tensor(_naive_similarity(x, w, K, 0.1), dtype=torch.float64),
                               rtol=1e-9, atol=1e-12)
    _check(proxy_regularizer(w, K), _naive_regularizer(w, K))
    assert proxy_regularizer(w, 1).item() == 0.0


@pytest.mark.parametrize("exclude_positive", [True, False])
def test_proxy_nca(exclude_positive):
    x, y, w = _data(1, k=1)
    _check(proxy_nca_loss(x, y, w, exclude_positive=exclude_positive), _naive_nca(x, y, w, 2.0, exclude_positive))
    _check(proxy_nca_loss(x, y, w, 5.0, exclude_positive), _naive_nca(x, y, w, 5.0, exclude_positive))


def test_proxy_anchor():
    x, y, w = _data(2, k=1)
    _check(proxy_anchor_loss(x, y, w), _naive_anchor(x, y, w, 0.1, 32.0))
    _check(proxy_anchor_loss(x, y, w, 0.3, 8.0), _naive_anchor(x, y, w, 0.3, 8.0))


@pytest.mark.parametrize("tau", [0.2, 0.0])
def test_soft_triple(tau):
    x, y, w = _data(3)
    _check(soft_triple_loss(x, y, w, K, tau=tau), _naive_soft_triple(x, y, w, K, 20.0, 0.1, 0.01, tau))
    _check(soft_triple_loss(x, y, w, K, 10.0, 0.5, 0.2, tau), _naive_soft_triple(x, y, w, K, 10.0, 0.5, 0.2, tau))


@pytest.mark.parametrize("variant", ["mpa", "dw", "ap"])
def test_mpa(variant):
    x, y, w = _data(4)
    _check(mpa_loss(x, y, w, K, variant=variant), _naive_mpa(x, y, w, K, 32.0, 0.1, 0.1, 0.2, variant))
    _check(mpa_loss(x, y, w, K, 16.0, 0.2, 0.3, 0.0, variant),
           _naive_mpa(x, y, w, K, 16.0, 0.2, 0.3, 0.0, variant))


@pytest.mark.parametrize("margin", [28.6, 120.0])  # 120 deg puts every target below th: the "cos - mm" branch
def test_arcface(margin):
    x, y, w = _data(5, k=1)
    expected = _naive_arcface_from_cosines(_naive_cosines(x, w), y.tolist(), math.radians(margin), 64.0)
    _check(arcface_loss(x, y, w, margin), expected)


def test_cosface():
    x, y, w = _data(6, k=1)
    _check(cosface_loss(x, y, w), _naive_cosface(x, y, w, 0.35, 64.0))


@pytest.mark.parametrize("normalize_weights", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_l2_softmax(normalize_weights, with_bias):
    x, y, w = _data(7, k=1)
    b = torch.randn(C, generator=_gen(70), dtype=torch.float64) if with_bias else None
    _check(l2_softmax_loss(x, y, w, b, normalize_weights=normalize_weights),
           _naive_l2_softmax(x, y, w, b, 16.0, normalize_weights))


@pytest.mark.parametrize("polytope", ["simplex", "orthoplex", "cube"])
@pytest.mark.parametrize("margin", ["max", 0.0, 10.0])
def test_regular_polytope(polytope, margin):
    d = polytope_dim(polytope, C)
    x, y, _ = _data(8, d=d, num_labels=C)
    w = regular_polytope(polytope, C).double()
    m = polytope_margin(polytope, d) if margin == "max" else math.radians(margin)
    expected = _naive_arcface_from_cosines(_naive_cosines(x, w), y.tolist(), m, 30.0)
    _check(regular_polytope_loss(x, y, C, polytope, margin=margin), expected)
    if margin == 0.0:  # plain normalised RePoNet: cross-entropy of 30 * cosines
        cos = _naive_cosines(x, w)
        assert expected == pytest.approx(_mean(_ce([30.0 * v for v in cos[i]], yi) for i, yi in enumerate(y.tolist())),
                                         rel=1e-6)


@pytest.mark.parametrize("variant", ["proxies", "batch"])
def test_proxy_repel(variant):
    x, y, w = _data(9, k=1)
    _check(proxy_repel_loss(x, y, w, variant=variant), _naive_repel(x, y, w, 32.0, 0.1, variant))
    _check(proxy_repel_loss(x, y, w, 4.0, 0.3, variant), _naive_repel(x, y, w, 4.0, 0.3, variant))


@pytest.mark.parametrize("labels", [[4] * 6, [0, 0, 0, 2, 2, 1]], ids=["one_class", "singleton_class"])
def test_classwise_empty_sets_against_loops(labels):
    """Empty LSEs (a class with no negative, classes absent from the batch) give softplus(-inf) = 0."""
    x, _, w = _data(10, n=6, num_classes=5, k=K, d=7)
    y = torch.tensor(labels)
    w1 = w[::K].contiguous()
    _check(proxy_anchor_loss(x, y, w1), _naive_anchor(x, y, w1, 0.1, 32.0))
    for variant in ("mpa", "dw", "ap"):
        _check(mpa_loss(x, y, w, K, variant=variant), _naive_mpa(x, y, w, K, 32.0, 0.1, 0.1, 0.2, variant))
    for variant in ("proxies", "batch"):
        _check(proxy_repel_loss(x, y, w1, variant=variant), _naive_repel(x, y, w1, 32.0, 0.1, variant))


# ---------------------------------------------------------------- identities
def test_mpa_k1_tau0_equals_proxy_anchor():
    x, y, w = _data(11, k=1)
    expected = proxy_anchor_loss(x, y, w, 0.15, 20.0)
    torch.testing.assert_close(mpa_loss(x, y, w, 1, 20.0, 0.15, 0.1, 0.0, "mpa"), expected, rtol=1e-12, atol=0)
    # tau is irrelevant for K = 1 (R = 0), and gamma too (a softmax over one proxy is 1)
    torch.testing.assert_close(mpa_loss(x, y, w, 1, 20.0, 0.15, 0.7, 0.5, "mpa"), expected, rtol=1e-12, atol=0)


def test_mpa_differs_from_proxy_anchor_on_a_single_class_batch():
    """C- excludes the batch's only class, while ProxyAnchor's negative average runs over all C."""
    x, _, w = _data(12, n=5, num_classes=6, k=1, d=8)
    y = torch.full((5,), 2)
    terms = _naive_anchor_terms(_naive_cosines(x, w), y.tolist(), 32.0, 0.1)
    neg_sum = sum(n for _, n, _, _ in terms)
    pa, mpa = proxy_anchor_loss(x, y, w), mpa_loss(x, y, w, 1, tau=0.0)
    assert (mpa - pa).item() == pytest.approx(neg_sum / 5 - neg_sum / 6, rel=1e-9)


# ---------------------------------------------------------------- properties shared by every loss
def _case(name, num_classes, k, d):
    """-> (loss function of (x, y, w), proxies rows per class or None for the fixed polytope, embedding dim)."""
    table = {
        "proxy_nca": (lambda x, y, w: proxy_nca_loss(x, y, w), 1),
        "proxy_nca_softmax": (lambda x, y, w: proxy_nca_loss(x, y, w, 2.0, False), 1),
        "proxy_anchor": (lambda x, y, w: proxy_anchor_loss(x, y, w), 1),
        "soft_triple": (lambda x, y, w: soft_triple_loss(x, y, w, k), k),
        "mpa": (lambda x, y, w: mpa_loss(x, y, w, k, variant="mpa"), k),
        "mpa_dw": (lambda x, y, w: mpa_loss(x, y, w, k, variant="dw"), k),
        "mpa_ap": (lambda x, y, w: mpa_loss(x, y, w, k, variant="ap"), k),
        "arcface": (lambda x, y, w: arcface_loss(x, y, w), 1),
        "cosface": (lambda x, y, w: cosface_loss(x, y, w), 1),
        "l2_softmax": (lambda x, y, w: l2_softmax_loss(x, y, w), 1),
        "normface": (lambda x, y, w: l2_softmax_loss(x, y, w, None, 16.0, True), 1),
        "polytope_simplex": (lambda x, y, w: regular_polytope_loss(x, y, num_classes, "simplex"), None),
        "polytope_cube": (lambda x, y, w: regular_polytope_loss(x, y, num_classes, "cube"), None),
        "repel_proxies": (lambda x, y, w: proxy_repel_loss(x, y, w, variant="proxies"), 1),
        "repel_batch": (lambda x, y, w: proxy_repel_loss(x, y, w, variant="batch"), 1),
    }
    fn, rows = table[name]
    if rows is None:
        d = polytope_dim(name.split("_")[1], num_classes)
    return fn, rows, d


NAMES = ["proxy_nca", "proxy_nca_softmax", "proxy_anchor", "soft_triple", "mpa", "mpa_dw", "mpa_ap", "arcface",
         "cosface", "l2_softmax", "normface", "polytope_simplex", "polytope_cube", "repel_proxies", "repel_batch"]


def _inputs(name, seed, labels, num_classes, k, d, dtype=torch.float64):
    fn, rows, d = _case(name, num_classes, k, d)
    g = _gen(seed)
    x = torch.randn(len(labels), d, generator=g, dtype=dtype)
    w = torch.randn(num_classes * rows, d, generator=g, dtype=dtype) if rows else None
    return fn, x, torch.tensor(labels), w


def _grads(fn, x, y, w):
    x = x.detach().requires_grad_()
    w = w.detach().requires_grad_() if w is not None else None
    loss = fn(x, y, w)
    loss.backward()
    return loss, x.grad, (w.grad if w is not None else None)


@pytest.mark.parametrize("name", NAMES)
def test_gradcheck(name):
    # small sizes; the polytopes use 5 classes (simplex m ~ 104 deg, so both ArcFace branches are hit)
    fn, x, y, w = _inputs(name, 20, [0, 1, 1, 3, 3, 3, 4], 5, 3, 6)
    inputs = (x.requires_grad_(),) + ((w.requires_grad_(),) if w is not None else ())
    assert torch.autograd.gradcheck(lambda *t: fn(t[0], y, t[1] if len(t) > 1 else None), inputs)


@pytest.mark.parametrize("name", NAMES)
def test_invariant_to_rescaling_embeddings(name):
    fn, x, y, w = _inputs(name, 21, torch.randint(0, 20, (N,), generator=_gen(121)).tolist(), C, K, D)
    row_scales = 0.01 + 50 * torch.rand(N, 1, generator=_gen(221), dtype=torch.float64)
    torch.testing.assert_close(fn(x * row_scales, y, w), fn(x, y, w), rtol=1e-10, atol=0)


@pytest.mark.parametrize("labels", [[2] * 7, [0, 0, 1, 1, 1, 4, 4], [3, 0, 0, 0, 0, 0, 0]],
                         ids=["one_class", "pairs_and_classes_absent", "singleton_class"])
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.filterwarnings("ignore:Anomaly Detection has been enabled")
def test_degenerate_batches_are_finite(name, labels):
    fn, x, y, w = _inputs(name, 22, labels, 5, 3, 6)
    with torch.autograd.detect_anomaly():  # no NaN anywhere in the backward graph, not only in the result
        loss, gx, gw = _grads(fn, x, y, w)
    assert torch.isfinite(loss) and torch.isfinite(gx).all() and gx.abs().sum() > 0
    if gw is not None:
        assert torch.isfinite(gw).all()


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
@pytest.mark.parametrize("name", NAMES)
def test_half_precision(name, dtype, tol):
    fn, x, y, w = _inputs(name, 23, torch.randint(0, 20, (N,), generator=_gen(123)).tolist(), C, K, D,
                          dtype=torch.float32)
    x, w = x.to(dtype), (w.to(dtype) if w is not None else None)
    loss, gx, gw = _grads(fn, x, y, w)
    assert loss.dtype == gx.dtype == dtype and (gw is None or gw.dtype == dtype)
    # fp32 on the same (rounded) inputs: the half results may differ only by their final rounding
    loss32, gx32, gw32 = _grads(fn, x.float(), y, w.float() if w is not None else None)
    torch.testing.assert_close(loss.float(), loss32, rtol=tol, atol=0)
    torch.testing.assert_close(gx.float(), gx32, rtol=tol, atol=tol * gx32.abs().max().item())
    if gw is not None:
        torch.testing.assert_close(gw.float(), gw32, rtol=tol, atol=tol * gw32.abs().max().item())
