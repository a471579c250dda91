"""Claims about the scale of M3's learned term (aebm.EnergyModel.learned_weight, train.py --learned-scale;
the fill scale's direct output for missing coordinates is in the constant-output test):
with a = w (the paper's M3) the network that writes the Gaussian field's exact energy must output values
~ sqrt(c / s) at low noise, with a = c / sqrt(v s) ("unit") values of order one at every s; both forms write
that exact energy (checked against aebm.GaussianEnergy, the closed form M9), keep the s -> infinity anchor
exact for any network, and move Tweedie's estimate by 1/2 sqrt(s) w F per unit of a constant F ("unit")."""

import math

import pytest
import torch

import aebm
import covariances as cv
import data
import nets
import train
from tests.test_train import run_args
from tests.test_anchor import RandomConvNet


class ExactFieldNet(torch.nn.Module):
    """The network whose M3 energy is the stationary Gaussian N(mu, C) (C diagonal in fft), written for the
    EnergyModel it is given: the learned term must be 1/2 |r_k|^2 (1/(C_k + s_k) - 1/v_k) plus the log-det
    difference. F is a linear filter g_k of the input U x_in = w r / sigma_d, chosen so that
    1/2 Re(y~_k^* a_k g_k w_k r_k / sigma_d) equals the quadratic; b_k carries 1/2 log((C_k + s_k) / v_k) / w_k."""

    def __init__(self, C):
        super().__init__()
        self.C, self.model = C, None
        self.offset = True  # EnergyModel asks for (F, b)

    def forward(self, x_in, cov, with_offset=False):
        m, s = self.model, cov.s
        c = m.anchor_var(cov)
        v = c + s
        w, a = c / v, m.learned_weight(c, v, s)
        g = (1 / (self.C + s) - 1 / v) * v.sqrt() * math.sqrt(m.data_var) / (a * w)
        F = cv.Covariance(s, "fft").Uh(g * cv.Covariance(s, "fft").U(x_in.double())).to(x_in.dtype)
        b = 0.5 * ((self.C + s) / v).log() / w
        return (F, b.to(x_in.dtype)) if with_offset else F


class SmoothField:
    """The Gaussian field with its frequencies above N/4 removed (variance 1e-9 there): a Gaussian prior
    whose posterior mean at low noise takes the noise out of 72 % of the coordinates, as a
    denoiser of natural images does in their flat regions, where the field's own spectrum keeps it all."""

    def __init__(self, N):
        fld = data.GaussianField(N, 1)
        k = torch.arange(N)
        k = torch.minimum(k, N - k)
        smooth = (k[:, None] <= N // 4) & (k[None, :] <= N // 4)
        self.C = torch.where(smooth, fld.spectrum.s, 1e-9 * fld.var)
        self.mean, self.var = fld.mean, self.C.mean().item()
        self.prior = aebm.GaussianEnergy(self.mean, cv.Covariance(self.C, "fft"))

    def get_batch(self, n, generator):
        return self.prior.sample(n, generator).float()


def exact_field_model(fld, scale):
    net = ExactFieldNet(fld.C)
    model = aebm.EnergyModel(net, fld.mean, fld.var, learned_scale=scale)
    net.model = model
    return model


@pytest.mark.parametrize("scale", ["w", "unit", "fill"])
def test_every_scale_writes_the_gaussian_fields_exact_energy(scale):
    """float32, 32x32x1, isotropic s from 1e-4 to 1e3: the exact field network in EnergyModel gives
    GaussianEnergy's E (per dimension) and posterior mean (SmoothField's prior, variances 1e-11 to 2): the form changes the network's task, not what
    the model can represent."""
    fld = SmoothField(32)
    model = exact_field_model(fld, scale)
    x = fld.get_batch(4, torch.Generator().manual_seed(0))
    for s in (1e-4, 1e-2, 1.0, 1e3):
        cov = cv.isotropic(s, x.shape, "fft")
        y = x + math.sqrt(s) * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
        E, E_ref = model(y, cov), fld.prior(y.double(), cv.Covariance(cov.s.double(), "fft"))
        assert ((E.double() - E_ref).abs() / x[0].numel()).max() < 2e-5, s
        x_hat = aebm.posterior_mean(model, y, cov)
        x_ref = fld.prior.posterior_mean(y.double(), cv.Covariance(cov.s.double(), "fft"))
        assert (x_hat.double() - x_ref).abs().max() < 1e-3 * max(1.0, math.sqrt(s)), s


def test_unit_scale_asks_the_network_for_outputs_of_order_one_at_low_noise():
    """RMS of the exact network's output on noisy SmoothField images (32x32, float64): with a = w it grows like
    sqrt(c / s) as the noise falls (above 10 at s = 1e-4, where the posterior mean removes the noise of 72 % of
    the coordinates), with the unit scale it stays within [0.3, 3] from s = 1e-4 to 1e-2; at s >> c the two
    forms coincide (a -> w), so the white anchor's misfit at the low frequencies is the same for both."""
    fld = SmoothField(32)
    x = fld.get_batch(16, torch.Generator().manual_seed(0)).double()
    noises = (1e-4, 1e-3, 1e-2, 1e3)
    rms = {}
    for scale in ("w", "unit"):
        model = exact_field_model(fld, scale)
        rms[scale] = []
        for s in noises:
            cov = cv.isotropic(s, x.shape, "fft", dtype=torch.float64)
            y = x + math.sqrt(s) * torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
            c = fld.var
            x_in = cov.Uh(c / (c + s) * (cov.U(y) - model.mean_z(cov.U(y), cov))) / math.sqrt(c)
            rms[scale].append(model.net(x_in, cov).square().mean().sqrt().item())
    assert rms["w"][0] > 10 and rms["w"][0] > 5 * rms["w"][2], rms["w"]
    assert all(0.3 < r < 3 for r in rms["unit"][:3]), rms["unit"]
    assert abs(rms["unit"][3] / rms["w"][3] - 1) < 1e-3


@pytest.mark.parametrize("basis", ["pixel", "fft"])
@pytest.mark.parametrize("scale", ["unit", "fill"])
def test_both_other_scales_keep_the_gaussian_limit_for_any_theta(basis, scale):
    """As s -> infinity E_theta -> -log N(y; mu, sigma_d^2 I + Sigma) for a random network (float64): like 1/s
    with the unit scale, like s^(-1/2) with the fill scale (its learned term is r c F / v)."""
    model = aebm.EnergyModel(RandomConvNet(2), mean=0.5, data_var=0.1, learned_scale=scale)
    shape = (2, 2, 16, 16)
    gaps = []
    for s in (1e2, 1e4, 1e6):
        cov = cv.isotropic(s, shape, basis, dtype=torch.float64)
        y = 0.5 + math.sqrt(s) * torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        gaps.append((model(y, cov) - aebm.gaussian_limit_energy(y, cov, 0.5, 0.1)).abs().max().item())
    rate = 30 if scale == "unit" else 3  # per factor 100 in s: 1/s gives 100, s^(-1/2) gives 10
    assert gaps[2] < (1e-3 if scale == "unit" else 1e-1) and gaps[1] / gaps[2] > rate and gaps[0] / gaps[1] > rate


class ConstantNet(torch.nn.Module):
    def forward(self, x, cov):
        return torch.ones_like(x)


@pytest.mark.parametrize("scale", ["w", "unit", "fill"])
def test_a_constant_output_moves_tweedies_estimate_as_written(scale):
    """F = 1 (no Jacobian term): x^ - (mu + w (y - mu)) = -1/2 s a v^{-1/2} per pixel, which is
    -1/2 sqrt(s) w for the unit scale, -1/2 s w (-> -c/2 for a missing pixel) for the fill scale and
    -1/2 s w / sqrt(v) (-> 0) for the paper's (float32, 32x32x3, pixel basis, s up to 1e8)."""
    model = aebm.EnergyModel(ConstantNet(), mean=0.5, data_var=0.08, learned_scale=scale)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for s in (1e-4, 1e-2, 1.0, 1e8):
        cov = cv.isotropic(s, x.shape, "pixel")
        v, w = 0.08 + s, 0.08 / (0.08 + s)
        move = aebm.posterior_mean(model, x, cov) - (0.5 + w * (x - 0.5))
        expected = {"unit": -0.5 * math.sqrt(s) * w, "fill": -0.5 * s * w, "w": -0.5 * s * w / math.sqrt(v)}[scale]
        torch.testing.assert_close(move, torch.full_like(move, expected), rtol=1e-4, atol=1e-7)


def test_an_unknown_scale_is_refused():
    with pytest.raises(ValueError, match="learned_scale"):
        aebm.EnergyModel(ConstantNet(), learned_scale="edm")


def test_a_checkpoint_carries_its_scale_and_refuses_a_resume_with_the_other(tmp_path):
    train.main(run_args(tmp_path, 3, "--learned-scale", "unit"))
    energy, config = nets.load_energy(str(tmp_path / "ckpt.pt"))
    assert energy.learned_scale == config["learned_scale"] == "unit"
    with pytest.raises(ValueError, match="another configuration.*learned_scale"):
        train.main(run_args(tmp_path, 6, "--resume"))
