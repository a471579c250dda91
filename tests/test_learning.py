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


def test_score_parts_split_a_gaussian_fields_correction_as_the_closed_form_does():
    """experiments.learning.score_parts (float32, 32x32x1, fft, s = 1e-3 and 1e-1): on the network that writes the
    smooth Gaussian field's exact energy in M3 (a linear filter with a symmetric Jacobian) the correction is
    t = s q r with q = 1/(C + s) - 1/v, half through F's value and half through its Jacobian; on a constant
    output (no Jacobian) all of it is the value part, -1/2 s w v^(-1/2) per coordinate (M3 with a = w)."""
    import math

    import pytest
    from experiments.learning import score_parts
    from tests.test_learned_scale import ConstantNet, SmoothField, exact_field_model

    fld = SmoothField(32)
    model = exact_field_model(fld, "w")
    x = fld.get_batch(4, torch.Generator().manual_seed(0))
    rms = lambda t: t.abs().square().mean().sqrt().item()
    for s in (1e-3, 1e-1):
        cov = cv.isotropic(s, x.shape, "fft")
        y = x + math.sqrt(s) * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
        cov64 = cv.Covariance(cov.s.double(), "fft")
        r = cov64.U(y.double()) - model.mean_z(cov64.U(y.double()), cov64)
        q = 1 / (fld.C.double() + s) - 1 / (fld.var + s)
        t, t_F, t_J = (v.item() for v in score_parts(model, y, cov))
        assert t == pytest.approx(rms(s * q * r), rel=1e-3), s
        assert t_F == pytest.approx(0.5 * t, rel=1e-3) and t_J == pytest.approx(0.5 * t, rel=1e-3), s
        # t is the move from the anchor's Wiener estimate to the posterior mean (M4), as for a plain denoiser
        wiener = cov.Uh(model.mean_z(cov.U(y), cov) + fld.var / (fld.var + s) * (cov.U(y) - model.mean_z(cov.U(y), cov)))
        assert t == pytest.approx(rms(wiener - aebm.posterior_mean(model, y, cov)), rel=1e-3), s
    const = aebm.EnergyModel(ConstantNet(), mean=0.5, data_var=0.08)
    cov = cv.isotropic(1e-2, (2, 3, 32, 32), "pixel")
    t, t_F, t_J = (v.item() for v in score_parts(const, torch.rand(2, 3, 32, 32), cov))
    expected = 0.5 * 1e-2 * (0.08 / 0.09) / math.sqrt(0.09)
    assert t == pytest.approx(expected, rel=1e-5) and t_F == pytest.approx(expected, rel=1e-5) and t_J < 1e-6 * t
