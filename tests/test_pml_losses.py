"""metricloss_kernels.pml losses against pytorch-metric-learning's own classes: same state_dict and inputs, value and
gradients (embeddings and weights), accelerated and fallback configurations, and the memory bound."""
import functools
import subprocess
import sys
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
from pytorch_metric_learning import distances, miners, reducers, regularizers  # noqa: E402

import metricloss_kernels as mlk  # noqa: E402
from metricloss_kernels import pml  # noqa: E402
from utils import TOL, assert_close, largest_allocation  # noqa: E402  (tests/ is on sys.path)
from utils import make_batch  # noqa: E402

N, D, C, K = 37, 40, 53, 3
# The fallbacks tested here on purpose warn (test_fallback_warns_once_per_instance checks the warning).
pytestmark = pytest.mark.filterwarnings("ignore:.*runs pytorch-metric-learning's own code:UserWarning")

# id -> (class name, constructor arguments (a function: fresh distance / reducer objects), accelerated)
CASES = {
    "proxy_anchor": ("ProxyAnchorLoss", lambda: {}, True),
    "proxy_anchor_alpha16_margin0.2": ("ProxyAnchorLoss", lambda: dict(alpha=16, margin=0.2), True),
    "proxy_anchor_weight_reg": ("ProxyAnchorLoss", lambda: dict(weight_regularizer=regularizers.LpRegularizer()),
                                True),
    "proxy_anchor_mean_reducer": ("ProxyAnchorLoss", lambda: dict(reducer=reducers.MeanReducer()), False),
    "proxy_nca": ("ProxyNCALoss", lambda: {}, True),
    "proxy_nca_scale10": ("ProxyNCALoss", lambda: dict(softmax_scale=10), True),
    "proxy_nca_cosine": ("ProxyNCALoss", lambda: dict(softmax_scale=5, distance=distances.CosineSimilarity()), True),
    "proxy_nca_lp_power1": ("ProxyNCALoss", lambda: dict(distance=distances.LpDistance()), False),
    "soft_triple": ("SoftTripleLoss", lambda: dict(centers_per_class=K), True),
    "soft_triple_k1": ("SoftTripleLoss", lambda: dict(centers_per_class=1, la=10, gamma=0.2, margin=0.05), True),
    "soft_triple_sparse_centers": ("SoftTripleLoss", lambda: dict(
        centers_per_class=K, weight_regularizer=regularizers.SparseCentersRegularizer(C, K), weight_reg_weight=0.2),
        True),
    "soft_triple_avg_non_zero": ("SoftTripleLoss", lambda: dict(centers_per_class=K,
                                                                reducer=reducers.AvgNonZeroReducer()), False),
    "arcface": ("ArcFaceLoss", lambda: {}, True),
    "arcface_margin30_scale10": ("ArcFaceLoss", lambda: dict(margin=30, scale=10), True),
    "arcface_embedding_reg": ("ArcFaceLoss", lambda: dict(embedding_regularizer=regularizers.LpRegularizer()),
                              True),
    "arcface_threshold_reducer": ("ArcFaceLoss", lambda: dict(reducer=reducers.ThresholdReducer(low=0.5)), False),
    "subcenter_arcface_1": ("SubCenterArcFaceLoss", lambda: dict(sub_centers=1), True),
    "subcenter_arcface_3": ("SubCenterArcFaceLoss", lambda: dict(sub_centers=K), True),
    "subcenter_arcface_3_margin120_scale5": ("SubCenterArcFaceLoss", lambda: dict(sub_centers=K, margin=120,
                                                                                   scale=5), True),
    "cosface": ("CosFaceLoss", lambda: {}, True),
    "cosface_margin0.5_scale30": ("CosFaceLoss", lambda: dict(margin=0.5, scale=30), True),
    "normalized_softmax": ("NormalizedSoftmaxLoss", lambda: {}, True),
    "normalized_softmax_regular_face": ("NormalizedSoftmaxLoss", lambda: dict(
        weight_regularizer=regularizers.RegularFaceRegularizer(), weight_reg_weight=0.1), True),
    "normalized_softmax_unnormalized": ("NormalizedSoftmaxLoss", lambda: dict(
        distance=distances.DotProductSimilarity(normalize_embeddings=False)), False),
}


def _build(case, dtype=torch.float64, seed=0, **extra):
    """(PML's module, ours with PML's state_dict), both in dtype."""
    name, kwargs, _ = CASES[case]
    torch.manual_seed(seed)
    theirs = getattr(pml_losses, name)(num_classes=C, embedding_size=D, **kwargs()).to(dtype)
    ours = getattr(pml, name)(num_classes=C, embedding_size=D, **kwargs(), **extra).to(dtype)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def _loss_and_grads(module, x, labels, **kwargs):
    x = x.detach().clone().requires_grad_()
    loss = module(x, labels, **kwargs)
    return loss, torch.autograd.grad(loss, [x, *module.parameters()])


ACCELERATED_CLASSES = [getattr(pml, name) for name in pml.__all__ if "_functional" in vars(getattr(pml, name))]


@pytest.fixture
def calls(monkeypatch):
    """The names of the metricloss_kernels.functional losses that the classes called during the test (each class's
    `_functional` wrapped by a spy)."""
    seen = []

    def spy(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            seen.append(fn.__name__)
            return fn(*args, **kwargs)
        return staticmethod(wrapper)

    for cls in ACCELERATED_CLASSES:
        monkeypatch.setattr(cls, "_functional", spy(cls._functional))
    return seen


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case,backend", [(case, backend) for case, (_, _, accelerated) in CASES.items()
                                          for backend in (("reference", "chunked") if accelerated else ("auto",))])
def test_matches_pml(case, backend, dtype, calls):
    """Value and every gradient equal PML's; the kernels run exactly in the accelerated configurations."""
    theirs, ours = _build(case, dtype, backend=backend)
    x, labels = make_batch(N, D, C - 1, seed=1, dtype=dtype)
    expected, expected_grads = _loss_and_grads(theirs, x, labels)
    actual, actual_grads = _loss_and_grads(ours, x, labels)
    assert ours.accelerated == CASES[case][2], ours.fallback_reason
    assert bool(calls) == CASES[case][2]
    assert actual.dtype == expected.dtype
    assert_close(actual, expected, TOL[dtype], "loss")
    for name, a, e in zip(["embeddings", *dict(theirs.named_parameters())], actual_grads, expected_grads):
        assert_close(a, e, TOL[dtype], f"grad {name}")


@pytest.mark.parametrize("backend", ["triton", "gemm"])
@pytest.mark.parametrize("case", ["proxy_anchor", "soft_triple", "arcface"])
def test_triton_backend_matches_pml(case, calls, backend):
    """backend="triton" reaches the fused kernels, backend="gemm" the GEMMs and epilogues (under the Triton
    interpreter on CPU)."""
    pytest.importorskip("triton")
    theirs, ours = _build(case, torch.float32, backend=backend)
    x, labels = make_batch(N, D, C - 1, seed=2, dtype=torch.float32)
    (expected, expected_grads), (actual, actual_grads) = (_loss_and_grads(m, x, labels) for m in (theirs, ours))
    assert calls
    assert_close(actual, expected, TOL[torch.float32], "loss")
    for a, e in zip(actual_grads, expected_grads):
        assert_close(a, e, TOL[torch.float32], "grad")


def test_parameters_initialisation_and_state_dict_are_pmls():
    """Same parameter names, shapes and (with the same seed) initial values; a PML state_dict loads into ours."""
    for case in ("proxy_anchor", "proxy_nca", "soft_triple", "arcface", "subcenter_arcface_3", "cosface",
                 "normalized_softmax"):
        name, kwargs, _ = CASES[case]
        torch.manual_seed(3)
        theirs = getattr(pml_losses, name)(num_classes=C, embedding_size=D, **kwargs())
        torch.manual_seed(3)
        ours = getattr(pml, name)(num_classes=C, embedding_size=D, **kwargs())
        assert isinstance(ours, getattr(pml_losses, name))
        a, b = theirs.state_dict(), ours.state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), case


@pytest.mark.parametrize("case", ["arcface", "subcenter_arcface_3", "arcface_threshold_reducer"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_parameters_keep_their_dtype(case, dtype):
    """Unlike PML (which casts its weights to the embeddings' dtype in place, for good), the fp32 weights stay fp32,
    accelerated or not: the loss is PML's on the embeddings cast to fp32, in fp32, and the embeddings' gradient
    comes back in their dtype, as PML's fp32 module on an fp32 copy computes them."""
    theirs, ours = _build(case, torch.float32)
    x, labels = make_batch(N, D, C - 1, seed=4, dtype=dtype)
    x.requires_grad_()
    for _ in range(2):  # a second call sees the same weights
        actual = ours(x, labels)
        assert ours.W.dtype == torch.float32 and actual.dtype == torch.float32
    x32 = x.detach().float().requires_grad_()
    expected = theirs(x32, labels)
    (dx,), (want_dx,) = torch.autograd.grad(actual, [x]), torch.autograd.grad(expected, [x32])
    assert dx.dtype == dtype
    assert_close(actual, expected, TOL[torch.float32], "loss")
    assert_close(dx.float(), want_dx, 1e-2 if dtype != torch.float64 else TOL[torch.float32], "grad")
    assert theirs(x, labels).dtype == dtype and theirs.W.dtype == dtype  # what PML does (the deviation)


def test_fallback_warns_once_per_instance(calls):
    """A call that runs PML's code warns once per instance, naming the reason; an accelerated one never warns."""
    x, labels = make_batch(N, D, C - 1, seed=11)
    _, ours = _build("arcface_threshold_reducer")
    with pytest.warns(UserWarning, match="ThresholdReducer") as record:
        ours(x, labels)
        ours(x, labels)
    assert len(record) == 1
    _, ours = _build("arcface")
    pairs = miners.MultiSimilarityMiner(epsilon=0.5)(x, labels)
    with pytest.warns(UserWarning, match="indices_tuple"):
        ours(x, labels, indices_tuple=pairs)
    _, ours = _build("subcenter_arcface_3")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours(x, labels)
    assert calls == ["sub_center_arcface_loss"]


@pytest.mark.parametrize("case", ["proxy_anchor", "soft_triple", "arcface", "normalized_softmax"])
def test_half_precision_agrees_with_pml_to_its_rounding(case, calls):
    """fp16 is computed in fp32 and returned in fp16: PML's fp16 result to fp16 accuracy."""
    theirs, ours = _build(case, torch.float16)
    x, labels = make_batch(N, D, C - 1, seed=5, dtype=torch.float16)
    actual, expected = ours(x, labels), theirs(x, labels)
    assert calls == [ours._functional.__name__]  # this call ran on the functional loss, not PML's fallback
    assert actual.dtype == torch.float16
    assert_close(actual, expected, 2e-2, "loss")


@pytest.mark.parametrize("case", ["proxy_anchor", "arcface", "soft_triple"])
def test_miner_indices_fall_back_to_pml(case, calls):
    """A miner's indices_tuple weights samples: PML's code runs, with PML's result."""
    theirs, ours = _build(case)
    x, labels = make_batch(N, D, C - 1, seed=6)
    pairs = miners.MultiSimilarityMiner(epsilon=0.5)(x, labels)
    (expected, expected_grads), (actual, actual_grads) = (
        _loss_and_grads(m, x, labels, indices_tuple=pairs) for m in (theirs, ours))
    assert not calls
    assert_close(actual, expected, 1e-12, "loss")
    for a, e in zip(actual_grads, expected_grads):
        assert_close(a, e, 1e-12, "grad")


def test_pml_errors_are_kept(calls):
    """ref_emb and missing labels give PML's errors, from PML's code."""
    theirs, ours = _build("proxy_anchor")
    x, labels = make_batch(N, D, C - 1, seed=7)
    for kwargs in ({"ref_emb": x}, {"labels": None}):
        for module in (theirs, ours):
            with pytest.raises(ValueError):
                module(x, **{"labels": labels, **kwargs})
    assert not calls


@pytest.mark.parametrize("case", [case for case, (_, _, accelerated) in CASES.items() if accelerated])
def test_labels_out_of_range_are_the_functional_losses_error(case, calls):
    """The accelerated path does not read label values to decide (no host sync): labels outside [0, C) reach the
    functional loss, whose check raises a ValueError naming them (the module docstring says so)."""
    _, ours = _build(case)
    x, labels = make_batch(N, D, C - 1, seed=7)
    for bad in (C, -1):
        labels[0] = bad
        with pytest.raises(ValueError, match=rf"labels must be in \[0, num_classes = {C}\)"):
            ours(x, labels)
    assert calls == 2 * [ours._functional.__name__]


class _HostReads(TorchDispatchMode):
    """Counts reads of tensor data by the host (Tensor.item(), int(), bool(): aten._local_scalar_dense)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("case", ["proxy_anchor", "proxy_nca", "soft_triple", "arcface", "subcenter_arcface_3",
                                  "cosface", "normalized_softmax"])
def test_accelerated_call_adds_no_host_read_to_the_functional_losses(case, calls):
    """Forward + backward of the class reads tensor data on the host exactly as often as its functional loss alone
    (on CPU the functional's label check reads once; on CUDA it is an asynchronous assert): the decision to
    accelerate reads no label value, which would synchronise with the GPU at every step."""
    _, ours = _build(case, torch.float32)
    x, labels = make_batch(N, D, C - 1, seed=10, dtype=torch.float32)
    x.requires_grad_()
    with _HostReads() as ours_reads:
        ours(x, labels).backward()
    assert calls
    fn = ours._functional
    w = ours._weights().detach().requires_grad_()
    with _HostReads() as functional_reads:
        fn(x, labels, w, **ours._arguments()).backward()
    assert ours_reads.count == functional_reads.count


def test_proxy_nca_underflow_falls_back():
    """Where PML's softmax can underflow to 0 (and PML drops the sample), PML's code runs."""
    theirs, ours = _build("proxy_nca_scale10", torch.float32)
    theirs.softmax_scale = ours.softmax_scale = 30.0  # 2 s = 120 > -ln(tiny fp32) = 87.3
    x, labels = make_batch(N, D, C - 1, seed=8, dtype=torch.float32)
    assert ours.accelerated  # the configuration is; this dtype is not
    assert_close(ours(x, labels), theirs(x, labels), 1e-6, "loss")
    assert ours._call_reason(x, labels, None, x, labels) is not None


def test_fallback_reason_names_the_cause():
    _, ours = _build("proxy_anchor_mean_reducer")
    assert "MeanReducer" in ours.fallback_reason
    _, ours = _build("arcface_threshold_reducer")
    assert "ThresholdReducer" in ours.fallback_reason
    _, ours = _build("proxy_anchor")
    ours.alpha = -1.0
    assert "alpha" in ours.fallback_reason
    with pytest.raises(ValueError, match="backend"):
        pml.ArcFaceLoss(num_classes=C, embedding_size=D, backend="gpu")


@pytest.mark.parametrize("case,n,c,k", [("proxy_anchor", 128, 140_000, 1), ("soft_triple", 128, 33_000, 4),
                                       ("subcenter_arcface_3", 128, 45_000, 3)])
def test_no_n_by_c_allocation(case, n, c, k):
    """At a class count where the N x C*K logits (68-72 MB, so that backend "auto" streams) dwarf everything else
    (D = 8), the accelerated loss never allocates N*C*K*4/2 bytes at once, while PML's class does (so the check can
    fail)."""
    name, kwargs, _ = CASES[case]
    extra = {("sub_centers" if name == "SubCenterArcFaceLoss" else "centers_per_class"): k} if k > 1 else {}
    torch.manual_seed(9)
    theirs = getattr(pml_losses, name)(num_classes=c, embedding_size=8, **extra)
    ours = getattr(pml, name)(num_classes=c, embedding_size=8, **extra)
    x = torch.randn(n, 8, requires_grad=True)
    labels = torch.randint(0, c, (n,))
    limit = n * c * k * 4 // 2

    def run(module):
        return lambda: torch.autograd.grad(module(x, labels), [x, *module.parameters()])

    assert largest_allocation(run(theirs)) >= limit
    assert largest_allocation(run(ours)) < limit


def test_pml_is_imported_lazily_and_missing_pml_says_how_to_install():
    code = """
import sys
import metricloss_kernels
assert "pytorch_metric_learning" not in sys.modules
sys.modules["pytorch_metric_learning"] = None  # as if it were not installed
try:
    import metricloss_kernels.pml
except ImportError as error:
    assert "pip install pytorch-metric-learning" in str(error), error
else:
    raise AssertionError("no ImportError")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


# ----------------------------------------------------------- pair losses: a reference set and the cross-batch memory
# id -> (PML's loss (fresh distance and reducer objects), PML's miner or None, ours: the same loss)
PAIR_CASES = {
    "contrastive": (lambda: pml_losses.ContrastiveLoss(pos_margin=0.8, neg_margin=0.1,
                                                       distance=distances.CosineSimilarity(),
                                                       reducer=reducers.MeanReducer()),
                    None, lambda: mlk.ContrastiveLoss(0.8, 0.1)),
    "triplet_cosine": (lambda: pml_losses.TripletMarginLoss(margin=0.2, distance=distances.CosineSimilarity(),
                                                            reducer=reducers.MeanReducer(),
                                                            triplets_per_anchor="all"),
                       None, lambda: mlk.TripletMarginLoss(0.2, "cosine", "all")),
    "triplet_euclidean": (lambda: pml_losses.TripletMarginLoss(margin=0.2, reducer=reducers.MeanReducer(),
                                                               triplets_per_anchor="all"),
                          None, lambda: mlk.TripletMarginLoss(0.2, "euclidean", "all")),
    "lifted_structure": (lambda: pml_losses.GeneralizedLiftedStructureLoss(neg_margin=0.0, pos_margin=1.5,
                                                                          distance=distances.CosineSimilarity()),
                         None, lambda: mlk.LiftedStructureLoss(1.5)),
    "multi_similarity": (lambda: pml_losses.MultiSimilarityLoss(alpha=2.0, beta=50.0, base=0.5),
                         lambda: miners.MultiSimilarityMiner(epsilon=0.1),
                         lambda: mlk.MultiSimilarityLoss(2.0, 50.0, 0.5, 0.1)),
}
PAIR_N, PAIR_M, PAIR_MEMORY = 23, 31, 50


def _pair_batch(n, seed):
    """Embeddings [n, D] and labels of 5 classes with at least 4 samples each (every anchor has positives and
    negatives: PML's lifted structure and multi-similarity count anchors without them differently)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g, dtype=torch.float64), (torch.arange(n) % 5)[torch.randperm(n, generator=g)]


@pytest.mark.parametrize("case", sorted(PAIR_CASES))
def test_pair_losses_with_ref_emb_match_pml(case):
    """loss(embeddings, labels, ref_emb=..., ref_labels=...): PML's value and gradients (embeddings and
    reference); PML's multi-similarity with the miner that the mining of ours stands for."""
    make_theirs, make_miner, make_ours = PAIR_CASES[case]
    x, y = _pair_batch(PAIR_N, 40)
    r, ry = _pair_batch(PAIR_M, 41)

    def run(loss, mined):
        xx, rr = x.clone().requires_grad_(), r.clone().requires_grad_()
        kwargs = {"indices_tuple": make_miner()(xx, y, rr, ry)} if mined else {}
        value = loss(xx, y, ref_emb=rr, ref_labels=ry, **kwargs)
        return (value, *torch.autograd.grad(value, (xx, rr)))

    expected, actual = run(make_theirs(), make_miner is not None), run(make_ours(), False)
    for what, a, e in zip(("loss", "grad embeddings", "grad ref_emb"), actual, expected):
        assert e.abs().max() > 0, what
        assert_close(a, e, TOL[torch.float64], f"{case} {what}")


@pytest.mark.parametrize("case", sorted(PAIR_CASES))
def test_cross_batch_memory_matches_pml(case):
    """mlk.CrossBatchMemory (also metricloss_kernels.pml.CrossBatchMemory) against PML's CrossBatchMemory wrapping
    PML's loss: values and gradients over five steps of 23 rows through a memory of 50 (wrapping around inside a
    batch), and the same ring."""
    make_theirs, make_miner, make_ours = PAIR_CASES[case]
    theirs = pml_losses.CrossBatchMemory(make_theirs(), D, memory_size=PAIR_MEMORY,
                                         miner=make_miner() if make_miner else None)
    ours = pml.CrossBatchMemory(make_ours(), D, memory_size=PAIR_MEMORY)
    assert pml.CrossBatchMemory is mlk.CrossBatchMemory
    for step in range(5):
        x, y = _pair_batch(PAIR_N, 50 + step)
        xe, xa = x.clone().requires_grad_(), x.clone().requires_grad_()
        expected, actual = theirs(xe, y), ours(xa, y)
        (expected_grad,), (actual_grad,) = torch.autograd.grad(expected, xe), torch.autograd.grad(actual, xa)
        assert_close(actual, expected, TOL[torch.float64], f"{case} step {step}: loss")
        assert_close(actual_grad, expected_grad, TOL[torch.float64], f"{case} step {step}: grad")
        assert ours.queue_idx == theirs.queue_idx and ours.has_been_filled == theirs.has_been_filled
        assert torch.equal(ours.embedding_memory, theirs.embedding_memory)
        assert torch.equal(ours.label_memory, theirs.label_memory)
