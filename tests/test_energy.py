"""Claims about aebm.py's core: the exact Gaussian energy, one-call scores, the dual-score losses,
Tweedie, and the M3 parametrization (docs/method.md §7, 3-6). References are dense matrices built in
tests/dense.py, torch.distributions, and finite differences."""

import math

import pytest
import torch

import aebm
import covariances as cv
import data
from tests.dense import default_float64, basis_matrix, dense_sigma, gaussian_nll, random_spd, symmetric_spectrum



@pytest.fixture(autouse=True)
def float64():
    with default_float64():
        yield


C, H, W = 1, 6, 6
d = C * H * W


def cap(cov, s_max=1e4):
    return cv.Covariance(cov.s.clamp(max=s_max), cov.basis)


def covariances_to_test():
    """A box mask, a blur and an SR covariance in each basis that applies (batch of 2)."""
    # SR's dropped frequencies get s = 1e8; capped at 1e4 here because the dense references (solve,
    # MultivariateNormal) lose ~cond(C + Sigma) * 1e-16 ~ 1e-6 at 1e8 and could not check 1e-8.
    box = cv.mask_covariance(cv.box_mask((2, 1, H, W), torch.tensor([2, 4])), 3.0, 0.01, C)
    out = {"box-pixel": box}
    for basis in ("fft", "dct"):
        out[f"blur-{basis}"] = cv.blur_problem((2, C, H, W), 1.0, 0.1, basis).covariance()
        out[f"sr-{basis}"] = cap(cv.sr_problem((2, C, H, W), 2, 0.1, basis).covariance())
    out["iso-dct"] = cv.isotropic(torch.tensor([0.02, 5.0]), (2, C, H, W), "dct")
    return out


with default_float64():
    COVS = covariances_to_test()
    MU = 0.5 + 0.1 * torch.randn(C, H, W, generator=torch.Generator().manual_seed(5))
    PRIOR = aebm.GaussianEnergy(MU, random_spd(d, seed=1))


def tame(cov):
    """The same covariance with s_huge replaced by a moderate value (finite differences need it)."""
    return cv.Covariance(cov.s.clamp(max=50.0), cov.basis)


@pytest.mark.parametrize("name", list(COVS))
def test_gaussian_energy_equals_dense_negative_log_density(name):
    cov = COVS[name]
    y = MU + torch.randn(2, C, H, W, generator=torch.Generator().manual_seed(0))
    K = PRIOR.C_dense + torch.stack([dense_sigma(cov.s[b], cov.basis) for b in range(2)])
    ref = gaussian_nll(y.flatten(1), MU, K)
    torch.testing.assert_close(PRIOR(y, cov), ref, atol=1e-8, rtol=1e-10)


def test_diagonal_fast_path_equals_dense_path_for_a_stationary_prior():
    c = symmetric_spectrum(C, H, W, seed=2)[None]
    diag = aebm.GaussianEnergy(0.5, cv.Covariance(c, "fft"))
    dense = aebm.GaussianEnergy(0.5, diag.C_dense)
    cov = cv.blur_problem((3, C, H, W), 0.8, 0.05, "fft").covariance()
    y = torch.randn(3, C, H, W, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(diag(y, cov), dense(y, cov), atol=1e-8, rtol=1e-10)
    torch.testing.assert_close(diag.posterior_mean(y, cov), dense.posterior_mean(y, cov), atol=1e-10, rtol=0)


@pytest.mark.parametrize("name", list(COVS))
def test_scores_match_finite_differences(name):
    cov = tame(COVS[name])
    y = MU + torch.randn(2, C, H, W, generator=torch.Generator().manual_seed(2))
    E, score_z, score_log_s = aebm.energy_and_scores(PRIOR, cov.U(y), cov)
    score_y = cov.Uh(score_z)  # dE/dy = U^H dE/dz
    eps = 1e-5
    g = torch.Generator().manual_seed(3)
    for _ in range(3):  # directional derivatives along random directions
        dy = torch.randn(y.shape, generator=g)
        fd = (PRIOR(y + eps * dy, cov) - PRIOR(y - eps * dy, cov)) / (2 * eps)
        torch.testing.assert_close((score_y * dy).flatten(1).sum(1), fd, atol=1e-6, rtol=1e-6)
        dl = torch.randn(cov.s.shape, generator=g)
        if cov.basis == "fft":
            dl = 0.5 * (dl + cv.reflect_freq(dl))  # only symmetric directions keep Sigma real
        plus = cv.Covariance.from_log_s(cov.log_s + eps * dl, cov.basis)
        minus = cv.Covariance.from_log_s(cov.log_s - eps * dl, cov.basis)
        fd = (PRIOR(y, plus) - PRIOR(y, minus)) / (2 * eps)
        torch.testing.assert_close((score_log_s * dl).flatten(1).sum(1), fd, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", list(COVS))
def test_scores_match_the_closed_forms_of_m9(name):
    cov = tame(COVS[name])
    y = MU + torch.randn(2, C, H, W, generator=torch.Generator().manual_seed(4))
    _, score_z, score_log_s = aebm.energy_and_scores(PRIOR, cov.U(y), cov)
    score_y = cov.Uh(score_z)
    U = basis_matrix(C, H, W, cov.basis)
    for b in range(2):
        K = PRIOR.C_dense + dense_sigma(cov.s[b], cov.basis)
        r = (y[b] - MU).flatten()
        Kinv = torch.linalg.inv(K)
        Kr = Kinv @ r
        torch.testing.assert_close(score_y[b].flatten(), Kr, atol=1e-9, rtol=1e-9)
        # dE/ds_k = 1/2 u_k^H [K^-1 - K^-1 r r^T K^-1] u_k, times s_k for the log
        M = (Kinv - torch.outer(Kr, Kr)).to(torch.complex128)
        dE_ds = 0.5 * torch.einsum("ki,ij,kj->k", U.conj(), M, U).real
        torch.testing.assert_close(score_log_s[b].flatten(), dE_ds * cov.s[b].flatten(), atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("name", list(COVS))
def test_tweedie_posterior_mean_equals_the_wiener_filter(name):
    cov = COVS[name]
    y = MU + torch.randn(2, C, H, W, generator=torch.Generator().manual_seed(6))
    x_hat = aebm.posterior_mean(PRIOR, y, cov)
    for b in range(2):
        Cm = PRIOR.C_dense
        K = Cm + dense_sigma(cov.s[b], cov.basis)
        wiener = MU.flatten() + Cm @ torch.linalg.solve(K, (y[b] - MU).flatten())
        torch.testing.assert_close(x_hat[b].flatten(), wiener, atol=1e-8, rtol=0)


@pytest.mark.parametrize("basis", ["fft", "dct"])
def test_tweedie_equals_wiener_on_the_diagonal_fast_path(basis):
    c = symmetric_spectrum(1, 8, 8, seed=7)[None]
    prior = aebm.GaussianEnergy(0.5, cv.Covariance(c, "fft"))
    for cov in (cv.blur_problem((2, 1, 8, 8), 1.2, 0.05, basis).covariance(),
                cap(cv.sr_problem((2, 1, 8, 8), 2, 0.05, basis).covariance())):
        y = 0.5 + torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(8))
        x_hat = aebm.posterior_mean(prior, y, cov)
        Cm = dense_sigma(c[0], "fft")
        for b in range(2):
            K = Cm + dense_sigma(cov.s[b], basis)
            wiener = 0.5 + Cm @ torch.linalg.solve(K, (y[b] - 0.5).flatten())
            torch.testing.assert_close(x_hat[b].flatten(), wiener, atol=1e-8, rtol=0)


def per_sample_losses(energy, prior, cov_fn, n=4000, seed=0):
    """Per-sample L_DSM, L_CSM with x ~ prior; the same seed gives the same x and noise (common
    random numbers), so differences between energies are paired."""
    g = torch.Generator().manual_seed(seed)
    x = prior.sample(n, g)
    return aebm.dual_score_losses(energy, x, cov_fn(n), generator=g)


def significantly_larger(a, b):
    """E[a] > E[b] by more than 4 standard errors of the paired difference."""
    diff = a - b
    return diff.mean() > 4 * diff.std() / math.sqrt(len(diff))


def small_covariance(basis):
    """n -> the covariance of n 4x4 images: a blur (fft) or a box mask (pixel)."""
    if basis == "fft":
        return lambda n: cv.blur_problem((n, 1, 4, 4), 0.8, 0.3, "fft").covariance()
    return lambda n: cv.mask_covariance(cv.box_mask((n, 1, 4, 4), 2), 0.5, 0.05, 1)


def stationary_prior(scale=1.0, shift=0.0):
    c = symmetric_spectrum(1, 4, 4, seed=9)[None] * 0.2
    return aebm.GaussianEnergy(0.5 + shift, cv.Covariance(c * scale, "fft"))


@pytest.mark.parametrize("basis", ["fft", "pixel"])
def test_exact_energy_minimises_both_losses(basis):
    true = stationary_prior()
    cov_fn = small_covariance(basis)
    ref = per_sample_losses(true, true, cov_fn)
    for wrong in (stationary_prior(scale=1.5), stationary_prior(scale=0.6), stationary_prior(shift=0.3)):
        got = per_sample_losses(wrong, true, cov_fn)
        assert significantly_larger(got[0], ref[0])  # A-DSM
        assert significantly_larger(got[1], ref[1])  # A-CSM


def test_dsm_cannot_see_a_sigma_dependent_constant_but_csm_can():
    true = stationary_prior()
    shifted = lambda y, cov: true(y, cov) + 0.3 * cov.log_s.flatten(1).sum(1)  # E + c(Sigma)
    cov_fn = lambda n: cv.blur_problem((n, 1, 4, 4), 0.8, 0.3, "fft").covariance()
    ref = per_sample_losses(true, true, cov_fn)
    got = per_sample_losses(shifted, true, cov_fn)
    torch.testing.assert_close(got[0], ref[0], atol=1e-12, rtol=1e-12)  # A-DSM unchanged, sample by sample
    assert significantly_larger(got[1], ref[1])  # A-CSM detects it
    # and by exactly the expected amount: dc/dlog s_k = 0.3 adds 0.3^2 in expectation
    assert abs((got[1] - ref[1]).mean().item() - 0.09) < 0.01


def test_dual_score_loss_combines_groups_and_the_dsm_only_switch():
    true = stationary_prior()
    x = true.sample(6, torch.Generator().manual_seed(0))
    groups = [(slice(0, 2), cv.isotropic(0.1, (2, 1, 4, 4), "pixel")),
              (slice(2, 6), cv.blur_problem((4, 1, 4, 4), 1.0, 0.2, "fft").covariance())]
    L, dsm, csm = aebm.dual_score_loss(true, x, groups, lam=1.0, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    a = aebm.dual_score_losses(true, x[0:2], groups[0][1], g)
    b = aebm.dual_score_losses(true, x[2:6], groups[1][1], g)
    torch.testing.assert_close(dsm, torch.cat([a[0], b[0]]).mean())
    torch.testing.assert_close(csm, torch.cat([a[1], b[1]]).mean())
    torch.testing.assert_close(L, dsm + csm)
    L0, dsm0, csm0 = aebm.dual_score_loss(true, x, groups, lam=0.0, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(L0, dsm0) and torch.testing.assert_close(dsm0, dsm)
    assert math.isnan(csm0)


class RandomConvNet(torch.nn.Module):
    """Any theta: an arbitrary fixed function of (input, log s) standing in for the UNet."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(C, C, 3, 3, generator=g))

    def forward(self, x, cov):
        return 5 * torch.nn.functional.conv2d(x, self.w, padding=1) + torch.tanh(cov.log_s) + 3


@pytest.mark.parametrize("basis", cv.BASES)
def test_m3_energy_tends_to_the_gaussian_limit_for_any_theta(basis):
    model = aebm.EnergyModel(RandomConvNet(), mean=0.5, data_var=0.1)
    y = 0.5 + 3 * torch.randn(2, C, H, W, generator=torch.Generator().manual_seed(0))
    gaps = []
    for s in (1e2, 1e4, 1e6):
        cov = cv.isotropic(s, (2, C, H, W), basis)
        y_s = 0.5 + math.sqrt(s) * torch.randn(2, C, H, W, generator=torch.Generator().manual_seed(1))
        gaps.append((model(y_s, cov) - aebm.gaussian_limit_energy(y_s, cov, 0.5, 0.1)).abs().max().item())
    assert gaps[2] < 1e-3 and gaps[1] / gaps[2] > 30 and gaps[0] / gaps[1] > 30  # O(1/s)
    # and at small s the learned term does matter
    small = cv.isotropic(0.01, (2, C, H, W), basis)
    assert (model(y, small) - aebm.gaussian_limit_energy(y, small, 0.5, 0.1)).abs().min() > 1e-2


def test_fft_covariance_score_is_symmetric_under_k_to_minus_k():
    model = aebm.EnergyModel(RandomConvNet())
    cov = cv.blur_problem((2, C, H, W), 1.0, 0.1, "fft").covariance()
    cov = cv.Covariance(cov.s.clamp(max=1e3), "fft")
    y = torch.rand(2, C, H, W, generator=torch.Generator().manual_seed(0))
    _, _, score_log_s = aebm.energy_and_scores(model, cov.U(y), cov)
    torch.testing.assert_close(score_log_s, cv.reflect_freq(score_log_s))


def test_log_prob_and_bits_per_dim_of_a_gaussian():
    prior = stationary_prior()
    x = prior.sample(3, torch.Generator().manual_seed(0))
    lp = aebm.log_prob(prior, x, s=1e-12)
    ref = -gaussian_nll(x.flatten(1), prior.mean.expand(1, 4, 4), prior.C_dense)
    torch.testing.assert_close(lp, ref, atol=1e-6, rtol=0)
    assert aebm.bits_per_dim(torch.tensor(0.0), 16) == 8
    torch.testing.assert_close(aebm.bits_per_dim(-lp, 16), -lp / (16 * math.log(2)) + 8)



class RandomUNetLike(torch.nn.Module):
    """A random smooth network mixing all pixels (as a UNet does)."""

    def __init__(self, d, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.A = torch.nn.Parameter(torch.randn(d, d, generator=g) / math.sqrt(d))

    def forward(self, x, cov):
        return torch.tanh(x.flatten(1) @ self.A.T).view_as(x)


def tweedie_error_at_missing_pixels(model, shrink_input):
    """Posterior-mean error at missing pixels (s = 1e8) for a random network, with the plain network
    input y~ (shrink_input=False) or the Wiener-shrunk sqrt(w) y~ that EnergyModel uses."""
    if not shrink_input:  # M3 with the plain input: the network sees y~ itself
        net = model.net
        class Unshrunk(torch.nn.Module):
            def forward(self, x_in, cov):
                w = model.data_var / (model.data_var + cov.s)
                return net(cov.Uh(cov.U(x_in) / w.sqrt()), cov)  # undo the shrink
        model = aebm.EnergyModel(Unshrunk(), model.mean, model.data_var)
    x = torch.rand(4, C, H, W, generator=torch.Generator().manual_seed(0))
    cov = cv.mask_covariance(cv.box_mask(x.shape, 2), cv.S_HUGE, 0.01, C)
    y = x + cov.sample(torch.Generator().manual_seed(1))[0]
    x_hat = aebm.posterior_mean(model, y, cov)
    missing = cov.s >= cv.S_HUGE
    return (x_hat - 0.5)[missing].abs().max().item()


def test_wiener_shrunk_network_input_keeps_tweedie_bounded_where_nothing_is_observed():
    """Why EnergyModel feeds the network sqrt(w) y~ (docs/method.md §8): at a missing pixel the true
    posterior mean is ~ mu; a random network gives an O(1) error with the shrunk input and an
    error ~ sqrt(s_huge) = 1e4 times its sensitivity with the plain input y~."""
    model = aebm.EnergyModel(RandomUNetLike(C * H * W), mean=0.5, data_var=0.1)
    assert tweedie_error_at_missing_pixels(model, shrink_input=True) < 1.0
    assert tweedie_error_at_missing_pixels(model, shrink_input=False) > 100.0


def test_the_exact_energy_still_minimises_the_edm_weighted_dsm_loss():
    """A per-coordinate weight (s + sigma_d^2)/sigma_d^2 that does not depend on y keeps the minimiser of
    A-DSM (x^_k = E[x_k | y]): the exact energy beats wrong ones in expectation (paired), and a
    Sigma-dependent constant still changes nothing sample by sample."""
    true = stationary_prior()
    cov_fn = lambda n: cv.mask_covariance(cv.box_mask((n, 1, 4, 4), 2), 50.0, 0.05, 1)
    def losses(energy):
        g = torch.Generator().manual_seed(0)
        x = true.sample(4000, g)
        return aebm.dual_score_losses(energy, x, cov_fn(4000), generator=g, dsm_weight=0.1)
    ref = losses(true)
    for wrong in (stationary_prior(scale=1.5), stationary_prior(scale=0.6), stationary_prior(shift=0.3)):
        assert significantly_larger(losses(wrong)[0], ref[0])
    shifted = lambda y, cov: true(y, cov) + 0.3 * cov.log_s.flatten(1).sum(1)
    torch.testing.assert_close(losses(shifted)[0], ref[0], atol=1e-12, rtol=1e-12)
    plain = aebm.dual_score_losses(true, true.sample(8, torch.Generator().manual_seed(0)), cov_fn(8),
                                   generator=torch.Generator().manual_seed(1))[0]
    weighted = aebm.dual_score_losses(true, true.sample(8, torch.Generator().manual_seed(0)), cov_fn(8),
                                      generator=torch.Generator().manual_seed(1), dsm_weight=0.1)[0]
    assert (weighted > plain).all()  # the missing pixels now count


def test_edm_pixel_weights_a_dsm_in_the_pixel_basis_only():
    """dsm_weight="edm-pixel": EDM's weight (s + sigma_d^2)/sigma_d^2 for a mask or sigma^2 I in pixels (so a
    hole's fill trains), M5's unweighted loss for a spectral Sigma; the same losses, noise for noise, as the
    two options it combines."""
    model = aebm.EnergyModel(RandomUNetLike(C * H * W), mean=0.5, data_var=0.1)
    x = torch.rand(3, C, H, W, generator=torch.Generator().manual_seed(0))
    pixel = cv.mask_covariance(cv.box_mask((3, C, H, W), 2), 1e3, 0.01, 1)
    fft = cv.blur_problem((3, C, H, W), 1.5, 0.05, "fft").covariance()
    for cov, same, other in ((pixel, 0.1, None), (fft, None, 0.1)):
        loss = lambda w: aebm.dual_score_losses(model, x, cov, generator=torch.Generator().manual_seed(1),
                                                need_csm=False, dsm_weight=w)[0]
        torch.testing.assert_close(loss("edm-pixel"), loss(same))
        assert not torch.allclose(loss("edm-pixel"), loss(other))


def test_the_expected_losses_of_the_exact_energy_have_their_closed_form():
    """For a prior diagonal in the basis of Sigma, x_k ~ N(mu_k, c_k), with a_k^2 = s_k / (c_k + s_k):
    E[L_DSM] = mean_k (1 - a_k^2) (the posterior variance of zeta_k) and E[L_CSM] = mean_k (1 - a_k^4)/2
    (Var(zeta_k^2 | y) / 4 for zeta_k | y ~ N(a_k u_k, 1 - a_k^2))."""
    c = 0.05 + 0.3 * torch.rand(1, 4, 4, generator=torch.Generator().manual_seed(2))
    prior = aebm.GaussianEnergy(0.5, cv.Covariance(c[None], "pixel"))  # diagonal in the pixel basis
    n = 20000
    cov = cv.mask_covariance(cv.box_mask((n, 1, 4, 4), 2), 2.0, 0.03, 1)
    x = 0.5 + c.sqrt() * torch.randn(n, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    L_dsm, L_csm = aebm.dual_score_losses(prior, x, cov, generator=torch.Generator().manual_seed(1))
    a2 = cov.s[0] / (c + cov.s[0])
    for got, expected in ((L_dsm, (1 - a2).mean()), (L_csm, (0.5 * (1 - a2 ** 2)).mean())):
        assert abs(got.mean() - expected) < 4 * got.std() / math.sqrt(n)


def test_the_exact_energy_under_sigma2_I_takes_the_priors_basis_and_equals_the_dense_cholesky():
    """sigma^2 I is the same matrix in every basis, so a diagonal prior evaluates it in its own basis
    (fast) whatever basis the covariance is written in; energies and scores equal the dense path's."""
    field = data.GaussianField(8, 2)
    x = field.prior.sample(3, torch.Generator().manual_seed(0))
    for basis in ("pixel", "dct"):
        cov = cv.isotropic(torch.tensor([0.01, 0.1, 1.0]), x.shape, basis, dtype=torch.float64)
        dense = field.prior.dense_energy(x - field.prior.mean, cov)
        torch.testing.assert_close(field.prior(x, cov), dense, atol=1e-10, rtol=1e-12)
        _, score_z, score_log_s = aebm.energy_and_scores(field.prior, cov.U(x), cov)
        K = field.prior.C_dense + cov.dense()  # (B, d, d); dE/dy = (C + Sigma)^-1 (y - mu)
        grad = torch.linalg.solve(K, (x - field.prior.mean).flatten(1).unsqueeze(-1)).view_as(x)
        torch.testing.assert_close(cov.Uh(score_z), grad, atol=1e-9, rtol=1e-9)
        assert torch.isfinite(score_log_s).all()
