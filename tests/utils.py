"""Helpers shared by the test files."""
import itertools
import math

import torch
from torch.profiler import ProfilerActivity, profile

# Max error of a backend against the reference on the same values, relative to the largest |expected| entry, by the
# inputs' dtype (half precision is computed in fp32: its results differ by their final rounding).
TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}


def proxy_inputs(n, c, k, d, *, seed=0, dtype=torch.float64, w_dtype=None, bias=False, labels=None, num_labels=None,
                 device="cpu", requires_grad=False):
    """A proxy-loss problem: embeddings x [n, d], proxies w [c * k, d] (class-major), a bias [c] (or None) and labels
    [n] in [0, num_labels or c) unless given; drawn in float64 from one generator in that order, then cast (w to
    w_dtype, default dtype) and moved to device."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(c * k, d, generator=g, dtype=torch.float64)
    b = torch.randn(c, generator=g, dtype=torch.float64) if bias else None
    if labels is None:
        labels = torch.randint(0, num_labels or c, (n,), generator=g)
    x, w = x.to(device, dtype), w.to(device, w_dtype or dtype)
    b = b.to(device, dtype) if bias else None
    leaves = [t.requires_grad_(requires_grad) for t in (x, w, b) if t is not None]
    return leaves[0], leaves[1], b, labels.to(device)


def make_batch(n=37, d=40, c=9, seed=0, dtype=torch.float64):
    """Random embeddings [n, d] and labels [n] in [0, c); the last sample gets a class of its own."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    y = torch.randint(0, c, (n,), generator=g)
    y[-1] = c
    return x, y


def assert_close(actual, expected, rtol, what="", floor=1e-3):
    """Same shape; NaN, +inf and -inf in the same places (each kind separately: NaN for an infinity is a
    mismatch); max |actual - expected| over the finite entries at most rtol * max(floor, max |expected|), so
    near-zero entries of a gradient need no relative match of their own (floor=1 for a loss: its rounding error
    follows its logits, O(1) or more, not its value, which may be ~0)."""
    assert actual.shape == expected.shape, what
    for kind in (torch.isnan, torch.isposinf, torch.isneginf):
        assert torch.equal(kind(actual), kind(expected)), f"{what}: {kind.__name__} differs"
    fin = torch.isfinite(expected)
    if not fin.any():
        return
    err = (actual.double()[fin] - expected.double()[fin]).abs().max().item()
    scale = expected.double()[fin].abs().max().item()
    assert err <= rtol * max(scale, floor), f"{what}: max error {err:.3g} vs scale {scale:.3g} (rtol {rtol:g})"


def largest_allocation(fn) -> int:
    """CPU: the largest single torch allocation while fn() runs (profiler memory events; frees are negative).
    CUDA: the peak of extra allocated memory, an upper bound on it (all live temporaries together)."""
    return _memory_use(fn, peak=False)


def peak_allocation(fn) -> int:
    """The most memory that the allocations made while fn() runs hold at once (CPU: the running sum of the
    profiler's memory events in time order, frees negative; CUDA: the peak of extra allocated memory)."""
    return _memory_use(fn, peak=True)


def _memory_use(fn, peak: bool) -> int:
    if not torch.cuda.is_available():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                        key=lambda e: e.start_ns())
        sizes = [e.nbytes() for e in events]
        return max(itertools.accumulate(sizes)) if peak else max(sizes)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def brute_force_scores(queries, reference, metric, exclude_self):
    """kNN oracle: the full [Q, R] score matrix in float64 by the textbook formulas, larger is better (euclidean:
    minus the distance, from the differences); -inf on the diagonal when the queries are their own reference."""
    q, r = queries.double(), reference.double()
    if metric == "euclidean":
        scores = -torch.cdist(q, r, compute_mode="donot_use_mm_for_euclid_dist")
    elif metric == "cosine":
        scores = torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(r, dim=1).T
    else:
        scores = q @ r.T
    if exclude_self:
        scores.fill_diagonal_(-math.inf)
    return scores
