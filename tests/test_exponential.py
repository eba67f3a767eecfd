"""Exponential-triplet family references (metricloss_kernels/reference/exponential.py) against explicit loops."""
import math

import pytest
import torch

from metricloss_kernels import functional as F
from metricloss_kernels.normalize import unit_bounce, unit_range
from metricloss_kernels.reference import exponential as ex
from utils import make_batch  # noqa: E402  (tests/ is on sys.path)

F64 = torch.float64
REL = 1e-6


def dist_loop(u, v, distance):
    if distance == "cosine":
        return 1.0 - float(u @ v) / (float(u.norm()) * float(v.norm()))
    d = float((u - v).norm())
    return d * d if distance == "squared_euclidean" else d


def exp_loop(x, y, num_classes, overlap=1.2, distance="cosine", cs=1.0, cp=1.0, cn=1.0, ref=None):
    """ref: None (the batch against itself, pairs (a, a) left out) or (r, ry, own): candidates r with labels ry, and
    own[a] the row of r left out of a's positives (< 0: none)."""
    d_max = {"cosine": 2.0, "euclidean": 2.0 * cs, "squared_euclidean": (2.0 * cs) ** 2}[distance]
    c_pos = overlap / num_classes
    r, ry, own = (x, y, torch.arange(len(y))) if ref is None else ref
    y, ry, own = y.tolist(), ry.tolist(), own.tolist()
    hp, hn = [], []
    for a in range(len(y)):
        dp = [dist_loop(x[a], r[j], distance) for j in range(len(ry)) if j != own[a] and ry[j] == y[a]]
        dn = [dist_loop(x[a], r[k], distance) for k in range(len(ry)) if ry[k] != y[a]]
        if dp:
            hp.append(max(max(dp) / d_max - c_pos, 0.0))
        if dn:
            hn.append(max(0.5 - min(dn) / d_max, 0.0))
    loss = 0.0
    if hp:
        loss -= cp * math.log(1 - (sum(hp) / len(hp)) / (1 - c_pos) + 1e-20)
    if hn:
        loss -= cn * math.log(1 - (sum(hn) / len(hn)) / 0.5 + 1e-20)
    return loss


def assert_rel(actual, expected, rel=REL):
    assert actual == pytest.approx(expected, rel=rel, abs=1e-12), (actual, expected)


# ---------------------------------------------------------------- exponential triplet loss
@pytest.mark.parametrize("distance", ["cosine", "euclidean", "squared_euclidean"])
@pytest.mark.parametrize("seed", [0, 1])
def test_exponential_matches_loop(distance, seed):
    x, y = make_batch(seed=seed)
    cs = 1.0 if distance == "cosine" else 2.5
    if distance != "cosine":
        x = unit_range(x * 0.4, cs)  # the Euclidean variants expect bounded embeddings
    # num_classes = 12 makes c_pos = 0.1, small enough for the positive term to be active.
    got = ex.exponential_triplet_loss(x, y, 12, distance=distance, embedding_scale=cs, pos_coef=0.7, neg_coef=1.3)
    assert got.item() > 0
    assert_rel(got.item(), exp_loop(x, y, 12, 1.2, distance, cs, 0.7, 1.3))


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
@pytest.mark.parametrize("own", [False, True])
def test_exponential_with_reference_matches_loop(distance, own):
    """Anchors against a reference (every pair counts, or each anchor's own row left out), value and gradients
    (both tensors) through the public function."""
    x, y = make_batch(n=23, d=12, c=5, seed=8)
    r, ry = make_batch(n=31, d=12, c=5, seed=9)
    cs = 1.0 if distance == "cosine" else 2.5
    if distance != "cosine":
        x, r = unit_range(x * 0.4, cs), unit_range(r * 0.4, cs)
    ref_self = torch.randint(-1, 31, (23,), generator=torch.Generator().manual_seed(0)) if own else None
    x, r = x.requires_grad_(), r.requires_grad_()
    got = F.exponential_triplet_loss(x, y, 12, distance=distance, embedding_scale=cs, ref_emb=r, ref_labels=ry,
                                     ref_self=ref_self)
    loop_own = ref_self if own else torch.full((23,), -1)
    assert got.item() > 0
    assert_rel(got.item(), exp_loop(x.detach(), y, 12, 1.2, distance, cs, ref=(r.detach(), ry, loop_own)))
    assert torch.autograd.gradcheck(
        lambda a, b: ex.exponential_triplet_loss(a, y, 12, distance=distance, embedding_scale=cs, ref_emb=b,
                                                 ref_labels=ry, ref_self=ref_self), (x, r))


def test_exponential_both_terms_active():
    """Low D, few classes: both hinge means are non-zero, so both logs are exercised."""
    x, y = make_batch(n=30, d=3, c=4, seed=2)
    pos_only = exp_loop(x, y, 30, cn=0.0)
    neg_only = exp_loop(x, y, 30, cp=0.0)
    assert pos_only > 0 and neg_only > 0
    assert_rel(ex.exponential_triplet_loss(x, y, 30, neg_coef=0.0).item(), pos_only)
    assert_rel(ex.exponential_triplet_loss(x, y, 30, pos_coef=0.0).item(), neg_only)
    assert_rel(ex.exponential_triplet_loss(x, y, 30, overlap=2.0).item(), exp_loop(x, y, 30, overlap=2.0))


def test_exponential_batch_mean_inside_log():
    """Two anchors' hinges averaged inside the log differ from the mean of the per-anchor logs."""
    x = torch.tensor([[1.0, 0.0], [-0.6, 0.8], [0.0, 1.0], [0.0, 1.0]], dtype=F64)
    y = torch.tensor([0, 0, 1, 1])
    got = ex.exponential_triplet_loss(x, y, 10, neg_coef=0.0).item()
    # anchors 0 and 1: d_ap = 1.6, p = 0.8, hinge = 0.68; anchors 2, 3 (duplicates): d_ap = 0, hinge = 0.
    assert_rel(got, -math.log(1 - (0.68 * 2 / 4) / 0.88 + 1e-20), rel=1e-12)


@pytest.mark.parametrize("distance", ["cosine", "euclidean", "squared_euclidean"])
def test_exponential_gradcheck(distance):
    x, y = make_batch(n=10, d=3, c=3, seed=3)
    x = (x * 0.5).requires_grad_(True)
    fn = lambda e: ex.exponential_triplet_loss(e, y, 8, distance=distance, embedding_scale=2.0)  # noqa: E731
    assert fn(x).item() > 0
    assert torch.autograd.gradcheck(fn, (x,))


def test_exponential_guard():
    x, y = make_batch(n=6, d=3, c=2)
    with pytest.raises(ValueError, match="overlap") as err:
        ex.exponential_triplet_loss(x, y, 1)
    assert "num_classes" in str(err.value)
    with pytest.raises(ValueError, match="num_classes"):
        ex.exponential_triplet_loss(x, y, 4, overlap=4.0)
    with pytest.raises(ValueError, match="distance"):
        ex.exponential_triplet_loss(x, y, 4, distance="dot")


def test_exponential_cosine_scale_invariant():
    x, y = make_batch(seed=4)
    assert_rel(ex.exponential_triplet_loss(x * 5.0, y, 12).item(), ex.exponential_triplet_loss(x, y, 12).item(),
               rel=1e-10)


def test_exponential_single_class_and_singletons():
    x, _ = make_batch(n=7, d=3, seed=5)
    one = torch.zeros(7, dtype=torch.long)  # no negatives: only the positive term
    assert_rel(ex.exponential_triplet_loss(x, one, 20).item(), exp_loop(x, one, 20))
    singles = torch.arange(7)  # no positives: only the negative term
    assert_rel(ex.exponential_triplet_loss(x, singles, 20).item(), exp_loop(x, singles, 20))
    xs = x[:1].clone().requires_grad_(True)  # neither: a 0 that carries a graph
    out = ex.exponential_triplet_loss(xs, one[:1], 20)
    assert out.item() == 0.0 and out.requires_grad
    out.backward()
    assert torch.equal(xs.grad, torch.zeros_like(xs))


def test_exponential_with_unit_bounce_embeddings():
    x, y = make_batch(n=20, d=4, c=4, seed=6)
    e = unit_bounce(x, 1.5)
    assert_rel(ex.exponential_triplet_loss(e, y, 10, distance="euclidean", embedding_scale=1.5).item(),
               exp_loop(e, y, 10, distance="euclidean", cs=1.5))


def test_exponential_half():
    x, y = make_batch(seed=7, dtype=torch.float32)
    xh = x.half().requires_grad_(True)
    out = ex.exponential_triplet_loss(xh, y, 12)
    assert out.dtype == torch.float16
    out.backward()
    assert xh.grad.dtype == torch.float16 and torch.isfinite(xh.grad).all()
    assert out.item() == pytest.approx(ex.exponential_triplet_loss(xh.detach().float(), y, 12).item(), rel=2e-3)


# ---------------------------------------------------------------- center loss and centre update
def center_loop(x, y, c, margin):
    return sum(max(float(((x[i] - c[y[i]]) ** 2).sum()) - margin, 0.0) for i in range(len(y))) / len(y)


@pytest.mark.parametrize("margin", [0.0, 80.0])
def test_center_loss_matches_loop(margin):
    x, y = make_batch(c=53, seed=8)
    c = torch.randn(54, 40, generator=torch.Generator().manual_seed(9), dtype=F64)
    got = ex.center_loss(x, y, c, margin=margin).item()
    expected = center_loop(x, y, c, margin)
    assert_rel(got, expected)
    if margin:  # the margin must actually clip some samples
        assert any(float(((x[i] - c[y[i]]) ** 2).sum()) < margin for i in range(len(y)))


def test_center_loss_gradients_only_to_embeddings():
    x, y = make_batch(n=9, d=4, c=3, seed=10)
    c = torch.randn(4, 4, generator=torch.Generator().manual_seed(11), dtype=F64, requires_grad=True)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda e: ex.center_loss(e, y, c, margin=2.0), (x,))
    ex.center_loss(x, y, c).backward()
    assert c.grad is None


def test_center_loss_half():
    x, y = make_batch(seed=12, dtype=torch.float32)
    c = torch.randn(10, 40, generator=torch.Generator().manual_seed(13))
    out = ex.center_loss(x.half(), y, c.half())
    assert out.dtype == torch.float16
    assert out.item() == pytest.approx(ex.center_loss(x.half().float(), y, c.half().float()).item(), rel=2e-3)


@pytest.mark.parametrize("alpha", [0.5, 0.2])
def test_updated_centers(alpha):
    x, y = make_batch(n=37, d=40, c=53, seed=14)  # C = 54 > N: several classes absent from the batch
    c = torch.randn(60, 40, generator=torch.Generator().manual_seed(15), dtype=F64)
    expected = c.clone()
    for k in range(60):
        members = [i for i in range(len(y)) if y[i] == k]
        if members:
            mean = sum(x[i] for i in members) / len(members)
            expected[k] = c[k] - alpha * (c[k] - mean)
    out = ex.updated_centers(c, x, y, alpha=alpha)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    absent = [k for k in range(60) if k not in set(y.tolist())]
    assert absent and torch.equal(out[absent], expected[absent])


def test_updated_centers_no_grad_and_half():
    x, y = make_batch(n=12, d=6, c=4, seed=16, dtype=torch.float32)
    x.requires_grad_(True)
    c = torch.zeros(5, 6, dtype=torch.float16)
    c = ex.updated_centers(c, x, y)
    assert c.dtype == torch.float16 and not c.requires_grad
    mean0 = x.detach()[y == 0].mean(dim=0)
    torch.testing.assert_close(c[0], (0.5 * mean0).half())


# ---- regressions: duplicated embeddings, dtype agreement, label range ----------------------------------------------
@pytest.mark.parametrize("distance", ["cosine", "euclidean", "squared_euclidean"])
def test_duplicated_embeddings_give_the_same_finite_loss_in_fp32_and_fp64(distance):
    """Duplicated rows of different classes (the closest negative at distance 0): 1 - x̂·x̂ rounded slightly below
    0 made log(1 - h + 1e-20) NaN, and |a|² + |b|² - 2a·b left a rounding error that the log turned into fp32 and
    fp64 values 2x apart on 1e3-scaled inputs. Distances now come from the differences: exactly 0."""
    y = torch.cat([torch.arange(8), (torch.arange(8) + 1) % 8])  # each duplicate in another class
    scale = 2e3
    for seed in range(8):  # (seeds 1, 2, 3, 5, 6 hit the bug in at least one distance)
        x = torch.randn(8, 16, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        x = torch.cat([x, x]) * 1e3
        if distance != "cosine":
            x = unit_range(x, scale)
        results = []
        for dtype in (torch.float64, torch.float32):
            xi = x.to(dtype).requires_grad_()
            loss = F.exponential_triplet_loss(xi, y, 10, distance=distance, embedding_scale=scale)
            (grad,) = torch.autograd.grad(loss, xi)
            assert torch.isfinite(loss) and torch.isfinite(grad).all()
            results.append(loss.double())
        torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=0)


def test_exponential_triplet_rejects_labels_at_or_above_num_classes():
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 5])
    with pytest.raises(ValueError, match="labels"):
        F.exponential_triplet_loss(x, y, 5)
    F.exponential_triplet_loss(x, y, 6)
