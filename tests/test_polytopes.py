"""Regular-polytope weights and margins (metricloss_kernels.polytopes) against docs/formulas.md."""
import math

import pytest
import torch

from metricloss_kernels.polytopes import polytope_dim, polytope_margin, regular_polytope

SIZES = [2, 3, 4, 5, 7, 8, 9, 16, 53]


def _hand_built(kind, num_classes):
    """The vertex lists of docs/formulas.md written out coordinate by coordinate (float64, unnormalised)."""
    if kind == "simplex":
        d = num_classes - 1
        a = (1 - math.sqrt(d + 1)) / d
        rows = [[1.0 if j == t else 0.0 for j in range(d)] for t in range(d)] + [[a] * d]
        centroid = [sum(r[j] for r in rows) / len(rows) for j in range(d)]
        rows = [[r[j] - centroid[j] for j in range(d)] for r in rows]
    elif kind == "orthoplex":
        d = math.ceil(num_classes / 2)
        rows = [[sign * (1.0 if j == t else 0.0) for j in range(d)] for sign in (1, -1) for t in range(d)]
    else:
        d = math.ceil(math.log2(num_classes))
        rows = [[-1.0 if (t >> j) & 1 else 1.0 for j in range(d)] for t in range(2 ** d)]
    rows = rows[:num_classes]
    return [[v / math.sqrt(sum(u * u for u in r)) for v in r] for r in rows]


@pytest.mark.parametrize("kind", ["simplex", "orthoplex", "cube"])
@pytest.mark.parametrize("num_classes", SIZES)
def test_matches_hand_built_vertices(kind, num_classes):
    w = regular_polytope(kind, num_classes)
    assert w.dtype == torch.float32
    expected = torch.tensor(_hand_built(kind, num_classes), dtype=torch.float64)
    assert w.shape == expected.shape == (num_classes, polytope_dim(kind, num_classes))
    torch.testing.assert_close(w.double(), expected, rtol=0, atol=1e-7)


@pytest.mark.parametrize("kind", ["simplex", "orthoplex", "cube"])
@pytest.mark.parametrize("num_classes", SIZES)
def test_unit_rows_and_neighbour_angle_is_phi(kind, num_classes):
    w = regular_polytope(kind, num_classes).double()
    torch.testing.assert_close(w.norm(dim=1), torch.ones(num_classes, dtype=torch.float64), rtol=0, atol=1e-7)
    gram = (w @ w.T).clamp(-1, 1)
    off_diag = ~torch.eye(num_classes, dtype=torch.bool)
    min_angle = torch.acos(gram[off_diag]).min().item()
    phi = polytope_margin(kind, w.shape[1])
    if kind == "orthoplex" and num_classes == 2:
        # docs/formulas.md gives pi/2 for every orthoplex; the two vertices +e1, -e1 of d = 1 are antipodal.
        assert phi == pytest.approx(math.pi / 2) and min_angle == pytest.approx(math.pi, abs=1e-6)
    else:
        assert min_angle == pytest.approx(phi, abs=1e-6)


def test_simplex_is_regular_and_centred():
    w = regular_polytope("simplex", 11).double()
    gram = w @ w.T
    off_diag = gram[~torch.eye(11, dtype=torch.bool)]
    torch.testing.assert_close(off_diag, torch.full_like(off_diag, -1 / 10), rtol=0, atol=1e-7)
    torch.testing.assert_close(w.sum(dim=0), torch.zeros(10, dtype=torch.float64), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind,num_classes,d", [("simplex", 53, 52), ("orthoplex", 53, 27), ("orthoplex", 54, 27),
                                                ("cube", 53, 6), ("cube", 64, 6), ("cube", 65, 7), ("cube", 2, 1)])
def test_dimensions(kind, num_classes, d):
    assert regular_polytope(kind, num_classes).shape == (num_classes, d)


def test_margins():
    assert polytope_margin("simplex", 1) == pytest.approx(math.pi)
    assert polytope_margin("simplex", 3) == pytest.approx(math.acos(-1 / 3))
    assert polytope_margin("orthoplex", 5) == pytest.approx(math.pi / 2)
    assert polytope_margin("cube", 2) == pytest.approx(math.pi / 2)
    assert polytope_margin("cube", 4) == pytest.approx(math.acos(0.5))


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="kind"):
        regular_polytope("hypercube", 4)
    with pytest.raises(ValueError, match="num_classes"):
        regular_polytope("simplex", 1)
    with pytest.raises(ValueError, match="kind"):
        polytope_margin("tetrahedron", 3)
    with pytest.raises(ValueError, match=r"\bd\b"):
        polytope_margin("cube", 0)
