"""Property-based fuzzing of the public API (hypothesis): every loss (functional and modules) on every backend and
dtype, label pathologies, extreme values, invalid arguments, and knn/evaluate against a float64 brute force.

Invariants:
- a streamed backend (chunked; triton under the interpreter) agrees with the reference on the same values, forward
  and gradients, within the per-dtype tolerance of `utils.TOL`;
- finite inputs give a finite loss and finite gradients, dead (zero or underflowing) rows a zero gradient;
- NaN or Inf in any input gives a NaN loss and NaN gradients (docs/formulas.md, Numerical rules);
- invalid arguments raise ValueError/TypeError naming the argument;
- knn returns the float64 brute-force neighbours; evaluate's recall@k matches them.

Two modes (hypothesis profiles): "ci", the default (derandomized: the same cases on every run, a few minutes on
two cores), and "long" (METRICLOSS_FUZZ=long: 25x the cases, random), for local runs. Add
`--hypothesis-show-statistics` to pytest to see how many cases each test tried.
"""
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import metricloss_kernels as mlk
from metricloss_kernels import functional as F
from metricloss_kernels.polytopes import polytope_dim
from utils import TOL, assert_close, brute_force_scores

settings.register_profile("ci", deadline=None, derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("long", deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
MODE = os.environ.get("METRICLOSS_FUZZ", "ci")
if MODE not in ("ci", "long"):
    raise ValueError(f"METRICLOSS_FUZZ must be 'ci' or 'long', got {MODE!r}")
F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64


def cases(n: int):
    """Settings for a test that tries n cases in CI mode (25 n in the long mode)."""
    return settings(settings.get_profile(MODE), max_examples=n if MODE == "ci" else 25 * n)


# ------------------------------------------------------------------------------------------------ strategies
# name -> (function of (x, labels, w, **kw), rows of w per class (0: no w, the polytope), extra kwargs strategy)
PROXY_LOSSES = {
    "proxy_nca": (F.proxy_nca_loss, 1, st.fixed_dictionaries({"exclude_positive": st.booleans()})),
    "proxy_anchor": (F.proxy_anchor_loss, 1, st.just({})),
    "soft_triple": (F.soft_triple_loss, None, st.fixed_dictionaries({"tau": st.sampled_from([0.0, 0.2])})),
    "mpa": (F.mpa_loss, None, st.fixed_dictionaries({"variant": st.sampled_from(["mpa", "dw", "ap"])})),
    "arcface": (F.arcface_loss, 1, st.fixed_dictionaries({"margin": st.sampled_from([28.6, 120.0])})),
    "sub_center_arcface": (lambda embeddings, labels, proxies, centers_per_class, **kw: F.sub_center_arcface_loss(
        embeddings, labels, proxies, sub_centers=centers_per_class, **kw), None, st.just({})),
    "cosface": (F.cosface_loss, 1, st.just({})),
    "l2_softmax": (F.l2_softmax_loss, 1, st.fixed_dictionaries({"normalize_weights": st.booleans(),
                                                               "bias": st.booleans()})),
    "regular_polytope": (F.regular_polytope_loss, 0, st.fixed_dictionaries(
        {"polytope": st.sampled_from(["simplex", "orthoplex", "cube"]), "margin": st.sampled_from(["max", 10.0])})),
    "proxy_repel": (F.proxy_repel_loss, 1, st.fixed_dictionaries({"variant": st.sampled_from(["proxies", "batch"])})),
}
PAIR_LOSSES = {
    "contrastive": lambda x, y, c: F.contrastive_loss(x, y),
    "triplet_margin": lambda x, y, c: F.triplet_margin_loss(x, y, mining="semi-hard"),
    "triplet_hard_euclidean": lambda x, y, c: F.triplet_margin_loss(x, y, distance="euclidean", mining="hard"),
    "lifted_structure": lambda x, y, c: F.lifted_structure_loss(x, y),
    "npairs": lambda x, y, c: F.npairs_loss(x, y),
    "margin": lambda x, y, c: F.margin_loss(x, y, generator=torch.Generator().manual_seed(0)),
    "multi_similarity": lambda x, y, c: F.multi_similarity_loss(x, y),
    "exponential_triplet": lambda x, y, c: F.exponential_triplet_loss(x, y, c + 1),
}
LABELS = ["random", "one_class", "singletons", "absent_classes"]
# finite extremes: dead rows (zero, below 1e-12), huge rows (their squared norm overflows fp32), duplicates
GEOMETRIES = ["normal", "zero_rows", "tiny_rows", "huge_rows", "duplicates"]
HUGE = {F16: 1e4, BF16: 1e30, F32: 1e30, F64: 1e200}
# Gradients are compared with a floor of GRAD_FLOOR on their scale: their rounding follows the magnitude of the
# terms they sum (O(0.1) to O(scale) per entry), not the sum, which may cancel to ~0 (confident or symmetric
# batches): an fp32 gradient of max 2e-4 made of O(1) terms differs by ~7e-6 between two summation orders.
GRAD_FLOOR = 0.1


@st.composite
def batches(draw, dtypes=(F32, F64, F16)):
    """(x [N, D], labels [N], C, dtype, geometry): the labels int64 or int32, maybe non-contiguous."""
    dtype = draw(st.sampled_from(dtypes))
    n, c, d = draw(st.integers(1, 12)), draw(st.integers(2, 9)), draw(st.integers(2, 12))  # (D = 1: x^ = sign(x))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    kind = draw(st.sampled_from(LABELS))
    if kind == "singletons":
        n = min(n, c)
    labels = {"random": lambda: torch.randint(0, c, (n,), generator=g),
              "one_class": lambda: torch.full((n,), c - 1),
              "singletons": lambda: torch.randperm(c, generator=g)[:n],
              "absent_classes": lambda: torch.randint(0, max(1, c // 2), (n,), generator=g) * 2}[kind]()
    labels = labels.clamp_max(c - 1).to(draw(st.sampled_from([torch.int64, torch.int32])))
    if draw(st.booleans()):
        labels = torch.stack([labels, labels], 1)[:, 0]  # stride 2
    x = torch.randn(n, d, generator=g, dtype=F64)
    geometry = draw(st.sampled_from(GEOMETRIES))
    rows = torch.rand(n, generator=g) < 0.4
    if geometry == "zero_rows":
        x[rows] = 0
    elif geometry == "tiny_rows":
        x[rows] *= 1e-14
    elif geometry == "huge_rows":
        x[rows] *= HUGE[dtype]
    elif geometry == "duplicates" and n > 1:
        x[n // 2:] = x[:n - n // 2].clone()
    return x.to(dtype), labels, c, dtype, geometry


@st.composite
def proxy_cases(draw, dtypes=(F32, F64, F16)):
    """(name, x, labels, w or num_classes, kwargs, dtype): inputs of one proxy loss, w a leaf in x's dtype (or fp32
    for fp16 embeddings, sometimes)."""
    name = draw(st.sampled_from(sorted(PROXY_LOSSES)))
    _, rows, extra = PROXY_LOSSES[name]
    x, labels, c, dtype, geometry = draw(batches(dtypes))
    kwargs = dict(draw(extra))
    if rows == 0:  # the polytope's width is fixed by the class count
        d = polytope_dim(kwargs["polytope"], c)
        x = torch.randn(x.shape[0], d, generator=torch.Generator().manual_seed(x.shape[0]), dtype=F64).to(dtype)
        return name, x, labels, c, kwargs, dtype
    k = rows or draw(st.integers(1, 3))
    if rows is None:
        kwargs["centers_per_class"] = k
    w_dtype = draw(st.sampled_from([dtype, F32])) if dtype == F16 else dtype
    w = torch.randn(c * k, x.shape[1], generator=torch.Generator().manual_seed(c), dtype=F64)
    if geometry in ("zero_rows", "huge_rows") and name != "l2_softmax":
        w[::2] *= 0 if geometry == "zero_rows" else HUGE[w_dtype]
    if kwargs.pop("bias", False):
        kwargs["bias"] = torch.randn(c, dtype=F64).to(dtype)
    return name, x, labels, w.to(w_dtype), kwargs, dtype


def run_proxy(name, x, labels, w, kwargs, backend):
    """(loss, gradients of the floating leaves) of a proxy loss through the functional API."""
    leaves = [x.detach().clone().requires_grad_()]
    kw = dict(kwargs)
    if torch.is_tensor(w):
        leaves.append(w.detach().clone().requires_grad_())
    if torch.is_tensor(kw.get("bias")):
        kw["bias"] = kw["bias"].detach().clone().requires_grad_()
        leaves.append(kw["bias"])
    args = (leaves[0], labels, leaves[1] if torch.is_tensor(w) else w)
    loss = PROXY_LOSSES[name][0](*args, backend=backend, **kw)
    return loss, torch.autograd.grad(loss, leaves)


# ------------------------------------------------------------------------------------------------ properties
def check_against_reference(backend, case):
    name, x, labels, w, kwargs, dtype = case
    loss, grads = run_proxy(name, x, labels, w, kwargs, backend)
    ref, ref_grads = run_proxy(name, x, labels, w, kwargs, "reference")
    assert loss.dtype == ref.dtype == dtype
    assert torch.isfinite(ref) and all(torch.isfinite(g).all() for g in ref_grads), "reference not finite"
    rtol = TOL[dtype if torch.is_tensor(w) and w.dtype == dtype else F16]
    assert_close(loss.double(), ref.double(), rtol, f"{name} loss", floor=1.0)
    for got, want in zip(grads, ref_grads):
        assert torch.isfinite(got).all(), f"{name}: non-finite gradient"
        assert_close(got.double(), want.double(), rtol, f"{name} gradient", floor=GRAD_FLOOR)
    dead = (x.double().norm(dim=1) <= 1e-12)
    assert (grads[0][dead] == 0).all(), f"{name}: a dead row has a gradient"


@cases(60)
@given(case=proxy_cases(dtypes=(F32, F64, F16, BF16)))
def test_chunked_agrees_with_reference(case):
    check_against_reference("chunked", case)


@cases(12)
@given(case=proxy_cases(dtypes=(F32, F64, F16)))  # bf16 Triton: GPU only (the interpreter's bf16 tl.dot is wrong)
def test_triton_agrees_with_reference(case):
    check_against_reference("triton", case)


@cases(12)
@given(case=proxy_cases(dtypes=(F32, F64, F16)))  # bf16 gemm: GPU only (no CPU GEMM of bf16 into fp32)
def test_gemm_agrees_with_reference(case):
    check_against_reference("gemm", case)


@cases(40)
@given(batch=batches(dtypes=(F32, F64, F16, BF16)), name=st.sampled_from(sorted(PAIR_LOSSES)))
def test_pair_losses_are_finite_with_dead_rows_still(batch, name):
    x, labels, c, dtype, geometry = batch
    assume(not (name == "npairs" and geometry == "huge_rows"))  # raw dot products: |x|^2 overflows, as it should
    x = x.requires_grad_()
    loss = PAIR_LOSSES[name](x, labels, c)
    (grad,) = torch.autograd.grad(loss, x)
    assert loss.dtype == dtype and torch.isfinite(loss) and torch.isfinite(grad).all()
    if name != "npairs":  # the others normalise: a dead row has no direction and no gradient
        assert (grad[x.detach().double().norm(dim=1) <= 1e-12] == 0).all()


ALL_LOSSES = sorted(PROXY_LOSSES) + sorted(PAIR_LOSSES)


@cases(40)
@given(case=proxy_cases(dtypes=(F32, F64)), pair=st.sampled_from(sorted(PAIR_LOSSES)), use_pair=st.booleans(),
       backend=st.sampled_from(["reference", "chunked"]), bad=st.sampled_from([math.nan, math.inf, -math.inf]),
       where=st.data())
def test_nan_or_inf_in_gives_nan_out(case, pair, use_pair, backend, bad, where):
    name, x, labels, w, kwargs, dtype = case
    x = x.clone()
    i, j = where.draw(st.integers(0, x.shape[0] - 1)), where.draw(st.integers(0, x.shape[1] - 1))
    poison_w = torch.is_tensor(w) and not use_pair and where.draw(st.booleans())
    if poison_w:
        w = w.clone()
        w[where.draw(st.integers(0, w.shape[0] - 1)), j % w.shape[1]] = bad
    else:
        x[i, j] = bad
    if use_pair:
        loss = PAIR_LOSSES[pair](x.requires_grad_(), labels, w if isinstance(w, int) else len(w))
        grads = torch.autograd.grad(loss, x)
    else:
        loss, grads = run_proxy(name, x, labels, w, kwargs, backend)
    assert torch.isnan(loss)
    for grad in grads:  # NaN wherever the loss depends on the input, 0 elsewhere
        assert not (torch.isfinite(grad) & (grad != 0)).any()


# name -> (call with one argument replaced, argument name, bad values)
def _call(name, **override):
    x, y, w = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2]), torch.randn(3, 4)
    args = dict(embeddings=x, labels=y, proxies=w)
    args.update(override)
    if name in PROXY_LOSSES and name != "regular_polytope":
        fn, rows, _ = PROXY_LOSSES[name]
        weight = "proxies" if name in ("proxy_nca", "proxy_anchor", "soft_triple", "mpa", "proxy_repel",
                                       "sub_center_arcface") else "weight"
        kw = {"centers_per_class": 1} if rows is None else {}
        return fn(**{"embeddings": args["embeddings"], "labels": args["labels"], weight: args["proxies"]}, **kw)
    return PAIR_LOSSES[name](args["embeddings"], args["labels"], 3)


BAD_ARGUMENTS = [
    ("embeddings", lambda: torch.randn(6)), ("embeddings", lambda: torch.ones(6, 4, dtype=torch.long)),
    ("embeddings", lambda: [[0.0] * 4] * 6), ("embeddings", lambda: torch.randn(0, 4)),
    ("labels", lambda: torch.zeros(6)), ("labels", lambda: torch.zeros(5, dtype=torch.long)),
    ("labels", lambda: torch.zeros(6, 1, dtype=torch.long)), ("labels", lambda: torch.full((6,), -1)),
    ("labels", lambda: [0] * 6),
    ("proxies", lambda: torch.randn(3, 5)), ("proxies", lambda: torch.ones(3, 4, dtype=torch.long)),
]


@cases(60)
@given(name=st.sampled_from([n for n in ALL_LOSSES if n != "regular_polytope"]),
       bad=st.sampled_from(BAD_ARGUMENTS))
def test_invalid_arguments_raise_errors_naming_them(name, bad):
    argument, make = bad
    assume(argument != "proxies" or name in PROXY_LOSSES)
    with pytest.raises((ValueError, TypeError)) as err:
        _call(name, **{argument: make()})
    word = "weight" if argument == "proxies" and name in ("arcface", "cosface", "l2_softmax") else argument
    assert word in str(err.value)


MODULES = {
    "ProxyNCALoss": lambda c, d, b: mlk.ProxyNCALoss(c, d, backend=b),
    "ProxyAnchorLoss": lambda c, d, b: mlk.ProxyAnchorLoss(c, d, backend=b),
    "SoftTripleLoss": lambda c, d, b: mlk.SoftTripleLoss(c, d, centers_per_class=2, backend=b),
    "MPALoss": lambda c, d, b: mlk.MPALoss(c, d, centers_per_class=2, backend=b),
    "ArcFaceLoss": lambda c, d, b: mlk.ArcFaceLoss(c, d, backend=b),
    "CosFaceLoss": lambda c, d, b: mlk.CosFaceLoss(c, d, backend=b),
    "L2SoftmaxLoss": lambda c, d, b: mlk.L2SoftmaxLoss(c, d, backend=b),
    "ProxyRepelLoss": lambda c, d, b: mlk.ProxyRepelLoss(c, d, backend=b),
}


@cases(30)
@given(batch=batches(dtypes=(F32, F64)), module=st.sampled_from(sorted(MODULES)))
def test_modules_chunked_equal_reference(batch, module):
    """The modules (their parameters initialised once, copied) on chunked and reference."""
    x, labels, c, dtype, _ = batch
    torch.manual_seed(c)  # the modules' initialisation draws from the global generator
    ref_module = MODULES[module](c, x.shape[1], "reference").to(dtype)
    chunked_module = MODULES[module](c, x.shape[1], "chunked").to(dtype)
    chunked_module.load_state_dict(ref_module.state_dict())
    ref, loss = ref_module(x, labels), chunked_module(x, labels)
    assert_close(loss.double(), ref.double(), TOL[dtype], module, floor=1.0)
    ref.backward()
    loss.backward()
    for (pname, p), q in zip(ref_module.named_parameters(), chunked_module.parameters()):
        assert_close(q.grad.double(), p.grad.double(), TOL[dtype], f"{module}.{pname}", floor=GRAD_FLOOR)


# ------------------------------------------------------------------------------------------------ retrieval
@st.composite
def point_sets(draw):
    """(queries [Q, D], reference [R, D] or None, k, metric): offset and clustered data, duplicates included."""
    dtype = draw(st.sampled_from([F32, F64]))
    q, r, d = draw(st.integers(2, 20)), draw(st.integers(2, 30)), draw(st.integers(1, 8))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    offset = draw(st.sampled_from([0.0, 10.0, 1e3]))
    spread = draw(st.sampled_from([1.0, 0.01]))
    queries = offset + spread * torch.randn(q, d, generator=g, dtype=F64)
    self_search = draw(st.booleans())
    ref = None if self_search else offset + spread * torch.randn(r, d, generator=g, dtype=F64)
    if ref is not None and draw(st.booleans()):
        ref[: min(q, r)] = queries[: min(q, r)]  # exact copies
    k = draw(st.integers(1, (q - 1) if self_search else r))
    metric = draw(st.sampled_from(["cosine", "dot", "euclidean"]))
    return queries.to(dtype), None if ref is None else ref.to(dtype), k, metric


def brute_force(queries, ref, k, metric):
    """float64 scores [Q, R] (larger is better) and the k-th best score of each query."""
    s = brute_force_scores(queries, queries if ref is None else ref, metric, ref is None)
    return s, s.topk(k, dim=1).values[:, -1]


@cases(60)
@given(points=point_sets())
def test_knn_matches_float64_brute_force(points):
    """Every returned neighbour is among the k best of the float64 brute force, up to the input dtype's rounding
    of the scores (cosine and dot rank by GEMM scores; euclidean is exact by contract)."""
    queries, ref, k, metric = points
    scores, idx = mlk.knn(queries, ref, k=k, metric=metric)
    s, kth = brute_force(queries, ref, k, metric)
    got = s.gather(1, idx)
    if metric == "euclidean":
        slack = 0.0 if queries.dtype == F64 else 1e-6 * (-kth).abs().clamp_min(1e-30)
        assert (got >= kth[:, None] - (slack[:, None] if torch.is_tensor(slack) else slack)).all()
        torch.testing.assert_close(scores.double(), -got, rtol=1e-6 if queries.dtype == F32 else 1e-12, atol=0)
    else:
        eps = torch.finfo(queries.dtype).eps
        scale = s.abs().masked_fill(~torch.isfinite(s), 0).amax(1, keepdim=True)
        assert (got >= kth[:, None] - 8 * eps * scale * queries.shape[1]).all()
    if ref is None:
        assert not (idx == torch.arange(queries.shape[0])[:, None]).any()


@cases(30)
@given(points=point_sets(), num_classes=st.integers(1, 4))
def test_evaluate_recall_matches_brute_force(points, num_classes):
    queries, _, _, metric = points
    queries = queries.double()
    labels = torch.arange(queries.shape[0]) % num_classes
    assume(queries.shape[0] >= 3)
    s, _ = brute_force(queries, None, 1, metric)
    assume(((s.topk(2, dim=1).values[:, 0] - s.topk(2, dim=1).values[:, 1]).abs() > 1e-9).all())  # no ties at 1
    has_relevant = torch.bincount(labels)[labels] > 1
    assume(has_relevant.any())  # (evaluate refuses a batch where no query has a relevant item)
    result = mlk.evaluate(queries, labels, ks=(1,), metric=metric)
    hit = labels[s.argmax(1)] == labels
    expected = hit[has_relevant].double().mean().item()
    assert result["recall@1"] == pytest.approx(expected, abs=1e-12)
