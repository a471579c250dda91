"""Claims about M3's square term 1/2 sum_k w_k |(U G)_k|^2 (aebm.EnergyModel, nets.UNet(square_term=True),
train.py --square-term): with it M3 still writes the Gaussian field's exact energy (the square term writing
the part of the learned quadratic that is positive, F the rest; checked against aebm.GaussianEnergy, the
closed form M9, energies and posterior means in float32); the s -> infinity anchor stays exact for any
network; a fresh UNet starts near the Gaussian energy (F = 0, G small); a checkpoint carries the option."""

import math

import pytest
import torch

import aebm
import covariances as cv
import nets
import train
from tests.test_anchor import RandomConvNet
from tests.test_learned_scale import SmoothField
from tests.test_train import run_args


class SplitFieldNet(torch.nn.Module):
    """The network whose energy, with the square term, is the stationary Gaussian N(mu, C) (C diagonal in fft).
    The learned term must be 1/2 q_k |r_k|^2 with q = 1/(C + s) - 1/v, plus the log-det difference. The
    square term writes q+ = max(q, 0): (U G)_k = sqrt(q+_k / w_k) r_k, with r = sigma_d U x_in / w from the
    network's input U x_in = w r / sigma_d; F writes -q- = min(q, 0) as a linear filter (the a = w form of
    test_learned_scale.ExactFieldNet); b carries 1/2 log((C + s) / v) / w."""

    square_term = True

    def __init__(self, C):
        super().__init__()
        self.C, self.model = C, None
        self.offset = True  # EnergyModel asks for (F, b)

    def forward(self, x_in, cov, with_offset=False):
        m, s = self.model, cov.s
        c = m.anchor_var(cov)
        v = c + s
        w = c / v
        q = 1 / (self.C + s) - 1 / v
        sd = math.sqrt(m.data_var)
        u = cv.Covariance(s, "fft")
        z_in = u.U(x_in.double())
        G = u.Uh((q.clamp(min=0) / w).sqrt() * sd / w * z_in)
        F = u.Uh(q.clamp(max=0) * v.sqrt() * sd / (w * w) * z_in)
        b = 0.5 * ((self.C + s) / v).log() / w
        out = torch.cat([F, G], dim=1).to(x_in.dtype)
        return (out, b.to(x_in.dtype)) if with_offset else out


def test_the_square_term_and_m3_together_write_the_gaussian_fields_exact_energy():
    """float32, 32x32x1, isotropic s from 1e-4 to 1e3: E per dimension within 2e-5 nats of M9 and the posterior
    mean (through autograd, the square term's score included) within 1e-3 of M9's; at low noise q+ is nonzero
    on most coordinates (SmoothField removes the noise of 72 % of them), so G's part is tested there."""
    fld = SmoothField(32)
    net = SplitFieldNet(fld.C)
    model = aebm.EnergyModel(net, fld.mean, fld.var)
    net.model = model
    x = fld.get_batch(4, torch.Generator().manual_seed(0))
    for s in (1e-4, 1e-2, 1.0, 1e3):
        cov = cv.isotropic(s, x.shape, "fft")
        q = 1 / (fld.C + s) - 1 / (fld.var + s)
        assert (q > 0).float().mean() > 0.5, s  # the square term carries most of the quadratic
        y = x + math.sqrt(s) * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
        E, E_ref = model(y, cov), fld.prior(y.double(), cv.Covariance(cov.s.double(), "fft"))
        assert ((E.double() - E_ref).abs() / x[0].numel()).max() < 2e-5, s
        x_hat = aebm.posterior_mean(model, y, cov)
        x_ref = fld.prior.posterior_mean(y.double(), cv.Covariance(cov.s.double(), "fft"))
        assert (x_hat.double() - x_ref).abs().max() < 1e-3 * max(1.0, math.sqrt(s)), s


class RandomSquareNet(torch.nn.Module):
    """F and G from two random convolutions (RandomConvNet's form), side by side."""

    square_term = True

    def __init__(self, channels):
        super().__init__()
        self.F, self.G = RandomConvNet(channels), RandomConvNet(channels)
        with torch.no_grad():
            self.G.w.copy_(torch.randn(self.G.w.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64))

    def forward(self, x, cov):
        return torch.cat([self.F(x, cov), self.G(x, cov)], dim=1)


@pytest.mark.parametrize("basis", ["pixel", "dct"])
def test_the_gaussian_limit_stays_exact_for_any_network_with_the_square_term(basis):
    """As s -> infinity E_theta -> -log N(y; mu, sigma_d^2 I + Sigma) like 1/s for a random F and G (float64):
    the gap falls by more than 30 per factor 100 in s; and the square term is 1/2 sum w |U G|^2 >= 0, so the
    same model without G (F alone) has an energy lower by exactly that much."""
    model = aebm.EnergyModel(RandomSquareNet(2), mean=0.5, data_var=0.1)
    shape = (2, 2, 16, 16)
    gaps = []
    for s in (1e2, 1e4, 1e6):
        cov = cv.isotropic(s, shape, basis, dtype=torch.float64)
        y = 0.5 + math.sqrt(s) * torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        gaps.append((model(y, cov) - aebm.gaussian_limit_energy(y, cov, 0.5, 0.1)).abs().max().item())
    assert gaps[2] < 1e-3 and gaps[1] / gaps[2] > 30 and gaps[0] / gaps[1] > 30, gaps
    cov = cv.isotropic(0.01, shape, basis, dtype=torch.float64)
    y = torch.rand(shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    without = aebm.EnergyModel(model.net.F, mean=0.5, data_var=0.1)
    x_in = cov.Uh(0.1 / 0.11 * (cov.U(y) - model.mean_z(cov.U(y), cov))) / math.sqrt(0.1)
    G = model.net.G(x_in, cov)
    square = 0.5 * (0.1 / 0.11) * G.square().sum(dim=(1, 2, 3))  # U orthonormal: |U G|^2 = |G|^2
    torch.testing.assert_close(model(y, cov) - without(y, cov), square)


def test_a_fresh_unet_with_the_square_term_starts_near_the_gaussian_energy():
    """F's output layer is zero and G's small: the energy of a 32x32x3 image at s = 0.01 is within 0.01 nats per
    dimension of the Gaussian one, but not equal to it (G = 0 would be a saddle the square term never leaves)."""
    torch.manual_seed(0)
    net = nets.build_unet("tiny", 32, 3, square_term=True)
    model = aebm.EnergyModel(net, mean=0.5, data_var=0.1)
    y = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    cov = cv.isotropic(0.01, y.shape, "pixel")
    gap = (model(y, cov) - aebm.gaussian_limit_energy(y, cov, 0.5, 0.1)) / y[0].numel()
    assert (gap.abs() < 1e-2).all() and (gap.abs() > 0).all(), gap


def test_a_checkpoint_carries_the_square_term_and_refuses_a_resume_without_it(tmp_path):
    train.main(run_args(tmp_path, 3, "--square-term", "1"))
    energy, config = nets.load_energy(str(tmp_path / "ckpt.pt"))
    assert energy.net.square_term and config["square_term"] is True
    with pytest.raises(ValueError, match="another configuration.*square_term"):
        train.main(run_args(tmp_path, 6, "--resume"))
