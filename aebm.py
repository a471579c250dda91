"""
The normalized energy, dual score matching, and log-probabilities (METHOD.md §3, §4, §7 M10).

The energy protocol. Anything with the call signature

    energy(y, cov) -> (B,) tensor,   y: (B, C, H, W) noisy images,  cov: covariances.Covariance

is an energy model E(y, Sigma) ~ -log p_Sigma(y). Two implementations follow the same protocol,
so every function here and in sample.py takes either:

    EnergyModel(net)       the learned energy of M3 around a network from nets.py
    GaussianEnergy(mu, C)  the exact energy -log N(y; mu, C + Sigma) of a Gaussian prior (M9)

From an energy, `energy_and_scores` returns E, dE/dy and dE/dlog s in ONE autograd call; the
A-DSM (M5) and A-CSM (M7) losses and the posterior mean (M4) are written on top of it.
Naming: `score_y` = dE/dy and `score_log_s` = dE/dlog s are gradients of the *energy*, i.e. minus
the usual scores of log p.

Read covariances.py first; nets.py holds the network F_theta, train.py minimises `dual_score_loss`,
sample.py uses `energy_and_scores` in every sampler.
"""

import math

import torch
import torch.nn as nn

from covariances import S_MIN, Covariance, reflect_freq

LOG_2PI = math.log(2 * math.pi)


# -----------------------------------------------------------------------------
# The learned energy (M3).

class EnergyModel(nn.Module):
    """E_theta(y, Sigma) = 1/2 |y~|^2 + 1/2 sum log(2 pi v) + 1/2 < y~, w * U F_theta(U^H(sqrt(w) y~), Sigma) >   (M3)

    with v = sigma_d^2 + s, y~ = v^{-1/2} * U(y - mu) (whitened) and w = sigma_d^2 / v in (0, 1].
    The first two terms are the exact energy of the Gaussian prior N(mu, sigma_d^2 I); the learned
    term vanishes like 1/s, so E_theta -> the Gaussian limit as s -> infinity for any theta
    (METHOD.md §3), which anchors the normalization.

    The network sees sqrt(w) y~ = sigma_d (y - mu) / v (the Wiener-shrunk input, scale <= 1, unit at
    low noise) rather than y~ itself (METHOD.md's form). Reason: Tweedie (M4) multiplies dE/dy_k by
    s_k. With input y~, the network's sensitivity to a coordinate carrying no information
    (s_k = 1e8: a missing pixel, a dropped frequency) is ~ v_k^{-1/2}, so the posterior mean picks up
    errors ~ sqrt(s_k) ~ 1e4 times any residual sensitivity; with sqrt(w) y~ it is ~ 1/v_k, the
    true energy's own scaling, and the error stays O(1). tests/test_energy.py shows both for a
    random network; README, Deviations.
    """

    def __init__(self, net, mean=0.5, data_var=0.1):
        super().__init__()
        self.net, self.mean, self.data_var = net, float(mean), float(data_var)

    def forward(self, y, cov):
        # The whitening and the reductions run outside autocast, in float32 or float64: MALA and blind
        # estimation compare energies that differ by a few nats out of 1e4 (METHOD.md §3, Precision).
        with torch.autocast(y.device.type, enabled=False):
            v = self.data_var + cov.s  # (B, C, H, W)
            y_t = cov.U(y - self.mean) * v.rsqrt()  # whitened basis coordinates y~
            w = self.data_var / v
            x_in = cov.Uh(w.sqrt() * y_t)  # Wiener-shrunk network input, sigma_d (y - mu) / v in the basis
        F = self.net(x_in, cov)  # (B, C, H, W); may be bf16 under autocast
        with torch.autocast(y.device.type, enabled=False):
            F = F.to(v.dtype)
            gauss = 0.5 * y_t.abs().square() + 0.5 * (LOG_2PI + v.log())
            learned = 0.5 * (y_t.conj() * w * cov.U(F)).real  # real part: fft coordinates are complex
            return (gauss + learned).flatten(1).sum(1)


def gaussian_limit_energy(y, cov, mean, data_var):
    """-log N(y; mu, sigma_d^2 I + Sigma): the limit of M3 as s -> infinity (paper eq. 11)."""
    v = data_var + cov.s
    return (0.5 * cov.U(y - mean).abs().square() / v + 0.5 * (LOG_2PI + v.log())).flatten(1).sum(1)


# -----------------------------------------------------------------------------
# E, dE/dy and dE/dlog s from one autograd call.

def energy_and_scores(energy, y, cov, create_graph=False, need_log_s=True):
    """Returns E (B,), score_y = dE/dy (B, C, H, W) and score_log_s = dE/dlog s (B, C, H, W, in the
    covariance's basis), from ONE call of torch.autograd.grad. With create_graph=True the scores
    stay differentiable in the parameters (training differentiates them again). need_log_s=False
    skips the covariance score (single score matching, and samplers that need only dE/dy).
    """
    with torch.enable_grad():
        y = y.detach().requires_grad_(True)
        log_s = cov.log_s.detach().requires_grad_(need_log_s)
        E = energy(y, Covariance.from_log_s(log_s, cov.basis))
        inputs = (y, log_s) if need_log_s else (y,)
        grads = torch.autograd.grad(E.sum(), inputs, create_graph=create_graph)
    score_y = grads[0]
    score_log_s = grads[1] if need_log_s else None
    if need_log_s and cov.basis == "fft":
        # Sigma is real only for s[k] = s[-k]: the meaningful derivative is along that constraint,
        # shared equally by the pair (a no-op for energies that are themselves symmetric, M6).
        score_log_s = 0.5 * (score_log_s + reflect_freq(score_log_s))
    if not create_graph:
        E = E.detach()
    return E, score_y, score_log_s


def posterior_mean(energy, y, cov):
    """Anisotropic Tweedie: x^ = y - Sigma dE/dy  (M4)."""
    _, score_y, _ = energy_and_scores(energy, y, cov, need_log_s=False)
    return y - cov.apply(score_y)


# -----------------------------------------------------------------------------
# Dual score matching (METHOD.md §4).

def dual_score_losses(energy, x, cov, generator=None, need_csm=True, zeta=None):
    """Per-image A-DSM and A-CSM losses for clean images x (B, C, H, W) under covariances cov.
    y = x + U^H(sqrt(s) zeta), zeta drawn here unless given (basis coordinates of white noise, as
    cov.sample returns them); returns (L_dsm, L_csm), each (B,) (L_csm is None if not need_csm)."""
    if zeta is None:
        n, zeta = cov.sample(generator)
    else:
        n = cov.Uh(cov.s.sqrt() * zeta)
    y = x + n
    _, score_y, score_log_s = energy_and_scores(energy, y, cov, create_graph=True, need_log_s=need_csm)
    d = x[0].numel()
    # (M5) A-DSM: (1/d) |sqrt(s) * U dE/dy - zeta|^2 = (1/d) |Sigma^{-1/2}(x^ - x)|^2
    L_dsm = (cov.s.sqrt() * cov.U(score_y) - zeta).abs().square().flatten(1).sum(1) / d
    if not need_csm:
        return L_dsm, None
    # (M6, M7) A-CSM: dE/dlog s_k should regress the target 1/2 (1 - |zeta_k|^2)
    target = 0.5 * (1 - zeta.abs().square())
    L_csm = (score_log_s - target).square().flatten(1).sum(1) / d
    return L_dsm, L_csm


def dual_score_loss(energy, x, cov_groups, lam=1.0, generator=None, zetas=None):
    """L = L_DSM + lam L_CSM averaged over the batch (M8); lam = 0 is single (DSM-only) score matching.
    cov_groups: a Covariance for the whole batch, or the list of (slice, Covariance) groups that
    covariances.sample_training_covariances returns; zetas: optional noise per group (tests use it
    to feed identical noise to different runs). Returns (L, L_dsm mean, L_csm mean), the two parts
    detached for logging (L_csm is NaN when lam = 0: single score matching never computes it)."""
    if isinstance(cov_groups, Covariance):
        cov_groups = [(slice(0, x.shape[0]), cov_groups)]
    dsm, csm = [], []
    for i, (idx, cov) in enumerate(cov_groups):
        zeta = zetas[i] if zetas is not None else None
        L_dsm, L_csm = dual_score_losses(energy, x[idx], cov, generator, need_csm=lam != 0, zeta=zeta)
        dsm.append(L_dsm)
        csm.append(L_csm if L_csm is not None else torch.full_like(L_dsm, float("nan")))
    L_dsm, L_csm = torch.cat(dsm).mean(), torch.cat(csm).mean()
    L = L_dsm + lam * L_csm if lam != 0 else L_dsm
    return L, L_dsm.detach(), L_csm.detach()


# -----------------------------------------------------------------------------
# Probabilities (M10).

def log_prob(energy, x, s=S_MIN, basis="pixel"):
    """log p(x) ~ -E(x, s I) at a tiny isotropic variance (M10). s I is the same matrix in every
    basis; `basis` only picks the cheapest path (fft for a stationary GaussianEnergy)."""
    cov = Covariance(torch.full_like(x, s), basis)
    with torch.no_grad():
        return -energy(x, cov)


def bits_per_dim(neg_log_p, d):
    """bits/dim of 8-bit data represented in [0, 1]: E / (d ln 2) + 8 (M10)."""
    return neg_log_p / (d * math.log(2)) + 8


# -----------------------------------------------------------------------------
# The exact energy of a Gaussian prior (M9): the independent reference for everything above.

class GaussianEnergy(nn.Module):
    """E(y, Sigma) = 1/2 (y-mu)^T (C+Sigma)^{-1} (y-mu) + 1/2 log det 2 pi (C+Sigma)   (M9)

    mean: a number or a (C, H, W) tensor. C: either a dense (d, d) covariance matrix (exact by
    Cholesky, for images up to about 32x32x1), or a `Covariance` with batch 1, i.e. a prior
    diagonal in some basis (a stationary field is diagonal in fft). When Sigma is diagonal in that
    same basis the energy is a sum over coordinates, exact at any size; otherwise C is made dense.
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

    @property
    def C_dense(self):
        """The prior covariance as a dense (d, d) matrix (for a diagonal prior, built once when a
        covariance in another basis first needs it: 1.2 GB at 64x64x3, so never eagerly)."""
        if self.c is not None and (self.C_matrix is None or self.C_matrix.device != self.c.device):
            self.C_matrix = Covariance(self.c, self.basis).dense()[0]
        return self.C_matrix

    def diagonal_with(self, cov):
        return self.basis is not None and cov.basis == self.basis

    def check(self, y, cov):
        d = self.c[0].numel() if self.c is not None else self.C_matrix.shape[0]
        if y.shape != cov.s.shape or y[0].numel() != d:
            raise ValueError(f"images {tuple(y.shape)} and covariance {cov.shape} must match the prior's dimension {d}")

    def forward(self, y, cov):
        self.check(y, cov)
        r = y - self.mean.to(y.dtype)
        if self.diagonal_with(cov):
            v = self.c.to(y.dtype) + cov.s  # eigenvalues of C + Sigma, (B, C, H, W)
            return (0.5 * cov.U(r).abs().square() / v + 0.5 * (LOG_2PI + v.log())).flatten(1).sum(1)
        K = self.C_dense.to(y.dtype) + cov.dense()  # (B, d, d)
        L = torch.linalg.cholesky(K)
        z = torch.linalg.solve_triangular(L, r.flatten(1).unsqueeze(-1), upper=False).squeeze(-1)
        logdet = 2 * L.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        return 0.5 * z.square().sum(1) + 0.5 * logdet + 0.5 * z.shape[1] * LOG_2PI

    def posterior_mean(self, y, cov):
        """mu + C (C + Sigma)^{-1} (y - mu) (M9), the Wiener filter."""
        self.check(y, cov)
        r = y - self.mean.to(y.dtype)
        if self.diagonal_with(cov):
            c = self.c.to(y.dtype)
            return self.mean.to(y.dtype) + cov.Uh(c / (c + cov.s) * cov.U(r))
        C = self.C_dense.to(y.dtype)
        K = C + cov.dense()
        sol = torch.linalg.solve(K, r.flatten(1).unsqueeze(-1))
        return self.mean.to(y.dtype) + (C @ sol).reshape(y.shape)

    def posterior_cov(self, cov):
        """C - C (C + Sigma)^{-1} C as dense (B, d, d) matrices (M9)."""
        C = self.C_dense.to(cov.s.dtype)
        K = C + cov.dense()
        return C - C @ torch.linalg.solve(K, C.expand_as(K))

    def sample(self, n, generator=None):
        """n draws from the prior N(mu, C), (n, C, H, W) (diagonal priors only)."""
        if self.basis is None:
            raise ValueError("sampling is implemented for diagonal priors (a Covariance), not dense matrices")
        noise, _ = Covariance(self.c.expand(n, *self.image_shape), self.basis).sample(generator)
        return self.mean + noise
