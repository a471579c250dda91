"""Posterior entropy and information (aebm.posterior_entropy, aebm.information, experiments/information.py)
against the Gaussian field's closed form, computed from dense matrices: 16x16 images, float32 energies."""

import math
import os

import pytest
import torch

import aebm
import covariances as cv
import data
import sample
from experiments import information as inf

SHAPE = (1, 1, 16, 16)
D = 256


@pytest.fixture(scope="module")
def prior():
    return data.GaussianField(16, 1).prior


def f32(prob):
    return cv.Degradation(prob.a.float(), prob.basis, prob.sigma_n)


def test_dense_operator_is_A(prior):
    x = prior.sample(3, torch.Generator().manual_seed(0))
    for prob in (cv.blur_problem(SHAPE, 1.5, 0.02, "fft", torch.float64), cv.sr_problem(SHAPE, 2, 0.02, "dct", torch.float64),
                 cv.inpainting_problem(cv.box_mask(SHAPE, 8), 1, 0.01, torch.float64)):
        A = inf.dense_operator(prob)
        assert torch.allclose((A @ x.flatten(1).T).T.reshape(x.shape), inf.batched(prob, 3).A(x), atol=1e-12)


@pytest.mark.parametrize("task", ["box 1/4 missing", "blur b=1", "SR x2", "denoise 0.05"])
def test_information_from_evidence_matches_closed_form(prior, task):
    """I = E[-log p(y_obs)] - H[y_obs | x] from the exact energy in float32, over 512 observations: within 2 %
    (and 3 standard errors) of 1/2 log det(I + A C A^T / sigma^2)."""
    assert_information_matches(prior, SHAPE, task, 512, seed=1)


def assert_information_matches(prior, shape, task, n, seed):
    """The evidence route in float32 over n observations against the dense closed form: within 2 % and 3 s.e."""
    prob = dict(inf.field_tasks(shape))[task]
    x = prior.sample(n, torch.Generator().manual_seed(seed))
    probs = inf.batched(prob, n)
    y_obs = probs.measure(x, torch.Generator().manual_seed(seed + 1)).float()
    I, err = aebm.information(prior, y_obs, f32(probs), prior.mean)
    exact = inf.exact_entropies(prior.C_dense, prob)["I"]
    assert abs(I - exact) < 0.02 * exact and abs(I - exact) < 3 * err, (I, err, exact)


def test_posterior_entropy_from_exact_draws(prior):
    """Exact posterior draws scored by Bayes' rule with the normalized density: the closed-form H[x | y]
    within 3 standard errors, and the error is the chi-square's, sqrt(d / 2) / sqrt(n); the NLL of prior
    draws gives H[x]."""
    prob = dict(inf.field_tasks(SHAPE))["half missing"]
    x0 = prior.sample(1, torch.Generator().manual_seed(3))
    y_obs = prob.measure(x0, torch.Generator().manual_seed(4))
    n = 128
    draws = inf.exact_posterior_samples(prior.C_dense, prior.mean, prob, y_obs, n, torch.Generator().manual_seed(5))
    y, cov = prob.to_denoising(y_obs, prior.mean)
    H, err = inf.entropy_of(prior, draws, y, cov, torch.float32)
    exact = inf.exact_entropies(prior.C_dense, prob)
    assert abs(H - exact["H_post"]) < 3 * err, (H, err, exact)
    assert 0.7 < err / (math.sqrt(D / 2) / math.sqrt(n)) < 1.3
    H_x, err_x = inf.nll(prior, prior.sample(n, torch.Generator().manual_seed(6)))
    assert abs(H_x - exact["H_x"]) < 3 * err_x


def test_entropy_of_a_too_wide_sampler_is_biased_as_predicted(prior):
    """The pitfall: samples from a posterior whose covariance is alpha times the true one give
    -E log p(x | y) = H[x | y] + d (alpha - 1) / 2, a bias no number of samples removes."""
    prob = dict(inf.field_tasks(SHAPE))["blur b=1"]
    x0 = prior.sample(1, torch.Generator().manual_seed(7))
    y_obs = prob.measure(x0, torch.Generator().manual_seed(8))
    draws = inf.exact_posterior_samples(prior.C_dense, prior.mean, prob, y_obs, 256, torch.Generator().manual_seed(9))
    y, cov = prob.to_denoising(y_obs, prior.mean)
    m = prior.posterior_mean(y, cov)
    alpha = 1.2
    H, err = inf.entropy_of(prior, m + math.sqrt(alpha) * (draws - m), y, cov, torch.float32)
    exact = inf.exact_entropies(prior.C_dense, prob)["H_post"]
    assert abs(H - (exact + D * (alpha - 1) / 2)) < 3 * err * math.sqrt(alpha), (H, exact)


def test_posterior_entropy_from_the_sampler_float32(prior):
    """The project's reverse diffusion with MALA correctors on the exact energy in float32: H[x | y] under
    blur within 2 % of the closed form."""
    prob = dict(inf.field_tasks(SHAPE))["blur b=1"]
    x0 = prior.sample(1, torch.Generator().manual_seed(10))
    y_obs = prob.measure(x0, torch.Generator().manual_seed(11))
    f32 = torch.float32  # the exact energy computes in its inputs' dtype on this (diagonal) path
    xs, y, cov, _, nfe = inf.sampler_draws(prior, prob, y_obs, 128, 150, 2, torch.Generator().manual_seed(12), f32)
    H, err = inf.entropy_of(prior, xs, y, cov, f32)
    exact = inf.exact_entropies(prior.C_dense, prob)["H_post"]
    assert abs(H - exact) < 0.02 * abs(exact), (H, err, exact)
    assert nfe == 1 + 150 * 3


def test_design_with_the_exact_prior_ranks_as_the_closed_form(prior, tmp_path):
    """Candidates of equal photons ranked by the evidence-based information of the exact energy agree with
    the dense closed form: same order, same top choice (two independent computations)."""
    x = prior.sample(64, torch.Generator().manual_seed(13))
    rows = inf.design(prior, x, inf.design_candidates(SHAPE, "fft"), prior=prior, restore=False)
    summary = inf.summarize_design(rows, "exact")
    assert summary["rank_exact"] > 0.95 and summary["top_is_exact"]
    assert len({round(r["I_exact"]) for r in rows}) == len(rows)  # the candidates really differ
    path = inf.plot_design(str(tmp_path / "design.png"), {"field, exact prior": (rows, x[0].numel())})
    assert sorted(os.listdir(tmp_path)) == ["design.png"]  # one figure, its two panels joined and removed


@pytest.mark.parametrize("task", ["blur b=2", "SR x4"])
def test_information_at_32x32_in_float32(task):
    """The same check at the size users run, 32x32 (d = 1024): the evidence route in float32 against the dense
    closed form within 2 %."""
    assert_information_matches(data.GaussianField(32, 1).prior, (1, 1, 32, 32), task, 256, seed=14)
