"""
Normalization across the whole covariance family, the paper's core claim, measured where the truth is known.

A normalized energy differs from -log p(y; Sigma) by nothing, in particular not by an offset that
changes with Sigma (that is what the covariance score buys, and what blind estimation and
log-probabilities rest on). On the built-in Gaussian field the exact energy is known (M9), so
for a trained model this script measures, on held-out images:

  - the offset (E_model - E_exact) / d in every cell of the families the training distribution draws
    (family_grid: isotropic sigma^2 from 1e-6 to 1e2, in the pixel and the spectral basis; boxes, half and random masks at two observed
    noises; blur widths and SR factors at five noises): its mean over images, printed as a table
    and drawn as one figure, and its spread over the isotropic levels;
  - the posterior-mean MSE over the Bayes (Wiener) MSE in the same cells (what DSM fits);
  - NLL in bits/dim against the exact NLL (log p(x) through sigma^2 I in the pixel basis, and in the spectral one);
  - blind deblurring over a grid of widths x noises: how often the model's argmin is the exact energy's;
  - the fine-grid blind-noise curve (true sigma 0.1, box 8, 8 images) against the exact one.

    python -m experiments.normalization                       # dual and DSM-only side by side, 16x16 (docs/results.md §2)
    python -m experiments.normalization --ckpt dual=runs/x/ckpt.pt dsm=runs/y/ckpt.pt   # measure checkpoints

It trains with train.py's real loop (dual and DSM-only with identical flags and seeds) and draws
docs/normalization_offsets.png and docs/normalization_blind.png.
"""

import argparse
import math
import os
import sys

import torch

import aebm
import covariances as cv
import data
import nets
import sample
import train

LEVELS = [10.0 ** k for k in range(-6, 3)]  # isotropic sigma^2, the table's columns
MASK_NOISES = [1e-4, 1e-2]  # observed sigma^2 of the masks
SPECTRAL_NOISES = [1e-6, 1e-4, 1e-3, 1e-2, 1e-1]  # sigma_n^2 of blur and SR
BLURS = [0.5, 1.0, 1.5, 2.0, 3.0]
FINE_NOISES = [0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 0.1, 0.11, 0.12, 0.14, 0.17, 0.2]
# blind deblurring on the field: every (width, noise) pair of this grid is both a truth and a candidate
BLIND_BLURS = [0.5 + 0.25 * i for i in range(11)]  # 0.5, 0.75, ..., 3
BLIND_NOISES = [0.01, 0.02, 0.05, 0.1]
DRAWN = {True: "drawn in training", False: "unseen", None: "training draw not recorded"}  # random masks, per model
MARGIN = 5.0  # nats between the exact energy's best and second-best candidate: a clear case


def train_model(out, lam, steps, size=16, config="small", batch=16, seed=0, extra=()):
    """One model on the Gaussian field with train.py; returns (its EMA energy, its config)."""
    train.main(["--dataset", "gaussian", "--img-size", str(size), "--channels", "1", "--config", config,
                "--batch", str(batch), "--steps", str(steps), "--lam", str(lam), "--seed", str(seed), "--out", out,
                "--eval-every", str(10 * steps), "--log-every", str(max(1, steps // 10)), "--device", "cpu",
                "--val-batch", "4",
                # the paper's losses, at the learning rate every figure in docs/results.md §2 was measured with
                "--lr", "1e-3", *train.PAPER_LOSSES, *extra])
    return nets.load_energy(os.path.join(out, "ckpt.pt"))


class _NamedLines:
    """A child's stdout that starts each line with its run's name, so that two logs printed side by side
    can be told apart."""

    def __init__(self, name, stream):
        self.name, self.stream, self.at_line_start = name, stream, True

    def write(self, text):
        for part in text.splitlines(keepends=True):
            self.stream.write(f"[{self.name}] " * self.at_line_start + part)
            self.at_line_start = part.endswith("\n")
        return len(text)

    def flush(self):
        self.stream.flush()


def _train_on_threads(name, threads, *args, **kwargs):
    """train_model in a child process on `threads` cores (a top-level function, so that spawn can pickle it)."""
    sys.stdout = _NamedLines(name, sys.stdout)
    torch.set_num_threads(threads)
    train_model(*args, **kwargs)


def train_pair(out, steps, extra=(), side_by_side=True):
    """Dual (lambda 1) and DSM-only (lambda 0) with identical flags and seeds; returns {name: (EMA energy, config)}.
    Side by side, each trains in its own process on half the cores: this small UNet on 16x16 images keeps
    one thread nearly as busy as two, so the pair finishes in well under twice one run's time
    (docs/results.md §2 has the times). The runs are the same as one after the other, up to the order in
    which threads sum floats."""
    runs = {"dual": 1.0, "dsm": 0.0}
    if side_by_side:
        threads = max(1, torch.get_num_threads() // 2)
        spawn = torch.multiprocessing.get_context("spawn")  # fresh interpreters: no forked torch thread pools
        procs = {name: spawn.Process(target=_train_on_threads, kwargs=dict(extra=extra),
                                     args=(name, threads, os.path.join(out, name), lam, steps))
                 for name, lam in runs.items()}
        for pr in procs.values():
            pr.start()
        for pr in procs.values():
            pr.join()
        failed = [f"{name} (exit code {pr.exitcode})" for name, pr in procs.items() if pr.exitcode != 0]
        if failed:
            raise SystemExit(f"training {', '.join(failed)} failed with the error above; --restart trains again "
                             f"(setting aside the runs in {out}), --ckpt NAME=PATH measures finished checkpoints")
        return {name: nets.load_energy(os.path.join(out, name, "ckpt.pt")) for name in runs}
    return {name: train_model(os.path.join(out, name), lam, steps, extra=extra) for name, lam in runs.items()}


def exact64(prior):
    return lambda y, cov: prior(y.double(), cv.Covariance(cov.s.double(), cov.basis, check=False))


def family_grid(shape, basis="fft", seed=0):
    """The covariance families the training distribution draws (docs/method.md §2), as table cells
    (row, noise variance, covariance): isotropic sigma^2; centred boxes of 1/4, 1/2 and 3/4 the image side,
    the top half, random pixel masks (missing pixels at S_HUGE, as inpainting gives them); blur of width
    b and SR x2, x4 with sigma_n^2 (M2, in the training basis; dropped frequencies at S_HUGE)."""
    B, C, H, W = shape
    f64 = dict(dtype=torch.float64)
    cells = [("isotropic", s, cv.isotropic(s, shape, "pixel", **f64)) for s in LEVELS]
    # sigma^2 I is diagonal in every basis and training draws it in both; in the spectral one M3's Gaussian part
    # is the anchor's (with --anchor spectral, the fitted Gaussian: nearly exact on this field, so a flat row
    # there is the anchor's, not the covariance score's; the pixel row is the test)
    cells += [(f"isotropic, {basis}", s, cv.isotropic(s, shape, basis, **f64)) for s in LEVELS]
    masks = [(f"box {q}/4", cv.box_mask(shape, q * H // 4)) for q in (1, 2, 3)] + [("half", cv.half_mask(shape, H // 2))]
    # random pixel masks: in the training distribution only with train.py --p-random (measure says which)
    masks += [(f"random {p}%", cv.random_mask(shape, p / 100, torch.Generator().manual_seed(seed + p))) for p in (25, 50, 75)]
    cells += [(name, s, cv.mask_covariance(m, cv.S_HUGE, s, C, **f64)) for name, m in masks for s in MASK_NOISES]
    cells += [(f"blur b={b:g}", s, cv.blur_problem(shape, b, math.sqrt(s), basis, **f64).covariance())
              for b in BLURS for s in SPECTRAL_NOISES]
    cells += [(f"SR x{r}", s, cv.sr_problem(shape, r, math.sqrt(s), basis, **f64).covariance())
              for r in (2, 4) for s in SPECTRAL_NOISES]
    return cells


@torch.no_grad()
def offsets(energy, prior, x, seed=0, chunk=128):
    """For every cell of family_grid: the mean and standard deviation over images of (E_model - E_exact)/d,
    and the posterior mean's MSE over the Bayes (exact posterior mean's) MSE with its standard error
    (ratio_and_error). Images go through the model `chunk` at a time."""
    d, n = x[0].numel(), len(x)
    exact = exact64(prior)
    rows = []
    for name, s, cov in family_grid(x.shape, seed=seed):
        y = x + cov.sample(torch.Generator().manual_seed(seed))[0]
        gap, mse = [], []
        for i in range(0, n, chunk):
            yi, ci = y[i : i + chunk], cv.Covariance(cov.s[i : i + chunk], cov.basis, check=False)
            y32, cov32 = yi.float(), cv.Covariance(ci.s.float(), ci.basis)
            gap.append((energy(y32, cov32).double() - exact(yi, ci)) / d)
            with torch.enable_grad():
                mse.append((aebm.posterior_mean(energy, y32, cov32).double() - x[i : i + chunk]).square().flatten(1).mean(1))
        gap, mse = torch.cat(gap), torch.cat(mse)
        bayes = (prior.posterior_mean(y, cov) - x).square().flatten(1).mean(1)
        ratio, se = ratio_and_error(mse, bayes)
        rows.append(dict(name=name, s=s, offset=gap.mean().item(), std=gap.std().item(), mse_ratio=ratio, mse_se=se))
    return rows


def ratio_and_error(mse, bayes):
    """sum(mse) / sum(bayes) over images and its standard error: the ratio of two means, so to first order
    (the delta method) its error is the mean of (mse_i - ratio * bayes_i) / mean(bayes), whose spread over
    images gives the error over sqrt(n). It falls as 1/sqrt(n): measure's 512 images resolve a ratio against a
    goal a few hundredths away, which 64 do not (docs/results.md §2)."""
    ratio = mse.sum() / bayes.sum()
    return ratio.item(), ((mse - ratio * bayes).std() / bayes.mean() / math.sqrt(len(mse))).item()


@torch.no_grad()
def blind_deblur_agreement(energy, prior, ds, n=16, seed=0):
    """Blind deblurring on the field: n images observed under every (b, sigma_n) of BLIND_BLURS x
    BLIND_NOISES, each scored under all of those candidates (aebm.blind_deblur). Returns (fraction of
    observations where the model's argmin is the exact energy's, model's accuracy, exact's accuracy, the
    same fraction among the observations whose exact runner-up is more than MARGIN nats behind, the number
    of observations). Disagreements are near-ties of the exact energy itself, so the fraction is a binomial
    estimate: near 0.95 its standard error is 0.016 with n = 4 (176 observations) and 0.008 with n = 16."""
    truths = [(b, s) for b in BLIND_BLURS for s in BLIND_NOISES]
    x = ds.get_batch(n, torch.Generator().manual_seed(90_000 + seed)).double()
    y_obs = torch.cat([cv.blur_problem(x.shape, b, s, "fft", dtype=torch.float64).measure(x, torch.Generator().manual_seed(seed + k))
                       for k, (b, s) in enumerate(truths)])  # (len(truths) * n, 1, H, W)
    true_b = torch.tensor([b for b, _ in truths], dtype=torch.float64).repeat_interleave(n)
    true_s = torch.tensor([s for _, s in truths], dtype=torch.float64).repeat_interleave(n)
    _, mb, ms = aebm.blind_deblur(energy, y_obs.float(), BLIND_BLURS, BLIND_NOISES, "fft", energy.mean)
    grid, eb, es = aebm.blind_deblur(prior, y_obs, BLIND_BLURS, BLIND_NOISES, "fft", prior.mean)
    same = ((mb - eb).abs() < 1e-9) & ((ms - es).abs() < 1e-9)
    right = lambda b, s: (((b - true_b).abs() < 1e-9) & ((s - true_s).abs() < 1e-9)).double().mean().item()
    two = grid.flatten(1).topk(2, largest=False).values
    clear = (two[:, 1] - two[:, 0]) > MARGIN  # the exact energy itself is sure
    return same.double().mean().item(), right(mb, ms), right(eb, es), same[clear].double().mean().item(), len(same)


def bits_per_dim(energy, x, basis="pixel"):
    return aebm.bits_per_dim(-aebm.log_prob(energy, x, basis=basis), x[0].numel()).mean().item()


def blind_curve(energy, ds, size, sigma=0.1, n=8, seed=0):
    """Energy (summed over n images sharing the degradation) of each candidate noise on the fine grid at
    the true box, minus its minimum; returns (curve, argmin)."""
    box = size // 2
    x = ds.get_batch(n, torch.Generator().manual_seed(seed))
    cov = cv.mask_covariance(cv.box_mask(x.shape, box), 1.0, sigma ** 2, 1)
    y = x + cov.sample(torch.Generator().manual_seed(seed + 1))[0]
    grid, _, _ = aebm.blind_inpaint(energy, y, 1, [box], FINE_NOISES, missing_var=1.0)
    e = grid.sum(0)[0]
    return (e - e.min()).tolist(), FINE_NOISES[int(e.argmin())]


def measure(models, size=16, n=512, seed=0, deblur_n=16):
    """{name: dict(rows, spread, nll, blind curve, blind deblurring, random_drawn)} for every model of
    {name: (energy, config)}, and the exact energy's NLL, blind-noise curve and blind-deblurring accuracy.
    random_drawn: whether the model's training drew random pixel masks (train.py --p-random, from the
    checkpoint's config; None for checkpoints that predate the record), i.e. whether their cells are among
    the families it was trained on or a test of generalization."""
    ds = data.load_dataset("gaussian", size, 1)
    x = ds.get_batch(n, torch.Generator().manual_seed(70_000 + seed)).double()
    out = {"exact": dict(nll=bits_per_dim(exact64(ds.prior), x, "fft"), blind=blind_curve(exact64(ds.prior), ds, size))}
    for name, (energy, config) in models.items():
        rows = offsets(energy, ds.prior, x, seed)
        iso = [r["offset"] for r in rows if r["name"] == "isotropic" and r["s"] <= 1.0]
        out[name] = dict(rows=rows, spread=max(iso) - min(iso), nll=bits_per_dim(energy, x.float()),
                         nll_spectral=bits_per_dim(energy, x.float(), "fft"),
                         blind=blind_curve(energy, ds, size), deblur=blind_deblur_agreement(energy, ds.prior, ds, deblur_n, seed),
                         random_drawn=None if config.get("p_random") is None else config["p_random"] > 0)
        out["exact"]["deblur_accuracy"] = out[name]["deblur"][2]
    return out


def table(rows, key):
    """{row name: {noise variance: value}} in the order of family_grid."""
    out = {}
    for r in rows:
        out.setdefault(r["name"], {})[r["s"]] = r[key]
    return out


def trained_rows(result):
    """The cells of the families a model's training drew: every row but the random masks, which only
    train.py --p-random draws (measure's random_drawn, read from the checkpoint's config; where the
    checkpoint does not say, they count, the stricter reading)."""
    return [r for r in result["rows"] if result["random_drawn"] is not False or not r["name"].startswith("random")]


def print_report(res):
    names = [k for k in res if k != "exact"]
    print("(E_model - E_exact) / d in nats, per model (" + " / ".join(names) + "); columns: noise variance")
    w = 9 * len(names) + 2  # "+0.000 / " per model
    print(f"{'':20s}" + "".join(f"{s:>{w}g}" for s in LEVELS))
    for key, fmt in (("offset", "{:+.3f}"), ("mse_ratio", "{:.3f}")):
        tabs = [table(res[n]["rows"], key) for n in names]
        if key == "mse_ratio":
            print("posterior-mean MSE / Bayes MSE")
        for row in tabs[0]:
            cells = [" / ".join(fmt.format(t[row][s]) for t in tabs) if s in tabs[0][row] else "" for s in LEVELS]
            print(f"{row:20s}" + "".join(f"{c:>{w}s}" for c in cells))
    for n in names:
        drawn, rows = res[n]["random_drawn"], trained_rows(res[n])
        worst = max(rows, key=lambda r: abs(r["offset"]))
        mse = max(rows, key=lambda r: r["mse_ratio"])
        random = [r for r in res[n]["rows"] if r["name"].startswith("random")]
        agree, acc, exact_acc, agree_clear, count = res[n]["deblur"]
        se = math.sqrt(agree * (1 - agree) / count)  # binomial standard error of the agreement
        print(f"{n}: over the families training draws, largest |offset| {worst['offset']:+.4f} nats/dim ({worst['name']}, "
              f"{worst['s']:g}) and largest MSE/Bayes {mse['mse_ratio']:.3f} ± {mse['mse_se']:.3f} ({mse['name']}, {mse['s']:g}); on random masks "
              f"({DRAWN[drawn]}) {max(abs(r['offset']) for r in random):.4f} and {max(r['mse_ratio'] for r in random):.3f}; offset spread over isotropic "
              f"sigma^2 in [1e-6, 1] {res[n]['spread']:.4f}; NLL {res[n]['nll']:.3f} bits/dim (fft basis {res[n]['nll_spectral']:.3f}; exact "
              f"{res['exact']['nll']:.3f}); blind deblurring: argmin = exact's on {agree:.3f} ± {se:.3f} ({count} observations; {agree_clear:.3f} where the exact "
              f"margin > {MARGIN:g} nats; right {acc:.3f}, exact right {exact_acc:.3f}); blind noise estimate {res[n]['blind'][1]} (exact {res['exact']['blind'][1]}, "
              f"true 0.1); contrast at 0.03: {res[n]['blind'][0][0]:.1f} nats (exact {res['exact']['blind'][0][0]:.1f})")


def print_markdown(res):
    """The family table as docs/results.md §2 shows it: offsets "first model / second model" per cell, and
    the first model's largest MSE/Bayes per row."""
    names = [k for k in res if k != "exact"]
    tabs = [table(res[n]["rows"], "offset") for n in names]
    rows = res[names[0]]["rows"]
    print("| Σ | " + " | ".join(f"{s:g}" for s in LEVELS) + f" | MSE/Bayes ({names[0]}, largest of the row ± its standard error) |")
    print("|---" * (len(LEVELS) + 2) + "|")
    for row in tabs[0]:
        cells = [" / ".join(f"{t[row][s]:+.3f}" for t in tabs) if s in tabs[0][row] else "" for s in LEVELS]
        top = max((r for r in rows if r["name"] == row), key=lambda r: r["mse_ratio"])
        print(f"| {row} | " + " | ".join(cells) + f" | {top['mse_ratio']:.3f} ± {top['mse_se']:.3f} |")


def save_offset_table(path, res, limit=0.025):
    """One figure of the whole family: a coloured table per model, rows the families and their parameter,
    columns the noise variance, each cell its offset (red above zero, blue below, full colour at 4 x limit;
    cells beyond +-limit framed in black)."""
    from PIL import Image, ImageDraw, ImageFont

    names = [k for k in res if k != "exact"]
    tabs = [table(res[n]["rows"], "offset") for n in names]
    rows = list(tabs[0])
    cw, ch, left, top, gap = 52, 18, 130, 46, 24
    width = left + len(names) * (len(LEVELS) * cw + gap)
    img = Image.new("RGB", (width, top + len(rows) * ch + 30), "white")
    draw, font = ImageDraw.Draw(img), ImageFont.load_default()
    draw.text((4, 4), f"Gaussian field 16x16: (E_model - E_exact)/d in nats per cell; framed: beyond +-{limit}", fill="black", font=font)
    for p, (name, t) in enumerate(zip(names, tabs)):
        x0 = left + p * (len(LEVELS) * cw + gap)
        draw.text((x0, 18), name, fill="black", font=font)
        for j, s in enumerate(LEVELS):
            draw.text((x0 + j * cw + 4, top - 14), f"{s:g}", fill="black", font=font)
        for i, row in enumerate(rows):
            if p == 0:
                draw.text((4, top + i * ch + 3), row, fill="black", font=font)
            for j, s in enumerate(LEVELS):
                if s not in t[row]:
                    continue
                v = t[row][s]
                a = min(1.0, abs(v) / (4 * limit))
                fill = (255, int(255 * (1 - a)), int(255 * (1 - a))) if v > 0 else (int(255 * (1 - a)), int(255 * (1 - a)), 255)
                box = [x0 + j * cw, top + i * ch, x0 + (j + 1) * cw - 2, top + (i + 1) * ch - 2]
                draw.rectangle(box, fill=fill, outline="black" if abs(v) > limit else None, width=2)
                draw.text((box[0] + 4, box[1] + 3), f"{v:+.3f}", fill="white" if a > 0.6 else "black", font=font)
    draw.text((4, top + len(rows) * ch + 10), "columns: noise variance (isotropic sigma^2, observed sigma^2 of masks, "
              "sigma_n^2 of blur/SR)", fill="black", font=font)
    img.save(path)
    return path


def plot(res, path):
    names = [k for k in res if k != "exact"]
    p1 = save_offset_table(path, res)
    xs = [math.log10(s) for s in FINE_NOISES]
    p2 = data.save_line_plot(os.path.join(os.path.dirname(path), "normalization_blind.png"),
                             [(n, xs, res[n]["blind"][0]) for n in names + ["exact"]],
                             title="blind noise: true sigma 0.1, box 8, 8 images",
                             xlabel="log10 candidate noise std", ylabel="energy - min (nats)")
    return p1, p2


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Offset of the learned energy across noise levels (Gaussian field).")
    p.add_argument("--steps", type=int, default=10_000, help="training steps per model (the time it takes: docs/results.md §2)")
    p.add_argument("--ckpt", nargs="*", default=None, help="measure these checkpoints (NAME=PATH) instead of training")
    p.add_argument("--out", default="runs/normalization", help="run directories")
    p.add_argument("--plot", default="docs/normalization_offsets.png", help="figure")
    p.add_argument("--images", type=int, default=512,
                   help="held-out images per cell (the MSE/Bayes ratio's standard error falls as 1/sqrt of it)")
    p.add_argument("--restart", action="store_true", help="set aside earlier runs in --out (train.py --restart)")
    p.add_argument("--one-at-a-time", action="store_true",
                   help="train dual, then DSM-only, each on every core (default: side by side, each on half of them)")
    p.add_argument("--extra", default="--spectral-noise-max 1e3 --ema 0.999 --anchor spectral --p-random 0.33 "
                                      "--dsm-weight edm-pixel --p-hole 0.25",
                   help="more train.py flags, for both models (quoted; default: blur/SR noise up to 1e3, an EMA over "
                        "~1000 steps, the spectral anchor, a third of the masks random, A-DSM weighted in the pixel "
                        "basis, a quarter of the masks drawn like inpainting; docs/results.md §2)")
    a = p.parse_args()
    if a.ckpt:
        models = {c.split("=")[0]: nets.load_energy(c.split("=", 1)[1]) for c in a.ckpt}
    else:
        extra = a.extra.split() + (["--restart"] if a.restart else [])
        models = train_pair(a.out, a.steps, extra, side_by_side=not a.one_at_a_time)
    res = measure(models, n=a.images)
    print_report(res)
    print_markdown(res)
    print("plots:", *plot(res, a.plot))
