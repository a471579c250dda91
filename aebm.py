"""
The normalized energy, dual score matching, and log-probabilities (docs/method.md §3, §4, §6 M10).

The energy protocol. Anything with the call signature

    energy(y, cov) -> (B,) tensor,   y: (B, C, H, W) noisy images,  cov: covariances.Covariance

is an energy model E(y, Sigma) ~ -log p_Sigma(y). Two implementations follow the same protocol,
so every function here and in sample.py takes either:

    EnergyModel(net)       the learned energy of M3 around a network from nets.py
    GaussianEnergy(mu, C)  the exact energy -log N(y; mu, C + Sigma) of a Gaussian prior (M9)

From an energy, `energy_and_scores` returns E, dE/dy and dE/dlog s in ONE autograd call; the
A-DSM (M5) and A-CSM (M7) losses and the posterior mean (M4) are written on top of it. Because the
energy is normalized, energies under different covariances can be compared: the last section turns
that into log-probabilities (M10), the posterior density by Bayes' rule, and blind estimation of a
degradation (paper eq. 16).
Naming: `score_y` = dE/dy and `score_log_s` = dE/dlog s are gradients of the *energy*, i.e. minus
the usual scores of log p.

Read covariances.py first; nets.py holds the network F_theta, train.py minimises `dual_score_loss`,
sample.py uses `energy_and_scores` in every sampler. The file ends with the exact Gaussian energy
(M9), the independent reference every test compares the learned one with.
"""

import math

import torch
import torch.nn as nn

from covariances import (S_HUGE, S_MIN, Covariance, Degradation, blur_problem, box_mask, from_basis, mask_covariance,
                         reflect_freq, to_basis, white_noise)

LOG_2PI = math.log(2 * math.pi)


# -----------------------------------------------------------------------------
# Energies as functions of basis coordinates.
#
# Precision (docs/precision.md). Everything that multiplies a gradient by s works in the basis of
# Sigma, on z = U y, and never on pixels: with s up to s_huge = 1e8 (a missing pixel, a dropped
# frequency), a gradient formed in pixel space mixes coordinates of size 1e-4 (uninformative) with
# coordinates of size 1e2 (informative), and float32 keeps only the latter's digits; multiplying
# the transform back by s turns that rounding into errors of order 1e2. With z as the autograd
# leaf, each coordinate's gradient carries its own 1/v before any transform mixes it with the others.

def energy_of_z(energy, z, cov):
    """E as a function of the basis coordinates z = U y. Energies written from z (EnergyModel,
    GaussianEnergy: an `energy_z` method) are called directly; any other callable energy(y, cov)
    is evaluated at y = U^H z (fine for tests and toys; it round-trips through pixels)."""
    if hasattr(energy, "energy_z"):
        return energy.energy_z(z, cov)
    return energy(cov.Uh(z), cov)


def real_dtype(z):
    return z.real.dtype if z.is_complex() else z.dtype


def sum_coords(terms):
    """Sum of per-coordinate terms over each image, in float64: an energy is ~1e4 nats while MALA and
    blind estimation compare differences of a few nats, below float32's resolution at 1e4 (2e-3)."""
    return terms.double().flatten(1).sum(1)


# What any energy (EnergyModel, GaussianEnergy, a plain function) was built with: sample.py reads these.

def energy_mean(energy):
    """The data mean mu the energy was built with (EnergyModel: a float; GaussianEnergy: a tensor)."""
    m = getattr(energy, "mean", 0.5)
    return m if torch.is_tensor(m) or isinstance(m, float) else float(m)


def energy_tensors(energy):
    return list(energy.parameters()) + list(energy.buffers()) if isinstance(energy, torch.nn.Module) else []


def energy_device(energy):
    tensors = energy_tensors(energy)
    return tensors[0].device if tensors else torch.device("cpu")


def energy_dtype(energy):
    """The dtype the energy computes in (its first floating tensor; float32 for a plain function)."""
    return next((t.dtype for t in energy_tensors(energy) if t.is_floating_point()), torch.float32)


# -----------------------------------------------------------------------------
# The learned energy (M3).

class EnergyModel(nn.Module):
    """E_theta(y, Sigma) = 1/2 |y~|^2 + 1/2 sum log(2 pi v) + 1/2 < y~, w * U F_theta(U^H(sqrt(w) y~), Sigma) >
                           + sum_k w_k b_theta(Sigma)_k                                                   (M3)

    with v = sigma_d^2 + s, y~ = v^{-1/2} * U(y - mu) (whitened) and w = sigma_d^2 / v in (0, 1].
    The first two terms are the exact energy of the Gaussian prior N(mu, sigma_d^2 I); the learned
    terms vanish like 1/s, so E_theta -> the Gaussian limit as s -> infinity for any theta
    (docs/method.md §3), which anchors the normalization. The last term, per-coordinate offsets b that
    depend on Sigma only (from the network's covariance embedding), is the learned normalizing
    constant: without it a Sigma-dependent constant can only be written through y (as ~|y~|^2),
    which DSM penalises, and the offset drifts with the noise level (docs/results.md, Normalization).

    The network sees sqrt(w) y~ = sigma_d (y - mu) / v (the Wiener-shrunk input, scale <= 1, unit at
    low noise) rather than y~ itself. Reason: Tweedie (M4) multiplies dE/dy_k by s_k. With input
    y~, the network's sensitivity to a coordinate carrying no information (s_k = 1e8: a missing
    pixel, a dropped frequency) is ~ v_k^{-1/2}, so the posterior mean picks up errors ~ sqrt(s_k)
    ~ 1e4 times any residual sensitivity; with sqrt(w) y~ it is ~ 1/v_k, the true energy's own
    scaling, and the error stays O(1). tests/test_energy.py shows both for a random network.

    Above the training range (s > S_MAX = 1e3, up to s_huge) the network sees log s clamped to
    S_MAX in its embedding (nets.sinusoidal) and an input sqrt(w) y~ ~ sigma_d zeta / sqrt(s) -> 0:
    such coordinates look alike to it whatever their s, and the posterior mean does not depend on s
    there (tests/test_precision.py).
    """

    def __init__(self, net, mean=0.5, data_var=0.1, spectrum=None, learned_scale="w"):
        super().__init__()
        self.net, self.mean, self.data_var = net, float(mean), float(data_var)
        self.spectrum = spectrum  # None: the white anchor; else power-law parameters (fit_spectrum)
        if learned_scale not in ("w", "unit", "fill"):
            raise ValueError(f"learned_scale must be 'w' (M3 as the paper writes it), 'unit' or 'fill', got {learned_scale!r}")
        self.learned_scale = learned_scale

    def learned_weight(self, c, v, s):
        """a_k, the weight of the network's output in M3's learned term 1/2 < y~, a * U F >. The paper's a = w.
        Tweedie (M4) then moves coordinate k by -s_k dE/dz_k, whose part from F_k is 1/2 s_k a_k v_k^{-1/2} F_k:
        at low noise (s << c) with a = w that is ~ s F / sqrt(c), so to remove noise of size sqrt(s) the network
        must output F ~ sqrt(c / s), and its Jacobian must reach ~ c / s (a denoiser's: O(1) in x^). "unit" is
        EDM's preconditioning carried over to the energy, a = w sqrt(v / s) = c / sqrt(v s): the same F_k moves
        x^_k by 1/2 sqrt(s_k) w_k F_k (EDM's c_out = sqrt(s w) at low noise), so F is unit-scale and its
        Jacobian ~ sqrt(c / s), what a free denoiser's network needs. At s >> c, a -> c / s = w: the learned
        term still vanishes like 1/s and the s -> infinity anchor stays exact; a is y-independent and nonzero,
        so every energy M3 can write it can write too, and the exact energy still minimises the losses.
        "fill", a = sqrt(c w) = c / sqrt(v), is M3 up to the constant sqrt(c) at low noise and gives a coordinate
        that carries no information (a missing pixel, a dropped frequency: s >> c) the move 1/2 c F_k, a direct
        output as a free denoiser's sigma_d F_k; with a = w that move vanishes like c F / sqrt(s) and the fill
        must come through the Jacobian of the observed coordinates' outputs. The learned term then vanishes
        like s^(-1/2) instead of 1/s, still exact in the limit. Trained, neither does what a = w does
        (docs/results.md, Measured and not kept), so w is the default."""
        if self.learned_scale == "w":
            return c / v
        if self.learned_scale == "fill":
            return c / v.sqrt()
        return c / (v * s).sqrt()

    def anchor_var(self, cov):
        """c: the variance of M3's Gaussian part per coordinate of Sigma's basis. The paper's anchor is white,
        c = sigma_d^2. With `spectrum` (train.py --anchor spectral) a spectral Sigma gets the data's own power
        spectrum, c_k = A (|f_k|^2 + f0^2)^(-alpha/2): N(mu, C) is then the Gaussian fitted to the training
        images, whose Wiener filter and blind deblurring are right on its own, and the learned terms add only
        what is not Gaussian. A pixel-basis Sigma (a mask) keeps sigma_d^2: C + Sigma would not be diagonal
        in any basis, and M3's Gaussian part must stay closed-form."""
        if self.spectrum is None or cov.basis == "pixel":
            return self.data_var
        return power_law_spectrum(self.spectrum, *cov.s.shape[-2:], cov.basis, cov.s.device).to(cov.s.dtype)

    def mean_z(self, z, cov):
        """U mu: the data mean in basis coordinates (a constant image: only the DC coefficient in fft/dct)."""
        return cov.U(torch.full(z.shape, self.mean, dtype=real_dtype(z), device=z.device))

    def energy_z(self, z, cov, part="all"):
        """M3 from the basis coordinates z = U y, (B,) in float64. part="learned" returns the learned
        term alone (posterior_mean adds the Gaussian part in closed form)."""
        # The whitening and the reductions run outside autocast: MALA and blind estimation compare
        # energies that differ by a few nats out of 1e4 (docs/method.md §3, Precision).
        with torch.autocast(z.device.type, enabled=False):
            c = self.anchor_var(cov)
            v = c + cov.s  # (B, C, H, W)
            r = z - self.mean_z(z, cov)  # U(y - mu)
            y_t = r * v.rsqrt()  # whitened coordinates y~
            w = c / v
            # the network input: the anchor's Wiener estimate U^H(w (z - mu)) in units of sigma_d; with the white
            # anchor that is U^H(sqrt(w) y~) = sigma_d (y - mu) / v
            x_in = cov.Uh(w * r) / math.sqrt(self.data_var)
        if hasattr(self.net, "offset"):  # nets.UNet also gives the learned normalizing constant's offsets b
            F, b = self.net(x_in.to(self.dtype), cov, with_offset=True)  # (B, C, H, W) each; bf16 under autocast
        else:  # any other network F_theta(x, Sigma)
            F, b = self.net(x_in.to(self.dtype), cov), None
        with torch.autocast(z.device.type, enabled=False):
            a = self.learned_weight(c, v, cov.s)  # w as the paper writes M3 (see learned_weight)
            learned = sum_coords(0.5 * (y_t.conj() * a * cov.U(F.to(real_dtype(z)))).real)  # real part: fft is complex
            if b is not None:  # sum_k w_k b_k(Sigma): y-independent, vanishing like 1/s (the anchor stays exact)
                learned = learned + sum_coords(w * b.to(real_dtype(z)))
            if part == "learned":
                return learned
            # 1/2 sum log(2 pi v) from s in float64 (it is ~1e4 nats at s_huge; only differences matter)
            v64 = (c.double() if torch.is_tensor(c) else c) + cov.s.double()
            gauss = sum_coords(0.5 * y_t.abs().square()) + sum_coords(0.5 * (LOG_2PI + v64.log()))
            return gauss + learned

    @property
    def dtype(self):
        """The network's parameter dtype (its input is cast to it)."""
        p = next(self.net.parameters(), None)
        return p.dtype if p is not None else torch.get_default_dtype()

    def forward(self, y, cov):
        return self.energy_z(cov.U(y), cov)

    def posterior_mean(self, y, cov):
        """Anisotropic Tweedie (M4), x^ = y - Sigma dE/dy = U^H(z - s * dE/dz), with M3's Gaussian part in
        closed form: z - s (z - mu)/v = mu + w (z - mu) exactly, and only the learned term differentiated.
        Written as the difference, the two would cancel to ~1e-4 of z ~ 1e4 at s = 1e8 in float32."""
        z = cov.U(y)
        mu = self.mean_z(z, cov)
        c = self.anchor_var(cov)
        w = c / (c + cov.s)
        _, score_learned, _ = energy_and_scores(self, z, cov, need_log_s=False, part="learned")
        return cov.Uh(mu + w * (z - mu) - cov.s * score_learned)


def gaussian_limit_energy(y, cov, mean, data_var):
    """-log N(y; mu, sigma_d^2 I + Sigma): the limit of M3 as s -> infinity (paper eq. 11)."""
    v = data_var + cov.s
    return sum_coords(0.5 * cov.U(y - mean).abs().square() / v) + sum_coords(0.5 * (LOG_2PI + v.double().log()))


# -----------------------------------------------------------------------------
# E, dE/dz and dE/dlog s from one autograd call.

def energy_and_scores(energy, z, cov, create_graph=False, need_log_s=True, part="all"):
    """E (B,), score_z = dE/dz and score_log_s = dE/dlog s, both (B, C, H, W) in the covariance's basis,
    from ONE call of torch.autograd.grad. z = cov.U(y) are the basis coordinates of the images;
    score_z = U dE/dy (complex for fft), so cov.Uh(score_z) is the pixel gradient dE/dy.
    With create_graph=True the scores stay differentiable in the parameters (training differentiates
    them again). need_log_s=False skips the covariance score (single score matching, and samplers
    that need only dE/dz). part="learned" differentiates M3's learned term alone (EnergyModel).
    An energy may bring its own version of this function (sample.CudaGraphEnergy replays a captured
    CUDA graph of it); it is used for the plain call (no create_graph, the whole energy).
    """
    if hasattr(energy, "energy_and_scores") and not create_graph and part == "all":
        return energy.energy_and_scores(z, cov, need_log_s)
    with torch.enable_grad():
        z = z.detach().requires_grad_(True)
        if need_log_s:
            log_s = cov.log_s.detach().requires_grad_(True)
            cov = Covariance.from_log_s(log_s, cov.basis)
        E = energy_of_z(energy, z, cov) if part == "all" else energy.energy_z(z, cov, part=part)
        inputs = (z, log_s) if need_log_s else (z,)
        grads = torch.autograd.grad(E.sum(), inputs, create_graph=create_graph)
    score_z = grads[0]
    score_log_s = grads[1] if need_log_s else None
    if need_log_s and cov.basis == "fft":
        # Sigma is real only for s[k] = s[-k]: the meaningful derivative is along that constraint,
        # shared equally by the pair (a no-op for energies that are themselves symmetric, M6).
        score_log_s = 0.5 * (score_log_s + reflect_freq(score_log_s))
    if not create_graph:
        E = E.detach()
    return E, score_z, score_log_s


def posterior_mean(energy, y, cov):
    """Anisotropic Tweedie: x^ = y - Sigma dE/dy  (M4), formed in the basis, x^ = U^H(z - s * dE/dz).
    EnergyModel and GaussianEnergy apply their Gaussian part in closed form (their posterior_mean);
    any other energy goes through the generic formula."""
    if hasattr(energy, "posterior_mean"):
        return energy.posterior_mean(y, cov)
    z = cov.U(y)
    _, score_z, _ = energy_and_scores(energy, z, cov, need_log_s=False)
    return cov.Uh(z - cov.s * score_z)


# -----------------------------------------------------------------------------
# Dual score matching (docs/method.md §4).

def dual_score_losses(energy, x, cov, generator=None, need_csm=True, zeta=None, dsm_weight=None):
    """Per-image A-DSM and A-CSM losses for clean images x (B, C, H, W) under covariances cov.
    y = x + U^H(sqrt(s) zeta), zeta drawn here unless given (basis coordinates of white noise, as
    cov.sample returns them); returns (L_dsm, L_csm), each (B,) (L_csm is None if not need_csm).

    dsm_weight: None (M5 as written) or sigma_d^2, which weights coordinate k of A-DSM by
    (s_k + sigma_d^2) / sigma_d^2 (EDM's loss weighting, per coordinate). M5 weighs the squared error of
    x^_k by 1/s_k, so where a pixel is missing (s = 1e3 in training) an error of 0.3 costs 1e-4 and the
    network never learns to fill the hole; weighted, it costs ~1 there as everywhere else. Any weight
    that does not depend on y keeps the minimiser, x^_k = E[x_k | y] (tests/test_energy.py checks the
    exact energy still minimises the weighted loss). dsm_weight="anchor": the same with each coordinate's
    own prior variance c_k = energy.anchor_var(cov), (s_k + c_k) / c_k (equal to the above for the white
    anchor): under the spectral anchor a low frequency's c_k can be many times sigma_d^2 (crops of large
    leaves), and sigma_d^2 there would weight its error by c_k / sigma_d^2 more than the rest's.
    dsm_weight="edm-pixel": sigma_d^2's weight for a pixel-basis Sigma (where holes need it) and none for a
    spectral Sigma, whose dropped frequencies the spectral anchor fills (weighted there too, by sigma_d^2 or
    by c_k, the Gaussian field's offsets came out worse: docs/results.md §2)."""
    if zeta is None:
        zeta = white_noise(cov.s.shape, cov.basis, generator, cov.s.dtype, cov.s.device)
    # z = U y formed in the basis, never as pixels: a dropped frequency (s = 1e8) would put values
    # ~1e4 in every pixel and round away the informative coordinates' low noise in float32.
    z = cov.U(x) + cov.s.sqrt() * zeta
    _, score_z, score_log_s = energy_and_scores(energy, z, cov, create_graph=True, need_log_s=need_csm)
    d = x[0].numel()
    # (M5) A-DSM: (1/d) |sqrt(s) * U dE/dy - zeta|^2 = (1/d) |Sigma^{-1/2}(x^ - x)|^2
    c = dsm_weight
    if isinstance(dsm_weight, str):  # "anchor": each coordinate's own c_k; "edm-pixel": sigma_d^2, pixel basis only
        c = energy.anchor_var(cov) if dsm_weight == "anchor" else (energy.data_var if cov.basis == "pixel" else None)
    weight = 1.0 if c is None else (cov.s + c) / c
    L_dsm = (weight * (cov.s.sqrt() * score_z - zeta).abs().square()).flatten(1).sum(1) / d
    if not need_csm:
        return L_dsm, None
    # (M6, M7) A-CSM: dE/dlog s_k should regress the target 1/2 (1 - |zeta_k|^2)
    target = 0.5 * (1 - zeta.abs().square())
    L_csm = (score_log_s - target).square().flatten(1).sum(1) / d
    return L_dsm, L_csm


def dual_score_loss(energy, x, cov_groups, lam=1.0, generator=None, zetas=None, dsm_weight=None):
    """L = L_DSM + lam L_CSM averaged over the batch (M8); lam = 0 is single (DSM-only) score matching.
    cov_groups: a Covariance for the whole batch, or the list of (slice, Covariance) groups that
    covariances.sample_training_covariances returns; zetas: optional noise per group (tests use it
    to feed identical noise to different runs); dsm_weight: see dual_score_losses.
    Returns (L, L_dsm mean, L_csm mean), the two parts detached for logging (L_csm is NaN when
    lam = 0: single score matching never computes it)."""
    if isinstance(cov_groups, Covariance):
        cov_groups = [(slice(0, x.shape[0]), cov_groups)]
    dsm_parts, csm_parts = [], []
    for i, (idx, cov) in enumerate(cov_groups):
        zeta = zetas[i] if zetas is not None else None
        L_dsm, L_csm = dual_score_losses(energy, x[idx], cov, generator, need_csm=lam != 0, zeta=zeta,
                                         dsm_weight=dsm_weight)
        dsm_parts.append(L_dsm)
        csm_parts.append(L_csm if L_csm is not None else torch.full_like(L_dsm, float("nan")))
    L_dsm, L_csm = torch.cat(dsm_parts).mean(), torch.cat(csm_parts).mean()
    L = L_dsm + lam * L_csm if lam != 0 else L_dsm
    return L, L_dsm.detach(), L_csm.detach()


# -----------------------------------------------------------------------------
# Probabilities (M10), Bayes' rule and blind estimation: what a normalized energy is for.

def log_prob(energy, x, s=S_MIN, basis="pixel"):
    """log p(x) ~ -E(x, s I) at a tiny isotropic variance (M10). s I is the same matrix in every
    basis; `basis` only picks the cheapest path (fft for a stationary GaussianEnergy)."""
    cov = Covariance(torch.full_like(x, s), basis)
    with torch.no_grad():
        return -energy(x, cov)


def bits_per_dim(neg_log_p, d):
    """bits/dim of 8-bit data represented in [0, 1]: E / (d ln 2) + 8 (M10)."""
    return neg_log_p / (d * math.log(2)) + 8


def log_posterior(energy, x, y, cov_y, prior_basis="pixel", s_prior=S_MIN):
    """log p(x | y~) = log p(x) + log N(y~; x, Sigma_y) - log p_Sigma_y(y~): Bayes' rule with normalized
    energies (M10; coordinates with s_huge carry no likelihood and are left out of both terms)."""
    keep = cov_y.s < S_HUGE * 0.999
    r = cov_y.U(y - x)
    log_lik = -0.5 * sum_coords(torch.where(keep, r.abs().square() / cov_y.s + torch.log(2 * math.pi * cov_y.s), 0))
    huge_part = 0.5 * sum_coords(torch.where(keep, 0, cov_y.U(y - energy_mean(energy)).abs().square() / cov_y.s
                                             + torch.log(2 * math.pi * cov_y.s)))
    with torch.no_grad():
        log_evidence = -energy(y, cov_y) + huge_part  # the s_huge coordinates' Gaussian-limit factor removed
    return log_prob(energy, x, s=s_prior, basis=prior_basis) + log_lik - log_evidence


# Entropies and information (docs/method.md §6). Only a normalized density has them: with an offset
# c(Sigma), every number below would move by it.

def mean_and_error(v):
    """Monte-Carlo mean of a (n,) sample and its standard error, as floats."""
    v = v.double()
    return v.mean().item(), (v.std() / math.sqrt(v.numel())).item() if v.numel() > 1 else float("nan")


def posterior_entropy(energy, samples, y, cov_y, prior_basis="pixel"):
    """H[x | y~] = E_{x ~ p(x|y~)} [-log p(x | y~)] for ONE observation (y~ (1, C, H, W), Sigma_y batch 1), from
    n posterior samples (n, C, H, W) and the normalized posterior density (log_posterior). Returns (H,
    standard error) in nats. An unbiased estimate only if the samples come from the posterior that the
    density describes: a sampler that is too wide or too narrow biases it (docs/results.md §6 measures it)."""
    n = samples.shape[0]
    y_n = y.expand(n, *y.shape[1:])
    cov_n = Covariance(cov_y.s.expand(n, *cov_y.s.shape[1:]), cov_y.basis, check=False)
    return mean_and_error(-log_posterior(energy, samples, y_n, cov_n, prior_basis))


def noise_entropy(prob):
    """H[y_obs | x] = 1/2 log(2 pi e sigma_n^2) per measured coordinate (the informative ones, as
    degradation_nll with observed_only counts them), in nats, for each image of prob's batch."""
    return 0.5 * prob.informative.flatten(1).sum(1).double() * math.log(2 * math.pi * math.e * prob.sigma_n ** 2)


def information(energy, y_obs, prob, mean):
    """I(x; y_obs) = H[y_obs] - H[y_obs | x] in nats, from observations y_obs (B, C, H, W) of images drawn
    from the prior: H[y_obs] = E[-log p(y_obs)] by the normalized evidence (degradation_nll, measured
    coordinates only) and H[y_obs | x] in closed form (noise_entropy). One energy evaluation per
    observation and no posterior samples: it equals H[x] - E H[x | y] for the true density, and the
    learned one's error is its normalization offset under this degradation. Returns (I, standard error)."""
    nll = degradation_nll(energy, y_obs, prob, mean, observed_only=True)
    return mean_and_error(nll - noise_entropy(prob).to(nll.device))


def degradation_nll(energy, y_obs, prob, mean, observed_only=False):
    """-log p(y_obs) under the degradation `prob`, from the normalized energy of its denoising
    observation (M2) by a change of variables in the basis, z = U y_obs:
      informative k:    z_k = a_k y~_k      ->  + log |a_k|
      uninformative k:  z_k ~ N(a_k mu_k, sigma_n^2)  (x is invisible there); the energy of y~_k there,
                        the Gaussian limit at variance s_huge, is removed (exact as s_huge -> inf).
    Candidates with different operators A can then be compared (blind deblurring). Everything stays
    in basis coordinates (the energy of U y~ directly). observed_only leaves out the measurement of the
    uninformative coordinates (for candidates that share the operator, when those values were not
    measured: the hole of a photo to inpaint, the empty grid of an upscaled image)."""
    z_t, cov = prob.to_denoising_z(y_obs, mean)
    with torch.no_grad():
        E = energy_of_z(energy, z_t, cov).double()
    z = to_basis(y_obs, prob.basis)
    mu = to_basis(torch.as_tensor(mean, dtype=y_obs.dtype, device=y_obs.device).expand_as(y_obs), prob.basis)
    fill = 0.5 * ((z_t - mu).abs().square() / prob.s_huge + math.log(2 * math.pi * prob.s_huge))
    noise = 0.5 * ((z - prob.a * mu).abs().square() / prob.sigma_n ** 2 + math.log(2 * math.pi * prob.sigma_n ** 2))
    if observed_only:  # the uninformative coordinates were not measured (a photo's hole, an upscaled grid)
        noise = torch.zeros_like(noise)
    jac = prob.a.abs().clamp_min(1e-300).log()
    per_coord = torch.where(prob.informative, jac, noise - fill)
    return E + sum_coords(per_coord)


# Blind estimation (paper eq. 16): the degradation is the candidate under which the observation is most
# probable. Only a normalized energy can rank candidates this way: an offset c(Sigma) would shift each
# candidate's energy by its own constant.

def blind_inpaint(energy, y, channels, sizes, noises, missing_var=S_HUGE, progress=None):
    """Energies E(y, Sigma(size, sigma)) of one observation y under every centred box size x noise
    level candidate, all evaluating the same y (docs/method.md §6). Returns (energies (B, n_size, n_noise),
    estimated size (B,), estimated sigma (B,)). progress: called after each candidate (data.Progress)."""
    B = y.shape[0]
    grid = torch.empty(B, len(sizes), len(noises), dtype=torch.float64)
    with torch.no_grad():
        for i, size in enumerate(sizes):
            missing = box_mask(y.shape, size, device=y.device)
            for j, sigma in enumerate(noises):
                cov = mask_covariance(missing, missing_var, sigma ** 2, channels, dtype=y.dtype)
                grid[:, i, j] = energy(y, cov).double().cpu()
                if progress:
                    progress(1)
    best = grid.flatten(1).argmin(1)
    return grid, torch.tensor(sizes)[best // len(noises)], torch.tensor(noises, dtype=torch.float64)[best % len(noises)]


def blind_deblur(energy, y_obs, blur_stds, noises, basis, mean, progress=None):
    """-log p(y_obs | b, sigma) over blur std x noise level candidates (B, n_b, n_sigma), and the argmin.
    The candidates have different operators, so each is scored through its own y~ (degradation_nll)."""
    B = y_obs.shape[0]
    grid = torch.empty(B, len(blur_stds), len(noises), dtype=torch.float64)
    for i, b in enumerate(blur_stds):
        for j, sigma in enumerate(noises):
            prob = blur_problem(y_obs.shape, b, sigma, basis, dtype=y_obs.dtype, device=y_obs.device)
            grid[:, i, j] = degradation_nll(energy, y_obs, prob, mean).cpu()
            if progress:
                progress(1)
    best = grid.flatten(1).argmin(1)
    return (grid, torch.tensor(blur_stds, dtype=torch.float64)[best // len(noises)],
            torch.tensor(noises, dtype=torch.float64)[best % len(noises)])


# -----------------------------------------------------------------------------
# The exact energy of a Gaussian prior (M9): the independent reference for everything above.

class GaussianEnergy(nn.Module):
    """E(y, Sigma) = 1/2 (y-mu)^T (C+Sigma)^{-1} (y-mu) + 1/2 log det 2 pi (C+Sigma)   (M9)

    mean: a number or a (C, H, W) tensor. C: either a dense (d, d) covariance matrix (exact by
    Cholesky, for images up to about 32x32x1), or a `Covariance` with batch 1, i.e. a prior
    diagonal in some basis (a stationary field is diagonal in fft). When Sigma is diagonal in that
    same basis the energy is a sum over coordinates, exact at any size, in the inputs' dtype;
    otherwise it is computed densely (one (HW, HW) block per channel for a diagonal prior, whose
    channels are independent) in float64: C + Sigma has a condition number up to ~1e11 at s_huge,
    beyond float32's Cholesky. The posterior mean (the Wiener filter) is closed-form on the diagonal
    path and otherwise solved by conjugate gradients in float64.
    """

    def __init__(self, mean, C):
        super().__init__()
        if isinstance(C, Covariance):
            if C.s.shape[0] != 1:
                raise ValueError(f"a diagonal prior covariance must have batch 1, got shape {C.shape}")
            self.basis, self.image_shape = C.basis, tuple(C.s.shape[1:])
            self.register_buffer("c", C.s.detach().clone())
            self.register_buffer("C_matrix", None)  # made on first use: the fast path never needs it
        else:
            if C.dim() != 2 or C.shape[0] != C.shape[1]:
                raise ValueError(f"dense prior covariance must be a square (d, d) matrix, got {tuple(C.shape)}")
            self.basis, self.image_shape = None, None
            self.register_buffer("c", None)
            self.register_buffer("C_matrix", C.detach().clone())
        dtype = (self.c if self.c is not None else self.C_matrix).dtype
        self.register_buffer("mean", torch.as_tensor(mean, dtype=dtype).clone())
        self._blocks = {}  # per-channel dense blocks of a diagonal prior, made on first use

    @property
    def C_dense(self):
        """The prior covariance as a dense (d, d) matrix in float64 (for a diagonal prior, built once when
        first needed: 1.2 GB at 64x64x3, so never eagerly)."""
        if self.c is not None and (self.C_matrix is None or self.C_matrix.device != self.c.device):
            self.C_matrix = Covariance(self.c.double(), self.basis).dense()[0]
        return self.C_matrix.double()

    def block(self, channel):
        """The (HW, HW) prior covariance of one channel of a diagonal prior, float64, cached."""
        key = (channel, self.c.device)
        if key not in self._blocks:
            self._blocks[key] = Covariance(self.c[:, channel : channel + 1].double(), self.basis).dense()[0]
        return self._blocks[key]

    def diagonal_with(self, cov):
        return self.basis is not None and cov.basis == self.basis

    def check(self, z, cov):
        d = self.c[0].numel() if self.c is not None else self.C_matrix.shape[0]
        if z.shape != cov.s.shape or z[0].numel() != d:
            raise ValueError(f"images {tuple(z.shape)} and covariance {cov.shape} must match the prior's dimension {d}")

    def energy_z(self, z, cov):
        """M9 from the basis coordinates z = U y of cov's basis, (B,) in float64."""
        self.check(z, cov)
        if self.basis is not None and not self.diagonal_with(cov) and isotropic(cov):
            # s I is the same matrix in every basis: take z to the prior's own basis (differentiably)
            z, cov = to_basis(cov.Uh(z), self.basis), Covariance.from_log_s(cov.log_s, self.basis)
        if self.diagonal_with(cov):
            mu = cov.U(self.mean.to(real_dtype(z)).expand(z.shape))
            v = self.c.to(real_dtype(z)) + cov.s  # eigenvalues of C + Sigma, (B, C, H, W)
            return sum_coords(0.5 * (z - mu).abs().square() / v) + sum_coords(0.5 * (LOG_2PI + v.double().log()))
        y = cov.Uh(z.to(torch.complex128 if z.is_complex() else torch.float64))  # dense path: float64 throughout
        return self.dense_energy(y - self.mean.double(), Covariance(cov.s.double(), cov.basis, check=False))

    def dense_energy(self, r, cov):
        """M9 by Cholesky for residuals r = y - mu (float64); one block per channel for a diagonal prior."""
        if self.c is not None:  # channels independent: sum of per-channel energies
            return sum(self.dense_energy_block(r[:, ch].flatten(1), self.block(ch), cov[:, ch : ch + 1])
                       for ch in range(r.shape[1]))
        return self.dense_energy_block(r.flatten(1), self.C_dense, cov)

    @staticmethod
    def dense_energy_block(r, C, cov):
        K = C + cov.dense()  # (B, n, n)
        L = torch.linalg.cholesky(K)
        u = torch.linalg.solve_triangular(L, r.unsqueeze(-1), upper=False).squeeze(-1)
        logdet = 2 * L.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        return 0.5 * u.square().sum(1) + 0.5 * logdet + 0.5 * u.shape[1] * LOG_2PI

    def forward(self, y, cov):
        return self.energy_z(cov.U(y), cov)

    def posterior_mean(self, y, cov):
        """mu + C (C + Sigma)^{-1} (y - mu) (M9), the Wiener filter, in y's dtype."""
        self.check(y, cov)
        if self.basis is not None and (cov.basis == self.basis or isotropic(cov)):
            c, U, Uh = self.c.to(y.dtype), (lambda x: to_basis(x, self.basis)), (lambda x: from_basis(x, self.basis))
            s = cov.s if cov.basis == self.basis else cov.s.flatten(1)[:, 0].view(-1, 1, 1, 1)
            mu = self.mean.to(y.dtype)
            return mu + Uh(c / (c + s) * U(y - mu))
        if self.c is not None:
            return self.wiener_cg(y, cov).to(y.dtype)
        r = (y - self.mean).double().flatten(1).unsqueeze(-1)
        C = self.C_dense
        sol = torch.linalg.solve(C + cov.dense().double(), r)
        return (self.mean.double() + (C @ sol).reshape(y.shape)).to(y.dtype)

    def wiener_cg(self, y, cov, tol=1e-10, max_iter=5000):
        """The Wiener filter when C and Sigma are diagonal in different bases: solve the posterior-precision
        system (C^-1 + Sigma^-1) x = C^-1 mu + Sigma^-1 y by preconditioned conjugate gradients in
        float64. Preconditioner: diagonal in Sigma's basis, 1 / (1/s + mean(1/c)) (the mean of 1/c is the
        exact pixel diagonal of a stationary C^-1). Coordinates with s = s_huge carry Sigma^-1 ~ 1e-8."""
        f64 = torch.float64
        c, s, y = self.c.to(f64), cov.s.to(f64), y.to(f64)
        mu = self.mean.to(f64).expand_as(y)
        prior_prec = lambda x: from_basis(to_basis(x, self.basis) / c, self.basis)  # C^-1 x
        noise_prec = lambda x: cov.Uh(cov.U(x) / s)  # Sigma^-1 x
        A = lambda x: prior_prec(x) + noise_prec(x)
        kappa = (1 / c).mean(dim=(-2, -1), keepdim=True)  # (1, C, 1, 1)
        M_inv = lambda x: cov.Uh(cov.U(x) / (1 / s + kappa))
        dot = lambda a, b: (a * b).flatten(1).sum(1).view(-1, 1, 1, 1)
        b = prior_prec(mu) + noise_prec(y)
        x = M_inv(b)
        r = b - A(x)
        p = M_inv(r)
        rz = dot(r, p)
        b_norm = dot(b, b).sqrt()
        for _ in range(max_iter):
            if (dot(r, r).sqrt() <= tol * b_norm).all():
                return x
            Ap = A(p)
            alpha = rz / dot(p, Ap)
            x, r = x + alpha * p, r - alpha * Ap
            z = M_inv(r)
            rz_new = dot(r, z)
            p, rz = z + rz_new / rz * p, rz_new
        raise RuntimeError(f"Wiener filter: conjugate gradients did not converge in {max_iter} iterations "
                           f"(relative residual {(dot(r, r).sqrt() / b_norm).max().item():.1e})")

    def posterior_cov(self, cov):
        """C - C (C + Sigma)^{-1} C as dense (B, d, d) float64 matrices (M9)."""
        C = self.C_dense
        K = C + cov.dense().double()
        return C - C @ torch.linalg.solve(K, C.expand_as(K))

    def sample(self, n, generator=None):
        """n draws from the prior N(mu, C), (n, C, H, W) (diagonal priors only)."""
        if self.basis is None:
            raise ValueError("sampling is implemented for diagonal priors (a Covariance), not dense matrices")
        noise, _ = Covariance(self.c.expand(n, *self.image_shape), self.basis).sample(generator)
        return self.mean + noise


def isotropic(cov):
    """Is every image's Sigma = s I (the same matrix in every basis)?"""
    s = cov.s.detach()
    return bool((s == s.flatten(1)[:, :1, None, None]).all())


def fit_gaussian(x, basis, min_images=16):
    """The classical baseline: a Gaussian prior fitted to training images x (N, C, H, W) — per-channel
    mean, and per-coefficient variances in `basis` (in fft: the power spectrum of a stationary field;
    in dct: the same for half-sample-symmetric images). Its posterior mean is the Wiener filter."""
    if x.shape[0] < min_images:
        raise ValueError(f"a fitted Gaussian prior needs at least {min_images} training images to estimate "
                         f"{x[0].numel()} variances, got {x.shape[0]}")
    x = x.double()
    mean = x.mean(dim=(0, 2, 3), keepdim=True)[0].expand(x.shape[1:]).clone()  # (C, H, W), constant per channel
    c = to_basis(x - mean, basis).abs().square().mean(0, keepdim=True)  # (1, C, H, W)
    if basis == "fft":
        c = 0.5 * (c + reflect_freq(c))  # exactly symmetric, so that C is real
    return GaussianEnergy(mean, Covariance(c.clamp_min(1e-12), basis))


def spatial_frequency(H, W, basis, device="cpu"):
    """|f_k| in cycles per pixel of every coefficient of an (H, W) spectral basis, (H, W) float64: k / 2N per
    axis in dct, the distance to the nearest alias min(k, N - k) / N in fft. Measured in cycles per pixel,
    a stationary image's power spectrum is the same function of f at every image size."""
    kh = torch.arange(H, dtype=torch.float64, device=device)
    kw = torch.arange(W, dtype=torch.float64, device=device)
    if basis == "dct":
        fh, fw = kh / (2 * H), kw / (2 * W)
    elif basis == "fft":
        fh, fw = torch.minimum(kh, H - kh) / H, torch.minimum(kw, W - kw) / W
    else:
        raise ValueError(f"spatial frequencies need a spectral basis (fft or dct), got {basis!r}")
    return torch.sqrt(fh[:, None] ** 2 + fw[None, :] ** 2)


def power_law_spectrum(spectrum, H, W, basis, device="cpu"):
    """c_k = A (|f_k|^2 + f0^2)^(-alpha/2) per channel, (1, C, H, W) float64: the power-law spectrum of
    fit_spectrum evaluated on an (H, W) image of `basis`, at any size."""
    f2 = spatial_frequency(H, W, basis, device) ** 2
    c = [A * (f2 + f0 ** 2) ** (-alpha / 2) for A, alpha, f0 in zip(spectrum["A"], spectrum["alpha"], spectrum["f0"])]
    return torch.stack(c)[None]


def fit_spectrum(x, basis, mean):
    """The power law c(f) = A (f^2 + f0^2)^(-alpha/2) (f in cycles per pixel) that maximises the Gaussian
    likelihood of training images x (N, C, H, W) about `mean`, per channel: the spectral anchor of M3
    (EnergyModel.anchor_var). For each (alpha, f0) on a grid, A has a closed form (the mean of the coefficient
    powers over the shape); three numbers per channel, so the anchor is defined at every image size.
    Returns {"A": [...], "alpha": [...], "f0": [...]} (plain floats: a checkpoint's config holds it)."""
    if x.shape[0] < 16:
        raise ValueError(f"fitting the anchor's spectrum needs at least 16 training images, got {x.shape[0]}")
    H, W = x.shape[-2:]
    p = to_basis(x.double() - mean, basis).abs().square().mean(0)  # (C, H, W): mean power per coefficient
    log_g = torch.log(spatial_frequency(H, W, basis) ** 2)  # log f^2 (-inf at DC: f0 > 0 below keeps it finite)
    alphas = torch.linspace(0, 4, 201, dtype=torch.float64)
    f0s = torch.logspace(math.log10(0.25 / max(H, W)), math.log10(0.5), 120, dtype=torch.float64)
    out = {"A": [], "alpha": [], "f0": []}
    for ch in range(x.shape[1]):
        best = None
        for f0 in f0s:
            shape = -0.5 * alphas[:, None] * torch.logaddexp(log_g.flatten(), torch.log(f0 ** 2))[None]  # log c / A
            A = (p[ch].flatten()[None] * (-shape).exp()).mean(1)  # (n_alpha,): the likelihood's optimum in A
            nll = (A.log()[:, None] + shape).mean(1)  # mean of log c_k (+1 from p/c at the optimum, a constant)
            i = int(nll.argmin())
            if best is None or nll[i] < best[0]:
                best = (nll[i].item(), A[i].item(), alphas[i].item(), f0.item())
        for key, value in zip(("A", "alpha", "f0"), best[1:]):
            out[key].append(value)
    return out


def fit_power_law(z, s, mean, alphas=None, n_amplitudes=81):
    """The classical prior a restorer can fit to the observation itself: a stationary Gaussian whose DCT
    variances follow a power law in spatial frequency, c_k = A (|f_k|^2 + f0^2)^(-alpha/2) per channel, the
    1/f^alpha law of natural images, with f in cycles per pixel (so it means the same at any image size)
    and f0 the lowest frequency of the image. z: U y~ of an observation in the DCT basis, s its variances
    (M2), mean: per-channel means (C,). A and alpha maximise the likelihood of the informative coordinates
    (s < s_huge), N(z_k; mu_k, c_k + s_k), on a grid; three numbers per channel fitted to thousands of
    coordinates, so the fit's own advantage is negligible. Returns a GaussianEnergy in the DCT basis."""
    B, C, H, W = z.shape
    dev = z.device  # the whole fit on the observation's device (a restorer on a GPU)
    f = spatial_frequency(H, W, "dct", dev)
    f0 = 1 / (2 * max(H, W))
    log_f = 0.5 * (f ** 2 + f0 ** 2).log()  # (H, W)
    mean = torch.as_tensor(mean, dtype=torch.float64, device=dev)
    mu = to_basis(mean.view(1, C, 1, 1).expand(1, C, H, W), "dct")[0]
    r2 = (z.double()[0] - mu) ** 2  # (C, H, W)
    s = s.double()[0]
    keep = s < S_HUGE * 0.999
    alphas = torch.linspace(0, 4, 41, dtype=torch.float64) if alphas is None else alphas
    alphas = alphas.to(dev)
    c = torch.empty(C, H, W, dtype=torch.float64, device=dev)
    for ch in range(C):
        k = keep[ch]
        shape = -log_f[k][None, :] * alphas[:, None]  # (n_alpha, n): log c_k - log A
        # log A on a grid around the value that matches the excess power of the best-measured half of the
        # coordinates (elsewhere s, up to 1e8 for a blur's nearly-lost frequencies, hides the signal)
        sharp = s[ch][k] <= s[ch][k].median()
        excess = (r2[ch][k][sharp] - s[ch][k][sharp]).mean().clamp_min(1e-8)
        center = excess.log() - shape[:, sharp].exp().mean(1).log()  # (n_alpha,)
        log_A = center[:, None] + torch.linspace(-8, 8, n_amplitudes, dtype=torch.float64, device=dev)[None, :]
        nll = torch.empty(len(alphas), n_amplitudes, dtype=torch.float64, device=dev)
        for i in range(len(alphas)):  # one exponent at a time: (n_A, n) values, not (n_alpha, n_A, n)
            v = (log_A[i, :, None] + shape[i]).exp() + s[ch][k]
            nll[i] = 0.5 * (r2[ch][k] / v + v.log()).sum(-1)
        i, j = divmod(int(nll.argmin()), n_amplitudes)
        c[ch] = (log_A[i, j] - alphas[i] * log_f).exp()
    mean_image = mean.view(C, 1, 1).expand(C, H, W).clone()
    return GaussianEnergy(mean_image, Covariance(c[None], "dct"))


def evidence(energy, y_obs, prob, observed_only=False):
    """-log p(y_obs) per dimension under the energy and under the classical prior fitted to the observation
    itself (fit_power_law: a Gaussian with a 1/f^alpha spectrum), both through degradation_nll and so on
    one scale; and that Gaussian. prob must be diagonal in the DCT basis or isotropic (not a mask)."""
    d, mean = y_obs[0].numel(), y_obs.double().mean(dim=(0, 2, 3))  # per-channel means of the image
    dct = prob if prob.basis == "dct" else Degradation(prob.a, "dct", prob.sigma_n, prob.s_huge)  # denoising: A = I
    z, cov = dct.to_denoising_z(y_obs.double(), mean.view(1, -1, 1, 1).expand_as(y_obs))
    gaussian = fit_power_law(z, cov.s, mean)
    model = degradation_nll(energy, y_obs, prob, energy_mean(energy), observed_only).item() / d
    return model, degradation_nll(gaussian, y_obs, dct, gaussian.mean, observed_only).item() / d, gaussian
