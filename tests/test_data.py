"""Claims about data.py: the built-in datasets are what they say, and each on-disk reader reads
tiny files written here in the real format, with clear errors for missing and corrupt files."""

import gzip
import math
import os
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

import covariances as cv
import data


def test_gaussian_field_has_its_exact_spectrum_and_pixel_variance():
    ds = data.load_dataset("gaussian", 8, 1)
    x = ds.get_batch(20000, torch.Generator().manual_seed(0)).double()
    power = cv.to_basis(x - ds.mean, "fft").abs().square().mean(0)  # E|U(x - mu)|^2 = c
    c = ds.spectrum.s[0]
    assert ((power / c - 1).abs() < 5 * (1 / 20000) ** 0.5 * 2).all()  # chi^2_2 / 2 has std 1: 5 s.e. (x2 margin)
    assert abs(x.var().item() - ds.var) < 0.02 * ds.var
    assert abs(x.mean().item() - ds.mean) < 0.01
    # its exact energy is the Gaussian it samples from
    cov = cv.isotropic(1e-3, (4, 1, 8, 8), "fft", dtype=torch.float64)
    assert torch.isfinite(ds.prior(x[:4], cov)).all()


def test_dead_leaves_are_piecewise_constant_images_in_the_unit_range():
    ds = data.load_dataset("deadleaves", 32, 3)
    x = ds.get_batch(8, torch.Generator().manual_seed(0))
    assert x.shape == (8, 3, 32, 32) and x.min() >= 0 and x.max() <= 1
    # occlusion model: most neighbouring pixels are equal (same disk), many colours per image
    same = (x[..., 1:] == x[..., :-1]).all(1).float().mean()
    assert 0.5 < same < 0.99
    assert len(torch.unique(x[0, 0])) > 20
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    torch.testing.assert_close(ds.get_batch(2, g1), ds.get_batch(2, g2))  # reproducible from the generator


def same_leaf_probability(r_min, r_max, d=1.0, n=20_000):
    """Dead leaves' closed form: two points d apart lie in the same (top) leaf with probability
    E|D n (D + d)| / E|D u (D + d)| over the disk D's radius law, r^-3 on [r_min, r_max] (quadrature in the
    radius's quantile): the top leaf covering either point is drawn in proportion to the union's area."""
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    r = (r_min ** -2 - u * (r_min ** -2 - r_max ** -2)) ** -0.5  # the inverse CDF
    lens = 2 * r ** 2 * torch.acos(d / (2 * r)) - d / 2 * (4 * r ** 2 - d ** 2).sqrt()  # two circles, r >= d/2
    return (lens.mean() / (2 * math.pi * r ** 2 - lens).mean()).item()


@pytest.mark.parametrize("radii", [None, (2.0, 32.0)])
def test_dead_leaves_follow_their_radius_law(radii):
    """Neighbouring pixels fall in one leaf as often as the closed form says, for the default radii (1, 32/3)
    and train.py's --leaf-radii (colours are continuous, so equal neighbours means one leaf)."""
    ds = data.load_dataset("deadleaves", 32, 3, leaf_radii=radii)
    x = ds.get_batch(256, torch.Generator().manual_seed(0))
    same = (x[..., 1:] == x[..., :-1]).all(1).double().mean().item()
    # 0.613 and 0.806 here; across seeds the fraction varies by ~0.004 (large leaves: correlated pairs)
    assert abs(same - same_leaf_probability(*(radii or (1.0, 32 / 3)))) < 0.015
    assert ds.r_min == (radii or (1.0,))[0]
    with pytest.raises(ValueError, match="leaf radii must be"):
        data.load_dataset("deadleaves", 32, 3, leaf_radii=(3.0, 2.0))


def write_imagenet64(root, n=5):
    os.makedirs(root, exist_ok=True)
    img = np.zeros((n, 3, 64, 64), np.uint8)
    img[:, 0], img[:, 1], img[:, 2] = 10, 20, 30  # R, G, B planes
    img[:, :, 0, :] = 255  # top row white
    flat = img.reshape(n, -1)  # the official channel-planar layout
    np.savez(os.path.join(root, "train_data_batch_1.npz"), data=flat, labels=np.arange(n) + 1)
    np.savez(os.path.join(root, "train_data_batch_2.npz"), data=flat, labels=np.arange(n) + 1)
    np.savez(os.path.join(root, "val_data.npz"), data=flat[:2], labels=np.arange(2) + 1)


def test_imagenet64_npz_batches(tmp_path):
    write_imagenet64(tmp_path / "in64")
    ds = data.load_dataset("imagenet64", 64, root=str(tmp_path / "in64"))
    assert len(ds) == 10 and ds.channels == 3
    x = ds.get_batch(3, torch.Generator().manual_seed(0))
    assert x.shape == (3, 3, 64, 64)
    torch.testing.assert_close(x[0, :, 5, 5], torch.tensor([10, 20, 30]) / 255.0)
    assert (x[:, :, 0, :] == 1).all()
    assert len(data.load_dataset("imagenet64", 32, root=str(tmp_path / "in64"), split="test")) == 2
    assert data.load_dataset("imagenet64", 32, root=str(tmp_path / "in64")).get_batch(1).shape == (1, 3, 32, 32)


def test_cifar10_pickle_batches(tmp_path):
    base = tmp_path / "cifar-10-batches-py"
    os.makedirs(base)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        arr = np.zeros((4, 3, 32, 32), np.uint8)
        arr[:, 1] = 200  # green
        with open(base / name, "wb") as f:
            pickle.dump({b"data": arr.reshape(4, -1), b"labels": [0, 1, 2, 3]}, f)
    ds = data.load_dataset("cifar10", 32, root=str(tmp_path))
    assert len(ds) == 20
    x = ds.get_batch(2)
    torch.testing.assert_close(x[0, :, 3, 3], torch.tensor([0, 200, 0]) / 255.0)
    assert len(data.load_dataset("cifar10", 32, root=str(tmp_path), split="test")) == 4


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_files(tmp_path, gz):
    for stem, n in (("train-images-idx3-ubyte", 6), ("t10k-images-idx3-ubyte", 3)):
        pixels = np.zeros((n, 28, 28), np.uint8)
        pixels[:, 10:18, 10:18] = 255
        payload = struct.pack(">IIII", 2051, n, 28, 28) + pixels.tobytes()
        path = tmp_path / (stem + (".gz" if gz else ""))
        with (gzip.open if gz else open)(path, "wb") as f:
            f.write(payload)
    ds = data.load_dataset("mnist", 28, root=str(tmp_path))
    assert len(ds) == 6 and ds.channels == 1
    x = ds.get_batch(2)
    assert x[0, 0, 12, 12] == 1 and x[0, 0, 0, 0] == 0
    assert len(data.load_dataset("mnist", 28, root=str(tmp_path), split="test")) == 3


def write_images(folder, n, size=(40, 30), ext="png"):
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        arr = np.full((size[1], size[0], 3), i * 20 % 256, np.uint8)
        Image.fromarray(arr).save(os.path.join(folder, f"{i:04d}.{ext}"))


def test_image_folder_recursive_with_a_split(tmp_path):
    write_images(tmp_path / "a", 6, ext="png")
    write_images(tmp_path / "b" / "c", 4, ext="jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    train = data.load_dataset("folder", 16, 3, root=str(tmp_path))
    test = data.load_dataset("folder", 16, 3, root=str(tmp_path), split="test")
    assert len(train) == 9 and len(test) == 1
    assert train.get_batch(3).shape == (3, 3, 16, 16)
    assert data.load_dataset("folder", 16, 1, root=str(tmp_path)).get_batch(2).shape == (2, 1, 16, 16)


def test_celeba_uses_the_official_partition_and_a_centre_crop(tmp_path):
    folder = tmp_path / "img_align_celeba"
    os.makedirs(folder)
    for i in range(5):
        arr = np.zeros((218, 178, 3), np.uint8)
        arr[39:179, 19:159] = 255  # the central 140x140 square is white, the border black
        Image.fromarray(arr).save(folder / f"{i + 1:06d}.jpg", quality=95)
    (tmp_path / "list_eval_partition.txt").write_text("".join(f"{i + 1:06d}.jpg {[0, 0, 1, 2, 2][i]}\n" for i in range(5)))
    train = data.load_dataset("celeba", 32, root=str(tmp_path))
    test = data.load_dataset("celeba", 32, root=str(tmp_path), split="test")
    assert len(train) == 3 and len(test) == 2
    x = train.get_batch(1)
    assert x.shape == (1, 3, 32, 32) and x.min() > 0.9  # only the white centre survives the crop


@pytest.mark.parametrize("name", ["imagenet64", "cifar10", "mnist", "celeba", "folder"])
def test_missing_files_name_what_was_expected_and_where(tmp_path, name):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        data.load_dataset(name, 32, root=str(tmp_path / "nowhere"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="expected|no images|not found"):
        data.load_dataset(name, 32, root=str(tmp_path / "empty"))


def test_corrupt_files_are_named(tmp_path):
    write_images(tmp_path / "imgs", 4)
    bad = tmp_path / "imgs" / "0001.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(ValueError, match="0001.png"):
        data.load_dataset("folder", 16, root=str(tmp_path / "imgs"))  # moments are estimated from every image
    os.makedirs(tmp_path / "in64")
    (tmp_path / "in64" / "train_data_batch_1.npz").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="train_data_batch_1.npz"):
        data.load_dataset("imagenet64", 64, root=str(tmp_path / "in64"))
    (tmp_path / "train-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 1234, 1, 28, 28))
    with pytest.raises(ValueError, match="train-images-idx3-ubyte"):
        data.load_dataset("mnist", 28, root=str(tmp_path))


def test_truncated_empty_and_malformed_files_are_named(tmp_path):
    write_imagenet64(tmp_path / "in64")
    path = tmp_path / "in64" / "train_data_batch_1.npz"
    path.write_bytes(path.read_bytes()[:200])  # truncated mid-file
    with pytest.raises(ValueError, match="truncated ImageNet64 file .*train_data_batch_1.npz"):
        data.load_dataset("imagenet64", 64, root=str(tmp_path / "in64"))
    path.write_bytes(b"")  # empty
    with pytest.raises(ValueError, match="train_data_batch_1.npz"):
        data.load_dataset("imagenet64", 64, root=str(tmp_path / "in64"))
    os.makedirs(tmp_path / "mnist")
    (tmp_path / "mnist" / "train-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, 0, 28, 28))
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.*no images"):
        data.load_dataset("mnist", 28, root=str(tmp_path / "mnist"))
    folder = tmp_path / "celeba" / "img_align_celeba"
    write_images(folder, 2, ext="jpg")
    (tmp_path / "celeba" / "list_eval_partition.txt").write_text("0000.jpg 0\n0001.jpg\n")
    with pytest.raises(ValueError, match="malformed line 2 of .*list_eval_partition.txt"):
        data.load_dataset("celeba", 32, root=str(tmp_path / "celeba"))


class RunsCode:
    """A pickle that calls a function when read (here: it would create a file)."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_a_malicious_cifar_batch_runs_no_code(tmp_path):
    base = tmp_path / "cifar-10-batches-py"
    os.makedirs(base)
    target = tmp_path / "pwned"
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(base / name, "wb") as f:
            pickle.dump({b"data": RunsCode(str(target)), b"labels": [0]}, f)
    with pytest.raises(ValueError, match="unsafe CIFAR-10 batch .*data_batch_1.*refusing to load"):
        data.load_dataset("cifar10", 32, root=str(tmp_path))
    assert not target.exists()


def test_unknown_dataset_and_missing_data_dir_are_clear():
    with pytest.raises(ValueError, match="unknown dataset"):
        data.load_dataset("imagenet1k", 32)
    with pytest.raises(ValueError, match="--data-dir"):
        data.load_dataset("cifar10", 32)


def test_save_grid_writes_a_png_of_the_right_size(tmp_path):
    rows = [torch.rand(3, 3, 8, 8), torch.rand(2, 1, 8, 8)]
    path = data.save_grid(str(tmp_path / "g" / "grid.png"), rows, pad=2)
    with Image.open(path) as im:
        assert im.size == (3 * 10 + 2, 2 * 10 + 2) and im.mode == "RGB"
