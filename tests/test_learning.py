"""experiments/learning.py's blind-deblurring accuracy against known answers: the exact prior of the
Gaussian field (which the argmin of its normalized energy should get right nearly always at these
noise levels), and the same prior with a normalization error of the sign the learned models show
(docs/results.md §1: the energy too low at narrow blurs), which must lose accuracy."""

import torch

import aebm
import covariances as cv
import data
from experiments.learning import blind_deblurring_accuracy


class Tilted:
    """The exact energy plus alpha nats per coordinate times the mean log-variance (alpha times the sum of
    log s): lower for smaller variances, i.e. for narrower blurs at a given noise, like the learned
    models' offsets."""

    def __init__(self, prior, alpha):
        self.prior, self.alpha, self.mean = prior, alpha, prior.mean

    def energy_z(self, z, cov):
        return self.prior.energy_z(z, cov) + self.alpha * aebm.sum_coords(cov.s.double().clamp(max=1e3).log())


def test_blind_deblurring_accuracy_exact_prior_and_a_misnormalized_one():
    ds = data.GaussianField(16, 1)
    x = ds.get_batch(8, torch.Generator().manual_seed(0))
    exact = blind_deblurring_accuracy(ds.prior, x, "fft")
    tilted = blind_deblurring_accuracy(Tilted(ds.prior, 0.05), x, "fft")
    assert exact >= 0.9, exact
    assert tilted < exact - 0.2, (tilted, exact)


def test_inpainting_split_matches_the_exact_posterior_variance_of_a_gaussian_field():
    """For the exact prior of a Gaussian field, the posterior mean's squared error in the hole and on the
    observed pixels must average to the posterior covariance's diagonal there (closed form, M9); a worse
    estimator (the prior of another spectrum) must be worse in the hole; and more hole variance, less
    information: the error in the hole grows with s_hole."""
    from experiments.learning import inpainting_split

    ds = data.GaussianField(16, 1)
    other = data.GaussianField(16, 1, alpha=1.0).prior
    x = ds.get_batch(48, torch.Generator().manual_seed(1234)).double()  # not the noise's seed (0): independent
    s_holes = (1e-1, 1e8)
    res = inpainting_split(ds.prior, other, x, s_holes=s_holes, sigma=0.05)
    missing = cv.box_mask((1, 1, 16, 16), 8)
    hole = missing.flatten()
    for s_hole in s_holes:
        cov = cv.mask_covariance(missing, s_hole, 0.05 ** 2, 1, torch.float64)
        var = ds.prior.posterior_cov(cov)[0].diagonal()
        mse_hole, mse_obs = res[s_hole]["model"]
        assert abs(mse_hole / var[hole].mean().item() - 1) < 0.15, (s_hole, mse_hole, var[hole].mean().item())
        assert abs(mse_obs / var[~hole].mean().item() - 1) < 0.15, (s_hole, mse_obs, var[~hole].mean().item())
        assert res[s_hole]["wiener"][0] > 1.02 * mse_hole  # the wrong prior fills worse
    assert res[1e8]["model"][0] > 1.3 * res[1e-1]["model"][0]  # (0.033 against 0.020 in closed form)


def test_denoising_by_noise_matches_the_closed_form_posterior_variance_of_a_gaussian_field():
    """Along the noise axis, the exact prior's posterior-mean PSNR must be what its posterior covariance
    gives in closed form (M9: mean squared error = mean of the diagonal, 10 log10 of it per image, which
    at 256 pixels per image differs from the log of the mean by ~0.02 dB); the observation's must be
    -10 log10 sigma^2; and a prior of another spectrum must do no better at any level."""
    from experiments.learning import denoising_by_noise

    ds = data.GaussianField(16, 1)
    other = data.GaussianField(16, 1, alpha=1.0).prior
    x = ds.get_batch(48, torch.Generator().manual_seed(4321)).double()
    sigmas = (0.02, 0.1, 0.5)
    res = denoising_by_noise(ds.prior, other, x, "fft", sigmas=sigmas)
    assert list(res) == list(sigmas)
    for sigma, (model, wrong, observed) in res.items():
        var = ds.prior.posterior_cov(cv.isotropic(sigma ** 2, (1, 1, 16, 16), dtype=torch.float64))[0].diagonal()
        closed_form = -10 * torch.log10(var.mean()).item()
        assert abs(model - closed_form) < 0.25, (sigma, model, closed_form)
        assert abs(observed + 20 * torch.log10(torch.tensor(sigma)).item()) < 0.25, (sigma, observed)
        assert wrong < model + 0.02, (sigma, wrong, model)
    assert res[0.1][0] - res[0.1][1] > 0.15 and res[0.5][0] - res[0.5][1] > 0.15  # (0.28 and 0.30 dB here)
