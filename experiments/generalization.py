"""
Strong generalization (docs/results.md §7): do two models trained on different images learn the same density?

The isotropic paper's most stringent check that a learned density is the data's and not the training set's:
train two models on disjoint sets of N images each and compare the log-probabilities they give to new
images. A model that memorises its N images puts its probability on them, so the two disagree on
everything else and each prefers its own training images; a model that generalises learns p(x) itself,
so the two agree whatever images they saw. For each N this script reports, on held-out images:

  - the mean |log p_1(x) - log p_2(x)| in bits/dim between the pair, and its correlation;
  - each model's distance to the exact log p (the Gaussian field's M9 energy): the third reference;
  - the memorisation gap: bits/dim of held-out images minus bits/dim of the model's own training images
    (zero for a density that generalises, up to the sampling error of the two means; the exact density's
    own gap on the same images is printed beside it as that reference).

    python -m experiments.generalization                  # 16x16 Gaussian field, N = 1 ... 1000 and fresh draws

Every model is train.py's real loop (--train-images N --subset 0 or 1, seeds 0 and 1, so that the two of a
pair share nothing: neither images, nor initialisation, nor noise), with the paper's losses restricted to
isotropic covariances (--p-iso 1): log p(x) is an isotropic quantity, and the isotropic paper's test is on
isotropic models. "fresh" is the pair trained without --train-images: a new image at every draw. Models
already trained in --runs to --steps are measured, not retrained. Figure: docs/generalization.png.
"""

import argparse
import math
import os

import torch
import data
import nets
import train
from experiments.probability import bits_per_dim, pearson

SIZES = [1, 10, 100, 1000, 0]  # 0: fresh draws, no finite set (the right end of the figure)


def run_dir(runs, n, subset):
    return os.path.join(runs, f"n{n}_{subset}" if n else f"fresh_{subset}")


def train_model(out, n, subset, steps, dataset="gaussian", size=16, batch=16, extra=()):
    """One model of a pair with train.py: set `subset` of n images (n = 0: fresh draws), seed = subset."""
    finite = ["--train-images", str(n), "--subset", str(subset)] if n else []
    train.main(["--dataset", dataset, "--img-size", str(size), "--channels", "1", "--config", "small",
                "--batch", str(batch), "--steps", str(steps), "--lr", "1e-3", "--lam", "1", "--seed", str(subset),
                "--out", out, "--restart", "--device", "cpu", "--eval-every", str(10 * steps),
                "--log-every", str(max(1, steps // 5)), "--val-batch", "4", *train.PAPER_LOSSES, "--p-iso", "1",
                *finite, *extra])


def trained(path, steps):
    """The checkpoint at path if it holds a run of `steps` steps, else None."""
    if not os.path.exists(path):
        return None
    return path if nets.load_checkpoint(path)["step"] == steps else None


def train_pairs(runs, sizes, steps, **kw):
    """Every model of every pair that --runs does not already hold; returns {n: (ckpt_0, ckpt_1)}."""
    out = {}
    for n in sizes:
        paths = []
        for subset in (0, 1):
            d = run_dir(runs, n, subset)
            if trained(os.path.join(d, "ckpt.pt"), steps) is None:
                train_model(d, n, subset, steps, **kw)
            paths.append(os.path.join(d, "ckpt.pt"))
        out[n] = tuple(paths)
    return out


def own_images(config, limit):
    """Up to `limit` of the images a model was trained on, found again from its checkpoint's config."""
    return data.dataset_for(config, "train").images[:limit]


def disjoint(config_a, config_b):
    """True when two finite training sets share no image: different positions in the pool, and no two
    images equal (the second check does not trust the first)."""
    a, b = data.dataset_for(config_a, "train"), data.dataset_for(config_b, "train")
    if set(a.ids.tolist()) & set(b.ids.tolist()):
        return False
    xa, xb = a.images.flatten(1).double(), b.images.flatten(1).double()
    return bool(torch.cdist(xa, xb, compute_mode="donot_use_mm_for_euclid_dist").min() > 0)  # exact differences


def compare_pair(models, held_out, exact=None, own=256):
    """The measurements of one pair (see the module's docstring), in bits/dim. models: two (energy, config)
    as nets.load_energy gives them; the configs say which images each was trained on."""
    (e0, c0), (e1, c1) = models
    b0, b1 = bits_per_dim(e0, held_out), bits_per_dim(e1, held_out)
    row = dict(n=c0.get("train_images", 0), abs_diff=(b0 - b1).abs().mean().item(), corr=pearson(b0, b1),
               nll=(0.5 * (b0 + b1)).mean().item())
    if exact is not None:
        be = bits_per_dim(exact, held_out)
        row.update(exact_nll=be.mean().item(), to_exact=0.5 * ((b0 - be).abs().mean() + (b1 - be).abs().mean()).item(),
                   corr_exact=0.5 * (pearson(b0, be) + pearson(b1, be)))
    if row["n"]:
        gaps, exact_gaps = [], []
        for energy, config in ((e0, c0), (e1, c1)):
            x = own_images(config, own)
            gaps.append(bits_per_dim(energy, held_out).mean().item() - bits_per_dim(energy, x).mean().item())
            if exact is not None:
                exact_gaps.append(bits_per_dim(exact, held_out).mean().item() - bits_per_dim(exact, x).mean().item())
        row.update(gap=sum(gaps) / 2, gap_0=gaps[0], gap_1=gaps[1], disjoint=disjoint(c0, c1))
        if exact is not None:
            row["exact_gap"] = sum(exact_gaps) / 2
    return row


def print_table(rows):
    print("| N per model | mean abs(log p1 - log p2), bits/dim | correlation | held-out NLL (exact) | to exact, bits/dim "
          "| memorisation gap: model (exact) | sets disjoint |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        n = str(r["n"]) if r["n"] else "fresh draws"
        exact = f" ({r['exact_nll']:.3f})" if "exact_nll" in r else ""
        gap = f"{r['gap']:+.3f} ({r['exact_gap']:+.3f})" if "gap" in r and "exact_gap" in r else f"{r.get('gap', float('nan')):+.3f}"
        print(f"| {n} | {r['abs_diff']:.4f} | {r['corr']:.3f} | {r['nll']:.3f}{exact} | {r.get('to_exact', float('nan')):.4f} "
              f"| {gap if r['n'] else '—'} | {r.get('disjoint', '—')} |")


def plot(path, rows):
    """Two panels against log10 N (fresh draws at the right end): the pair's disagreement and each one's
    distance to the exact log p (log10 bits/dim), and the memorisation gap."""
    finite = [r for r in rows if r["n"]]
    right = math.log10(max(r["n"] for r in finite)) + 1 if finite else 0.0
    xs = [math.log10(r["n"]) if r["n"] else right for r in rows]
    lg = lambda v: math.log10(max(v, 1e-4))
    curves = [("model 1 vs model 2", xs, [lg(r["abs_diff"]) for r in rows])]
    if "to_exact" in rows[0]:
        curves.append(("models vs exact", xs, [lg(r["to_exact"]) for r in rows]))
    panels = [data.save_line_plot(path + ".a.png", curves, title="held-out images: mean |delta log p|",
                                  xlabel=f"log10 N per model (at {right:g}: fresh draws)", ylabel="log10 bits/dim")]
    if finite:
        gx = [math.log10(r["n"]) for r in finite]
        gaps = [("model 1", gx, [r["gap_0"] for r in finite]), ("model 2", gx, [r["gap_1"] for r in finite])]
        if "exact_gap" in finite[0]:
            gaps.append(("exact density", gx, [r["exact_gap"] for r in finite]))
        panels.append(data.save_line_plot(path + ".b.png", gaps, title="memorisation: held-out minus own training images",
                                          xlabel="log10 N per model", ylabel="bits/dim"))
    return data.save_panels(path, panels)


def main(argv=None):
    p = argparse.ArgumentParser(description="Strong generalization: pairs of models on disjoint training sets.")
    p.add_argument("--runs", default="runs/generalization", help="where the pairs are trained (and found again)")
    p.add_argument("--sizes", type=int, nargs="+", default=SIZES, help="training images per model; 0: fresh draws")
    p.add_argument("--steps", type=int, default=1500, help="training steps of every model")
    p.add_argument("--dataset", default="gaussian", choices=data.BUILTIN)
    p.add_argument("--img-size", type=int, default=16)
    p.add_argument("--images", type=int, default=256, help="held-out images")
    p.add_argument("--plot", default="docs/generalization.png")
    a = p.parse_args(argv)
    pairs = train_pairs(a.runs, a.sizes, a.steps, dataset=a.dataset, size=a.img_size)
    test = data.load_dataset(a.dataset, a.img_size, 1, split="test")
    held_out = test.get_batch(a.images, torch.Generator().manual_seed(4242))
    exact = test.prior if a.dataset == "gaussian" else None
    rows = [compare_pair([nets.load_energy(path) for path in pairs[n]], held_out, exact) for n in a.sizes]
    print_table(rows)
    print(f"figure: {plot(a.plot, rows)}")
    return rows


if __name__ == "__main__":
    main()
