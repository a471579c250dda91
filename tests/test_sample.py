"""Claims about sample.py, each checked with the exact GaussianEnergy (docs/method.md §7, 7): posterior
means, corrector exactness, reverse diffusion moments, schedules, blind estimation, Bayes' rule
with normalized energies, metrics, and errors for impossible tasks."""

import math

import numpy as np
import pytest
import torch

import aebm
import covariances as cv
import data
import sample
from tests.dense import default_float64


@pytest.fixture(autouse=True)
def float64():
    with default_float64():
        yield


def field(size=4):
    return data.GaussianField(size, 1)


def box_observation(ds, n, size=2, s_missing=2.0, sigma=0.1, seed=0):
    """n copies of one anisotropic observation y~ = x + Sigma_y^{1/2} zeta of one image."""
    x = ds.prior.sample(1, torch.Generator().manual_seed(seed)).expand(n, -1, -1, -1)
    cov_y = cv.mask_covariance(cv.box_mask(x.shape, size), s_missing, sigma ** 2, 1)
    noise = cv.Covariance(cov_y.s[:1], "pixel").sample(torch.Generator().manual_seed(seed + 1))[0]
    return x, x[:1] + noise.expand_as(x), cov_y


def level_target(prior, y_obs, s_y, s):
    """Moments of pi_s(y) = p(y | y~) (M11) for a Gaussian prior N(mu, C): mean and covariance."""
    C = prior.C_dense
    S = torch.diag(s.flatten())
    Sy = torch.diag(s_y.flatten())
    K = C + S
    gain = K @ torch.linalg.inv(C + Sy)
    m = prior.mean.flatten() + gain @ (y_obs.flatten() - prior.mean.flatten())
    return m, K - gain @ K


@pytest.mark.parametrize("method", ["pixel", "fft", "dct"])
def test_posterior_mean_equals_the_wiener_filter(method):
    ds = field(8)
    args = sample.parse_args(["--task", "inpaint" if method == "pixel" else "deblur", "--noise", "0.05"]
                             + ([] if method == "pixel" else ["--basis", method]))
    args.missing_var = 3.0
    x = ds.prior.sample(3, torch.Generator().manual_seed(0))
    y, cov_y, _, _ = sample.observe(args, x, ds.prior.mean, torch.Generator().manual_seed(1))
    # 1e-7: deblurring leaves s = 1e8 on dropped frequencies, and the dense reference loses ~1e-8
    torch.testing.assert_close(aebm.posterior_mean(ds.prior, y, cov_y), ds.prior.posterior_mean(y, cov_y),
                               atol=1e-7, rtol=0)


def chain_moments(method, eta, tau, n=4000, steps=30):
    """Corrector chains at a fixed level, started from exact draws of pi: MALA must keep pi."""
    ds = field(4)
    _, y_obs, cov_y = box_observation(ds, n)
    s = 0.5 * cov_y.s
    m, K = level_target(ds.prior, y_obs[0], cov_y.s[0], s[0])
    L = torch.linalg.cholesky(K)
    g = torch.Generator().manual_seed(3)
    y = (m + torch.randn(n, 16, generator=g) @ L.T).view(n, 1, 4, 4)
    y, _, acc = sample.langevin(ds.prior, y, y_obs, cov_y.s, s, "pixel", steps, method, eta, tau, g)
    flat = y.flatten(1)
    mean_err = ((flat.mean(0) - m).abs() / (K.diagonal() / n).sqrt()).max().item()  # in standard errors
    var_err = (flat.var(0) / K.diagonal() - 1).abs().mean().item()
    return mean_err, var_err, acc


def test_mala_keeps_the_exact_target_where_ula_with_a_large_step_is_biased():
    mala = chain_moments("mala", eta=0.8, tau=1.0)
    ula = chain_moments("ula", eta=0.8, tau=1.0)
    assert mala[0] < 4.5 and mala[1] < 0.05  # exact: within statistical error (var s.e. ~ 2.2%)
    assert ula[1] > 2 * mala[1] and ula[1] > 0.08  # ULA's stationary law is off by O(eta)
    assert 0.2 < mala[2] < 1.0  # the large step is really rejected sometimes


@pytest.mark.slow
@pytest.mark.parametrize("corrector", ["ula", "mala"])
def test_reverse_diffusion_samples_have_the_posterior_mean_and_variance(corrector):
    ds = field(4)
    n = 2000
    x, y_obs, cov_y = box_observation(ds, n, s_missing=cv.S_HUGE)
    res = sample.reverse_diffusion(ds.prior, y_obs, cov_y, levels=80, s_end=1e-5, corrector=corrector,
                                   generator=torch.Generator().manual_seed(0))
    post_mean = ds.prior.posterior_mean(y_obs[:1], cov_y[:1]).flatten()
    post_var = ds.prior.posterior_cov(cov_y[:1])[0].diagonal()
    flat = res.x.flatten(1)
    z = (flat.mean(0) - post_mean) / (post_var / n).sqrt()
    assert z.abs().max() < 5, z
    assert (flat.var(0) / post_var - 1).abs().max() < 0.15
    assert 0.5 < res.acceptance <= 1.0


def test_geometric_schedule_starts_at_sigma_y_capped_and_ends_at_s_end():
    ds = field(4)
    _, y_obs, cov_y = box_observation(ds, 2, s_missing=cv.S_HUGE, sigma=0.1)
    s_y = cov_y.s.clone()
    s_y[..., 0, 0] = 1e-7  # a coordinate already below s_end stays where it is
    cov_y = cv.Covariance(s_y, "pixel")
    res = sample.reverse_diffusion(ds.prior, y_obs, cov_y, levels=10, s_end=1e-4, corrector=None, record=True)
    trace = torch.stack(res.trace)
    torch.testing.assert_close(trace[0], s_y.clamp(max=sample.S_MAX_PRIOR))  # observed: sigma_n^2; missing: 25^2
    expected_end = torch.where(s_y > 1e-4, torch.full_like(s_y, 1e-4), s_y)
    torch.testing.assert_close(trace[-1], expected_end)
    assert (trace[1:] <= trace[:-1]).all()


def test_adaptive_schedule_is_monotone_and_ends_at_s_end():
    ds = field(4)
    _, y_obs, cov_y = box_observation(ds, 3, s_missing=cv.S_HUGE)
    res = sample.reverse_diffusion(ds.prior, y_obs, cov_y, levels=12, s_end=1e-4, schedule="adaptive",
                                   generator=torch.Generator().manual_seed(0), record=True)
    trace = torch.stack(res.trace)
    assert (trace[1:] <= trace[:-1] * (1 + 1e-12)).all()
    torch.testing.assert_close(trace[-1], torch.full_like(trace[-1], 1e-4))
    mean_log = trace.log().flatten(2).mean(2)  # (levels+1, B): spread over the levels, not one jump
    assert ((mean_log[:-1] - mean_log[1:]) > 0.05).float().mean() > 0.75  # a level may wait (dE/ds <= 0 there)
    # it is not the geometric schedule: coordinates move at different rates
    assert (trace[6].flatten(1).std(1) > 0).all()


def true_vs_constant(c):
    """The exact energy, and the exact energy plus c * log det Sigma (a Sigma-dependent constant)."""
    def shifted(energy):
        return lambda y, cov: energy(y, cov) + c * cov.log_s.flatten(1).sum(1)
    return shifted


@pytest.mark.parametrize("size,sigma", [(4, 0.05), (8, 0.1), (12, 0.2), (12, 0.05)])
def test_blind_inpainting_recovers_box_and_noise_and_fails_without_normalization(size, sigma):
    """16x16 Gaussian field, 8 images sharing the degradation, box variance 1. (Noise 0.02 is left out:
    below the field's high-frequency power it is not identifiable from 8 images, measured 0.02 -> 0.05.)"""
    ds = field(16)
    n = 8
    x = ds.prior.sample(n, torch.Generator().manual_seed(size))
    cov = cv.mask_covariance(cv.box_mask(x.shape, size), 1.0, sigma ** 2, 1)
    y = x + cov.sample(torch.Generator().manual_seed(7))[0]
    sizes, noises = [4, 8, 12], [0.02, 0.05, 0.1, 0.2]
    grid, _, _ = aebm.blind_inpaint(ds.prior, y, 1, sizes, noises, missing_var=1.0)
    joint = grid.sum(0)  # the images share the degradation
    i, j = divmod(int(joint.argmin()), len(noises))
    assert (sizes[i], noises[j]) == (size, sigma)
    # E + c(Sigma) with c = 0.5 log det Sigma: same scores, not normalized -> the estimate is wrong
    wrong, _, _ = aebm.blind_inpaint(true_vs_constant(0.5)(ds.prior), y, 1, sizes, noises, missing_var=1.0)
    i, j = divmod(int(wrong.sum(0).argmin()), len(noises))
    assert (sizes[i], noises[j]) != (size, sigma)


def test_blind_deblurring_recovers_blur_and_noise():
    ds = field(16)
    x = ds.prior.sample(4, torch.Generator().manual_seed(0))
    stds, noises = [0.5, 1.0, 2.0], [0.01, 0.05, 0.2]
    for b, sigma in [(1.0, 0.05), (2.0, 0.01), (0.5, 0.2)]:
        prob = cv.blur_problem(x.shape, b, sigma, "fft")
        y_obs = prob.measure(x, torch.Generator().manual_seed(1))
        grid, _, _ = aebm.blind_deblur(ds.prior, y_obs, stds, noises, "fft", ds.prior.mean)
        i, j = divmod(int(grid.sum(0).argmin()), len(noises))
        assert (stds[i], noises[j]) == (b, sigma)


def test_degradation_nll_is_the_exact_density_of_the_measurement():
    """For a Gaussian prior, y_obs = A x + sigma xi is Gaussian N(A mu, A C A^T + sigma^2 I): the
    change of variables in degradation_nll must reproduce it (all coordinates informative here)."""
    ds = field(4)
    prob = cv.blur_problem((3, 1, 4, 4), 0.8, 0.1, "fft")
    y_obs = prob.measure(ds.prior.sample(3, torch.Generator().manual_seed(0)), torch.Generator().manual_seed(1))
    d = 16
    A = cv.blur_problem((1, 1, 4, 4), 0.8, 0.1, "fft").A(torch.eye(d).view(d, 1, 4, 4)).reshape(d, d).T
    K = A @ ds.prior.C_dense @ A.T + 0.01 * torch.eye(d)
    mu = torch.full((d,), ds.mean)
    ref = -torch.distributions.MultivariateNormal(A @ mu, K).log_prob(y_obs.flatten(1))
    torch.testing.assert_close(aebm.degradation_nll(ds.prior, y_obs, prob, ds.prior.mean), ref, atol=1e-8, rtol=1e-10)


def test_log_posterior_by_bayes_rule_equals_the_exact_posterior_density():
    ds = field(4)
    x, y_obs, cov_y = box_observation(ds, 3, s_missing=2.0, sigma=0.1)
    m = ds.prior.posterior_mean(y_obs[:1], cov_y[:1]).flatten()
    K = ds.prior.posterior_cov(cov_y[:1])[0]
    probe = x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    ref = torch.distributions.MultivariateNormal(m, K).log_prob(probe.flatten(1))
    got = aebm.log_posterior(ds.prior, probe, y_obs, cov_y, prior_basis="fft", s_prior=1e-12)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)


def test_unconditional_samples_have_the_prior_statistics():
    ds = field(4)
    res = sample.generate(ds.prior, (1500, 1, 4, 4), levels=60, s_end=1e-5, generator=torch.Generator().manual_seed(0))
    flat = res.x.flatten(1)
    assert (flat.mean(0) - 0.5).abs().max() < 5 * math.sqrt(ds.var / 1500)
    assert (flat.var(0) / ds.var - 1).abs().max() < 0.15


def test_any_order_generation_fills_every_patch():
    ds = field(4)
    y, x_hat = sample.any_order(ds.prior, (800, 1, 4, 4), P=2, order=[3, 0, 2, 1], levels_per_patch=60,
                                generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(x_hat).all()
    ratio = y.flatten(1).var(0) / ds.var  # every patch went from 25^2 down to the prior's scale
    assert 0.85 < ratio.mean() < 1.25 and ratio.max() < 1.35  # measured: mean 1.15, max 1.20 (predictor-only M12 bias)
    with pytest.raises(ValueError, match="patch size 3"):
        sample.any_order(ds.prior, (1, 1, 4, 4), P=3)


def ssim_slow(x, y, size=11, sigma=1.5):
    """SSIM by explicit loops over windows and channels (numpy), the reference for data.ssim."""
    t = np.arange(size) - (size - 1) / 2
    g = np.exp(-0.5 * (t / sigma) ** 2)
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    out = []
    for b in range(x.shape[0]):
        vals = []
        for c in range(x.shape[1]):
            X, Y = x[b, c], y[b, c]
            for i in range(X.shape[0] - size + 1):
                for j in range(X.shape[1] - size + 1):
                    px, py = X[i : i + size, j : j + size], Y[i : i + size, j : j + size]
                    mx, my = (w * px).sum(), (w * py).sum()
                    vx, vy = (w * px * px).sum() - mx ** 2, (w * py * py).sum() - my ** 2
                    cxy = (w * px * py).sum() - mx * my
                    vals.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
        out.append(np.mean(vals))
    return np.array(out)


def test_ssim_and_psnr_match_slow_references():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 16, 16, generator=g)
    y = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    np.testing.assert_allclose(data.ssim(y, x).numpy(), ssim_slow(y.numpy(), x.numpy()), rtol=1e-10)
    assert data.ssim(x, x).allclose(torch.ones(2))
    mse = ((x - y) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(data.psnr(y, x), -10 * torch.log10(mse))


@pytest.mark.parametrize("argv,message", [
    (["--task", "inpaint", "--box-size", "40"], "box size 40"),
    (["--task", "sr", "--sr-factor", "3"], "--sr-factor 3"),
])
def test_impossible_task_parameters_give_clear_errors(argv, message):
    args = sample.parse_args(argv + ["--basis", "dct"])
    with pytest.raises(ValueError, match=message):
        sample.build_task(args, (1, 1, 16, 16), "cpu", torch.float64)


@pytest.mark.parametrize("argv,message", [
    (["--task", "deblur", "--noise", "-0.1"], "--noise must be positive"),
    (["--task", "inpaint", "--mask", "random", "--ratio", "1.5"], "--ratio"),
    (["--task", "deblur", "--blur-std", "-2"], "--blur-std must be positive"),
    (["--n", "0"], "--n must be positive"), (["--steps", "-3"], "--steps must be positive"),
    (["--correctors", "-1"], "--correctors must be 0 or more"), (["--samples", "0"], "--samples must be positive"),
    (["--eta", "-0.1"], "--eta must be positive"), (["--eta", "50"], "--eta 50.0 is too large"),
    (["--tau", "0"], "--tau must be positive"), (["--tau", "1e6"], "--tau 1000000.0 is too large"),
    (["--s-end", "-1"], "--s-end must be positive"), (["--s-end", "0.1"], "must be below the noise variance"),
    (["--task", "uncond", "--blind"], "--task uncond generates images"),
    (["--img-size", "0"], "--img-size must be positive"), (["--channels", "2"], "--channels must be 1 or 3"),
    (["--input", "a.png", "--observed", "b.png"], "not both"), (["--task", "deblur", "--mask-file", "m.png"], "--mask-file is for"),
    (["--missing-var", "0"], "--missing-var must be positive"), (["--noise", "nan"], "--noise must be positive"),
])
def test_impossible_flags_are_refused_at_parse_time_naming_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit):
        sample.parse_args(argv)
    assert message in capsys.readouterr().err


def test_cuda_without_a_gpu_and_unusable_out_give_one_line_errors(tmp_path, capsys):
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            sample.parse_args(["--device", "cuda"])
        assert "no CUDA device is available" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a directory"):
        sample.main(["--prior", "exact", "--img-size", "8", "--out", str(tmp_path / "file")])


def test_missing_checkpoint_says_how_to_make_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="python train.py"):
        sample.main(["--ckpt", str(tmp_path / "none.pt"), "--out", str(tmp_path)])


def test_cli_runs_every_task_with_the_exact_prior(tmp_path):
    for argv in (["--task", "inpaint", "--blind", "--missing-var", "1.0"], ["--task", "deblur", "--blind"],
                 ["--task", "sr", "--sampler", "mala"], ["--task", "denoise", "--sampler", "mean"],
                 ["--task", "uncond"], ["--task", "inpaint", "--mask", "half", "--sampler", "adaptive"]):
        report = sample.main(argv + ["--prior", "exact", "--img-size", "8", "--steps", "10", "--n", "2",
                                     "--out", str(tmp_path)])
        assert math.isfinite(report["bpd_truth"])
        if argv[1] != "uncond":
            assert report["psnr_mean"] > 10


def test_sigma_preconditioned_ula_diverges_where_the_posterior_preconditioner_is_stable():
    """docs/method.md §8: at the start of the path Sigma ~ Sigma_y on observed pixels. With the
    preconditioner P = Sigma the likelihood term multiplies y~ - y by 1 - eta s/(s_y - s) = -13.9 per
    step (eta = 0.15, s = 0.99 s_y) and ULA blows up; with P = Sigma (Sigma_y - Sigma)/Sigma_y it is
    1 - eta s/s_y and the chain stays at the target's scale."""
    ds = field(4)
    _, y_obs, cov_y = box_observation(ds, 64, s_missing=cv.S_HUGE, sigma=0.1)
    s = 0.99 * cov_y.s.clamp(max=sample.S_MAX_PRIOR)
    y = y_obs.clone()
    y = torch.where(cov_y.s >= cv.S_HUGE, 0.5 + s.sqrt() * torch.randn(y.shape, generator=torch.Generator().manual_seed(0)), y)
    ours, _, _ = sample.langevin(ds.prior, y, y_obs, cov_y.s, s, "pixel", 10, "ula", 0.15, 0.9,
                                 torch.Generator().manual_seed(1))
    method, _, _ = sample.langevin(ds.prior, y, y_obs, cov_y.s, s, "pixel", 10, "ula", 0.15, 0.9,
                                   torch.Generator().manual_seed(1), precond="sigma")
    observed = cov_y.s < cv.S_HUGE
    assert (ours - y_obs)[observed].abs().max() < 1.0  # stays within a few sigma_n of y~
    assert (method - y_obs)[observed].abs().max() > 1e6  # |-13.9|^10 growth


def test_adaptive_schedule_falls_at_bounded_pace_and_samples_as_well_as_the_geometric_one():
    """M13 alone left coordinates at the prior's scale until the last level, and that one Euler step
    ruined the samples (7.6 dB against 13.6 dB geometric, 16x16 deblurring). With the pace bounds no
    coordinate falls by more than the stated ratio per level, and the samples match the geometric
    path's quality (measured 14.7 vs 14.6 dB, 100 levels with ULA, 8 images)."""
    ds = field(16)
    x = ds.prior.sample(8, torch.Generator().manual_seed(0))
    prob = cv.blur_problem(x.shape, 1.5, 0.05, "fft")
    y, cov = prob.to_denoising(prob.measure(x, torch.Generator().manual_seed(1)), 0.5)
    levels = 40
    run = lambda schedule: sample.reverse_diffusion(ds.prior, y, cov, levels=levels, s_end=1e-4, schedule=schedule,
                                                    generator=torch.Generator().manual_seed(3), record=True)
    adaptive, geometric = run("adaptive"), run("geometric")
    trace = torch.stack(adaptive.trace)
    ratio = (cov.s.clamp(max=sample.S_MAX_PRIOR).max().item() / 1e-4) ** (2 / levels)
    assert (trace[:-1] / trace[1:]).max() <= ratio * (1 + 1e-9)
    assert data.psnr(adaptive.x_mean, x).mean() > data.psnr(geometric.x_mean, x).mean() - 1.0
