"""Claims about precision (docs/precision.md): every inference path run in float32, as users run it,
gives the float64 answer to float32-sized error at 32x32x3 (64x64x3 in the slow tests), for every
task: denoising; box, half and random inpainting; deblurring (b = 0.5, 1.5, 3) and SR (x2, x4) in
fft and dct; noise 0.01, 0.05 and 0.2. Three energies: M3 with F = 0 (the Gaussian limit, whose
posterior mean is a closed-form Wiener filter), the exact GaussianEnergy of the built-in Gaussian
field, and M3 around a random UNet with a large output (its learned term moves the posterior mean
by 0.06 (denoising) to 0.5). Observations are made once in float64 and cast; samplers get the same noise in both
precisions (covariances.white_noise draws in float64)."""

import copy
import functools

import pytest
import torch

import aebm
import covariances as cv
import data
import nets
import sample
from experiments.precision import TASKS, observation
from tests.test_nets import randomized

NOISES = (0.01, 0.05, 0.2)
TOL = 1e-3  # max per-pixel difference allowed between float32 and float64 (images in [0, 1])


@functools.lru_cache(maxsize=None)
def energies(size):
    """{name: (energy in float64, the same in float32)} at size x size x 3."""
    torch.manual_seed(0)
    gauss = aebm.EnergyModel(nets.build_unet("tiny", size, 3), 0.5, 1 / 12)  # zero output layer: F = 0
    net = randomized(nets.build_unet("tiny", size, 3), std=0.1)
    with torch.no_grad():  # a large learned term (see the module docstring)
        net.out[-1].weight.mul_(50)
        net.out[-1].bias.mul_(50)
    random = aebm.EnergyModel(net, 0.5, 1 / 12)
    exact = data.GaussianField(size, 3).prior
    return {name: (copy.deepcopy(e).double(), copy.deepcopy(e).float()) for name, e in
            (("gauss", gauss), ("random", random), ("exact", exact))}


@functools.lru_cache(maxsize=None)
def images(size, name, n=2):
    """Held-out images in float64: Gaussian-field draws for the exact prior, dead leaves otherwise."""
    if name == "exact":
        return data.GaussianField(size, 3).prior.sample(n, torch.Generator().manual_seed(1)).double()
    return data.DeadLeaves(size, 3).get_batch(n, torch.Generator().manual_seed(1)).double()


def lower(t):
    """float64 -> float32, complex128 -> complex64."""
    return t.to(torch.complex64 if t.is_complex() else torch.float32)


def as32(y, cov):
    return y.float(), cv.Covariance(cov.s.float(), cov.basis)


def wiener(name, energy64, y, cov):
    """The closed-form posterior mean in float64, by a route independent of the one under test: for
    F = 0, the Wiener filter of N(mu, sigma_d^2 I) in the task's basis; for the exact prior, the
    generic Tweedie formula (M4) on the plain energy function, x^ = U^H(z - s dE/dz)."""
    if name == "gauss":
        prior = aebm.GaussianEnergy(0.5, cv.Covariance(torch.full((1, *y.shape[1:]), 1 / 12, dtype=torch.float64), cov.basis))
        return prior.posterior_mean(y, cov)
    return aebm.posterior_mean(lambda yy, cc: energy64(yy, cc), y, cov)


def check_posterior_means(size, names, noises, tasks=TASKS):
    worst = {}
    for name in names:
        e64, e32 = energies(size)[name]
        x = images(size, name)
        for noise in noises:
            for task, argv in tasks:
                y, cov, _ = observation(x, argv, noise, 0.5 if name != "exact" else e64.mean)
                x64 = aebm.posterior_mean(e64, y, cov)
                x32 = aebm.posterior_mean(e32, *as32(y, cov))
                diff = (x32.double() - x64).abs().max().item()
                assert diff < TOL, (name, task, noise, diff)
                # the generic route for the exact prior outside its basis is dense Cholesky: 32x32 only
                if name == "gauss" or (name == "exact" and (size <= 32 or "fft" in task)):
                    assert (x32.double() - wiener(name, e64, y, cov)).abs().max().item() < TOL, (name, task, noise)
                worst[name] = max(worst.get(name, 0), diff)
    return worst  # measured at 32x32x3: gauss 2.9e-4, exact 3.0e-4, random 3.0e-4 (weakly informative blur coordinates)


@pytest.mark.parametrize("noise", NOISES)
@pytest.mark.parametrize("name", ["gauss", "exact", "random"])
def test_float32_posterior_mean_equals_float64_and_the_wiener_filter_at_32(name, noise):
    check_posterior_means(32, [name], [noise])


@pytest.mark.slow
def test_float32_posterior_mean_equals_float64_and_the_wiener_filter_at_64():
    check_posterior_means(64, ["gauss", "exact", "random"], [0.05])


def trajectory_tasks(name):
    """Tasks for the sampler checks: the exact prior only where Sigma is diagonal in its basis (fft; the
    others run dense Cholesky at every level), the random network on one task of each kind."""
    if name == "exact":
        return [(t, a) for t, a in TASKS if "fft" in t]
    return [(t, a) for t, a in TASKS if t in ("denoise", "inpaint random", "deblur b=3.0 dct", "sr x4 fft")]


@pytest.mark.parametrize("name", ["random", "exact"])
def test_ula_trajectories_in_float32_follow_float64_over_50_levels(name):
    e64, e32 = energies(32)[name]
    x = images(32, name)
    for task, argv in trajectory_tasks(name):
        y, cov, _ = observation(x, argv, 0.05, 0.5 if name != "exact" else e64.mean)
        run = lambda e, yy, cc: sample.reverse_diffusion(e, yy, cc, levels=50, s_end=1e-4, corrector="ula",
                                                         generator=torch.Generator().manual_seed(3))
        a, b = run(e64, y, cov), run(e32, *as32(y, cov))
        assert (b.x.double() - a.x).abs().max() < TOL, task
        assert (b.x_mean.double() - a.x_mean).abs().max() < TOL, task


@pytest.mark.slow
def test_ula_trajectories_in_float32_follow_float64_at_64():
    e64, e32 = energies(64)["random"]
    x = images(64, "random")
    for task, argv in [t for t in TASKS if t[0] == "deblur b=3.0 dct"]:
        y, cov, _ = observation(x, argv, 0.05, 0.5)
        run = lambda e, yy, cc: sample.reverse_diffusion(e, yy, cc, levels=50, s_end=1e-4, corrector="ula",
                                                         generator=torch.Generator().manual_seed(3))
        a, b = run(e64, y, cov), run(e32, *as32(y, cov))
        assert (b.x.double() - a.x).abs().max() < TOL, task


def test_adaptive_any_order_and_unconditional_paths_in_float32_follow_float64():
    """The adaptive schedule (M13) is checked on the F = 0 energy: its rule 1/s' = 1/s + gamma relu(dE/ds)
    moves coordinates whose dE/ds is ~0 by gamma times a gradient known only to its rounding, so with a
    random network (dE/dlog s ~ 1e6) or the exact prior its paths separate even in float64 when the
    observation is rounded to float32 (measured: 6e-3 and 1.1 at 20 levels); with F = 0 it is 5e-4."""
    e64, e32 = energies(32)["gauss"]
    x = images(32, "gauss")
    for task, argv in [TASKS[1], TASKS[8]]:  # box inpainting, SR x4 (fft)
        y, cov, _ = observation(x, argv, 0.05, 0.5)
        run = lambda e, yy, cc: sample.reverse_diffusion(e, yy, cc, levels=20, s_end=1e-4, schedule="adaptive",
                                                         generator=torch.Generator().manual_seed(3))
        assert (run(e32, *as32(y, cov)).x.double() - run(e64, y, cov).x).abs().max() < TOL, task
    e64, e32 = energies(32)["random"]
    gen = lambda e: sample.generate(e, (2, 3, 32, 32), levels=20, generator=torch.Generator().manual_seed(4)).x
    assert (gen(e32).double() - gen(e64)).abs().max() < TOL
    order = lambda e: sample.any_order(e, (2, 3, 32, 32), P=16, levels_per_patch=5,
                                       generator=torch.Generator().manual_seed(5))[1]
    assert (order(e32).double() - order(e64)).abs().max() < TOL


@pytest.mark.parametrize("name", ["random", "exact"])
def test_mala_log_acceptance_ratios_in_float32_match_float64(name):
    """One level of the path (s = geometric level 25 of 50), three MALA steps from the same state with
    the same noise: the log acceptance ratios agree to 1e-3 while the decisions agree (measured:
    ~1e-5; a decision flipped right at the threshold would end the comparison, none did)."""
    e64, e32 = energies(32)[name]
    x = images(32, name)
    for task, argv in trajectory_tasks(name):
        y, cov, _ = observation(x, argv, 0.05, 0.5 if name != "exact" else e64.mean)
        s = sample.geometric_level(cov.s.clamp(max=sample.S_MAX_PRIOR), 1e-4, 25, 50)
        z0 = cov.U(x + cv.Covariance(s, cov.basis).sample(torch.Generator().manual_seed(6))[0])
        ratios = {}
        for key, e, cast in (("64", e64, lambda t: t), ("32", e32, lower)):
            logs = []
            sample.langevin(e, cast(z0), cast(cov.U(y)), cast(cov.s), cast(s), cov.basis, n_steps=3, method="mala",
                            generator=torch.Generator().manual_seed(7), log_alphas=logs)
            ratios[key] = torch.stack(logs)  # (steps, B)
        assert (ratios["32"][0] - ratios["64"][0]).abs().max() < TOL, (task, ratios)
        assert ratios["64"][0].abs().max() > 1e-3  # the ratios are not trivially zero


def test_blind_estimates_are_the_same_in_float32():
    for name in ("random", "gauss"):
        e64, e32 = energies(32)[name]
        x = images(32, name)
        y, cov, _ = observation(x, ["--task", "inpaint", "--box-size", "16"], 0.05, 0.5)
        sizes, noises = [8, 16, 24], [0.02, 0.05, 0.1]
        g64, a64, n64 = aebm.blind_inpaint(e64, y, 3, sizes, noises)
        g32, a32, n32 = aebm.blind_inpaint(e32, y.float(), 3, sizes, noises)
        assert torch.equal(a32, a64) and torch.equal(n32, n64)
        # a box smaller than the truth sees pixels of ~1e4 as observed: energies ~1e11, equal to 1e-7 relative;
        # the true size's candidates differ by a few nats, equal to 1e-2 nats (measured 1e-4)
        assert ((g32 - g64).abs() / g64.abs()).max() < 1e-6
        assert (g32 - g64)[:, 1].abs().max() < 0.01
        prob = cv.blur_problem(x.shape, 1.5, 0.05, "dct")
        y_obs = prob.measure(x, torch.Generator().manual_seed(8))
        g64, b64, n64 = aebm.blind_deblur(e64, y_obs, [1.0, 1.5, 2.0], noises, "dct", 0.5)
        g32, b32, n32 = aebm.blind_deblur(e32, y_obs.float(), [1.0, 1.5, 2.0], noises, "dct", 0.5)
        assert torch.equal(b32, b64) and torch.equal(n32, n64)
        assert (g32 - g64).abs().max() < 0.01  # nats, out of ~3e3 (measured 2e-3)


@pytest.mark.parametrize("name", ["random", "exact"])
def test_log_probabilities_in_float32_match_float64_per_dimension(name):
    e64, e32 = energies(32)[name]
    x = images(32, name)
    d = x[0].numel()
    basis = "fft" if name == "exact" else "pixel"
    lp64, lp32 = aebm.log_prob(e64, x, basis=basis), aebm.log_prob(e32, x.float(), basis=basis)
    assert ((lp32 - lp64).abs() / d).max() < TOL
    assert (aebm.bits_per_dim(-lp32, d) - aebm.bits_per_dim(-lp64, d)).abs().max() < TOL
    for task, argv in trajectory_tasks(name):
        y, cov, _ = observation(x, argv, 0.05, 0.5 if name != "exact" else e64.mean)
        post64 = aebm.log_posterior(e64, x, y, cov, basis)
        post32 = aebm.log_posterior(e32, x.float(), *as32(y, cov), basis)
        assert ((post32 - post64).abs() / d).max() < TOL, task


def test_posterior_mean_does_not_depend_on_variances_above_the_training_range():
    """Coordinates above S_MAX = 1e3 (missing pixels, dropped or nearly dropped frequencies) look alike
    to the network (log s clamped in the embedding, input ~ sigma_d zeta / sqrt(s)): the posterior mean
    barely depends on how large s is there (float32, random network with a large output). Inpainting:
    missing variance 1e6, 1e8 or 1e10 with the same zeta (a draw consistent with each). Deblurring
    (b = 3): M2's cap s_huge = 1e6, 1e7 or 1e8, which also decides which nearly-dropped frequencies
    count as observed (their data move the exact answer by c zeta / sqrt(s) < 3e-4; measured 4.4e-4
    in all). Above 1e8, M2's y~ holds values ~sqrt(s_huge) > 1e4 and float32 rounding grows (1.4e-3
    at 1e10): the default cap stays 1e8."""
    _, e32 = energies(32)["random"]
    x = images(32, "random").float()
    inpaint, deblur = [], []
    for s_missing, s_huge in ((1e6, 1e6), (1e8, 1e7), (1e10, 1e8)):
        cov = cv.mask_covariance(cv.box_mask(x.shape, 16), s_missing, 0.05 ** 2, 3)
        zeta = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
        inpaint.append(aebm.posterior_mean(e32, x + cov.Uh(cov.s.sqrt() * zeta), cov))
        deg = cv.Degradation(cv.blur_problem(x.shape, 3.0, 0.05, "dct").a, "dct", 0.05, s_huge=s_huge)
        y, cov = deg.to_denoising(deg.measure(x, torch.Generator().manual_seed(10)), 0.5)
        deblur.append(aebm.posterior_mean(e32, y, cov))
    for i in (1, 2):
        assert (inpaint[i] - inpaint[0]).abs().max() < TOL
        # 1.5e-3 with gains per frequency (nets.py): their gate, log s_k - mean log s, sees s unclamped, so the
        # cap moves every frequency's gain a little (clamping it to the training range is a retraining away)
        assert (deblur[i] - deblur[0]).abs().max() < 2 * TOL


def test_sample_cli_runs_float32_by_default_and_takes_float64_checkpoints(tmp_path):
    import train

    train.main(["--dataset", "gaussian", "--img-size", "8", "--channels", "1", "--config", "tiny", "--batch", "4",
                "--steps", "2", "--out", str(tmp_path / "run"), "--dtype", "float64", "--device", "cpu",
                "--eval-every", "100", "--val-batch", "2"])
    reports = {}
    for dtype in ("float32", "float64"):
        reports[dtype] = sample.main(["--ckpt", str(tmp_path / "run" / "ckpt.pt"), "--task", "deblur", "--sampler",
                                      "mean", "--n", "2", "--dtype", dtype, "--out", str(tmp_path / dtype)])
    assert abs(reports["float32"]["psnr_mean"] - reports["float64"]["psnr_mean"]) < 1e-3
    exact = sample.main(["--prior", "exact", "--img-size", "8", "--task", "sr", "--sampler", "mean", "--n", "2",
                         "--out", str(tmp_path / "exact")])
    assert exact["dtype"] == "float32"


def test_basis_transforms_are_exact_under_bf16_autocast():
    """The DCT is a pair of matrix products, which autocast would run in bf16: a 4.6 per-pixel error in
    the posterior mean of deblurring (found by bench.py's precision check). Transforms opt out of it."""
    x = torch.rand(2, 3, 32, 32)
    for basis in cv.BASES:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z, back = cv.to_basis(x, basis), cv.from_basis(cv.to_basis(x, basis), basis)
        assert z.dtype in (torch.float32, torch.complex64)
        torch.testing.assert_close(z, cv.to_basis(x, basis))
        torch.testing.assert_close(back, x, atol=1e-5, rtol=0)
