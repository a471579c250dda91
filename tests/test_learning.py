"""experiments/learning.py's blind-deblurring accuracy against known answers: the exact prior of the
Gaussian field (which the argmin of its normalized energy should get right nearly always at these
noise levels), and the same prior with a normalization error of the sign the learned models show
(README, Learning: the energy too low at narrow blurs), which must lose accuracy."""

import torch

import aebm
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
