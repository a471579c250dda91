"""Claims about covariances.py, each against an independent dense reference (docs/method.md §7, 1-2)."""

import math

import numpy as np
import pytest
import torch

import covariances as cv
from tests.dense import default_float64, basis_matrix, conv_circular, conv_symmetric, dct_1d, dense_sigma, symmetric_spectrum



@pytest.fixture(autouse=True)
def float64():
    with default_float64():
        yield


SHAPES = [(1, 1, 4, 6), (1, 2, 5, 4), (1, 3, 3, 3)]


def random_s(C, H, W, basis, seed=0):
    if basis == "fft":
        return symmetric_spectrum(C, H, W, seed)
    g = torch.Generator().manual_seed(seed)
    return torch.exp(torch.randn(C, H, W, generator=g))


@pytest.mark.parametrize("basis", cv.BASES)
@pytest.mark.parametrize("shape", SHAPES)
def test_basis_transform_is_the_textbook_orthonormal_matrix(basis, shape):
    _, C, H, W = shape
    d = C * H * W
    eye = torch.eye(d).view(d, C, H, W)
    U = cv.to_basis(eye, basis).reshape(d, d).T.to(torch.complex128)  # columns U e_i
    U_ref = basis_matrix(C, H, W, basis)
    torch.testing.assert_close(U, U_ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(U.conj().T @ U, torch.eye(d, dtype=torch.complex128), atol=1e-12, rtol=0)
    x = torch.randn(shape)
    torch.testing.assert_close(cv.from_basis(cv.to_basis(x, basis), basis), x, atol=1e-12, rtol=0)


def test_dct_matrix_matches_the_cosine_formula():
    for n in (1, 2, 5, 8):
        torch.testing.assert_close(cv.dct_matrix(n), dct_1d(n), atol=1e-14, rtol=0)


@pytest.mark.parametrize("basis", cv.BASES)
@pytest.mark.parametrize("p", [1.0, -1.0, 0.5, -0.5, 2.3])
def test_apply_power_equals_dense_matrix_power(basis, p):
    C, H, W = 2, 4, 6
    s = random_s(C, H, W, basis)
    cov = cv.Covariance(s[None], basis)
    x = torch.randn(3, C, H, W)
    ref = (dense_sigma(s, basis, p) @ x.flatten(1).T).T.reshape(x.shape)
    torch.testing.assert_close(cov.apply(x, p), ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(cov.dense(p)[0], dense_sigma(s, basis, p), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("basis", cv.BASES)
def test_logdet_equals_dense_slogdet(basis):
    s = random_s(2, 4, 4, basis, seed=3)
    cov = cv.Covariance(s[None], basis)
    sign, logabsdet = torch.linalg.slogdet(dense_sigma(s, basis))
    assert sign == 1
    torch.testing.assert_close(cov.logdet()[0], logabsdet, atol=1e-10, rtol=0)


@pytest.mark.parametrize("basis", cv.BASES)
def test_drawn_noise_has_the_claimed_covariance(basis):
    C, H, W, N = 1, 3, 4, 40000
    s = random_s(C, H, W, basis, seed=1)
    cov = cv.Covariance(s[None].expand(N, C, H, W).contiguous(), basis)
    n, zeta = cov.sample(torch.Generator().manual_seed(0))
    S = dense_sigma(s, basis)
    emp = n.flatten(1).T @ n.flatten(1) / N
    se = torch.sqrt((S.diagonal()[:, None] * S.diagonal()[None, :] + S ** 2) / N)  # std. error of each entry
    z = ((emp - S) / se).triu()  # z-score of each distinct entry
    n_entries = S.shape[0] * (S.shape[0] + 1) / 2
    assert z.abs().max() < 4.5  # Bonferroni over ~80 entries: P(false alarm) < 1e-3
    assert 0.6 < z.square().sum() / n_entries < 1.5  # the z-scores have unit variance
    # zeta are the whitened basis coordinates: n = U^H (sqrt(s) zeta), E|zeta_k|^2 = 1
    torch.testing.assert_close(cov.Uh(cov.s.sqrt() * zeta), n)
    assert (zeta.abs().square().mean(0) - 1).abs().max() < 5 * math.sqrt(2 / N)


def dense_operator(f, C, H, W):
    d = C * H * W
    return f(torch.eye(d).view(d, C, H, W)).reshape(d, d).T


@pytest.mark.parametrize("basis,conv", [("fft", conv_circular), ("dct", conv_symmetric)])
def test_blur_is_the_convolution_with_the_right_boundaries(basis, conv):
    H = W = 8
    for b in (0.6, 1.5):
        prob = cv.blur_problem((1, 1, H, W), b, 0.1, basis)
        h1 = cv.gaussian_kernel_1d(b, H).numpy()
        x = torch.randn(1, 1, H, W)
        ref = conv(x[0, 0].numpy(), np.outer(h1, h1))
        np.testing.assert_allclose(prob.A(x)[0, 0].numpy(), ref, atol=1e-12)


@pytest.mark.parametrize("make", [
    lambda: cv.blur_problem((1, 2, 8, 8), 0.7, 0.05, "fft"),
    lambda: cv.blur_problem((1, 2, 8, 8), 0.7, 0.05, "dct"),
    lambda: cv.inpainting_problem(cv.box_mask((1, 1, 8, 8), 3, 1, 4), 2, 0.05),
    lambda: cv.sr_problem((1, 2, 8, 8), 2, 0.05, "fft"),
    lambda: cv.sr_problem((1, 2, 8, 8), 2, 0.05, "dct"),
])
def test_inverse_problem_becomes_denoising_with_exactly_sigma(make):
    """(M2) y~ = M y_obs is linear on informative coordinates: y~ - x = sigma M xi with M A = I there
    and Cov(sigma M xi) = Sigma; uninformative coordinates get s_huge."""
    prob = make()
    _, C, H, W = prob.a.shape
    cov = prob.covariance()
    U = basis_matrix(C, H, W, prob.basis)
    keep = prob.informative.flatten()
    P = U.conj().T[:, keep] @ U[keep, :]  # projector onto the informative coordinates
    P = P.real
    M = dense_operator(lambda e: prob.to_denoising(e, mean=0.0)[0], C, H, W)
    M = P @ M  # the informative part (the rest is the random fill)
    A = dense_operator(prob.A, C, H, W)
    torch.testing.assert_close(M @ A, P, atol=1e-9, rtol=0)  # noise-free: y~ = x on informative coords
    s_keep = cov.s.flatten()[keep].to(torch.complex128)
    S_keep = (U.conj().T[:, keep] @ torch.diag(s_keep) @ U[keep, :]).real  # P Sigma P without the s_huge part
    torch.testing.assert_close(prob.sigma_n ** 2 * M @ M.T, S_keep, atol=1e-9, rtol=1e-9)
    assert (cov.s.flatten()[~keep] == cv.S_HUGE).all()
    assert torch.allclose(cov.s.flatten()[keep], prob.sigma_n ** 2 / prob.a.flatten()[keep] ** 2)


def test_uninformative_coordinates_hold_the_mean_and_a_draw_there_would_change_no_answer():
    """M2 with the fill of docs/precision.md: where a_k carries no information, y~_k = mu_k exactly. A
    draw of variance s_huge there (M2's valid draw) changes neither the exact posterior mean (by
    c zeta / sqrt(s_huge) ~ 1e-5) nor -log p(y_obs) of blind deblurring (which removes its energy)."""
    import aebm
    import data
    import sample

    prob = cv.sr_problem((3, 1, 8, 8), 2, 0.1, "dct")
    ds = data.GaussianField(8, 1)
    x = ds.prior.sample(3, torch.Generator().manual_seed(0))
    y_obs = prob.measure(x, torch.Generator().manual_seed(1))
    y, cov = prob.to_denoising(y_obs, mean=0.5)
    off = ~prob.informative
    mu = cv.to_basis(torch.full_like(y, 0.5), "dct")
    assert (cv.to_basis(y, "dct") - mu)[off].abs().max() < 1e-12
    zeta = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    y_draw = y + cv.from_basis(torch.where(off, math.sqrt(cv.S_HUGE) * zeta, 0), "dct")
    assert (aebm.posterior_mean(ds.prior, y, cov) - aebm.posterior_mean(ds.prior, y_draw, cov)).abs().max() < 1e-4
    E = lambda yy: aebm.GaussianEnergy.energy_z(ds.prior, cv.to_basis(yy, "dct"), cov)
    fill = lambda yy: (0.5 * (cv.to_basis(yy - 0.5, "dct").square() / cv.S_HUGE + math.log(2 * math.pi * cv.S_HUGE))
                       )[off.expand_as(yy)].view(3, -1).sum(1)
    torch.testing.assert_close(E(y) - fill(y), E(y_draw) - fill(y_draw), atol=1e-3, rtol=0)


def test_masks_have_the_requested_geometry():
    m = cv.box_mask((1, 1, 8, 8), 3, 2, 4)[0, 0]
    assert m.sum() == 9 and m[2:5, 4:7].all()
    m = cv.box_mask((2, 1, 8, 8), torch.tensor([2, 4]))  # centred by default
    assert m[0, 0, 3:5, 3:5].all() and m[0].sum() == 4 and m[1, 0, 2:6, 2:6].all()
    assert cv.half_mask((1, 1, 6, 5), 2)[0, 0].sum() == 10
    assert cv.half_mask((1, 1, 6, 5), 0).sum() == 0
    r = cv.random_mask((1, 1, 100, 100), 0.3, torch.Generator().manual_seed(0))
    assert abs(r.float().mean().item() - 0.3) < 0.02
    cov = cv.mask_covariance(cv.box_mask((1, 1, 4, 4), 2), 1e8, 0.01, channels=3)
    assert cov.shape == (1, 3, 4, 4) and (cov.s[:, :, 1:3, 1:3] == 1e8).all() and cov.s.min() == 0.01
    pc = cv.patch_covariance(torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]]), 2)
    assert pc.s[0, 0, 0, 0] == 1 and pc.s[0, 0, 3, 3] == 4 and pc.shape == (1, 1, 4, 4)


def test_isotropic_covariance_is_sigma2_identity_in_every_basis():
    for basis in cv.BASES:
        cov = cv.isotropic(torch.tensor([0.5, 2.0]), (2, 1, 4, 4), basis)
        x = torch.randn(2, 1, 4, 4)
        torch.testing.assert_close(cov.apply(x), x * torch.tensor([0.5, 2.0]).view(2, 1, 1, 1))


def test_training_distribution_draws_valid_covariances():
    g = torch.Generator().manual_seed(0)
    B, C, H, W = 64, 3, 16, 16
    groups = cv.sample_training_covariances((B, C, H, W), "fft", generator=g, dtype=torch.float64)
    assert sum(idx.stop - idx.start for idx, _ in groups) == B
    assert [cov.basis for _, cov in groups] == ["pixel", "fft"]
    n_iso = 0
    for idx, cov in groups:
        assert cov.shape == (idx.stop - idx.start, C, H, W)
        assert cov.s.min() >= cv.S_MIN * 0.999 and cov.s.max() <= cv.S_HUGE
        iso = cov.s.flatten(1).amax(1) == cov.s.flatten(1).amin(1)
        n_iso += int(iso.sum())
    assert 1 <= n_iso <= 20  # ~10% of 64
    # an fft group passes the s[k] = s[-k] check in the constructor; a dct group works too
    groups = cv.sample_training_covariances((8, 1, 8, 8), "dct", generator=g)
    assert all(cov.s.dtype == torch.get_default_dtype() for _, cov in groups)


def test_p_hole_draws_inpainting_like_masks_and_zero_leaves_the_stream_unchanged():
    """--p-hole: the share of masks with one region's variance above 1 and the other's below 1e-2 (a
    hole, or its complement, observed) rises from 2 (3/7)(2/7) = 0.245 for independent log-uniform draws
    in [1e-4, 1e3] to p_hole 7/8 + (1 - p_hole) 0.245 (a box or half of the full size, 1 in 8, leaves
    nothing observed); p_hole = 0 draws nothing extra."""
    shape = (1000, 1, 8, 8)
    def task_like(p_hole, seed=0):
        groups = cv.sample_training_covariances(shape, "dct", p_isotropic=0.0, s_range=(1e-4, 1e3),
                                                generator=torch.Generator().manual_seed(seed), p_hole=p_hole)
        s = [cov.s for _, cov in groups if cov.basis == "pixel"][0].flatten(1)
        return ((s.amax(1) > 1) & (s.amin(1) < 1e-2)).float().mean().item(), groups
    plain, groups0 = task_like(0.0)
    assert abs(plain - 0.245) < 0.06  # ~500 masks: standard error 0.02
    boosted, _ = task_like(0.5)
    assert abs(boosted - (0.5 * 7 / 8 + 0.5 * 0.245)) < 0.06
    # p_hole = 0 gives exactly the draws of the default call (resumed runs and old results unchanged)
    default = cv.sample_training_covariances(shape, "dct", p_isotropic=0.0, s_range=(1e-4, 1e3),
                                             generator=torch.Generator().manual_seed(0))
    for (_, a), (_, b) in zip(groups0, default):
        torch.testing.assert_close(a.s, b.s, rtol=0, atol=0)


@pytest.mark.parametrize("bad,message", [
    (lambda: cv.Covariance(torch.zeros(1, 1, 2, 2), "pixel"), "positive"),
    (lambda: cv.Covariance(-torch.ones(1, 1, 2, 2), "pixel"), "positive"),
    (lambda: cv.Covariance(torch.full((1, 1, 2, 2), float("nan")), "pixel"), "finite"),
    (lambda: cv.Covariance(torch.full((1, 1, 2, 2), float("inf")), "pixel"), "finite"),
    (lambda: cv.Covariance(torch.ones(2, 2), "pixel"), r"\(B, C, H, W\)"),
    (lambda: cv.Covariance(torch.ones(1, 1, 2, 2), "wavelet"), "unknown basis"),
    (lambda: cv.Covariance(torch.arange(1.0, 10.0).view(1, 1, 3, 3), "fft"), "s\\[k\\] = s\\[-k\\]"),
    (lambda: cv.box_mask((1, 1, 8, 8), 9), "box size 9"),
    (lambda: cv.box_mask((1, 1, 8, 8), 4, 6, 0), "leaves"),
    (lambda: cv.half_mask((1, 1, 8, 8), 9), "rows"),
    (lambda: cv.random_mask((1, 1, 8, 8), 1.5), "fraction"),
    (lambda: cv.sr_problem((1, 1, 8, 8), 3, 0.1), "dividing"),
    (lambda: cv.blur_problem((1, 1, 8, 8), -1.0, 0.1), "blur std"),
    (lambda: cv.blur_problem((1, 1, 8, 8), 1.0, -0.1), "noise level"),
    (lambda: cv.blur_problem((1, 1, 8, 8), 1.0, 0.1, "pixel"), "spectral basis"),
    (lambda: cv.isotropic(-1.0, (1, 1, 2, 2)), "sigma2"),
    (lambda: cv.mask_covariance(cv.box_mask((1, 1, 4, 4), 2), 0.0, 1.0, 1), "s_missing"),
])
def test_bad_input_raises_a_clear_value_error(bad, message):
    with pytest.raises(ValueError, match=message):
        bad()


def test_p_random_draws_scattered_pixel_masks_and_zero_leaves_the_stream_unchanged():
    """--p-random: that share of masks is missing pixel by pixel, at a fraction between 5 and 95 %; such a mask
    is no box or half (its missing pixels are neither one rectangle nor the rows below one); p_random = 0
    draws nothing extra."""
    shape, s_range = (600, 1, 16, 16), (1e-4, 1e3)
    def masks(p_random):
        groups = cv.sample_training_covariances(shape, "dct", p_isotropic=0.0, s_range=s_range, p_hole=1.0,
                                                generator=torch.Generator().manual_seed(0), p_random=p_random)
        return groups, [cov.s for _, cov in groups if cov.basis == "pixel"][0]
    def scattered(s):  # the hole (variance >= 1) is not its own bounding box
        hole = s[0] >= 1
        if not hole.any():
            return False
        rows, cols = hole.any(1).nonzero(), hole.any(0).nonzero()
        return hole.sum() < (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    _, s0 = masks(0.0)
    assert not any(scattered(s) for s in s0)
    _, s1 = masks(0.4)
    share = sum(scattered(s) for s in s1) / len(s1)
    assert abs(share - 0.4) < 0.07  # ~300 masks: standard error 0.03
    fractions = [(s[0] >= 1).float().mean().item() for s in s1 if scattered(s)]
    assert min(fractions) > 0.0 and max(fractions) < 1.0 and 0.35 < sum(fractions) / len(fractions) < 0.65
    default = cv.sample_training_covariances(shape, "dct", p_isotropic=0.0, s_range=s_range, p_hole=1.0,
                                             generator=torch.Generator().manual_seed(0))
    for (_, a), (_, b) in zip(masks(0.0)[0], default):
        torch.testing.assert_close(a.s, b.s, rtol=0, atol=0)
