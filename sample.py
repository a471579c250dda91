"""
Inference (docs/method.md §6): every sampler as one plain loop over the energy protocol, the inverse
problems as tasks, blind estimation, log-probabilities, and the command line.

    python sample.py --task inpaint --blind          # after `python train.py`
    python sample.py --task deblur --sampler mala --prior exact    # no training: exact Gaussian prior

Every function takes an `energy(y, cov)` (aebm.py), so the learned EnergyModel and the exact
GaussianEnergy are interchangeable; tests/test_sample.py runs each sampler on the exact energy.

The posterior problem. A task gives an anisotropic-denoising observation (y_obs~, Sigma_y)
(covariances.Degradation.to_denoising, M2). With Sigma_t = diag(s_t) in Sigma_y's basis:
  - posterior mean in one shot: x^ = y~ - Sigma_y dE/dy (M4);
  - reverse diffusion: start from p(y_0 | y~) with Sigma_0 = Sigma_y (capped at s_max), then
    alternate a predictor (M12) that lowers Sigma_t to Sigma_{t+1} and corrector steps on
        pi_t(y) = p(y | y~) ~ exp(-E(y, Sigma_t)) N(y~; y, Sigma_y - Sigma_t)          (M11)
    (ULA, or MALA with the exact Metropolis-Hastings acceptance), down to Sigma_T = s_end;
  - the schedule is geometric, or energy-guided (M13);
  - blind estimation picks the covariance that minimises the normalized energy (paper eq. 16).
"""

import argparse
import copy
import json
import math
import os
import sys
import time
from types import SimpleNamespace

import torch

import aebm
import covariances as cv
import data
import nets

S_MAX_PRIOR = 25.0 ** 2  # missing coordinates start the reverse diffusion from this variance (docs/method.md §6)


# -----------------------------------------------------------------------------
# Schedules.

def geometric_level(s0, s_end, t, T):
    """s_t = s0^(1 - t/T) s_end^(t/T) on every coordinate with s0 > s_end; the others stay at s0."""
    s_t = s0 ** (1 - t / T) * s_end ** (t / T)
    return torch.where(s0 > s_end, s_t, s0)


def adaptive_level(s, score_log_s, s_target_mean_log, s_floor, s_ceiling):
    """Energy-guided step (M13): 1/s' = 1/s + gamma relu(dE/ds), with gamma chosen per image (by
    bisection on log gamma) so that mean log s' reaches s_target_mean_log; s' in [s_floor, s_ceiling]
    and s' <= s (monotone). Coordinates whose energy drops fastest as s shrinks go first.

    The bounds keep the predictor's steps small (reverse_diffusion sets them): s' >= s / R (no
    coordinate falls by more than a factor R per level) and s' <= s_end R^(levels left) (every
    coordinate can still reach s_end at that pace). Unbounded, M13 leaves some coordinates at the
    prior's scale until the last level, and one Euler-Maruyama step of Delta s ~ 1 adds noise of std 1
    where the posterior's is ~0.03 (measured: 16x16 deblurring with the exact prior, 7.6 dB against
    13.6 for the geometric path and 17.4 for the Wiener filter). Float64: the bisection compares means
    of ~1e4 log-variances (README, Precision)."""
    dtype = s.dtype
    s, score_log_s, s_floor, s_ceiling = s.double(), score_log_s.double(), s_floor.double(), s_ceiling.double()
    dE_ds = (score_log_s / s).clamp_min(0)  # dE/ds = (dE/dlog s) / s
    hi_s = torch.minimum(s, s_ceiling)
    lo_s = torch.minimum(s_floor, hi_s)

    def new_s(log_gamma):
        return (1 / (1 / s + log_gamma.exp().view(-1, 1, 1, 1) * dE_ds)).clamp(min=lo_s).minimum(hi_s)

    lo = torch.full((s.shape[0],), -40.0, dtype=s.dtype, device=s.device)
    hi = torch.full_like(lo, 40.0)
    for _ in range(50):
        mid = (lo + hi) / 2
        too_little = new_s(mid).log().flatten(1).mean(1) > s_target_mean_log
        lo, hi = torch.where(too_little, mid, lo), torch.where(too_little, hi, mid)
    return new_s(hi).to(dtype)


# -----------------------------------------------------------------------------
# The corrector: Langevin on pi (M11), ULA or MALA.

def log_target(E, z, z_obs, lik_prec):
    """log pi(y) up to a constant (M11): -E(y, Sigma) - 1/2 |y~ - y|^2 weighted by (Sigma_y - Sigma)^{-1},
    with z = U y and z_obs = U y~ in Sigma's basis."""
    return -E - 0.5 * aebm.sum_coords(lik_prec * (z_obs - z).abs().square())


def langevin(energy, z, z_obs, s_y, s, basis, n_steps=1, method="ula", eta=0.15, tau=0.9,
             generator=None, state=None, precond="posterior", log_alphas=None):
    """n_steps corrector steps on pi_s(y) (M11) at the fixed level Sigma = diag(s) in `basis`, on the
    basis coordinates z = U y (z_obs = U y~): no step leaves the basis, so the products with s never
    see a pixel-space rounding (README, Precision).

    Proposal: z' = z + eta P g(z) + sqrt(2 eta tau) P^{1/2} zeta, g = grad log pi, with the
    preconditioner P = s (s_y - s) / s_y, i.e. (Sigma^{-1} + (Sigma_y - Sigma)^{-1})^{-1}: it equals
    Sigma wherever Sigma_y >> Sigma (docs/method.md §7) and avoids the stiffness of the likelihood
    term where Sigma ~ Sigma_y; coordinates with s = s_y (pinned to y~) do not move.
    ULA accepts always; MALA accepts with min(1, pi(z') q(z|z') / (pi(z) q(z'|z))) using the actual
    proposal density, so it leaves pi exactly invariant for any tau. `state` = (E, dE/dz) of z if
    known: MALA and ULA then cost one energy evaluation per step. precond="sigma" uses P = Sigma
    instead (kept to show why not: tests/test_sample.py). `log_alphas`, a list, receives MALA's
    log acceptance ratio (B,) of every step. Returns (z, state, accept rate).
    """
    cov = cv.Covariance(s, basis, check=False)
    gap = (s_y - s).clamp_min(0)
    huge = s_y >= cv.S_HUGE * 0.999  # no likelihood at all there (docs/method.md §7)
    lik_prec = torch.where(huge | (gap <= 0), torch.zeros_like(gap), 1 / gap.clamp_min(1e-300))
    P = torch.where(huge, s, s * gap / s_y) if precond == "posterior" else s
    moving = P > 0
    E, score = state if state is not None else aebm.energy_and_scores(energy, z, cov, need_log_s=False)[:2]

    def drift(z, score):  # eta P g(z): g = -dE/dz + (Sigma_y - Sigma)^{-1} (z_obs - z)
        return eta * P * (-score + lik_prec * (z_obs - z))

    accepted = torch.zeros(z.shape[0], device=z.device)
    for _ in range(n_steps):
        zeta = cv.white_noise(z.shape, basis, generator, aebm.real_dtype(z), z.device)
        mean_fwd = z + drift(z, score)
        z_new = mean_fwd + (2 * eta * tau * P).sqrt() * zeta
        E_new, score_new, _ = aebm.energy_and_scores(energy, z_new, cov, need_log_s=False)
        if method == "ula":
            accept = torch.ones(z.shape[0], dtype=torch.bool, device=z.device)
        elif method == "mala":
            mean_bwd = z_new + drift(z_new, score_new)
            var = torch.where(moving, 2 * eta * tau * P, torch.ones_like(P))
            log_q_fwd = -0.5 * aebm.sum_coords(torch.where(moving, (z_new - mean_fwd).abs().square() / var, 0))
            log_q_bwd = -0.5 * aebm.sum_coords(torch.where(moving, (z - mean_bwd).abs().square() / var, 0))
            log_alpha = (log_target(E_new, z_new, z_obs, lik_prec) - log_target(E, z, z_obs, lik_prec)
                         + log_q_bwd - log_q_fwd)
            u = torch.rand(z.shape[0], generator=generator, dtype=torch.float64, device=z.device)
            accept = u.log() < log_alpha
            if log_alphas is not None:
                log_alphas.append(log_alpha)
        else:
            raise ValueError(f"unknown corrector {method!r}: use 'ula' or 'mala'")
        a = accept.view(-1, 1, 1, 1)
        z, E, score = torch.where(a, z_new, z), torch.where(accept, E_new, E), torch.where(a, score_new, score)
        accepted += accept.float()
    return z, (E, score), (accepted / max(n_steps, 1)).mean().item()


# -----------------------------------------------------------------------------
# Reverse anisotropic diffusion (M11-M13).

def initial_state(z_obs, s_y, s0, mu, basis, generator=None):
    """A draw of y_0 given y~ where s0 < s_y, in the Gaussian-limit approximation (exact as s_y -> inf),
    in basis coordinates: z_0 = mu + (s0/s_y)(z_obs - mu) + sqrt(s0 (1 - s0/s_y)) zeta; z_0 = z_obs
    where s0 = s_y. mu: U of the data mean."""
    zeta = cv.white_noise(z_obs.shape, basis, generator, aebm.real_dtype(z_obs), z_obs.device)
    r = s0 / s_y
    z = mu + r * (z_obs - mu) + (s0 * (1 - r)).clamp_min(0).sqrt() * zeta
    return torch.where(s0 < s_y, z, z_obs)


def reverse_diffusion(energy, y_obs, cov_y, levels=600, s_end=1e-6, s_max=S_MAX_PRIOR, corrector="ula",
                      n_corrector=1, eta=0.15, tau=0.9, schedule="geometric", generator=None, record=False):
    """Posterior samples for the observation (y_obs, cov_y) by reverse anisotropic diffusion, run on
    the basis coordinates z = U y of Sigma_y's basis (images come back in pixels).

    Returns a namespace: x (the sample at s_end), x_mean (its Tweedie denoising), acceptance
    (mean corrector acceptance; 1 for ULA), evaluations (energy evaluations), and, with record,
    the list of variance maps s_t."""
    basis, s_y = cov_y.basis, cov_y.s
    s_end_t = torch.full_like(s_y, s_end)
    s0 = s_y.clamp(max=s_max)
    s = s0
    z_obs = cov_y.U(y_obs)
    mu = cov_y.U(torch.full_like(y_obs, 1.0) * aebm.energy_mean(energy))
    z = initial_state(z_obs, s_y, s0, mu, basis, generator)
    need_log_s = schedule == "adaptive"
    E, score, score_log_s = aebm.energy_and_scores(energy, z, cv.Covariance(s, basis, check=False), need_log_s=need_log_s)
    target_end = torch.where(s0 > s_end, s_end_t, s0).double().log().flatten(1).mean(1)  # mean log s at t = T
    # M13's largest fall per level: twice the geometric path's, in log (see adaptive_level)
    ratio = (s0.max().item() / s_end) ** (2 / levels) if schedule == "adaptive" else None
    trace, acceptance, evaluations = ([s] if record else None), [], 1
    for t in range(levels):
        if schedule == "geometric":
            s_next = geometric_level(s0, s_end, t + 1, levels)
        elif schedule == "adaptive":
            mean_log = s.double().log().flatten(1).mean(1)
            target = mean_log + (target_end - mean_log) / (levels - t)  # spread the rest evenly
            floor = torch.maximum(s / ratio, s_end_t)  # at most a factor `ratio` per level ...
            ceiling = s_end_t * ratio ** (levels - t - 1)  # ... and s_end still within reach at that pace
            s_next = torch.where(s > s_end, adaptive_level(s, score_log_s, target, floor, ceiling), s)
        else:
            raise ValueError(f"unknown schedule {schedule!r}: use 'geometric' or 'adaptive'")
        # (M12) predictor: y <- y - (Sigma_t - Sigma_{t+1}) dE/dy + (Sigma_t - Sigma_{t+1})^{1/2} xi, in the basis
        ds = (s - s_next).clamp_min(0)
        zeta = cv.white_noise(z.shape, basis, generator, aebm.real_dtype(z), z.device)
        z = z - ds * score + ds.sqrt() * zeta
        s = s_next
        cov = cv.Covariance(s, basis, check=False)
        E, score, score_log_s = aebm.energy_and_scores(energy, z, cov, need_log_s=need_log_s)
        evaluations += 1
        if corrector and n_corrector > 0:
            z, (E, score), acc = langevin(energy, z, z_obs, s_y, s, basis, n_corrector, corrector, eta, tau,
                                          generator, state=(E, score))
            evaluations += n_corrector
            acceptance.append(acc)
            if need_log_s:  # the adaptive schedule needs dE/dlog s of the corrected state
                E, score, score_log_s = aebm.energy_and_scores(energy, z, cov, need_log_s=True)
                evaluations += 1
        if record:
            trace.append(s)
    x_mean = cov_y.Uh(z - s * score)  # (M4) Tweedie at the last level (s <= s_max: no cancellation)
    return SimpleNamespace(x=cov_y.Uh(z), x_mean=x_mean, acceptance=sum(acceptance) / max(len(acceptance), 1),
                           evaluations=evaluations, trace=trace)


def generate(energy, shape, levels=600, s_end=1e-4, generator=None, **kw):
    """Unconditional samples: the observation is pure noise of variance s_huge (Sigma_y = s_huge I)."""
    device, dtype = aebm.energy_device(energy), aebm.energy_dtype(energy)
    cov_y = cv.Covariance(torch.full(shape, cv.S_HUGE, device=device, dtype=dtype), "pixel")
    y_obs = aebm.energy_mean(energy) + math.sqrt(cv.S_HUGE) * cv.white_noise(shape, "pixel", generator, dtype, device)
    return reverse_diffusion(energy, y_obs, cov_y, levels=levels, s_end=s_end, generator=generator, **kw)


def any_order(energy, shape, P, order=None, levels_per_patch=20, s_max=S_MAX_PRIOR, s_end=1e-4, generator=None):
    """Any-order generation (paper Fig. 5): the image cut into P x P patches with their own variances
    (covariances.patch_covariance); patches are denoised one at a time, in `order` (patch indices,
    row-major; default raster), each by predictor steps (M12) from s_max to s_end while the others
    keep theirs. Returns the final sample and its Tweedie denoising."""
    B, C, H, W = shape
    if H % P or W % P:
        raise ValueError(f"patch size {P} must divide the image size {H}x{W}")
    nh, nw = H // P, W // P
    order = list(range(nh * nw)) if order is None else list(order)
    device, dtype = aebm.energy_device(energy), aebm.energy_dtype(energy)
    s_patch = torch.full((B, C, nh, nw), s_max, device=device, dtype=dtype)  # (B, C, H/P, W/P)
    y = aebm.energy_mean(energy) + math.sqrt(s_max) * cv.white_noise(shape, "pixel", generator, dtype, device)
    for k in order:
        for t in range(levels_per_patch):
            cov = cv.patch_covariance(s_patch, P)
            _, grad, _ = aebm.energy_and_scores(energy, y, cov, need_log_s=False)  # pixel basis: z = y
            s_next = s_patch.clone()
            s_next.view(B, C, -1)[:, :, k] = s_max ** (1 - (t + 1) / levels_per_patch) * s_end ** ((t + 1) / levels_per_patch)
            ds = (s_patch - s_next).repeat_interleave(P, -2).repeat_interleave(P, -1)  # zero outside patch k
            xi = cv.white_noise(shape, "pixel", generator, dtype, device)
            y = y - ds * grad + ds.sqrt() * xi  # (M12) in the pixel basis
            s_patch = s_next
    cov = cv.patch_covariance(s_patch, P)
    return y, aebm.posterior_mean(energy, y, cov)


# -----------------------------------------------------------------------------
# Peer solvers (paper §4.1, Table 1): what a score-based diffusion model offers, on the same energy.
#
# Each uses only the isotropic slice of the energy, as a plain diffusion model would: the score
# dE/dy at sigma^2 I and the denoiser D(y, sigma) = y - sigma^2 dE/dy(y, sigma^2 I), on a geometric
# noise schedule SIGMA_MAX -> SIGMA_MIN, plus the measurement y_obs = A x + sigma_n xi of a
# covariances.Degradation (masks too, as A = diag(mask)). Each returns (x, evaluations).
#
# Step sizes: tuned once per task by a small grid (PEER_GRID) on training images of the Gaussian
# field with its exact prior, at 200 network evaluations like the energy samplers' default
# comparison (python -m experiments.solvers --tune); the chosen values are PEER_STEPS. Measured:
# the README's solver table.

SIGMA_MAX, SIGMA_MIN = 10.0, 0.01
PEER_GRID = {"dps": [0.01, 0.03, 0.1, 0.3, 1.0], "reddiff": [0.1, 0.3, 1.0, 3.0, 10.0], "daps": [0.01, 0.03, 0.1, 0.3, 1.0]}
# chosen by the grid above: the lowest mean-squared error on 16 training draws of the 16x16 Gaussian
# field per task, with its exact prior and 200 evaluations, of RED-Diff's estimate and of the mean of 4
# samples for DPS and DAPS (`python -m experiments.solvers --tune`; a single sample's error would
# favour samplers that do not mix). RED-Diff's lam and DAPS's step change the error by a few percent
# across the grid; DPS's step matters (too large and the data step overshoots: 8x8 deblurring,
# residual 2.5 sigma_n at 1.0 against 0.9 at 0.1; too small and it ignores the data).
PEER_STEPS = {
    "dps": {"denoise": 0.03, "inpaint": 0.3, "deblur": 0.1, "sr": 0.3},
    "reddiff": {"denoise": 3.0, "inpaint": 3.0, "deblur": 1.0, "sr": 0.1},
    "daps": {"denoise": 0.1, "inpaint": 0.01, "deblur": 0.1, "sr": 0.01},
}


def noise_levels(n):
    """n + 1 standard deviations, geometric from SIGMA_MAX to SIGMA_MIN."""
    return [SIGMA_MAX * (SIGMA_MIN / SIGMA_MAX) ** (i / n) for i in range(n + 1)]


def isotropic_score(energy, x, sigma, create_graph=False):
    """dE/dy (pixels) at sigma^2 I; with create_graph it stays differentiable in x (DPS). sigma^2 I is
    diagonal in every basis: an exact GaussianEnergy gets it in its own (its fast path)."""
    basis = getattr(energy, "basis", None) or "pixel"
    cov = cv.isotropic(sigma ** 2, x.shape, basis, dtype=x.dtype, device=x.device)
    if not create_graph:
        return cv.from_basis(aebm.energy_and_scores(energy, cov.U(x), cov, need_log_s=False)[1], basis)
    E = aebm.energy_of_z(energy, cov.U(x), cov)
    return torch.autograd.grad(E.sum(), x, create_graph=True)[0]


def check_step(name, step):
    if not (isinstance(step, (int, float)) and step > 0 and math.isfinite(step)):
        raise ValueError(f"{name} step size must be positive, got {step}")


def dps(energy, y_obs, prob, evaluations=200, step=None, task="deblur", generator=None):
    """Diffusion posterior sampling (Chung et al., 2023). Ancestral reverse steps of the VE diffusion,
    each followed by a step down the gradient of the residual norm |y_obs - A D(x_t)| through the
    denoiser, of size zeta' / |y_obs - A D(x_t)| (the paper's weighting; it differentiates the
    network twice). One evaluation per level."""
    step = PEER_STEPS["dps"][task] if step is None else step
    check_step("DPS", step)
    sig = noise_levels(evaluations)
    mean = aebm.energy_mean(energy)
    x = mean + sig[0] * cv.white_noise(y_obs.shape, "pixel", generator, y_obs.dtype, y_obs.device)
    for i in range(evaluations):
        s, s_next = sig[i], sig[i + 1]
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            score = isotropic_score(energy, x, s, create_graph=True)
            x0 = x - s ** 2 * score  # Tweedie: the denoiser
            residual = (y_obs - prob.A(x0)).flatten(1).norm(dim=1)  # (B,)
            grad = torch.autograd.grad(residual.sum(), x)[0]
        ds2 = s ** 2 - s_next ** 2
        noise = cv.white_noise(x.shape, "pixel", generator, x.dtype, x.device)
        x = (x - ds2 * score + math.sqrt(ds2) * noise).detach()  # ancestral step of the reverse VE SDE
        # zeta' grad|r|^2 / |r| = 2 zeta' grad|r|: the DPS step, normalised per image by the residual
        x = x - 2 * step * grad
    return x0.detach(), evaluations


def reddiff(energy, y_obs, prob, evaluations=200, step=None, task="deblur", lr=0.01, generator=None):
    """RED-Diff (Mardani et al., 2024): variational posterior mean mu fitted by Adam, descending the noise
    levels once. Loss: 1/2 |y_obs - A mu|^2 + lam w(sigma) <sg[eps_hat(x_t) - eps], mu> with x_t = mu +
    sigma eps and the noise prediction eps_hat = sigma dE/dy(x_t, sigma^2 I); w(sigma) = sigma is the
    paper's sqrt(1/SNR) weighting (variance exploding: SNR = 1/sigma^2). `step` is lam. The data term
    is unnormalised, as in the authors' code: divided by sigma_n^2 it overwhelms the prior at small
    sigma and the estimate fits the noise (measured with the exact prior, 8x8 deblurring: 18x the
    Bayes error at best, against 1.08x unnormalised with lr 0.01)."""
    step = PEER_STEPS["reddiff"][task] if step is None else step
    check_step("RED-Diff", step)
    mu = y_obs.clone()
    if prob.basis == "pixel":  # a mask: the unobserved pixels start at the data mean
        mu = torch.where(prob.a > 0, y_obs, torch.full_like(y_obs, float(torch.as_tensor(aebm.energy_mean(energy)).mean())))
    mu.requires_grad_(True)
    opt = torch.optim.Adam([mu], lr=lr, betas=(0.9, 0.99))
    for s in noise_levels(evaluations)[:-1]:
        eps = cv.white_noise(mu.shape, "pixel", generator, mu.dtype, mu.device)
        eps_hat = s * isotropic_score(energy, (mu + s * eps).detach(), s)
        with torch.enable_grad():
            fit = 0.5 * (y_obs - prob.A(mu)).square().flatten(1).sum(1)
            reg = step * s * ((eps_hat - eps).detach() * mu).flatten(1).sum(1)
            opt.zero_grad()
            (fit + reg).sum().backward()
        opt.step()
    return mu.detach(), evaluations


def daps(energy, y_obs, prob, evaluations=200, step=None, task="deblur", ode_steps=1, langevin_steps=50,
         generator=None):
    """DAPS (Zhang et al., 2025): decoupled annealing. At each level sigma_t: a short probability-flow ODE
    from x_t to x0^ (ode_steps Euler steps, one evaluation each), then Langevin steps on
    N(x0; x0^, r_t^2 I) p(y_obs | x0) with r_t = sigma_t (measurement only: no evaluation), then
    re-noising to the next level, x_{t-1} = x0 + sigma_{t-1} xi. `step` scales the Langevin step by the
    target's largest precision, eta = step / (1/r_t^2 + max a^2 / sigma_n^2). ode_steps = 1 (the ODE's
    single step is Tweedie's x0^) because at a budget of 200 evaluations more annealing levels beat a
    longer ODE: with the exact prior, 16x16 deblurring, 2.45x the Bayes error against 2.78x with
    2 steps and 3.2x with 5 (the paper's 5 come with 1000 evaluations)."""
    step = PEER_STEPS["daps"][task] if step is None else step
    check_step("DAPS", step)
    levels = max(1, evaluations // ode_steps)
    sig = noise_levels(levels)
    mean = aebm.energy_mean(energy)
    x = mean + sig[0] * cv.white_noise(y_obs.shape, "pixel", generator, y_obs.dtype, y_obs.device)
    a_max = prob.a.abs().max().item()
    for i in range(levels):
        s = sig[i]
        ode = [s * (SIGMA_MIN / s) ** (k / ode_steps) for k in range(ode_steps + 1)]
        x0 = x
        for k in range(ode_steps):  # probability-flow ODE dx/dsigma = sigma dE/dy, Euler
            score = isotropic_score(energy, x0, ode[k])
            x0 = x0 + (ode[k + 1] - ode[k]) * ode[k] * score if k + 1 < ode_steps else x0 - ode[k] ** 2 * score
        x_hat = x0
        eta = step / (1 / s ** 2 + a_max ** 2 / prob.sigma_n ** 2)
        for _ in range(langevin_steps):
            grad = -(x0 - x_hat) / s ** 2 - prob.A(prob.A(x0) - y_obs) / prob.sigma_n ** 2  # A is symmetric
            x0 = x0 + eta * grad + math.sqrt(2 * eta) * cv.white_noise(x0.shape, "pixel", generator, x0.dtype, x0.device)
        x = x0 + sig[i + 1] * cv.white_noise(x0.shape, "pixel", generator, x0.dtype, x0.device)
    return x0, levels * ode_steps


PEERS = {"dps": dps, "reddiff": reddiff, "daps": daps}


# -----------------------------------------------------------------------------
# Blind estimation (paper §4.3, eq. 16).

def blind_inpaint(energy, y, channels, sizes, noises, missing_var=cv.S_HUGE):
    """Energies E(y, Sigma(size, sigma)) of one observation y under every centred box size x noise
    level candidate, all evaluating the same y (docs/method.md §6). Returns (energies (B, n_size, n_noise),
    estimated size (B,), estimated sigma (B,))."""
    B = y.shape[0]
    grid = torch.empty(B, len(sizes), len(noises), dtype=torch.float64)
    with torch.no_grad():
        for i, size in enumerate(sizes):
            missing = cv.box_mask(y.shape, size, device=y.device)
            for j, sigma in enumerate(noises):
                cov = cv.mask_covariance(missing, missing_var, sigma ** 2, channels, dtype=y.dtype)
                grid[:, i, j] = energy(y, cov).double().cpu()
    best = grid.flatten(1).argmin(1)
    return grid, torch.tensor(sizes)[best // len(noises)], torch.tensor(noises, dtype=torch.float64)[best % len(noises)]


def degradation_nll(energy, y_obs, prob, mean, generator=None, observed_only=False):
    """-log p(y_obs) under the degradation `prob`, from the normalized energy of its denoising
    observation (M2) by a change of variables in the basis, z = U y_obs:
      informative k:    z_k = a_k y~_k      ->  + log |a_k|
      uninformative k:  z_k ~ N(a_k mu_k, sigma_n^2)  (x is invisible there); the energy of y~_k there,
                        the Gaussian limit at variance s_huge, is removed (exact as s_huge -> inf).
    Candidates with different operators A can then be compared (blind deblurring). Everything stays
    in basis coordinates (the energy of U y~ directly: README, Precision). observed_only leaves out the
    measurement of the uninformative coordinates (for candidates that share the operator, when those
    values were not measured: the hole of a photo to inpaint, the empty grid of an upscaled image).
    `generator` is unused."""
    z_t, cov = prob.to_denoising_z(y_obs, mean)
    with torch.no_grad():
        E = aebm.energy_of_z(energy, z_t, cov).double()
    z = cv.to_basis(y_obs, prob.basis)
    mu = cv.to_basis(torch.as_tensor(mean, dtype=y_obs.dtype, device=y_obs.device).expand_as(y_obs), prob.basis)
    fill = 0.5 * ((z_t - mu).abs().square() / prob.s_huge + math.log(2 * math.pi * prob.s_huge))
    noise = 0.5 * ((z - prob.a * mu).abs().square() / prob.sigma_n ** 2 + math.log(2 * math.pi * prob.sigma_n ** 2))
    if observed_only:  # the uninformative coordinates were not measured (a photo's hole, an upscaled grid)
        noise = torch.zeros_like(noise)
    jac = prob.a.abs().clamp_min(1e-300).log()
    per_coord = torch.where(prob.informative, jac, noise - fill)
    return E + aebm.sum_coords(per_coord)


def blind_deblur(energy, y_obs, blur_stds, noises, basis, mean, generator=None):
    """-log p(y_obs | b, sigma) over blur std x noise level candidates (B, n_b, n_sigma), and the argmin."""
    B = y_obs.shape[0]
    grid = torch.empty(B, len(blur_stds), len(noises), dtype=torch.float64)
    for i, b in enumerate(blur_stds):
        for j, sigma in enumerate(noises):
            prob = cv.blur_problem(y_obs.shape, b, sigma, basis, dtype=y_obs.dtype, device=y_obs.device)
            g = torch.Generator(y_obs.device).manual_seed(0) if generator is None else generator
            grid[:, i, j] = degradation_nll(energy, y_obs, prob, mean, g).cpu()
    best = grid.flatten(1).argmin(1)
    return grid, torch.tensor(blur_stds, dtype=torch.float64)[best // len(noises)], torch.tensor(noises, dtype=torch.float64)[best % len(noises)]


# -----------------------------------------------------------------------------
# Probabilities and metrics.

def log_posterior(energy, x, y, cov_y, prior_basis="pixel", s_prior=aebm.S_MIN):
    """log p(x | y~) = log p(x) + log N(y~; x, Sigma_y) - log p_Sigma_y(y~): Bayes' rule with normalized
    energies (M10; coordinates with s_huge carry no likelihood and are left out of both terms)."""
    keep = cov_y.s < cv.S_HUGE * 0.999
    r = cov_y.U(y - x)
    log_lik = -0.5 * aebm.sum_coords(torch.where(keep, r.abs().square() / cov_y.s + torch.log(2 * math.pi * cov_y.s), 0))
    huge_part = 0.5 * aebm.sum_coords(torch.where(keep, 0, cov_y.U(y - aebm.energy_mean(energy)).abs().square() / cov_y.s
                                            + torch.log(2 * math.pi * cov_y.s)))
    with torch.no_grad():
        log_evidence = -energy(y, cov_y) + huge_part  # the s_huge coordinates' Gaussian-limit factor removed
    return aebm.log_prob(energy, x, s=s_prior, basis=prior_basis) + log_lik - log_evidence


# -----------------------------------------------------------------------------
# Tasks and the command line.

NOISES = [0.005, 0.01, 0.02, 0.05, 0.1, 0.2]  # candidates of blind noise estimation
BLUR_STDS = [0.5, 1.0, 1.5, 2.0, 3.0]  # candidates of blind deblurring


def build_task(args, shape, device, dtype):
    """The degradation of --task: a missing map (B, 1, H, W) for inpainting, else a Degradation.
    Impossible parameters give a ValueError that names the flag."""
    B, C, H, W = shape
    if args.task == "inpaint":
        if args.mask == "box":
            size = args.box_size if args.box_size is not None else H // 2
            if not 0 < size <= min(H, W):
                raise ValueError(f"box size {size} must be in 1..{min(H, W)} for {H}x{W} images (--box-size)")
            return cv.box_mask(shape, size, device=device)
        if args.mask == "half":
            rows = args.half_rows if args.half_rows is not None else H // 2
            if not 0 < rows <= H:
                raise ValueError(f"--half-rows {rows} must be in 1..{H}")
            return cv.half_mask(shape, rows, device=device)
        return cv.random_mask(shape, args.ratio, torch.Generator().manual_seed(args.seed)).to(device)
    if args.task == "denoise":
        return cv.denoising_problem(shape, args.noise, dtype, device)
    if args.task == "deblur":
        return cv.blur_problem(shape, args.blur_std, args.noise, args.basis, dtype, device)
    if args.task == "sr":
        if H % args.sr_factor or W % args.sr_factor:
            raise ValueError(f"--sr-factor {args.sr_factor} must divide the image size {H}x{W}")
        return cv.sr_problem(shape, args.sr_factor, args.noise, args.basis, dtype, device)
    raise ValueError(f"task {args.task!r} has no degradation")


def observe(args, x, mean, generator):
    """(y~, Sigma_y, what to show as the observation, the degradation). Inpainting observes the
    anisotropic noisy image y~ = x + Sigma_y^{1/2} zeta with variance --missing-var on missing
    pixels (at s_huge this is exactly M2's draw); the other tasks measure A x + sigma_n xi and map it
    to (y~, Sigma_y) by M2."""
    task = build_task(args, x.shape, x.device, x.dtype)
    if args.task == "inpaint":
        cov_y = cv.mask_covariance(task, args.missing_var, args.noise ** 2, x.shape[1], x.dtype)
        y = x + cov_y.sample(generator)[0]
        return y, cov_y, torch.where(task, torch.zeros_like(y), y), task
    y_obs = task.measure(x, generator)
    y, cov_y = task.to_denoising(y_obs, mean, generator)
    return y, cov_y, y_obs, task


def observed_problem(args, energy, y_obs, missing=None):
    """(y~, Sigma_y, estimates) for a measurement y_obs that came as it is (--observed), with no truth.
    A degradation parameter left unset (--noise, --blur-std) is estimated blindly: the candidate that
    minimises -log p(y_obs) under the normalized energy (degradation_nll). estimates: {name: value}."""
    mean, shape = aebm.energy_mean(energy), y_obs.shape
    kw = dict(dtype=y_obs.dtype, device=y_obs.device)
    noises = NOISES if args.noise is None else [args.noise]
    if args.task == "deblur":
        stds = BLUR_STDS if args.blur_std is None else [args.blur_std]
        grid, b, sigma = blind_deblur(energy, y_obs, stds, noises, args.basis, mean)
        b, sigma = float(b[0]), float(sigma[0])
        prob = cv.blur_problem(shape, b, sigma, args.basis, **kw)
        estimates = dict(blur_std=b, noise=sigma)
    else:
        r = args.sr_factor if args.task == "sr" else 1  # SR: y_obs is already on the large grid; noise scales by r
        make = {"denoise": lambda s: cv.denoising_problem(shape, s, **kw),
                "inpaint": lambda s: cv.inpainting_problem(missing, shape[1], s, kw["dtype"]),
                "sr": lambda s: cv.sr_problem(shape, r, r * s, "dct", **kw)}[args.task]
        nll = [degradation_nll(energy, y_obs, make(s), mean, observed_only=args.task != "denoise").sum().item()
               for s in noises]
        sigma = noises[min(range(len(noises)), key=nll.__getitem__)]
        prob, estimates = make(sigma), dict(noise=sigma)
    y, cov = prob.to_denoising(y_obs, mean)
    return y, cov, estimates


def check_args(p, args):
    """One-line errors at parse time for impossible flags (each names its flag)."""
    positive = [("--n", args.n), ("--samples", args.samples), ("--sr-factor", args.sr_factor),
                ("--fit-images", args.fit_images), ("--eta", args.eta), ("--tau", args.tau), ("--missing-var", args.missing_var)]
    positive += [("--img-size", args.img_size)] if args.img_size is not None else []
    positive += [(f, v) for f, v in (("--steps", args.steps), ("--noise", args.noise), ("--blur-std", args.blur_std),
                                     ("--box-size", args.box_size), ("--half-rows", args.half_rows),
                                     ("--s-end", args.s_end)) if v is not None]
    for flag, value in positive:
        if not (math.isfinite(value) and value > 0):
            p.error(f"{flag} must be positive, got {value}")
    if args.correctors < 0:
        p.error(f"--correctors must be 0 or more, got {args.correctors}")
    if args.eta > 1:
        p.error(f"--eta {args.eta} is too large: a corrector step of more than 1 overshoots (default 0.15)")
    if args.tau > 10:
        p.error(f"--tau {args.tau} is too large: it scales the proposal noise (1 is exact, default 0.9)")
    if not 0 < args.ratio < 1:
        p.error(f"--ratio must be in (0, 1), got {args.ratio}")
    if args.channels not in (1, 3):
        p.error(f"--channels must be 1 or 3, got {args.channels}")
    if args.task == "uncond" and (args.blind or args.input or args.observed):
        p.error("--task uncond generates images: it takes no --blind, --input or --observed")
    if args.task == "uncond" and args.sampler in PEERS:
        p.error(f"--sampler {args.sampler} solves inverse problems (it needs a measurement): use ula or mala for uncond")
    if args.input and args.observed:
        p.error("pass either --input (a clean image to degrade) or --observed (a degraded photo), not both")
    if args.prior == "fitted" and (args.input or args.observed):
        p.error("--prior fitted is fitted at its dataset's image size: use it with dataset images, not --input/--observed")
    if args.mask_file and args.task != "inpaint":
        p.error("--mask-file is for --task inpaint")
    if args.observed and args.task == "sr" and args.basis == "fft":
        p.error("--observed with --task sr upscales in the DCT basis (a photo is not periodic): drop --basis fft")
    noise = args.noise if args.noise is not None else 0.05
    if args.s_end is not None and args.task != "uncond" and args.s_end >= noise ** 2 and not args.observed:
        p.error(f"--s-end {args.s_end} must be below the noise variance {noise ** 2:g} (--noise {noise})")
    if args.device is not None and args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA device is available here; use --device cpu")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Restore, sample and estimate with an anisotropic energy model.")
    p.add_argument("--task", default="inpaint", choices=["denoise", "inpaint", "deblur", "sr", "uncond"], help="inverse problem")
    p.add_argument("--input", default=None, help="your own clean image (any format pillow reads): the task degrades it")
    p.add_argument("--observed", default=None,
                   help="your own degraded photo: restored as it is; unset --noise / --blur-std are estimated blindly")
    p.add_argument("--mask-file", default=None, help="inpainting mask image, white = missing, the image's size")
    p.add_argument("--mask", default="box", choices=["box", "half", "random"], help="inpainting mask")
    p.add_argument("--box-size", type=int, default=None, help="box side in pixels (default: half the image)")
    p.add_argument("--half-rows", type=int, default=None, help="rows hidden by the half mask (default: half)")
    p.add_argument("--ratio", type=float, default=0.5, help="fraction of missing pixels for the random mask")
    p.add_argument("--missing-var", type=float, default=cv.S_HUGE, help="variance of the missing pixels of y~ (M2: s_huge)")
    p.add_argument("--blur-std", type=float, default=None, help="Gaussian blur std in pixels (default 1.5; --observed: estimated)")
    p.add_argument("--sr-factor", type=int, default=2, help="super-resolution factor")
    p.add_argument("--noise", type=float, default=None,
                   help="measurement noise std sigma_n, images in [0, 1] (default 0.05; --observed: estimated)")
    p.add_argument("--basis", default=None, choices=["fft", "dct"], help="spectral basis of deblur/sr (default: the checkpoint's)")
    p.add_argument("--sampler", default="ula", choices=["mean", "ula", "mala", "adaptive", "dps", "reddiff", "daps"],
                   help="mean: Tweedie in one shot; ula/mala: reverse diffusion with that corrector; adaptive: M13 "
                        "schedule + ULA; dps / reddiff / daps: the peer solvers on the energy's isotropic slice")
    p.add_argument("--steps", type=int, default=None,
                   help="noise levels of the reverse diffusion (default: 600 on CUDA as in the paper, 150 on CPU)")
    p.add_argument("--correctors", type=int, default=1, help="corrector steps per level")
    p.add_argument("--eta", type=float, default=0.15, help="corrector step size")
    p.add_argument("--tau", type=float, default=0.9, help="corrector temperature (proposal noise scale)")
    p.add_argument("--s-end", type=float, default=None,
                   help="final variance of the reverse diffusion (default: 1e-4, or a tenth of the noise variance if lower)")
    p.add_argument("--samples", type=int, default=1, help="posterior samples per image")
    p.add_argument("--blind", action="store_true", help="estimate the degradation first (inpaint: box x noise; deblur: blur x noise)")
    p.add_argument("--n", type=int, default=4, help="number of test images")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--out", default="runs/sample", help="output directory (PNGs, metrics JSON)")
    p.add_argument("--ckpt", default="runs/quick/ckpt.pt", help="checkpoint from train.py")
    p.add_argument("--prior", default="model", choices=["model", "exact", "fitted"],
                   help="exact: the exact GaussianEnergy of the built-in gaussian dataset (no training needed); "
                        "fitted: a Gaussian prior fitted to --fit-images training images of --dataset (the Wiener filter)")
    p.add_argument("--fit-images", type=int, default=512, help="training images for --prior fitted")
    p.add_argument("--dataset", default=None, help="test images (default: the checkpoint's dataset, held-out split)")
    p.add_argument("--data-dir", default=None, help="directory of an on-disk dataset")
    p.add_argument("--img-size", type=int, default=None, help="image size with --prior exact (16) or fitted (the dataset's)")
    p.add_argument("--channels", type=int, default=None, help="channels with --prior exact (1) or fitted (3)")
    p.add_argument("--device", default=None, help="cpu or cuda")
    p.add_argument("--cuda-graph", type=int, default=1, choices=[0, 1],
                   help="1: on CUDA, the samplers replay each evaluation as a captured CUDA graph")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"],
                   help="precision of inference (the weights are cast to it); float64 is the reference (README, Precision)")
    args = p.parse_args(argv)
    if args.img_size is None and args.prior != "fitted":
        args.img_size = 16
    if args.channels is None:
        args.channels = 1 if args.prior == "exact" else 3
    check_args(p, args)
    if not args.observed:  # with --observed, unset degradation parameters are estimated instead
        args.noise = 0.05 if args.noise is None else args.noise
        args.blur_std = 1.5 if args.blur_std is None else args.blur_std
    if args.s_end is None:  # below the noise, so that observed coordinates are sampled too
        args.s_end = 1e-4 if args.noise is None else min(1e-4, 0.1 * args.noise ** 2)
    return args


def load_prior(args, device, image_size=None):
    """(energy, config, test dataset or None): the checkpoint's EMA model, or the exact Gaussian prior
    (of a field at image_size (H, W) when restoring a file, else at --img-size)."""
    if args.prior == "exact":
        if args.dataset not in (None, "gaussian"):
            raise ValueError("--prior exact is the exact density of the built-in gaussian dataset; drop --dataset")
        ds = data.GaussianField(image_size or args.img_size, args.channels)
        config = dict(dataset="gaussian", img_size=args.img_size, channels=args.channels, spectral_basis="fft")
        return copy.deepcopy(ds.prior).to(device), config, ds  # a copy: the dataset keeps sampling in float64
    if args.prior == "fitted":
        import train  # the datasets' native sizes and bases live there
        name = args.dataset or "deadleaves"
        size, basis = train.DATASET_DEFAULTS.get(name, (32, "dct"))
        size = args.img_size or size
        ds = data.load_dataset(name, size, args.channels, args.data_dir, "test")
        x = data.load_dataset(name, size, args.channels, args.data_dir, "train").get_batch(
            args.fit_images, torch.Generator().manual_seed(123))
        basis = args.basis if args.task in ("deblur", "sr") and args.basis else basis  # diagonal where the task allows
        config = dict(dataset=name, img_size=size, channels=ds.channels, spectral_basis=basis)
        return aebm.fit_gaussian(x, basis).to(device), config, ds
    import train  # the checkpoint format lives there
    if not os.path.exists(args.ckpt):
        raise FileNotFoundError(f"no checkpoint at {args.ckpt}: run `python train.py` first (about 4 minutes on a "
                                "CPU), pass --ckpt, or use --prior exact to run with the exact Gaussian prior")
    energy, config = train.load_energy(args.ckpt, device)
    if image_size is not None:
        return energy, config, None
    name = args.dataset or config["dataset"]
    leaf_radii = config.get("leaf_radii") if name == config["dataset"] else None  # the dead leaves it was trained on
    ds = data.load_dataset(name, config["img_size"], config["channels"], args.data_dir, "test", leaf_radii)
    return energy, config, ds


def prepare_out(out):
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out} is a file, not a directory")
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, f".write_test_{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"cannot write to --out {out} ({e.strerror or e}); pass a writable directory") from None


def posterior_samples(args, energy, y, cov_y, device, generator, y_obs=None, prob=None):
    """--samples draws of the posterior by the chosen sampler; returns (samples, acceptance rates,
    network evaluations per sample). The peers get the measurement (y_obs, prob) and as many
    evaluations as the energy samplers use at --steps and --correctors."""
    if args.sampler == "mean":
        return [], [], 1
    if args.sampler in PEERS:
        nfe = args.steps * (1 + args.correctors)
        runs = [PEERS[args.sampler](energy, y_obs, prob, evaluations=nfe, task=args.task, generator=generator)
                for _ in range(args.samples)]
        return [r[0] for r in runs], [], runs[0][1]
    # on a GPU, (E, dE/dz) is replayed as a CUDA graph: 2.2x faster on an H100 (README, Benchmarks)
    sampler_energy = aebm.CudaGraphEnergy(energy, cov_y.U(y), cov_y) if device.type == "cuda" and args.cuda_graph else energy
    samples, acceptance = [], []
    for _ in range(args.samples):
        res = reverse_diffusion(sampler_energy, y, cov_y, levels=args.steps, s_end=args.s_end,
                                corrector="mala" if args.sampler == "mala" else "ula", n_corrector=args.correctors,
                                eta=args.eta, tau=args.tau,
                                schedule="adaptive" if args.sampler == "adaptive" else "geometric", generator=generator)
        samples.append(res.x_mean)
        acceptance.append(res.acceptance)
    return samples, acceptance, res.evaluations


def peer_problem(args, task, y_obs, cov_y, dtype):
    """The measurement operator the peer solvers need: the task's Degradation, a mask as A = diag(mask),
    or (for an observed photo) the Degradation M2 was built from, recovered from Sigma_y."""
    if isinstance(task, cv.Degradation):
        return cv.Degradation(task.a.to(dtype), task.basis, task.sigma_n, task.s_huge)  # in the run's dtype
    if task is not None:  # a missing map
        return cv.inpainting_problem(task, y_obs.shape[1], args.noise, dtype)
    sigma_n = cov_y.s.min().sqrt().item()  # --observed: s = sigma_n^2 / a^2 with max |a| = 1
    informative = cov_y.s < cv.S_HUGE * 0.999
    a = torch.where(informative, (sigma_n ** 2 / cov_y.s).sqrt(), torch.zeros_like(cov_y.s))
    return cv.Degradation(a, cov_y.basis, sigma_n)


def restore_file(args, device, dtype):
    """--input (a clean image: the task degrades it, metrics against it) or --observed (a degraded photo,
    restored as it is). The image keeps its own size: padded to what the UNet takes (half-sample-
    symmetric reflection, the DCT's boundary) and cropped back; the outputs are PNGs at that size."""
    observed = args.observed is not None
    path = args.observed or args.input
    channels = args.channels
    if args.prior == "model":
        import train
        if not os.path.exists(args.ckpt):
            raise FileNotFoundError(f"no checkpoint at {args.ckpt}: run `python train.py` first, or pass --prior exact")
        channels = train.load_checkpoint(args.ckpt)["config"]["channels"]
    img = data.read_image(path, channels).to(device, torch.float64)  # (1, C, h, w)
    h, w = img.shape[-2:]
    r = args.sr_factor if args.task == "sr" else 1
    factor = 4 if args.prior == "model" else 1  # the UNet's 2^(levels - 1), read below
    if args.prior == "model":
        factor = train.load_energy(args.ckpt, "cpu")[0].net.factor
    if observed and args.task == "sr":  # a small image: the output is r times larger
        small = data.pad_symmetric(img, factor)
        y_obs = cv.upscale_grid(small, r)
        out_h, out_w = r * h, r * w
    else:
        x = data.pad_symmetric(img, math.lcm(factor, r))
        out_h, out_w = h, w
    size = (y_obs if observed and args.task == "sr" else x).shape[-2:]
    energy, config, _ = load_prior(args, device, image_size=tuple(size))
    energy = energy.to(dtype)
    args.basis = args.basis or ("dct" if args.prior == "model" else "fft")
    if observed and args.task == "sr":
        args.basis = "dct"
    nets.check_memory(energy, (1, channels, *size), device)
    g = torch.Generator(device).manual_seed(args.seed)
    mean = aebm.energy_mean(energy)
    report = {"task": args.task, "sampler": args.sampler, "prior": args.prior, "dtype": args.dtype,
              "mode": "observed" if observed else "input", "file": path, "size": [out_w, out_h]}
    t0 = time.time()
    task = None
    if observed:
        if args.task != "sr":
            y_obs = x
        missing = None
        if args.task == "inpaint":
            if args.mask_file:
                missing = data.pad_symmetric(data.read_mask(args.mask_file, h, w).float(), factor).to(device) > 0.5
            else:
                missing = build_task(args, (1, 1, h, w), device, dtype)
                missing = data.pad_symmetric(missing.float(), factor) > 0.5
        y, cov_y, estimates = observed_problem(args, energy, y_obs, missing)
        report["estimates"] = estimates
        print(f"estimated degradation: {estimates}")
    else:
        y, cov_y, y_obs, task = observe(args, x, mean, g)
    y, y_obs, cov_y = y.to(dtype), y_obs.to(dtype), cv.Covariance(cov_y.s.to(dtype), cov_y.basis)
    crop = lambda t: t[..., :out_h, :out_w]
    x_hat = aebm.posterior_mean(energy, y, cov_y)
    prob = peer_problem(args, task, y_obs, cov_y, dtype) if args.sampler in PEERS else None
    samples, acceptance, report["evaluations"] = posterior_samples(args, energy, y, cov_y, device, g, y_obs, prob)
    report["seconds"] = time.time() - t0
    if acceptance:
        report["acceptance"] = acceptance
    stem = os.path.join(args.out, f"{os.path.splitext(os.path.basename(path))[0]}_{args.task}")
    report["outputs"] = [data.save_image(stem + "_restored.png", crop(x_hat)[0])]
    report["outputs"] += [data.save_image(stem + f"_sample{i}.png", crop(s)[0]) for i, s in enumerate(samples)]
    if not observed:
        report["outputs"].append(data.save_image(stem + "_observation.png", crop(y_obs)[0]))
        truth = crop(x).to(dtype)
        report["psnr_observation"] = data.psnr(crop(y_obs), truth).item()
        report["psnr_mean"], report["ssim_mean"] = data.psnr(crop(x_hat), truth).item(), data.ssim(crop(x_hat), truth).item()
        if samples:
            report["psnr_samples"] = torch.stack([data.psnr(crop(s), truth) for s in samples]).mean().item()
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=1)
    for k, v in report.items():
        print(f"{k:18s} {v if not isinstance(v, float) else round(v, 4)}")
    report["x_hat"] = crop(x_hat)  # for callers (tests); not written to the JSON
    return report


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.steps = args.steps or (600 if device.type == "cuda" else 150)
    dtype = getattr(torch, args.dtype)
    prepare_out(args.out)
    if args.input or args.observed:
        return restore_file(args, device, dtype)
    energy, config, ds = load_prior(args, device)
    exact = args.prior == "exact"
    energy = energy.to(dtype)  # the checkpoint's weights (or the exact prior's spectrum) in the chosen dtype
    args.basis = args.basis or config.get("spectral_basis", "dct")
    prior_basis = "fft" if exact else "pixel"  # isotropic, so any basis; fft is the exact prior's fast path
    g = torch.Generator(device).manual_seed(args.seed)
    x = ds.get_batch(args.n, torch.Generator().manual_seed(10_000 + args.seed)).to(device, dtype)
    shape, d = x.shape, x[0].numel()
    report, t0 = {"task": args.task, "sampler": args.sampler, "prior": args.prior, "dtype": args.dtype}, time.time()
    mean = aebm.energy_mean(energy)

    if args.task == "uncond":
        res = generate(energy, shape, levels=args.steps, s_end=args.s_end, generator=g,
                       corrector=None if args.sampler == "mean" else ("mala" if args.sampler == "mala" else "ula"))
        rows, samples = [res.x_mean], [res.x_mean]
    else:
        # the observation is drawn in float64 and cast, so --dtype float64 restores exactly the same data
        y, cov_y, y_obs, task = observe(args, x.double(), mean, g)
        y, y_obs, cov_y = y.to(dtype), y_obs.to(dtype), cv.Covariance(cov_y.s.to(dtype), cov_y.basis)
        if args.blind:
            if args.task == "inpaint" and args.mask == "box":
                H = shape[-1]
                sizes = sorted({max(1, round(H * f)) for f in (0.125, 0.25, 0.375, 0.5, 0.625, 0.75)})
                noises = [0.01, 0.02, 0.05, 0.1, 0.2]
                grid, est_a, est_noise = blind_inpaint(energy, y, shape[1], sizes, noises, args.missing_var)
                true = (args.box_size if args.box_size is not None else H // 2, args.noise)
                names, axes = ("box size", "noise"), (sizes, noises)
            elif args.task == "deblur":
                stds, noises = BLUR_STDS, [0.01, 0.02, 0.05, 0.1, 0.2]
                grid, est_a, est_noise = blind_deblur(energy, y_obs, stds, noises, args.basis, mean)
                true, names, axes = (args.blur_std, args.noise), ("blur std", "noise"), (stds, noises)
            else:
                raise ValueError("--blind is implemented for --task inpaint --mask box and --task deblur")
            estimates = list(zip(est_a.tolist(), est_noise.tolist()))
            print(f"blind estimation over {len(axes[0])} x {len(axes[1])} candidates ({names[0]} x {names[1]}):")
            print(f"  true      {names[0]} {true[0]}, noise {true[1]}")
            for i, (a, b) in enumerate(estimates):
                print(f"  image {i}: {names[0]} {a}, noise {b}")
            above = (grid - grid.flatten(1).min(1).values.view(-1, 1, 1)).mean(0)  # energy above each image's minimum
            print(f"  energy above the minimum (mean over images); rows: {names[0]}, columns: noise {axes[1]}")
            for i, row in enumerate(above.tolist()):
                print(f"    {axes[0][i]!s:>6} " + " ".join(f"{v:10.1f}" for v in row))
            report["blind"] = dict(true=true, estimates=estimates, candidates=axes, energy_above_min=above.tolist())
            # restore with the estimate of the first image (the images share the degradation here)
            args.noise = estimates[0][1]
            if args.task == "inpaint":
                args.box_size = int(estimates[0][0])
                missing = build_task(args, shape, device, dtype)
                cov_y = cv.mask_covariance(missing, args.missing_var, args.noise ** 2, shape[1], dtype)  # same y~
            else:
                args.blur_std = float(estimates[0][0])
                y, cov_y = build_task(args, shape, device, dtype).to_denoising(y_obs, mean, g)
        x_hat = aebm.posterior_mean(energy, y, cov_y)
        prob = peer_problem(args, task, y_obs, cov_y, dtype) if args.sampler in PEERS else None
        samples, acceptance, report["evaluations"] = posterior_samples(args, energy, y, cov_y, device, g, y_obs, prob)
        if acceptance:
            report["acceptance"] = acceptance
        rows = [x, y_obs, x_hat] + samples
        report["psnr_observation"] = data.psnr(y_obs, x).mean().item()  # the baseline any restoration must beat
        report["psnr_mean"], report["ssim_mean"] = data.psnr(x_hat, x).mean().item(), data.ssim(x_hat, x).mean().item()
        if samples:
            report["psnr_samples"] = torch.stack([data.psnr(s, x) for s in samples]).mean().item()
            report["ssim_samples"] = torch.stack([data.ssim(s, x) for s in samples]).mean().item()
        lp_truth = log_posterior(energy, x, y, cov_y, prior_basis)
        report["log_posterior_truth"] = lp_truth.mean().item()
        if samples:
            report["log_posterior_samples"] = torch.stack([log_posterior(energy, s, y, cov_y, prior_basis)
                                                           for s in samples]).mean().item()
    report["seconds_per_image"] = (time.time() - t0) / args.n
    lp = aebm.log_prob(energy, x, basis=prior_basis)
    report["log_prior_truth"] = lp.mean().item()
    report["bpd_truth"] = aebm.bits_per_dim(-lp, d).mean().item()
    if samples:
        lps = torch.stack([aebm.log_prob(energy, s, basis=prior_basis) for s in samples])
        report["log_prior_samples"] = lps.mean().item()
        report["bpd_samples"] = aebm.bits_per_dim(-lps, d).mean().item()
    grid_path = data.save_grid(os.path.join(args.out, f"{args.task}_{args.sampler}.png"), rows)
    with open(os.path.join(args.out, f"{args.task}_{args.sampler}.json"), "w") as f:
        json.dump(report, f, indent=1)
    for k, v in report.items():
        if k != "blind":
            print(f"{k:24s} {v if not isinstance(v, float) else round(v, 4)}")
    print(f"grid: {grid_path} (rows: truth | observation | posterior mean | samples)" if args.task != "uncond"
          else f"grid: {grid_path}")
    return report


def cli():
    """`python sample.py ...`: errors of the user's making as one line, not a traceback."""
    try:
        main()
    except (ValueError, FileNotFoundError, MemoryError) as e:
        sys.exit(f"sample.py: error: {e}")


if __name__ == "__main__":
    cli()
