"""
Inference precision: every task's posterior mean in float32 against float64, on the same images
and the same observation (docs/precision.md).

    python -m experiments.precision                       # after `python train.py`: the quickstart model
    python -m experiments.precision --ckpt runs/x/ckpt.pt --noise 0.01

For each task (denoise; inpaint box / half / random; deblur b = 0.5, 1.5, 3 and SR x2, x4 in fft
and dct) it prints the posterior-mean PSNR of the model in float32 and in float64, the largest
per-pixel difference between the two, the observation's PSNR, and the same for the F = 0 energy
(M3's Gaussian limit, whose posterior mean is the Wiener filter of N(mu, sigma_d^2 I)).

The observation is made once in float64 and cast, so both precisions restore the same data; the
float32 run is what `sample.py` does by default.
"""

import argparse
import copy

import torch

import aebm
import covariances as cv
import data
import nets
import sample

# (name, sample.py flags) of every task the float32 checks cover.
TASKS = [("denoise", ["--task", "denoise"]),
         ("inpaint box", ["--task", "inpaint", "--mask", "box"]),
         ("inpaint half", ["--task", "inpaint", "--mask", "half"]),
         ("inpaint random", ["--task", "inpaint", "--mask", "random"])]
for _basis in ("fft", "dct"):
    TASKS += [(f"deblur b={b} {_basis}", ["--task", "deblur", "--blur-std", str(b), "--basis", _basis]) for b in (0.5, 1.5, 3.0)]
    TASKS += [(f"sr x{r} {_basis}", ["--task", "sr", "--sr-factor", str(r), "--basis", _basis]) for r in (2, 4)]


def observation(x64, argv, noise, mean, seed=0):
    """(y~, Sigma_y, shown observation) in float64 for the task of sample.py flags `argv`."""
    args = sample.parse_args(argv + ["--noise", str(noise)])
    return sample.observe(args, x64, mean, torch.Generator().manual_seed(seed))[:3]


def in_dtype(energy, dtype):
    """A copy of the energy with its parameters and buffers in dtype."""
    return copy.deepcopy(energy).to(dtype)


def compare(energy, x64, argv, noise, seed=0):
    """Posterior means of `energy` in float32 and float64 for one task: PSNRs and the largest difference."""
    e64, e32 = in_dtype(energy, torch.float64), in_dtype(energy, torch.float32)
    y, cov, _ = observation(x64, argv, noise, aebm.energy_mean(e64), seed)
    x_hat64 = aebm.posterior_mean(e64, y, cov)
    x_hat32 = aebm.posterior_mean(e32, y.float(), cv.Covariance(cov.s.float(), cov.basis))
    return dict(psnr32=data.psnr(x_hat32.double(), x64).mean().item(),
                psnr64=data.psnr(x_hat64, x64).mean().item(),
                max_diff=(x_hat32.double() - x_hat64).abs().max().item())


def main(argv=None):
    p = argparse.ArgumentParser(description="Posterior means in float32 against float64, every task.")
    p.add_argument("--ckpt", default="runs/quick/ckpt.pt", help="checkpoint from train.py")
    p.add_argument("--noise", type=float, default=0.05, help="measurement noise std")
    p.add_argument("--n", type=int, default=8, help="held-out images")
    a = p.parse_args(argv)
    energy, config = nets.load_energy(a.ckpt)
    ds = data.dataset_for(config, "test")
    x64 = ds.get_batch(a.n, torch.Generator().manual_seed(10_000)).double()
    gauss = nets.build_energy(config)  # a fresh network: zero output layer, F = 0 (M3's Gaussian limit)
    print(f"{config['dataset']} {tuple(x64.shape[1:])}, sigma_n = {a.noise}, {a.n} images")
    print(f"{'task':18s} {'model f32':>10s} {'model f64':>10s} {'max |diff|':>11s} {'F=0 f32':>9s} {'F=0 f64':>9s} "
          f"{'max |diff|':>11s}")
    for name, task in TASKS:
        m, g = compare(energy, x64, task, a.noise), compare(gauss, x64, task, a.noise)
        print(f"{name:18s} {m['psnr32']:10.2f} {m['psnr64']:10.2f} {m['max_diff']:11.2e} {g['psnr32']:9.2f} "
              f"{g['psnr64']:9.2f} {g['max_diff']:11.2e}")


if __name__ == "__main__":
    main()
