"""
Posterior entropy, the information a measurement brings, and choosing the measurement that tells most
(docs/results.md §6, docs/method.md §6). Only a normalized density has these numbers.

    H[x | y]   = E_{x ~ p(x|y)} [-log p(x | y)]     posterior samples scored by Bayes' rule (aebm.posterior_entropy)
    H[x]       = E_x [-log p(x)]                    the NLL of held-out images
    I(x; y)    = H[x] - E_y H[x | y]                from the two entropies above, or, with no sampler at all,
               = E_y [-log p(y)] - H[y | x]         the normalized evidence of observations (aebm.information)

On the Gaussian field every one is closed-form: the posterior is Gaussian with covariance
C - C A^T (A C A^T + sigma_n^2 I)^{-1} A C whatever y is, so H[x | y] = 1/2 log det(2 pi e C_post) and
I = 1/2 log det(I + A C A^T / sigma_n^2). They are computed here from dense matrices (A applied to every
pixel basis image), independently of the energies, the samplers and the denoising form of M2.

    python -m experiments.information --ckpt runs/normalization/dual/ckpt.pt        # the table (field 16x16)
    python -m experiments.information --design --ckpt runs/normalization/dual/ckpt.pt --leaves runs/hour/ckpt.pt

--design ranks measurements of equal cost by the information the model expects from them, in dim light
on a sensor whose every read adds the same noise: how far to open the aperture (more light, more
defocus blur) and how many pixels to bin into one read (more light per read, fewer reads). On the
field against the exact information; on dead leaves against the posterior-mean PSNR of restoring with
each.
"""

import argparse
import math
import time

import torch

import aebm
import covariances as cv
import data
import nets
import sample

SIZE = 16  # the field's side: dense d x d matrices (d = 256) give the exact answers


def field_tasks(shape, seed=0):
    """(name, Degradation) at batch 1 in float64: inpainting, blur and SR (in the fft basis the field's
    prior and the 16x16 model's spectral Sigma are diagonal in), and denoising."""
    B, C, H, W = shape
    f64 = torch.float64
    inpaint = lambda missing: cv.inpainting_problem(missing, C, 0.01, f64)
    return [("box 1/4 missing", inpaint(cv.box_mask(shape, H // 2))),
            ("half missing", inpaint(cv.half_mask(shape, H // 2))),
            ("random 50% missing", inpaint(cv.random_mask(shape, 0.5, torch.Generator().manual_seed(seed)))),
            ("blur b=1", cv.blur_problem(shape, 1.0, 0.02, "fft", f64)),
            ("blur b=2", cv.blur_problem(shape, 2.0, 0.02, "fft", f64)),
            ("SR x2", cv.sr_problem(shape, 2, 0.02, "fft", f64)),
            ("SR x4", cv.sr_problem(shape, 4, 0.02, "fft", f64)),
            ("denoise 0.05", cv.denoising_problem(shape, 0.05, f64)),
            ("denoise 0.2", cv.denoising_problem(shape, 0.2, f64))]


def batched(prob, n):
    """The same degradation for a batch of n images."""
    return cv.Degradation(prob.a.expand(n, *prob.a.shape[1:]), prob.basis, prob.sigma_n, prob.s_huge)


# -----------------------------------------------------------------------------
# The closed form (Gaussian prior N(mu, C), dense), independent of everything it checks.

def dense_operator(prob):
    """A as a dense (d, d) float64 matrix: column j is A applied to the j-th pixel basis image."""
    shape = prob.a.shape[1:]
    d = math.prod(shape)
    eye = torch.eye(d, dtype=torch.float64).view(d, *shape)
    return cv.Degradation(prob.a[:1].double().expand(d, *shape), prob.basis, prob.sigma_n).A(eye).view(d, d).T


def exact_entropies(C, prob):
    """{H_x, H_post, I} in nats for y = A x + sigma_n xi, x ~ N(mu, C) (d x d): Gaussian entropies."""
    A, s2 = dense_operator(prob), prob.sigma_n ** 2
    eye = torch.eye(C.shape[0], dtype=torch.float64)
    K = A @ C @ A.T + s2 * eye
    C_post = C - C @ A.T @ torch.linalg.solve(K, A @ C)
    logdet = lambda M: torch.linalg.slogdet(M)[1].item()
    return dict(H_x=0.5 * logdet(2 * math.pi * math.e * C), H_post=0.5 * logdet(2 * math.pi * math.e * C_post),
                I=0.5 * logdet(eye + A @ C @ A.T / s2))


def exact_posterior_samples(C, mean, prob, y_obs, n, generator):
    """n exact draws from N(m, C_post) for one observation y_obs (1, C, H, W): m = mu + C A^T K^{-1} (y - A mu)."""
    A, s2 = dense_operator(prob), prob.sigma_n ** 2
    K = A @ C @ A.T + s2 * torch.eye(C.shape[0], dtype=torch.float64)
    mu = torch.full((C.shape[0],), float(mean), dtype=torch.float64)
    m = mu + C @ A.T @ torch.linalg.solve(K, y_obs.double().flatten() - A @ mu)
    L = torch.linalg.cholesky(C - C @ A.T @ torch.linalg.solve(K, A @ C))
    xi = torch.randn(C.shape[0], n, generator=generator, dtype=torch.float64)
    return (m[:, None] + L @ xi).T.reshape(n, *y_obs.shape[1:])


# -----------------------------------------------------------------------------
# The estimates.

def sampler_draws(energy, prob, y_obs, n, levels, correctors, generator, dtype=None):
    """n posterior samples for one observation with sample.py's reverse diffusion and MALA correctors, in
    `dtype` (default: the energy's); returns (samples float64, y~ and Sigma_y float64, seconds, evaluations)."""
    dtype, mean = dtype or aebm.energy_dtype(energy), aebm.energy_mean(energy)
    y, cov = prob.to_denoising(y_obs.double(), mean)
    cov_n = cv.Covariance(cov.s.expand(n, *cov.s.shape[1:]).to(dtype), cov.basis, check=False)
    t = time.time()
    run = sample.reverse_diffusion(energy, y.to(dtype).expand(n, *y.shape[1:]), cov_n, levels=levels,
                                   corrector="mala", n_corrector=correctors, generator=generator)
    return run.x.double(), y, cov, time.time() - t, run.evaluations


def entropy_of(energy, samples, y, cov, dtype=None):
    """aebm.posterior_entropy in `dtype` (default: the energy's)."""
    dtype = dtype or aebm.energy_dtype(energy)
    return aebm.posterior_entropy(energy, samples.to(dtype), y.to(dtype), cv.Covariance(cov.s.to(dtype), cov.basis))


def nll(energy, x):
    """H[x] estimated by the NLL of held-out images x (nats per image), with its standard error."""
    return aebm.mean_and_error(-aebm.log_prob(energy, x.to(aebm.energy_dtype(energy))))


def entropy_table(models, prior, n_samples=64, n_info=256, levels=150, correctors=2, seed=0, exact_sampler=True):
    """For every field task and every model (name -> energy; 'exact' is the field's own density): H[x | y] of
    one held-out observation from that model's posterior samples (the exact prior also from exact draws),
    I from the evidence of n_info observations, and I = H[x] - H[x | y] from the entropies; the closed form
    beside them. Returns the rows."""
    shape = (1, 1, SIZE, SIZE)
    C = prior.C_dense
    g = torch.Generator().manual_seed(seed)
    x_info = prior.sample(n_info, torch.Generator().manual_seed(seed + 1))  # held-out images for E_y and H[x]
    H_x = {name: nll(energy, x_info) for name, energy in models.items()}
    rows = []
    for name, prob in field_tasks(shape, seed):
        exact = exact_entropies(C, prob)
        x0 = prior.sample(1, torch.Generator().manual_seed(seed + 2))
        y_obs = prob.measure(x0, torch.Generator().manual_seed(seed + 3))
        row = dict(task=name, exact=exact, H_post={}, I_evidence={}, I_entropies={}, seconds={}, evaluations={})
        draws = exact_posterior_samples(C, prior.mean, prob, y_obs, n_samples, g)
        y, cov = prob.to_denoising(y_obs, prior.mean)
        row["H_post"]["exact prior, exact draws"] = entropy_of(prior, draws, y, cov)
        y_info = batched(prob, n_info).measure(x_info, torch.Generator().manual_seed(seed + 4))
        for model, energy in models.items():
            row["I_evidence"][model] = aebm.information(energy, y_info.to(aebm.energy_dtype(energy)),
                                                        batched(prob, n_info), aebm.energy_mean(energy))
            n = n_samples
            if model == "exact" and prob.basis == "pixel" and not (prob.a == 1).all():
                if not exact_sampler:
                    continue
                n = max(8, n_samples // 4)  # the exact prior under a pixel mask is a dense Cholesky per step
            xs, y, cov, secs, nfe = sampler_draws(energy, prob, y_obs, n, levels, correctors, g)
            H = entropy_of(energy, xs, y, cov)
            row["H_post"][f"{model}, sampler"] = H
            row["I_entropies"][model] = (H_x[model][0] - H[0], math.hypot(H_x[model][1], H[1]))
            row["seconds"][model], row["evaluations"][model] = secs, nfe
        rows.append(row)
        print_row(row, flush=True)
    return rows, H_x


def rel(v, ref):
    return 100 * (v - ref) / abs(ref)


def print_row(row, flush=False):
    ex = row["exact"]
    parts = [f"{row['task']:20s} H[x|y] exact {ex['H_post']:8.1f}"]
    parts += [f"{k} {v[0]:8.1f} ± {v[1]:.1f} ({rel(v[0], ex['H_post']):+.1f}%)" for k, v in row["H_post"].items()]
    print(" | ".join(parts), flush=flush)
    parts = [f"{'':20s} I      exact {ex['I']:8.1f}"]
    parts += [f"{k} evidence {v[0]:8.1f} ± {v[1]:.1f} ({rel(v[0], ex['I']):+.1f}%)" for k, v in row["I_evidence"].items()]
    parts += [f"{k} entropies {v[0]:8.1f} ± {v[1]:.1f} ({rel(v[0], ex['I']):+.1f}%)" for k, v in row["I_entropies"].items()]
    print(" | ".join(parts), flush=flush)
    print(f"{'':20s} sampler: " + ", ".join(f"{k} {row['evaluations'][k]} evaluations in {t:.1f} s"
                                          for k, t in row["seconds"].items()), flush=flush)


def print_markdown(rows, H_x, d):
    """The table of docs/results.md §6: nats per image, relative error against the closed form."""
    cell = lambda v, ref: f"{v[0]:.1f} ({rel(v[0], ref):+.1f}%)"
    keys = list(rows[0]["H_post"])
    models = list(rows[0]["I_evidence"])
    print("| task | exact H[x\\|y] | " + " | ".join(f"H[x\\|y]: {k}" for k in keys) + " | exact I (bits/dim) | "
          + " | ".join(f"I from evidence: {m}" for m in models) + " | "
          + " | ".join(f"I from entropies: {m}" for m in models) + " |")
    print("|" + "---|" * (3 + len(keys) + 2 * len(models)))
    for r in rows:
        ex = r["exact"]
        H = [cell(r["H_post"][k], ex["H_post"]) if k in r["H_post"] else "—" for k in keys]
        Ie = [cell(r["I_evidence"][m], ex["I"]) for m in models]
        Is = [cell(r["I_entropies"][m], ex["I"]) if m in r["I_entropies"] else "—" for m in models]
        print(f"| {r['task']} | {ex['H_post']:.1f} | " + " | ".join(H) + f" | {ex['I']:.1f} ({ex['I'] / d / math.log(2):.3f}) | "
              + " | ".join(Ie) + " | " + " | ".join(Is) + " |")
    print("H[x] (nats/image): exact %.1f; " % rows[0]["exact"]["H_x"]
          + "; ".join(f"{m} NLL {v[0]:.1f} ± {v[1]:.1f}" for m, v in H_x.items()))


# -----------------------------------------------------------------------------
# Choosing the measurement.

def design_candidates(shape, basis, sigma0=0.2):
    """Measurements of equal cost in dim light on a read-noise-limited sensor (each read adds noise sigma_0
    to a signal normalised to [0, 1]): (family, parameter, label, Degradation) at batch 1, blur and SR in
    `basis` (the model's spectral one).
    aperture: opening the lens gathers light in proportion to its area and defocuses in proportion to its
      diameter, so blur b comes with noise sigma_0 / (2b)^2 (b = 0.5: sigma_0);
    binning: summing r x r pixels into one read (SR by r) reads r^2 times the light once, noise
      sigma_0 / r^2 on the small image, sigma_0 / r on the kept frequencies of the large one (r = 1: plain denoising)."""
    f64 = torch.float64
    out = [("aperture", b, f"blur b={b:g}, sigma {sigma0 / (2 * b) ** 2:.3g}",
            cv.blur_problem(shape, b, sigma0 / (2 * b) ** 2, basis, f64)) for b in (0.5, 0.75, 1.0, 1.5, 2.0, 3.0)]
    out.append(("binning", 1, f"full resolution, sigma {sigma0:.3g}", cv.denoising_problem(shape, sigma0, f64)))
    out += [("binning", r, f"binned {r}x{r} (SR x{r}), sigma {sigma0 / r:.3g}", cv.sr_problem(shape, r, sigma0 / r, basis, f64))
            for r in (2, 4)]
    return out


def rank_correlation(a, b):
    """Spearman's rank correlation (no ties expected)."""
    ra = torch.tensor(a).argsort().argsort().double()
    rb = torch.tensor(b).argsort().argsort().double()
    return torch.corrcoef(torch.stack([ra, rb]))[0, 1].item()


def design(energy, x, candidates, prior=None, restore=True, seed=0, fitted=None):
    """Every candidate's information I(x; y) expected by the model (aebm.information over the images x: one
    observation each) and, with `prior` (a Gaussian, dense), the exact one; with restore, the posterior-mean
    PSNR of those observations, beside the observation's own and (with `fitted`, a Gaussian fitted to
    training images) the Wiener filter's. Returns the rows in the candidates' order."""
    dtype, mean = aebm.energy_dtype(energy), aebm.energy_mean(energy)
    rows = []
    for family, param, label, prob in candidates:
        probs = batched(prob, x.shape[0])
        y_obs = probs.measure(x.double(), torch.Generator().manual_seed(seed + 5))
        I, err = aebm.information(energy, y_obs.to(dtype), probs, mean)
        row = dict(family=family, param=param, label=label, I=I, err=err)
        if prior is not None:
            row["I_exact"] = exact_entropies(prior.C_dense, prob)["I"]
        if restore:
            y, cov = probs.to_denoising(y_obs, mean)
            x_hat = aebm.posterior_mean(energy, y.to(dtype), cv.Covariance(cov.s.to(dtype), cov.basis)).double()
            row["psnr"] = data.psnr(x_hat.clamp(-1, 2), x.double()).mean().item()
            row["psnr_observed"] = data.psnr(y_obs, x.double()).mean().item()
            if fitted is not None:
                x_w = fitted.posterior_mean(*probs.to_denoising(y_obs, fitted.mean))
                row["psnr_wiener"] = data.psnr(x_w, x.double()).mean().item()
        rows.append(row)
        print(f"{label:28s} I {I:8.1f} ± {err:.1f} nats" + (f"  exact {row['I_exact']:8.1f}" if prior is not None else "")
              + (f"  posterior mean {row['psnr']:.2f} dB" if restore else "")
              + (f", Wiener {row['psnr_wiener']:.2f}" if "psnr_wiener" in row else "")
              + (f", observation {row['psnr_observed']:.2f}" if restore else ""), flush=True)
    return rows


def summarize_design(rows, name):
    """Rank agreement with the exact information (field) and with the restoration's PSNR (any data)."""
    best = max(range(len(rows)), key=lambda i: rows[i]["I"])
    out = dict(top=rows[best]["label"])
    if "I_exact" in rows[0]:
        exact_best = max(range(len(rows)), key=lambda i: rows[i]["I_exact"])
        out.update(rank_exact=rank_correlation([r["I"] for r in rows], [r["I_exact"] for r in rows]),
                   top_is_exact=best == exact_best, exact_top=rows[exact_best]["label"])
    if "psnr" in rows[0]:
        psnr_best = max(range(len(rows)), key=lambda i: rows[i]["psnr"])
        out.update(rank_psnr=rank_correlation([r["I"] for r in rows], [r["psnr"] for r in rows]),
                   top_is_best_psnr=best == psnr_best, psnr_top=rows[psnr_best]["label"])
    print(f"{name}: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in out.items()))
    return out


def plot_design(path, panels_rows):
    """One figure: for each family, information per dimension (bits) against its parameter, one curve per
    (data, model) entry; panels_rows: {label: (rows, d)}."""
    panels = []
    for family, xlabel in (("aperture", "blur width b (noise sigma_0 / (2b)^2)"), ("binning", "r x r pixels per read (noise sigma_0 / r)")):
        curves = []
        for label, (rows, d) in panels_rows.items():
            sel = [r for r in rows if r["family"] == family]
            curves.append((label, [r["param"] for r in sel], [r["I"] / d / math.log(2) for r in sel]))
            if "I_exact" in sel[0]:
                curves.append((label.split(",")[0] + ", exact", [r["param"] for r in sel], [r["I_exact"] / d / math.log(2) for r in sel]))
        panels.append(data.save_line_plot(path + f".{family}.png", curves, title=f"{family}: information at equal photons",
                                          xlabel=xlabel, ylabel="I(x; y), bits/dim"))
    return data.save_panels(path, panels)


def main(argv=None):
    p = argparse.ArgumentParser(description="Posterior entropy, information and measurement design.")
    p.add_argument("--ckpt", default="runs/normalization/dual/ckpt.pt",
                   help="a model of the 16x16x1 Gaussian field (python -m experiments.normalization trains it)")
    p.add_argument("--samples", type=int, default=64, help="posterior samples per observation")
    p.add_argument("--info", type=int, default=256, help="observations for the evidence's expectation over y")
    p.add_argument("--levels", type=int, default=150, help="reverse-diffusion levels of the sampler")
    p.add_argument("--correctors", type=int, default=2, help="MALA steps per level")
    p.add_argument("--no-exact-sampler", action="store_true",
                   help="skip the exact prior's sampler under masks (a dense Cholesky per step: it draws a quarter of "
                        "--samples there)")
    p.add_argument("--design", action="store_true", help="rank measurements of equal cost instead of the table")
    p.add_argument("--leaves", default=None, help="--design: a dead-leaves model (e.g. the hour preset's) to rank and restore with")
    p.add_argument("--images", type=int, default=64, help="--design: held-out images per candidate")
    p.add_argument("--plot", default="docs/information_design.png", help="--design's figure")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    prior = data.GaussianField(SIZE, 1).prior
    energy = nets.load_energy(a.ckpt)[0]
    if not a.design:
        rows, H_x = entropy_table({"exact": prior, "learned": energy}, prior, a.samples, a.info, a.levels,
                                  a.correctors, a.seed, not a.no_exact_sampler)
        print_markdown(rows, H_x, SIZE * SIZE)
        return rows
    x = prior.sample(a.images, torch.Generator().manual_seed(a.seed + 1))
    out = {}
    for name, e in (("field, exact prior", prior), ("field, learned", energy)):
        rows = design(e, x, design_candidates(x.shape, "fft"), prior=prior, restore=False, seed=a.seed)
        out[name] = summarize_design(rows, name)
    panels = {"field, learned": (rows, x[0].numel())}  # its rows carry the exact I too, drawn as "field, exact"
    if a.leaves:
        leaves, config = nets.load_energy(a.leaves)[:2]
        xl = data.dataset_for(config, "test").get_batch(a.images, torch.Generator().manual_seed(a.seed + 2))
        train_images = data.dataset_for(config, "train").get_batch(512, torch.Generator().manual_seed(a.seed + 3))
        fitted = aebm.fit_gaussian(train_images.double(), config["spectral_basis"])  # the classical answer
        rows = design(leaves, xl, design_candidates(xl.shape, config["spectral_basis"]), seed=a.seed, fitted=fitted)
        out["leaves"] = summarize_design(rows, "leaves")
        panels["leaves, learned"] = (rows, xl[0].numel())
    plot_design(a.plot, panels)
    print(f"figure: {a.plot}")
    return out


if __name__ == "__main__":
    main()
