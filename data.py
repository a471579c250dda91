"""
Datasets: images as float tensors in [0, 1], shape (C, H, W) at --img-size (docs/method.md §2).

Every dataset here offers the same three things, and train.py / sample.py use nothing else:

    ds.get_batch(n, generator) -> (n, C, H, W) float32 in [0, 1]   random images (with replacement)
    ds.channels, ds.img_size                                        the image shape
    ds.mean, ds.var                                                 per-coordinate data mean and variance (M3's mu, sigma_d^2)

Built-in, generated on the fly (no download, any size, 1 or 3 channels):
    gaussian    a stationary Gaussian random field with a power-law spectrum. Periodic, so its
                covariance is diagonal in the FFT basis and `ds.prior` is its exact energy
                (aebm.GaussianEnergy): the ground truth for every learned quantity.
    deadleaves  the dead-leaves occlusion model: disks with power-law radii and random
                intensities/colours, a classic stand-in for natural-image statistics.

On disk, in their standard formats (train / test splits):
    imagenet64  downsampled ImageNet 64x64, the official npz batches: train_data_batch_*.npz and
                val_data.npz, each with 'data' (N, 12288) uint8, channel-planar (R, G, B planes of 64x64)
    cifar10     cifar-10-batches-py/: python pickles data_batch_1..5 and test_batch, b'data' (N, 3072) uint8
    mnist       idx files train-images-idx3-ubyte and t10k-images-idx3-ubyte, gzipped or not
    celeba      img_align_celeba/*.jpg (+ list_eval_partition.txt if present), centre crop 140x140, resize
    folder      any folder of images, searched recursively (AFHQ is one); the last 10% (sorted) is the test split

The file ends with the plumbing every script shares: reading a user's image and writing PNGs, the
metrics (PSNR, SSIM), and plots drawn with pillow (learning curves, figures of the experiments).
"""

import csv
import gzip
import math
import os
import pickle
import struct
import sys
import time
import zipfile

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

import aebm
import covariances as cv

BUILTIN = ("gaussian", "deadleaves")
ON_DISK = ("imagenet64", "cifar10", "mnist", "celeba", "folder")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
# Native image size and spectral basis per dataset (periodic data: fft; natural images: dct).
DATASET_DEFAULTS = {
    "deadleaves": (32, "dct"), "gaussian": (16, "fft"), "imagenet64": (64, "fft"), "cifar10": (32, "dct"),
    "mnist": (28, "dct"), "celeba": (64, "dct"), "folder": (64, "dct"),
}


# -----------------------------------------------------------------------------
# Built-in datasets.

class GaussianField:
    """x = mu + U^H(sqrt(c) zeta) in the FFT basis, with power spectrum c(k) = A / (k0^2 + |k|^2)^(alpha/2)
    (|k| in cycles per image, periodic), scaled so that each pixel has variance `var`. Channels are
    independent. Values are not clipped: the density must stay exactly Gaussian. img_size: an int
    or (H, W) (sample.py builds one at the size of a user's image for --prior exact)."""

    def __init__(self, img_size, channels, alpha=2.0, k0=1.0, mean=0.5, var=0.04):
        H, W = (img_size, img_size) if isinstance(img_size, int) else img_size
        self.img_size, self.channels, self.mean, self.var = img_size, channels, mean, var
        kh, kw = torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64)
        kh, kw = torch.minimum(kh, H - kh), torch.minimum(kw, W - kw)  # |frequency index|: s[k] = s[-k], Sigma real
        c = 1.0 / (k0 ** 2 + kh[:, None] ** 2 + kw[None, :] ** 2) ** (alpha / 2)
        c = c * var / c.mean()  # per-pixel variance = mean of the spectrum (Parseval)
        self.spectrum = cv.Covariance(c.expand(1, channels, H, W).contiguous(), "fft")
        self.prior = aebm.GaussianEnergy(mean, self.spectrum)  # the exact energy, float64

    def get_batch(self, n, generator=None):
        return self.prior.sample(n, generator).float()


class DeadLeaves:
    """Dead leaves: disks dropped one over another until the image is covered. Radii follow the
    scale-invariant density p(r) ~ r^-3 on [r_min, r_max] (pixels); each disk has a uniform random
    grey level (1 channel) or colour (3 channels)."""

    def __init__(self, img_size, channels, r_min=1.0, r_max=None, n_disks=None):
        self.img_size, self.channels = img_size, channels
        self.r_min, self.r_max = r_min, r_max or img_size / 3
        if not (0 < self.r_min < self.r_max):
            raise ValueError(f"leaf radii must be 0 < R_MIN < R_MAX pixels, got {self.r_min:g} {self.r_max:g}")
        # enough disks that the last ones almost surely cover the image (area ratio ~ 4 ln N)
        self.n_disks = n_disks or int(12 * img_size ** 2 / (math.pi * self.r_min * self.r_max))
        self.mean, self.var = 0.5, 1 / 12  # uniform intensities

    def get_batch(self, n, generator=None):
        H = self.img_size
        g = generator
        img = torch.rand(n, self.channels, 1, 1, generator=g).expand(n, self.channels, H, H).clone()
        i = torch.arange(H, dtype=torch.float32).view(1, H, 1)
        j = torch.arange(H, dtype=torch.float32).view(1, 1, H)
        a, b = self.r_min ** -2, self.r_max ** -2
        # Disks are painted back to front, so the newest is on top; inverse-CDF sampling of r^-3.
        for _ in range(self.n_disks):
            u = torch.rand(n, generator=g)
            r = (a - u * (a - b)) ** -0.5
            cy, cx = torch.rand(n, generator=g) * H, torch.rand(n, generator=g) * H
            colour = torch.rand(n, self.channels, generator=g)
            inside = (i - cy.view(n, 1, 1)) ** 2 + (j - cx.view(n, 1, 1)) ** 2 < r.view(n, 1, 1) ** 2
            img = torch.where(inside.unsqueeze(1), colour.view(n, self.channels, 1, 1), img)
        return img


# -----------------------------------------------------------------------------
# Datasets on disk: an array of uint8 images in memory, or a list of image files read on demand.

class ArrayImages:
    """uint8 images (N, C, h, w) held in memory, resized to img_size when drawn."""

    def __init__(self, images, img_size):
        self.images, self.img_size = images, img_size
        self.channels = images.shape[1]
        self.mean, self.var = estimate_moments(self)

    def __len__(self):
        return len(self.images)

    def load(self, idx):
        x = torch.from_numpy(self.images[idx.numpy()]).float() / 255.0
        return resize(x, self.img_size)

    def get_batch(self, n, generator=None):
        return self.load(torch.randint(len(self), (n,), generator=generator))


class FileImages:
    """Image files read on demand, in one of two ways.
    crop="center": the largest centred square (or `size` pixels, CelebA's 140) resized to img_size, one
      image per file: datasets of objects and faces, where the whole picture is the sample.
    crop="random": an img_size x img_size window at a random place of a photograph at its own resolution
      (first shrunk by `scale` if scale < 1): a folder of a few dozen photographs gives millions of distinct
      training crops, at the scale at which sample.py later restores such photographs whole. Each file is
      decoded once and kept in memory as uint8."""

    def __init__(self, files, img_size, channels=3, crop="center", size=None, scale=1.0):
        if not files:
            raise FileNotFoundError("no images found")
        if crop not in ("center", "random"):
            raise ValueError(f"crop must be 'center' or 'random', got {crop!r}")
        if not 0 < scale <= 1:
            raise ValueError(f"scale must be in (0, 1] (a photograph is shrunk, never enlarged), got {scale}")
        self.files, self.img_size, self.channels = files, img_size, channels
        self.crop, self.size, self.scale, self.decoded = crop, size, scale, {}
        self.mean, self.var = estimate_moments(self)

    def __len__(self):
        return len(self.files)

    def read(self, path):
        """One file as a (C, h, w) uint8 tensor: centre-cropped and resized, or whole (shrunk by `scale`)."""
        try:
            with Image.open(path) as im:
                im = im.convert("RGB" if self.channels == 3 else "L")
                w, h = im.size
                if self.crop == "center":
                    c = min(self.size or min(w, h), w, h)
                    im = im.crop(((w - c) // 2, (h - c) // 2, (w - c) // 2 + c, (h - c) // 2 + c))
                    im = im.resize((self.img_size, self.img_size), Image.BICUBIC)
                elif self.scale < 1:
                    im = im.resize((max(1, round(w * self.scale)), max(1, round(h * self.scale))), Image.LANCZOS)
                arr = np.asarray(im, dtype=np.uint8)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise ValueError(f"corrupt or unreadable image {path}: {e}. Remove or replace the file.") from None
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        if min(arr.shape[1:]) < self.img_size:
            raise ValueError(f"image {path} is {arr.shape[2]}x{arr.shape[1]} (after --scale {self.scale:g}), smaller "
                             f"than the {self.img_size}x{self.img_size} crops; pass a smaller --img-size or remove it")
        return torch.from_numpy(arr.copy())

    def load(self, idx):
        return torch.stack([self.read(self.files[int(i)]) for i in idx]).float() / 255.0

    def window(self, i, generator):
        """A random img_size window of file i (decoded once)."""
        if i not in self.decoded:
            self.decoded[i] = self.read(self.files[i])
        img, n = self.decoded[i], self.img_size
        top = int(torch.randint(img.shape[1] - n + 1, (1,), generator=generator))
        left = int(torch.randint(img.shape[2] - n + 1, (1,), generator=generator))
        return img[:, top : top + n, left : left + n]

    def get_batch(self, n, generator=None):
        idx = torch.randint(len(self), (n,), generator=generator)
        if self.crop == "center":
            return self.load(idx)
        return torch.stack([self.window(int(i), generator) for i in idx]).float() / 255.0


def resize(x, size):
    """(N, C, h, w) in [0, 1] -> (N, C, size, size): antialiased bilinear (area-like when shrinking)."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)


def estimate_moments(ds, n=256):
    """Data mean and per-coordinate variance from up to n images (deterministic: the first n, or n random
    crops drawn with a fixed seed)."""
    if getattr(ds, "crop", "center") == "random":
        x = ds.get_batch(n, torch.Generator().manual_seed(0))
    else:
        x = ds.load(torch.arange(min(n, len(ds))))
    return float(x.mean()), float(x.var())


def require(path, what, hint):
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} not found: expected {path}. {hint}")
    return path


def read_imagenet64(root, split):
    hint = "Download 'Imagenet64_train_npz' / 'Imagenet64_val_npz' (image-net.org, downsampled 64x64) and unpack them there."
    require(root, "ImageNet64 directory", hint)
    if split == "train":
        files = sorted(f for f in os.listdir(root) if f.startswith("train_data_batch_") and f.endswith(".npz"))
        if not files:
            raise FileNotFoundError(f"ImageNet64 training batches not found: expected train_data_batch_*.npz in {root}. {hint}")
    else:
        files = [os.path.basename(require(os.path.join(root, "val_data.npz"), "ImageNet64 validation file", hint))]
    arrays = []
    for f in files:
        try:
            with np.load(os.path.join(root, f)) as z:  # allow_pickle=False: an npz cannot run code here
                data = z["data"]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            raise ValueError(f"corrupt or truncated ImageNet64 file {os.path.join(root, f)} ({type(e).__name__}: {e}); "
                             "download it again") from None
        if data.ndim != 2 or data.shape[1] != 3 * 64 * 64 or len(data) == 0:
            raise ValueError(f"{os.path.join(root, f)}: 'data' must be (N, 12288) uint8 with N >= 1, got {data.shape}")
        arrays.append(data.reshape(-1, 3, 64, 64))  # channel-planar: R, G, B planes
    return np.concatenate(arrays)


class ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickles only what a CIFAR-10 batch holds: dicts, lists, strings, bytes, numbers and numpy
    arrays. A pickle can name any callable to run while it is read; this refuses all but numpy's
    array reconstructors, so a malicious batch raises instead of running code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a CIFAR-10 batch holds only arrays")
        return super().find_class(module, name)


def read_cifar10(root, split):
    hint = "Download and unpack cifar-10-python.tar.gz there (it creates cifar-10-batches-py/)."
    base = root if os.path.exists(os.path.join(root, "test_batch")) else os.path.join(root, "cifar-10-batches-py")
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    arrays = []
    for name in names:
        path = require(os.path.join(base, name), "CIFAR-10 batch", hint)
        try:
            with open(path, "rb") as f:
                batch = ArraysOnlyUnpickler(f, encoding="bytes").load()
            arrays.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError, IndexError, AttributeError) as e:
            raise ValueError(f"corrupt or unsafe CIFAR-10 batch {path}: {e}") from None
    return np.concatenate(arrays)


def read_mnist(root, split):
    stem = "train-images-idx3-ubyte" if split == "train" else "t10k-images-idx3-ubyte"
    candidates = [os.path.join(root, stem), os.path.join(root, stem + ".gz"),
                  os.path.join(root, "MNIST", "raw", stem), os.path.join(root, "MNIST", "raw", stem + ".gz")]
    path = next((p for p in candidates if os.path.exists(p)), None)
    if path is None:
        raise FileNotFoundError(f"MNIST images not found: expected {stem}[.gz] in {root}. "
                                "Download the idx files from the MNIST page and put them there.")
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            magic, n, rows, cols = struct.unpack(">IIII", f.read(16))
            if magic != 2051:
                raise ValueError(f"bad magic number {magic} (expected 2051 for idx3 images)")
            data = np.frombuffer(f.read(n * rows * cols), dtype=np.uint8)
            if data.size != n * rows * cols:
                raise ValueError(f"file holds {data.size} bytes of pixels, header promises {n * rows * cols}")
            if n == 0 or rows == 0 or cols == 0:
                raise ValueError(f"the file holds no images ({n} of {rows}x{cols})")
    except (OSError, struct.error, EOFError) as e:
        raise ValueError(f"corrupt MNIST file {path}: {e}") from None
    except ValueError as e:
        raise ValueError(f"corrupt MNIST file {path}: {e}") from None
    return data.reshape(n, 1, rows, cols)


def list_images(root):
    files = []
    for dirpath, _, names in os.walk(root):
        files += [os.path.join(dirpath, f) for f in names if f.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(files)


def split_files(files, split, test_fraction=0.1):
    n_test = max(1, int(len(files) * test_fraction)) if len(files) > 1 else 0
    return files[: len(files) - n_test] if split == "train" else files[len(files) - n_test :]


def read_celeba(root, split):
    folder = root if os.path.basename(os.path.normpath(root)) == "img_align_celeba" else os.path.join(root, "img_align_celeba")
    require(folder, "CelebA folder", "Download img_align_celeba.zip and unpack it there.")
    files = list_images(folder)
    partition = os.path.join(os.path.dirname(os.path.normpath(folder)), "list_eval_partition.txt")
    if os.path.exists(partition):  # the official split: 0 train, 1 validation, 2 test
        wanted = {"train": {"0", "1"}, "test": {"2"}}[split]
        keep = set()
        with open(partition) as f:
            for number, line in enumerate(f, 1):
                fields = line.split()
                if not fields:
                    continue
                if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
                    raise ValueError(f"malformed line {number} of {partition}: {line.strip()!r}; expected "
                                     "'<file>.jpg <0|1|2>' (the official list_eval_partition.txt)")
                if fields[1] in wanted:
                    keep.add(fields[0])
        return [p for p in files if os.path.basename(p) in keep]
    return split_files(files, split)


def load_dataset(name, img_size, channels=3, root=None, split="train", leaf_radii=None, crop="center", scale=1.0):
    """The dataset `name` at img_size. channels applies to the built-in datasets and to image
    folders; the others have their own (mnist 1, the rest 3). leaf_radii: (r_min, r_max) in pixels for
    dead leaves (default 1 and img_size / 3); crop ("center" or "random") and scale: how an image folder
    becomes training images (FileImages); the other datasets ignore them."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if img_size < 1:
        raise ValueError(f"image size must be positive, got {img_size}")
    if name == "gaussian":
        return GaussianField(img_size, channels)
    if name == "deadleaves":
        return DeadLeaves(img_size, channels, *(leaf_radii or ()))  # no radii: the class's defaults
    if name not in ON_DISK:
        raise ValueError(f"unknown dataset {name!r}: use one of {BUILTIN + ON_DISK}")
    if root is None:
        raise ValueError(f"dataset {name!r} is read from local files: pass --data-dir (see README.md, Datasets)")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if name == "imagenet64":
        return ArrayImages(read_imagenet64(root, split), img_size)
    if name == "cifar10":
        return ArrayImages(read_cifar10(root, split), img_size)
    if name == "mnist":
        return ArrayImages(read_mnist(root, split), img_size)
    if name == "celeba":
        files = read_celeba(root, split)
        if not files:
            raise FileNotFoundError(f"no CelebA images for split {split!r} in {root}")
        return FileImages(files, img_size, 3, size=140)
    require(root, "image folder", "Pass a directory that contains images (searched recursively).")
    files = split_files(list_images(root), split)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) for split {split!r} under {root}")
    return FileImages(files, img_size, channels, crop, scale=scale)


def dataset_for(config, split, root=None):
    """The dataset a run's or a checkpoint's config describes (dataset, size, channels, dead leaves' radii,
    how an image folder is cropped, and where it lives unless `root` says otherwise): every tool that
    draws images for a checkpoint draws them from here. A run trained on a finite set (--train-images)
    gets that very set back as its "train" split; its "test" split is the dataset's own."""
    ds = load_dataset(config["dataset"], config["img_size"], config["channels"], root or config.get("data_dir"),
                      split, config.get("leaf_radii"), config.get("crop", "center"), config.get("scale", 1.0))
    if split == "train" and config.get("train_images", 0):
        ds = finite_subset(ds, config["train_images"], config.get("subset", 0))
    return ds


# -----------------------------------------------------------------------------
# A finite training set: the strong-generalization test (experiments/generalization.py) trains pairs of
# models on disjoint sets of N images and asks whether they learn the same density.

SUBSET_SEED = 31_337  # the pool every subset is cut from; no other stream in the project uses it


class FiniteSet:
    """A fixed set of generated training images (N, C, H, W) held in memory, drawn with replacement; `ids`
    are their positions in the generated pool, so that two sets can be checked disjoint (on-disk subsets
    carry the same attribute: indices into the training split)."""

    def __init__(self, images, ids, img_size):
        self.images, self.ids, self.img_size = images, ids, img_size
        self.channels = images.shape[1]
        # M3's mu and sigma_d^2 are the training data's: here the set's own
        self.mean, self.var = float(images.mean()), float(images.var())

    def __len__(self):
        return len(self.images)

    def get_batch(self, n, generator=None):
        return self.images[torch.randint(len(self), (n,), generator=generator)]


def finite_subset(ds, n, subset=0):
    """Subset number `subset` of n training images of ds: images subset*n ... (subset+1)*n - 1 of a fixed pool,
    so that different subsets never share an image. The pool of a dataset on disk is its training split in a
    fixed random order; that of a built-in dataset is a stream of generated images (each block of n drawn
    from SUBSET_SEED: reproducible, and independent of the held-out images every tool draws with its own seeds).
    An image folder with random crops keeps its random crops: the set is n photographs, not n crops. M3's mu
    and sigma_d^2 are then the subset's own, as they are the training data's in every run."""
    if n < 1 or subset < 0:
        raise ValueError(f"a finite training set needs n >= 1 images and subset >= 0, got {n} and {subset}")
    g = torch.Generator().manual_seed(SUBSET_SEED)
    if not hasattr(ds, "__len__"):  # generated: subset k is block k of the stream, blocks of n images each
        for _ in range(subset + 1):
            images = ds.get_batch(n, g).float()
        ids = torch.arange(subset * n, (subset + 1) * n)
        return FiniteSet(images, ids, ds.img_size)
    if (subset + 1) * n > len(ds):
        raise ValueError(f"--train-images {n} --subset {subset} needs {(subset + 1) * n} training images and the "
                         f"dataset has {len(ds)}: pass a smaller --train-images or --subset")
    ids = torch.randperm(len(ds), generator=g)[subset * n : (subset + 1) * n]
    # the same reader over fewer images: uint8 arrays stay uint8, files are still read on demand
    if isinstance(ds, ArrayImages):
        sub = ArrayImages(ds.images[ids.numpy()], ds.img_size)
    else:
        sub = FileImages([ds.files[int(i)] for i in ids], ds.img_size, ds.channels, ds.crop, ds.size, ds.scale)
    sub.ids = ids
    return sub


# -----------------------------------------------------------------------------
# Progress of long work, and writing images.

class Progress:
    """Progress lines on stderr for work of a known size (network evaluations): what is done, the rate and
    the time left, as training logs them. Throttled: the first after `first` seconds, then at most one every
    `every` seconds, and a closing line if any was printed; quiet prints nothing. Call it with the number of
    evaluations just done."""

    def __init__(self, what, total, quiet=False, first=2.0, every=10.0, stream=None):
        self.what, self.total, self.quiet, self.first, self.every = what, total, quiet, first, every
        self.stream, self.done, self.start, self.printed = stream or sys.stderr, 0, time.time(), None

    def __call__(self, n=1):
        self.done += n
        now = time.time()
        due = self.first if self.printed is None else self.every
        if not self.quiet and now - (self.printed or self.start) >= due and self.done < self.total:
            self.line(now)

    def line(self, now):
        rate = self.done / max(now - self.start, 1e-9)
        eta = (self.total - self.done) / max(rate, 1e-9)
        print(f"{self.what}: {self.done}/{self.total} evaluations | {rate:.1f}/s | eta {eta:.0f} s",
              file=self.stream, flush=True)
        self.printed = now

    def close(self):
        if self.printed is not None and not self.quiet:
            print(f"{self.what}: {self.done} evaluations in {time.time() - self.start:.0f} s", file=self.stream, flush=True)


def prepare_out(out):
    """The output directory, created if needed; a one-line ValueError if it is a file or not writable."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out} is a file, not a directory; pass a directory for the outputs")
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, f".write_test_{os.getpid()}")  # one per process: ranks probe at once
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"cannot write to --out {out} ({e.strerror or e}); pass a writable directory") from None


def save_grid(path, rows, pad=2):
    """Write a PNG grid: `rows` is a list of (n, C, H, W) tensors in [0, 1] (values are clipped),
    one row each, n images side by side. Returns the path."""
    n = max(r.shape[0] for r in rows)
    C, H, W = rows[0].shape[1:]
    canvas = torch.ones(3, len(rows) * (H + pad) + pad, n * (W + pad) + pad)
    for i, row in enumerate(rows):
        for j, img in enumerate(row.detach().float().cpu().clamp(0, 1)):
            img = img.expand(3, H, W) if img.shape[0] == 1 else img
            top, left = pad + i * (H + pad), pad + j * (W + pad)
            canvas[:, top : top + H, left : left + W] = img
    arr = (canvas.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def read_image(path, channels):
    """A user's image file (any format pillow reads) as a (1, channels, H, W) float tensor in [0, 1];
    colour is converted to grey or back as the model needs. Clear errors for a missing or non-image file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no image file at {path}")
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB" if channels == 3 else "L"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"{path} is not an image pillow can read ({type(e).__name__}: {e})") from None
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return torch.from_numpy(arr.copy()).float()[None] / 255.0


def read_mask(path, H, W):
    """A mask image (white = missing) of exactly H x W, as a (1, 1, H, W) bool map."""
    m = read_image(path, 1)
    if m.shape[-2:] != (H, W):
        raise ValueError(f"mask {path} is {m.shape[-1]}x{m.shape[-2]} (W x H) but the image is {W}x{H}; "
                         "draw the mask at the image's size (white = missing)")
    return m > 0.5


def save_image(path, x):
    """Write one (1 or 3, H, W) image in [0, 1] (values clipped) as a PNG at its own size."""
    x = x.detach().float().cpu().clamp(0, 1)
    arr = (x.expand(3, *x.shape[-2:]) if x.shape[0] == 1 else x).permute(1, 2, 0).numpy()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray((arr * 255 + 0.5).astype(np.uint8)).save(path)
    return path


def pad_symmetric(x, multiple):
    """Pad the bottom and right of (B, C, H, W) to multiples of `multiple` with half-sample-symmetric
    reflection (...x1 x0 | x0 x1..., the boundary the DCT assumes); crop back with x[..., :H, :W]."""
    H, W = x.shape[-2:]
    ph, pw = -H % multiple, -W % multiple
    while ph or pw:  # a pad larger than the image takes several reflections
        h, w = min(ph, x.shape[-2]), min(pw, x.shape[-1])
        x = torch.cat([x, x.flip(-2)[..., :h, :]], -2)
        x = torch.cat([x, x.flip(-1)[..., :w]], -1)
        ph, pw = ph - h, pw - w
    return x


# -----------------------------------------------------------------------------
# Image metrics.

def psnr(x, ref):
    mse = (x - ref).square().flatten(1).mean(1)
    return 10 * torch.log10(1 / mse.clamp_min(1e-20))


def gaussian_window(size=11, sigma=1.5, dtype=torch.float32, device="cpu"):
    t = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-0.5 * (t / sigma) ** 2)
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(x, ref, size=11, sigma=1.5):
    """Mean SSIM (Wang et al. 2004) per image, Gaussian window 11 / 1.5, data range 1, valid region."""
    C = x.shape[1]
    size = min(size, x.shape[-1], x.shape[-2])
    w = gaussian_window(size, sigma, x.dtype, x.device).expand(C, 1, size, size)
    filt = lambda z: F.conv2d(z, w, groups=C)
    mx, my = filt(x), filt(ref)
    sxx, syy, sxy = filt(x * x) - mx ** 2, filt(ref * ref) - my ** 2, filt(x * ref) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1)


def nice_ticks(lo, hi, n=5):
    """About n round tick values covering [lo, hi]."""
    if hi <= lo:
        hi = lo + 1
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


# The training log, OUT/log.csv: a row per --log-every steps (the first 8 columns) and per validation (all).
LOG_COLUMNS = ["step", "split", "loss_dsm", "loss_csm", "lr", "grad_norm", "img_per_s", "elapsed_s"] + [
    f"{kind}_{task}" for task in ("denoise", "inpaint", "deblur", "sr") for kind in ("psnr", "wiener", "observed")
] + ["blind_inpaint"]


def restore_log(path, step):
    """On --resume: log.csv starts with its header and holds each step once. Rows past the checkpoint's
    step (written, then lost with the process) and rows that cannot be read (a line cut by a kill) are
    dropped; a missing, empty or header-less log starts again. Written atomically. Returns a one-line
    note when the log needed more than the usual trim, else None."""
    rows = []
    if os.path.exists(path):
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    header = bool(rows) and rows[0] == LOG_COLUMNS
    body = rows[1:] if header else rows
    width = {"train": 8, "val": len(LOG_COLUMNS)}  # the fields each kind of row is written with
    readable = [r for r in body if len(r) > 1 and r[0].isdigit() and width.get(r[1]) == len(r)]
    with open(path + ".tmp", "w", newline="") as f:
        csv.writer(f).writerows([LOG_COLUMNS] + [r for r in readable if int(r[0]) <= step])
    os.replace(path + ".tmp", path)
    if not rows:
        return f"{path} was missing or empty: a new log starts at step {step}"
    if not header or len(readable) < len(body):
        lost = len(body) - len(readable)
        return f"{path} had {'no header' if not header else 'unreadable rows'}: repaired, {lost} unreadable rows dropped"
    return None


def save_learning_curves(log_path, out_path):
    """Learning curves from train.py's log.csv: dB above the Wiener filter against training time, one line
    per task (None before the first validation)."""
    with open(log_path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "val" and r.get("psnr_denoise")]
    if len(rows) < 1:
        return None
    t = [float(r["elapsed_s"]) / 60 for r in rows]
    curves = [(name, t, [float(r[f"psnr_{name}"]) - float(r[f"wiener_{name}"]) for r in rows])
              for name in ("denoise", "inpaint", "deblur", "sr")]
    return save_line_plot(out_path, curves, title="held-out posterior means (EMA) vs fitted Wiener",
                          xlabel="training time (min)", ylabel="dB above Wiener")


def save_panels(path, panels):
    """Figures side by side in one PNG at path; the panel files (drawn by the plots below) are removed."""
    images = []
    for p in panels:
        with Image.open(p) as im:
            images.append(im.convert("RGB"))
        os.remove(p)
    fig = Image.new("RGB", (sum(i.width for i in images), max(i.height for i in images)), "white")
    for k, im in enumerate(images):
        fig.paste(im, (sum(i.width for i in images[:k]), 0))
    fig.save(path)
    return path


def save_scatter_plot(path, groups, title="", xlabel="", ylabel="", size=(640, 460)):
    """A scatter plot drawn with pillow: groups is a list of (label, xs, ys, marker) with marker "o"
    (dots) or "x" (crosses, e.g. the truth); returns the path."""
    curves = [(label, xs, ys) for label, xs, ys, _ in groups]
    return save_line_plot(path, curves, title, xlabel, ylabel, size, markers=[m for *_, m in groups])


def save_line_plot(path, curves, title="", xlabel="", ylabel="", size=(640, 420), markers=None):
    """A line plot drawn with pillow: axes, ticks, labels and a legend. curves: list of
    (label, xs, ys) with plain float sequences; markers at the data points. Returns the path."""
    from PIL import ImageDraw, ImageFont

    colours = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207)]
    W, H = size
    left, right, top, bottom = 70, 20, 30, 50
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    xs_all = [x for _, xs, _ in curves for x in xs]
    ys_all = [y for _, _, ys in curves for y in ys]
    xt, yt = nice_ticks(min(xs_all), max(xs_all)), nice_ticks(min(ys_all), max(ys_all))
    x0, x1 = min(xt[0], min(xs_all)), max(xt[-1], max(xs_all))
    y0, y1 = min(yt[0], min(ys_all)), max(yt[-1], max(ys_all))
    px = lambda x: left + (x - x0) / (x1 - x0 or 1) * (W - left - right)
    py = lambda y: H - bottom - (y - y0) / (y1 - y0 or 1) * (H - top - bottom)
    draw.rectangle([left, top, W - right, H - bottom], outline="black")
    for t in xt:
        draw.line([px(t), H - bottom, px(t), H - bottom + 5], fill="black")
        draw.text((px(t) - 10, H - bottom + 8), f"{t:g}", fill="black", font=font)
    for t in yt:
        draw.line([left - 5, py(t), left, py(t)], fill="black")
        draw.line([left, py(t), W - right, py(t)], fill=(230, 230, 230))
        draw.text((5, py(t) - 6), f"{t:.3g}", fill="black", font=font)
    draw.text((W // 2 - 4 * len(xlabel), H - 22), xlabel, fill="black", font=font)
    draw.text((5, 8), ylabel, fill="black", font=font)
    draw.text((W // 2 - 3 * len(title), 8), title, fill="black", font=font)
    for i, (label, xs, ys) in enumerate(curves):
        c = colours[i % len(colours)]
        pts = [(px(x), py(y)) for x, y in zip(xs, ys)]
        marker = markers[i] if markers else None
        if len(pts) > 1 and marker is None:  # a curve; with markers, points only (a scatter plot)
            draw.line(pts, fill=c, width=2)
        for x, y in pts:
            if marker == "x":
                draw.line([x - 5, y - 5, x + 5, y + 5], fill=c, width=2)
                draw.line([x - 5, y + 5, x + 5, y - 5], fill=c, width=2)
            else:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=c)
        ly = top + 8 + 16 * i  # legend, top right
        draw.line([W - right - 150, ly + 6, W - right - 130, ly + 6], fill=c, width=3)
        draw.text((W - right - 125, ly), label, fill="black", font=font)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img.save(path)
    return path
