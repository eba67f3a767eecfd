"""unit_range and unit_bounce (metricloss_kernels/normalize.py) against docs/formulas.md."""
import pytest
import torch

from metricloss_kernels.normalize import unit_bounce, unit_range

F64 = torch.float64


def directions(n=7, d=5, seed=0):
    u = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return u / u.norm(dim=1, keepdim=True)


def triangle_loop(t):
    """T from its piecewise definition on [0, 4], extended by its period 4."""
    while t >= 4.0:
        t -= 4.0
    if t <= 1.0:
        return t
    if t <= 3.0:
        return 2.0 - t
    return t - 4.0


# ---------------------------------------------------------------- unit_range
@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_unit_range_inside_and_outside(scale):
    u = directions()
    r = torch.tensor([0.1, 0.5, 0.99, 1.01, 2.0, 7.0, 40.0], dtype=F64)[:, None] * scale
    out = unit_range(u * r, scale)
    for i in range(len(r)):
        if r[i] < scale:
            torch.testing.assert_close(out[i], u[i] * r[i], rtol=0, atol=0)
        else:
            torch.testing.assert_close(out[i], u[i] * scale, rtol=1e-14, atol=1e-14)


def test_unit_range_zero_and_gradcheck():
    x = torch.zeros(2, 4, dtype=F64, requires_grad=True)
    out = unit_range(x, 1.5)
    out.sum().backward()
    assert torch.equal(out, torch.zeros_like(out)) and torch.equal(x.grad, torch.ones_like(x))
    u = directions(6, 4, seed=1)
    y = (u * torch.tensor([0.3, 0.8, 1.4, 2.0, 3.3, 9.0], dtype=F64)[:, None]).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: unit_range(z, 1.2), (y,))


def test_unit_range_batched_shape_and_half():
    x = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(2)) * 3
    out = unit_range(x)
    assert out.shape == x.shape
    assert (out.norm(dim=-1) <= 1 + 1e-6).all()
    outh = unit_range(x.half())
    assert outh.dtype == torch.float16
    torch.testing.assert_close(outh.float(), unit_range(x.half().float()), rtol=1e-3, atol=1e-3)


# ---------------------------------------------------------------- unit_bounce
@pytest.mark.parametrize("scale", [1.0, 0.7])
def test_unit_bounce_matches_piecewise_definition(scale):
    u = directions(1, 6, seed=3)[0]
    for t in torch.linspace(0.0, 9.7, 389, dtype=F64).tolist():
        out = unit_bounce(u * (t * scale), scale)
        torch.testing.assert_close(out, scale * triangle_loop(t) * u, rtol=1e-12, atol=1e-12)


def test_unit_bounce_turning_points_and_crossings():
    s = 1.3
    u = directions(1, 3, seed=4)[0]
    f = lambda t: unit_bounce(u * (t * s), s)  # noqa: E731
    for t, sign in ((1.0, 1), (3.0, -1), (5.0, 1)):  # on the sphere, on alternating sides
        torch.testing.assert_close(f(t), sign * s * u, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(f(2.0), torch.zeros(3, dtype=F64), rtol=0, atol=1e-12)  # T(2) = 0: the centre
    torch.testing.assert_close(f(4.0), torch.zeros(3, dtype=F64), rtol=0, atol=1e-12)  # T(4) = 0: the centre
    # Around t = 4 the direction flips: opposite side of the centre before, the original side after.
    assert float(f(3.9) @ u) < 0 and float(f(4.1) @ u) > 0
    assert float(f(1.9) @ u) > 0 and float(f(2.1) @ u) < 0


def test_unit_bounce_continuity():
    u = directions(1, 4, seed=5)[0]
    for t in (1.0, 2.0, 3.0, 4.0, 5.0):
        for delta in (1e-4, 1e-7):
            a, b = unit_bounce(u * (t - delta)), unit_bounce(u * (t + delta))
            assert float((a - b).norm()) <= 2.5 * delta


def test_unit_bounce_zero_and_gradients():
    x = torch.zeros(2, 3, dtype=F64, requires_grad=True)
    out = unit_bounce(x, 2.0)
    out.sum().backward()
    assert torch.equal(out, torch.zeros_like(out)) and torch.equal(x.grad, torch.ones_like(x))
    # Away from the kinks (t = 1, 3, 5), in every segment, the exact derivative through ||x||.
    u = directions(8, 4, seed=6)
    t = torch.tensor([0.4, 1.5, 2.2, 2.9, 3.3, 4.6, 5.8, 7.2], dtype=F64)[:, None]
    y = (u * t * 1.7).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: unit_bounce(z, 1.7), (y,))


def test_unit_bounce_jacobian_closed_form():
    """f(x) = s T(r/s) x / r: J = g I + g'(r) x xᵀ / r with g = s T(r/s) / r, outside the ball."""
    s = 1.1
    x = directions(1, 5, seed=7)[0] * 2.4 * s  # t = 2.4, T = 2 - t, T' = -1
    r = float(x.norm())
    g = s * (2 - r / s) / r
    dg = -1.0 / r - s * (2 - r / s) / r ** 2
    expected = g * torch.eye(5, dtype=F64) + dg * torch.outer(x, x) / r
    jac = torch.autograd.functional.jacobian(lambda z: unit_bounce(z, s), x)
    torch.testing.assert_close(jac, expected, rtol=1e-12, atol=1e-12)


def test_unit_bounce_half():
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(8)) * 2
    xh = x.half().requires_grad_(True)
    out = unit_bounce(xh)
    assert out.dtype == torch.float16
    out.sum().backward()
    assert xh.grad.dtype == torch.float16
    torch.testing.assert_close(out.float(), unit_bounce(x.half().float()), rtol=1e-3, atol=1e-3)
