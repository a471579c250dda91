"""
The control for experiments/learning.py: the same UNet as a plain anisotropic denoiser, not an energy.

When the learned energy restores worse than the Wiener filter (box inpainting, docs/results.md §1), is
it the energy that limits it (M3's form, the conservative field, the covariance-score loss) or the
network and the training budget? This script answers by training the same network, on the same
data, covariances and A-DSM loss, through train.py's own loop, as a direct estimator of the
posterior mean (EDM's preconditioning, written per coordinate of Sigma's basis):

    x^ = U^H( U mu + w * (z - U mu) + c_out * U F(U^H(sqrt(w) y~), Sigma) ),   c_out = sqrt(s w),

with z = U y, v = sigma_d^2 + s, w = sigma_d^2 / v and y~ = v^{-1/2}(z - U mu), as in M3: the same
network input, the same Gaussian part (at F = 0 both are the posterior mean of N(mu, sigma_d^2 I); with
--anchor spectral, as the hour preset has it, sigma_d^2 becomes the data's spectrum c_k for a spectral
Sigma, in both).
EDM's c_out = sigma sigma_d / sqrt(sigma^2 + sigma_d^2) becomes sqrt(s_k w_k) per coordinate, so
the network's output has unit scale at every noise level, a missing pixel included (c_out -> sigma_d).

train.py trains energies: it differentiates E by z and regresses Tweedie's x^ = z - s dE/dz onto x
(M5, here with the hour preset's EDM weighting). The denoiser goes through it unchanged as a
"linear energy" whose z-gradient is its own score, s^{-1}(z - x^):

    E(z) = 1/2 |z - U mu|^2 / v + Re< z, g >,   g = -sqrt(w / s) * U F   evaluated at z.detach(),

so dE/dz = (z - U mu)/v + g and z - s dE/dz is exactly x^ above. E is not an energy (the field
z -> x^ need not be a gradient), so the run is single score matching (--lam 0, forced) and nothing
here uses E's values: blind estimation, MALA and log-probabilities are meaningless for it, and a
checkpoint it writes is refused by sample.py.

    python -m experiments.denoiser --preset hour --out runs/denoiser     # train (train.py's flags)
    python -m experiments.denoiser --ckpt runs/denoiser/ckpt.pt          # measure (as experiments.learning)
    python -m experiments.denoiser --asymmetry den=runs/denoiser/ckpt.pt # how far its Jacobian is from symmetric
"""

import contextlib
import math
import sys

import torch
import torch.nn as nn

import aebm
import covariances as cv
import nets
import train
from experiments import learning


class Denoiser(nn.Module):
    """x^(y, Sigma) from a network F (nets.UNet), in the energy protocol's clothes (see the module docstring)."""

    def __init__(self, net, mean=0.5, data_var=0.1, spectrum=None):
        super().__init__()
        self.net, self.mean, self.data_var, self.spectrum = net, float(mean), float(data_var), spectrum

    mean_z = aebm.EnergyModel.mean_z  # U mu in the basis, exactly as the energy forms it
    anchor_var = aebm.EnergyModel.anchor_var  # sigma_d^2, or the data's spectrum with --anchor spectral

    def network_term(self, z, cov, detach=True):
        """U F(U^H(sqrt(w) y~), Sigma) in the basis, at the detached coordinates z (the same input as M3's;
        detach=False keeps F's dependence on z, for its Jacobian: jacobian_asymmetry)."""
        z = z.detach() if detach else z
        c = self.anchor_var(cov)
        x_in = cov.Uh(c / (c + cov.s) * (z - self.mean_z(z, cov))) / math.sqrt(self.data_var)
        return cov.U(self.net(x_in.to(next(self.net.parameters()).dtype), cov).to(aebm.real_dtype(z)))

    def energy_z(self, z, cov, part="all"):
        c = self.anchor_var(cov)
        v = c + cov.s
        g = -(c / (v * cov.s)).sqrt() * self.network_term(z, cov)  # sqrt(w / s) * U F
        learned = aebm.sum_coords((z.conj() * g).real)  # its z-gradient is g (F sees z detached)
        if part == "learned":
            return learned
        return aebm.sum_coords(0.5 * (z - self.mean_z(z, cov)).abs().square() / v) + learned

    def forward(self, y, cov):
        return self.energy_z(cov.U(y), cov)

    @torch.no_grad()
    def posterior_mean(self, y, cov):
        return self.estimate(y, cov)

    def estimate(self, y, cov):
        """x^ directly: U^H(mu + w (z - mu) + c_out U F), c_out = sqrt(s w); differentiable in y."""
        return cov.Uh(self.estimate_z(cov.U(y), cov))

    def estimate_z(self, z, cov):
        """U x^ from the basis coordinates z = U y (experiments/distill.py's target)."""
        mu = self.mean_z(z, cov)
        c = self.anchor_var(cov)
        w = c / (c + cov.s)
        return mu + w * (z - mu) + (cov.s * w).sqrt() * self.network_term(z, cov, detach=False)


def build_denoiser(config, device="cpu"):
    """nets.build_energy's counterpart: the same network, wrapped as a Denoiser; the checkpoint's config
    records it (nets.load_energy refuses such a checkpoint: it is not an energy)."""
    config["model"] = "denoiser"
    net = nets.build_unet(config["config"], config["img_size"], config["channels"], dropout=config.get("dropout"),
                          anchor="spectral" if config.get("anchor_spectrum") else "white")
    net = net.to(device=device, dtype=getattr(torch, config["dtype"]))
    return Denoiser(net, config["data_mean"], config["data_var"], config.get("anchor_spectrum"))


def load_denoiser(path, device="cpu"):
    """(Denoiser with the EMA weights, config) from a checkpoint this script wrote."""
    ckpt = nets.load_checkpoint(path, device)
    if ckpt["config"].get("model") != "denoiser":
        raise ValueError(f"{path} is an energy checkpoint; measure it with python -m experiments.learning --ckpt {path}")
    denoiser = build_denoiser(dict(ckpt["config"]), device)
    denoiser.net.load_state_dict(ckpt["ema"])
    return denoiser.eval(), ckpt["config"]


def evaluate(path, n=32, seed=0):
    """experiments.learning's restoration table, inpainting split and denoising along the noise axis for a
    denoiser checkpoint (no blind tasks: they need a normalized energy)."""
    denoiser, config = load_denoiser(path)
    x, wiener = learning.held_out_and_fitted(config, n, seed)
    return dict(psnr=train.restoration_psnr(denoiser, wiener, x, config["spectral_basis"], seed),
                inpaint_split=learning.inpainting_split(denoiser, wiener, x, seed=seed),
                by_noise=learning.denoising_by_noise(denoiser, wiener, x, config["spectral_basis"], seed=seed),
                blind_inpaint=float("nan"), blind_deblur=float("nan"), config=config, n=n)


# -----------------------------------------------------------------------------
# Is the free denoiser a gradient? An energy's posterior mean x^(y) = y - s grad E(y) has a symmetric
# Jacobian (s times E's Hessian, up to the identity), by construction; a free denoiser's need not. How far
# the one that restores better is from symmetric says whether the energy is asked to write a function that
# no gradient is.

def jacobian_asymmetry(f, y, probes=2, seed=0):
    """|A|_F^2 / |S|_F^2 for the Jacobian J = A + S of y -> f(y) at the observations y (its antisymmetric and
    symmetric parts), by Hutchinson's estimator with Gaussian probes v: E|(J - J^T) v|^2 = 4 |A|_F^2 and
    E|(J + J^T) v|^2 = 4 |S|_F^2, summed over images and probes; J v and J^T v from torch.autograd.functional's
    jvp and vjp (second derivatives of f: an energy's Tweedie would need third ones, and is symmetric anyway)."""
    g = torch.Generator().manual_seed(seed)
    num = den = 0.0
    for _ in range(probes):
        v = torch.randn(y.shape, generator=g, dtype=y.dtype)
        _, Jv = torch.autograd.functional.jvp(f, y.clone(), v)
        _, JTv = torch.autograd.functional.vjp(f, y.clone(), v)
        num += (Jv - JTv).square().sum().item()
        den += (Jv + JTv).square().sum().item()
    return num / den


def asymmetry_by_noise(paths, n=8, sigmas=learning.NOISE_LEVELS, seed=0):
    """{name: {sigma: |A|^2 / |S|^2 of the denoiser's Jacobian}} for {name: denoiser checkpoint}, on n held-out
    images of its data under white noise of each std."""
    out = {}
    for name, path in paths.items():
        model, config = load_denoiser(path)
        x, _ = learning.held_out_and_fitted(config, n, seed)
        out[name] = {}
        for sigma in sigmas:
            cov = cv.isotropic(sigma ** 2, x.shape, "pixel")
            y = x + sigma * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 1))
            out[name][sigma] = jacobian_asymmetry(lambda t: model.estimate(t, cov), y, seed=seed)
    return out


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--asymmetry"]:
        if len(argv) < 2 or not all("=" in a for a in argv[1:]):
            raise SystemExit("--asymmetry needs NAME=CKPT pairs of denoiser checkpoints, e.g. --asymmetry den=runs/denoiser/ckpt.pt")
        res = asymmetry_by_noise(dict(a.split("=", 1) for a in argv[1:]))
        sigmas = learning.NOISE_LEVELS
        print("|A|^2 / |S|^2 of the posterior mean's Jacobian | " + " | ".join(f"σ {s:g}" for s in sigmas) + " |")
        print("|---" * (len(sigmas) + 1) + "|")
        for name, r in res.items():
            print(f"| {name} | " + " | ".join(f"{r[s]:.3f}" for s in sigmas) + " |")
        return
    if "--ckpt" in argv:
        i = argv.index("--ckpt")
        if i + 1 >= len(argv):
            raise SystemExit("--ckpt needs a checkpoint path, e.g. --ckpt runs/denoiser/ckpt.pt")
        path = argv[i + 1]
        learning.print_table(evaluate(path), path)
        return
    if "--lam" in argv and argv[argv.index("--lam") + 1:][:1] != ["0"]:
        raise SystemExit("the denoiser is not an energy: it trains with A-DSM alone (--lam 0, the default here)")
    # train.py's loop, data, covariances, loss, checkpoints and resume, with this wrapper around the network
    # (in-training validation: its restoration PSNRs are the denoiser's; its blind column and A-CSM are meaningless)
    with built_by_train():
        train.main(argv + ["--lam", "0"] + ([] if "--out" in argv else ["--out", "runs/denoiser"]))


@contextlib.contextmanager
def built_by_train():
    """Inside: train.py builds this plain denoiser where it would build an energy (also experiments/distill.py)."""
    build_energy, nets.build_energy = nets.build_energy, build_denoiser
    try:
        yield
    finally:
        nets.build_energy = build_energy


if __name__ == "__main__":
    main()
