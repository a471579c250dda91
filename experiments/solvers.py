"""
Every solver on the same energy, scored against the exact posterior (the paper's Table 1 and Fig. 4).

    python -m experiments.solvers --dataset gaussian --prior exact           # only the algorithms differ
    python -m experiments.solvers --dataset gaussian --ckpt runs/g/ckpt.pt   # a model learned on the field
    python -m experiments.solvers --ckpt runs/quick/ckpt.pt                  # dead leaves: against the truth
    python -m experiments.solvers --tune                                     # the peers' step-size grid

Solvers: the Wiener filter of a Gaussian prior fitted to training images (the classical answer),
the energy model's posterior mean (M4), its ULA, MALA and adaptive (M13) samplers, and DPS,
RED-Diff and DAPS on the energy's isotropic slice (written below, each one plain loop). For every task (box inpainting,
deblurring, SR x2, denoising): K samples for each of a few observations, and

  - mean error / Bayes: the MSE of the mean of the K samples over the MSE of the exact posterior mean;
  - variance / exact: the mean per-pixel variance of the samples over the exact posterior variance
    (1: calibrated, 0: a point estimate);
  - log p(x | y): the exact log posterior density of the samples, per dimension, against its
    expectation under the exact posterior, -1/2 log(2 pi e) - log det(Sigma_post) / (2d);
  - NFE (network evaluations per sample) and seconds per sample.

On the Gaussian field the exact posterior is M9's (dense, 16x16); on any other dataset the table has
PSNR against the truth instead. Writes OUT/solvers.md, OUT/TASK.png grids (truth | observation |
exact or Wiener mean | one sample per solver) and OUT/fig4.png (log prior against log posterior of
each solver's samples for one observation, Bayes' rule with the normalized energy, and the truth).
"""

import argparse
import copy
import math
import os
import time

import torch

import aebm
import covariances as cv
import data
import nets
import sample

# -----------------------------------------------------------------------------
# The peer solvers (paper §4.1, Table 1): what a score-based diffusion model offers, on the same energy.
#
# Each uses only the isotropic slice of the energy, as a plain diffusion model would: the score
# dE/dy at sigma^2 I and the denoiser D(y, sigma) = y - sigma^2 dE/dy(y, sigma^2 I), on a geometric
# noise schedule SIGMA_MAX -> SIGMA_MIN, plus the measurement y_obs = A x + sigma_n xi of a
# covariances.Degradation (masks too, as A = diag(mask)). Each returns (x, evaluations).
#
# Step sizes: tuned once per task by a small grid (PEER_GRID) on training images of the Gaussian
# field with its exact prior, at 200 network evaluations like the energy samplers' default
# comparison (python -m experiments.solvers --tune); the chosen values are PEER_STEPS. How they
# compare: docs/results.md, Solvers.

SIGMA_MAX, SIGMA_MIN = 10.0, 0.01
PEER_GRID = {"dps": [0.01, 0.03, 0.1, 0.3, 1.0], "reddiff": [0.1, 0.3, 1.0, 3.0, 10.0], "daps": [0.01, 0.03, 0.1, 0.3, 1.0]}
# chosen by the grid above: the lowest mean-squared error on 16 training draws of the 16x16 Gaussian
# field per task, with its exact prior and 200 evaluations, of RED-Diff's estimate and of the mean of 4
# samples for DPS and DAPS (`python -m experiments.solvers --tune`; a single sample's error would
# favour samplers that do not mix). DPS's step matters most: too large and the data step overshoots,
# too small and it ignores the data.
PEER_STEPS = {
    "dps": {"denoise": 0.03, "inpaint": 0.3, "deblur": 0.1, "sr": 0.3},
    "reddiff": {"denoise": 3.0, "inpaint": 3.0, "deblur": 1.0, "sr": 0.1},
    "daps": {"denoise": 0.1, "inpaint": 0.01, "deblur": 0.1, "sr": 0.01},
}


def noise_levels(n):
    """n + 1 standard deviations, geometric from SIGMA_MAX to SIGMA_MIN."""
    return [SIGMA_MAX * (SIGMA_MIN / SIGMA_MAX) ** (i / n) for i in range(n + 1)]


def isotropic_score(energy, x, sigma, create_graph=False):
    """dE/dy (pixels) at sigma^2 I; with create_graph it stays differentiable in x (DPS). sigma^2 I is
    diagonal in every basis: an exact GaussianEnergy gets it in its own (its fast path)."""
    basis = getattr(energy, "basis", None) or "pixel"
    cov = cv.isotropic(sigma ** 2, x.shape, basis, dtype=x.dtype, device=x.device)
    if not create_graph:
        return cv.from_basis(aebm.energy_and_scores(energy, cov.U(x), cov, need_log_s=False)[1], basis)
    E = aebm.energy_of_z(energy, cov.U(x), cov)
    return torch.autograd.grad(E.sum(), x, create_graph=True)[0]


def check_step(name, step):
    if not (isinstance(step, (int, float)) and step > 0 and math.isfinite(step)):
        raise ValueError(f"{name} step size must be positive, got {step}")


def dps(energy, y_obs, prob, evaluations=200, step=None, task="deblur", generator=None):
    """Diffusion posterior sampling (Chung et al., 2023). Ancestral reverse steps of the VE diffusion,
    each followed by a step down the gradient of the residual norm |y_obs - A D(x_t)| through the
    denoiser, of size zeta' / |y_obs - A D(x_t)| (the paper's weighting; it differentiates the
    network twice). One evaluation per level."""
    step = PEER_STEPS["dps"][task] if step is None else step
    check_step("DPS", step)
    sig = noise_levels(evaluations)
    mean = aebm.energy_mean(energy)
    x = mean + sig[0] * cv.white_noise(y_obs.shape, "pixel", generator, y_obs.dtype, y_obs.device)
    for i in range(evaluations):
        s, s_next = sig[i], sig[i + 1]
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            score = isotropic_score(energy, x, s, create_graph=True)
            x0 = x - s ** 2 * score  # Tweedie: the denoiser
            residual = (y_obs - prob.A(x0)).flatten(1).norm(dim=1)  # (B,)
            grad = torch.autograd.grad(residual.sum(), x)[0]
        ds2 = s ** 2 - s_next ** 2
        noise = cv.white_noise(x.shape, "pixel", generator, x.dtype, x.device)
        x = (x - ds2 * score + math.sqrt(ds2) * noise).detach()  # ancestral step of the reverse VE SDE
        # zeta' grad|r|^2 / |r| = 2 zeta' grad|r|: the DPS step, normalised per image by the residual
        x = x - 2 * step * grad
    return x0.detach(), evaluations


def reddiff(energy, y_obs, prob, evaluations=200, step=None, task="deblur", lr=0.01, generator=None):
    """RED-Diff (Mardani et al., 2024): variational posterior mean mu fitted by Adam, descending the noise
    levels once. Loss: 1/2 |y_obs - A mu|^2 + lam w(sigma) <sg[eps_hat(x_t) - eps], mu> with x_t = mu +
    sigma eps and the noise prediction eps_hat = sigma dE/dy(x_t, sigma^2 I); w(sigma) = sigma is the
    paper's sqrt(1/SNR) weighting (variance exploding: SNR = 1/sigma^2). `step` is lam. The data term
    is unnormalised, as in the authors' code: divided by sigma_n^2 it overwhelms the prior at small
    sigma and the estimate fits the noise (docs/results.md, Solvers)."""
    step = PEER_STEPS["reddiff"][task] if step is None else step
    check_step("RED-Diff", step)
    mu = y_obs.clone()
    if prob.basis == "pixel":  # a mask: the unobserved pixels start at the data mean
        mu = torch.where(prob.a > 0, y_obs, torch.full_like(y_obs, float(torch.as_tensor(aebm.energy_mean(energy)).mean())))
    mu.requires_grad_(True)
    opt = torch.optim.Adam([mu], lr=lr, betas=(0.9, 0.99))
    for s in noise_levels(evaluations)[:-1]:
        eps = cv.white_noise(mu.shape, "pixel", generator, mu.dtype, mu.device)
        eps_hat = s * isotropic_score(energy, (mu + s * eps).detach(), s)
        with torch.enable_grad():
            fit = 0.5 * (y_obs - prob.A(mu)).square().flatten(1).sum(1)
            reg = step * s * ((eps_hat - eps).detach() * mu).flatten(1).sum(1)
            opt.zero_grad()
            (fit + reg).sum().backward()
        opt.step()
    return mu.detach(), evaluations


def daps(energy, y_obs, prob, evaluations=200, step=None, task="deblur", ode_steps=1, langevin_steps=50,
         generator=None):
    """DAPS (Zhang et al., 2025): decoupled annealing. At each level sigma_t: a short probability-flow ODE
    from x_t to x0^ (ode_steps Euler steps, one evaluation each), then Langevin steps on
    N(x0; x0^, r_t^2 I) p(y_obs | x0) with r_t = sigma_t (measurement only: no evaluation), then
    re-noising to the next level, x_{t-1} = x0 + sigma_{t-1} xi. `step` scales the Langevin step by the
    target's largest precision, eta = step / (1/r_t^2 + max a^2 / sigma_n^2). ode_steps = 1 (the ODE's
    single step is Tweedie's x0^) because at a budget of 200 evaluations more annealing levels beat a
    longer ODE (docs/results.md, Solvers; the paper's 5 steps come with 1000 evaluations)."""
    step = PEER_STEPS["daps"][task] if step is None else step
    check_step("DAPS", step)
    levels = max(1, evaluations // ode_steps)
    sig = noise_levels(levels)
    mean = aebm.energy_mean(energy)
    x = mean + sig[0] * cv.white_noise(y_obs.shape, "pixel", generator, y_obs.dtype, y_obs.device)
    a_max = prob.a.abs().max().item()
    for i in range(levels):
        s = sig[i]
        ode = [s * (SIGMA_MIN / s) ** (k / ode_steps) for k in range(ode_steps + 1)]
        x0 = x
        for k in range(ode_steps):  # probability-flow ODE dx/dsigma = sigma dE/dy, Euler
            score = isotropic_score(energy, x0, ode[k])
            x0 = x0 + (ode[k + 1] - ode[k]) * ode[k] * score if k + 1 < ode_steps else x0 - ode[k] ** 2 * score
        x_hat = x0
        eta = step / (1 / s ** 2 + a_max ** 2 / prob.sigma_n ** 2)
        for _ in range(langevin_steps):
            grad = -(x0 - x_hat) / s ** 2 - prob.A(prob.A(x0) - y_obs) / prob.sigma_n ** 2  # A is symmetric
            x0 = x0 + eta * grad + math.sqrt(2 * eta) * cv.white_noise(x0.shape, "pixel", generator, x0.dtype, x0.device)
        x = x0 + sig[i + 1] * cv.white_noise(x0.shape, "pixel", generator, x0.dtype, x0.device)
    return x0, levels * ode_steps


PEERS = {"dps": dps, "reddiff": reddiff, "daps": daps}


def peer_problem(args, task, y_obs, cov_y, dtype):
    """The measurement operator the peer solvers need: the task's Degradation, a mask as A = diag(mask),
    or (for an observed photo) the Degradation M2 was built from, recovered from Sigma_y."""
    if isinstance(task, cv.Degradation):
        return cv.Degradation(task.a.to(dtype), task.basis, task.sigma_n, task.s_huge)  # in the run's dtype
    if task is not None:  # a missing map
        return cv.inpainting_problem(task, y_obs.shape[1], args.noise, dtype)
    sigma_n = cov_y.s.min().sqrt().item()  # --observed: s = sigma_n^2 / a^2 with max |a| = 1
    informative = cov_y.s < cv.S_HUGE * 0.999
    a = torch.where(informative, (sigma_n ** 2 / cov_y.s).sqrt(), torch.zeros_like(cov_y.s))
    return cv.Degradation(a, cov_y.basis, sigma_n)



# -----------------------------------------------------------------------------
# The comparison.

TASKS = {  # name: sample.py flags
    "box inpainting": ["--task", "inpaint", "--mask", "box", "--noise", "0.05"],
    "deblurring": ["--task", "deblur", "--blur-std", "1.5", "--noise", "0.05"],
    "SR x2": ["--task", "sr", "--sr-factor", "2", "--noise", "0.05"],
    "denoising": ["--task", "denoise", "--noise", "0.1"],
}
SOLVERS = ["wiener (fitted)", "mean", "ula", "mala", "adaptive", "dps", "reddiff", "daps"]


def task_args(name, basis, nfe):
    args = sample.parse_args(TASKS[name] + ["--basis", basis, "--missing-var", str(cv.S_HUGE)])
    args.steps = nfe // 2  # the energy samplers: one predictor and one corrector evaluation per level
    return args


def solve(solver, energy, fitted, args, y, cov, y_obs, prob, K, nfe, seed):
    """K draws (or K copies of a point estimate) for each observation: (B*K, C, H, W), NFE, seconds."""
    g = torch.Generator().manual_seed(seed)
    rep = lambda t: t.repeat_interleave(K, 0)
    yK, y_obsK = rep(y), rep(y_obs)
    covK = cv.Covariance(rep(cov.s), cov.basis)
    t0 = time.time()
    if solver == "wiener (fitted)":
        out, evals = rep(aebm.posterior_mean(fitted, y, cov)), 0
    elif solver == "mean":
        out, evals = rep(aebm.posterior_mean(energy, y, cov)), 1
    elif solver in ("ula", "mala", "adaptive"):
        levels = nfe // 3 if solver == "adaptive" else nfe // 2  # adaptive also needs dE/dlog s: 3 evaluations a level
        res = sample.reverse_diffusion(energy, yK, covK, levels=levels, s_end=args.s_end,
                                       corrector="mala" if solver == "mala" else "ula",
                                       schedule="adaptive" if solver == "adaptive" else "geometric", generator=g)
        out, evals = res.x_mean, res.evaluations
    else:
        probK = cv.Degradation(rep(prob.a), prob.basis, prob.sigma_n, prob.s_huge)
        out, evals = PEERS[solver](energy, y_obsK, probK, evaluations=nfe, task=args.task, generator=g)
    return out, evals, (time.time() - t0) / out.shape[0]


def exact_posterior(prior, y, cov):
    """Exact posterior mean (B, d) and covariance (B, d, d) of a Gaussian prior (M9, dense)."""
    mean = prior.posterior_mean(y.double(), cv.Covariance(cov.s.double(), cov.basis)).flatten(1)
    return mean, prior.posterior_cov(cv.Covariance(cov.s.double(), cov.basis))


def run(energy, fitted, ds, exact, basis, n_obs=4, K=16, nfe=200, seed=0, out="runs/solvers", fig4=True):
    """The table rows {task: {solver: metrics}} and the figures."""
    os.makedirs(out, exist_ok=True)
    x = ds.get_batch(n_obs, torch.Generator().manual_seed(90_000 + seed)).double()
    d = x[0].numel()
    table = {}
    for t_i, name in enumerate(TASKS):
        args = task_args(name, basis, nfe)
        y, cov, y_obs, task = sample.observe(args, x, aebm.energy_mean(energy), torch.Generator().manual_seed(seed + t_i))
        y, y_obs, cov = y.float(), y_obs.float(), cv.Covariance(cov.s.float(), cov.basis)
        prob = peer_problem(args, task, y_obs, cov, torch.float32)
        ref = exact_posterior(exact, y, cov) if exact is not None else None
        rows, grid = {}, [x.float(), y_obs, (ref[0].view_as(x).float() if ref else aebm.posterior_mean(fitted, y, cov))]
        for s_i, solver in enumerate(SOLVERS):
            samples, evals, secs = solve(solver, energy, fitted, args, y, cov, y_obs, prob, K, nfe, seed + 10 * s_i)
            samples = samples.double().view(n_obs, K, -1)  # (B, K, d)
            grid.append(samples[:, 0].view_as(x).float())
            r = dict(nfe=evals, seconds=secs, psnr=data.psnr(samples.mean(1).view_as(x), x).mean().item())
            if ref is not None:
                post_mean, post_cov = ref
                bayes = (post_mean - x.flatten(1)).square().mean()
                r["mean_error"] = ((samples.mean(1) - x.flatten(1)).square().mean() / bayes).item()
                var = post_cov.diagonal(dim1=-2, dim2=-1)  # (B, d)
                r["variance"] = (samples.var(1).mean() / var.mean()).item() if K > 1 else float("nan")
                mvn = torch.distributions.MultivariateNormal(post_mean, post_cov)
                lp = mvn.log_prob(samples.transpose(0, 1)).mean().item() / d  # (K, B) -> mean
                r["log_post"] = lp
                r["log_post_expected"] = -mvn.entropy().mean().item() / d  # -1/2 log(2 pi e) - log det / (2d)
            rows[solver] = r
            print(f"  {name:15s} {solver:16s} " + " ".join(f"{k} {v:.3f}" for k, v in r.items()), flush=True)
        data.save_grid(os.path.join(out, f"{name.replace(' ', '_')}.png"), grid)
        table[name] = rows
        if fig4 and t_i == 0:
            kind = "exact" if energy is exact else "learned"
            fig4_plot(energy, x[:1], y[:1], cov[:1], y_obs[:1], args, prob, nfe, K, seed, os.path.join(out, "fig4.png"), kind)
    return table


def fig4_plot(energy, x, y, cov, y_obs, args, prob, nfe, K, seed, path, kind="learned"):
    """The paper's Fig. 4 on any model: for one observation, log prior against log posterior (Bayes' rule
    with the normalized energy) of each solver's samples and of the truth."""
    groups = []
    prob1 = cv.Degradation(prob.a[:1], prob.basis, prob.sigma_n, prob.s_huge)
    d = x[0].numel()
    for s_i, solver in enumerate(["ula", "mala", "dps", "reddiff", "daps"]):
        samples, _, _ = solve(solver, energy, None, args, y, cov, y_obs, prob1, K, nfe, seed + 10 * s_i)
        lp = (aebm.log_prob(energy, samples.float()) / d).tolist()
        lq = (aebm.log_posterior(energy, samples.float(), y.expand_as(samples), cv.Covariance(cov.s.expand_as(samples), cov.basis)) / d).tolist()
        groups.append((solver, lp, lq, "o"))
    lp_t = (aebm.log_prob(energy, x.float()) / d).tolist()
    lq_t = (aebm.log_posterior(energy, x.float(), y, cov) / d).tolist()
    groups.append(("truth", lp_t, lq_t, "x"))
    data.save_scatter_plot(path, groups, title=f"one observation: samples of each solver ({kind} densities)",
                           xlabel="log p(x) / d (nats)", ylabel="log p(x | y) / d (nats)")


def tune(ds, exact, basis, nfe=200, n=16, K=4, seed=1):
    """The peers' step sizes: for each task, the grid value with the lowest MSE on n training images, of
    RED-Diff's estimate and of the mean of K samples of the samplers (DPS, DAPS). The mean, not one
    sample: a sampler that does not mix has a lower single-sample error and a biased mean (DAPS at
    step 0.01, 16x16 deblurring: mean 0.57 of the Bayes error away from it against 0.12 at 0.1)."""
    x = ds.get_batch(n, torch.Generator().manual_seed(seed)).double()  # training draws, not the test seed
    chosen = {}
    for t_i, name in enumerate(TASKS):
        args = task_args(name, basis, nfe)
        y, cov, y_obs, task = sample.observe(args, x, aebm.energy_mean(exact), torch.Generator().manual_seed(seed + t_i))
        y_obs = y_obs.float()
        prob = peer_problem(args, task, y_obs, cov, torch.float32)
        for peer, grid in PEER_GRID.items():
            k = 1 if peer == "reddiff" else K
            probK = cv.Degradation(prob.a.repeat_interleave(k, 0), prob.basis, prob.sigma_n, prob.s_huge)
            mse = {}
            for step in grid:
                out, _ = PEERS[peer](exact, y_obs.repeat_interleave(k, 0), probK, evaluations=nfe, step=step,
                                            task=args.task, generator=torch.Generator().manual_seed(seed))
                mse[step] = (out.double().view(n, k, *x.shape[1:]).mean(1) - x).square().mean().item()
            best = min(mse, key=mse.get)
            chosen.setdefault(peer, {})[args.task] = best
            print(f"  {name:15s} {peer:8s} " + " ".join(f"{k}: {v:.5f}" for k, v in mse.items()) + f"  -> {best}", flush=True)
    return chosen


def compact(table, exact):
    """One row per solver, one column per task: 'mean error / variance / log p (expected)' on the
    Gaussian field, the PSNR of the samples' mean elsewhere."""
    tasks = list(table)
    lines = ["| solver | NFE | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 2) + "|"]
    for solver in table[tasks[0]]:
        cells = []
        for t in tasks:
            r = table[t][solver]
            cells.append(f"{r['mean_error']:.2f} / {r['variance']:.2f} / {r['log_post']:.2f} ({r['log_post_expected']:.2f})"
                         if exact else f"{r['psnr']:.2f} dB")
        lines.append(f"| {solver} | {table[tasks[0]][solver]['nfe']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(table, exact):
    cols = ["mean_error", "variance", "log_post", "nfe", "seconds"] if exact else ["psnr", "nfe", "seconds"]
    heads = {"mean_error": "mean error / Bayes", "variance": "variance / exact", "log_post": "log p(x|y)/d (expected)",
             "psnr": "PSNR of the mean (dB)", "nfe": "NFE", "seconds": "s / sample"}
    lines = []
    for task, rows in table.items():
        lines.append(f"\n**{task}**\n\n| solver | " + " | ".join(heads[c] for c in cols) + " |")
        lines.append("|---" * (len(cols) + 1) + "|")
        for solver, r in rows.items():
            cells = []
            for c in cols:
                if c == "log_post":
                    cells.append(f"{r[c]:.3f} ({r['log_post_expected']:.3f})")
                elif c == "nfe":
                    cells.append(str(r[c]))
                else:
                    cells.append(f"{r[c]:.3f}")
            lines.append(f"| {solver} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description="Every solver against the exact posterior (paper Table 1, Fig. 4).")
    p.add_argument("--dataset", default="gaussian", help="gaussian (exact posterior known) or any train.py dataset")
    p.add_argument("--prior", default="model", choices=["model", "exact"], help="exact: the Gaussian field's own energy")
    p.add_argument("--ckpt", default=None, help="a learned energy (checkpoint of train.py)")
    p.add_argument("--data-dir", default=None, help="directory of an on-disk dataset")
    p.add_argument("--size", type=int, default=16, help="image size for the gaussian dataset")
    p.add_argument("--n", type=int, default=4, help="observations per task")
    p.add_argument("--samples", type=int, default=16, help="samples per observation")
    p.add_argument("--nfe", type=int, default=200, help="network evaluations per sample")
    p.add_argument("--fit-images", type=int, default=512, help="training images for the fitted Gaussian")
    p.add_argument("--out", default="runs/solvers", help="table and figures")
    p.add_argument("--tune", action="store_true", help="run the peers' step-size grid instead")
    a = p.parse_args(argv)
    if a.ckpt:
        energy, config = nets.load_energy(a.ckpt)
        size, channels, name = config["img_size"], config["channels"], a.dataset if a.dataset != "gaussian" else config["dataset"]
        basis = config.get("spectral_basis", "dct")
        leaf_radii = config.get("leaf_radii") if name == config["dataset"] else None
    else:
        if a.prior != "exact" or a.dataset != "gaussian":
            raise ValueError("without --ckpt only --dataset gaussian --prior exact has an energy to run")
        size, channels, name, basis, leaf_radii = a.size, 1, "gaussian", "fft", None
    ds = data.load_dataset(name, size, channels, a.data_dir, "test", leaf_radii)
    exact = copy.deepcopy(ds.prior) if name == "gaussian" else None
    if a.tune:
        print(tune(ds, exact, basis, a.nfe))
        return
    energy = energy if a.ckpt else exact
    train_x = data.load_dataset(name, size, channels, a.data_dir, "train", leaf_radii).get_batch(a.fit_images, torch.Generator().manual_seed(5))
    fitted = aebm.fit_gaussian(train_x, basis)
    table = run(energy, fitted, ds, exact, basis, a.n, a.samples, a.nfe, out=a.out)
    text = compact(table, exact is not None) + "\n" + markdown(table, exact is not None)
    with open(os.path.join(a.out, "solvers.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    print(f"\nwritten: {a.out}/solvers.md, task grids, {a.out}/fig4.png")


if __name__ == "__main__":
    main()
