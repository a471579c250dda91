"""Your own photographs: a prior learned from random crops of a folder at the photographs' own resolution,
a restorer that checks whether its prior explains a photograph, and progress lines on long work."""

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

import aebm
import covariances as cv
import data
import nets
import sample
import train
from experiments import photos


def position_image(path, width, height):
    """A picture whose red and green channels are its own column and row: any crop tells where it was taken."""
    j, i = np.meshgrid(np.arange(width), np.arange(height))
    arr = np.stack([j % 256, i % 256, (i + j) % 256], axis=-1).astype(np.uint8)
    Image.fromarray(arr).save(path)
    return arr


def test_random_crops_are_windows_of_the_photographs_at_their_own_resolution_split_by_file(tmp_path):
    arrays = {f"p{k}.png": position_image(tmp_path / f"p{k}.png", 90 + 10 * k, 70) for k in range(9)}
    position_image(tmp_path / "p9.png", 120, 64)
    arrays["p9.png"] = np.asarray(Image.open(tmp_path / "p9.png"))
    train_ds = data.load_dataset("folder", 16, 3, str(tmp_path), "train", crop="random")
    test_ds = data.load_dataset("folder", 16, 3, str(tmp_path), "test", crop="random")
    assert not set(train_ds.files) & set(test_ds.files) and len(test_ds.files) == 1  # held out by file
    x = train_ds.get_batch(300, torch.Generator().manual_seed(0))
    assert x.shape == (300, 3, 16, 16)
    places = set()
    for crop in (x * 255).round().to(torch.uint8).numpy():
        left, top = int(crop[0, 0, 0]), int(crop[1, 0, 0])
        matches = [name for name, arr in arrays.items() if top + 16 <= arr.shape[0] and left + 16 <= arr.shape[1]
                   and (arr[top : top + 16, left : left + 16].transpose(2, 0, 1) == crop).all()]
        assert matches, (left, top)  # every crop is a window of one of the files, at full resolution
        places.add((top, left))
    assert len(places) > 250  # distinct crops: a few photographs give many training images


def test_jpeg_scale_and_too_small_photographs(tmp_path):
    leaves = photos.make_folder(str(tmp_path / "leaves"), n=8, width=80, height=48)
    assert sum(p.endswith(".jpg") for p in leaves) == 2 and sum(p.endswith(".png") for p in leaves) == 6
    ds = data.load_dataset("folder", 16, 3, str(tmp_path / "leaves"), "train", crop="random", scale=0.5)
    ds.get_batch(4, torch.Generator().manual_seed(0))
    assert all(img.shape == (3, 24, 40) for img in ds.decoded.values())  # shrunk by half before cropping
    assert 0.3 < ds.mean < 0.7 and 0.02 < ds.var < 0.15
    with pytest.raises(ValueError, match="smaller than the 32x32 crops"):
        data.load_dataset("folder", 32, 3, str(tmp_path / "leaves"), "train", crop="random", scale=0.5)


def test_photos_preset_trains_on_crops_and_every_tool_rebuilds_the_same_data(tmp_path, capsys):
    photos.make_folder(str(tmp_path / "leaves"), n=6, width=64, height=48)
    flags = ["--preset", "photos", "--dataset", "folder", "--data-dir", str(tmp_path / "leaves"), "--img-size", "16",
             "--config", "tiny", "--batch", "4", "--steps", "2", "--out", str(tmp_path / "run"), "--val-batch", "4",
             "--val-restore", "0", "--device", "cpu"]
    train.main(flags)
    config = nets.load_checkpoint(str(tmp_path / "run" / "ckpt.pt"))["config"]
    assert config["crop"] == "random" and config["data_dir"] == os.path.abspath(tmp_path / "leaves")
    energy, config, ds = sample.load_prior(sample.parse_args(["--ckpt", str(tmp_path / "run" / "ckpt.pt")]), "cpu")
    assert isinstance(ds, data.FileImages) and ds.crop == "random" and ds.files[0].startswith(config["data_dir"])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        train.parse_args(["--preset", "photos"])  # crops need a folder
    assert "--crop random" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_power_law_gaussian_fitted_to_an_observation_explains_a_field_nearly_as_the_exact_prior(dtype):
    """A Gaussian field's spectrum is close to a power law, so the 1/f Gaussian fitted to one noisy 48 x 64
    draw has nearly the evidence of the field's exact prior (and never much better: its three numbers per
    channel cannot overfit)."""
    field = data.GaussianField((48, 64), 3)
    x = field.prior.sample(1, torch.Generator().manual_seed(0))
    for prob in (cv.denoising_problem(x.shape, 0.05), cv.denoising_problem(x.shape, 0.2)):
        y_obs = prob.measure(x, torch.Generator().manual_seed(1)).to(dtype)
        exact, fitted, _ = aebm.evidence(field.prior, y_obs, prob)
        assert -0.002 < fitted - exact < 0.03, (fitted, exact)


def write(path, x):
    Image.fromarray((x[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)).save(path)
    return str(path)


def test_the_evidence_check_warns_when_the_prior_does_not_explain_the_photograph(tmp_path, capsys):
    """--prior exact is the Gaussian field's density: it explains a noisy field photograph better than a 1/f
    Gaussian fitted to it (no warning), and a noisy dead-leaves photograph worse (one line of warning)."""
    field = data.GaussianField((48, 64), 3).prior.sample(1, torch.Generator().manual_seed(0)).float()
    leaves = data.DeadLeaves(64, 3).get_batch(1, torch.Generator().manual_seed(0))[..., :48, :]
    for name, x in (("field", field), ("leaves", leaves)):
        noisy = x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
        report = sample.main(["--prior", "exact", "--channels", "3", "--observed", write(tmp_path / f"{name}.png", noisy),
                              "--task", "denoise", "--noise", "0.05", "--sampler", "mean", "--out", str(tmp_path / "o")])
        out = capsys.readouterr().out
        assert "evidence, -log p(observation) per dimension" in out
        assert ("warning: the model explains this image worse" in out) == (name == "leaves"), out
        assert (report["evidence"]["model"] > report["evidence"]["gaussian_1/f"]) == (name == "leaves")


def test_progress_lines_count_every_evaluation_and_quiet_silences_them():
    field = data.GaussianField(8, 1)
    x = field.prior.sample(2, torch.Generator().manual_seed(0))
    y, cov = cv.blur_problem(x.shape, 1.0, 0.05, "fft").to_denoising(
        cv.blur_problem(x.shape, 1.0, 0.05, "fft").measure(x, torch.Generator().manual_seed(1)), 0.5)
    for schedule, correctors in (("geometric", 1), ("adaptive", 2)):
        stream = io.StringIO()
        progress = data.Progress("sampling", 10 * (1 + correctors + (schedule == "adaptive")), first=0, every=0,
                                 stream=stream)
        res = sample.reverse_diffusion(field.prior, y, cov, levels=10, s_end=1e-3, n_corrector=correctors,
                                       schedule=schedule, progress=progress)
        progress.close()
        lines = stream.getvalue().splitlines()
        assert progress.done == res.evaluations - 1 == progress.total  # all but the first evaluation, per level
        assert len(lines) == 10 and "evaluations |" in lines[0] and "eta" in lines[0], lines
        assert lines[-1].startswith(f"sampling: {progress.total} evaluations in")
    quiet = data.Progress("x", 5, quiet=True, first=0, every=0, stream=io.StringIO())
    for _ in range(5):
        quiet(1)
    quiet.close()
    assert quiet.stream.getvalue() == ""


def test_band_power_of_white_noise_is_its_variance_in_every_band():
    """The orthonormal DCT keeps white noise white: every radial band holds the noise variance."""
    x = 0.1 * torch.randn(16, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    assert np.allclose(photos.band_power(x), 0.01, rtol=0.1)


def test_spectrum_of_the_exact_priors_samples_matches_its_images():
    """The diagnosis of miscalibrated samples, on a prior whose samples are right: the Gaussian field's
    exact energy generates images with the images' power in every band (ratio within 25 %)."""
    prior = data.GaussianField((24, 32), 1).prior
    x = prior.sample(32, torch.Generator().manual_seed(1))
    truth, model = photos.spectrum(prior, x, levels=100)
    assert all(0.8 < m / t < 1.25 for t, m in zip(truth, model)), [m / t for t, m in zip(truth, model)]
