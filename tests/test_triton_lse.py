"""Triton class_lse (metricloss_kernels.triton) against a materialised float64 oracle; every proxy loss through the
public API with backend="triton" against backend="reference"; no N x C allocation (streaming memory).

On a machine without CUDA the kernels run under the Triton interpreter on CPU tensors: TRITON_INTERPRET must be
set before triton (or the package) is imported. The interpreter is slow and its tl.dot cannot do bf16, so these
tests use small awkward shapes (N=37, C=53, K=3, D=40: nothing a multiple of a tile) in fp32/fp16/fp64; the bf16
and large-shape tests need a GPU and skip cleanly without one.
"""
import functools
import os
import subprocess
import sys

if __name__ != "__main__" and not __import__("torch").cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from test_chunked import _forward_backward, _largest_allocation  # noqa: E402  (tests/ is on sys.path)

tl_kernels = pytest.importorskip("metricloss_kernels.triton")
import metricloss_kernels as mlk  # noqa: E402
from metricloss_kernels import fused  # noqa: E402
from metricloss_kernels.polytopes import regular_polytope  # noqa: E402
from metricloss_kernels.triton import _common, class_lse  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
RTOL = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 3e-2}


def oracle(x, w, labels, *, centers_per_class=1, gamma=0.1, scale=1.0, shift=0.0, bias=None,
           normalize_x=True, normalize_w=True, reduce="row"):
    """class_lse materialised in float64: the N x C x K logits, a masked logsumexp."""
    x, w = x.double(), w.double()
    if normalize_x:
        x = F.normalize(x, dim=1)
    if normalize_w:
        w = F.normalize(w, dim=1)
    l = (x @ w.T).view(x.shape[0], -1, centers_per_class)
    z = scale * (torch.softmax(l / gamma, dim=-1) * l).sum(-1) + shift
    if bias is not None:
        z = z + bias.double()
    own = labels[:, None] == torch.arange(z.shape[1], device=z.device)
    return torch.logsumexp(z.masked_fill(own, float("-inf")), dim=1 if reduce == "row" else 0)


def make_inputs(n=37, c=53, k=3, d=40, *, dtype=torch.float32, bias=False, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g).to(device, dtype).requires_grad_()
    w = torch.randn(c * k, d, generator=g).to(device, dtype).requires_grad_()
    b = torch.randn(c, generator=g).to(device, dtype).requires_grad_() if bias else None
    labels = torch.randint(0, c, (n,), generator=g).to(device)
    return x, w, b, labels


def assert_rel_close(actual, expected, rtol, what):
    """Max-abs error relative to the largest finite |expected|; non-finite entries (-inf LSEs) in the same places."""
    assert torch.isfinite(actual).eq(torch.isfinite(expected)).all(), f"{what}: different non-finite entries"
    fin = torch.isfinite(expected)
    a, e = actual.double()[fin], expected.double()[fin]
    scale = e.abs().max().clamp_min(1e-30)
    err = ((a - e).abs().max() / scale).item() if e.numel() else 0.0
    assert err <= rtol, f"{what}: relative error {err:.3g} > {rtol:g}"


def check_against_oracle(x, w, b, labels, rtol=None, seed=1, **kw):
    """Forward and every gradient (shared random upstream gradient) of class_lse vs the float64 oracle."""
    rtol = rtol or RTOL[x.dtype]
    out = class_lse(x, w, labels, bias=b, **kw)
    oracle_kw = {k: v for k, v in kw.items() if k not in ("block_n", "block_c", "block_d", "num_splits")}
    ref = oracle(x, w, labels, bias=b, **oracle_kw)
    assert out.dtype == (torch.float64 if x.dtype == torch.float64 else torch.float32)
    assert out.shape == ref.shape
    assert_rel_close(out, ref, rtol, "forward")
    up = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed)).to(ref.device)
    inputs = [t for t in (x, w, b) if t is not None and t.requires_grad]
    grads = torch.autograd.grad(out, inputs, up.to(out.dtype))
    ref_grads = torch.autograd.grad(ref, inputs, up.double())
    for name, gr, rg, t in zip("xwb", grads, ref_grads, inputs):
        assert gr.dtype == t.dtype and gr.shape == t.shape, name
        assert not torch.isnan(gr).any(), f"d{name} has NaN"
        assert_rel_close(gr, rg, rtol, f"d{name}")
    return out, grads


@pytest.mark.parametrize("reduce", ["row", "col"])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_oracle(reduce, k, with_bias):
    x, w, b, labels = make_inputs(k=k, bias=with_bias, seed=k + 10 * with_bias)
    check_against_oracle(x, w, b, labels, centers_per_class=k, gamma=0.1, scale=8.0, shift=0.3, reduce=reduce)


@pytest.mark.parametrize("reduce", ["row", "col"])
@pytest.mark.parametrize("normalize_x,normalize_w", [(False, False), (True, False), (False, True)])
def test_normalize_flags(reduce, normalize_x, normalize_w):
    x, w, b, labels = make_inputs(k=2, bias=True, seed=3)
    with torch.no_grad():  # unnormalised dot products: keep z moderate
        x.mul_(0.3), w.mul_(0.3)
    check_against_oracle(x, w, b, labels, centers_per_class=2, gamma=0.5, scale=2.0, reduce=reduce,
                         normalize_x=normalize_x, normalize_w=normalize_w)


@pytest.mark.parametrize("reduce", ["row", "col"])
@pytest.mark.parametrize("block_d,num_splits", [(16, 1), (16, 3)])
def test_tiling_overrides(reduce, block_d, num_splits):
    """D streamed in several chunks (40 = 16 + 16 + 8) and one or several programs per streamed axis."""
    x, w, b, labels = make_inputs(k=3, seed=4)
    check_against_oracle(x, w, b, labels, centers_per_class=3, scale=4.0, reduce=reduce,
                         block_d=block_d, num_splits=num_splits)


def test_strided_inputs():
    """Row-strided views (no copy needed) and N < one row tile."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(7, 64, generator=g)[:, 3:43].to(DEVICE).requires_grad_()
    w = torch.randn(17 * 2, 50, generator=g)[:, :40].to(DEVICE).requires_grad_()
    labels = torch.randint(0, 17, (7,), generator=g).to(DEVICE)
    for reduce in ("row", "col"):
        check_against_oracle(x, w, None, labels, centers_per_class=2, scale=3.0, reduce=reduce)


def test_proxies_as_rows():
    """The proxy-repel use: x = the proxies themselves, labels = arange(C) (each proxy leaves itself out)."""
    x, _, _, _ = make_inputs(n=21, k=1, seed=6)
    labels = torch.arange(21, device=DEVICE)
    for reduce in ("row", "col"):
        check_against_oracle(x, x, None, labels, scale=16.0, shift=1.6, reduce=reduce)


def test_fp16():
    x, w, b, labels = make_inputs(k=3, dtype=torch.float16, bias=True, seed=7)
    for reduce in ("row", "col"):
        check_against_oracle(x, w, b, labels, centers_per_class=3, scale=8.0, reduce=reduce)


def test_fp16_dw_in_bounded_launches(monkeypatch):
    """Half-precision W: dW accumulates in fp32 scratch of a bounded size, several launches of class tiles."""
    monkeypatch.setattr(_common, "SCRATCH_BYTES", 2 * 16 * 3 * 40 * 4)  # two class tiles per launch
    x, w, b, labels = make_inputs(k=3, dtype=torch.float16, bias=True, seed=8)
    check_against_oracle(x, w, b, labels, centers_per_class=3, scale=8.0, reduce="row", block_c=16)


@pytest.mark.parametrize("reduce", ["row", "col"])
def test_large_scale_aligned(reduce):
    """scale=64, gamma=0.1 on nearly aligned vectors: z close to 64 everywhere, no overflow."""
    g = torch.Generator().manual_seed(9)
    base = torch.randn(1, 40, generator=g)
    x = (base + 1e-2 * torch.randn(37, 40, generator=g)).to(DEVICE).requires_grad_()
    w = (base + 1e-2 * torch.randn(53 * 3, 40, generator=g)).to(DEVICE).requires_grad_()
    labels = torch.randint(0, 53, (37,), generator=g).to(DEVICE)
    out, grads = check_against_oracle(x, w, None, labels, centers_per_class=3, gamma=0.1, scale=64.0,
                                      shift=6.4, reduce=reduce)
    assert out.min() > 64.0  # every term is near 64 + 6.4, so no term was lost to overflow


def test_empty_lse_gives_minus_inf_and_zero_grad():
    """Col reduce: a class that every row carries has no term; row reduce with C = 1: no row has a term."""
    x, w, b, labels = make_inputs(k=2, bias=True, seed=11)
    labels = torch.zeros_like(labels)  # class 0 is everyone's label: its column has no term
    out, _ = check_against_oracle(x, w, b, labels, centers_per_class=2, scale=4.0, reduce="col")
    assert out[0] == float("-inf") and torch.isfinite(out[1:]).all()
    # Whatever gradient reaches the empty entry (here NaN), it has no term to flow into.
    out = class_lse(x, w, labels, centers_per_class=2, scale=4.0, bias=b, reduce="col")
    up = torch.ones_like(out)
    clean = torch.autograd.grad(out, (x, w, b), up.where(torch.isfinite(out), 0.0), retain_graph=True)
    up[0] = float("nan")
    for gr, ref in zip(torch.autograd.grad(out, (x, w, b), up), clean):
        assert torch.equal(gr, ref)
    x1, w1, b1, labels1 = make_inputs(c=1, k=3, bias=True, seed=12)
    out = class_lse(x1, w1, labels1, centers_per_class=3, bias=b1, reduce="row")
    assert torch.isneginf(out).all()
    grads = torch.autograd.grad(out.sum(), (x1, w1, b1))
    assert all(torch.equal(gr, torch.zeros_like(gr)) for gr in grads)


@pytest.mark.parametrize("reduce", ["row", "col"])
@pytest.mark.parametrize("wanted", ["x", "w"])
def test_partial_requires_grad(reduce, wanted):
    x, w, b, labels = make_inputs(k=3, seed=13)
    (w if wanted == "x" else x).requires_grad_(False)
    check_against_oracle(x, w, b, labels, centers_per_class=3, scale=4.0, reduce=reduce)


class LaunchCounter:
    """Stands in for a kernel: counts `kernel[grid](...)` launches and forwards them."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


def test_col_deterministic_variant(monkeypatch):
    """use_deterministic_algorithms: dX from the atomic-free kernel, bit-identical across runs, same values as the
    default (whose dX comes from atomics in the dW kernel)."""
    from metricloss_kernels.triton import _backward

    dx_kernel = LaunchCounter(_backward._dx_kernel)
    monkeypatch.setattr(_backward, "_dx_kernel", dx_kernel)
    x, w, b, labels = make_inputs(k=3, bias=True, seed=14)
    kw = dict(centers_per_class=3, scale=8.0, bias=b, reduce="col", num_splits=2)
    up = torch.randn(53, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    default = torch.autograd.grad(class_lse(x, w, labels, **kw), (x, w, b), up)
    assert dx_kernel.launches == 0
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = [torch.autograd.grad(class_lse(x, w, labels, **kw), (x, w, b), up) for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(previous)
    assert dx_kernel.launches == 2
    for a, r, d in zip(*runs, default):
        assert torch.equal(a, r)
        torch.testing.assert_close(a, d, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduce", ["row", "col"])
def test_gradcheck_fp64(reduce):
    """Exact gradients: gradcheck on the kernels themselves in float64 (tiny shapes, K = 2, bias)."""
    g = torch.Generator().manual_seed(15)
    x = torch.randn(6, 3, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
    w = torch.randn(5 * 2, 3, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
    b = torch.randn(5, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
    labels = torch.tensor([0, 1, 1, 3, 0, 4], device=DEVICE)
    assert torch.autograd.gradcheck(
        lambda x, w, b: class_lse(x, w, labels, centers_per_class=2, gamma=0.5, scale=2.0, bias=b, reduce=reduce),
        (x, w, b))


def test_availability():
    assert tl_kernels.is_available(DEVICE) and tl_kernels.unavailable_reason(DEVICE) is None


# ------------------------------------------------------------------------ every proxy loss, end to end
# The public functional API with backend="triton" against backend="reference" in float64 on the same values (the
# truth), forward and every gradient under one random upstream gradient. (name, K, kwargs): K = 0 for the polytope
# loss (fixed weights: no proxies, width polytope_dim(C)); bias=True stands for a random [C] bias.
LOSS_CASES = [
    ("proxy_nca_loss", 1, dict(exclude_positive=True)),
    ("proxy_nca_loss", 1, dict(scale=8.0, exclude_positive=False)),
    ("soft_triple_loss", 3, dict(centers_per_class=3)),
    ("mpa_loss", 3, dict(centers_per_class=3, variant="mpa")),
    ("mpa_loss", 3, dict(centers_per_class=3, variant="dw")),
    ("mpa_loss", 3, dict(centers_per_class=3, variant="ap")),
    ("arcface_loss", 1, {}),
    ("cosface_loss", 1, {}),
    ("l2_softmax_loss", 1, dict(bias=True)),
    ("l2_softmax_loss", 1, dict(normalize_weights=True)),
    ("l2_softmax_loss", 1, dict(bias=True, normalize_weights=True)),
    ("regular_polytope_loss", 0, dict(polytope="simplex")),
    ("regular_polytope_loss", 0, dict(polytope="orthoplex")),
    ("regular_polytope_loss", 0, dict(polytope="cube", margin=20.0)),
    ("proxy_anchor_loss", 1, {}),
    ("proxy_repel_loss", 1, dict(variant="proxies")),
    ("proxy_repel_loss", 1, dict(variant="batch")),
]
LOSS_IDS = [name.removesuffix("_loss") + "".join(f"-{a}={v}" for a, v in kw.items() if a != "centers_per_class")
            for name, _, kw in LOSS_CASES]
# (labels, geometry, dtype, tolerance). "aligned": every proxy within ~3 degrees of one direction and each
# embedding within ~3 degrees of a proxy of its class, so every logit is near the (large default) scale: no
# overflow, no NaN. (Closer than that, ArcFace's d sqrt(1 - c^2) / dc ~ 1 / angle amplifies fp32's rounding of the
# target cosine past 1e-3 in the fp32 reference as well: that is conditioning, not the kernels.)
SETTINGS = {
    "random": ("random", "random", torch.float32, 1e-3),
    "one_per_class": ("one_per_class", "random", torch.float32, 1e-3),
    "one_class": ("one_class", "random", torch.float32, 1e-3),
    "aligned": ("random", "aligned", torch.float32, 1e-3),
    "fp16": ("random", "random", torch.float16, 5e-3),
}


def loss_inputs(name, k, kwargs, labels_kind, geometry, dtype, seed, n=37, c=53, d=40):
    """(embeddings, labels, weights or num_classes, kwargs) in `dtype`, leaves requiring grad, on DEVICE."""
    g = torch.Generator().manual_seed(seed)
    labels = {"random": lambda: torch.randint(0, c, (n,), generator=g),
              "one_per_class": lambda: torch.randperm(c, generator=g)[:n],
              "one_class": lambda: torch.full((n,), 3, dtype=torch.long)}[labels_kind]()
    if name == "regular_polytope_loss":
        w = regular_polytope(kwargs["polytope"], c).double()
        d = w.shape[1]
    else:
        w = torch.randn(c * k, d, generator=g, dtype=torch.float64)
    if geometry == "aligned":
        if name != "regular_polytope_loss":
            w = torch.randn(d, generator=g, dtype=torch.float64) + 0.05 * w
        x = F.normalize(w, dim=1)[labels * max(k, 1)] + 1e-2 * torch.randn(n, d, generator=g, dtype=torch.float64)
    else:
        x = torch.randn(n, d, generator=g, dtype=torch.float64)
    x = x.to(DEVICE, dtype).requires_grad_()
    kwargs = dict(kwargs)
    if kwargs.get("bias") is True:
        kwargs["bias"] = torch.randn(c, generator=g, dtype=torch.float64).to(DEVICE, dtype).requires_grad_()
    if name == "regular_polytope_loss":
        return x, labels.to(DEVICE), c, kwargs
    return x, labels.to(DEVICE), w.to(DEVICE, dtype).requires_grad_(), kwargs


def loss_and_grads(name, x, labels, w, kwargs, upstream, backend):
    """The loss through mlk.functional and its gradients w.r.t. every leaf (embeddings, proxies, bias)."""
    loss = getattr(mlk.functional, name)(x, labels, w, **kwargs, backend=backend)
    leaves = [t for t in (x, w, kwargs.get("bias")) if torch.is_tensor(t)]
    return loss, leaves, torch.autograd.grad(loss, leaves, torch.full_like(loss, upstream))


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("name,k,kwargs", LOSS_CASES, ids=LOSS_IDS)
def test_losses_on_triton_match_reference(name, k, kwargs, setting):
    labels_kind, geometry, dtype, rtol = SETTINGS[setting]
    if geometry == "aligned" and name == "proxy_nca_loss":
        kwargs = dict(kwargs, scale=64.0)
    x, labels, w, kwargs = loss_inputs(name, k, kwargs, labels_kind, geometry, dtype, seed=20)
    upstream = 0.5 + torch.rand((), generator=torch.Generator().manual_seed(21)).item()
    loss, leaves, grads = loss_and_grads(name, x, labels, w, kwargs, upstream, "triton")
    # The same values in float64 through the reference.
    ref_x = x.detach().double().requires_grad_()
    ref_w = w.detach().double().requires_grad_() if torch.is_tensor(w) else w
    ref_kwargs = {a: v.detach().double().requires_grad_() if torch.is_tensor(v) else v for a, v in kwargs.items()}
    ref, _, ref_grads = loss_and_grads(name, ref_x, labels, ref_w, ref_kwargs, upstream, "reference")
    assert loss.dtype == dtype and loss.shape == ()
    assert torch.isfinite(loss) and torch.isfinite(ref)
    assert_rel_close(loss.detach(), ref.detach(), rtol, f"{name} loss")
    for what, gr, rg, leaf in zip(("embeddings", "proxies", "bias"), grads, ref_grads, leaves):
        assert gr.dtype == leaf.dtype and gr.shape == leaf.shape, what
        assert torch.isfinite(gr).all(), f"{name} d{what}: non-finite"
        assert_rel_close(gr, rg, rtol, f"{name} d{what}")


def largest_allocation(fn) -> int:
    """CPU: the largest single torch allocation during fn() (tests/test_chunked.py's profiler helper). CUDA: the
    peak of extra allocated memory, an upper bound on it (all live temporaries together)."""
    if DEVICE == "cpu":
        return _largest_allocation(fn)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


@pytest.mark.parametrize("name,n,c,k", [("soft_triple_loss", 128, 2000, 4), ("proxy_anchor_loss", 128, 8000, 1)])
def test_no_n_by_c_allocation(name, n, c, k):
    """Streaming memory: at sizes where the N x C logits dwarf everything else (D = 4: W and dW are C*K*4*4 bytes,
    at most a quarter of N*C*4/2), no single torch allocation of the Triton loss's forward + backward reaches
    N*C*4/2 bytes, while the reference's does (so the check can fail). Tiles larger than the interpreter's default
    keep the program count low; the launcher's buffers (split partials, dX splits, dW scratch) do not grow with
    them. On a GPU the sizes are 8 x 10 times larger, so that the peak of all temporaries together stays far below
    the limit too."""
    if DEVICE == "cuda":
        n, c = 8 * n, 10 * c
    g = torch.Generator().manual_seed(30)
    x = torch.randn(n, 4, generator=g).to(DEVICE).requires_grad_()
    w = torch.randn(c * k, 4, generator=g).to(DEVICE).requires_grad_()
    labels = torch.randint(0, c, (n,), generator=g).to(DEVICE)
    kw = {"centers_per_class": k} if k > 1 else {}
    limit = n * c * 4 // 2
    lse = functools.partial(class_lse, block_n=64, block_c=128)
    triton_fn = functools.partial(getattr(fused, name), lse=lse, **kw)
    reference_fn = functools.partial(getattr(mlk.functional, name), backend="reference", **kw)
    assert largest_allocation(_forward_backward(reference_fn, x, labels, w)) >= limit
    assert largest_allocation(_forward_backward(triton_fn, x, labels, w)) < limit


def compile_for_hopper():
    """Compile every kernel for sm_90a (no GPU needed) as a launch specialises it: unit strides along D, pointers,
    row strides and D divisible by 16, the default GPU tiles; fail unless the dots lower to wgmma. The interpreter
    accepts programs the compiler rejects, so this is CI's only check of the GPU code path."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget

    from metricloss_kernels.triton import _backward, _common, lse

    assert not _common.INTERPRET
    ptr_dtype = {"labels_ptr": "*i64", "x_ptr": None, "w_ptr": None, "bias_ptr": None, "dw_ptr": None,
                 "dbias_ptr": None}
    # bf16 with K = 3 (online softmax over proxies), fp32 as TF32 with K = 1.
    for op, dtype, tl_dtype, k in (("bf16", torch.bfloat16, tl.bfloat16, 3), ("fp32", torch.float32, tl.float32, 1)):
        cfg = _common.tile_config(torch.empty(64, 512, dtype=dtype))
        meta = dict(K=k, HAS_BIAS=True, NORM_X=True, NORM_W=True, ACC=tl.float32, OP=tl_dtype,
                    PRECISION="tf32", BLOCK_N=cfg.block_n, BLOCK_C=cfg.block_c, BLOCK_D=cfg.block_d)
        kernels = [(lse._lse_fwd_kernel, dict(meta, ROW_REDUCE=True)), (lse._lse_fwd_kernel, dict(meta, ROW_REDUCE=False)),
                   (_backward._dx_kernel, dict(meta, ROW_REDUCE=True)),
                   (_backward._dx_kernel, dict(meta, ROW_REDUCE=False)),
                   (_backward._dw_kernel, dict(meta, ROW_REDUCE=False, DX_ATOMIC=True, ACC_IS_OUT=op == "fp32")),
                   (_backward._dw_kernel, dict(meta, ROW_REDUCE=True, DX_ATOMIC=False, ACC_IS_OUT=op == "fp32"))]
        for fn, const in kernels:
            const = dict(const, **{a: 1 for a in fn.arg_names if a.startswith("stride_") and a.endswith("d")})
            sig = {a: "constexpr" if a in const else
                   (ptr_dtype.get(a) or "*" + op) if a in ptr_dtype else
                   "*fp32" if a.endswith("_ptr") else
                   "fp32" if a in ("scale", "shift", "inv_gamma") else "i32" for a in fn.arg_names}
            div = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
                   if a not in const and (a.endswith("_ptr") or a.startswith("stride_") or a == "D")}
            src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=const, attrs=div)
            compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                      options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
            assert "wgmma" in compiled.asm["ptx"], f"{fn.__name__} ({op}): no wgmma"
            print(f"{fn.__name__} {op} K={k}: sm_90a ok, {compiled.metadata.shared} B shared memory")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA tests compile and run the kernels")
def test_kernels_compile_for_hopper():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    if "No module named 'triton.backends.nvidia" in run.stderr:
        pytest.skip("triton was built without its NVIDIA backend")
    assert run.returncode == 0, run.stdout + run.stderr[-4000:]


# ---------------------------------------------------------------------------------------------------- GPU only

@cuda_only
@pytest.mark.parametrize("reduce", ["row", "col"])
@pytest.mark.parametrize("k", [1, 10])
def test_cuda_bf16_large(reduce, k):
    x, w, b, labels = make_inputs(n=1024, c=2000, k=k, d=512, dtype=torch.bfloat16, bias=True, seed=16)
    check_against_oracle(x, w, b, labels, centers_per_class=k, scale=32.0, reduce=reduce)


@cuda_only
@pytest.mark.parametrize("reduce", ["row", "col"])
def test_cuda_fp32_large_awkward(reduce):
    x, w, b, labels = make_inputs(n=1000, c=3001, k=3, d=200, seed=17)
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # exact fp32 dots (the kernels follow torch's setting)
    try:
        check_against_oracle(x, w, b, labels, centers_per_class=3, scale=64.0, reduce=reduce)
    finally:
        torch.set_float32_matmul_precision(precision)


if __name__ == "__main__":
    compile_for_hopper()
