"""Claims about M3's spectral anchor (train.py --anchor spectral, aebm.EnergyModel.anchor_var): the fitted
power law is the data's spectrum, a model whose learned terms are silent IS the fitted Gaussian prior (energy
and posterior mean, float32 at the users' sizes), the anchor stays exact as s -> infinity for any network,
the closed-form Tweedie still equals differentiating the whole energy, and a checkpoint carries its anchor.
References: the Gaussian field's exact spectrum (data.GaussianField), aebm.GaussianEnergy (M9, float64),
autograd through the whole energy."""

import math

import pytest
import torch

import aebm
import covariances as cv
import data
import nets
import train
from tests.test_train import run_args


class Silent(torch.nn.Module):
    """F = 0 and b = 0: M3 reduces to its Gaussian part."""

    def forward(self, x, cov):
        return torch.zeros_like(x)


class RandomConvNet(torch.nn.Module):
    def __init__(self, channels):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(channels, channels, 3, 3, generator=g, dtype=torch.float64))

    def forward(self, x, cov):
        return 5 * torch.nn.functional.conv2d(x, self.w.to(x.dtype), padding=1) + torch.tanh(cov.log_s).to(x.dtype) + 3


def field_spectrum(N=32, n=4000):
    fld = data.GaussianField(N, 1)
    x = fld.get_batch(n, torch.Generator().manual_seed(0))
    return fld, aebm.fit_spectrum(x, "fft", fld.mean)


def test_the_fitted_power_law_is_the_gaussian_fields_own_spectrum():
    """The field's spectrum is A / (k0^2 + |k|^2) (alpha 2, k0 = 1 cycle per image = 1/32 cycle per pixel at
    32x32): the fit from 4000 float32 draws finds both and every coefficient's variance within 10 %."""
    fld, spectrum = field_spectrum()
    assert abs(spectrum["alpha"][0] - 2.0) < 0.05
    assert abs(spectrum["f0"][0] * 32 - 1.0) < 0.06
    c = aebm.power_law_spectrum(spectrum, 32, 32, "fft")
    assert (c / fld.spectrum.s).log().abs().max() < math.log(1.1)


@pytest.mark.parametrize("basis", ["fft", "dct"])
def test_with_silent_learned_terms_the_spectral_anchor_is_the_fitted_gaussian(basis):
    """float32, 32x32x3: E and the posterior mean of M3 with F = b = 0 equal those of N(mu, C) with C the power
    law (GaussianEnergy in float64) under blur and SR in a spectral basis, and those of N(mu, sigma_d^2 I) under
    a mask: the anchor is a normalized Gaussian for every Sigma, spectral where Sigma is."""
    spectrum = {"A": [0.003, 0.004, 0.005], "alpha": [1.8, 2.0, 2.2], "f0": [0.03, 0.04, 0.05]}
    model = aebm.EnergyModel(Silent(), mean=0.45, data_var=0.07, spectrum=spectrum)
    shape = (2, 3, 32, 32)
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    C = cv.Covariance(aebm.power_law_spectrum(spectrum, 32, 32, basis), basis)
    white = cv.Covariance(torch.full((1, 3, 32, 32), 0.07, dtype=torch.float64), "pixel")
    cases = {"blur": (cv.blur_problem(shape, 1.5, 0.02, basis).covariance(), C),
             "sr": (cv.sr_problem(shape, 2, 0.02, basis).covariance(), C),
             "box": (cv.mask_covariance(cv.box_mask(shape, 12), 10.0, 1e-3, 3), white)}
    for name, (cov, prior_C) in cases.items():
        cov = cv.Covariance(cov.s.float(), cov.basis)
        y = x + cv.Covariance(cov.s.clamp(max=10.0), cov.basis).sample(torch.Generator().manual_seed(1))[0].float()
        ref = aebm.GaussianEnergy(0.45, prior_C)
        cov64 = cv.Covariance(cov.s.double(), cov.basis)
        E, E_ref = model(y, cov), ref(y.double(), cov64)
        assert ((E - E_ref).abs() / y[0].numel()).max() < 1e-5, name  # nats/dim, of energies ~ -1e4
        x_hat, x_ref = aebm.posterior_mean(model, y, cov), ref.posterior_mean(y.double(), cov64)
        assert (x_hat - x_ref).abs().max() < 1e-4, name


@pytest.mark.parametrize("basis", ["fft", "dct"])
def test_the_spectral_anchor_tends_to_the_gaussian_limit_for_any_theta(basis):
    """As s -> infinity E_theta -> -log N(y; mu, C + Sigma) like 1/s whatever the network (float64, 16x16x2)."""
    spectrum = {"A": [0.003, 0.004], "alpha": [2.0, 1.5], "f0": [0.05, 0.05]}
    model = aebm.EnergyModel(RandomConvNet(2), mean=0.5, data_var=0.1, spectrum=spectrum)
    shape = (2, 2, 16, 16)
    c = aebm.power_law_spectrum(spectrum, 16, 16, basis)
    gaps = []
    for s in (1e2, 1e4, 1e6):
        cov = cv.isotropic(s, shape, basis, dtype=torch.float64)
        y = 0.5 + math.sqrt(s) * torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        gaps.append((model(y, cov) - aebm.gaussian_limit_energy(y, cov, 0.5, c)).abs().max().item())
    assert gaps[2] < 1e-3 and gaps[1] / gaps[2] > 30 and gaps[0] / gaps[1] > 30  # O(1/s)
    small = cv.isotropic(0.01, shape, basis, dtype=torch.float64)
    y = torch.rand(shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert (model(y, small) - aebm.gaussian_limit_energy(y, small, 0.5, c)).abs().min() > 1e-2  # F matters there


def test_closed_form_tweedie_equals_differentiating_the_whole_spectral_anchored_energy():
    """EnergyModel.posterior_mean applies the anchor's Gaussian part in closed form, mu + w (z - mu) with
    w = c / (c + s) per frequency; differentiating the whole energy (M4 as written) gives the same, float64."""
    spectrum = {"A": [0.003], "alpha": [2.0], "f0": [0.05]}
    model = aebm.EnergyModel(RandomConvNet(1), mean=0.5, data_var=0.1, spectrum=spectrum)
    shape = (2, 1, 16, 16)
    cov = cv.blur_problem(shape, 1.0, 0.05, "dct", dtype=torch.float64).covariance()
    cov = cv.Covariance(cov.s.clamp(max=1e3), "dct")
    y = torch.rand(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    z = cov.U(y)
    _, score_z, _ = aebm.energy_and_scores(model, z, cov, need_log_s=False)
    torch.testing.assert_close(model.posterior_mean(y, cov), cov.Uh(z - cov.s * score_z), atol=1e-9, rtol=0)


def test_a_spectral_anchor_checkpoint_carries_its_anchor_and_refuses_a_white_resume(tmp_path):
    """train.py --anchor spectral fits the power law once, records it in the config; load_energy rebuilds the
    same energy (the network's anchor shift included), and a resume without the flag is refused."""
    train.main(run_args(tmp_path, 3, "--anchor", "spectral"))
    energy, config = nets.load_energy(str(tmp_path / "ckpt.pt"))
    assert energy.spectrum == config["anchor_spectrum"] and len(config["anchor_spectrum"]["A"]) == 1
    assert energy.net.anchor_shift is not None
    with pytest.raises(ValueError, match="another configuration.*anchor"):
        train.main(run_args(tmp_path, 6, "--resume"))
    train.main(run_args(tmp_path, 6, "--resume", "--anchor", "spectral"))


def test_a_spectral_anchor_network_tells_the_bases_apart_for_sigma2_I_and_a_white_one_does_not():
    """sigma^2 I has a white anchor in the pixel basis and a spectral one in a spectral basis, so the network
    must be able to tell them apart (its anchor shift); a white-anchor network stays basis-independent."""
    shape = (1, 1, 16, 16)
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    out = {}
    for anchor in ("white", "spectral"):
        torch.manual_seed(0)
        net = nets.build_unet("tiny", 16, 1, anchor=anchor)
        for p in net.parameters():  # the zero-initialised heads and shift made non-zero
            p.data.add_(0.1 * torch.randn_like(p))
        out[anchor] = [net(x, cv.isotropic(0.1, shape, basis)) for basis in ("pixel", "dct")]
    torch.testing.assert_close(out["white"][0], out["white"][1], atol=1e-5, rtol=0)
    assert (out["spectral"][0] - out["spectral"][1]).abs().max() > 1e-3


def test_blind_deblurring_with_the_spectral_anchor_alone_finds_the_exact_energys_width():
    """The blur-width bias, at a size CI can run: on the 16x16 field, with learned terms still silent, the
    spectral anchor fitted to 512 images ranks (width, noise) candidates as the exact energy does, and the
    white anchor N(mu, sigma_d^2 I) does not (it has no spectrum to tell widths by: what the learned term
    would have to supply, and at the hour budget on dead leaves did not, docs/results.md §1)."""
    fld = data.GaussianField(16, 1)
    x = fld.get_batch(512, torch.Generator().manual_seed(0))
    spectrum = aebm.fit_spectrum(x, "fft", fld.mean)
    models = {"exact": fld.prior,
              "spectral": aebm.EnergyModel(Silent(), fld.mean, fld.var, spectrum),
              "white": aebm.EnergyModel(Silent(), fld.mean, fld.var)}
    widths, noises = [0.5, 1.0, 1.5, 2.0, 3.0], [0.01, 0.05]
    truth = fld.get_batch(4, torch.Generator().manual_seed(1))
    picks = {name: [] for name in models}
    for i, (b, sigma) in enumerate([(b, s) for b in widths for s in noises]):
        prob = cv.blur_problem(truth.shape, b, sigma, "fft")
        y_obs = prob.measure(truth, torch.Generator().manual_seed(10 + i))
        for name, energy in models.items():
            y = y_obs.double() if name == "exact" else y_obs
            _, b_hat, s_hat = aebm.blind_deblur(energy, y, widths, noises, "fft", fld.mean)
            picks[name] += list(zip(b_hat.tolist(), s_hat.tolist()))
    agree = {name: sum(p == q for p, q in zip(picks[name], picks["exact"])) / len(picks["exact"]) for name in models}
    assert agree["spectral"] >= 0.95, agree
    assert agree["white"] < 0.6, agree


def test_the_anchor_dsm_weight_is_edm_for_the_white_anchor_and_the_spectrum_for_the_spectral_one():
    """--dsm-weight anchor weights coordinate k of A-DSM by (s_k + c_k) / c_k: bit for bit EDM's (s + sigma_d^2) /
    sigma_d^2 under the white anchor, and the power law's own c_k under the spectral one (checked by writing the
    weighted loss out)."""
    shape = (2, 1, 16, 16)
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    cov = cv.Covariance(cv.blur_problem(shape, 1.0, 0.05, "dct").covariance().s.clamp(max=1e3).float(), "dct")
    zeta = cv.white_noise(shape, "dct", torch.Generator().manual_seed(1))
    white = aebm.EnergyModel(RandomConvNet(1), 0.5, 0.07)
    a = aebm.dual_score_losses(white, x, cov, zeta=zeta, dsm_weight="anchor")[0]
    b = aebm.dual_score_losses(white, x, cov, zeta=zeta, dsm_weight=0.07)[0]
    assert torch.equal(a, b)
    spectrum = {"A": [0.003], "alpha": [2.0], "f0": [0.05]}
    spectral = aebm.EnergyModel(RandomConvNet(1), 0.5, 0.07, spectrum)
    L = aebm.dual_score_losses(spectral, x, cov, zeta=zeta, dsm_weight="anchor", need_csm=False)[0]
    c = aebm.power_law_spectrum(spectrum, 16, 16, "dct").float()
    _, score_z, _ = aebm.energy_and_scores(spectral, cov.U(x) + cov.s.sqrt() * zeta, cov, need_log_s=False)
    ref = ((cov.s + c) / c * (cov.s.sqrt() * score_z - zeta).square()).flatten(1).sum(1) / 256
    torch.testing.assert_close(L.detach(), ref, rtol=1e-5, atol=0)
