"""The test helpers themselves (tests/utils.py): a comparison that cannot fail would make every test using it void."""
import math

import pytest
import torch

from utils import assert_close  # noqa: E402  (tests/ is on sys.path)


@pytest.mark.parametrize("actual,expected", [
    ([math.nan, 1.0], [-math.inf, 1.0]),
    ([math.inf, 1.0], [math.nan, 1.0]),
    ([math.inf, 1.0], [-math.inf, 1.0]),
    ([math.nan, 1.0], [0.0, 1.0]),
    ([1.0, 2.0], [1.0, 2.1]),
], ids=["nan-vs-neginf", "posinf-vs-nan", "posinf-vs-neginf", "nan-vs-finite", "finite-error"])
def test_assert_close_rejects(actual, expected):
    with pytest.raises(AssertionError):
        assert_close(torch.tensor(actual), torch.tensor(expected), 1e-6)


def test_assert_close_accepts_equal_non_finite_entries_and_small_errors():
    values = torch.tensor([math.nan, math.inf, -math.inf, 1.0, -2.0])
    assert_close(values + torch.tensor([0, 0, 0, 1e-9, 0]), values, 1e-6)
    assert_close(torch.tensor([math.nan, math.inf]), torch.tensor([math.nan, math.inf]), 1e-6)  # nothing finite
    assert_close(torch.tensor([1, 2]), torch.tensor([1, 2]), 0)  # integer tensors
