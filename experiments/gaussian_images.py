"""
Learned image energies against the exact density (docs/results.md §3).

The built-in `gaussian` dataset is a stationary Gaussian field, so its exact energy
(aebm.GaussianEnergy) gives the physical limits. This script trains the UNet energy twice with
train.py, with the dual loss and with DSM only (same seeds, same steps), and compares both with
the exact energy on held-out images:

  - NLL in bits/dim (M10) against the exact NLL;
  - posterior-mean MSE for box inpainting and for deblurring, as a ratio to the Bayes (Wiener) MSE;
  - blind estimation (box size x noise level) over a grid of true values: how often the argmin of
    the energy is the truth, for dual, DSM-only and the exact energy.

    python -m experiments.gaussian_images --steps 1000        # 16x16, small UNet (docs/results.md §3)
    python -m experiments.gaussian_images --size 8 --config tiny --steps 300   # the CI-scale version
"""

import argparse
import itertools
import math
import os

import torch

import aebm
import covariances as cv
import data
import nets
import sample
import train


def train_pair(size, config, steps, out, seed=0, batch=16, lr=1e-3, restart=False):
    """Dual and DSM-only energies trained with identical flags; returns {name: energy}. restart: set aside
    earlier runs in the same folders (train.py --restart) instead of refusing them."""
    models = {}
    for name, lam in (("dual", "1.0"), ("dsm", "0.0")):
        run_dir = os.path.join(out, f"gaussian{size}_{config}_{name}")
        train.main(["--dataset", "gaussian", "--img-size", str(size), "--channels", "1", "--config", config,
                    "--batch", str(batch), "--steps", str(steps), "--lr", str(lr), "--warmup", "20",
                    "--decay", "step", "--decay-every", str(max(steps // 2, 1)), "--eval-every", str(10 * steps),
                    "--log-every", str(max(steps // 4, 1)), "--out", run_dir, "--lam", lam, "--seed", str(seed),
                    "--device", "cpu", "--val-batch", "4", *train.PAPER_LOSSES, *(["--restart"] if restart else [])])
        models[name] = nets.load_energy(os.path.join(run_dir, "ckpt.pt"))[0]
    return models


def as_float64(prior):
    """The exact energy evaluated in float64 on float32 inputs (the learned models run in float32)."""
    return lambda y, cov: prior(y.double(), cv.Covariance(cov.s.double(), cov.basis, check=False)).to(y.dtype)


def bits_per_dim(energy, x, basis="pixel"):
    return aebm.bits_per_dim(-aebm.log_prob(energy, x, basis=basis), x[0].numel()).mean().item()


def mse_ratio(energy, prior, x, y, cov):
    """Posterior-mean MSE of `energy` over the Bayes MSE (the exact Wiener filter) on the same data."""
    bayes = (prior.posterior_mean(y.double(), cv.Covariance(cov.s.double(), cov.basis)) - x.double()).square().mean()
    model = (aebm.posterior_mean(energy, y, cov).double() - x.double()).square().mean()
    return (model / bayes).item()


def blind_accuracy(energy, ds, size, n=8, seed=0):
    """Fraction of true (box, noise) pairs recovered exactly; n images share each degradation."""
    sizes = [size // 4, size // 2, 3 * size // 4]
    noises = [0.05, 0.1, 0.2]
    hits = 0
    for k, (b, sigma) in enumerate(itertools.product(sizes, noises)):
        x = ds.get_batch(n, torch.Generator().manual_seed(seed + k))
        cov = cv.mask_covariance(cv.box_mask(x.shape, b), 1.0, sigma ** 2, 1)
        y = x + cov.sample(torch.Generator().manual_seed(100 + seed + k))[0]
        grid, _, _ = aebm.blind_inpaint(energy, y, 1, sizes, noises, missing_var=1.0)
        i, j = divmod(int(grid.sum(0).argmin()), len(noises))
        hits += (sizes[i], noises[j]) == (b, sigma)
    return hits / (len(sizes) * len(noises))


def evaluate(models, size, n=64, seed=0):
    """The table: one row per energy (dual, dsm, exact)."""
    ds = data.load_dataset("gaussian", size, 1)
    exact = as_float64(ds.prior)
    x = ds.get_batch(n, torch.Generator().manual_seed(50_000 + seed))
    g = torch.Generator().manual_seed(seed)
    box = cv.mask_covariance(cv.box_mask(x.shape, size // 2), cv.S_HUGE, 0.05 ** 2, 1)
    y_box = x + box.sample(g)[0]
    blur = cv.blur_problem(x.shape, 1.0, 0.05, "fft")
    y_blur, cov_blur = blur.to_denoising(blur.measure(x, g), ds.mean)
    rows = {}
    for name, energy in list(models.items()) + [("exact", exact)]:
        rows[name] = dict(
            bpd=bits_per_dim(energy, x, basis="fft" if name == "exact" else "pixel"),
            mse_inpaint=mse_ratio(energy, ds.prior, x, y_box, box),
            mse_deblur=mse_ratio(energy, ds.prior, x, y_blur, cov_blur),
            blind=blind_accuracy(energy, ds, size, seed=seed),
        )
    return rows


def plot_candidates(models, size, path, box=None, sigma=0.1, n=8, seed=0):
    """Energy of one shared degradation (box size/2, noise sigma) under each noise-level candidate at
    the true box size, summed over n images, minus its minimum: one curve per energy."""
    ds = data.load_dataset("gaussian", size, 1)
    box = box or size // 2
    noises = [0.02, 0.035, 0.05, 0.07, 0.1, 0.14, 0.2, 0.3]
    x = ds.get_batch(n, torch.Generator().manual_seed(seed))
    cov = cv.mask_covariance(cv.box_mask(x.shape, box), 1.0, sigma ** 2, 1)
    y = x + cov.sample(torch.Generator().manual_seed(seed + 1))[0]
    curves = []
    for name, energy in list(models.items()) + [("exact", as_float64(ds.prior))]:
        grid, _, _ = aebm.blind_inpaint(energy, y, 1, [box], noises, missing_var=1.0)
        e = grid.sum(0)[0]
        curves.append((name, [math.log10(s) for s in noises], (e - e.min()).tolist()))
    return data.save_line_plot(path, curves, title=f"blind inpainting, {size}x{size}: true noise {sigma}, box {box}",
                               xlabel="log10 candidate noise std", ylabel="energy - min (nats)")


def print_table(rows):
    print(f"{'energy':8s} {'NLL bits/dim':>13s} {'MSE/Bayes inpaint':>18s} {'MSE/Bayes deblur':>17s} {'blind accuracy':>15s}")
    for name, r in rows.items():
        print(f"{name:8s} {r['bpd']:13.3f} {r['mse_inpaint']:18.3f} {r['mse_deblur']:17.3f} {r['blind']:15.2f}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Learned energies vs the exact Gaussian-field density.")
    p.add_argument("--size", type=int, default=16, help="image size")
    p.add_argument("--config", default="small", help="network config")
    p.add_argument("--steps", type=int, default=1500, help="training steps per model")
    p.add_argument("--out", default="runs/validation", help="run directories")
    p.add_argument("--plot", default="docs/blind_energy_gaussian.png", help="energy-vs-candidate plot")
    p.add_argument("--restart", action="store_true", help="set aside earlier runs in --out (train.py --restart)")
    a = p.parse_args()
    models = train_pair(a.size, a.config, a.steps, a.out, restart=a.restart)
    print_table(evaluate(models, a.size))
    print("plot:", plot_candidates(models, a.size, a.plot))
