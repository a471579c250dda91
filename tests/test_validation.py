"""The validation experiments of docs/results.md §2-3 at CI scale (marked slow): dual score matching yields
a normalized energy, DSM alone does not (the paper's Appendix D.5 toy), and learned image models
are compared with the exact density of the built-in Gaussian field. Figures in docs/results.md come
from the documented commands (longer runs); these tests assert conservative versions."""

import pytest
import torch

from experiments import mixture


@pytest.mark.slow
def test_mixture_dual_energy_is_normalized_and_dsm_only_drifts():
    dual16, dsm16 = (mixture.train_mixture(16, lam, steps=600) for lam in (1.0, 0.0))
    off_dual, off_dsm = mixture.offsets(dual16, 16, mixture.LEVELS), mixture.offsets(dsm16, 16, mixture.LEVELS)
    spread = lambda o: max(o) - min(o)
    assert spread(off_dual) < 0.3  # measured 0.13 nats over s in [1e-2, 1e2]
    assert spread(off_dsm) > 2 * spread(off_dual) and spread(off_dsm) > 0.5  # measured 0.89
    assert max(abs(o) for o in off_dual) < 0.3  # and the constant itself is ~0 (large-s anchor)

    dual2, dsm2 = (mixture.train_mixture(2, lam, steps=600) for lam in (1.0, 0.0))
    ints_dual = [mixture.integral_2d(dual2, *s) for s in mixture.SIGMAS_2D]
    ints_dsm = [mixture.integral_2d(dsm2, *s) for s in mixture.SIGMAS_2D]
    # measured after 600 steps over seeds 0-3: dual 0.975 .. 1.067 (seed 0: 1.012 .. 1.067)
    assert all(abs(v - 1) < 0.1 for v in ints_dual), ints_dual
    assert max(abs(v - 1) for v in ints_dsm) > 0.2, ints_dsm  # measured 0.6 at Sigma = (0.01, 0.1)


def test_mixture_true_energy_is_the_closed_form_density():
    """The reference itself: exp(-E_true) integrates to 1 in d = 2 and matches torch.distributions."""
    for s1, s2 in [(0.01, 0.1), (1.0, 10.0)]:
        assert abs(mixture.integral_2d(mixture.true_energy, s1, s2) - 1) < 1e-3
    y = torch.randn(5, 1, 1, 4)
    in_a = torch.tensor([[True, True, False, False]]).expand(5, 4)
    cov = mixture.group_covariance(torch.full((5,), 0.3), torch.full((5,), 2.0), in_a)
    var = torch.tensor([0.3, 0.3, 2.0, 2.0])
    comps = [torch.distributions.Normal(m, (v + var).sqrt()).log_prob(y.flatten(1)).sum(1)
             for m, v in zip(mixture.MEANS, mixture.VARS)]
    ref = -torch.logsumexp(torch.stack(comps) + torch.log(torch.tensor(0.5)), 0)
    torch.testing.assert_close(mixture.true_energy(y, cov), ref)


@pytest.mark.slow
def test_learned_gaussian_field_energies_approach_the_exact_density(tmp_path):
    """CI scale: 8x8 field, tiny UNet, 300 steps each for dual and DSM-only. Measured here: NLL 7.535
    (dual) / 7.480 (DSM) vs 7.466 bits/dim exact; MSE/Bayes 1.10 / 1.09 (inpainting), 1.02 / 1.02
    (deblurring); blind accuracy 0.67 / 0.67 vs 1.00 exact. At this scale the M3 Gaussian anchor
    keeps even the DSM-only model close to normalized, so this test does not claim dual > DSM
    (the mixture test does; docs/results.md §3 has the longer image runs)."""
    from experiments import gaussian_images as gi

    models = gi.train_pair(8, "tiny", 300, str(tmp_path))
    rows = gi.evaluate(models, 8)
    assert rows["exact"]["blind"] == 1.0
    assert abs(rows["exact"]["mse_inpaint"] - 1) < 0.01 and abs(rows["exact"]["mse_deblur"] - 1) < 0.01  # float32 Tweedie
    for name in ("dual", "dsm"):
        r = rows[name]
        assert abs(r["bpd"] - rows["exact"]["bpd"]) < 0.2, rows
        assert 0.95 < r["mse_inpaint"] < 1.3 and 0.95 < r["mse_deblur"] < 1.15, rows
        assert r["blind"] >= 0.5, rows
    # The offset of issue "normalization across noise levels" on the same two models (docs/results.md §2):
    # (E_model - E_exact)/d over isotropic sigma^2 in [1e-6, 1], spread = max - min of its mean over 64 images.
    from experiments import normalization as nz
    import data
    ds = data.load_dataset("gaussian", 8, 1)
    x = ds.get_batch(64, torch.Generator().manual_seed(70_000)).double()
    spread = {}
    for name in ("dual", "dsm"):
        iso = [r["offset"] for r in nz.offsets(models[name], ds.prior, x) if r["name"].startswith("iso") and r["s"] <= 1]
        spread[name] = max(iso) - min(iso)
    # The untrained model (F = 0, b = 0: M3's Gaussian anchor N(mu, sigma_d^2 I)) has spread 0.165 nats/dim here
    # (1/2 mean log(sigma_d^2 / c_k) over the field's spectrum c). Measured on these models: dual 0.098, DSM-only 0.025
    # (with train.py's cosine schedule, 300 / 1000 steps: dual 0.084 / 0.077). The dual model must have removed over a
    # quarter of the anchor's offset. DSM-only is not compared: nothing trains its low-noise constant, which is
    # whatever F extrapolates to (0.025 here, 0.30 for the 16x16 small model of docs/results.md §2); the
    # mixture test above is the CI-scale proof that dual normalizes and DSM-only drifts.
    assert spread["dual"] < 0.12, spread
    # Images ranked by probability (experiments/probability.py): the learned log p must rank held-out images as
    # the exact density does.
    from experiments import probability as pr
    ranked = {name: pr.analyse(models[name], x, str(tmp_path / name), exact=ds.prior) for name in ("dual", "dsm")}
    print({name: (r["exact_spearman"], r["mean_difference"]) for name, r in ranked.items()})
    assert ranked["dual"]["exact_spearman"] > 0.8, ranked["dual"]
    path = gi.plot_candidates(models, 8, str(tmp_path / "blind.png"))
    assert path.endswith(".png")


def test_normalization_measures_the_exact_energy_as_normalized(capsys):
    """experiments.normalization's whole pipeline run on the field's exact energy (float32 inputs, 8x8): every
    cell's offset is zero, the posterior mean is Bayes, NLL is the exact one, blind deblurring agrees with itself,
    and random masks count among the trained families exactly when the config says training drew them."""
    import data
    from experiments import normalization as nz
    ds = data.load_dataset("gaussian", 8, 1)
    res = nz.measure({"plain": (ds.prior, {"p_random": 0.0}), "random": (ds.prior, {"p_random": 0.33}), "old": (ds.prior, {})},
                     size=8, n=16, deblur_n=2)
    for name in ("plain", "random"):
        r = res[name]
        assert max(abs(c["offset"]) for c in r["rows"]) < 1e-4 and r["spread"] < 1e-4
        assert max(abs(c["mse_ratio"] - 1) for c in r["rows"]) < 1e-3
        assert abs(r["nll"] - res["exact"]["nll"]) < 1e-4 and abs(r["nll_spectral"] - res["exact"]["nll"]) < 1e-4
        assert r["deblur"][0] == 1.0 and r["deblur"][4] == 2 * len(nz.BLIND_BLURS) * len(nz.BLIND_NOISES)
        assert len([c for c in r["rows"] if c["name"] == "isotropic, fft"]) == len(nz.LEVELS)  # sigma^2 I in both bases
    random_rows = [c for c in res["plain"]["rows"] if c["name"].startswith("random")]
    assert len(random_rows) == 6  # three fractions at two noises
    assert len(nz.trained_rows(res["random"])) == len(res["random"]["rows"])
    assert len(nz.trained_rows(res["plain"])) == len(res["plain"]["rows"]) - len(random_rows)
    assert len(nz.trained_rows(res["old"])) == len(res["old"]["rows"])  # not recorded: they count (stricter)
    nz.print_report(res)
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith(("plain:", "random:", "old:"))]
    assert "(unseen)" in lines[0] and "(drawn in training)" in lines[1] and "(training draw not recorded)" in lines[2]


def test_the_mse_ratio_standard_error_matches_the_bootstrap():
    """experiments.normalization reports each cell's MSE/Bayes with a delta-method standard error; on per-image
    errors drawn like a cell's (Bayes MSE varying from image to image, the model's a noisy multiple of it) it
    must agree with the bootstrap's spread of the same ratio, and shrink as 1/sqrt(n)."""
    from experiments import normalization as nz
    g = torch.Generator().manual_seed(0)
    for n in (64, 512):
        bayes = torch.rand(n, generator=g, dtype=torch.float64).mul(2).add(0.2) ** 2
        mse = bayes * (1.05 + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)) + 0.01 * torch.rand(n, generator=g, dtype=torch.float64)
        ratio, se = nz.ratio_and_error(mse, bayes)
        assert abs(ratio - (mse.sum() / bayes.sum()).item()) < 1e-12
        idx = torch.randint(0, n, (4000, n), generator=g)
        boot = (mse[idx].sum(1) / bayes[idx].sum(1)).std().item()
        assert abs(se / boot - 1) < 0.1, (n, se, boot)


def test_a_normalized_but_wrong_model_has_a_positive_offset_its_kl_that_noise_shrinks():
    """What the offsets of docs/results.md §2 can and cannot say. Over y ~ p(y; Sigma) the mean of
    (E_q - E_p)/d is KL(p_Sigma || q_Sigma)/d - log Z_q/d: a normalized model (Z_q = 1) that fits imperfectly
    sits above the exact energy by its KL, and adding the same noise to both densities can only shrink that
    (data processing). So a positive offset that falls with sigma^2 is fit, while a negative one, or one that
    rises with sigma^2, is normalization. Checked on the field against a normalized Gaussian with a flatter
    spectrum, whose KL is closed form: both are diagonal in the fft basis with variances c + s and c' + s."""
    import aebm
    import covariances as cv
    import data

    field = data.GaussianField(16, 1)
    c = field.spectrum.s
    c_wrong = c ** 0.8 * c.mean() ** 0.2  # a normalized density with the wrong spectrum
    wrong = aebm.GaussianEnergy(field.mean, cv.Covariance(c_wrong, "fft"))
    g, n, d = torch.Generator().manual_seed(0), 2048, c.numel()
    x = field.prior.sample(n, g)
    offsets = []
    for s in (1e-4, 1e-2, 1.0):
        cov = cv.isotropic(s, x.shape, "fft", dtype=torch.float64)
        y = x + cov.sample(g)[0]
        gap = (wrong(y, cov) - field.prior(y, cov)) / d
        ratio = (c + s) / (c_wrong + s)
        kl = 0.5 * (ratio - 1 - ratio.log()).sum().item() / d
        assert abs(gap.mean().item() - kl) < 4 * gap.std().item() / n ** 0.5 + 1e-12, (s, gap.mean().item(), kl)
        offsets.append(kl)
    assert offsets[0] > offsets[1] > offsets[2] > 0, offsets
    assert offsets[0] > 0.01  # large enough that the first assertion tells the KL from zero


@pytest.mark.slow
def test_normalization_trains_its_pair_side_by_side_as_one_after_the_other(tmp_path, capfd):
    """experiments.normalization trains dual and DSM-only each in its own process on half the cores; the
    checkpoints are those of training them one after the other in this process (up to float summation order),
    with lambda 1 and 0 and the same flags, and every line the two print says which run it is from."""
    from experiments import normalization as nz
    extra = ["--p-hole", "0.25", "--p-random", "0.33"]
    pair = nz.train_pair(str(tmp_path / "pair"), 3, extra, side_by_side=True)
    lines = [l for l in capfd.readouterr().out.splitlines() if l.strip()]
    assert len(lines) >= 8 and all(l.startswith(("[dual] ", "[dsm] ")) for l in lines), lines
    assert any("lam 1.0" in l for l in lines if l.startswith("[dual] "))
    assert any("lam 0.0" in l for l in lines if l.startswith("[dsm] "))
    alone = nz.train_pair(str(tmp_path / "alone"), 3, extra, side_by_side=False)
    for name, lam in (("dual", 1.0), ("dsm", 0.0)):
        (e1, c1), (e2, c2) = pair[name], alone[name]
        assert c1["lam"] == c2["lam"] == lam and c1["p_hole"] == c2["p_hole"] == 0.25
        for (k, v1), v2 in zip(e1.state_dict().items(), e2.state_dict().values()):
            torch.testing.assert_close(v1, v2, rtol=1e-4, atol=1e-6, msg=k)
    # and the two processes did train different models (the covariance score loss moved the dual one)
    assert any(not torch.allclose(a, b) for a, b in zip(pair["dual"][0].parameters(), pair["dsm"][0].parameters()))
