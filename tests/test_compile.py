"""Every loss module under torch.compile: one graph without breaks (torch._dynamo.explain), compiled forward and
backward equal to eager, the streamed proxy losses calling the registered class_lse op (and its backward op), label
checks that work inside a graph; on a GPU, no device synchronisation in a training step.

Budget: Inductor compiles C++ for every graph (5-25 s each on 2 cores), so every module is compiled through
AOTAutograd with the eager backend (dynamo, fake tensors, functionalisation and the backward graph: what decides
whether a loss can be compiled at all), and a subset that covers each construct the losses use (the op's fake and
backward, scatters into [C] buffers, sort/searchsorted mining, masked means, random sampling, a buffer update, the
in-graph label check) through Inductor as well.
"""
import copy

import pytest
import torch
from torch._dynamo.backends.common import aot_autograd

import metricloss_kernels as mlk

N, C, K, D = 24, 7, 3, 16
CLASS_LSE = torch.ops.metricloss_kernels.class_lse.default
CLASS_LSE_BACKWARD = torch.ops.metricloss_kernels.class_lse_backward.default

PROXY_MODULES = {
    "ProxyNCALoss": lambda b: mlk.ProxyNCALoss(C, D, backend=b),
    "ProxyAnchorLoss": lambda b: mlk.ProxyAnchorLoss(C, D, backend=b),
    "SoftTripleLoss": lambda b: mlk.SoftTripleLoss(C, D, centers_per_class=K, backend=b),
    "MPALoss": lambda b: mlk.MPALoss(C, D, centers_per_class=K, backend=b),
    "MPALoss-dw": lambda b: mlk.MPALoss(C, D, centers_per_class=K, variant="dw", backend=b),
    "ArcFaceLoss": lambda b: mlk.ArcFaceLoss(C, D, backend=b),
    "SubCenterArcFaceLoss": lambda b: mlk.SubCenterArcFaceLoss(C, D, sub_centers=K, backend=b),
    "CosFaceLoss": lambda b: mlk.CosFaceLoss(C, D, backend=b),
    "L2SoftmaxLoss": lambda b: mlk.L2SoftmaxLoss(C, D, backend=b),
    "RegularPolytopeLoss": lambda b: mlk.RegularPolytopeLoss(C, polytope="orthoplex", backend=b),
    "ProxyRepelLoss": lambda b: mlk.ProxyRepelLoss(C, D, backend=b),
    "ProxyRepelLoss-batch": lambda b: mlk.ProxyRepelLoss(C, D, variant="batch", backend=b),
}
PAIR_MODULES = {
    "ContrastiveLoss": lambda b: mlk.ContrastiveLoss(),
    "TripletMarginLoss": lambda b: mlk.TripletMarginLoss(),
    "TripletMarginLoss-semi-hard": lambda b: mlk.TripletMarginLoss(distance="euclidean", mining="semi-hard"),
    "TripletMarginLoss-hard": lambda b: mlk.TripletMarginLoss(mining="hard"),
    "LiftedStructureLoss": lambda b: mlk.LiftedStructureLoss(),
    "NPairsLoss": lambda b: mlk.NPairsLoss(),
    "MarginLoss": lambda b: mlk.MarginLoss(learn_beta=True, num_classes=C),
    "MultiSimilarityLoss": lambda b: mlk.MultiSimilarityLoss(),
    "ExponentialTripletLoss": lambda b: mlk.ExponentialTripletLoss(C),
    "CenterLoss": lambda b: mlk.CenterLoss(C, D),
    "WeightedSumLoss": lambda b: mlk.WeightedSumLoss({"exp": mlk.ExponentialTripletLoss(C),
                                                      "center": mlk.CenterLoss(C, D),
                                                      "class": mlk.L2SoftmaxLoss(C, D, backend=b)}),
}
CASES = [(name, backend) for name in PROXY_MODULES for backend in ("reference", "chunked")] + [
    (name, "reference") for name in PAIR_MODULES if name != "WeightedSumLoss"] + [("WeightedSumLoss", "chunked")]
# impl="gemm" (under the Triton interpreter on CPU): one loss per reduction, K > 1, the target-logit path
GEMM_CASES = [(name, "gemm") for name in ("ProxyAnchorLoss", "SoftTripleLoss", "ArcFaceLoss")]
INDUCTOR_CASES = [("ProxyAnchorLoss", "chunked"), ("SoftTripleLoss", "chunked"), ("ArcFaceLoss", "reference"),
                  ("TripletMarginLoss-semi-hard", "reference"), ("MarginLoss", "reference"),
                  ("CenterLoss", "reference")]


def make(name, backend, seed=0):
    """(module in float64, embeddings [N, width], labels [N]): a fresh, deterministic setup."""
    torch.manual_seed(seed)
    module = {**PROXY_MODULES, **PAIR_MODULES}[name](backend).double()
    width = getattr(module, "embedding_size", D)
    g = torch.Generator().manual_seed(seed + 1)
    return module, torch.randn(N, width, generator=g, dtype=torch.float64), torch.randint(0, C, (N,), generator=g)


def calls(graph, op) -> bool:
    """Whether the FX graph calls `op` (dynamo graphs name the packet, AOT graphs the overload)."""
    return any(node.target in (op, op.overloadpacket) for node in graph.graph.nodes)


def uses_the_op(name, backend):
    return backend in ("chunked", "gemm") and (name in PROXY_MODULES or name == "WeightedSumLoss")


def step(module, x, labels, seed=2):
    """loss, d loss / d (embeddings, parameters...), the buffers after the call (a CenterLoss moves its centres);
    the global RNG seeded first (MarginLoss draws its negatives from it)."""
    x = x.clone().requires_grad_()
    torch.manual_seed(seed)
    loss = module(x, labels)
    grads = torch.autograd.grad(loss, [x, *module.parameters()])
    return loss.detach(), grads, [b.clone() for b in module.buffers()]


def assert_same_step(got, expected, rtol):
    for a, b in zip(got[:1] + tuple(got[1]) + tuple(got[2]), expected[:1] + tuple(expected[1]) + tuple(expected[2])):
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol)


class GraphRecorder:
    """An AOTAutograd backend that runs the graphs eagerly and keeps them, to look at what they call."""

    def __init__(self):
        self.graphs = []
        self.backend = aot_autograd(fw_compiler=self.keep, bw_compiler=self.keep)

    def keep(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("name,backend", CASES, ids=[f"{n}-{b}" for n, b in CASES])
def test_one_graph_without_breaks(name, backend):
    module, x, labels = make(name, backend)
    explanation = torch._dynamo.explain(module)(x, labels)
    assert explanation.graph_break_count == 0, [str(r.reason) for r in explanation.break_reasons]
    assert explanation.graph_count == 1
    assert calls(explanation.graphs[0], CLASS_LSE) == uses_the_op(name, backend)


@pytest.mark.parametrize("name,backend", CASES + GEMM_CASES, ids=[f"{n}-{b}" for n, b in CASES + GEMM_CASES])
def test_compiled_step_equals_eager(name, backend):
    """fullgraph compile (AOTAutograd, graphs run eagerly): value, gradients and buffers as in eager mode; the
    streamed losses' forward graph calls class_lse and their backward graph class_lse_backward."""
    module, x, labels = make(name, backend)
    compiled_module = copy.deepcopy(module)
    expected = step(module, x, labels)
    recorder = GraphRecorder()
    compiled = torch.compile(compiled_module, backend=recorder.backend, fullgraph=True)
    got = step(compiled, x, labels)
    assert_same_step(got, expected, rtol=1e-12)
    if uses_the_op(name, backend):
        forward_graph, backward_graph = recorder.graphs
        assert calls(forward_graph, CLASS_LSE) and calls(backward_graph, CLASS_LSE_BACKWARD)


@pytest.mark.parametrize("name,backend", INDUCTOR_CASES, ids=[f"{n}-{b}" for n, b in INDUCTOR_CASES])
def test_inductor_step_equals_eager(name, backend):
    """The default compiler; random sampling (MarginLoss) through eager's generator (fallback_random), so that both
    draw the same negatives."""
    module, x, labels = make(name, backend)
    compiled_module = copy.deepcopy(module)
    expected = step(module, x, labels)
    with torch._inductor.config.patch(fallback_random=True):
        got = step(torch.compile(compiled_module, fullgraph=True), x, labels)
    assert_same_step(got, expected, rtol=1e-9)


RECOMPILE_CASES = [("ProxyAnchorLoss", "chunked"), ("SoftTripleLoss", "reference"),
                   ("TripletMarginLoss-semi-hard", "reference"), ("MarginLoss", "reference"),
                   ("MultiSimilarityLoss", "reference")]


@pytest.mark.parametrize("name,backend", RECOMPILE_CASES, ids=[f"{n}-{b}" for n, b in RECOMPILE_CASES])
def test_other_batch_sizes_recompile_into_one_graph(name, backend):
    """A new batch size makes dynamo recompile with a symbolic N: still one graph, still eager's values."""
    module, _, _ = make(name, backend)
    compiled = torch.compile(copy.deepcopy(module), backend="aot_eager", fullgraph=True)
    for n in (N, N + 6, N + 12):
        g = torch.Generator().manual_seed(n)
        x = torch.randn(n, D, generator=g, dtype=torch.float64)
        labels = torch.randint(0, C, (n,), generator=g)
        assert_same_step(step(compiled, x, labels), step(module, x, labels), rtol=1e-12)


@pytest.mark.parametrize("name", ["SoftTripleLoss", "ArcFaceLoss", "MultiSimilarityLoss"])
def test_instances_with_other_hyperparameters(name):
    """A second instance with other float hyper-parameters makes dynamo treat them as symbolic floats: the
    argument checks must accept those, and the values must still be eager's."""
    factory = {"SoftTripleLoss": lambda v: mlk.SoftTripleLoss(C, D, centers_per_class=K, la=20.0 + v, gamma=0.1 + v),
               "ArcFaceLoss": lambda v: mlk.ArcFaceLoss(C, D, margin=28.6 + v, scale=64.0 + v, backend="chunked"),
               "MultiSimilarityLoss": lambda v: mlk.MultiSimilarityLoss(alpha=2.0 + v, beta=50.0 + v)}[name]
    _, x, labels = make("MultiSimilarityLoss", "reference")
    for v in (0.0, 0.5, 1.0):
        torch.manual_seed(0)
        module = factory(v).double()
        compiled = torch.compile(copy.deepcopy(module), backend="aot_eager", fullgraph=True)
        assert_same_step(step(compiled, x, labels), step(module, x, labels), rtol=1e-12)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_label_check_inside_a_graph(backend):
    """Under compile the label range is checked in the graph (torch._assert_async), no break: RuntimeError."""
    module, x, labels = make("ProxyAnchorLoss", "chunked")
    compiled = torch.compile(module, backend=backend, fullgraph=True)
    compiled(x, labels)
    with pytest.raises(RuntimeError, match="labels must be in"):
        compiled(x, torch.where(labels == 3, C, labels))


def test_center_loss_refuses_non_finite_embeddings_inside_a_graph():
    """The finiteness check of the centre update inside a graph: an error, and the centres stay as they were."""
    module, x, labels = make("CenterLoss", "reference")
    before = module.centers.clone()
    x[3, 1] = float("nan")
    with pytest.raises(RuntimeError, match="finite"):
        torch.compile(module, backend="aot_eager", fullgraph=True)(x, labels)
    assert torch.equal(module.centers, before)


def test_margin_loss_with_a_generator_is_the_documented_exception():
    """A torch.Generator cannot enter a graph: MarginLoss(generator=...) breaks it at the draw (README), while
    without one (the global RNG) it compiles into one graph (test_one_graph_without_breaks)."""
    module = mlk.MarginLoss(generator=torch.Generator().manual_seed(0))
    _, x, labels = make("MarginLoss", "reference")
    assert torch._dynamo.explain(module)(x.float(), labels).graph_break_count > 0


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "gemm"])
@pytest.mark.parametrize("name", sorted(PROXY_MODULES))
def test_compiled_triton_step_equals_eager_on_cuda(name, backend):
    """The Triton and gemm backends under the default compiler, on a GPU (the CPU suite covers reference and
    chunked)."""
    module, x, labels = make(name, backend)
    module, x, labels = module.cuda(), x.cuda(), labels.cuda()
    compiled = torch.compile(copy.deepcopy(module), fullgraph=True)
    assert_same_step(step(compiled, x, labels), step(module, x, labels), rtol=1e-9)


SYNC_CASES = [(name, "auto") for name in sorted(set(PROXY_MODULES) | set(PAIR_MODULES))] + [
    (name, "gemm") for name in sorted(PROXY_MODULES)]


@pytest.mark.cuda
@pytest.mark.parametrize("name,backend", SYNC_CASES, ids=[f"{n}-{b}" for n, b in SYNC_CASES])
def test_no_device_synchronisation_on_cuda(name, backend):
    """A training step of every loss module on CUDA ("auto": Triton for the proxy losses; and "gemm") with the
    CUDA sync debug mode set to error: no read of device data by the host, label checks included."""
    module, x, labels = make(name, backend)
    module, x, labels = module.float().cuda(), x.float().cuda(), labels.cuda()
    step(module, x, labels)  # warm-up: kernel compilation, cached polytope weights
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(module, x, labels)
    finally:
        torch.cuda.set_sync_debug_mode("default")
