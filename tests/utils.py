"""Helpers shared by the test files."""
import torch
from torch.profiler import ProfilerActivity, profile


def make_batch(n=37, d=40, c=9, seed=0, dtype=torch.float64):
    """Random embeddings [n, d] and labels [n] in [0, c); the last sample gets a class of its own."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    y = torch.randint(0, c, (n,), generator=g)
    y[-1] = c
    return x, y


def assert_close(actual, expected, rtol, what=""):
    """Same shape; NaN, +inf and -inf in the same places (each kind separately: NaN for an infinity is a
    mismatch); max |actual - expected| over the finite entries at most rtol * max(1e-3, max |expected|), so near-zero
    entries of a gradient need no relative match of their own."""
    assert actual.shape == expected.shape, what
    for kind in (torch.isnan, torch.isposinf, torch.isneginf):
        assert torch.equal(kind(actual), kind(expected)), f"{what}: {kind.__name__} differs"
    fin = torch.isfinite(expected)
    if not fin.any():
        return
    err = (actual.double()[fin] - expected.double()[fin]).abs().max().item()
    scale = expected.double()[fin].abs().max().item()
    assert err <= rtol * max(scale, 1e-3), f"{what}: max error {err:.3g} vs scale {scale:.3g} (rtol {rtol:g})"


def largest_allocation(fn) -> int:
    """CPU: the largest single torch allocation while fn() runs (profiler memory events; frees are negative).
    CUDA: the peak of extra allocated memory, an upper bound on it (all live temporaries together)."""
    if not torch.cuda.is_available():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        return max(e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base
