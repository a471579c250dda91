"""experiments/tv.py, the classical nonlinear reference of docs/results.md §1: its operators against their
definitions, its solver against an independent slower minimiser of the same objective, and its answer
on piecewise-constant images at the size users run (32x32x3, float32)."""

import os
import subprocess
import sys

import torch

import covariances as cv
import data
from experiments import tv


def test_grad_adjoint_is_the_adjoint_of_grad():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 7, 9, generator=g, dtype=torch.float64)
    p = torch.randn(2, 3, 2, 7, 9, generator=g, dtype=torch.float64)
    assert torch.allclose((tv.grad(x) * p).sum(), (x * tv.grad_adjoint(p)).sum(), rtol=1e-12)
    # and grad itself: forward differences, zero across the last row / column
    assert torch.equal(tv.grad(x)[:, :, 0, 2, 4], x[:, :, 3, 4] - x[:, :, 2, 4])
    assert torch.equal(tv.grad(x)[:, :, 1, :, -1], torch.zeros(2, 3, 7, dtype=torch.float64))


def lbfgs_reference(prob, y_obs, lam, eps=1e-5, steps=600):
    """The same objective with |grad x| smoothed to sqrt(|grad x|^2 + eps^2), minimised by L-BFGS: slow, and
    independent of the primal-dual algorithm (no proximal maps, no dual variable)."""
    x = prob.A(y_obs).clone().requires_grad_(True)
    opt = torch.optim.LBFGS([x], lr=1, max_iter=steps, tolerance_grad=1e-12, tolerance_change=1e-15,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        smooth_tv = (tv.grad(x).square().sum(dim=(1, 2)) + eps ** 2).sqrt().sum()
        f = 0.5 * (prob.A(x) - y_obs).square().sum() + lam * smooth_tv
        f.backward()
        return f

    opt.step(closure)
    return x.detach()


def test_primal_dual_reaches_the_minimum_of_an_independent_minimiser():
    g = torch.Generator().manual_seed(1)
    x = data.DeadLeaves(8, 3).get_batch(2, g).double()
    missing = cv.box_mask(x.shape, 4)
    for prob in (cv.blur_problem(x.shape, 1.5, 0.05, "dct", dtype=torch.float64),
                 cv.inpainting_problem(missing, 3, 0.05, torch.float64),
                 cv.sr_problem(x.shape, 2, 0.05, "fft", dtype=torch.float64)):
        y_obs = prob.measure(x, torch.Generator().manual_seed(2))
        lam = 0.05
        ours = tv.tv_restore(prob, y_obs, lam, iters=3000)
        ref = lbfgs_reference(prob, y_obs, lam)
        f_ours, f_ref = tv.objective(prob, ours, y_obs, lam).sum(), tv.objective(prob, ref, y_obs, lam).sum()
        # the same minimum (ours a little lower: the reference smooths TV and stops early) ...
        assert f_ref - 1e-4 * f_ref <= f_ours <= f_ref, (prob.basis, f_ours.item(), f_ref.item())
        # ... and nearly the same minimiser (TV's minimiser need not be unique where A drops frequencies)
        assert (ours - ref).abs().mean() < 3e-3 and (ours - ref).abs().max() < 5e-2, (prob.basis, (ours - ref).abs())


def test_tv_denoises_piecewise_constant_images_in_float32():
    """Dead leaves 32x32x3, sigma 0.1, float32: TV denoising gains about 2 dB over the observation (2.09 when
    written; the images hold many disks a few pixels wide, which TV flattens), and a lam far too large loses."""
    x = data.DeadLeaves(32, 3).get_batch(8, torch.Generator().manual_seed(3))
    prob = cv.denoising_problem(x.shape, 0.1)
    y_obs = prob.measure(x, torch.Generator().manual_seed(4))
    tuned = data.psnr(tv.tv_restore(prob, y_obs, 0.08, iters=200), x).mean()
    observed = data.psnr(y_obs, x).mean()
    too_smooth = data.psnr(tv.tv_restore(prob, y_obs, 2.0, iters=200), x).mean()
    assert tuned > observed + 1.5, (tuned.item(), observed.item())
    assert too_smooth < tuned - 1.0, (too_smooth.item(), tuned.item())


def test_noise_option_sets_the_deblurring_and_sr_noise_and_refuses_impossible_levels():
    x = torch.zeros(2, 3, 16, 16)
    assert [(name, p.sigma_n) for name, p in tv.tasks(x, "dct", 0.01)] == [("deblur", 0.01), ("sr", 0.01)]
    assert [name for name, _ in tv.tasks(x, "dct")] == ["denoise", "inpaint", "deblur", "sr"]
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-m", "experiments.tv", "--noise", "0"], cwd=here, capture_output=True,
                          text=True)
    assert done.returncode == 2 and "--noise must be in (0, 1)" in done.stderr, done.stderr
