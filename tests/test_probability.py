"""Images ranked by probability (experiments/probability.py): the measures it ranks by, against
independent computations on the Gaussian field and a model-free complexity measure."""

import math

import torch

import covariances as cv
import data
from experiments import probability as pr


def test_png_size_measures_complexity():
    """A flat image compresses to almost nothing, white noise to about its 8 bits per value."""
    flat = torch.full((1, 3, 32, 32), 0.5)
    noise = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    small, large = pr.png_bits_per_dim(torch.cat([flat, noise]))
    assert small < 0.5 and 7.0 < large < 9.0


def test_bits_per_dim_of_the_field_is_its_closed_form_density():
    """bits/dim under the exact energy (the fft path M10 takes) against torch.distributions on the dense
    covariance, image by image, and the ranking follows."""
    field = data.GaussianField(8, 1)
    x = field.prior.sample(16, torch.Generator().manual_seed(1))
    dense = torch.distributions.MultivariateNormal(torch.full((64,), 0.5, dtype=torch.float64),
                                                   field.prior.C_dense + 1e-6 * torch.eye(64, dtype=torch.float64))
    ref = -dense.log_prob(x.flatten(1)) / (64 * math.log(2)) + 8
    bpd = pr.bits_per_dim(field.prior, x)
    torch.testing.assert_close(bpd, ref, atol=1e-9, rtol=0)
    assert pr.spearman(bpd, ref) > 0.999


def test_posterior_samples_are_sorted_by_their_closed_form_posterior_density():
    """Samples of the exact prior's posterior come back from most to least probable, and their log posterior
    (Bayes' rule with normalized energies) is the dense Gaussian posterior's log density."""
    field = data.GaussianField(8, 1)
    prior, C = field.prior, field.prior.C_dense
    x = prior.sample(1, torch.Generator().manual_seed(2))
    prob = cv.blur_problem(x.shape, 1.0, 0.05, "fft", torch.float64)
    y_obs, xs, lp = pr.sorted_posterior_samples(prior, x, prob, n=6, levels=60)
    assert (lp[:-1] >= lp[1:]).all()
    y, cov = prob.to_denoising(y_obs, prior.mean)
    S = cov.dense()[0].double()
    K = C + S
    m = 0.5 + C @ torch.linalg.solve(K, y.flatten() - 0.5)
    C_post = C - C @ torch.linalg.solve(K, C)
    ref = torch.distributions.MultivariateNormal(m, C_post + 1e-6 * torch.eye(64, dtype=torch.float64)).log_prob(xs.flatten(1).double())
    assert (lp - ref).abs().max() < 0.1, (lp, ref)
