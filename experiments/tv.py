"""
A classical nonlinear reference for the restoration tasks: total-variation (TV) regularised least
squares, on the same held-out images and noise as experiments/learning.py (docs/results.md §1).

    python -m experiments.tv                                   # dead leaves 32x32x3: TV against Wiener
    python -m experiments.tv --ckpt runs/hour/ckpt.pt          # and a model's posterior means beside them
    python -m experiments.tv --ckpt runs/hour/ckpt.pt --noise 0.01   # deblurring and SR at another noise level
    python -m experiments.tv --leaf-radii 2 32                 # dead leaves with other disk sizes

Why: the Wiener filter is the best *linear* answer; how far a nonlinear estimator can get above it on
these images says whether a threshold such as "+1 dB above Wiener at deblurring" is within reach of a
prior at all. Dead leaves are piecewise constant, which is what TV favours, so TV's margin is a lower
bound on what the Bayes answer (the exact posterior mean, best in mean squared error) gains there.

For each task y_obs = A x + sigma_n xi, with A = U^H diag(a) U diagonal in the task's basis (covariances.
Degradation), TV solves

    x_hat = argmin_x  1/2 |A x - y_obs|^2 + lam TV(x),   TV(x) = sum_pixels sqrt(sum_channels |grad x|^2)

(colour TV: one norm over the channels and both directions, so edges are shared between channels),
by the primal-dual algorithm of Chambolle and Pock: the data term's proximal map is diagonal in the
task's basis, (I + tau A^T A)^-1 = U^H diag(1 / (1 + tau a^2)) U, and TV enters through its dual, a
projection onto pixel-wise balls of radius lam. lam is chosen per task from a grid on other images
(training images, other noise); the held-out images never choose anything.
"""

import argparse
import math

import torch

import covariances as cv
import data
import nets
import train
from experiments.learning import held_out_and_fitted


def grad(x):
    """Forward differences with Neumann boundaries (zero across the last row and column): (B, C, 2, H, W)."""
    dh = torch.zeros_like(x)
    dw = torch.zeros_like(x)
    dh[..., :-1, :] = x[..., 1:, :] - x[..., :-1, :]
    dw[..., :, :-1] = x[..., :, 1:] - x[..., :, :-1]
    return torch.stack([dh, dw], dim=2)


def grad_adjoint(p):
    """The adjoint of grad (minus a divergence): <grad x, p> = <x, grad_adjoint(p)>."""
    ph, pw = p[:, :, 0], p[:, :, 1]
    out = torch.zeros_like(ph)
    out[..., :-1, :] -= ph[..., :-1, :]
    out[..., 1:, :] += ph[..., :-1, :]
    out[..., :, :-1] -= pw[..., :, :-1]
    out[..., :, 1:] += pw[..., :, :-1]
    return out


def tv(x):
    """Colour TV per image: sum over pixels of the norm over channels and directions. (B,)"""
    return grad(x).square().sum(dim=(1, 2)).sqrt().flatten(1).sum(1)


def objective(prob, x, y_obs, lam):
    """1/2 |A x - y_obs|^2 + lam TV(x), per image. (B,)"""
    return 0.5 * (prob.A(x) - y_obs).square().flatten(1).sum(1) + lam * tv(x)


def tv_restore(prob, y_obs, lam, iters=1000, x0=None):
    """Chambolle-Pock for objective(): tau sigma |grad|^2 <= 1 with |grad|^2 <= 8, so tau = sigma = 1/sqrt(8).
    lam: a number or a (B,) tensor (one weight per image). x0: the start (default A^T y_obs, which is
    y_obs itself for denoising and inpainting)."""
    tau = sigma = 1 / math.sqrt(8)
    lam = torch.as_tensor(lam, dtype=y_obs.dtype, device=y_obs.device).reshape(-1, 1, 1, 1)
    a = prob.a
    # the data term's proximal map, diagonal in the task's basis: (v + tau A^T y) / (1 + tau a^2) there
    Aty = prob.A(y_obs)  # A^T y = A y: A is symmetric (a is real)
    to, back = (lambda v: cv.to_basis(v, prob.basis)), (lambda z: cv.from_basis(z, prob.basis))
    x = Aty.clone() if x0 is None else x0.clone()
    Aty = to(Aty)  # U A^T y, where the proximal map is diagonal
    x_bar, p = x.clone(), x.new_zeros(x.shape[:2] + (2,) + x.shape[2:])
    for _ in range(iters):
        p = p + sigma * grad(x_bar)
        p = p / (p.square().sum(dim=(1, 2), keepdim=True).sqrt() / lam.unsqueeze(2)).clamp_min(1.0)  # onto |p| <= lam
        x_new = back((to(x - tau * grad_adjoint(p)) + tau * Aty) / (1 + tau * a ** 2))
        x_bar = 2 * x_new - x
        x = x_new
    return x


def choose_lam(prob_of, x, lams, seed, iters):
    """The lam of the grid with the best mean PSNR on images x (each with its own noise draw)."""
    prob = prob_of(x)
    y_obs = prob.measure(x, torch.Generator().manual_seed(seed))
    scores = [data.psnr(tv_restore(prob, y_obs, lam, iters), x).mean().item() for lam in lams]
    best = max(range(len(lams)), key=lambda i: scores[i])
    return lams[best], scores


def tasks(x, basis, noise=None):
    """train.restoration_tasks (what validation tracks); with noise, deblurring (b = 1.5) and SR x2 alone at
    that noise level instead."""
    if noise is None:
        return train.restoration_tasks(x, basis)
    kw = dict(dtype=x.dtype, device=x.device)
    return [("deblur", cv.blur_problem(x.shape, 1.5, noise, basis, **kw)), ("sr", cv.sr_problem(x.shape, 2, noise, basis, **kw))]


def run(n=32, n_tune=16, seed=0, iters=1000, ckpt=None, dataset="deadleaves", size=32, channels=3, basis="dct",
        noise=None, leaf_radii=None):
    """{task: dict(tv=, wiener=, observed=, model= (with ckpt), lam=)} in dB, mean over the held-out images.
    leaf_radii: dead leaves' smallest and largest radius (train.py --leaf-radii); a checkpoint brings its own."""
    energy, config = None, dict(dataset=dataset, img_size=size, channels=channels, spectral_basis=basis,
                                leaf_radii=leaf_radii)
    if ckpt is not None:
        energy, config = nets.load_energy(ckpt)
        basis = config["spectral_basis"]
    x, wiener = held_out_and_fitted(config, n, seed)  # as experiments/learning.py
    x_tune = data.dataset_for(config, "train").get_batch(n_tune, torch.Generator().manual_seed(4_242 + seed))  # tuning
    lams = [0.002 * 1.5 ** k for k in range(14)]  # 0.002 ... 0.39; below ~0.005 deblurring needs > 2000 iterations
    if noise is not None and noise < 0.05:  # smaller noise, smaller lam (and more iterations to converge)
        lams = [lam * noise / 0.05 for lam in lams]
    # model (the Wiener filter itself without a checkpoint), Wiener and observation, as validation measures them
    psnr = train.restoration_psnr(energy or wiener, wiener, x, basis, seed, tasks(x, basis, noise))
    out = {}
    for i, (name, prob) in enumerate(tasks(x, basis, noise)):
        prob_of = lambda imgs, name=name: dict(tasks(imgs, basis, noise))[name]
        lam, _ = choose_lam(prob_of, x_tune, lams, 99_000 + seed + i, iters)
        y_obs = prob.measure(x, torch.Generator(x.device).manual_seed(seed + i))  # the noise restoration_psnr drew
        model, wien, obs = psnr[name]
        r = dict(lam=lam, tv=data.psnr(tv_restore(prob, y_obs, lam, iters), x).mean().item(), wiener=wien, observed=obs)
        if energy is not None:
            r["model"] = model
        out[name] = r
        print(f"  {name}: lam {lam:.2g}  TV {r['tv']:.2f}  Wiener {r['wiener']:.2f}  observation {r['observed']:.2f}"
              + (f"  model {r['model']:.2f}" if "model" in r else ""), flush=True)
    return out


def print_table(res, n, noise=None):
    s = 0.05 if noise is None else noise
    names = {"denoise": "denoise σ = 0.1", "inpaint": "box inpainting (½ size), σ = 0.05",
             "deblur": f"deblur b = 1.5, σ = {s:g}", "sr": f"SR ×2, σ = {s:g}"}
    has_model = all("model" in r for r in res.values())
    print(f"\n{n} held-out images, float32")
    print("| task | TV (λ) | fitted Gaussian (Wiener) | observation | TV − Wiener |" + (" model | model − Wiener |" if has_model else ""))
    print("|---|---|---|---|---|" + ("---|---|" if has_model else ""))
    for k, r in res.items():
        row = (f"| {names[k]} | {r['tv']:.2f} dB ({r['lam']:.2g}) | {r['wiener']:.2f} dB | {r['observed']:.2f} dB | "
               f"{r['tv'] - r['wiener']:+.2f} dB |")
        if has_model:
            row += f" {r['model']:.2f} dB | {r['model'] - r['wiener']:+.2f} dB |"
        print(row)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="TV-regularised restoration against the fitted Wiener filter.")
    p.add_argument("--ckpt", default=None, help="a train.py checkpoint: its dataset, and its posterior means beside")
    p.add_argument("--n", type=int, default=32, help="held-out images")
    p.add_argument("--iters", type=int, default=1000, help="primal-dual iterations (converged to 1e-3 dB at the chosen lam)")
    p.add_argument("--noise", type=float, default=None,
                   help="deblurring and SR alone, at this noise level (default: the four validation tasks)")
    p.add_argument("--leaf-radii", type=float, nargs=2, default=None, metavar=("R_MIN", "R_MAX"),
                   help="without --ckpt: dead leaves' smallest and largest radius in pixels (default 1 and 32/3)")
    a = p.parse_args()
    if a.noise is not None and not 0 < a.noise < 1:
        p.error(f"--noise must be in (0, 1), got {a.noise}")
    if a.leaf_radii is not None and not 0 < a.leaf_radii[0] < a.leaf_radii[1]:
        p.error(f"--leaf-radii must be two radii 0 < R_MIN < R_MAX, got {a.leaf_radii[0]:g} {a.leaf_radii[1]:g}")
    print_table(run(a.n, iters=a.iters, ckpt=a.ckpt, noise=a.noise, leaf_radii=a.leaf_radii), a.n, a.noise)
