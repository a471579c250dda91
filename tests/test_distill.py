"""experiments/distill.py, the energy trained against a denoiser's estimate: its A-DSM is the weighted squared
distance between the energy's Tweedie estimate (or a plain denoiser student's) and the teacher's, written here from the two posterior means
directly (float32, 32x32x3, in the pixel and dct bases); its A-CSM is train.py's; an exact energy distilled
from its own posterior mean has zero A-DSM loss (the fft basis too); a run trains, resumes, is an energy, and refuses a teacher of
other images or a teacher that is not a denoiser."""

import os

import pytest
import torch

import aebm
import covariances as cv
import nets
from experiments import denoiser as dn
from experiments import distill

SHAPE = (2, 3, 32, 32)


def random_net(seed):
    """nets.build_unet's tiny network at 32x32x3, its zero-initialised layers drawn too, so that F is not 0."""
    torch.manual_seed(seed)
    net = nets.build_unet("tiny", 32, 3)
    for p in net.parameters():
        if p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.1)
    return net


def covariances(dtype=torch.float32):
    return [cv.isotropic(0.02, SHAPE, "pixel", dtype),
            cv.mask_covariance(cv.box_mask(SHAPE, 16), 1e3, 0.01, 3, dtype),
            cv.blur_problem(SHAPE, 1.5, 0.05, "dct", dtype=dtype).covariance(),
            cv.sr_problem(SHAPE, 2, 0.05, "dct", dtype=dtype).covariance(),
            cv.blur_problem(SHAPE, 1.5, 0.05, "fft", dtype=dtype).covariance()]


@pytest.mark.parametrize("student", ["energy", "denoiser"])
@pytest.mark.parametrize("k", range(4))  # pixel and dct; the fft basis in the next test
def test_distilled_adsm_is_the_distance_to_the_teachers_estimate_and_acsm_is_unchanged(k, student):
    """For the energy (M3) and for the plain denoiser as the student (--student denoiser, the control)."""
    cov = covariances()[k]
    energy = (aebm.EnergyModel if student == "energy" else dn.Denoiser)(random_net(0), 0.45, 0.08)
    teacher = dn.Denoiser(random_net(1), 0.45, 0.08)
    g = torch.Generator().manual_seed(2)
    x = torch.rand(SHAPE, generator=g)
    zeta = cv.white_noise(SHAPE, cov.basis, g, torch.float32)
    L_dsm, L_csm = distill.distillation_losses(teacher.estimate_z, energy, x, cov, zeta=zeta, dsm_weight=0.08,
                                               need_csm=student == "energy")
    # by hand, in float64 (an SR covariance's dropped frequencies do not survive float32 pixels): Tweedie's
    # estimate of the energy (its closed-form Gaussian part + the learned score) and the teacher's, both from
    # the noisy image; EDM's weight (s + sigma_d^2) / sigma_d^2 over A-DSM's 1/s
    cov = covariances(torch.float64)[k]
    energy.net.double(), teacher.net.double()
    z = cov.U(x.double()) + cov.s.sqrt() * zeta.double()
    with torch.no_grad():
        student = cov.U(energy.posterior_mean(cov.Uh(z), cov))
        target = teacher.estimate_z(z, cov)
    weight = (cov.s + 0.08) / 0.08
    by_hand = (weight * (target - student).abs().square() / cov.s).flatten(1).sum(1) / x[0].numel()
    L64, _ = distill.distillation_losses(teacher.estimate_z, energy, x.double(), cov, zeta=zeta.double(), dsm_weight=0.08,
                                         need_csm=False)
    torch.testing.assert_close(L64.detach(), by_hand, rtol=1e-9, atol=1e-12)  # the formula, exactly
    # float32, as users train: its rounding at SR's dropped frequencies (s = 1e8) reaches a few 1e-4, as in
    # A-DSM against the data
    torch.testing.assert_close(L_dsm.detach(), by_hand.float(), rtol=1e-3, atol=1e-6)
    energy.net.float(), teacher.net.float()
    cov = covariances()[k]
    plain_dsm, plain_csm = aebm.dual_score_losses(energy, x, cov, zeta=zeta, dsm_weight=0.08, need_csm=student == "energy")
    assert (plain_dsm - L_dsm).abs().min() > 0.1 * plain_dsm.min()  # the teacher is not the data
    if student == "energy":
        torch.testing.assert_close(L_csm, plain_csm, rtol=1e-6, atol=1e-7)  # the normalization is learned as before


@pytest.mark.parametrize("k", range(5))
def test_an_exact_energy_distilled_from_its_own_posterior_mean_has_no_adsm_loss(k):
    """The Gaussian N(mu, sigma_d^2 I) (M9) regressed onto its own Tweedie estimate: zero distilled loss, where
    against the data its loss is its Bayes error (about 1 per coordinate)."""
    cov = covariances(torch.float64)[k]
    gauss = aebm.GaussianEnergy(torch.full(SHAPE[1:], 0.45, dtype=torch.float64),
                                cv.isotropic(0.08, (1,) + SHAPE[1:], "pixel", torch.float64))
    teacher = lambda z, c: c.U(aebm.posterior_mean(gauss, c.Uh(z), c))
    g = torch.Generator().manual_seed(3)
    x = 0.45 + 0.3 * torch.randn(SHAPE, generator=g, dtype=torch.float64)
    zeta = cv.white_noise(SHAPE, cov.basis, g, torch.float64)
    L_dsm, _ = distill.distillation_losses(teacher, gauss, x, cov, zeta=zeta, need_csm=False)
    plain, _ = aebm.dual_score_losses(gauss, x, cov, zeta=zeta, need_csm=False)
    assert L_dsm.max() < 1e-12 and plain.min() > 0.1


def test_a_distilled_run_trains_resumes_is_an_energy_and_refuses_other_teachers(tmp_path):
    flags = ["--dataset", "deadleaves", "--img-size", "16", "--config", "tiny", "--batch", "4", "--log-every", "1",
             "--eval-every", "2", "--ckpt-every", "2", "--val-batch", "2", "--device", "cpu"]
    teacher = str(tmp_path / "den")
    dn.main(flags + ["--steps", "2", "--out", teacher])
    teacher = os.path.join(teacher, "ckpt.pt")
    out = str(tmp_path / "dist")
    distill.main(flags + ["--teacher", teacher, "--steps", "2", "--lam", "0.2", "--out", out])
    distill.main(flags + ["--teacher", teacher, "--steps", "3", "--lam", "0.2", "--out", out, "--resume"])
    energy, config = nets.load_energy(os.path.join(out, "ckpt.pt"))
    assert isinstance(energy, aebm.EnergyModel) and nets.load_checkpoint(os.path.join(out, "ckpt.pt"))["step"] == 3
    assert aebm.dual_score_losses is distill.plain_losses  # the swap ends with the run
    # the control: the same network as a plain denoiser, against the same teacher
    distill.main(flags + ["--teacher", teacher, "--student", "denoiser", "--steps", "2", "--out", str(tmp_path / "den2")])
    model, _ = dn.load_denoiser(str(tmp_path / "den2" / "ckpt.pt"))
    assert isinstance(model, dn.Denoiser) and nets.build_energy is not dn.build_denoiser
    with pytest.raises(SystemExit, match="--lam 0"):
        distill.main(flags + ["--teacher", teacher, "--student", "denoiser", "--lam", "1", "--out", str(tmp_path / "v")])
    with pytest.raises(SystemExit, match="--student must be energy"):
        distill.main(flags + ["--teacher", teacher, "--student", "score", "--out", str(tmp_path / "u")])
    with pytest.raises(SystemExit, match="trained with img_size = 16, this run has 32"):
        distill.main(flags[:2] + ["--img-size", "32"] + flags[4:] + ["--teacher", teacher, "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="not a denoiser's checkpoint"):
        distill.main(flags + ["--teacher", os.path.join(out, "ckpt.pt"), "--out", str(tmp_path / "y")])
    with pytest.raises(SystemExit, match="no checkpoint at"):
        distill.main(flags + ["--teacher", str(tmp_path / "none.pt"), "--out", str(tmp_path / "z")])
    with pytest.raises(SystemExit, match="--teacher needs a denoiser checkpoint"):
        distill.main(flags + ["--out", str(tmp_path / "w")])
