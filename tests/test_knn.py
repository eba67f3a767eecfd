"""Exact k-nearest neighbours: the C++ op and the chunked torch path against a brute-force oracle."""
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch

from metricloss_kernels import _knn, metrics, retrieval
from metricloss_kernels.retrieval import knn
from utils import brute_force_scores

METRICS = ("cosine", "dot", "euclidean")
needs_extension = pytest.mark.skipif(not retrieval.has_extension(), reason="metricloss_kernels._C is not built")
needs_cuda = pytest.mark.cuda


def _torch_path(queries, reference=None, k=10, metric="cosine"):
    """The fallback path with a small block, so that several query blocks are exercised."""
    exclude = reference is None
    return retrieval.knn_torch(queries, queries if exclude else reference, k, metric, exclude, block_elements=4096)


PATHS = [pytest.param(knn, id="knn", marks=needs_extension), pytest.param(_torch_path, id="torch")]


def _oracle(queries, reference, k, metric, exclude_self):
    """Full score matrix in float64 by the textbook formulas, ranked by a stable sort (ties: lower index)."""
    scores = brute_force_scores(queries, reference, metric, exclude_self)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    values = scores.gather(1, order)
    return (-values if metric == "euclidean" else values), order, scores


def _inputs(q, r, d, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(q, d, generator=g, dtype=torch.float64).to(dtype),
            torch.randn(r, d, generator=g, dtype=torch.float64).to(dtype))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("shape,k", [((37, 53, 40), 1), ((37, 53, 40), 7), ((37, 53, 40), 53),
                                     ((1, 1, 3), 1), ((300, 2500, 16), 16), ((300, 2500, 16), 100),
                                     ((260, 1100, 5), 70)])
def test_matches_brute_force(path, metric, shape, k):
    queries, reference = _inputs(*shape)
    values, indices = path(queries, reference, k=k, metric=metric)
    expected_values, expected_indices, _ = _oracle(queries, reference, k, metric, False)
    assert indices.dtype == torch.int64 and values.dtype == torch.float64
    assert values.shape == indices.shape == (shape[0], k)
    torch.testing.assert_close(indices, expected_indices, rtol=0, atol=0)
    torch.testing.assert_close(values, expected_values, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("k", [1, 9, 36, 90])
def test_self_excluded_when_reference_is_none(path, metric, k):
    queries, _ = _inputs(91, 1, 12, seed=1)
    queries[5] = queries[6]                          # a duplicate stays a neighbour: only the row itself goes
    values, indices = path(queries, k=k, metric=metric)
    expected_values, expected_indices, _ = _oracle(queries, queries, k, metric, True)
    assert not (indices == torch.arange(91)[:, None]).any()
    torch.testing.assert_close(indices, expected_indices, rtol=0, atol=0)
    torch.testing.assert_close(values, expected_values, rtol=1e-10, atol=1e-10)
    if k >= 2:
        assert indices[5, 0] == 6 and indices[6, 0] == 5


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("metric", ["dot", "euclidean"])
@pytest.mark.parametrize("k", [3, 20, 100])
@pytest.mark.parametrize("exclude_self", [False, True])
def test_ties_go_to_the_lower_index(path, metric, k, exclude_self):
    # small integer coordinates: scores and distances are exact, with many ties
    g = torch.Generator().manual_seed(2)
    queries = torch.randint(-1, 2, (130 if exclude_self else 45, 3), generator=g).double()
    reference = queries if exclude_self else torch.randint(-1, 2, (130, 3), generator=g).double()
    values, indices = path(queries, None if exclude_self else reference, k=k, metric=metric)
    expected_values, expected_indices, _ = _oracle(queries, reference, k, metric, exclude_self)
    torch.testing.assert_close(indices, expected_indices, rtol=0, atol=0)
    torch.testing.assert_close(values, expected_values, rtol=0, atol=1e-12)


@pytest.mark.parametrize("path", PATHS)
def test_cosine_ties_between_duplicates(path):
    base, _ = _inputs(4, 1, 6, seed=3)
    reference = base[torch.tensor([0, 1, 2, 1, 3, 1, 0])]   # rows 1, 3, 5 identical; rows 0, 6 identical
    values, indices = path(base, reference, k=7, metric="cosine")
    assert indices[1, :3].tolist() == [1, 3, 5]
    assert indices[0, :2].tolist() == [0, 6]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("metric", METRICS)
def test_non_contiguous_inputs(path, metric):
    queries, reference = _inputs(40, 60, 30, seed=4)
    q_view, r_view = queries.T.contiguous().T, torch.stack([reference, -reference], dim=2)[:, :, 0]
    assert not q_view.is_contiguous() and not r_view.is_contiguous()
    got = path(q_view, r_view, k=9, metric=metric)
    expected = path(queries, reference, k=9, metric=metric)
    torch.testing.assert_close(got[1], expected[1], rtol=0, atol=0)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-12, atol=1e-12)  # the GEMM may block differently


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_reduced_precision_inputs(path, metric, dtype):
    queries, reference = _inputs(37, 200, 24, dtype=dtype, seed=5)
    k = 8
    values, indices = path(queries, reference, k=k, metric=metric)
    assert values.dtype == dtype and indices.dtype == torch.int64
    # computed in fp32: compare with the float64 oracle on the same (rounded) inputs, up to fp32 near-ties
    expected_values, _, scores = _oracle(queries, reference, k, metric, False)
    tol = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-5}[dtype] * expected_values.abs().max()
    torch.testing.assert_close(values.double(), expected_values, rtol=0, atol=float(tol))
    picked = scores.gather(1, indices)
    torch.testing.assert_close(-picked if metric == "euclidean" else picked, expected_values, rtol=0, atol=1e-4)
    assert all(len(set(row)) == k for row in indices.tolist())


@pytest.mark.parametrize("path", PATHS)
def test_empty_queries(path):
    _, reference = _inputs(1, 10, 4)
    values, indices = path(reference[:0], reference, k=3, metric="dot")
    assert values.shape == indices.shape == (0, 3)


def test_validation():
    q, r = _inputs(10, 12, 4)
    with pytest.raises(ValueError, match="k"):
        knn(q, r, k=13)
    with pytest.raises(ValueError, match="k"):
        knn(q, k=10)                                 # self excluded: at most 9
    with pytest.raises(ValueError, match="k"):
        knn(q, r, k=0)
    with pytest.raises(ValueError, match="k"):
        knn(q, r, k=True)
    with pytest.raises(ValueError, match="metric"):
        knn(q, r, k=1, metric="l1")
    with pytest.raises(ValueError, match="queries"):
        knn(q[0], r, k=1)
    with pytest.raises(ValueError, match="reference"):
        knn(q, r[:, :3], k=1)
    with pytest.raises(TypeError, match="queries"):
        knn(q.long(), r.long(), k=1)
    with pytest.raises(TypeError, match="reference"):
        knn(q, r.float(), k=1)
    with pytest.raises(TypeError, match="queries"):
        knn(q.numpy(), k=1)
    bad = q.clone()
    bad[3, 1] = math.nan
    with pytest.raises(ValueError, match="queries"):
        knn(bad, r, k=1)
    with pytest.raises(ValueError, match="reference"):
        knn(q, r * math.inf, k=1)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_knn_rejects_every_non_finite_value(value, dtype):
    """One non-finite entry anywhere (here the last) is refused, whatever its sign (one aminmax pass checks)."""
    q = torch.randn(37, 40, dtype=dtype)
    bad = q.clone()
    bad[-1, -1] = value
    with pytest.raises(ValueError, match="queries contains NaN or infinite"):
        knn(bad, None, k=3)
    with pytest.raises(ValueError, match="reference contains NaN or infinite"):
        knn(q, bad, k=3)


_SIMD_CHECK = """
import torch
import metricloss_kernels._C  # registers the op
op = torch.ops.metricloss_kernels.knn
g = torch.Generator().manual_seed(9)
# integer coordinates: fp32 scores are exact, with many ties; sizes not multiples of the 32-wide filter
q = torch.randint(-2, 3, (70, 5), generator=g).float()
r = torch.randint(-2, 3, (1111, 5), generator=g).float()
for metric in ("dot", "euclidean"):
    for k in (1, 16, 40, 300):
        for exclude in (False, True):
            ref = q if exclude else r
            s = q @ ref.T if metric == "dot" else -torch.cdist(q.double(), ref.double()).float()
            if exclude:
                s.fill_diagonal_(-float("inf"))
            kk = min(k, ref.shape[0] - 1)
            expected = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :kk]
            got = op(q, ref, kk, metric, exclude)[1]
            assert torch.equal(got, expected), (metric, k, exclude)
print("ok")
"""


@needs_extension
@pytest.mark.parametrize("level", ["avx512", "avx2", "portable"])
def test_every_simd_filter(level):
    """The fp32 scan is compiled per instruction set and picked at run time (once per process): force each."""
    env = dict(os.environ, METRICLOSS_KNN_SIMD=level)
    out = subprocess.run([sys.executable, "-c", _SIMD_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@needs_extension
def test_op_validation():
    q, r = _inputs(10, 12, 4)
    op = torch.ops.metricloss_kernels.knn
    with pytest.raises(ValueError, match="k must be"):
        op(q, r, 12, "dot", True)
    with pytest.raises(ValueError, match="metric"):
        op(q, r, 1, "cos", False)
    with pytest.raises(ValueError, match="embedding size"):
        op(q, r[:, :2], 1, "dot", False)
    with pytest.raises(TypeError, match="dtype"):
        op(q, r.float(), 1, "dot", False)


@needs_extension
@pytest.mark.parametrize("metric", METRICS)
def test_opcheck(metric):
    q, r = _inputs(23, 31, 8, dtype=torch.float32, seed=6)
    torch.library.opcheck(torch.ops.metricloss_kernels.knn.default, (q, r, 5, metric, False))
    torch.library.opcheck(torch.ops.metricloss_kernels.knn.default, (q, q, 5, metric, True))


@needs_extension
def test_evaluate_op_equals_torch_path(monkeypatch):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(120, 16, generator=g, dtype=torch.float64)
    y = torch.randint(0, 7, (120,), generator=g)
    with_op = metrics.evaluate(x, y, ks=(1, 5, 10))
    monkeypatch.setattr(_knn, "_op_available", lambda device: False)
    monkeypatch.setattr(_knn, "_warned", False)
    with pytest.warns(RuntimeWarning, match="chunked torch path"):
        with_torch = metrics.evaluate(x, y, ks=(1, 5, 10))
    assert with_torch == with_op
    with warnings.catch_warnings():
        warnings.simplefilter("error")               # said once only
        metrics.evaluate(x, y, ks=(1,))


def test_has_extension_is_bool():
    assert isinstance(retrieval.has_extension(), bool)


@needs_cuda
@pytest.mark.parametrize("metric", METRICS)
def test_cuda_matches_cpu(metric):
    queries, reference = _inputs(300, 2500, 16, dtype=torch.float32, seed=8)
    expected_values, expected_indices = _torch_path(queries, reference, k=20, metric=metric)
    values, indices = knn(queries.cuda(), reference.cuda(), k=20, metric=metric)
    assert values.is_cuda and indices.is_cuda
    torch.testing.assert_close(values.cpu(), expected_values, rtol=1e-4, atol=1e-4)
    assert (indices.cpu() == expected_indices).float().mean() > 0.99   # fp32 near-ties may swap


# --- euclidean exactness (the GEMM form ||q||^2 - 2 q.r + ||r||^2 cancels for data away from the origin) ------------

def _offset_inputs(q, r, d, offset, spread, dtype, seed=0):
    """Rows offset + spread * N(0, 1), rounded to dtype: far from the origin relative to their spread."""
    g = torch.Generator().manual_seed(seed)
    x = (offset + spread * torch.randn(q + r, d, generator=g, dtype=torch.float64)).to(dtype)
    return x[:q], x[q:]


def _check_euclidean_exact(path, queries, reference, k, exclude_self):
    """Indices equal to the float64 brute force ||q - r|| on the same (rounded) inputs, ties to the lower index;
    distances equal to it up to the output dtype's rounding."""
    values, indices = path(queries, None if exclude_self else reference, k=k, metric="euclidean")
    expected_values, expected_indices, _ = _oracle(queries, reference, k, "euclidean", exclude_self)
    assert values.dtype == queries.dtype
    torch.testing.assert_close(indices, expected_indices, rtol=0, atol=0)
    torch.testing.assert_close(values.double(), expected_values, rtol=torch.finfo(queries.dtype).eps, atol=0)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype,offset,spread", [
    (torch.float32, 10.0, 1e-2), (torch.float32, 100.0, 1e-2), (torch.float32, 1e4, 1e-2),
    (torch.float32, 100.0, 1e-4),
    # fp16 rounds to 2^-7 at 10, 2^-4 at 100 and 8 at 1e4: spreads of some 10 of its steps
    (torch.float16, 10.0, 1e-1), (torch.float16, 100.0, 1.0), (torch.float16, 1e4, 1e2)])
@pytest.mark.parametrize("exclude_self", [False, True])
def test_euclidean_knn_exact_for_offset_data(path, dtype, offset, spread, exclude_self):
    queries, reference = _offset_inputs(37, 300, 16, offset, spread, dtype)
    if exclude_self:
        queries = torch.cat([queries, reference])
    _check_euclidean_exact(path, queries, reference if not exclude_self else queries, 7, exclude_self)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("exclude_self", [False, True])
def test_euclidean_knn_exact_for_far_apart_clusters(path, exclude_self):
    # two tight clusters 2e3 * sqrt(D) apart: centring cannot help, every row of a cluster lies within the
    # GEMM's error of the k-th best, so the search measures them all directly
    g = torch.Generator().manual_seed(1)
    side = torch.randint(0, 2, (330,), generator=g).double() * 2 - 1
    x = (1e3 * side[:, None] + 1e-2 * torch.randn(330, 32, generator=g, dtype=torch.float64)).float()
    queries, reference = (x, x) if exclude_self else (x[:30], x[30:])
    _check_euclidean_exact(path, queries, reference, 9, exclude_self)


@pytest.mark.parametrize("path", PATHS)
def test_euclidean_knn_orders_near_ties_below_the_gemm_rounding(path):
    # reference rows around a query at offset 100, at distances 1 + O(1e-5) (radii 1 + j 2^-20, then fp32
    # rounding): far closer together than the fp32 GEMM values can tell apart, even centred
    g = torch.Generator().manual_seed(2)
    directions = torch.nn.functional.normalize(torch.randn(200, 24, generator=g, dtype=torch.float64), dim=1)
    radii = 1 + torch.randperm(200, generator=g).double() * 2.0 ** -20
    query = torch.full((1, 24), 100.0, dtype=torch.float64)
    reference = (query + radii[:, None] * directions).float()
    _check_euclidean_exact(path, query.float(), reference, 20, False)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("exclude_self", [False, True])
def test_euclidean_distance_to_an_exact_copy_is_zero(path, exclude_self):
    base, others = _offset_inputs(20, 50, 16, 100.0, 1e-2, torch.float32, seed=3)
    if exclude_self:                                       # rows i and 70 + i are copies: only the row goes
        queries = reference = torch.cat([base, others, base])
        copy = torch.arange(20) + 70
    else:                                                  # query i's copy is reference row 50 + i
        queries, reference = base, torch.cat([others, base])
        copy = torch.arange(20) + 50
    values, indices = path(queries, None if exclude_self else reference, k=1, metric="euclidean")
    assert torch.equal(indices[:20, 0], copy)
    assert torch.equal(values[:20, 0], torch.zeros(20))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("k", [1, 20, 100])
@pytest.mark.parametrize("exclude_self", [False, True])
def test_euclidean_ties_at_an_offset_go_to_the_lower_index(path, k, exclude_self):
    # small integer coordinates + 1000: exact in fp32, with many exactly tied distances
    g = torch.Generator().manual_seed(4)
    queries = torch.randint(-1, 2, (130 if exclude_self else 45, 3), generator=g).float() + 1000
    reference = queries if exclude_self else torch.randint(-1, 2, (130, 3), generator=g).float() + 1000
    _check_euclidean_exact(path, queries, reference, k, exclude_self)


@pytest.mark.parametrize("path", PATHS)
def test_euclidean_knn_exact_when_squared_norms_overflow(path):
    # |x| ~ 1e20: fp32 squares overflow, the distances (~1e20) do not
    g = torch.Generator().manual_seed(5)
    queries, reference = ((1e20 * torch.randn(n, 8, generator=g)).float() for n in (17, 90))
    _check_euclidean_exact(path, queries, reference, 6, False)


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("offset", [0.0, 100.0])
@pytest.mark.parametrize("exclude_self", [False, True])
def test_euclidean_op_and_torch_path_give_the_same_bits(dtype, offset, exclude_self):
    # both rank by the same fp64 distances, summed in the same order: values and indices are identical
    queries, reference = _offset_inputs(53, 260, 40, offset, 1.0, dtype, seed=6)
    if exclude_self:
        reference = queries
    got = knn(queries, None if exclude_self else reference, k=11, metric="euclidean")
    expected = _torch_path(queries, None if exclude_self else reference, k=11, metric="euclidean")
    assert torch.equal(got[1], expected[1]) and torch.equal(got[0], expected[0])


@pytest.fixture
def bf16_matmuls():
    """fp32 matmuls allowed to round their inputs to bf16 (torch.set_float32_matmul_precision("medium") on CPU)."""
    previous = torch.backends.mkldnn.matmul.fp32_precision
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    yield
    torch.backends.mkldnn.matmul.fp32_precision = previous


@pytest.mark.parametrize("path", PATHS)
def test_euclidean_knn_exact_with_bf16_matmuls(path, bf16_matmuls):
    # where the CPU has bf16 units the GEMM's error grows by 2^16: the candidate window must widen with it
    queries, reference = _offset_inputs(40, 1500, 64, 0.0, 1.0, torch.float32, seed=7)
    _check_euclidean_exact(path, queries, reference, 10, False)
