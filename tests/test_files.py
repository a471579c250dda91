"""Claims about restoring one's own image files with sample.py (--input, --observed, --mask-file):
any size and channel count, every task in both modes, the same answer as the simulated path for a
known degradation, and clear errors for bad files."""

import json
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

H, W = 37, 50  # an awkward size: odd, not square, not a power of two


def write_image(path, channels, h=H, w=W, seed=0):
    """A smooth test picture (a Gaussian-field draw, clipped) as an 8-bit PNG."""
    x = data.GaussianField((h, w), channels).prior.sample(1, torch.Generator().manual_seed(seed))[0].clamp(0, 1)
    arr = (x.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    Image.fromarray(arr[..., 0] if channels == 1 else arr).save(path)
    return path


def run(tmp_path, *argv):
    return sample.main(["--prior", "exact", "--sampler", "mean", "--out", str(tmp_path / "out"), *argv])


@pytest.mark.parametrize("channels", [1, 3])
def test_every_task_restores_an_awkward_size_image_in_both_modes(tmp_path, channels):
    path = write_image(tmp_path / "photo.png", channels)
    ch = ["--channels", str(channels)]
    for task in ("denoise", "inpaint", "deblur", "sr"):
        rep = run(tmp_path, "--input", str(path), "--task", task, *ch)
        out = Image.open(rep["outputs"][0])
        assert out.size == (W, H), (task, out.size)
        assert rep["psnr_mean"] > 15, (task, rep)  # a restoration (one image: no Bayes comparison here)
        assert "psnr_mean" in json.load(open(os.path.splitext(rep["outputs"][0])[0].replace("_restored", "") + ".json"))
    degraded = {}
    for task in ("denoise", "inpaint", "deblur"):  # restore the simulated observations as if they were photos
        rep = run(tmp_path, "--input", str(path), "--task", task, *ch)
        obs = [p for p in rep["outputs"] if p.endswith("_observation.png")][0]
        degraded[task] = obs
    mask = tmp_path / "mask.png"
    m = np.zeros((H, W), np.uint8)
    m[10:20, 15:35] = 255  # white = missing
    Image.fromarray(m).save(mask)
    blind_noise = [] if channels == 1 else ["--noise", "0.05"]  # the blind search runs dense energies: grey only
    for task, extra in (("denoise", []), ("inpaint", ["--mask-file", str(mask), *blind_noise]), ("deblur", [])):
        rep = run(tmp_path, "--observed", degraded[task], "--task", task, *ch, *extra)
        assert Image.open(rep["outputs"][0]).size == (W, H) and "psnr_mean" not in rep
        assert rep["mode"] == "observed" and "noise" in rep["estimates"]
    small = write_image(tmp_path / "small.png", channels, 19, 25)
    rep = run(tmp_path, "--observed", str(small), "--task", "sr", "--sr-factor", "2", "--noise", "0.01", *ch)
    assert Image.open(rep["outputs"][0]).size == (50, 38)  # r times the small image


def test_blind_estimates_of_a_photo_find_the_degradation_it_was_given(tmp_path):
    """--observed without --noise / --blur-std: the estimate is the truth for a simulated photo."""
    path = write_image(tmp_path / "photo.png", 1, 48, 48, seed=3)
    rep = run(tmp_path, "--input", str(path), "--task", "deblur", "--blur-std", "2.0", "--noise", "0.02",
              "--channels", "1", "--seed", "1")
    obs = [p for p in rep["outputs"] if p.endswith("_observation.png")][0]
    rep = run(tmp_path, "--observed", obs, "--task", "deblur", "--channels", "1")
    assert rep["estimates"] == {"blur_std": 2.0, "noise": 0.02}


def test_observed_restoration_equals_the_simulated_one_for_a_known_degradation():
    ds = data.GaussianField((H + 1, W), 3)
    x = ds.prior.sample(1, torch.Generator().manual_seed(0))
    prior = ds.prior
    for argv in (["--task", "deblur", "--blur-std", "1.5", "--basis", "fft"], ["--task", "denoise"],
                 ["--task", "sr", "--sr-factor", "2", "--basis", "dct"]):
        args = sample.parse_args(argv + ["--noise", "0.05"])
        y, cov, y_obs, _ = sample.observe(args, x, prior.mean, torch.Generator().manual_seed(1))
        x_in = aebm.posterior_mean(prior, y, cov)
        if args.task == "sr":  # the photo is the small image: DCT-domain down-sampling of the measurement
            h, w = y_obs.shape[-2] // 2, y_obs.shape[-1] // 2
            small = cv.from_basis(cv.to_basis(y_obs, "dct")[..., :h, :w] / 2, "dct")
            y_obs = cv.upscale_grid(small, 2)
            args.noise = 0.025  # the small image's noise: the large grid's divided by r
        obs_args = sample.parse_args(argv + ["--noise", str(args.noise), "--observed", "photo.png"])
        y2, cov2, _, _ = sample.observed_problem(obs_args, prior, y_obs)
        torch.testing.assert_close(aebm.posterior_mean(prior, y2, cov2), x_in, atol=1e-9, rtol=0)
    # inpainting: the simulated hole holds a draw of variance s_huge, the photo's the mean: 1e-5 apart
    args = sample.parse_args(["--task", "inpaint", "--noise", "0.05"])
    y, cov, y_obs, missing = sample.observe(args, x, prior.mean, torch.Generator().manual_seed(1))
    obs_args = sample.parse_args(["--task", "inpaint", "--noise", "0.05", "--observed", "photo.png"])
    y2, cov2, _, _ = sample.observed_problem(obs_args, prior, y_obs, missing)
    torch.testing.assert_close(aebm.posterior_mean(prior, y2, cov2), aebm.posterior_mean(prior, y, cov),
                               atol=1e-4, rtol=0)


def test_a_trained_unet_restores_an_awkward_size_image(tmp_path):
    import train

    train.main(["--dataset", "deadleaves", "--img-size", "16", "--channels", "3", "--config", "tiny", "--batch", "2",
                "--steps", "1", "--out", str(tmp_path / "run"), "--device", "cpu", "--val-batch", "2"])
    path = write_image(tmp_path / "photo.png", 3)
    for task in ("deblur", "sr"):
        rep = sample.main(["--ckpt", str(tmp_path / "run" / "ckpt.pt"), "--input", str(path), "--task", task,
                           "--sampler", "ula", "--steps", "3", "--out", str(tmp_path / "out")])
        assert Image.open(rep["outputs"][0]).size == (W, H) and len(rep["outputs"]) == 3


def test_bad_files_give_clear_errors(tmp_path, monkeypatch):
    path = write_image(tmp_path / "photo.png", 1)
    (tmp_path / "notes.png").write_text("not an image")
    small_mask = tmp_path / "mask.png"
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(small_mask)
    with pytest.raises(ValueError, match="is not an image pillow can read"):
        run(tmp_path, "--input", str(tmp_path / "notes.png"))
    with pytest.raises(FileNotFoundError, match="no image file"):
        run(tmp_path, "--input", str(tmp_path / "missing.png"))
    with pytest.raises(ValueError, match="mask .* is 10x10 .* but the image is 50x37"):
        run(tmp_path, "--observed", str(path), "--task", "inpaint", "--mask-file", str(small_mask), "--noise", "0.05")
    monkeypatch.setattr(nets, "free_bytes", lambda device: 1000)
    import train
    train.main(["--dataset", "deadleaves", "--img-size", "16", "--config", "tiny", "--batch", "2", "--steps", "1",
                "--out", str(tmp_path / "run"), "--device", "cpu", "--val-batch", "2"])
    with pytest.raises(MemoryError, match="needs about .* GiB .* are free"):
        sample.main(["--ckpt", str(tmp_path / "run" / "ckpt.pt"), "--input", str(path), "--out", str(tmp_path / "o")])


@pytest.mark.parametrize("shape,multiple", [((1, 1, 5, 7), 4), ((1, 2, 2, 3), 8), ((1, 1, 8, 8), 4)])
def test_symmetric_padding_is_numpys_half_sample_reflection(shape, multiple):
    x = torch.rand(shape)
    H, W = shape[-2:]
    ref = np.pad(x.numpy(), ((0, 0), (0, 0), (0, -H % multiple), (0, -W % multiple)), mode="symmetric")
    np.testing.assert_array_equal(data.pad_symmetric(x, multiple).numpy(), ref)
