"""
Diagonal covariances in three orthonormal bases, and the linear degradations built from them.

This is the first file to read (docs/method.md §2). Everything else in aebm speaks about noise
through the `Covariance` class defined here:

    Sigma = U^H diag(s) U                                                            (M1)

with s the per-coordinate variances, shape (B, C, H, W), and U one of three bases:

    pixel : U = I                       masks, inpainting, patch-wise variances
    fft   : U = unitary 2-D DFT         circular blur and super-resolution (s[k] = s[-k])
    dct   : U = orthonormal DCT-II      blur and SR with half-sample-symmetric boundaries

The second half of the file builds covariances for every family the project uses (isotropic,
box / half / random masks, patches, blur, super-resolution), the `Degradation` class that turns
a linear inverse problem y = A x + sigma_n xi into an anisotropic denoising problem (M2), and
the training distribution of covariances (docs/method.md §2).

aebm.py computes energies and dual-score losses for a (y, Covariance) pair; nets.py embeds
`cov.log_s`; sample.py builds its tasks from the constructors at the bottom of this file.
"""

import functools
import math

import torch

BASES = ("pixel", "fft", "dct")
S_HUGE = 1e8  # variance of a coordinate that carries no information (docs/method.md §2)
S_MIN, S_MAX = 1e-6, 1e3  # range of variances the network's embedding sees (docs/method.md §2)


# -----------------------------------------------------------------------------
# The three bases. One forward transform U and one inverse U^H per basis, used by everything.

@functools.lru_cache(maxsize=32)
def dct_matrix(n, dtype=torch.float64, device="cpu"):
    """Orthonormal DCT-II matrix D (n, n): D[k, j] = c_k sqrt(2/n) cos(pi (2j+1) k / (2n))."""
    j = torch.arange(n, dtype=torch.float64)
    k = torch.arange(n, dtype=torch.float64)[:, None]
    D = math.sqrt(2.0 / n) * torch.cos(math.pi * (2 * j + 1) * k / (2 * n))
    D[0] /= math.sqrt(2.0)  # c_0 = 1/sqrt(2) makes the rows orthonormal
    return D.to(dtype=dtype, device=device)


def dct_products(left, x, right):
    """left @ x @ right for the DCT, computed in float64 and returned in x's dtype. A transform is not
    network work: under autocast a matrix product runs in bf16, and with TF32 allowed (the CUDA
    default of the paper preset) in TF32, a 10-bit mantissa; either rounds away the informative
    coordinates (docs/precision.md). float64 is exact and cheap here."""
    with torch.autocast(x.device.type, enabled=False):
        return (left @ x.double() @ right).to(x.dtype)


def to_basis(x, basis):
    """U x: image (B, C, H, W) -> basis coordinates (complex for fft)."""
    if basis == "pixel":
        return x
    if basis == "fft":
        return torch.fft.fft2(x, norm="ortho")
    if basis == "dct":
        H, W = x.shape[-2:]
        return dct_products(dct_matrix(H, torch.float64, x.device), x, dct_matrix(W, torch.float64, x.device).T)
    raise ValueError(f"unknown basis {basis!r}: use one of {BASES}")


def from_basis(z, basis):
    """U^H z: basis coordinates -> image. For fft, the result is real when z is conjugate-symmetric;
    we return the real part (callers guarantee the symmetry)."""
    if basis == "pixel":
        return z
    if basis == "fft":
        return torch.fft.ifft2(z, norm="ortho").real
    if basis == "dct":
        H, W = z.shape[-2:]
        return dct_products(dct_matrix(H, torch.float64, z.device).T, z, dct_matrix(W, torch.float64, z.device))
    raise ValueError(f"unknown basis {basis!r}: use one of {BASES}")


def white_noise(shape, basis, generator=None, dtype=None, device="cpu"):
    """Basis coordinates zeta of real white noise xi ~ N(0, I): zeta = U xi (complex for fft, with
    zeta[k] = conj(zeta[-k])); for pixel and dct, xi itself has the law of U xi, so zeta = xi.
    Drawn in float64 and cast, so a run in float32 and its float64 reference see the same noise."""
    xi = torch.randn(shape, generator=generator, dtype=torch.float64, device=device)
    xi = xi.to(dtype or torch.get_default_dtype())
    return xi if basis != "fft" else to_basis(xi, basis)


def reflect_freq(s):
    """s[k] -> s[-k mod N] on the last two axes: the frequency index map k -> -k of the DFT."""
    return torch.roll(torch.flip(s, dims=(-2, -1)), shifts=(1, 1), dims=(-2, -1))


# -----------------------------------------------------------------------------
# The covariance itself.

class Covariance:
    """Sigma = U^H diag(s) U (M1). `s` has shape (B, C, H, W), one variance per basis coordinate.

    Build it from variances (`Covariance(s, basis)`) or from log-variances
    (`Covariance.from_log_s(log_s, basis)`); the second keeps `s` a differentiable function of
    `log_s`, which is how aebm.py takes dE/dlog s (M6, M7).
    """

    def __init__(self, s, basis, check=True):
        if basis not in BASES:
            raise ValueError(f"unknown basis {basis!r}: use one of {BASES}")
        if not torch.is_tensor(s) or s.dim() != 4:
            shape = tuple(s.shape) if torch.is_tensor(s) else type(s).__name__
            raise ValueError(f"variances must be a (B, C, H, W) tensor, got {shape}")
        if check:
            sd = s.detach()
            if not torch.isfinite(sd).all():
                raise ValueError("variances must be finite: got inf or nan")
            if not (sd > 0).all():
                raise ValueError(f"variances must be positive: got min {sd.min().item():.3g}")
            if basis == "fft" and not torch.allclose(sd, reflect_freq(sd), rtol=1e-5, atol=0):
                raise ValueError("fft variances must satisfy s[k] = s[-k] so that Sigma is real")
        self.s, self.basis = s, basis
        self.log_s = s.log()

    @classmethod
    def from_log_s(cls, log_s, basis):
        cov = cls(log_s.exp(), basis, check=False)
        cov.log_s = log_s  # keep the caller's tensor so autograd reaches it exactly
        return cov

    @property
    def shape(self):
        return tuple(self.s.shape)

    def U(self, x):
        return to_basis(x, self.basis)

    def Uh(self, z):
        return from_basis(z, self.basis)

    def apply(self, x, p=1.0):
        """Sigma^p x = U^H (s^p * U x) for any real p (M1). x: (B, C, H, W) or broadcastable."""
        return self.Uh(self.s ** p * self.U(x))

    def logdet(self):
        """log det Sigma = sum_k log s_k, one per image: (B,)."""
        return self.log_s.flatten(1).sum(1)

    def sample(self, generator=None):
        """Noise n ~ N(0, Sigma) and its whitened basis coordinates zeta, with n = U^H(sqrt(s) zeta).
        zeta = U xi for real white xi (complex for fft); the A-CSM target needs |zeta_k|^2 (M7)."""
        zeta = white_noise(self.s.shape, self.basis, generator, self.s.dtype, self.s.device)
        return self.Uh(self.s.sqrt() * zeta), zeta

    def dense(self, p=1.0):
        """Sigma^p as dense matrices (B, d, d) on the flattened image. For tests and small images."""
        B, C, H, W = self.s.shape
        d = C * H * W
        eye = torch.eye(d, dtype=self.s.dtype, device=self.s.device).view(d, C, H, W)
        cols = [self.Uh(self.s[b : b + 1] ** p * self.U(eye)).reshape(d, d).T for b in range(B)]
        return torch.stack(cols)

    def __getitem__(self, idx):
        """A sub-batch, e.g. cov[2:4]; keeps the autograd link to log_s."""
        return Covariance.from_log_s(self.log_s[idx], self.basis)

    def __repr__(self):
        s = self.s.detach()
        return f"Covariance(basis={self.basis}, shape={self.shape}, s in [{s.min():.3g}, {s.max():.3g}])"


def check_image_shape(shape):
    if len(shape) != 4 or min(shape) < 1:
        raise ValueError(f"shape must be (B, C, H, W) with positive sizes, got {tuple(shape)}")
    return tuple(int(n) for n in shape)


def check_variance(name, v):
    v = torch.as_tensor(v, dtype=torch.float64)
    if not torch.isfinite(v).all() or not (v > 0).all():
        raise ValueError(f"{name} must be positive and finite, got {v.tolist()}")


# -----------------------------------------------------------------------------
# Pixel-basis families: masks and patches (docs/method.md §2). Each mask is a boolean "missing"
# map of shape (B, 1, H, W); `mask_covariance` gives missing pixels one variance and observed
# pixels another.

def isotropic(sigma2, shape, basis="pixel", dtype=None, device="cpu"):
    """sigma^2 I, written in any basis. sigma2: a number or a (B,) tensor."""
    B, C, H, W = check_image_shape(shape)
    sigma2 = torch.as_tensor(sigma2, dtype=dtype or torch.get_default_dtype(), device=device)
    check_variance("sigma2", sigma2)
    s = sigma2.reshape(-1, 1, 1, 1).expand(B, C, H, W).clone()
    return Covariance(s, basis)


def box_mask(shape, size, top=None, left=None, device="cpu"):
    """Missing map of a size x size box at (top, left) (default: centred). size may be an int or a
    (B,) tensor of sizes, with top/left likewise, for a batch of different boxes."""
    B, _, H, W = check_image_shape(shape)
    size = torch.as_tensor(size, device=device).expand(B)
    if (size < 0).any() or (size > min(H, W)).any():
        raise ValueError(f"box size {size.max().item()} must be in 0..{min(H, W)} for {H}x{W} images")
    top = (H - size) // 2 if top is None else torch.as_tensor(top, device=device).expand(B)
    left = (W - size) // 2 if left is None else torch.as_tensor(left, device=device).expand(B)
    if (top < 0).any() or (left < 0).any() or (top + size > H).any() or (left + size > W).any():
        raise ValueError(f"box of size {size.tolist()} at {top.tolist()}, {left.tolist()} leaves the {H}x{W} image")
    i = torch.arange(H, device=device).view(1, H, 1)
    j = torch.arange(W, device=device).view(1, 1, W)
    t, l, n = top.view(B, 1, 1), left.view(B, 1, 1), size.view(B, 1, 1)
    return ((i >= t) & (i < t + n) & (j >= l) & (j < l + n)).unsqueeze(1)


def half_mask(shape, k, device="cpu"):
    """Missing map of the top k rows (k = 0..H); k may be an int or a (B,) tensor."""
    B, _, H, W = check_image_shape(shape)
    k = torch.as_tensor(k, device=device).expand(B)
    if (k < 0).any() or (k > H).any():
        raise ValueError(f"half mask must hide 0..{H} rows, got {k.tolist()}")
    i = torch.arange(H, device=device).view(1, H, 1)
    return (i < k.view(B, 1, 1)).expand(B, H, W).unsqueeze(1)


def random_mask(shape, rho, generator=None, device="cpu"):
    """Missing map with each pixel missing independently with probability rho."""
    B, _, H, W = check_image_shape(shape)
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"missing fraction must be in [0, 1], got {rho}")
    return torch.rand(B, 1, H, W, generator=generator, device=device) < rho


def mask_covariance(missing, s_missing, s_observed, channels, dtype=None):
    """Pixel-basis covariance: variance s_missing where `missing`, s_observed elsewhere.
    s_missing, s_observed: numbers or (B,) tensors."""
    B, _, H, W = missing.shape
    dtype = dtype or torch.get_default_dtype()
    s_in = torch.as_tensor(s_missing, dtype=dtype, device=missing.device).reshape(-1, 1, 1, 1)
    s_out = torch.as_tensor(s_observed, dtype=dtype, device=missing.device).reshape(-1, 1, 1, 1)
    check_variance("s_missing", s_in)
    check_variance("s_observed", s_out)
    s = torch.where(missing, s_in, s_out).expand(B, channels, H, W).contiguous()
    return Covariance(s, "pixel")


def patch_covariance(s_patch, P):
    """Any-order covariance: the image cut into P x P patches, each with its own variance.
    s_patch: (B, C, H/P, W/P) or (B, 1, H/P, W/P) variances; returns a (B, C, H, W) pixel covariance."""
    if s_patch.dim() != 4 or P < 1:
        raise ValueError(f"patch variances must be (B, C, H/P, W/P) and P >= 1, got {tuple(s_patch.shape)}, P={P}")
    s = s_patch.repeat_interleave(P, dim=-2).repeat_interleave(P, dim=-1)
    return Covariance(s.contiguous(), "pixel")


# -----------------------------------------------------------------------------
# Spectral families: the eigenvalues a_k of blur and super-resolution operators in a basis
# (docs/method.md §2). Both are separable, a_{k1,k2} = a_{k1} a_{k2}.

def gaussian_kernel_1d(b, n):
    """Normalised Gaussian taps h(-R..R) of std b pixels, radius R = min(ceil(4b), n // 2 - 1)
    (so the kernel fits inside one period of both the circular and the symmetric extension)."""
    if not (b > 0 and math.isfinite(b)):
        raise ValueError(f"blur std must be positive, got {b}")
    R = max(0, min(math.ceil(4 * b), n // 2 - 1))
    t = torch.arange(-R, R + 1, dtype=torch.float64)
    h = torch.exp(-0.5 * (t / b) ** 2)
    return h / h.sum()


def blur_eigenvalues_1d(b, n, basis):
    """Eigenvalues of the 1-D Gaussian blur of std b on n samples in `basis`."""
    h = gaussian_kernel_1d(b, n)
    R = (len(h) - 1) // 2
    k = torch.arange(n, dtype=torch.float64)
    m = torch.arange(1, R + 1, dtype=torch.float64)
    if basis == "fft":  # DFT of the periodised symmetric kernel: h(0) + 2 sum h(m) cos(2 pi k m / n)
        return h[R] + 2 * (h[R + 1 :] * torch.cos(2 * math.pi * k[:, None] * m / n)).sum(1)
    if basis == "dct":  # half-sample-symmetric extension: h(0) + 2 sum h(m) cos(pi k m / n)
        return h[R] + 2 * (h[R + 1 :] * torch.cos(math.pi * k[:, None] * m / n)).sum(1)
    raise ValueError(f"blur needs a spectral basis ('fft' or 'dct'), got {basis!r}")


def sr_eigenvalues_1d(r, n, basis):
    """Super-resolution by r keeps the lowest n/r frequencies (a = 1) and drops the rest (a = 0).
    fft: |f| < 1/(2r) cycles/pixel, the low-resolution Nyquist pair dropped so that a[k] = a[-k]
    (A stays real); dct: the first n/r coefficients (exact DCT-domain down-sampling)."""
    if not isinstance(r, int) or r < 1 or n % r:
        raise ValueError(f"super-resolution factor {r} must be a positive integer dividing the size {n}")
    k = torch.arange(n)
    if basis == "fft":
        kk = torch.minimum(k, n - k)  # |frequency index|
        return (2 * kk < n // r).double()
    if basis == "dct":
        return (k < n // r).double()
    raise ValueError(f"super-resolution needs a spectral basis ('fft' or 'dct'), got {basis!r}")


def separable(a_h, a_w, shape, dtype, device):
    B, C, H, W = shape
    return (a_h[:, None] * a_w[None, :]).to(dtype=dtype or torch.get_default_dtype(), device=device).expand(B, C, H, W)


# -----------------------------------------------------------------------------
# A linear inverse problem as anisotropic denoising (docs/method.md §2, paper eq. 7).

class Degradation:
    """y_obs = A x + sigma_n xi with A = U^H diag(a) U. `a` has shape (B, C, H, W).

    `to_denoising` maps a measurement to an anisotropic-denoising observation (y, Sigma) with
    s_k = sigma_n^2 / a_k^2 (M2), capped at S_HUGE where a_k carries no information.
    """

    def __init__(self, a, basis, sigma_n, s_huge=S_HUGE):
        if basis not in BASES:
            raise ValueError(f"unknown basis {basis!r}: use one of {BASES}")
        if not (isinstance(sigma_n, (int, float)) and sigma_n > 0 and math.isfinite(sigma_n)):
            raise ValueError(f"noise level sigma_n must be a positive number, got {sigma_n}")
        self.a, self.basis, self.sigma_n, self.s_huge = a, basis, float(sigma_n), s_huge
        # a coordinate is informative when its variance sigma_n^2 / a^2 stays below s_huge
        self.informative = self.a ** 2 * s_huge > self.sigma_n ** 2

    def A(self, x):
        return from_basis(self.a * to_basis(x, self.basis), self.basis)

    def measure(self, x, generator=None):
        """y_obs = A x + sigma_n xi, xi white in pixels."""
        xi = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        return self.A(x) + self.sigma_n * xi

    def covariance(self):
        """Sigma of the denoising problem (M2): s = sigma_n^2 / a^2 where informative, s_huge elsewhere."""
        a2 = torch.where(self.informative, self.a ** 2, torch.ones_like(self.a))
        return Covariance(torch.where(self.informative, self.sigma_n ** 2 / a2, self.s_huge), self.basis)

    def to_denoising(self, y_obs, mean=0.5):
        """(M2) y~ = U^H(U y_obs / a) = x + U^H(sigma_n xi' / a) on informative coordinates. The others
        carry no information about x; they hold the data mean mu_k, not a draw of std sqrt(s_huge) = 1e4:
        such a draw would change no answer (the posterior mean does not depend on it, and blind
        deblurring and Bayes' rule remove its Gaussian-limit energy), but in a spectral basis it
        spreads values ~1e4 over every pixel, and a float32 y~ would round the informative
        coordinates to ~4e-4 (docs/precision.md). Returns (y~, Sigma); to_denoising_z gives U y~
        without the pixel round trip."""
        z, cov = self.to_denoising_z(y_obs, mean)
        return from_basis(z, self.basis), cov

    def to_denoising_z(self, y_obs, mean=0.5):
        """(U y~, Sigma): M2 in basis coordinates."""
        z = to_basis(y_obs, self.basis)
        a_safe = torch.where(self.informative, self.a, torch.ones_like(self.a))
        mu = to_basis(torch.as_tensor(mean, dtype=y_obs.dtype, device=y_obs.device).expand_as(y_obs), self.basis)
        return torch.where(self.informative, z / a_safe, mu), self.covariance()


def upscale_grid(small, r):
    """A small image l (B, C, h, w) as the measurement of super-resolution by r on the (rh, rw) grid, in
    the DCT basis: the kept coefficients of the large image are r times the small image's DCT
    (DCT-domain down-sampling, docs/method.md §2); the dropped ones are not measured (zero here)."""
    B, C, h, w = small.shape
    z = torch.zeros(B, C, r * h, r * w, dtype=small.dtype, device=small.device)
    z[..., :h, :w] = r * to_basis(small, "dct")
    return from_basis(z, "dct")


def denoising_problem(shape, sigma_n, dtype=None, device="cpu"):
    """Plain denoising: A = I."""
    ones = torch.ones(check_image_shape(shape), dtype=dtype or torch.get_default_dtype(), device=device)
    return Degradation(ones, "pixel", sigma_n)


def inpainting_problem(missing, channels, sigma_n, dtype=None):
    """Inpainting: A = diag(1 - missing) in pixels. missing: (B, 1, H, W) bool."""
    a = (~missing).to(dtype or torch.get_default_dtype()).expand(-1, channels, -1, -1).contiguous()
    return Degradation(a, "pixel", sigma_n)


def blur_problem(shape, b, sigma_n, basis="dct", dtype=None, device="cpu"):
    """Gaussian deblurring with kernel std b pixels; fft: circular boundaries, dct: symmetric."""
    B, C, H, W = check_image_shape(shape)
    a = separable(blur_eigenvalues_1d(b, H, basis), blur_eigenvalues_1d(b, W, basis), (B, C, H, W), dtype, device)
    return Degradation(a.contiguous(), basis, sigma_n)


def sr_problem(shape, r, sigma_n, basis="dct", dtype=None, device="cpu"):
    """Super-resolution by factor r: keep the lowest H/r x W/r frequencies."""
    B, C, H, W = check_image_shape(shape)
    if not isinstance(r, int) or r < 1 or H % r or W % r:
        raise ValueError(f"super-resolution factor {r} must be a positive integer dividing the image size {H}x{W}")
    a = separable(sr_eigenvalues_1d(r, H, basis), sr_eigenvalues_1d(r, W, basis), (B, C, H, W), dtype, device)
    return Degradation(a.contiguous(), basis, sigma_n)


# -----------------------------------------------------------------------------
# The training distribution of covariances (docs/method.md §2).

def log_uniform(n, lo, hi, generator=None):
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    return torch.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))


def sample_training_covariances(shape, spectral_basis="fft", p_isotropic=0.1, s_range=(S_MIN, S_MAX),
                                noise_range=(1e-6, 1.0), generator=None, dtype=None, device="cpu", p_hole=0.0,
                                p_random=0.0):
    """Draw one covariance per image of a batch of `shape` (docs/method.md §2).

    Each image is, with probability 1/2, a pixel-basis mask (box or half, size uniform in 1..H,
    position uniform, s_in and s_out independent log-uniform in s_range), otherwise a spectral one
    in `spectral_basis` (blur with b ~ U[0.3, 3] px, or SR with r in {2, 4}; noise variance
    log-uniform in noise_range; s from M2). A fraction p_isotropic of all images is isotropic.
    p_hole (aebm's addition, 0 by default): the fraction of masks drawn like an inpainting task, the
    hole's variance log-uniform in [1, hi] and the observed pixels' in [lo, 1e-2]; independent draws
    make that combination only ~8% of masks.
    p_random (aebm's addition, 0 by default): the fraction of masks that are random pixel masks, each pixel
    missing with probability rho ~ U[0.05, 0.95], the scattered-pixel inpainting of the paper's Fig. 6;
    boxes and halves alone never show the network a mask that is missing everywhere and nowhere.

    A `Covariance` has one basis, so the batch comes back as a list of (slice, Covariance) groups:
    the pixel-basis images first, then the spectral ones. Callers evaluate each group and
    concatenate (aebm.dual_score_loss does this for them).
    """
    B, C, H, W = check_image_shape(shape)
    g = generator
    pixel = torch.rand(B, generator=g) < 0.5
    n_pix = int(pixel.sum())
    groups = []
    for basis, n, start in (("pixel", n_pix, 0), (spectral_basis, B - n_pix, n_pix)):
        if n == 0:
            continue
        s = torch.empty(n, C, H, W, dtype=torch.float64)
        for i in range(n):
            if torch.rand(1, generator=g).item() < p_isotropic:
                s[i] = log_uniform(1, *s_range, g).item()
            elif basis == "pixel":
                if p_random > 0 and torch.rand(1, generator=g).item() < p_random:  # (no draw when off)
                    rho = 0.05 + 0.9 * torch.rand(1, generator=g).item()
                    missing = random_mask((1, 1, H, W), rho, g)
                elif torch.rand(1, generator=g).item() < 0.5:
                    size = int(torch.randint(1, min(H, W) + 1, (1,), generator=g))
                    top = int(torch.randint(0, H - size + 1, (1,), generator=g))
                    left = int(torch.randint(0, W - size + 1, (1,), generator=g))
                    missing = box_mask((1, 1, H, W), size, top, left)
                else:
                    missing = half_mask((1, 1, H, W), int(torch.randint(1, H + 1, (1,), generator=g)))
                if p_hole > 0 and torch.rand(1, generator=g).item() < p_hole:  # (no draw when off)
                    s_in = log_uniform(1, max(1.0, s_range[0]), s_range[1], g)[0]
                    s_out = log_uniform(1, s_range[0], min(1e-2, s_range[1]), g)[0]
                else:
                    s_in, s_out = log_uniform(2, *s_range, g)
                s[i] = torch.where(missing[0], s_in, s_out)
            else:
                sigma2 = log_uniform(1, *noise_range, g).item()
                if torch.rand(1, generator=g).item() < 0.5:
                    b = 0.3 + 2.7 * torch.rand(1, generator=g).item()
                    a = separable(blur_eigenvalues_1d(b, H, basis), blur_eigenvalues_1d(b, W, basis),
                                  (1, C, H, W), torch.float64, "cpu")[0]
                else:
                    factors = [r for r in (2, 4) if H % r == 0 and W % r == 0] or [1]
                    r = factors[int(torch.randint(len(factors), (1,), generator=g))]
                    a = separable(sr_eigenvalues_1d(r, H, basis), sr_eigenvalues_1d(r, W, basis),
                                  (1, C, H, W), torch.float64, "cpu")[0]
                # (M2) s = sigma_n^2 / a^2, capped at S_HUGE where a is (numerically) zero
                s[i] = torch.clamp(sigma2 / (a ** 2).clamp_min(1e-300), max=S_HUGE)
        s = s.to(dtype=dtype or torch.get_default_dtype(), device=device)
        groups.append((slice(start, start + n), Covariance(s, basis)))
    return groups
