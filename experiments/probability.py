"""
Images ranked by probability (docs/results.md §7): what a normalized density lets a learner look at.

For any checkpoint and the held-out images of its dataset, log p(x) = -E(x, s_min I) (M10) in bits/dim:
  - its histogram, and grids of the most and the least probable images;
  - its correlation with a measure of complexity that needs no model: the size of the image losslessly
    compressed (8-bit PNG at pillow's strongest setting), in bits/dim;
  - for one observation, posterior samples sorted by their log posterior (Bayes' rule, M10) beside the truth;
  - on the built-in Gaussian field, the exact log p beside the learned one: their correlation and mean
    difference.

    python -m experiments.probability --ckpt runs/hour/ckpt.pt                    # dead leaves (hour preset)
    python -m experiments.probability --ckpt runs/normalization/dual/ckpt.pt      # Gaussian field, exact beside

Figures go to --out (default docs/probability_<dataset>_*.png): _histogram, _ranked (most probable row,
least probable row), _png (log p against compressed size), _posterior (truth and observation, then
samples from most to least probable), and on the field _exact (learned against exact log p).
"""

import argparse
import io
import math

import torch
from PIL import Image

import aebm
import covariances as cv
import data
import nets
import sample


def bits_per_dim(energy, x, batch=64):
    """Bits/dim of images x under an energy (M10), in float64, in batches."""
    d = x[0].numel()
    basis = "fft" if isinstance(energy, aebm.GaussianEnergy) else "pixel"  # s I: the cheapest exact path
    dtype = aebm.energy_dtype(energy)
    out = [aebm.bits_per_dim(-aebm.log_prob(energy, x[i : i + batch].to(dtype), basis=basis).double(), d)
           for i in range(0, x.shape[0], batch)]
    return torch.cat(out)


def png_bits_per_dim(x):
    """Lossless PNG size of each 8-bit image (values clipped to [0, 1]) in bits per dimension: a model-free
    measure of how much structure an image has."""
    out = []
    for img in x:
        arr = (img.detach().double().clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(1, 2, 0).numpy()
        buf = io.BytesIO()
        Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(buf, format="PNG", optimize=True)
        out.append(8 * buf.tell() / img.numel())
    return torch.tensor(out, dtype=torch.float64)


def pearson(a, b):
    """Pearson's correlation; nan when either is constant (tiny images all compress to one PNG size)."""
    return torch.corrcoef(torch.stack([a.double(), b.double()]))[0, 1].item()


def save_enlarged_grid(path, rows, zoom=3):
    """data.save_grid, enlarged zoom times (nearest neighbour: pixels stay pixels)."""
    data.save_grid(path, rows)
    img = Image.open(path)
    img.resize((img.width * zoom, img.height * zoom), Image.NEAREST).save(path)
    return path


def spearman(a, b):
    return pearson(a.argsort().argsort().double(), b.argsort().argsort().double())


def histogram(v, bins=20):
    """(bin centres, counts) of the values v."""
    lo, hi = v.min().item(), v.max().item()
    counts = torch.histc(v.double(), bins=bins, min=lo, max=hi)
    width = (hi - lo) / bins
    return [lo + width * (i + 0.5) for i in range(bins)], counts.tolist()


def sorted_posterior_samples(energy, x, prob, n=8, levels=150, seed=0):
    """n posterior samples of one observation of x (1, C, H, W) under degradation `prob` (MALA), sorted from
    the most to the least probable by log p(sample | y) (aebm.log_posterior); returns (observation, samples,
    their log posterior in nats)."""
    g = torch.Generator().manual_seed(seed)
    dtype, mean = aebm.energy_dtype(energy), aebm.energy_mean(energy)
    y_obs = prob.measure(x.double(), g)
    y, cov = prob.to_denoising(y_obs, mean)
    y, cov = y.to(dtype), cv.Covariance(cov.s.to(dtype), cov.basis)
    y_n, cov_n = y.expand(n, *y.shape[1:]), cv.Covariance(cov.s.expand(n, *cov.s.shape[1:]), cov.basis)
    xs = sample.reverse_diffusion(energy, y_n, cov_n, levels=levels, corrector="mala", generator=g).x
    with torch.no_grad():
        lp = aebm.log_posterior(energy, xs, y_n, cov_n).double()
    order = lp.argsort(descending=True)
    return y_obs, xs[order], lp[order]


def analyse(energy, x, out, exact=None, prob=None, k=8, seed=0):
    """Every analysis of the module docstring for images x; writes the figures under the prefix `out` and
    returns the numbers."""
    bpd = bits_per_dim(energy, x)
    png = png_bits_per_dim(x)
    res = dict(n=x.shape[0], mean_bpd=bpd.mean().item(), std_bpd=bpd.std().item(),
               png_pearson=pearson(bpd, png), png_spearman=spearman(bpd, png))
    curves = [("learned", *histogram(bpd))]
    if exact is not None:
        bpd_exact = bits_per_dim(exact, x)
        res.update(exact_pearson=pearson(bpd, bpd_exact), exact_spearman=spearman(bpd, bpd_exact),
                   mean_difference=(bpd - bpd_exact).mean().item(), exact_png_pearson=pearson(bpd_exact, png))
        curves.append(("exact", *histogram(bpd_exact)))
        data.save_scatter_plot(out + "_exact.png", [("images", bpd_exact.tolist(), bpd.tolist(), "o")],
                               title="log p of held-out images: learned against exact", xlabel="exact bits/dim",
                               ylabel="learned bits/dim")
    data.save_line_plot(out + "_histogram.png", curves, title=f"bits/dim of {x.shape[0]} held-out images",
                        xlabel="bits/dim", ylabel="images")
    if png.std() > 0:  # images too small for PNG to compress all come out at one size
        data.save_scatter_plot(out + "_png.png", [("images", png.tolist(), bpd.tolist(), "o")],
                               title="probability against compressed size", xlabel="PNG bits/dim",
                               ylabel="bits/dim under the model")
    order = bpd.argsort()
    show = lambda t: t.float().clamp(0, 1)
    save_enlarged_grid(out + "_ranked.png", [show(x[order[:k]]), show(x[order.flip(0)[:k]])])
    res.update(most=bpd[order[:k]].tolist(), least=bpd[order.flip(0)[:k]].tolist())
    if prob is not None:
        x0 = x[order[x.shape[0] // 2]][None]  # an image of median probability
        y_obs, xs, lp = sorted_posterior_samples(energy, x0, prob, seed=seed)
        save_enlarged_grid(out + "_posterior.png", [show(torch.cat([x0, y_obs.to(x0.dtype)])), show(xs)])
        res.update(posterior_log_p=lp.tolist())
    return res


def report(res):
    print(f"{res['n']} held-out images: {res['mean_bpd']:.3f} ± {res['std_bpd']:.3f} bits/dim; most probable "
          + " ".join(f"{v:.2f}" for v in res["most"]) + "; least probable " + " ".join(f"{v:.2f}" for v in res["least"]))
    if math.isnan(res["png_pearson"]):
        print("against PNG size: every image compresses to the same size (too small for PNG to tell them apart)")
    else:
        print(f"against PNG size: Pearson {res['png_pearson']:.3f}, Spearman {res['png_spearman']:.3f}")
    if "exact_pearson" in res:
        print(f"against the exact log p: Pearson {res['exact_pearson']:.3f}, Spearman {res['exact_spearman']:.3f}, "
              f"mean difference {res['mean_difference']:+.4f} bits/dim")
    if "posterior_log_p" in res:
        print("posterior samples, log p(x | y) in nats, most to least probable: "
              + " ".join(f"{v:.1f}" for v in res["posterior_log_p"]))


def main(argv=None):
    p = argparse.ArgumentParser(description="Held-out images ranked by their probability under a checkpoint.")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--n", type=int, default=512, help="held-out images")
    p.add_argument("--out", default=None, help="figure prefix (default docs/probability_<dataset>)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    energy, config = nets.load_energy(a.ckpt)[:2]
    ds = data.dataset_for(config, "test")
    x = ds.get_batch(a.n, torch.Generator().manual_seed(80_000 + a.seed)).double()
    exact = getattr(ds, "prior", None)  # the Gaussian field's exact density
    shape = (1, *x.shape[1:])
    prob = cv.blur_problem(shape, 1.5, 0.05, config["spectral_basis"], torch.float64)
    res = analyse(energy, x, a.out or f"docs/probability_{config['dataset']}", exact, prob, seed=a.seed)
    report(res)
    return res


if __name__ == "__main__":
    main()
