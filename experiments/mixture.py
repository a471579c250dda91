"""
The paper's synthetic normalization experiment (Appendix D.5, docs/results.md §3): a mixture of two
Gaussians in d dimensions, each sample noisy with a random two-group diagonal covariance, whose
noisy density is known in closed form. A small energy model is trained with dual score matching
and with DSM only (same seeds, same steps); only the dual one comes out normalized.

    python -m experiments.mixture                 # d = 16 and d = 2: figures, and docs/mixture_offsets.png

Data: x ~ 1/2 N(+m 1, 1 I) + 1/2 N(-m 1, 0.25 I), m = 1. Covariances: the d coordinates are split
at random into two equal groups with variances s_1, s_2 (log-uniform in [1e-3, 1e2]); they are
ordinary pixel-basis `Covariance`s of shape (B, 1, 1, d), so aebm.dual_score_loss trains the model.
True energy: -log sum_i 1/2 N(y; m_i, C_i + Sigma) (paper eq. 48).
Model: E = -logsumexp_i(-a_i(s) Q_i1 - b_i(s) Q_i2 - c_i(s)), Q_ig = 1/2 |y_g - m_i|^2 over group g,
(a, b, c) from a 5-layer MLP (width 256) of (log s_1, log s_2), written like M3: a Gaussian part
exact as s -> infinity plus learned corrections that vanish there (see MixtureEnergy.forward).
DSM sees only gradients in y, so a common shift c_i(s) + k(s) is invisible to it; the A-CSM term
pins k(s) (docs/method.md §4), and the large-s anchor fixes the last constant.
"""

import argparse
import math
import os

import torch
import torch.nn as nn

import aebm
import covariances as cv
import data

MEANS, VARS = (1.0, -1.0), (1.0, 0.25)  # component means m_i (times the all-ones vector) and variances
S_RANGE = (1e-3, 1e2)


def sample_data(n, d, generator=None):
    comp = torch.rand(n, generator=generator) < 0.5
    m = torch.where(comp, MEANS[0], MEANS[1]).view(n, 1)
    std = torch.where(comp, math.sqrt(VARS[0]), math.sqrt(VARS[1])).view(n, 1)
    return (m + std * torch.randn(n, d, generator=generator)).view(n, 1, 1, d)


def group_covariance(s1, s2, in_a):
    """Variance s1 on the coordinates in group A (in_a: (n, d) bool), s2 on the others."""
    s = torch.where(in_a, s1.view(-1, 1), s2.view(-1, 1))
    return cv.Covariance(s.view(s.shape[0], 1, 1, -1), "pixel")


def sample_covariances(n, d, generator=None):
    """A random equal split of the coordinates per sample, s1 and s2 log-uniform in S_RANGE."""
    order = torch.argsort(torch.rand(n, d, generator=generator), dim=1)
    in_a = torch.zeros(n, d, dtype=torch.bool).scatter_(1, order[:, : d // 2], True)
    s1, s2 = cv.log_uniform(n, *S_RANGE, generator).float(), cv.log_uniform(n, *S_RANGE, generator).float()
    return group_covariance(s1, s2, in_a)


def true_energy(y, cov):
    """-log p_Sigma(y) = -log sum_i 1/2 N(y; m_i 1, diag(v_i + s)), exactly."""
    terms = []
    for m, v in zip(MEANS, VARS):
        var = v + cov.s
        terms.append(math.log(0.5) - 0.5 * ((y - m) ** 2 / var + torch.log(2 * math.pi * var)).flatten(1).sum(1))
    return -torch.logsumexp(torch.stack(terms), 0)


class MixtureEnergy(nn.Module):
    """E = -logsumexp_i(-a_i Q_i1 - b_i Q_i2 - c_i), (a, b, c) = MLP(log s_1, log s_2) (docs/results.md §3)."""

    def __init__(self, width=256, depth=5):
        super().__init__()
        layers, n_in = [], 2
        for _ in range(depth - 1):
            layers += [nn.Linear(n_in, width), nn.SiLU()]
            n_in = width
        layers.append(nn.Linear(n_in, 6))
        self.mlp = nn.Sequential(*layers)

    def forward(self, y, cov):
        log_s = cov.log_s.flatten(1)  # (B, d)
        # Group A = the coordinates sharing coordinate 0's variance (the two groups' variances differ
        # almost surely; if they are equal, every coordinate is in A and the split does not matter).
        in_a = log_s.detach() == log_s.detach()[:, :1]
        n_a, n_b = in_a.sum(1), (~in_a).sum(1)
        log_s1 = (log_s * in_a).sum(1) / n_a
        log_s2 = torch.where(n_b > 0, (log_s * ~in_a).sum(1) / n_b.clamp_min(1), log_s1)
        out = self.mlp(torch.stack([log_s1, log_s2], 1) / 5)  # (B, 6); log s in about [-7, 5]
        # The same construction as M3, for this model: a Gaussian part N(m_i, (s + 1/2) I) that is exact
        # as s -> infinity (the anchor of the normalization constant), times learned corrections that
        # vanish there. Precisions a = exp(alpha) / (s_1 + 1/2): the MLP only learns an O(1) factor
        # (unpreconditioned, the first steps at s = 100 see a DSM residual ~100x too large and drive
        # a, b to 0 for good). The constants c_i = -log 1/2 + 1/2 sum_j log 2 pi (s_j + 1/2) + 10 w gamma_i,
        # w = 1/2 / (s + 1/2) -> 0: gamma is exactly the part DSM cannot see (docs/method.md §4).
        s = cov.s.flatten(1)
        s1, s2 = log_s1.exp().unsqueeze(1), log_s2.exp().unsqueeze(1)
        a, b = out[:, 0:2].exp() / (s1 + 0.5), out[:, 2:4].exp() / (s2 + 0.5)
        gauss = -math.log(0.5) + 0.5 * torch.log(2 * math.pi * (s + 0.5)).sum(1, keepdim=True)  # (B, 1)
        w = (0.5 / (s + 0.5)).mean(1, keepdim=True)
        c = gauss + 10 * w * out[:, 4:6]
        yf = y.flatten(1)
        terms = []
        for i, m in enumerate(MEANS):
            r2 = 0.5 * (yf - m) ** 2
            terms.append(-a[:, i] * (r2 * in_a).sum(1) - b[:, i] * (r2 * ~in_a).sum(1) - c[:, i])
        return -torch.logsumexp(torch.stack(terms), 0)


def train_mixture(d, lam, steps=1500, batch=256, lr=3e-3, seed=0, log_every=0):
    """Train a MixtureEnergy with L_DSM + lam L_CSM; same seed -> same init, data and noise for any lam."""
    torch.manual_seed(seed)
    model = MixtureEnergy()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        for group in opt.param_groups:  # cosine decay: a clean end point for the comparison
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        x, cov = sample_data(batch, d, g), sample_covariances(batch, d, g)
        L, L_dsm, L_csm = aebm.dual_score_loss(model, x, cov, lam=lam, generator=g)
        opt.zero_grad()
        L.backward()
        opt.step()
        if log_every and (step + 1) % log_every == 0:
            print(f"  d={d} lam={lam} step {step + 1}: dsm {L_dsm:.4f} csm {L_csm:.4f}")
    return model


@torch.no_grad()
def offsets(model, d, levels, n=512, seed=1):
    """Mean of E_model - E_true over noisy samples, for s_1 = s and s_2 = s / 10 along `levels`.
    A normalized model has the same (zero) offset at every Sigma."""
    g = torch.Generator().manual_seed(seed)
    out = []
    in_a = torch.zeros(n, d, dtype=torch.bool)
    in_a[:, : d // 2] = True
    for s in levels:
        cov = group_covariance(torch.full((n,), s), torch.full((n,), s / 10), in_a)
        y = sample_data(n, d, g) + cov.sample(g)[0]
        out.append((model(y, cov) - true_energy(y, cov)).mean().item())
    return out


@torch.no_grad()
def integral_2d(model, s1, s2, n=500):
    """int exp(-E(y, Sigma)) dy over a grid in d = 2 (coordinate 0 in group A, 1 in group B)."""
    half = 6 * math.sqrt(1 + max(s1, s2)) + 2
    t = torch.linspace(-half, half, n)
    h = (t[1] - t[0]).item()
    Y = torch.stack(torch.meshgrid(t, t, indexing="ij"), -1).view(-1, 1, 1, 2)
    in_a = torch.tensor([[True, False]]).expand(Y.shape[0], 2)
    cov = group_covariance(torch.full((Y.shape[0],), s1), torch.full((Y.shape[0],), s2), in_a)
    E = torch.cat([model(Y[i : i + 50_000], cov[i : i + 50_000]) for i in range(0, Y.shape[0], 50_000)])
    return (torch.exp(-E.double()).sum() * h * h).item()


LEVELS = [1e-2, 1e-1, 1.0, 10.0, 100.0]  # s_1; s_2 = s_1 / 10 stays inside the training range
SIGMAS_2D = [(0.01, 0.1), (0.1, 1.0), (1.0, 10.0), (10.0, 0.01), (50.0, 50.0)]


def run(steps=1500, out="docs", seed=0, verbose=True):
    """Both experiments for dual and DSM-only; returns the figures and writes the plot."""
    results = {}
    for name, lam in (("dual", 1.0), ("dsm", 0.0)):
        model16 = train_mixture(16, lam, steps, seed=seed)
        off = offsets(model16, 16, LEVELS)
        model2 = train_mixture(2, lam, steps, seed=seed)
        integrals = [integral_2d(model2, s1, s2) for s1, s2 in SIGMAS_2D]
        results[name] = dict(offsets=off, spread=max(off) - min(off), integrals=integrals)
        if verbose:
            print(f"{name:5s} d=16: E_model - E_true at s = {LEVELS}: " + " ".join(f"{o:+.3f}" for o in off)
                  + f"  (spread {max(off) - min(off):.3f} nats)")
            print(f"{name:5s} d=2:  integral of exp(-E) at Sigma = {SIGMAS_2D}: " + " ".join(f"{v:.3f}" for v in integrals))
    xs = [math.log10(s) for s in LEVELS]
    path = data.save_line_plot(os.path.join(out, "mixture_offsets.png"),
                               [("dual (DSM + CSM)", xs, results["dual"]["offsets"]),
                                ("DSM only", xs, results["dsm"]["offsets"])],
                               title="two-Gaussian mixture, d = 16: E_model - E_true",
                               xlabel="log10 s1   (s2 = s1 / 10)", ylabel="mean offset (nats)")
    results["plot"] = path
    if verbose:
        print(f"plot: {path}")
    return results


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Two-Gaussian mixture normalization experiment (paper App. D.5).")
    p.add_argument("--steps", type=int, default=1500, help="training steps per model")
    p.add_argument("--out", default="docs", help="where the plot goes")
    p.add_argument("--seed", type=int, default=0, help="seed (same for dual and DSM-only)")
    a = p.parse_args()
    run(a.steps, a.out, a.seed)
