"""Pair-family references (metricloss_kernels/reference/pair.py) against explicit loops written from docs/formulas.md,
with and without a reference set; the streamed backend (metricloss_kernels/streamed_pairs.py) against the reference."""
import functools
import itertools
import math

import pytest
import torch

from metricloss_kernels import functional, streamed_pairs
from metricloss_kernels.reference import pair
from utils import TOL, assert_close, largest_allocation, make_batch, peak_allocation  # noqa: E402  (tests/ is on sys.path)

F64 = torch.float64
REL = 1e-6


def unit(v):
    return v / max(float(v.norm()), 1e-12)


def candidates(x, y, ref=None):
    """(r, ry, own) as lists: the candidates of the anchors x, y and each anchor's own row among them: the batch
    itself (own row i) without a reference, else ref = (r, ry) (no own row) or (r, ry, own) (own[i] < 0: none)."""
    if ref is None:
        return list(x), y.tolist(), list(range(len(y)))
    r, ry, *own = ref
    return list(r), ry.tolist(), own[0].tolist() if own else [-1] * len(y)


def sims(x, r):
    """Python list-of-lists of cosine similarities of x's rows with r's, pair by pair, and the unit vectors."""
    xs, rs = [unit(v) for v in x], [unit(v) for v in r]
    return [[float(a @ b) for b in rs] for a in xs], xs, rs


def pos_neg(y, i, ry, own):
    """Anchor i's positives (same label, not its own row) and negatives among the candidates."""
    m = len(ry)
    return ([j for j in range(m) if j != own[i] and ry[j] == y[i]], [k for k in range(m) if ry[k] != y[i]])


def lse(vals):
    m = max(vals)
    return m + math.log(sum(math.exp(v - m) for v in vals))


def softplus(z):
    return max(z, 0.0) + math.log1p(math.exp(-abs(z)))


def relu(z):
    return max(z, 0.0)


def assert_rel(actual, expected, rel=REL):
    assert actual == pytest.approx(expected, rel=rel, abs=1e-12), (actual, expected)


def assert_zero_with_graph(fn, x, y, **kw):
    x = x.clone().requires_grad_(True)
    out = fn(x, y, **kw)
    assert out.item() == 0.0 and out.requires_grad
    out.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


# ---------------------------------------------------------------- loop references, written from the formulas
# Each takes the batch (x, y) and `ref` (see `candidates`): the anchors are x's rows, the candidates ref's.
def contrastive_loop(x, y, mp=1.0, mn=0.5, ref=None):
    r, ry, own = candidates(x, y, ref)
    s, _, _ = sims(x, r)
    y = y.tolist()
    pos, neg = [], []
    for i in range(len(y)):
        P, N = pos_neg(y, i, ry, own)
        pos += [relu(mp - s[i][j]) for j in P]
        neg += [relu(s[i][k] - mn) for k in N]
    return (sum(pos) / len(pos) if pos else 0.0) + (sum(neg) / len(neg) if neg else 0.0)


def triplet_loop(x, y, margin, distance, mining, ref=None):
    r, ry, own = candidates(x, y, ref)
    s, xs, rs = sims(x, r)
    y = y.tolist()

    def tl(a, p, n):
        if distance == "cosine":
            return relu(s[a][n] - s[a][p] + margin)
        dap, dan = float((xs[a] - rs[p]).norm()), float((xs[a] - rs[n]).norm())
        if distance == "squared_euclidean":
            dap, dan = dap ** 2, dan ** 2
        return relu(dap - dan + margin)

    losses = []
    for a in range(len(y)):
        P, N = pos_neg(y, a, ry, own)
        if mining == "all":
            losses += [tl(a, p, n) for p in P for n in N]
        elif mining == "semi-hard":
            for p in P:
                cands = [n for n in N if s[a][n] < s[a][p]]
                if cands:
                    losses.append(tl(a, p, max(cands, key=lambda n: s[a][n])))
        elif P and N:
            losses.append(tl(a, min(P, key=lambda p: s[a][p]), max(N, key=lambda n: s[a][n])))
    return sum(losses) / len(losses)


def lifted_loop(x, y, lam=0.5, ref=None):
    r, ry, own = candidates(x, y, ref)
    s, _, _ = sims(x, r)
    y = y.tolist()
    terms = []
    for i in range(len(y)):
        P, N = pos_neg(y, i, ry, own)
        if P and N:
            terms.append(relu(lse([lam - s[i][k] for k in P]) + lse([s[i][k] for k in N])))
    return sum(terms) / len(terms)


def npairs_loop(x, y, l2=0.02, ref=None):
    r, ry, own = candidates(x, y, ref)
    y = y.tolist()
    S = [[float(a @ b) for b in r] for a in x]
    terms = []
    for i in range(len(y)):
        P, N = pos_neg(y, i, ry, own)
        if P and N:
            terms.append(softplus(lse([S[i][k] - S[i][j] for j in P for k in N])))
    reg = l2 * sum(float(v @ v) for v in x) / len(y)
    return (sum(terms) / len(terms) if terms else 0.0) + reg


def ms_loop(x, y, alpha=2.0, beta=50.0, lam=0.5, eps=0.1, ref=None):
    r, ry, own = candidates(x, y, ref)
    s, _, _ = sims(x, r)
    y = y.tolist()
    total = 0.0
    for i in range(len(y)):
        P, N = pos_neg(y, i, ry, own)
        pos = [s[i][j] for j in P if s[i][j] < 1 - 1e-5]
        neg = [s[i][k] for k in N]
        if not pos or not neg:
            continue
        negm = [v for v in neg if v + eps > min(pos)]
        posm = [v for v in pos if v - eps < max(neg)]
        if not posm or not negm:
            continue
        total += softplus(lse([-alpha * (v - lam) for v in posm])) / alpha
        total += softplus(lse([beta * (v - lam) for v in negm])) / beta
    return total / len(y)


def dw_probs_loop(x, y, a, cutoff=0.5, nz=1.4, ref=None):
    """Distance-weighted sampling distribution of anchor a over the candidates (list), from Wu et al. Section 4."""
    r, ry, _ = candidates(x, y, ref)
    dim = x.shape[1]
    ya = int(y[a])
    w = [0.0] * len(ry)
    logs = {}
    for n in range(len(ry)):
        d = float((unit(x[a]) - unit(r[n])).norm())
        if ry[n] != ya and d < nz:
            dc = max(d, cutoff)
            logs[n] = (2 - dim) * math.log(dc) - (dim - 3) / 2 * math.log(1 - dc * dc / 4)
    if not logs:  # fallback: uniform over the anchor's negatives
        logs = {n: 0.0 for n in range(len(ry)) if ry[n] != ya}
    if logs:
        m = max(logs.values())
        z = sum(math.exp(v - m) for v in logs.values())
        for n, v in logs.items():
            w[n] = math.exp(v - m) / z
    return w


def margin_loop(x, y, alpha, beta, seed, ref=None):
    """Margin loss with the negatives drawn from loop-computed probabilities by inverse CDF: ordered positive pair
    (a, p) takes the first negative whose cumulative probability exceeds u[a, p] times the anchor's total, with
    u = torch.rand(N, M) from a generator seeded with `seed` (the draw the reference makes)."""
    r, ry, own = candidates(x, y, ref)
    yl = y.tolist()
    b = (lambda a: float(beta[yl[a]])) if torch.is_tensor(beta) else (lambda a: beta)
    u = torch.rand(len(yl), len(ry), generator=torch.Generator().manual_seed(seed), dtype=F64).tolist()
    dist = lambda i, j: float((unit(x[i]) - unit(r[j])).norm())  # noqa: E731
    losses = []
    for a in range(len(yl)):
        probs = dw_probs_loop(x, y, a, ref=ref)
        for p in pos_neg(yl, a, ry, own)[0]:
            losses.append(relu(alpha + dist(a, p) - b(a)))
            if sum(probs) > 0:
                cdf = list(itertools.accumulate(probs))
                n = next(i for i, c in enumerate(cdf) if c > u[a][p] * cdf[-1])
                losses.append(relu(alpha - dist(a, n) + b(a)))
    return sum(losses) / len(losses)


# ---------------------------------------------------------------- values against the loops
@pytest.mark.parametrize("seed", [0, 1])
def test_contrastive_matches_loop(seed):
    x, y = make_batch(seed=seed)
    assert_rel(pair.contrastive_loss(x, y).item(), contrastive_loop(x, y))
    assert_rel(pair.contrastive_loss(x, y, 0.8, 0.1).item(), contrastive_loop(x, y, 0.8, 0.1))


@pytest.mark.parametrize("distance", ["cosine", "euclidean", "squared_euclidean"])
@pytest.mark.parametrize("mining", ["all", "semi-hard", "hard"])
def test_triplet_matches_loop(distance, mining):
    x, y = make_batch(n=23, d=12, c=5, seed=2)
    margin = 0.1 if distance == "cosine" else 0.3
    got = pair.triplet_margin_loss(x, y, margin=margin, distance=distance, mining=mining).item()
    assert got > 0
    assert_rel(got, triplet_loop(x, y, margin, distance, mining))


def test_triplet_all_blocks_over_anchors(monkeypatch):
    x, y = make_batch(n=19, d=7, c=4, seed=3)
    full = pair.triplet_margin_loss(x, y, margin=0.2)
    monkeypatch.setattr(pair, "_TRIPLET_BLOCK_ELEMS", 19 * 19 * 3)  # blocks of 3 anchors, last one partial
    assert_rel(pair.triplet_margin_loss(x, y, margin=0.2).item(), full.item(), rel=1e-12)


def test_triplet_mining_differs():
    """The three minings select different triplets on a generic batch (so the loops above are discriminating)."""
    x, y = make_batch(seed=4)
    vals = {m: pair.triplet_margin_loss(x, y, margin=0.1, mining=m).item() for m in ("all", "semi-hard", "hard")}
    assert len({round(v, 9) for v in vals.values()}) == 3
    assert vals["hard"] > vals["all"]


def test_triplet_bad_arguments():
    x, y = make_batch(n=5, d=3, c=2)
    with pytest.raises(ValueError, match="distance"):
        pair.triplet_margin_loss(x, y, distance="manhattan")
    with pytest.raises(ValueError, match="mining"):
        pair.triplet_margin_loss(x, y, mining="easy")


@pytest.mark.parametrize("seed", [0, 5])
def test_lifted_structure_matches_loop(seed):
    x, y = make_batch(seed=seed)
    assert_rel(pair.lifted_structure_loss(x, y).item(), lifted_loop(x, y))
    assert_rel(pair.lifted_structure_loss(x, y, margin=1.5).item(), lifted_loop(x, y, 1.5))


@pytest.mark.parametrize("seed", [0, 6])
def test_npairs_matches_loop(seed):
    x, y = make_batch(n=21, d=10, c=6, seed=seed)
    x = x * 0.3
    assert_rel(pair.npairs_loss(x, y).item(), npairs_loop(x, y))
    assert_rel(pair.npairs_loss(x, y, l2_reg=0.5).item(), npairs_loop(x, y, 0.5))


def clustered_batch(n=37, d=6, c=5, noise=0.6, seed=0):
    """Samples around random class centres: positives mostly similar, so the MS mining has work to do."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (n,), generator=g)
    y[-1] = c
    centres = torch.randn(c + 1, d, generator=g, dtype=F64)
    return centres[y] + noise * torch.randn(n, d, generator=g, dtype=F64), y


def ms_mined_counts(x, y, eps=0.1):
    """(negatives dropped, positives dropped) by the MS mining over the whole batch, by loops."""
    s, _, _ = sims(x, x)
    own = list(range(len(y)))
    y = y.tolist()
    dropped_neg = dropped_pos = 0
    for i in range(len(y)):
        P, N = pos_neg(y, i, y, own)
        pos = [s[i][j] for j in P if s[i][j] < 1 - 1e-5]
        neg = [s[i][k] for k in N]
        if pos and neg:
            dropped_neg += sum(v + eps <= min(pos) for v in neg)
            dropped_pos += sum(v - eps >= max(neg) for v in pos)
    return dropped_neg, dropped_pos


@pytest.mark.parametrize("seed", [0, 7])
def test_multi_similarity_matches_loop(seed):
    x, y = make_batch(n=37, d=6, c=5, seed=seed)
    assert_rel(pair.multi_similarity_loss(x, y).item(), ms_loop(x, y))
    assert_rel(pair.multi_similarity_loss(x, y, 1.0, 10.0, 0.3, 0.3).item(), ms_loop(x, y, 1.0, 10.0, 0.3, 0.3))


@pytest.mark.parametrize("seed", [0, 1])
def test_multi_similarity_mining_matches_loop(seed):
    x, y = clustered_batch(seed=seed)
    dropped_neg, dropped_pos = ms_mined_counts(x, y)
    assert dropped_neg > 0 and dropped_pos > 0  # both mining rules are exercised
    got = pair.multi_similarity_loss(x, y).item()
    assert got > 0
    assert_rel(got, ms_loop(x, y))


def test_multi_similarity_drops_near_duplicate_positives():
    """A positive with S >= 1 - 1e-5 is not a positive (neither in the loss nor in min(pos))."""
    ang = torch.tensor([0.0, 0.0, 60.0, 10.0, 200.0], dtype=F64).deg2rad()
    x = torch.stack([ang.cos(), ang.sin()], dim=1)
    x[1] *= 2.0  # a duplicate of sample 0
    y = torch.tensor([0, 0, 0, 1, 1])
    got = pair.multi_similarity_loss(x, y).item()
    assert got > 0
    assert_rel(got, ms_loop(x, y))
    only = torch.tensor([0, 0, 1, 2, 3])  # the duplicate is sample 0's only positive: nothing left
    assert_zero_with_graph(pair.multi_similarity_loss, x, only)
    assert ms_loop(x, only) == 0.0


@pytest.mark.parametrize("d", [2, 3, 8])
def test_distance_weighted_probabilities_match_loop(d):
    x, y = make_batch(n=25, d=d, c=5, seed=d)
    xn = torch.nn.functional.normalize(x, dim=1)
    dist = pair._safe_sqrt(pair._sq_dist(xn, xn))
    neg = y[:, None] != y[None, :]
    probs = pair._distance_weighted_probs(dist, neg, x.shape[1], 0.5, 1.4)
    expected = torch.tensor([dw_probs_loop(x, y, a) for a in range(len(y))], dtype=F64)
    torch.testing.assert_close(probs, expected, rtol=1e-9, atol=1e-12)
    assert (probs[neg.logical_not()] == 0).all()


def test_distance_weighted_fallback_is_uniform_over_negatives():
    """Every negative at distance >= 1.4: sampling falls back to uniform over the anchor's negatives."""
    x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [-1.0, 0.0], [-1.0, 0.05]], dtype=F64)
    y = torch.tensor([0, 0, 1, 1])
    xn = torch.nn.functional.normalize(x, dim=1)
    dist = pair._safe_sqrt(pair._sq_dist(xn, xn))
    probs = pair._distance_weighted_probs(dist, y[:, None] != y[None, :], 2, 0.5, 1.4)
    expected = torch.tensor([[0, 0, .5, .5], [0, 0, .5, .5], [.5, .5, 0, 0], [.5, .5, 0, 0]], dtype=F64)
    torch.testing.assert_close(probs, expected)


@pytest.mark.parametrize("per_class", [False, True])
def test_margin_loss_matches_loop(per_class):
    x, y = make_batch(n=30, d=8, c=6, seed=10)
    beta = torch.linspace(0.9, 1.4, 7, dtype=F64) if per_class else 1.1
    got = pair.margin_loss(x, y, margin=0.2, beta=beta, generator=torch.Generator().manual_seed(3)).item()
    assert_rel(got, margin_loop(x, y, 0.2, beta, seed=3))


def test_margin_loss_deterministic_negatives():
    """Class 1 has a single sample: it is every other anchor's only negative, so the sampling is deterministic."""
    x, y = make_batch(n=6, d=5, c=1, seed=11)
    y = torch.tensor([0, 0, 0, 0, 0, 1])
    xs = [unit(v) for v in x]
    terms = []
    for a in range(5):
        for p in range(5):
            if p != a:
                terms.append(relu(0.2 + float((xs[a] - xs[p]).norm()) - 1.2))
                terms.append(relu(0.2 - float((xs[a] - xs[5]).norm()) + 1.2))
    for seed in range(3):
        got = pair.margin_loss(x, y, generator=torch.Generator().manual_seed(seed)).item()
        assert_rel(got, sum(terms) / len(terms))


def test_margin_loss_generator_reproducible():
    x, y = make_batch(seed=12)
    a = pair.margin_loss(x, y, generator=torch.Generator().manual_seed(5))
    b = pair.margin_loss(x, y, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    others = {pair.margin_loss(x, y, generator=torch.Generator().manual_seed(s)).item() for s in range(6, 12)}
    assert len(others) > 1


# ---------------------------------------------------------------- gradients
def _margin_fixed(x, y, beta=1.2):
    return pair.margin_loss(x, y, beta=beta, generator=torch.Generator().manual_seed(0))


GRAD_CASES = {
    "contrastive": lambda x, y: pair.contrastive_loss(x, y, 0.9, 0.1),
    "triplet-all-cos": lambda x, y: pair.triplet_margin_loss(x, y, margin=0.5),
    "triplet-semi-euc": lambda x, y: pair.triplet_margin_loss(x, y, 0.5, "euclidean", "semi-hard"),
    "triplet-hard-sq": lambda x, y: pair.triplet_margin_loss(x, y, 1.0, "squared_euclidean", "hard"),
    "lifted": pair.lifted_structure_loss,
    "npairs": pair.npairs_loss,
    "margin": _margin_fixed,
    "ms": lambda x, y: pair.multi_similarity_loss(x, y, beta=10.0, epsilon=0.5),
}


@pytest.mark.parametrize("name", list(GRAD_CASES))
def test_gradcheck(name):
    x, y = make_batch(n=11, d=5, c=3, seed=13)
    x.requires_grad_(True)
    fn = GRAD_CASES[name]
    assert fn(x, y).item() != 0
    assert torch.autograd.gradcheck(lambda e: fn(e, y), (x,))


def test_gradcheck_margin_per_class_beta():
    x, y = make_batch(n=11, d=5, c=3, seed=14)
    beta = torch.tensor([1.0, 1.1, 1.2, 1.3], dtype=F64, requires_grad=True)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda e, b: _margin_fixed(e, y, b), (x, beta))


# ---------------------------------------------------------------- invariances, edge cases, dtypes
NORMALISED = {
    "contrastive": pair.contrastive_loss,
    "triplet-all": pair.triplet_margin_loss,
    "triplet-semi-euc": lambda x, y: pair.triplet_margin_loss(x, y, 0.3, "euclidean", "semi-hard"),
    "triplet-hard-sq": lambda x, y: pair.triplet_margin_loss(x, y, 0.3, "squared_euclidean", "hard"),
    "lifted": pair.lifted_structure_loss,
    "margin": _margin_fixed,
    "ms": pair.multi_similarity_loss,
}


@pytest.mark.parametrize("name", list(NORMALISED))
def test_normalised_losses_are_scale_invariant(name):
    x, y = make_batch(seed=15)
    fn = NORMALISED[name]
    assert_rel(fn(x * 7.3, y).item(), fn(x, y).item(), rel=1e-10)


def test_npairs_is_not_scale_invariant():
    x, y = make_batch(seed=15)
    assert pair.npairs_loss(2 * x, y).item() != pytest.approx(pair.npairs_loss(x, y).item(), rel=1e-3)


def test_single_sample_classes_only():
    """All classes singletons: no positive pair anywhere."""
    x, _ = make_batch(n=8, d=5, seed=16)
    y = torch.arange(8)
    for fn in (pair.triplet_margin_loss, pair.lifted_structure_loss, _margin_fixed, pair.multi_similarity_loss):
        assert_zero_with_graph(fn, x, y)
    for mining in ("semi-hard", "hard"):
        assert_zero_with_graph(pair.triplet_margin_loss, x, y, mining=mining)
    assert_rel(pair.contrastive_loss(x, y).item(), contrastive_loop(x, y))  # negatives only
    assert_rel(pair.npairs_loss(x, y).item(), npairs_loop(x, y))  # regulariser only


def test_single_class_batch():
    x, _ = make_batch(n=8, d=5, seed=17)
    y = torch.zeros(8, dtype=torch.long)
    for fn in (pair.triplet_margin_loss, pair.lifted_structure_loss, pair.multi_similarity_loss):
        assert_zero_with_graph(fn, x, y)
    assert_rel(pair.contrastive_loss(x, y).item(), contrastive_loop(x, y))  # positives only
    assert_rel(pair.npairs_loss(x, y).item(), 0.02 * float((x * x).sum()) / 8)
    # Margin loss: positive pairs only (no negative to sample).
    xs = [unit(v) for v in x]
    pos = [relu(0.2 + float((xs[a] - xs[p]).norm()) - 1.2) for a in range(8) for p in range(8) if a != p]
    assert_rel(_margin_fixed(x, y).item(), sum(pos) / len(pos))


def test_single_sample_batch():
    x, _ = make_batch(n=1, d=5, seed=18)
    y = torch.zeros(1, dtype=torch.long)
    for fn in (pair.contrastive_loss, pair.triplet_margin_loss, pair.lifted_structure_loss, _margin_fixed,
               pair.multi_similarity_loss):
        assert_zero_with_graph(fn, x, y)


FP16 = {
    "contrastive": pair.contrastive_loss,
    "triplet": lambda x, y: pair.triplet_margin_loss(x, y, 0.2, "euclidean", "hard"),
    "lifted": pair.lifted_structure_loss,
    "npairs": pair.npairs_loss,
    "margin": _margin_fixed,
    "ms": pair.multi_similarity_loss,
}


@pytest.mark.parametrize("name", list(FP16))
def test_half_inputs_give_half_result(name):
    x, y = make_batch(seed=19, dtype=torch.float32)
    x = x * 0.2
    fn = FP16[name]
    xh = x.half().requires_grad_(True)
    out = fn(xh, y)
    assert out.dtype == torch.float16
    out.backward()
    assert xh.grad.dtype == torch.float16 and torch.isfinite(xh.grad).all()
    assert out.item() == pytest.approx(fn(xh.detach().float(), y).item(), rel=2e-3)


# ------------------------------------------------------------------------------ the normalisation's dead-row rule
NORMALISED_PAIR_LOSSES = {
    "contrastive": lambda x, y: functional.contrastive_loss(x, y),
    "triplet_margin": lambda x, y: functional.triplet_margin_loss(x, y),
    "lifted_structure": lambda x, y: functional.lifted_structure_loss(x, y),
    "margin": lambda x, y: functional.margin_loss(x, y, generator=torch.Generator().manual_seed(0)),
    "multi_similarity": lambda x, y: functional.multi_similarity_loss(x, y),
    "exponential_triplet": lambda x, y: functional.exponential_triplet_loss(x, y, 4),
}


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("name", sorted(NORMALISED_PAIR_LOSSES))
def test_dead_rows_get_zero_gradient_not_inf(name, dtype):
    """A zero or underflowing embedding row (norm <= 1e-12: no direction) gets a zero gradient in every loss that
    normalises; through the clamp of max(||x||, 1e-12) it was Inf in fp16 and ~1e12 in fp32."""
    x = torch.randn(12, 16, generator=torch.Generator().manual_seed(3), dtype=F64)
    x[2], x[5] = 0, 1e-14
    x = x.to(dtype).requires_grad_()
    y = torch.tensor([0, 1, 2, 3] * 3)
    loss = NORMALISED_PAIR_LOSSES[name](x, y)
    (grad,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert (grad[[2, 5]] == 0).all() and grad.abs().sum() > 0


# ------------------------------------------------------------------ with a reference (ref_emb, ref_labels, ref_self)
def _with_generator(fn, seed=3):
    return lambda *args, **kwargs: fn(*args, **kwargs, generator=torch.Generator().manual_seed(seed))


# name -> (the public function with its hyper-parameters, the loop with the same ones, scale of the inputs)
REFERENCED = {
    "contrastive": (lambda x, y, **r: functional.contrastive_loss(x, y, 0.8, 0.1, **r),
                    lambda x, y, ref: contrastive_loop(x, y, 0.8, 0.1, ref=ref), 1.0),
    "triplet_all_cosine": (lambda x, y, **r: functional.triplet_margin_loss(x, y, 0.1, "cosine", "all", **r),
                           lambda x, y, ref: triplet_loop(x, y, 0.1, "cosine", "all", ref=ref), 1.0),
    "triplet_semi-hard_euclidean": (
        lambda x, y, **r: functional.triplet_margin_loss(x, y, 0.3, "euclidean", "semi-hard", **r),
        lambda x, y, ref: triplet_loop(x, y, 0.3, "euclidean", "semi-hard", ref=ref), 1.0),
    "triplet_hard_squared": (
        lambda x, y, **r: functional.triplet_margin_loss(x, y, 0.3, "squared_euclidean", "hard", **r),
        lambda x, y, ref: triplet_loop(x, y, 0.3, "squared_euclidean", "hard", ref=ref), 1.0),
    "lifted": (lambda x, y, **r: functional.lifted_structure_loss(x, y, 1.5, **r),
               lambda x, y, ref: lifted_loop(x, y, 1.5, ref=ref), 1.0),
    "npairs": (lambda x, y, **r: functional.npairs_loss(x, y, 0.5, **r),
               lambda x, y, ref: npairs_loop(x, y, 0.5, ref=ref), 0.3),
    "multi_similarity": (lambda x, y, **r: functional.multi_similarity_loss(x, y, 1.0, 10.0, 0.3, 0.3, **r),
                         lambda x, y, ref: ms_loop(x, y, 1.0, 10.0, 0.3, 0.3, ref=ref), 1.0),
    "margin": (_with_generator(lambda x, y, **r: functional.margin_loss(x, y, 0.2, 0.9, **r)),
               lambda x, y, ref: margin_loop(x, y, 0.2, 0.9, seed=3, ref=ref), 1.0),
}
STREAMED = ("contrastive", "lifted", "npairs", "multi_similarity", "triplet_all_cosine", "triplet_semi-hard_euclidean",
            "triplet_hard_squared", "margin")


def referenced_batch(n=23, m=29, d=6, c=5, seed=20):
    """A clustered batch and reference of the same classes, and ref_self: some anchors' own rows (-1: none)."""
    x, y = clustered_batch(n + m, d, c, seed=seed)
    own = torch.randint(-1, m, (n,), generator=torch.Generator().manual_seed(seed))
    return x[:n], y[:n], x[n:], y[n:], own


@pytest.mark.parametrize("own", [False, True], ids=["every_pair", "ref_self"])
@pytest.mark.parametrize("name", sorted(REFERENCED))
def test_with_reference_matches_loop(name, own, monkeypatch):
    """Anchors against a reference: every (i, j) pair counts, or each anchor's ref_self row is left out of its
    positives; the streamed losses also in small blocks (of 7 candidates, or of 5 anchors, 1 for all triplets)."""
    fn, loop, scale = REFERENCED[name]
    x, y, r, ry, ref_self = referenced_batch()
    x, r = x * scale, r * scale
    ref = (r, ry, ref_self) if own else (r, ry)
    expected = loop(x, y, ref)
    assert expected > 0
    kwargs = dict(ref_emb=r, ref_labels=ry, ref_self=ref_self if own else None)
    assert_rel(fn(x, y, **kwargs).item(), expected)
    if name in STREAMED:
        monkeypatch.setattr(streamed_pairs, "BLOCK_ELEMS", 23 * 7)
        assert_rel(fn(x, y, **kwargs, backend="chunked").item(), expected)


@pytest.mark.parametrize("name", sorted(REFERENCED))
def test_batch_as_its_own_reference_with_ref_self_is_no_reference(name):
    """ref_emb = the batch and ref_self = arange(N) leave out the same pairs as no reference."""
    fn, _, scale = REFERENCED[name]
    x, y = make_batch(n=17, d=6, c=4, seed=21)
    x = x * scale
    assert_rel(fn(x, y, ref_emb=x, ref_labels=y, ref_self=torch.arange(17)).item(), fn(x, y).item(), rel=1e-12)


@pytest.mark.parametrize("name", sorted(REFERENCED))
def test_with_reference_gradcheck(name):
    """Gradients of both the embeddings and the reference (float64 finite differences)."""
    fn, _, scale = REFERENCED[name]
    x, y, r, ry, ref_self = referenced_batch(n=7, m=9, d=5, c=3, seed=22)
    x, r = (x * scale).requires_grad_(), (r * scale).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: fn(a, y, ref_emb=b, ref_labels=ry, ref_self=ref_self), (x, r))


@pytest.mark.parametrize("name", sorted(REFERENCED))
def test_nan_in_the_reference_gives_nan_loss_and_gradients(name):
    """The NaN rule covers the reference: one NaN entry makes the loss NaN and every gradient through it (entries
    the loss does not use keep a 0), on every backend."""
    fn, _, scale = REFERENCED[name]
    x, y, r, ry, _ = referenced_batch()
    r[4, 1] = math.nan
    for backend in ("reference", "chunked") if name in STREAMED else ("reference",):
        x_, r_ = (x * scale).requires_grad_(), (r * scale).requires_grad_()
        loss = fn(x_, y, ref_emb=r_, ref_labels=ry, backend=backend)
        assert torch.isnan(loss), backend
        for grad in torch.autograd.grad(loss, (x_, r_)):
            assert torch.isnan(grad).any() and not (torch.isfinite(grad) & (grad != 0)).any(), backend


def test_reference_arguments_are_checked():
    x, y = make_batch(n=8, d=5, c=2)
    r, ry = make_batch(n=6, d=5, c=2, seed=1)
    bad = [
        (dict(ref_emb=r), ValueError, "ref_labels is None"),
        (dict(ref_labels=ry), ValueError, "ref_emb is None"),
        (dict(ref_self=torch.arange(8)), ValueError, "ref_self"),
        (dict(ref_emb=r[:, :4], ref_labels=ry), ValueError, "ref_emb must have the embeddings' width 5"),
        (dict(ref_emb=r.long(), ref_labels=ry), TypeError, "ref_emb must be a floating-point"),
        (dict(ref_emb=r, ref_labels=ry[:5]), ValueError, r"ref_labels must have shape \[6\]"),
        (dict(ref_emb=r, ref_labels=ry, ref_self=torch.zeros(7, dtype=torch.long)), ValueError, r"shape \[8\]"),
        (dict(ref_emb=r, ref_labels=ry, ref_self=torch.zeros(8)), TypeError, "ref_self must be an integer"),
        (dict(ref_emb=r, ref_labels=ry, ref_self=torch.full((8,), 6)), ValueError, "ref_self must index rows"),
    ]
    for kwargs, error, match in bad:
        for fn in (functional.contrastive_loss, functional.npairs_loss):
            with pytest.raises(error, match=match):
                fn(x, y, **kwargs)
    with pytest.raises(ValueError, match=r"ref_labels must be in \[0, num_classes = 3\)"):
        functional.exponential_triplet_loss(x, y, 3, ref_emb=r, ref_labels=ry + 1)


# ------------------------------------------------------------------ streamed over blocks of the reference
def _value_and_grads(fn, x, y, r, ry, **kwargs):
    x, r = x.clone().requires_grad_(), r.clone().requires_grad_()
    loss = fn(x, y, ref_emb=r, ref_labels=ry, **kwargs)
    return (loss, *torch.autograd.grad(loss, (x, r)))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("own", [False, True], ids=["every_pair", "ref_self"])
@pytest.mark.parametrize("name", STREAMED)
def test_streamed_matches_reference(name, own, dtype, monkeypatch):
    """backend="chunked" (blocks of 11 candidates) gives the reference's value and gradients, at N=37, M=53,
    D=40, and without a reference (the batch against itself)."""
    _check_streamed(REFERENCED[name][0], name, own, dtype, 23, monkeypatch)


def _check_streamed(fn, name, own, dtype, seed, monkeypatch):
    """fn with backend="chunked" (BLOCK_ELEMS of 11 candidates a block for the 37 anchors) against the reference:
    value and gradients of both sides at N=37, M=53, D=40 (with or without ref_self), and the batch alone."""
    x, y = clustered_batch(37 + 53, 40, 6, noise=2.0, seed=seed)
    x = x.to(dtype)
    ref_self = torch.randint(-1, 53, (37,), generator=torch.Generator().manual_seed(seed)) if own else None
    args = (x[:37], y[:37], x[37:], y[37:])
    expected = _value_and_grads(fn, *args, ref_self=ref_self, backend="reference")
    monkeypatch.setattr(streamed_pairs, "BLOCK_ELEMS", 37 * 11)
    actual = _value_and_grads(fn, *args, ref_self=ref_self, backend="chunked")
    for what, a, e in zip(("loss", "grad embeddings", "grad ref_emb"), actual, expected):
        assert e.abs().max() > 0
        assert_close(a, e, TOL[dtype], f"{name} {what}")
    batch = x[:37].clone().requires_grad_()
    monkeypatch.setattr(streamed_pairs, "BLOCK_ELEMS", 37 * 10)
    assert_close(fn(batch, y[:37], backend="chunked"), fn(batch, y[:37], backend="reference"), TOL[dtype])


# every mining and distance of the triplet loss, and the exponential triplet loss (its loops: test_exponential.py)
STREAMED_VARIANTS = {
    **{f"triplet_{mining}_{distance}": functools.partial(functional.triplet_margin_loss, margin=0.3,
                                                         distance=distance, mining=mining)
       for mining in ("all", "semi-hard", "hard") for distance in ("cosine", "euclidean", "squared_euclidean")},
    **{f"exponential_{distance}": functools.partial(functional.exponential_triplet_loss, num_classes=100,
                                                    distance=distance, embedding_scale=20.0)
       for distance in ("cosine", "euclidean", "squared_euclidean")},
}


@pytest.mark.parametrize("own", [False, True], ids=["every_pair", "ref_self"])
@pytest.mark.parametrize("name", sorted(STREAMED_VARIANTS))
def test_streamed_variants_match_reference(name, own, monkeypatch):
    """Every mining x distance of the triplet loss and every distance of the exponential triplet loss: the
    reference's value and gradients, in blocks of 11 candidates (batch-hard, exponential), of 7 anchors
    (semi-hard) or of 1 anchor (all triplets), at N=37, M=53, D=40, and without a reference."""
    _check_streamed(STREAMED_VARIANTS[name], name, own, F64, 25, monkeypatch)


def test_streamed_hard_mining_breaks_ties_as_argmin(monkeypatch):
    """A reference whose rows come twice (the copies 29 rows apart, in other blocks of 11): batch-hard triplets
    choose the first of equal candidates, as the reference's argmin / argmax: the same gradients, none to the
    copies. The exponential triplet loss: the reference's value and, summed over each row and its copy, its
    gradient (the reference's amax shares it between equal distances, the streamed loss gives it to the first)."""
    x, y, r, ry, ref_self = referenced_batch(n=23, m=29, d=6, c=5, seed=26)
    r, ry = torch.cat([r, r]), torch.cat([ry, ry])
    fns = {"hard": STREAMED_VARIANTS["triplet_hard_euclidean"], "exponential": STREAMED_VARIANTS["exponential_cosine"]}
    for name, fn in fns.items():
        expected = _value_and_grads(fn, x, y, r, ry, ref_self=ref_self, backend="reference")
        monkeypatch.setattr(streamed_pairs, "BLOCK_ELEMS", 23 * 11)
        actual = _value_and_grads(fn, x, y, r, ry, ref_self=ref_self, backend="chunked")
        assert (actual[2][29:] == 0).all() and actual[2][:29].abs().max() > 0, name
        if name == "exponential":
            assert expected[2][29:].abs().max() > 0  # the reference shares it
            expected = (*expected[:2], expected[2][:29] + expected[2][29:])
            actual = (*actual[:2], actual[2][:29])
        for what, a, e in zip(("loss", "grad embeddings", "grad ref_emb"), actual, expected):
            assert_close(a, e, TOL[F64], f"{name} {what}")


@pytest.mark.parametrize("beta", ["per_class", "global", "float"])
def test_streamed_margin_draws_the_reference_numbers(beta, monkeypatch):
    """Margin loss in blocks of 5 anchors: u is drawn block by block of rows, on CPU the numbers of the
    reference's one [N, M] draw: the same value and gradients (a learnable beta's too), and the generator, or the
    global one (generator=None), is left in the reference's state; also for one call's anchors [7, 19), for which
    every call draws the whole batch's rows."""
    x, y, r, ry, ref_self = referenced_batch(n=23, m=29, d=6, c=5, seed=27)
    beta = {"per_class": torch.linspace(0.8, 1.1, 5, dtype=F64), "global": torch.tensor(0.9, dtype=F64),
            "float": 0.9}[beta]
    monkeypatch.setattr(streamed_pairs, "BLOCK_ELEMS", 5 * 29)

    def run(loss, seeded, anchors):
        torch.manual_seed(4)
        generator = torch.Generator().manual_seed(3) if seeded else None
        leaves = [x.clone().requires_grad_(), r.clone().requires_grad_()]
        b = beta.clone().requires_grad_() if torch.is_tensor(beta) else beta
        value = loss(leaves[0], y, 0.2, b, generator, ref_emb=leaves[1], ref_labels=ry, ref_self=ref_self,
                     anchors=anchors)
        grads = torch.autograd.grad(value, leaves + ([b] if torch.is_tensor(b) else []))
        return (value, *grads), (generator or torch.default_generator).get_state()

    for seeded, anchors in itertools.product((True, False), (None, pair.Anchors(7, 19, lambda t: t, lambda t: t))):
        what = f"generator {'seeded' if seeded else 'global'}, anchors {anchors and anchors[:2]}"
        expected, state = run(pair.margin_loss, seeded, anchors)
        actual, actual_state = run(streamed_pairs.margin_loss, seeded, anchors)
        for name, a, e in zip(("loss", "grad embeddings", "grad ref_emb", "grad beta"), actual, expected):
            assert e.abs().max() > 0
            assert_close(a, e, TOL[F64], f"{what}: {name}")
        assert torch.equal(actual_state, state), what


@pytest.mark.parametrize("name", [name for name in STREAMED if name != "margin"])
def test_streamed_compiles_into_one_graph(name, monkeypatch):
    """torch.compile(fullgraph=True) traces the blocks (3 here) and the recomputing backward: eager's value and
    gradients. (Not margin: its draws go through a generator's state, a graph break.)"""
    fn = REFERENCED[name][0]
    monkeypatch.setattr(streamed_pairs, "BLOCK_ELEMS", 23 * 12)
    x, y, r, ry, ref_self = referenced_batch()
    eager = _value_and_grads(fn, x, y, r, ry, ref_self=ref_self, backend="chunked")
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for what, a, e in zip(("loss", "grad embeddings", "grad ref_emb"),
                          _value_and_grads(compiled, x, y, r, ry, ref_self=ref_self, backend="chunked"), eager):
        assert_close(a, e, TOL[torch.float64], f"{name} {what}")


def _large_reference(n, m, d):
    g = torch.Generator().manual_seed(24)
    x, r = torch.randn(n, d, generator=g), torch.randn(m, d, generator=g)
    y, ry = torch.randint(0, 100, (n,), generator=g), torch.randint(0, 100, (m,), generator=g)
    return x, y, r, ry


def _training_step(fn, x, y, r, ry, backend):
    def step():
        xx, rr = x.clone().requires_grad_(), r.clone().requires_grad_()
        fn(xx, y, ref_emb=rr, ref_labels=ry, backend=backend).backward()
    return step


STREAMED_FNS = {**{name: REFERENCED[name][0] for name in STREAMED}, **STREAMED_VARIANTS}
OVER_CANDIDATES = ("contrastive", "lifted", "npairs", "multi_similarity", "triplet_hard_squared",
                   "exponential_cosine")  # streamed over blocks of candidates
LARGE = ("contrastive", "multi_similarity", "triplet_hard_squared", "exponential_cosine")


@pytest.mark.parametrize("name,n,m,backend", [(name, 512, 20_000, "chunked") for name in OVER_CANDIDATES]
                         + [(name, 256, 100_000, "auto") for name in LARGE])
def test_streamed_holds_no_n_by_m_tensor(name, n, m, backend):
    """Forward and backward against a reference of M rows allocate nothing larger than the [M, D] inputs: no
    [N, M] similarity (at N=256, M=1e5, D=64 backend "auto" streams); at N=512, M=2e4 a [N, M] bool mask would
    exceed that bound too."""
    d = 64
    largest = largest_allocation(_training_step(STREAMED_FNS[name], *_large_reference(n, m, d), backend))
    assert largest <= m * d * 4, largest


@pytest.mark.parametrize("name,n,m,d,block", [("triplet_semi-hard_euclidean", 512, 2048, 16, 1 << 14),
                                              ("margin", 512, 2048, 16, 1 << 14),
                                              ("triplet_all_cosine", 512, 64, 4, 64 * 64)])
def test_streamed_anchor_blocks_hold_less_than_n_by_m(name, n, m, d, block, monkeypatch):
    """Semi-hard and all triplets, margin: over blocks of anchors ([8, M] here; all triplets: one anchor's
    [M, M]), recomputed in the backward. Forward and backward hold less memory at once than one [N, M] fp32 matrix
    (measured: 0.4x, 0.4x, 0.7x; the reference 18x, 14x, 210x): no block's intermediates outlive it, and per block
    nothing is kept but its inputs (no RNG state: 5 KB per block)."""
    monkeypatch.setattr(streamed_pairs, "BLOCK_ELEMS", block)
    peak = peak_allocation(_training_step(STREAMED_FNS[name], *_large_reference(n, m, d), "chunked"))
    assert peak < n * m * 4, peak
