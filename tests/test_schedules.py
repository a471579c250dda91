"""The adaptive schedule against the geometric one by number of measurements (experiments/schedules.py):
equal evaluation budgets, and the comparison's references on the exact prior of an 8x8 field."""

import pytest
import torch

import data
from experiments import schedules as sc


def test_both_schedules_get_the_same_number_of_evaluations():
    assert sc.levels_at_equal_nfe(150) == (150, 100, 301)
    with pytest.raises(ValueError, match="divisible by 3"):
        sc.levels_at_equal_nfe(100)


def test_exact_prior_samples_are_calibrated_against_bayes():
    """With the exact energy both schedules run at equal NFE (asserted inside), the one-shot posterior mean is
    the Bayes estimate (ratio 1) and a sample's error is about twice Bayes' (its expectation is exactly 2)."""
    field = data.GaussianField(8, 1)
    x = field.prior.sample(16, torch.Generator().manual_seed(0))
    row = sc.compare(field.prior, field.prior, field.prior, x, rho=0.25, levels=60, k=4)
    assert row["nfe"] == 121
    assert abs(row["mean"] - 1) < 1e-6 and abs(row["wiener"] - 1) < 1e-6
    assert 1.5 < row["geometric_sample"] < 2.6 and 1.05 < row["geometric_average"] < 1.5, row
    assert 1.5 < row["adaptive_sample"] < 2.6, row
