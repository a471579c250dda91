"""Independent dense references for the tests: basis matrices written from their textbook
formulas (not from covariances.py), and dense Gaussian densities."""

import math

import numpy as np
import torch


def dft_1d(n):
    k = torch.arange(n, dtype=torch.float64)
    return torch.exp(-2j * math.pi * k[:, None] * k[None, :] / n) / math.sqrt(n)


def dct_1d(n):
    D = torch.empty(n, n, dtype=torch.float64)
    for k in range(n):
        for j in range(n):
            c = math.sqrt(1.0 / n) if k == 0 else math.sqrt(2.0 / n)
            D[k, j] = c * math.cos(math.pi * (2 * j + 1) * k / (2 * n))
    return D


def basis_matrix(C, H, W, basis):
    """U as a dense (d, d) matrix on images flattened in (C, H, W) order."""
    if basis == "pixel":
        return torch.eye(C * H * W, dtype=torch.complex128)
    one = dft_1d if basis == "fft" else dct_1d
    U2 = torch.kron(one(H).to(torch.complex128), one(W).to(torch.complex128))
    return torch.kron(torch.eye(C, dtype=torch.complex128), U2)


def dense_sigma(s, basis, p=1.0):
    """U^H diag(s^p) U for s of shape (C, H, W), real part (d, d)."""
    C, H, W = s.shape
    U = basis_matrix(C, H, W, basis)
    M = U.conj().T @ torch.diag((s.flatten() ** p).to(torch.complex128)) @ U
    assert M.imag.abs().max() <= 1e-12 * (1 + s.abs().max() ** abs(p))
    return M.real


def symmetric_spectrum(C, H, W, seed=0):
    """Positive variances on the (H, W) frequency grid with s[k] = s[-k], built from |k|."""
    g = torch.Generator().manual_seed(seed)
    kh = torch.arange(H)
    kw = torch.arange(W)
    ah, aw = torch.minimum(kh, H - kh).double(), torch.minimum(kw, W - kw).double()
    base = 1.0 / (1.0 + ah[:, None] ** 2 + aw[None, :] ** 2)
    scale = torch.exp(torch.randn(C, 1, 1, generator=g, dtype=torch.float64))
    wiggle = 1 + 0.3 * torch.cos(ah[:, None] + 2 * aw[None, :])  # symmetric in k -> -k too
    return (scale * base * wiggle).contiguous()


def random_spd(d, seed=0, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(d, d, generator=g, dtype=torch.float64)
    return scale * (M @ M.T / d + 0.2 * torch.eye(d, dtype=torch.float64))


def gaussian_nll(y, mean, K):
    """-log N(y; mean, K) for flat y (B, d), via torch.distributions."""
    dist = torch.distributions.MultivariateNormal(mean.flatten().expand(y.shape[0], -1), covariance_matrix=K)
    return -dist.log_prob(y)


def conv_circular(x, h):
    """Circular 2-D convolution of x (H, W) numpy array with a symmetric kernel h (2R+1, 2R+1)."""
    R = (h.shape[0] - 1) // 2
    out = np.zeros_like(x)
    for di in range(-R, R + 1):
        for dj in range(-R, R + 1):
            out += h[di + R, dj + R] * np.roll(x, (di, dj), axis=(0, 1))
    return out


def conv_symmetric(x, h):
    """2-D convolution with half-sample-symmetric padding (numpy 'symmetric': ...x1 x0 | x0 x1...)."""
    R = (h.shape[0] - 1) // 2
    H, W = x.shape
    xp = np.pad(x, R, mode="symmetric")
    out = np.zeros_like(x)
    for di in range(-R, R + 1):
        for dj in range(-R, R + 1):
            out += h[di + R, dj + R] * xp[R + di : R + di + H, R + dj : R + dj + W]
    return out


class default_float64:
    """Context manager: float64 as torch's default dtype inside, restored after (tests must not leak it)."""

    def __enter__(self):
        self.old = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)

    def __exit__(self, *exc):
        torch.set_default_dtype(self.old)
