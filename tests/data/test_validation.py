"""Tests for rlhfjax.data.validation: what each check accepts and rejects, by name."""

import numpy as np
import pytest

from rlhfjax.data.validation import check_int, check_number


@pytest.mark.parametrize("value", [0, 3, np.int64(2)])
def test_check_int_accepts(value):
  check_int(value, "n", minimum=0)


@pytest.mark.parametrize("value", [-1, True, False, 2.0, "3", None])
def test_check_int_rejects_naming_the_key(value):
  with pytest.raises(ValueError, match=r"n must be an int >= 0"):
    check_int(value, "n", minimum=0)


@pytest.mark.parametrize("value", [0.0, 1, 0.5, np.float32(1.0)])
def test_check_number_accepts(value):
  check_number(value, "rate", low=0.0, high=1.0)


@pytest.mark.parametrize("value,low,high", [
    (1.5, 0.0, 1.0), (-0.1, 0.0, 1.0), (float("nan"), 0.0, 1.0),
    (float("inf"), -np.inf, np.inf),  # finite is required even where the range is unbounded
    (float("inf"), 0.0, np.inf), (True, 0.0, 1.0), ("0.5", 0.0, 1.0), (None, 0.0, 1.0),
])
def test_check_number_rejects_naming_the_key(value, low, high):
  with pytest.raises(ValueError, match="rate must be a finite number"):
    check_number(value, "rate", low=low, high=high)
