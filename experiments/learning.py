"""
Does the learned prior beat the classical one? A checkpoint against the Wiener filter of a Gaussian
prior fitted to the training data, and against the observation itself, on the same held-out
images and noise (docs/results.md §1).

    python -m experiments.learning --ckpt runs/quick/ckpt.pt
    python -m experiments.learning --ckpt runs/hour/ckpt.pt --n 64
    python -m experiments.learning --compare edm=runs/hour/log.csv M5=runs/m5/log.csv --tasks denoise sr
    python -m experiments.learning --noise-axis energy=runs/hour/ckpt.pt denoiser=runs/denoiser/ckpt.pt --plot n.png
    python -m experiments.learning --score-parts energy=runs/hour/ckpt.pt

Prints, in float32 (what users run): the posterior-mean PSNR of the model, of the fitted Wiener
filter and of the observation for denoising (sigma 0.1), box inpainting (half the size, sigma 0.05),
deblurring (b = 1.5, sigma 0.05) and SR x2 (sigma 0.05); blind inpainting accuracy (each image on
its own: box 1/4, 1/2, 3/4 of the size x noise 0.02, 0.05, 0.1) and blind deblurring accuracy (blur
1, 1.5, 2 px x noise 0.02, 0.05, 0.1), the truth being one of the candidates; with --wiener-blind 1,
the fitted Gaussian's blind accuracies from its own normalized energy too; with --split 1, box
inpainting's error inside the hole (the fill) and on the observed pixels, model and Wiener; with --by-noise 1,
denoising at every noise level from 0.01 to 1 (where along the noise axis the model gains or loses). It also redraws the
run's learning curves (OUT/curves.png) from its log.csv. --compare draws several runs' curves in one
figure against training steps (wall time differs between runs and machines; steps do not); --noise-axis
draws several checkpoints' denoising gain over Wiener against the noise level in one figure;
--score-parts splits an energy's Tweedie correction into what F's output and F's Jacobian give (score_parts).
"""

import argparse
import csv
import math
import os

import torch

import aebm
import covariances as cv
import data
import nets
import sample
import train


def blind_deblurring_accuracy(energy, x, basis, seed=0):
    stds, noises = [1.0, 1.5, 2.0], [0.02, 0.05, 0.1]
    hits = total = 0
    for k, (b, sigma) in enumerate([(b, s) for b in stds for s in noises]):
        prob = cv.blur_problem(x.shape, b, sigma, basis, dtype=x.dtype, device=x.device)
        y_obs = prob.measure(x, torch.Generator().manual_seed(seed + k))
        _, est_b, est_s = aebm.blind_deblur(energy, y_obs, stds, noises, basis, energy.mean)
        hits += int(((est_b == b) & ((est_s - sigma).abs() < 1e-9)).sum())
        total += x.shape[0]
    return hits / total


def held_out_and_fitted(config, n=32, seed=0):
    """The n held-out images every comparison here uses, and the classical prior: a Gaussian fitted to 512
    training images (its posterior mean is the Wiener filter). config: a checkpoint's, or any dict with
    dataset, img_size, channels, spectral_basis (and leaf_radii, crop, data_dir: data.dataset_for)."""
    x = data.dataset_for(config, "test").get_batch(n, torch.Generator().manual_seed(31_337 + seed))
    fit = data.dataset_for(config, "train").get_batch(512, torch.Generator().manual_seed(777_777))
    return x, aebm.fit_gaussian(fit.double(), config["spectral_basis"]).float()


def evaluate(path, n=32, seed=0, wiener_blind=False, split=False, by_noise=False):
    energy, config = nets.load_energy(path)
    name, size, channels, basis = config["dataset"], config["img_size"], config["channels"], config["spectral_basis"]
    x, wiener = held_out_and_fitted(config, n, seed)
    psnr = train.restoration_psnr(energy, wiener, x, basis, seed)
    res = dict(psnr=psnr, blind_inpaint=train.blind_inpainting_accuracy(energy, x, seed),
               blind_deblur=blind_deblurring_accuracy(energy, x, basis, seed), config=config, n=n)
    if split:
        res["inpaint_split"] = inpainting_split(energy, wiener, x, seed=seed)
    if by_noise:
        res["by_noise"] = denoising_by_noise(energy, wiener, x, basis, seed=seed)
    if wiener_blind:  # the classical answer to the blind tasks: the fitted Gaussian's own normalized energy
        # (pixel-basis masks are not diagonal in its basis: dense per-channel solves, ~10 min at 32x32x3)
        res["wiener_blind_inpaint"] = train.blind_inpainting_accuracy(wiener, x, seed)
        res["wiener_blind_deblur"] = blind_deblurring_accuracy(wiener, x, basis, seed)
    return res


def inpainting_split(energy, wiener, x, s_holes=(1e1, 1e3, cv.S_HUGE), sigma=0.05, seed=0):
    """Where box inpainting's error is: {s_hole: {"model" / "wiener": (MSE in the hole, MSE on the observed
    pixels)}} per pixel, for the validation task (centred half-size box, noise sigma) with the hole's
    variance set to each of s_holes (training draws it up to S_MAX = 1e3, the task uses S_HUGE), the same
    images and noise for both estimators."""
    missing = cv.box_mask(x.shape, x.shape[-1] // 2, device=x.device)
    hole = missing.expand(x.shape).to(x.dtype)
    out = {}
    for s_hole in s_holes:
        cov = cv.mask_covariance(missing, s_hole, sigma ** 2, x.shape[1], x.dtype)
        y = x + cov.sample(torch.Generator(x.device).manual_seed(seed))[0]
        out[s_hole] = {}
        for name, e in (("model", energy), ("wiener", wiener)):
            err = (aebm.posterior_mean(e, y, cov).to(x.dtype) - x).square()
            out[s_hole][name] = ((err * hole).sum().item() / hole.sum().item(),
                                 (err * (1 - hole)).sum().item() / (1 - hole).sum().item())
    return out


NOISE_LEVELS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def denoising_by_noise(energy, wiener, x, basis, sigmas=NOISE_LEVELS, seed=0):
    """{sigma: (PSNR of the model's posterior mean, of the Wiener filter's, of the observation)} for white
    noise of each std in sigmas, the same images and noise for all three (the validation's denoising task,
    swept along the noise axis)."""
    tasks = [(s, cv.denoising_problem(x.shape, s, dtype=x.dtype, device=x.device)) for s in sigmas]
    return train.restoration_psnr(energy, wiener, x, basis, seed, tasks)


def print_table(res, label):
    print(f"{label}: {res['config']['dataset']} {res['config']['img_size']}x{res['config']['img_size']}, "
          f"{res['n']} held-out images, float32")
    print(f"| task | model | fitted Gaussian (Wiener) | observation | model - Wiener |")
    print("|---|---|---|---|---|")
    names = {"denoise": "denoise σ = 0.1", "inpaint": "box inpainting (½ size), σ = 0.05",
             "deblur": "deblur b = 1.5, σ = 0.05", "sr": "SR ×2, σ = 0.05"}
    for k, (m, w, o) in res["psnr"].items():
        print(f"| {names[k]} | {m:.2f} dB | {w:.2f} dB | {o:.2f} dB | {m - w:+.2f} dB |")
    print(f"blind inpainting accuracy {res['blind_inpaint']:.2f}; blind deblurring accuracy {res['blind_deblur']:.2f}")
    if "inpaint_split" in res:
        print("box inpainting (½ size, σ = 0.05), MSE per pixel in the hole / on the observed pixels:")
        for s_hole, r in res["inpaint_split"].items():
            (mh, mo), (wh, wo) = r["model"], r["wiener"]
            print(f"  hole variance {s_hole:.0e}: model {mh:.4f} / {mo:.5f}, Wiener {wh:.4f} / {wo:.5f}")
    if "by_noise" in res:
        print("denoising along the noise axis: | σ | model | Wiener | observation | model - Wiener |")
        for sigma, (m, w, o) in res["by_noise"].items():
            print(f"| {sigma:g} | {m:.2f} dB | {w:.2f} dB | {o:.2f} dB | {m - w:+.2f} dB |")
    if "wiener_blind_inpaint" in res:
        print(f"fitted Gaussian: blind inpainting accuracy {res['wiener_blind_inpaint']:.2f}; blind deblurring "
              f"accuracy {res['wiener_blind_deblur']:.2f}")


def compare_curves(runs, tasks, out):
    """dB above Wiener against step for each (name, log.csv) in runs and each task: one figure."""
    curves = []
    for name, path in runs:
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if r["split"] == "val" and r.get("psnr_denoise")]
        if not rows:
            raise SystemExit(f"{path} holds no restoration validation rows: train with --val-restore 1")
        steps = [float(r["step"]) for r in rows]
        curves += [(f"{task} ({name})", steps, [float(r[f"psnr_{task}"]) - float(r[f"wiener_{task}"]) for r in rows])
                   for task in tasks]
    return data.save_line_plot(out, curves, title="held-out posterior means (EMA) vs fitted Wiener",
                               xlabel="training step", ylabel="dB above Wiener")


def load_model(path):
    """(model, config) from a checkpoint of train.py (an energy) or of experiments/denoiser.py (a plain denoiser)."""
    from experiments import denoiser  # it imports this module
    if nets.load_checkpoint(path)["config"].get("model") == "denoiser":
        return denoiser.load_denoiser(path)
    return nets.load_energy(path)


def noise_axis(runs, out, n=32, seed=0):
    """Denoising along the noise axis for several checkpoints, energies or plain denoisers (experiments/denoiser.py),
    each against the Wiener filter fitted to its own training data on the same held-out images and noise:
    prints one markdown row per run and draws dB above Wiener against log10 sigma in one figure. Returns
    (the figure's path, {name: gains in dB})."""
    print("| denoising, dB above Wiener at σ = | " + " | ".join(f"{s:g}" for s in NOISE_LEVELS) + " |")
    print("|---" * (len(NOISE_LEVELS) + 1) + "|")
    curves = []
    for name, path in runs:
        model, config = load_model(path)
        x, wiener = held_out_and_fitted(config, n, seed)
        gain = [m - w for m, w, _ in denoising_by_noise(model, wiener, x, config["spectral_basis"], seed=seed).values()]
        print(f"| {name} | " + " | ".join(f"{g:+.2f}" for g in gain) + " |", flush=True)
        curves.append((name, [math.log10(s) for s in NOISE_LEVELS], gain))
    path = data.save_line_plot(out, curves, title="denoising: posterior mean vs fitted Wiener, same images and noise",
                               xlabel="log10 noise std", ylabel="dB above Wiener")
    return path, {name: gain for name, _, gain in curves}


class _ValueOnly(torch.nn.Module):
    """The energy's network evaluated at a detached input, so that its outputs enter the energy's z-gradient as
    constants (score_parts' value part); the offsets b pass through."""

    def __init__(self, net):
        super().__init__()
        self.inner = net
        if hasattr(net, "offset"):  # EnergyModel then asks for (F, b), as it does of the network itself
            self.offset = True

    def forward(self, x, cov, with_offset=False):
        return self.inner(x.detach(), cov, with_offset=True) if with_offset else self.inner(x.detach(), cov)


def score_parts(energy, y, cov):
    """Where an energy's learned Tweedie correction comes from. t = s dE_learned/dz is the move from the anchor's
    Wiener estimate to the posterior mean in the basis (M4); M3's learned term 1/2 <y~, a U F(x_in)> gives it two
    parts, t = t_F + t_J: t_F = 1/2 s a v^(-1/2) U F, F's output as a coefficient, and t_J, F's Jacobian applied
    to the image-sized a y~ (the offsets b do not depend on y). For a linear F with a symmetric Jacobian (a
    Gaussian prior's exact energy) the two are equal. Returns the RMS over all coordinates of (t, t_F, t_J)."""
    z = cov.U(y)
    value = aebm.EnergyModel(_ValueOnly(energy.net), energy.mean, energy.data_var, energy.spectrum, energy.learned_scale)
    t = cov.s * aebm.energy_and_scores(energy, z, cov, need_log_s=False, part="learned")[1].detach()
    t_F = cov.s * aebm.energy_and_scores(value, z, cov, need_log_s=False, part="learned")[1].detach()
    return tuple(p.abs().square().mean().sqrt() for p in (t, t_F, t - t_F))


def score_parts_by_noise(runs, n=8, sigmas=NOISE_LEVELS, seed=0):
    """{name: {sigma: (|t| / sigma, |t_F| / |t|, |t_J| / |t|)}} for checkpoints {name: path} on n held-out images
    under white noise of each std (pixel basis, as denoising_by_noise): |t| / sigma is the correction's size
    against the noise it removes, the others each part's size against the correction. A plain denoiser
    (experiments/denoiser.py) has no parts: its t is the move from the same Wiener estimate to its own x^,
    and its parts are nan."""
    out = {}
    for name, path in runs:
        model, config = load_model(path)
        plain = config.get("model") == "denoiser"
        x, _ = held_out_and_fitted(config, n, seed)
        out[name] = {}
        for sigma in sigmas:
            cov = cv.isotropic(sigma ** 2, x.shape, "pixel")
            y = x + sigma * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 1))
            if plain:
                z = cov.U(y)
                mu, c = model.mean_z(z, cov), model.anchor_var(cov)
                with torch.no_grad():
                    t = (mu + c / (c + cov.s) * (z - mu) - cov.U(model.estimate(y, cov))).abs().square().mean().sqrt().item()
                out[name][sigma] = (t / sigma, math.nan, math.nan)
            else:
                t, t_F, t_J = (v.item() for v in score_parts(model, y, cov))
                out[name][sigma] = (t / sigma, t_F / t, t_J / t)
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="A checkpoint against the fitted Wiener filter and the observation.")
    p.add_argument("--ckpt", default="runs/quick/ckpt.pt", help="checkpoint of train.py")
    p.add_argument("--n", type=int, default=32, help="held-out images")
    p.add_argument("--compare", nargs="*", default=None, metavar="NAME=LOG",
                   help="instead: draw these runs' log.csv curves against step in one figure (--plot)")
    p.add_argument("--wiener-blind", type=int, default=0, choices=[0, 1],
                   help="1: also the fitted Gaussian's blind accuracies (the classical answer; ~10 more minutes)")
    p.add_argument("--split", type=int, default=0, choices=[0, 1],
                   help="1: also box inpainting's error split into the hole and the observed pixels, for hole "
                        "variances 1e1, 1e3 and the task's 1e8")
    p.add_argument("--by-noise", type=int, default=0, choices=[0, 1],
                   help=f"1: also denoising at each noise std in {NOISE_LEVELS}, model against Wiener")
    p.add_argument("--noise-axis", nargs="*", default=None, metavar="NAME=CKPT",
                   help="instead: denoising along the noise axis for these checkpoints (energies or plain "
                        "denoisers), one table and one figure (--plot)")
    p.add_argument("--score-parts", nargs="*", default=None, metavar="NAME=CKPT",
                   help="instead: for these energies, the two parts of their Tweedie correction along the noise axis "
                        "(score_parts: through F's value and through its Jacobian); plain denoisers: its size")
    p.add_argument("--tasks", nargs="*", default=["denoise", "inpaint", "deblur", "sr"], help="with --compare")
    p.add_argument("--plot", default="runs/learning_compare.png", help="with --compare: the figure")
    a = p.parse_args()
    if a.noise_axis is not None:
        runs = [item.split("=", 1) for item in a.noise_axis]
        if any(len(r) != 2 for r in runs):
            raise SystemExit("--noise-axis takes NAME=CKPT items, e.g. energy=runs/hour/ckpt.pt")
        print("figure:", noise_axis(runs, a.plot, a.n)[0])
        raise SystemExit(0)
    if a.score_parts is not None:
        runs = [item.split("=", 1) for item in a.score_parts]
        if any(len(r) != 2 for r in runs):
            raise SystemExit("--score-parts takes NAME=CKPT items, e.g. energy=runs/hour/ckpt.pt")
        print("| RMS of the learned correction t = t_F + t_J | " + " | ".join(f"σ {s:g}" for s in NOISE_LEVELS) + " |")
        print("|---" * (len(NOISE_LEVELS) + 1) + "|")
        for name, r in score_parts_by_noise(runs).items():
            for i, what in enumerate(("\\|t\\| / σ", "\\|t_F\\| / \\|t\\|", "\\|t_J\\| / \\|t\\|")):
                if not math.isnan(r[NOISE_LEVELS[0]][i]):  # a plain denoiser has no parts
                    print(f"| {name}: {what} | " + " | ".join(f"{r[s][i]:.2f}" for s in NOISE_LEVELS) + " |")
        raise SystemExit(0)
    if a.compare is not None:
        runs = [item.split("=", 1) for item in a.compare]
        if any(len(r) != 2 for r in runs):
            raise SystemExit("--compare takes NAME=PATH/log.csv items, e.g. edm=runs/hour/log.csv")
        print("figure:", compare_curves(runs, a.tasks, a.plot))
        raise SystemExit(0)
    print_table(evaluate(a.ckpt, a.n, wiener_blind=bool(a.wiener_blind), split=bool(a.split),
                         by_noise=bool(a.by_noise)), a.ckpt)
    curves = data.save_learning_curves(os.path.join(os.path.dirname(a.ckpt), "log.csv"),
                               os.path.join(os.path.dirname(a.ckpt), "curves.png"))
    print("curves:", curves)
