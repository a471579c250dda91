"""experiments/denoiser.py, the plain-denoiser control: its Tweedie through train.py's autograd path equals
its direct formula, its loss equals EDM's weighted denoising loss written by hand, an untrained one is
the posterior mean of N(mu, sigma_d^2 I) in closed form, its checkpoints train, resume, are measured,
and are refused where an energy is needed, and the asymmetry of its Jacobian is the dense Jacobian's."""

import os

import pytest
import torch

import aebm
import covariances as cv
import nets
import train
from experiments import learning
from experiments import denoiser as dn

SHAPE = (3, 3, 16, 16)


def random_denoiser(seed=0):
    """A tiny UNet whose zero-initialised output layer is randomised, so F is not 0."""
    torch.manual_seed(seed)
    net = nets.build_unet("tiny", 16, 3)
    for p in net.parameters():
        if p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.3)
    return dn.Denoiser(net.double(), 0.45, 0.08)


def covariances():
    return [cv.isotropic(0.02, SHAPE, "pixel", torch.float64),
            cv.mask_covariance(cv.box_mask(SHAPE, 8), 1e3, 0.01, 3, torch.float64),
            cv.blur_problem(SHAPE, 1.5, 0.05, "dct", dtype=torch.float64).covariance()]


def white_gaussian():
    """N(mu, sigma_d^2 I): the prior an untrained Denoiser (F = 0) is the posterior mean of."""
    return aebm.GaussianEnergy(torch.full((3, 16, 16), 0.45, dtype=torch.float64),
                               cv.isotropic(0.08, (1, 3, 16, 16), "pixel", torch.float64))


@pytest.mark.parametrize("k", range(3))
def test_the_training_path_gives_the_denoisers_own_posterior_mean_and_edm_loss(k):
    model = random_denoiser()
    cov = covariances()[k]
    g = torch.Generator().manual_seed(1)
    x = torch.rand(SHAPE, generator=g, dtype=torch.float64)
    zeta = cv.white_noise(SHAPE, cov.basis, g, torch.float64)
    y = x + cov.Uh(cov.s.sqrt() * zeta)
    direct = model.posterior_mean(y, cov)
    assert (direct - aebm.posterior_mean(white_gaussian(), y, cov)).abs().max() > 1e-2  # F is not 0
    # Tweedie from the autograd gradient train.py uses: z - s dE/dz
    z = cov.U(y)
    _, score_z, _ = aebm.energy_and_scores(model, z, cov, need_log_s=False)
    torch.testing.assert_close(cov.Uh(z - cov.s * score_z), direct, rtol=1e-9, atol=1e-9)
    # A-DSM with the EDM weight = EDM's loss (x^ - x)^2 / c_out^2 per coordinate, c_out^2 = s sigma_d^2 / v
    L_dsm, _ = aebm.dual_score_losses(model, x, cov, need_csm=False, zeta=zeta, dsm_weight=0.08)
    c_out2 = cov.s * 0.08 / (0.08 + cov.s)
    by_hand = ((cov.U(direct) - cov.U(x)).square() / c_out2).flatten(1).sum(1) / x[0].numel()
    torch.testing.assert_close(L_dsm, by_hand, rtol=1e-9, atol=0)


def test_an_untrained_denoiser_is_the_white_gaussians_posterior_mean():
    """F = 0 (nets.UNet's output layer starts at zero): x^ = mu + sigma_d^2 / (sigma_d^2 + s) (y - mu) per
    coordinate, the posterior mean of the prior N(mu, sigma_d^2 I) (M9 with C = sigma_d^2 I, GaussianEnergy)."""
    model = dn.Denoiser(nets.build_unet("tiny", 16, 3).double(), 0.45, 0.08)
    white = white_gaussian()
    y = torch.rand(SHAPE, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for cov in covariances():
        torch.testing.assert_close(model.posterior_mean(y, cov), aebm.posterior_mean(white, y, cov))


def test_a_denoiser_run_trains_resumes_is_measured_and_is_refused_as_an_energy(tmp_path):
    out = str(tmp_path / "den")
    flags = ["--dataset", "deadleaves", "--img-size", "16", "--config", "tiny", "--batch", "4", "--log-every", "1",
             "--eval-every", "2", "--ckpt-every", "2", "--val-batch", "2", "--device", "cpu", "--out", out]
    dn.main(flags + ["--steps", "2"])
    path = os.path.join(out, "ckpt.pt")
    assert nets.load_checkpoint(path)["config"]["model"] == "denoiser"
    with pytest.raises(ValueError, match="plain denoiser, not an energy"):
        nets.load_energy(path)
    with pytest.raises(ValueError, match="plain-denoiser control"):  # train.py will not resume it as an energy
        train.main(flags + ["--steps", "3", "--resume"])
    dn.main(flags + ["--steps", "3", "--resume"])
    assert nets.load_checkpoint(path)["step"] == 3
    res = dn.evaluate(path, n=2)
    assert set(res["psnr"]) == {"denoise", "inpaint", "deblur", "sr"}
    assert all(torch.isfinite(torch.tensor(v)).all() for v in res["psnr"].values())
    # the noise-axis figure measures a denoiser checkpoint as evaluate() does, on the same images and noise
    figure, gains = learning.noise_axis([("den", path)], str(tmp_path / "noise.png"), n=2)
    assert os.path.exists(figure)
    assert gains["den"] == pytest.approx([m - w for m, w, _ in res["by_noise"].values()], abs=1e-9)
    # --score-parts gives a denoiser its correction's size: the move from the white anchor's Wiener estimate
    # mu + sigma_d^2 / (sigma_d^2 + s) (y - mu) to its x^, written here from the checkpoint's data statistics
    parts = learning.score_parts_by_noise([("den", path)], n=2, sigmas=(0.05,))["den"][0.05]
    model, config = dn.load_denoiser(path)
    x, _ = learning.held_out_and_fitted(config, 2, 0)
    y = x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    mu, var = config["data_mean"], config["data_var"]
    with torch.no_grad():
        move = mu + var / (var + 0.05 ** 2) * (y - mu) - model.estimate(y, cv.isotropic(0.05 ** 2, y.shape, "pixel"))
    assert parts[0] == pytest.approx(move.square().mean().sqrt().item() / 0.05, rel=1e-5) and parts[0] > 0
    assert torch.isnan(torch.tensor(parts[1:])).all()
    with pytest.raises(SystemExit, match="--lam 0"):
        dn.main(flags + ["--lam", "1"])


def test_jacobian_asymmetry_is_the_dense_jacobians_and_zero_for_a_posterior_mean():
    """dn.jacobian_asymmetry (Hutchinson's estimate of |A|^2 / |S|^2 for J = dx^/dy) against the same ratio
    from the dense Jacobian of one 16x16x3 image, for a random free denoiser in float32; and 0 for an exact
    posterior mean, whose Jacobian C (C + s)^{-1} is symmetric (the Gaussian field's, through its Tweedie)."""
    shape = (1, 3, 16, 16)
    model = random_denoiser()
    model.net.float()
    cov = cv.isotropic(0.01, shape, "pixel")
    y = 0.45 + 0.3 * torch.randn(shape, generator=torch.Generator().manual_seed(3))
    f = lambda t: model.estimate(t, cov)
    J = torch.autograd.functional.jacobian(f, y).reshape(y.numel(), y.numel())
    dense = ((J - J.T).square().sum() / (J + J.T).square().sum()).item()
    estimate = dn.jacobian_asymmetry(f, y, probes=16)
    assert dense > 1e-3  # a random free denoiser is far from a gradient
    assert abs(estimate - dense) < 0.1 * dense, (estimate, dense)
    import data
    prior = data.load_dataset("gaussian", 16, 1).prior
    cov1 = cv.isotropic(0.01, (1, 1, 16, 16), "pixel", torch.float64)
    y1 = prior.sample(1, torch.Generator().manual_seed(5)) + 0.1 * torch.randn(1, 1, 16, 16, dtype=torch.float64)

    def tweedie(t):
        t = t if t.requires_grad else t.requires_grad_(True)
        return t - cov1.s * torch.autograd.grad(prior(t, cov1).sum(), t, create_graph=True)[0]
    J1 = torch.autograd.functional.jacobian(tweedie, y1).reshape(256, 256)
    assert (J1 - torch.eye(256, dtype=torch.float64)).abs().max() > 1e-2  # not the identity: a real test
    assert dn.jacobian_asymmetry(tweedie, y1) < 1e-20
