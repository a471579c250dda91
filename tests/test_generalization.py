"""Claims about finite training sets (train.py --train-images, data.finite_subset) and the strong-generalization
measurements (experiments/generalization.py): subsets are disjoint, reproducible and recorded in the checkpoint,
training draws from nothing else, and the pair's measurements tell a density that generalises (the exact one)
from one that memorises (a Gaussian on its own training image), which they must."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import aebm
import covariances as cv
import data
import nets
import train
from experiments import generalization as gen

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name,size", [("gaussian", 16), ("deadleaves", 32)])
def test_generated_subsets_are_disjoint_reproducible_and_the_only_images_drawn(name, size):
    ds = data.load_dataset(name, size, 1)
    a, b = data.finite_subset(ds, 5, 0), data.finite_subset(ds, 5, 1)
    assert a.images.shape == (5, 1, size, size) and a.ids.tolist() == [0, 1, 2, 3, 4] and b.ids.tolist() == [5, 6, 7, 8, 9]
    torch.testing.assert_close(data.finite_subset(ds, 5, 0).images, a.images, rtol=0, atol=0)  # the same set again
    assert not (a.images.flatten(1)[:, None] == b.images.flatten(1)[None]).all(-1).any()  # no image shared
    x = train.draw_batch(a, 64, torch.Generator().manual_seed(0), "cpu", torch.float32)
    set_and_mirrors = torch.cat([a.images, a.images.flip(-1)]).flatten(1)
    assert (x.flatten(1)[:, None] == set_and_mirrors[None]).all(-1).any(1).all()  # each draw: a set image or its mirror
    assert a.mean == pytest.approx(a.images.mean().item()) and a.var == pytest.approx(a.images.var().item())


def test_subsets_on_disk_are_disjoint_index_sets_of_the_training_split(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (10, 3, 8, 8), dtype=np.uint8)
    ds = data.ArrayImages(arr, 8)
    a, b = data.finite_subset(ds, 4, 0), data.finite_subset(ds, 4, 1)
    assert len(a) == 4 and not set(a.ids.tolist()) & set(b.ids.tolist())
    np.testing.assert_array_equal(a.images, arr[a.ids.numpy()])  # still uint8, the rows the ids name
    with pytest.raises(ValueError, match="needs 12 training images and the dataset has 10"):
        data.finite_subset(ds, 4, 2)
    for i in range(6):  # a folder of photographs: the subset is files, each still cropped at random
        Image.fromarray(np.full((40, 50, 3), 40 * i, np.uint8)).save(tmp_path / f"p{i}.png")
    photos = data.load_dataset("folder", 16, 3, str(tmp_path), crop="random")
    sub = data.finite_subset(photos, 2, 1)
    assert len(sub) == 2 and sub.crop == "random" and set(sub.files) == {photos.files[int(i)] for i in sub.ids}
    assert sub.get_batch(3, torch.Generator().manual_seed(0)).shape == (3, 3, 16, 16)


def test_train_records_the_subset_and_the_checkpoint_finds_the_same_images(tmp_path):
    out = str(tmp_path / "run")
    flags = ["--dataset", "gaussian", "--img-size", "8", "--channels", "1", "--config", "tiny", "--batch", "4",
             "--device", "cpu", "--log-every", "1", "--eval-every", "100", "--val-restore", "0", "--val-batch", "2",
             "--train-images", "3", "--subset", "1", "--out", out]
    train.main(flags + ["--steps", "2"])
    energy, config = nets.load_energy(os.path.join(out, "ckpt.pt"))
    assert config["train_images"] == 3 and config["subset"] == 1
    expected = data.finite_subset(data.load_dataset("gaussian", 8, 1), 3, 1)
    torch.testing.assert_close(data.dataset_for(config, "train").images, expected.images, rtol=0, atol=0)
    assert config["data_mean"] == pytest.approx(expected.mean)  # M3's mu is the set's own
    assert data.dataset_for(config, "test").get_batch(2).shape == (2, 1, 8, 8)  # held-out images: the dataset's own
    with pytest.raises(ValueError, match="another configuration.*train_images"):
        train.main([f if f != "3" else "4" for f in flags] + ["--steps", "3", "--resume"])
    with pytest.raises(SystemExit):
        train.main(["--subset", "1", "--out", str(tmp_path / "x")])  # a subset of what? refused at parse time


def test_command_line_errors_are_one_line(tmp_path):
    # its own --out: the default (runs/quick) may hold a user's quickstart run, refused before the data are read
    r = subprocess.run([sys.executable, "train.py", "--dataset", "folder", "--data-dir", "/no/such/dir",
                        "--out", str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and r.stderr.strip().startswith("train.py: error: image folder not found")
    assert len(r.stderr.strip().splitlines()) == 1


def memorising_energy(image, var=1e-3):
    """A density that has learned one image: a narrow Gaussian around it."""
    spectrum = torch.full((1,) + tuple(image.shape), var, dtype=torch.float64)
    return aebm.GaussianEnergy(image.double(), cv.Covariance(spectrum, "fft"))


def test_the_pair_measurements_tell_generalisation_from_memorisation(tmp_path):
    prior = data.load_dataset("gaussian", 8, 1).prior
    held_out = data.load_dataset("gaussian", 8, 1, split="test").get_batch(64, torch.Generator().manual_seed(1))
    configs = [dict(dataset="gaussian", img_size=8, channels=1, train_images=1, subset=k) for k in (0, 1)]
    # the exact density is learned from either set: the pair agrees, and nothing is memorised
    exact = gen.compare_pair([(prior, c) for c in configs], held_out, exact=prior)
    assert exact["disjoint"] and exact["abs_diff"] == 0 and exact["corr"] == pytest.approx(1.0) and exact["to_exact"] == 0
    assert exact["gap"] == pytest.approx(exact["exact_gap"])
    # a density that memorised its one image: each prefers its own image by far, and the pair disagrees
    models = [(memorising_energy(gen.own_images(c, 1)[0]), c) for c in configs]
    mem = gen.compare_pair(models, held_out, exact=prior)
    assert mem["gap_0"] > 10 and mem["gap_1"] > 10 and abs(mem["exact_gap"]) < 1
    assert mem["abs_diff"] > 10 * max(exact["abs_diff"], 0.01) and mem["to_exact"] > 1
    rows = [dict(mem, n=1), dict(exact, n=10), dict(exact, n=0)]
    gen.print_table(rows)
    path = gen.plot(str(tmp_path / "g.png"), rows)
    assert Image.open(path).size[0] > 1000  # two panels
