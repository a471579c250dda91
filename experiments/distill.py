"""
Can M3 write what the free denoiser computes? The energy trained against a trained denoiser instead of
the clean images (docs/results.md §1, the price of normalization).

On large dead leaves the energy restores worse than the same UNet trained as a plain denoiser
(experiments/denoiser.py), mostly where the prior must supply what the observation lacks (box
inpainting, SR). Is it the targets or the form? A-DSM regresses onto one noisy draw of the clean image,
and an energy learns from it through a double backward; or M3 with this network learns the same
function slower whatever the target. This script separates them. It runs train.py's
own loop, data, covariances and A-CSM loss unchanged, but regresses Tweedie's estimate onto a trained
denoiser's estimate x^_T of the same noisy image instead of onto the clean image x:

    A-DSM (M5):        |sqrt(s) dE/dz - zeta|^2,     zeta   = (z - U x)   / sqrt(s)    (the noise drawn)
    distilled A-DSM:   |sqrt(s) dE/dz - zeta_T|^2,   zeta_T = (z - U x^_T) / sqrt(s)   (what the teacher removes)

with the loss's own weighting. Its minimiser is the teacher's estimate itself (for an energy, the gradient
field nearest to it), with a target whose variance is only the student's error (the teacher's estimate is
a function of y, not a random draw of x given y). A-CSM still regresses dE/dlog s onto 1/2 (1 - |zeta|^2) from the noise actually drawn: the
normalization is learned as before. The control, `--student denoiser`, trains the same network as a plain
denoiser (experiments/denoiser.py) against the same teacher: the same targets, the form the only
difference. If the energy gains from the clean targets what the control gains, A-DSM's noise was what
held it back; if only the control gains, the limit is in how M3 is learned (docs/results.md §1 has which).

How: dual_score_losses forms z from zeta and regresses sqrt(s) dE/dz onto zeta. Adding to E the linear
term Re<z, delta>, delta = (U x^_T - U x) / s (a constant: no parameter, no log s in it), shifts
sqrt(s) dE/dz by sqrt(s) delta = zeta - zeta_T and leaves dE/dlog s as it is, so that unchanged loss
computes the distilled A-DSM and the same A-CSM (tests/test_distill.py checks both against direct
formulas). Only the training step does this; validation still scores the energy against clean images.

    python -m experiments.distill --teacher runs/den_big/ckpt.pt --preset hour --leaf-radii 2 32 --lam 0.05 --out runs/distill
    python -m experiments.distill --teacher runs/den_big/ckpt.pt --student denoiser --preset hour --leaf-radii 2 32 --out runs/distill_den
    python -m experiments.learning --ckpt runs/distill/ckpt.pt --by-noise 1     # its table, as any energy's
"""

import contextlib
import sys

import torch
import torch.nn as nn

import aebm
import covariances as cv
import train
from experiments import denoiser

# the teacher's fields that must match the run's: the same images, size and bases, or its estimate is of
# another problem
MATCHING = ("dataset", "img_size", "channels", "leaf_radii", "spectral_basis", "crop", "scale")
plain_losses = aebm.dual_score_losses  # the loss as aebm writes it (the training step swaps in the distilled one)


class Shifted(nn.Module):
    """E(z, Sigma) + Re<z, delta>: the energy with a constant linear term (see the module docstring)."""

    def __init__(self, energy, delta):
        super().__init__()
        self.inner, self.delta = energy, delta
        for name in ("data_var", "anchor_var"):  # what the loss's weighting reads, where the energy has them
            if hasattr(energy, name):
                setattr(self, name, getattr(energy, name))

    def energy_z(self, z, cov):
        return aebm.energy_of_z(self.inner, z, cov) + aebm.sum_coords((z.conj() * self.delta).real)


def distillation_losses(teacher, energy, x, cov, generator=None, need_csm=True, zeta=None, dsm_weight=None):
    """aebm.dual_score_losses with A-DSM's target the teacher's estimate instead of the clean image x.
    teacher: (z, cov) -> U x^_T, the teacher's estimate in Sigma's basis. Returns (L_dsm, L_csm), (B,) each."""
    if zeta is None:  # the draw aebm.dual_score_losses would make, so the noise streams stay as in train.py
        zeta = cv.white_noise(cov.s.shape, cov.basis, generator, cov.s.dtype, cov.s.device)
    Ux = cov.U(x)
    z = Ux + cov.s.sqrt() * zeta  # as dual_score_losses forms it
    # the teacher in float32 even under bf16 autocast: at s = 1e-6 a bf16 rounding of x^_T (~1e-3) would be a
    # target error of ~1 in zeta_T, as large as the noise itself
    with torch.no_grad(), torch.autocast(z.device.type, enabled=False):
        delta = (teacher(z, cov) - Ux) / cov.s  # sqrt(s) delta = zeta - zeta_T
    return plain_losses(Shifted(energy, delta), x, cov, generator, need_csm=need_csm, zeta=zeta, dsm_weight=dsm_weight)


def load_teacher(path, args):
    """(z, cov) -> U x^_T from a checkpoint of experiments/denoiser.py, after checking that it was trained on
    the run's images (one-line error otherwise)."""
    try:
        model, config = denoiser.load_denoiser(path)
    except FileNotFoundError as e:
        raise SystemExit(f"error: --teacher: {e}") from None
    except ValueError as e:  # unreadable, or an energy's checkpoint (load_denoiser says so)
        raise SystemExit(f"error: --teacher {path} is not a denoiser's checkpoint: {e}") from None
    for key in MATCHING:
        ours = getattr(args, key)
        theirs = config.get(key)
        if (tuple(theirs) if isinstance(theirs, list) else theirs) != ours:
            raise SystemExit(f"error: the teacher {path} was trained with {key} = {theirs}, this run has {ours}: "
                             f"train a denoiser with the same flags (python -m experiments.denoiser ...)")
    model.requires_grad_(False)
    return lambda z, cov: model.to(z.device).estimate_z(z, cov)  # on the run's device (a no-op after the first call)


def pop_option(argv, flag):
    """(the value after flag, or None if flag is absent; argv without both). The flags train.py does not know
    are taken out before it parses the rest. A flag with nothing after it reads as the empty string."""
    if flag not in argv:
        return None, argv
    i = argv.index(flag)
    return (argv[i + 1] if i + 1 < len(argv) else ""), argv[:i] + argv[i + 2:]


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    path, argv = pop_option(argv, "--teacher")
    if not path:
        raise SystemExit("--teacher needs a denoiser checkpoint, e.g. --teacher runs/denoiser/ckpt.pt "
                         "(python -m experiments.denoiser --preset hour --out runs/denoiser trains one)")
    student, argv = pop_option(argv, "--student")
    student = "energy" if student is None else student
    if student not in ("energy", "denoiser"):
        raise SystemExit("--student must be energy (M3, the default) or denoiser (the same network as "
                         "experiments/denoiser.py's plain denoiser: the control)")
    if student == "denoiser":  # as experiments/denoiser.py: no energy, so no A-CSM
        if "--lam" in argv and argv[argv.index("--lam") + 1:][:1] != ["0"]:
            raise SystemExit("a denoiser student is not an energy: it trains with A-DSM alone (--lam 0, the default here)")
        argv = argv + ["--lam", "0"]
    argv = argv + ([] if "--out" in argv else ["--out", "runs/distill"])
    args = train.parse_args(argv)
    teacher = load_teacher(path, args)

    # the training step's loss regresses onto the teacher; everything else (validation included) is train.py's
    train_step = train.train_step

    def distilled_step(*a, **k):
        aebm.dual_score_losses = lambda *la, **lk: distillation_losses(teacher, *la, **lk)
        try:
            return train_step(*a, **k)
        finally:
            aebm.dual_score_losses = plain_losses

    train.train_step = distilled_step
    try:
        with denoiser.built_by_train() if student == "denoiser" else contextlib.nullcontext():
            return train.main(argv)
    finally:
        train.train_step = train_step


if __name__ == "__main__":
    main()
