"""
Your own photographs (README, Your own images; docs/results.md §5): a folder of large images to learn
from, and what a user restoring such images needs to know.

    python -m experiments.photos --make-folder runs/leaves_photos          # 60 large dead-leaves images, PNG and JPEG
    python train.py --preset photos --dataset folder --data-dir runs/leaves_photos --out runs/photos
    python -m experiments.learning --ckpt runs/photos/ckpt.pt               # held-out crops against Wiener
    python -m experiments.photos --check runs/photos/ckpt.pt                # the evidence check's accuracy
    python -m experiments.photos --calibration runs/photos/ckpt.pt          # sample error against the mean's
    python -m experiments.photos --calibration exact --sampler mala         # the same path with the exact prior
    python -m experiments.photos --spectrum runs/photos/ckpt.pt             # the prior's samples' spectrum against the images'

The folder stands in for a user's photographs: dead leaves rendered at 256 x 192, far larger than the
32 x 32 crops the photos preset trains on, saved as PNG and (every fourth) JPEG, so the reader, the
held-out split by file, and restoration at a photograph's own size are exercised end to end.
"""

import argparse
import math
import os

import numpy as np
import torch
from PIL import Image

import aebm
import covariances as cv
import data
import nets
import sample

TASKS = {"denoise": lambda shape, basis="dct": cv.denoising_problem(shape, 0.05, torch.float64),
         "deblur": lambda shape, basis="dct": cv.blur_problem(shape, 1.5, 0.02, basis, torch.float64),
         "sr": lambda shape, basis="dct": cv.sr_problem(shape, 2, 0.02, basis, torch.float64)}


def make_folder(out, n=60, width=256, height=192, seed=0):
    """n dead-leaves renderings of width x height (radii 1 to width/3 px), every fourth as JPEG (quality 92)."""
    os.makedirs(out, exist_ok=True)
    leaves = data.DeadLeaves(max(width, height), 3)
    g = torch.Generator().manual_seed(seed)
    paths = []
    for i in range(0, n, 10):  # ten at a time: a rendering holds a batch of full images per disk
        batch = leaves.get_batch(min(10, n - i), g)[..., :height, :width]
        for j, img in enumerate(batch):
            arr = (img.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
            k = i + j
            path = os.path.join(out, f"leaves_{k:03d}." + ("jpg" if k % 4 == 3 else "png"))
            Image.fromarray(arr).save(path, **({"quality": 92} if path.endswith(".jpg") else {}))
            paths.append(path)
    return paths


def domain_images(domain, n, folder, height=64, width=96, seed=0):
    """n images of height x width (non-square, larger than the 32 x 32 training crops): windows of the
    folder's held-out files (split by file, never seen in training), or Gaussian-field draws."""
    g = torch.Generator().manual_seed(seed)
    if domain == "leaves":
        return data.load_dataset("folder", width, 3, folder, "test", crop="random").get_batch(n, g)[..., :height, :].double()
    return data.GaussianField((height, width), 3).prior.sample(n, g).double()


def load_model(spec, height=64, width=96):
    """NAME=PATH of a checkpoint, or field=exact: the Gaussian field's own energy at the images' size."""
    name, path = spec.split("=", 1)
    if path == "exact":
        return name, data.GaussianField((height, width), 3).prior
    return name, nets.load_energy(path)[0]


def check(models, folder, n=8):
    """How often the evidence check is right: it is right when "the model explains the observation better
    than the 1/f Gaussian fitted to it" agrees with "the model's posterior mean beats that Gaussian's Wiener
    filter" (PSNR against the truth). Every model on both domains and every task the check covers."""
    rows = []
    for name, energy in models:
        for domain in ("leaves", "field"):
            x = domain_images(domain, n, folder)
            for task, make in TASKS.items():
                prob = make(x[:1].shape)
                agree = model_better = warned = 0
                for i in range(n):
                    y_obs = prob.measure(x[i : i + 1], torch.Generator().manual_seed(100 + i))
                    ev_model, ev_gauss, gauss = aebm.evidence(energy, y_obs, prob, observed_only=task == "sr")
                    y, cov = prob.to_denoising(y_obs, aebm.energy_mean(energy))
                    dtype = aebm.energy_dtype(energy)
                    x_model = aebm.posterior_mean(energy, y.to(dtype), cv.Covariance(cov.s.to(dtype), cov.basis)).double()
                    x_gauss = gauss.posterior_mean(*prob.to_denoising(y_obs, gauss.mean))  # sigma^2 I: any basis
                    better = data.psnr(x_model, x[i : i + 1]).item() > data.psnr(x_gauss, x[i : i + 1]).item()
                    warned += ev_model > ev_gauss
                    model_better += better
                    agree += (ev_model < ev_gauss) == better
                rows.append(dict(model=name, domain=domain, task=task, warned=warned / n, model_better=model_better / n,
                                 right=agree / n))
                print(f"{name:10s} {domain:7s} {task:8s} warned {warned / n:.2f}  model restores better "
                      f"{model_better / n:.2f}  check right {agree / n:.2f}", flush=True)
    total = sum(r["right"] for r in rows) / len(rows)
    print(f"check right on {total:.2f} of all (model, domain, task, image) cases")
    return rows


def calibration(energy, x, basis="dct", sampler="ula", steps=150):
    """Posterior samples against the posterior mean for images x, restored as sample.py --observed does
    (known degradation, the given sampler and levels; blur in `basis`): for a calibrated sampler a sample's
    error is about sqrt(2) times the posterior mean's (E|x_s - x|^2 = E|x_s - x^|^2 + E|x^ - x|^2, the first
    term the posterior variance and the second's expectation too)."""
    rows = []
    for task in ("denoise", "deblur"):
        prob = TASKS[task](x.shape, basis)
        y_obs = prob.measure(x.double(), torch.Generator().manual_seed(7)).to(x.dtype)
        flags = ["--task", task, "--observed", "x.png", "--noise", str(prob.sigma_n), "--quiet", "--sampler", sampler,
                 "--basis", basis] + ([] if task == "denoise" else ["--blur-std", "1.5"])
        args = sample.parse_args(flags)
        args.steps = steps
        y, cov, _, _ = sample.observed_problem(args, energy, y_obs)
        x_hat, samples = sample.restore(args, energy, y, cov, torch.device("cpu"), torch.Generator().manual_seed(3), {})
        rmse = lambda t: (t.double() - x.double()).square().flatten(1).mean(1).sqrt()
        ratio = (rmse(samples[0]) / rmse(x_hat)).mean().item()
        rows.append(dict(task=task, rmse_mean=rmse(x_hat).mean().item(), rmse_sample=rmse(samples[0]).mean().item(),
                         ratio=ratio))
        print(f"{task:8s} {sampler} {steps} levels: posterior mean RMSE {rows[-1]['rmse_mean']:.4f}  sample RMSE "
              f"{rows[-1]['rmse_sample']:.4f}  ratio {ratio:.2f} (calibrated: {math.sqrt(2):.2f})", flush=True)
    return rows


BANDS = [0, 0.1, 0.2, 0.3, 0.45, 0.6, 0.8, 1.5]  # radial DCT frequency |k| / N, 0.5 = half the sampling rate


def band_power(x, bands=BANDS):
    """Mean power of the DCT coefficients of x in each radial band (the mean image's DC left in)."""
    H, W = x.shape[-2:]
    r = ((torch.arange(H).view(-1, 1) / H) ** 2 + (torch.arange(W).view(1, -1) / W) ** 2).sqrt()
    z = cv.to_basis(x.double(), "dct").square()
    return [z[..., (r >= lo) & (r < hi)].mean().item() for lo, hi in zip(bands[:-1], bands[1:])]


def spectrum(energy, x, levels=150, seed=0):
    """Where a miscalibrated sample's error lives: the power spectrum (band_power) of the model's
    unconditional samples (sample.generate, default schedule) against that of images x. Under blur the
    high frequencies are the prior's alone, so a prior whose samples carry too much power there gives
    posterior samples too far from the truth, whatever the sampler."""
    g = torch.Generator().manual_seed(seed)
    drawn = sample.generate(energy, x.shape, levels=levels, s_end=1e-4, generator=g).x_mean
    truth, model = band_power(x), band_power(drawn)
    for lo, hi, t, m in zip(BANDS[:-1], BANDS[1:], truth, model):
        print(f"|k|/N {lo:.2f}-{hi:.2f}: images {t:.2e}  unconditional samples {m:.2e}  ratio {m / t:.2f}", flush=True)
    # The denoiser along the path: the posterior mean's error per band over the band's power (1 = the error
    # of answering the mean image; a denoiser that removes the noise it cannot resolve stays below 1).
    centred = band_power(x - aebm.energy_mean(energy))
    for s in (1.0, 0.1, 0.01):
        y = x + math.sqrt(s) * torch.randn(x.shape, generator=g, dtype=x.dtype)
        x_hat = aebm.posterior_mean(energy, y, cv.isotropic(s, x.shape, "pixel", dtype=x.dtype)).detach()
        ratios = [e / t for e, t in zip(band_power(x_hat - x), centred)]
        print(f"denoising at sigma^2 = {s:g}: error / band power " + " ".join(f"{r:.2f}" for r in ratios), flush=True)
    return truth, model


def full_size(energy, out, size=256, seed=99):
    """The check on one photograph at full size: a size x size dead-leaves rendering of the folder's kind,
    blurred (b = 1.5, sigma 0.02), written to OUT/sharp.png and OUT/blurred.png (for timing sample.py on it);
    the two evidences, and the model's posterior mean against the 1/f Gaussian's Wiener filter."""
    os.makedirs(out, exist_ok=True)
    x = data.DeadLeaves(size, 3).get_batch(1, torch.Generator().manual_seed(seed)).double()
    prob = cv.blur_problem(x.shape, 1.5, 0.02, "dct", torch.float64)
    y_obs = prob.measure(x, torch.Generator().manual_seed(1))
    to8 = lambda t: (t * 255 + 0.5).clamp(0, 255).to(torch.uint8).double() / 255  # what a PNG holds
    x, y_obs = to8(x), to8(y_obs)
    data.save_image(os.path.join(out, "sharp.png"), x[0])
    data.save_image(os.path.join(out, "blurred.png"), y_obs[0])
    ev_model, ev_gauss, gauss = aebm.evidence(energy, y_obs, prob)
    y, cov = prob.to_denoising(y_obs, aebm.energy_mean(energy))
    x_model = aebm.posterior_mean(energy, y.float(), cv.Covariance(cov.s.float(), cov.basis)).double()
    x_gauss = gauss.posterior_mean(*prob.to_denoising(y_obs, gauss.mean))
    psnr = lambda t: data.psnr(t, x).item()
    print(f"{size}x{size}: evidence model {ev_model:.4f}, 1/f Gaussian {ev_gauss:.4f} nats/dim; PSNR model "
          f"{psnr(x_model):.2f}, 1/f Wiener {psnr(x_gauss):.2f}, observation {psnr(y_obs):.2f} dB")


def main(argv=None):
    p = argparse.ArgumentParser(description="Large images to learn from, and checks of restoring them.")
    p.add_argument("--make-folder", default=None, metavar="DIR", help="write the folder of large dead-leaves images")
    p.add_argument("--n", type=int, default=60, help="images in the folder")
    p.add_argument("--folder", default="runs/leaves_photos", help="the folder whose held-out files --check and "
                   "--calibration use")
    p.add_argument("--check", nargs="*", default=None, metavar="NAME=PATH",
                   help="the evidence check's accuracy for these checkpoints (PATH 'exact': the Gaussian field's own energy)")
    p.add_argument("--calibration", default=None, metavar="CKPT",
                   help="sample error against the posterior mean's on held-out windows of --folder; 'exact': the "
                        "Gaussian field's own prior on field images (blur in its fft basis)")
    p.add_argument("--sampler", default="ula", choices=["ula", "mala", "adaptive"], help="--calibration's sampler")
    p.add_argument("--steps", type=int, default=150, help="--calibration's levels (sample.py's default on a CPU)")
    p.add_argument("--spectrum", default=None, metavar="CKPT",
                   help="power spectrum of the model's unconditional samples against held-out windows of --folder")
    p.add_argument("--full-size", default=None, metavar="CKPT", help="the check on one 256x256 photograph")
    p.add_argument("--images", type=int, default=8, help="images per domain and task")
    a = p.parse_args(argv)
    if a.make_folder:
        print(f"{len(make_folder(a.make_folder, a.n))} images in {a.make_folder}")
    if a.check:
        check([load_model(spec) for spec in a.check], a.folder, a.images)
    if a.spectrum:
        spectrum(nets.load_energy(a.spectrum)[0], domain_images("leaves", a.images, a.folder).float(), a.steps)
    if a.full_size:
        full_size(nets.load_energy(a.full_size)[0], "runs/photos_256")
    if a.calibration == "exact":
        prior = data.GaussianField((64, 96), 3).prior
        calibration(prior, domain_images("field", min(a.images, 4), a.folder), "fft", a.sampler, a.steps)
    elif a.calibration:
        x = domain_images("leaves", min(a.images, 4), a.folder).float()
        calibration(nets.load_energy(a.calibration)[0], x, "dct", a.sampler, a.steps)


if __name__ == "__main__":
    main()
