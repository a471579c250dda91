"""
The energy-guided schedule (M13) against the geometric one, by number of measurements (docs/results.md §8).

Random-pixel inpainting with a fraction rho of the pixels observed (noise 0.01), from few measurements
to many, on the Gaussian field where the exact posterior is known: for each rho and each schedule, at
the same number of energy evaluations (NFE),
  - a posterior sample's squared error over the Bayes error (the exact posterior mean's): 2 for exact
    samples (posterior variance plus the mean's error, whose expectation is the same variance);
  - the average of k samples' error over Bayes: 1 + 1/k for exact samples;
and beside them the learned model's one-shot posterior mean (M4) and the Wiener filter of a Gaussian
fitted to training images (the classical answer; on the field, nearly the exact posterior mean). On
any other dataset (dead leaves) the same quantities as PSNR.

    python -m experiments.schedules --ckpt runs/normalization/dual/ckpt.pt --images 8   # 16x16 field
    python -m experiments.schedules --ckpt runs/hour/ckpt.pt --images 4 --plot docs/schedules_leaves.png   # dead leaves: PSNR

Equal NFE: the geometric path takes L levels with one ULA corrector each (1 + 2L evaluations); the
adaptive one needs dE/dlog s of the corrected state, one more evaluation per level, so it takes
2L/3 levels (1 + 3 * 2L/3): the same budget.
"""

import argparse

import torch

import aebm
import covariances as cv
import data
import nets
import sample

RHOS = [0.05, 0.1, 0.25, 0.5, 0.75]  # fraction of pixels observed


def levels_at_equal_nfe(levels_geometric):
    """(geometric levels, adaptive levels, NFE): 1 + 2 L = 1 + 3 L' (one ULA corrector per level)."""
    nfe = 1 + 2 * levels_geometric
    if (nfe - 1) % 3:
        raise ValueError(f"choose geometric levels divisible by 3 (got {levels_geometric}) so both NFE match")
    return levels_geometric, (nfe - 1) // 3, nfe


def observe(x, rho, sigma=0.01, seed=0):
    """Each image of x on its own random mask with a fraction rho observed, noise sigma: (generator, the
    degradation, y_obs). The generator goes on to drive the samplers."""
    g = torch.Generator().manual_seed(seed)
    missing = cv.random_mask(x.shape, 1 - rho, g)
    prob = cv.inpainting_problem(missing, x.shape[1], sigma, torch.float64)
    return g, prob, prob.measure(x.double(), g)


def compare(energy, prior, fitted, x, rho, levels=150, k=4, sigma=0.01, seed=0):
    """One row: errors over Bayes for both schedules at equal NFE, the one-shot posterior mean, the fitted
    Wiener filter and the observation itself (missing pixels at the data mean), for images x (n, C, H, W)
    each observed on its own random mask. prior None (no exact posterior): mean squared errors instead of
    ratios (`psnr` turns them into PSNR)."""
    g, prob, y_obs = observe(x, rho, sigma, seed)
    n = x.shape[0]
    dtype, mean = aebm.energy_dtype(energy), aebm.energy_mean(energy)
    y, cov = prob.to_denoising(y_obs, mean)
    mse = lambda a: (a.double() - x.double()).square().flatten(1).mean(1)  # per image
    if prior is not None:  # errors over Bayes
        bayes = mse(prior.posterior_mean(*prob.to_denoising(y_obs, prior.mean)))
    else:  # no exact posterior (dead leaves): PSNR, written through the same ratio, 10 log10(1 / MSE)
        bayes = torch.ones(n, dtype=torch.float64)
    row = dict(rho=rho, bayes=bayes.mean().item())
    row["mean"] = (mse(aebm.posterior_mean(energy, y.to(dtype), cv.Covariance(cov.s.to(dtype), cov.basis))) / bayes).mean().item()
    row["wiener"] = (mse(fitted.posterior_mean(*prob.to_denoising(y_obs, fitted.mean))) / bayes).mean().item()
    row["observed"] = (mse(y) / bayes).mean().item()
    L_geo, L_ada, nfe = levels_at_equal_nfe(levels)
    y_k = y.to(dtype).repeat_interleave(k, 0)  # k samples per image, in one batch
    cov_k = cv.Covariance(cov.s.to(dtype).repeat_interleave(k, 0), cov.basis)
    for name, schedule, L in (("geometric", "geometric", L_geo), ("adaptive", "adaptive", L_ada)):
        run = sample.reverse_diffusion(energy, y_k, cov_k, levels=L, corrector="ula", schedule=schedule, generator=g)
        assert run.evaluations == nfe, (name, run.evaluations, nfe)
        xs = run.x.double().view(n, k, *x.shape[1:])
        row[f"{name}_sample"] = (mse(xs[:, 0]) / bayes).mean().item()
        row[f"{name}_average"] = (mse(xs.mean(1)) / bayes).mean().item()
    row["nfe"] = nfe
    return row


def psnr(mse):
    return -10 * torch.log10(torch.tensor(mse)).item()


def run(energy, prior, fitted, x, levels=150, k=4, seed=0):
    rows = []
    for rho in RHOS:
        r = compare(energy, prior, fitted, x, rho, levels, k, seed=seed)
        rows.append(r)
        if prior is None:
            print(f"{rho:4.0%} observed, PSNR: one sample geometric {psnr(r['geometric_sample']):.2f} adaptive "
                  f"{psnr(r['adaptive_sample']):.2f} | mean of {k}: geometric {psnr(r['geometric_average']):.2f} "
                  f"adaptive {psnr(r['adaptive_average']):.2f} | one-shot mean {psnr(r['mean']):.2f} | fitted Wiener "
                  f"{psnr(r['wiener']):.2f} | observation {psnr(r['observed']):.2f} dB | NFE {r['nfe']}", flush=True)
            continue
        print(f"{rho:4.0%} observed: Bayes MSE {r['bayes']:.2e} | one sample / Bayes: geometric {r['geometric_sample']:.2f} "
              f"adaptive {r['adaptive_sample']:.2f} (exact 2) | mean of {k}: geometric {r['geometric_average']:.2f} "
              f"adaptive {r['adaptive_average']:.2f} (exact {1 + 1 / k:.2f}) | one-shot mean {r['mean']:.3f} | "
              f"fitted Wiener {r['wiener']:.3f} | observation {r['observed']:.2f} | NFE {r['nfe']}", flush=True)
    return rows


def plot(path, rows, k, as_psnr=False):
    rho = [100 * r["rho"] for r in rows]
    f = psnr if as_psnr else (lambda v: v)
    keys = [("geometric_sample", "geometric, one sample"), ("adaptive_sample", "adaptive, one sample"),
            ("geometric_average", f"geometric, mean of {k}"), ("adaptive_average", f"adaptive, mean of {k}"),
            ("mean", "one-shot posterior mean"), ("wiener", "fitted Wiener")]
    curves = [(label, rho, [f(r[key]) for r in rows]) for key, label in keys]
    title = ("dead leaves: random-pixel inpainting at equal NFE" if as_psnr else
             "field: random-pixel inpainting at equal NFE (exact samples: 2 and 1 + 1/k)")
    return data.save_line_plot(path, curves, title=title, xlabel="pixels observed (%)",
                               ylabel="PSNR (dB)" if as_psnr else "MSE / Bayes MSE")


def main(argv=None):
    p = argparse.ArgumentParser(description="Adaptive (M13) against geometric schedules by number of measurements.")
    p.add_argument("--ckpt", default="runs/normalization/dual/ckpt.pt", help="a Gaussian-field model")
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--samples", type=int, default=4, help="samples per observation (k)")
    p.add_argument("--levels", type=int, default=150, help="geometric levels (the adaptive path gets 2/3 of them)")
    p.add_argument("--plot", default="docs/schedules_by_measurements.png")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    energy, config = nets.load_energy(a.ckpt)[:2]
    ds = data.dataset_for(config, "test")
    prior = getattr(ds, "prior", None)  # the Gaussian field's exact density; otherwise PSNR
    train_ds = data.dataset_for(config, "train")
    fitted = aebm.fit_gaussian(train_ds.get_batch(512, torch.Generator().manual_seed(1)).double(), config["spectral_basis"])
    x = ds.get_batch(a.images, torch.Generator().manual_seed(90_000 + a.seed)).double()
    rows = run(energy, prior, fitted, x, a.levels, a.samples, a.seed)
    print("figure:", plot(a.plot, rows, a.samples, as_psnr=prior is None))
    return rows


if __name__ == "__main__":
    main()
