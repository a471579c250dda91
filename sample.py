"""
Inference (docs/method.md §6): every sampler as one plain loop over the energy protocol, the inverse
problems as tasks, and the command line. (The peer solvers it is compared with, DPS, RED-Diff and
DAPS, live with that comparison in experiments/solvers.py.)

    python sample.py --task inpaint --blind          # after `python train.py`
    python sample.py --task deblur --sampler mala --prior exact    # no training: exact Gaussian prior

Every function takes an `energy(y, cov)` (aebm.py), so the learned EnergyModel and the exact
GaussianEnergy are interchangeable; tests/test_sample.py runs each sampler on the exact energy.
A task gives an anisotropic-denoising observation (y~, Sigma_y) (M2); with Sigma_t = diag(s_t) in
Sigma_y's basis, reverse diffusion starts from p(y_0 | y~) at Sigma_0 = Sigma_y (capped at s_max) and
alternates a predictor (M12) that lowers Sigma_t with corrector steps on
    pi_t(y) = p(y | y~) ~ exp(-E(y, Sigma_t)) N(y~; y, Sigma_y - Sigma_t)                  (M11)
(ULA, or MALA with the exact Metropolis-Hastings acceptance) down to s_end, on a geometric or an
energy-guided (M13) schedule. The posterior mean (M4) and blind estimation are aebm.py's.
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

    The bounds (reverse_diffusion sets them) keep the pace: no coordinate falls by more than a factor R
    per level, and each can still reach s_end at that pace (why: docs/method.md §6, M13). Float64: the
    bisection compares means of ~1e4 log-variances (docs/precision.md)."""
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
    see a pixel-space rounding (docs/precision.md).

    Proposal: z' = z + eta P g(z) + sqrt(2 eta tau) P^{1/2} zeta, g = grad log pi, preconditioned by
    P = s (s_y - s) / s_y = (Sigma^{-1} + (Sigma_y - Sigma)^{-1})^{-1}: Sigma wherever Sigma_y >> Sigma,
    and stable where Sigma ~ Sigma_y (docs/method.md §8). ULA accepts always; MALA with the actual
    proposal density, exact for any tau. `state` = (E, dE/dz) of z if known: a step then costs one
    evaluation. precond="sigma" is P = Sigma (to show why not: tests/test_sample.py). `log_alphas`, a
    list, receives MALA's log acceptance ratios. Returns (z, state, accept rate).
    """
    cov = cv.Covariance(s, basis, check=False)
    gap = (s_y - s).clamp_min(0)
    huge = s_y >= cv.S_HUGE * 0.999  # no likelihood at all there (docs/method.md §6)
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
                      n_corrector=1, eta=0.15, tau=0.9, schedule="geometric", generator=None, record=False,
                      progress=None):
    """Posterior samples for the observation (y_obs, cov_y) by reverse anisotropic diffusion, run on
    the basis coordinates z = U y of Sigma_y's basis (images come back in pixels).

    Returns a namespace: x (the sample at s_end), x_mean (its Tweedie denoising), acceptance
    (mean corrector acceptance; 1 for ULA), evaluations (energy evaluations), and, with record,
    the list of variance maps s_t. progress: called with the evaluations of each level (data.Progress)."""
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
        done = evaluations
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
        if progress:
            progress(evaluations - done)
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
# GPU plumbing: one evaluation as a replayed CUDA graph.

class CudaGraphEnergy:
    """An energy whose (E, dE/dz) for one fixed shape and basis is a CUDA graph, captured once and
    replayed at every evaluation: a UNet evaluation is thousands of small kernel launches, so on a GPU
    at sampling batch sizes the launches, not the arithmetic, set an eager evaluation's pace; replayed,
    what is left is the kernels' own work (docs/benchmarks.md). The
    samplers use it through aebm.energy_and_scores; everything else (mean, energy values) is the
    wrapped energy's. Inputs are copied into static buffers, outputs cloned out of them."""

    def __init__(self, energy, z, cov, bf16=False, warmup=3):
        self.energy, self.mean, self.basis, self.bf16 = energy, getattr(energy, "mean", 0.5), cov.basis, bf16
        self.z, self.s = z.detach().clone(), cov.s.detach().clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the default stream (cuDNN plans, cached DCT matrices)
            for _ in range(warmup):
                self.run()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = self.run()

    def run(self):
        # autocast's weight-cast cache must be off while capturing (its casts would not be replayed)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.bf16, cache_enabled=False):
            return aebm.energy_and_scores(self.energy, self.z, cv.Covariance(self.s, self.basis, check=False),
                                          need_log_s=False)

    def __call__(self, y, cov):
        return self.energy(y, cov)

    def energy_and_scores(self, z, cov, need_log_s=False):
        if need_log_s or z.shape != self.z.shape or cov.basis != self.basis:
            return aebm.energy_and_scores(self.energy, z, cov, need_log_s=need_log_s)
        self.z.copy_(z)
        self.s.copy_(cov.s)
        self.graph.replay()
        E, score_z, _ = self.out
        return E.clone(), score_z.clone(), None


# -----------------------------------------------------------------------------
# Tasks: a degradation, its observation as anisotropic denoising (M2), and what restores it.

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
    y, cov_y = task.to_denoising(y_obs, mean)
    return y, cov_y, y_obs, task


def observed_problem(args, energy, y_obs, missing=None):
    """(y~, Sigma_y, estimates, degradation) for a measurement y_obs that came as it is (--observed), no truth.
    A degradation parameter left unset (--noise, --blur-std) is estimated blindly: the candidate that
    minimises -log p(y_obs) under the normalized energy (aebm.degradation_nll). estimates: {name: value}."""
    mean, shape = aebm.energy_mean(energy), y_obs.shape
    kw = dict(dtype=y_obs.dtype, device=y_obs.device)
    noises = NOISES if args.noise is None else [args.noise]
    stds = BLUR_STDS if args.blur_std is None else [args.blur_std]
    progress = data.Progress("blind estimation", len(noises) * (len(stds) if args.task == "deblur" else 1), args.quiet)
    if args.task == "deblur":
        _, b, sigma = aebm.blind_deblur(energy, y_obs, stds, noises, args.basis, mean, progress)
        b, sigma = float(b[0]), float(sigma[0])
        prob, estimates = cv.blur_problem(shape, b, sigma, args.basis, **kw), dict(blur_std=b, noise=sigma)
    else:
        r = args.sr_factor if args.task == "sr" else 1  # SR: y_obs is already on the large grid; noise scales by r
        make = {"denoise": lambda s: cv.denoising_problem(shape, s, **kw),
                "inpaint": lambda s: cv.inpainting_problem(missing, shape[1], s, kw["dtype"]),
                "sr": lambda s: cv.sr_problem(shape, r, r * s, "dct", **kw)}[args.task]
        nll = []
        for s in noises:
            nll.append(aebm.degradation_nll(energy, y_obs, make(s), mean, observed_only=args.task != "denoise").sum().item())
            progress(1)
        sigma = noises[min(range(len(noises)), key=nll.__getitem__)]
        prob, estimates = make(sigma), dict(noise=sigma)
    progress.close()
    y, cov = prob.to_denoising(y_obs, mean)
    return y, cov, estimates, prob


def blind_estimate(args, energy, y, y_obs, shape, device, dtype, report):
    """--blind on dataset images: the degradation under which the observation is most probable, with the
    energy of every candidate printed; returns the (y~, Sigma_y) of the first image's estimate (the images
    share their degradation here)."""
    mean = aebm.energy_mean(energy)
    noises = [0.01, 0.02, 0.05, 0.1, 0.2]
    if args.task == "inpaint" and args.mask == "box":
        H = shape[-1]
        sizes = sorted({max(1, round(H * f)) for f in (0.125, 0.25, 0.375, 0.5, 0.625, 0.75)})
        progress = data.Progress("blind estimation", len(sizes) * len(noises), args.quiet)
        grid, est_a, est_noise = aebm.blind_inpaint(energy, y, shape[1], sizes, noises, args.missing_var, progress)
        true, name, axes = (args.box_size if args.box_size is not None else H // 2, args.noise), "box size", (sizes, noises)
    elif args.task == "deblur":
        progress = data.Progress("blind estimation", len(BLUR_STDS) * len(noises), args.quiet)
        grid, est_a, est_noise = aebm.blind_deblur(energy, y_obs, BLUR_STDS, noises, args.basis, mean, progress)
        true, name, axes = (args.blur_std, args.noise), "blur std", (BLUR_STDS, noises)
    else:
        raise ValueError("--blind is implemented for --task inpaint --mask box and --task deblur")
    progress.close()
    estimates = list(zip(est_a.tolist(), est_noise.tolist()))
    print(f"blind estimation over {len(axes[0])} x {len(axes[1])} candidates ({name} x noise):")
    print(f"  true      {name} {true[0]}, noise {true[1]}")
    for i, (a, b) in enumerate(estimates):
        print(f"  image {i}: {name} {a}, noise {b}")
    above = (grid - grid.flatten(1).min(1).values.view(-1, 1, 1)).mean(0)  # energy above each image's minimum
    print(f"  energy above the minimum (mean over images); rows: {name}, columns: noise {axes[1]}")
    for i, row in enumerate(above.tolist()):
        print(f"    {axes[0][i]!s:>6} " + " ".join(f"{v:10.1f}" for v in row))
    report["blind"] = dict(true=true, estimates=estimates, candidates=axes, energy_above_min=above.tolist())
    args.noise = estimates[0][1]
    if args.task == "inpaint":
        args.box_size = int(estimates[0][0])
        missing = build_task(args, shape, device, dtype)
        return y, cv.mask_covariance(missing, args.missing_var, args.noise ** 2, shape[1], dtype)  # the same y~
    args.blur_std = float(estimates[0][0])
    return build_task(args, shape, device, dtype).to_denoising(y_obs, mean)


def restore(args, energy, y, cov_y, device, generator, report):
    """(the posterior mean (M4), --samples posterior samples by reverse diffusion)."""
    x_hat = aebm.posterior_mean(energy, y, cov_y)
    report["evaluations"] = 1
    if args.sampler == "mean":
        return x_hat, []
    # launches, not arithmetic, set an eager GPU evaluation's pace; the learned energy only: the exact Gaussian's
    # energy chooses its formula from Sigma on the host (a sync a graph cannot capture) and is a few launches anyway
    use_graph = device.type == "cuda" and args.cuda_graph and isinstance(energy, aebm.EnergyModel)
    sampler_energy = CudaGraphEnergy(energy, cov_y.U(y), cov_y) if use_graph else energy
    per_level = 1 + args.correctors + (args.sampler == "adaptive" and args.correctors > 0)  # as reverse_diffusion counts
    progress = data.Progress(f"{args.sampler} sampling", args.samples * args.steps * per_level, args.quiet)
    samples, acceptance = [], []
    for _ in range(args.samples):
        res = reverse_diffusion(sampler_energy, y, cov_y, levels=args.steps, s_end=args.s_end,
                                corrector="mala" if args.sampler == "mala" else "ula", n_corrector=args.correctors,
                                eta=args.eta, tau=args.tau, schedule="adaptive" if args.sampler == "adaptive" else
                                "geometric", generator=generator, progress=progress)
        samples.append(res.x_mean)
        acceptance.append(res.acceptance)
    progress.close()
    report["evaluations"], report["acceptance"] = res.evaluations, acceptance
    return x_hat, samples


def evidence_check(args, energy, config, y_obs, prob):
    """Does the model explain the photograph better than a 1/f Gaussian fitted to it (aebm.evidence)? Both
    evidences, and a warning if not. Denoising and deblurring only: a mask is not diagonal in the DCT, and
    under SR the learned energies' normalization misled the verdict (docs/results.md §5)."""
    if args.task not in ("denoise", "deblur") or prob.basis == "fft":
        return None
    model, gaussian, _ = aebm.evidence(energy, y_obs, prob)
    print(f"evidence, -log p(observation) per dimension: model {model:.4f} nats, 1/f Gaussian fitted to this "
          f"image {gaussian:.4f} nats")
    if model > gaussian:  # one line: what it learned, what it means, what to do
        print(f"warning: the model explains this image worse than a Gaussian fitted to it: it learned "
              f"{config['dataset'] + ' images' if config else 'another kind of image'}, and "
              "its restoration may be worse than a classical one; for a prior of pictures like this, train one: python "
              "train.py --preset photos --dataset folder --data-dir YOUR_PICTURES")
    return {"model": model, "gaussian_1/f": gaussian}


def score(report, x, y_obs, x_hat, samples):
    """PSNR and SSIM against the truth x of the observation (the baseline to beat), mean and samples."""
    report["psnr_observation"] = data.psnr(y_obs, x).mean().item()
    report["psnr_mean"], report["ssim_mean"] = data.psnr(x_hat, x).mean().item(), data.ssim(x_hat, x).mean().item()
    if samples:
        report["psnr_samples"] = torch.stack([data.psnr(s, x) for s in samples]).mean().item()
        report["ssim_samples"] = torch.stack([data.ssim(s, x) for s in samples]).mean().item()


def in_dtype(y, y_obs, cov_y, dtype):  # the observation, drawn in float64, in the run's dtype
    return y.to(dtype), y_obs.to(dtype), cv.Covariance(cov_y.s.to(dtype), cov_y.basis)


# -----------------------------------------------------------------------------
# The command line: dataset images (main) or your own file (restore_file).

def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.steps = args.steps or (600 if device.type == "cuda" else 150)
    nets.set_tf32(args.tf32 and args.dtype == "float32", device)  # the float64 reference stays exact
    dtype = getattr(torch, args.dtype)
    data.prepare_out(args.out)
    if args.input or args.observed:
        return restore_file(args, device, dtype)
    energy, config, ds = load_prior(args, device)
    energy = energy.to(dtype)  # the checkpoint's weights (or the exact prior's spectrum) in the chosen dtype
    args.basis = args.basis or config.get("spectral_basis", "dct")
    prior_basis = "fft" if args.prior == "exact" else "pixel"  # s I is diagonal in any basis; fft: the exact prior's fast path
    g = torch.Generator(device).manual_seed(args.seed)
    x = ds.get_batch(args.n, torch.Generator().manual_seed(10_000 + args.seed)).to(device, dtype)
    report, t0 = {"task": args.task, "sampler": args.sampler, "prior": args.prior, "dtype": args.dtype}, time.time()
    if args.task == "uncond":
        progress = data.Progress("generation", args.steps * (1 if args.sampler == "mean" else 2), args.quiet)
        res = generate(energy, x.shape, levels=args.steps, s_end=args.s_end, generator=g, progress=progress,
                       corrector=None if args.sampler == "mean" else ("mala" if args.sampler == "mala" else "ula"))
        progress.close()
        rows, samples = [res.x_mean], [res.x_mean]
    else:
        y, cov_y, y_obs, _ = observe(args, x.double(), aebm.energy_mean(energy), g)
        y, y_obs, cov_y = in_dtype(y, y_obs, cov_y, dtype)
        if args.blind:
            y, cov_y = blind_estimate(args, energy, y, y_obs, x.shape, device, dtype, report)
        x_hat, samples = restore(args, energy, y, cov_y, device, g, report)
        rows = [x, y_obs, x_hat] + samples
        score(report, x, y_obs, x_hat, samples)
        report["log_posterior_truth"] = aebm.log_posterior(energy, x, y, cov_y, prior_basis).mean().item()
        if samples:
            report["log_posterior_samples"] = torch.stack([aebm.log_posterior(energy, s, y, cov_y, prior_basis)
                                                           for s in samples]).mean().item()
    report["seconds_per_image"] = (time.time() - t0) / args.n
    for name, images in (("truth", [x]), ("samples", samples)):  # log p (M10) and bits/dim under the prior
        if images:
            lp = torch.stack([aebm.log_prob(energy, s, basis=prior_basis) for s in images])
            report[f"log_prior_{name}"] = lp.mean().item()
            report[f"bpd_{name}"] = aebm.bits_per_dim(-lp, x[0].numel()).mean().item()
    grid_path = data.save_grid(os.path.join(args.out, f"{args.task}_{args.sampler}.png"), rows)
    write_report(os.path.join(args.out, f"{args.task}_{args.sampler}.json"), report, skip=("blind",))
    print(f"grid: {grid_path}" + (" (rows: truth | observation | posterior mean | samples)" if args.task != "uncond" else ""))
    return report


def restore_file(args, device, dtype):
    """--input (a clean image: the task degrades it, metrics against it) or --observed (a degraded photo,
    restored as it is). The image keeps its own size: padded to what the UNet takes (half-sample-
    symmetric reflection, the DCT's boundary) and cropped back; the outputs are PNGs at that size."""
    observed, path = args.observed is not None, args.observed or args.input
    energy, config, channels, factor = None, None, args.channels, 1
    if args.prior == "model":
        energy, config = load_model(args, device)
        channels, factor = config["channels"], energy.net.factor  # the UNet halves the image (levels - 1) times
    img = data.read_image(path, channels).to(device, torch.float64)  # (1, C, h, w)
    h, w = img.shape[-2:]
    r = args.sr_factor if args.task == "sr" else 1
    if observed and args.task == "sr":  # a small image: put on the r times larger grid, in the DCT basis
        x, args.basis = cv.upscale_grid(data.pad_symmetric(img, factor), r), "dct"
    else:
        x = data.pad_symmetric(img, math.lcm(factor, r))
        r = 1
    if energy is None:  # the exact prior of a Gaussian field at the image's own size
        energy = load_prior(args, device, image_size=tuple(x.shape[-2:]))[0]
    energy = energy.to(dtype)
    args.basis = args.basis or ("dct" if args.prior == "model" else "fft")
    nets.check_memory(energy, x.shape, device)
    g = torch.Generator(device).manual_seed(args.seed)
    report = {"task": args.task, "sampler": args.sampler, "prior": args.prior, "dtype": args.dtype,
              "mode": "observed" if observed else "input", "file": path, "size": [r * w, r * h]}
    t0 = time.time()
    if observed:
        missing = None
        if args.task == "inpaint":
            hole = data.read_mask(args.mask_file, h, w) if args.mask_file else build_task(args, (1, 1, h, w), device, dtype)
            missing = data.pad_symmetric(hole.float(), factor).to(device) > 0.5
        (y, cov_y, report["estimates"], prob), y_obs = observed_problem(args, energy, x, missing), x
        print(f"estimated degradation: {report['estimates']}")
        report["evidence"] = evidence_check(args, energy, config, x, prob)
    else:
        y, cov_y, y_obs, _ = observe(args, x, aebm.energy_mean(energy), g)
    y, y_obs, cov_y = in_dtype(y, y_obs, cov_y, dtype)
    x_hat, samples = restore(args, energy, y, cov_y, device, g, report)
    report["seconds"] = time.time() - t0
    crop = lambda t: t[..., : r * h, : r * w]
    stem = os.path.join(args.out, f"{os.path.splitext(os.path.basename(path))[0]}_{args.task}")
    report["outputs"] = [data.save_image(stem + "_restored.png", crop(x_hat)[0])]
    report["outputs"] += [data.save_image(stem + f"_sample{i}.png", crop(s)[0]) for i, s in enumerate(samples)]
    if not observed:
        report["outputs"].append(data.save_image(stem + "_observation.png", crop(y_obs)[0]))
        score(report, crop(x).to(dtype), crop(y_obs), crop(x_hat), [crop(s) for s in samples])
    write_report(stem + ".json", report)
    report["x_hat"] = crop(x_hat)  # for callers (tests); not written to the JSON
    return report


def write_report(path, report, skip=()):
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    for k, v in report.items():
        if k not in skip:
            print(f"{k:24s} {v if not isinstance(v, float) else round(v, 4)}")


def load_model(args, device):
    """(energy, config) of --ckpt: the EMA weights, in eval mode."""
    if not os.path.exists(args.ckpt):
        raise FileNotFoundError(f"no checkpoint at {args.ckpt}: run `python train.py` first (a few minutes on a "
                                "CPU), pass --ckpt, or use --prior exact to run with the exact Gaussian prior")
    return nets.load_energy(args.ckpt, device)


def load_prior(args, device, image_size=None):
    """(energy, config, test dataset): the checkpoint's EMA model, the exact Gaussian prior (of a field at
    image_size (H, W) when restoring a file, else at --img-size), or the Gaussian fitted to training images."""
    if args.prior == "exact":
        if args.dataset not in (None, "gaussian"):
            raise ValueError("--prior exact is the exact density of the built-in gaussian dataset; drop --dataset")
        ds = data.GaussianField(image_size or args.img_size, args.channels)
        config = dict(dataset="gaussian", img_size=args.img_size, channels=args.channels, spectral_basis="fft")
        return copy.deepcopy(ds.prior).to(device), config, ds  # a copy: the dataset keeps sampling in float64
    if args.prior == "fitted":
        name = args.dataset or "deadleaves"
        size, basis = data.DATASET_DEFAULTS.get(name, (32, "dct"))
        size = args.img_size or size
        ds = data.load_dataset(name, size, args.channels, args.data_dir, "test")
        x = data.load_dataset(name, size, args.channels, args.data_dir, "train").get_batch(
            args.fit_images, torch.Generator().manual_seed(123))
        basis = args.basis if args.task in ("deblur", "sr") and args.basis else basis  # diagonal where the task allows
        config = dict(dataset=name, img_size=size, channels=ds.channels, spectral_basis=basis)
        return aebm.fit_gaussian(x, basis).to(device), config, ds
    energy, config = load_model(args, device)
    if args.dataset in (None, config["dataset"]):  # the data it was trained on: the same leaves, crops, folder
        return energy, config, data.dataset_for(config, "test", args.data_dir)
    ds = data.load_dataset(args.dataset, config["img_size"], config["channels"], args.data_dir, "test")
    return energy, config, ds


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Restore, sample and estimate with an anisotropic energy model.")
    p.add_argument("--task", default="inpaint", choices=["denoise", "inpaint", "deblur", "sr", "uncond"], help="inverse problem")
    p.add_argument("--sampler", default="ula", choices=["mean", "ula", "mala", "adaptive"],
                   help="mean: Tweedie in one shot; ula/mala: reverse diffusion with that corrector; adaptive: M13 "
                        "schedule + ULA (the peer solvers DPS, RED-Diff, DAPS: experiments/solvers.py)")
    p.add_argument("--blind", action="store_true", help="estimate the degradation first (inpaint: box x noise; deblur: blur x noise)")
    p.add_argument("--ckpt", default="runs/quick/ckpt.pt", help="checkpoint from train.py")
    p.add_argument("--prior", default="model", choices=["model", "exact", "fitted"],
                   help="exact: the exact GaussianEnergy of the built-in gaussian dataset (no training needed); "
                        "fitted: a Gaussian prior fitted to --fit-images training images of --dataset (the Wiener filter)")
    p.add_argument("--input", default=None, help="your own clean image (any format pillow reads): the task degrades it")
    p.add_argument("--observed", default=None,
                   help="your own degraded photo: restored as it is; unset --noise / --blur-std are estimated blindly")
    p.add_argument("--out", default="runs/sample", help="output directory (PNGs, metrics JSON)")
    p.add_argument("--n", type=int, default=4, help="number of test images")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--device", default=None, help="cpu or cuda")

    a = p.add_argument_group("the degradation")
    a.add_argument("--noise", type=float, default=None,
                   help="measurement noise std sigma_n, images in [0, 1] (default 0.05; --observed: estimated)")
    a.add_argument("--mask", default="box", choices=["box", "half", "random"], help="inpainting mask")
    a.add_argument("--box-size", type=int, default=None, help="box side in pixels (default: half the image)")
    a.add_argument("--half-rows", type=int, default=None, help="rows hidden by the half mask (default: half)")
    a.add_argument("--ratio", type=float, default=0.5, help="fraction of missing pixels for the random mask")
    a.add_argument("--mask-file", default=None, help="inpainting mask image, white = missing, the image's size")
    a.add_argument("--missing-var", type=float, default=cv.S_HUGE, help="variance of the missing pixels of y~ (M2: s_huge)")
    a.add_argument("--blur-std", type=float, default=None, help="Gaussian blur std in pixels (default 1.5; --observed: estimated)")
    a.add_argument("--sr-factor", type=int, default=2, help="super-resolution factor")
    a.add_argument("--basis", default=None, choices=["fft", "dct"], help="spectral basis of deblur/sr (default: the checkpoint's)")

    a = p.add_argument_group("the sampler")
    a.add_argument("--steps", type=int, default=None,
                   help="noise levels of the reverse diffusion (default: 600 on CUDA as in the paper, 150 on CPU)")
    a.add_argument("--correctors", type=int, default=1, help="corrector steps per level")
    a.add_argument("--eta", type=float, default=0.15, help="corrector step size")
    a.add_argument("--tau", type=float, default=0.9, help="corrector temperature (proposal noise scale)")
    a.add_argument("--s-end", type=float, default=None,
                   help="final variance of the reverse diffusion (default: 1e-4, or a tenth of the noise variance if lower)")
    a.add_argument("--samples", type=int, default=1, help="posterior samples per image")
    a.add_argument("--dtype", default="float32", choices=["float32", "float64"],
                   help="precision of inference (the weights are cast to it); float64 is the reference (docs/precision.md)")
    a.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    a.add_argument("--cuda-graph", type=int, default=1, choices=[0, 1],
                   help="1: on CUDA, the samplers replay each evaluation as a captured CUDA graph")
    a.add_argument("--tf32", type=int, default=1, choices=[0, 1],
                   help="1: on CUDA, TF32 matmuls and convolutions (measured against float32: docs/precision.md); 0: float32")

    a = p.add_argument_group("test images and the classical priors")
    a.add_argument("--dataset", default=None, help="test images (default: the checkpoint's dataset, held-out split)")
    a.add_argument("--data-dir", default=None, help="directory of an on-disk dataset")
    a.add_argument("--img-size", type=int, default=None, help="image size with --prior exact (16) or fitted (the dataset's)")
    a.add_argument("--channels", type=int, default=None, help="channels with --prior exact (1) or fitted (3)")
    a.add_argument("--fit-images", type=int, default=512, help="training images for --prior fitted")
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
    noise = args.noise if args.noise is not None else 0.05
    for bad, message in [
        (args.correctors < 0, f"--correctors must be 0 or more, got {args.correctors}"),
        (args.eta > 1, f"--eta {args.eta} is too large: a corrector step of more than 1 overshoots (default 0.15)"),
        (args.tau > 10, f"--tau {args.tau} is too large: it scales the proposal noise (1 is exact, default 0.9)"),
        (not 0 < args.ratio < 1, f"--ratio must be in (0, 1), got {args.ratio}"),
        (args.channels not in (1, 3), f"--channels must be 1 or 3, got {args.channels}"),
        (args.task == "uncond" and bool(args.blind or args.input or args.observed),
         "--task uncond generates images: it takes no --blind, --input or --observed"),
        (bool(args.input and args.observed), "pass either --input (a clean image to degrade) or --observed (a degraded photo), not both"),
        (args.prior == "fitted" and bool(args.input or args.observed),
         "--prior fitted is fitted at its dataset's image size: use it with dataset images, not --input/--observed"),
        (bool(args.mask_file) and args.task != "inpaint", "--mask-file is for --task inpaint"),
        (bool(args.observed) and args.task == "sr" and args.basis == "fft",
         "--observed with --task sr upscales in the DCT basis (a photo is not periodic): drop --basis fft"),
        (args.s_end is not None and args.task != "uncond" and args.s_end >= noise ** 2 and not args.observed,
         f"--s-end {args.s_end} must be below the noise variance {noise ** 2:g} (--noise {noise})"),
        (args.device is not None and nets.device_error(args.device) is not None, f"--device {nets.device_error(args.device or 'cpu')}")]:
        if bad:
            p.error(message)

def cli():
    """`python sample.py ...`: errors of the user's making as one line, not a traceback."""
    try:
        main()
    except (ValueError, FileNotFoundError, MemoryError) as e:
        sys.exit(f"sample.py: error: {e}")


if __name__ == "__main__":
    cli()
