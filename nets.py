"""
The network F_theta of the energy (docs/method.md §3): an EDM-style "SongUNet" (DDPM++ family) whose
noise conditioning is an embedding of the whole covariance Sigma, applied as gains.

    energy = aebm.EnergyModel(UNet(**CONFIGS["small"], img_size=32, in_channels=3))

aebm.EnergyModel (M3) whitens y, calls `net(x, cov)` and turns the output F (same shape as x) into
a scalar energy; this file only has to produce F. Read covariances.py and aebm.py first.

Conditioning. The variance map log s (B, C, H, W) is embedded coordinate by coordinate: sinusoidal
features of each log-variance, then a small residual MLP (1x1 convolutions) to `emb_hidden`
features per coordinate. Every residual block gets gains g from a linear projection of those
features and modulates its own features as

    h <- SiLU(GroupNorm(h) * (1 + g)).

Two branches, as in the paper:
  - spatial (pixel-basis Sigma): the feature map is average-pooled to each block's resolution,
    so gains vary per pixel (a mask tells each location how noisy it is);
  - spectral (fft/dct Sigma): the features of the frequency map (plus each frequency's position)
    give gains per frequency, applied where Sigma is diagonal:

        h <- SiLU(GroupNorm(h) * (1 + g) + U^H(g_freq * U GroupNorm(h))),

    each block's map of h x w pixels taking the gains of the lowest h x w frequencies, those it
    still carries. A blur tells each frequency how noisy it is, as a mask tells each pixel. (The
    paper averages the spectral features over frequencies into per-channel gains; that form,
    `spectral="pooled"`, is kept for older checkpoints. With it, F cannot tell which frequency is
    noisy, and the normalization of blur and SR energies suffers: docs/results.md §2.)
An isotropic Sigma is the same matrix in every basis, so it must get the same conditioning in
every basis. We make that exact: the spatial MLP works per coordinate, so a constant map gives a
constant map, identical to its output on the 1x1 map of the mean log-variance. A spectral Sigma is
therefore conditioned as

    spatial(mean log s, as a 1x1 map)  +  spectral(log s) * (log s - mean log s),

the isotropic part plus an anisotropic correction gated by each frequency's deviation from the mean
log-variance, exactly zero for isotropic Sigma. The result is smooth in log s and basis-independent
for sigma^2 I (tests/test_nets.py checks it).

The learned normalizing constant (M3's sum_k w_k b_k) follows the same rule: for a spectral Sigma,
b_k is a function of s_k and of the position k only (UNet.separable_offset), the form of a
stationary Gaussian's exact constant.

Cost (docs/benchmarks.md). The dual loss differentiates the conditioning path twice, so it is kept
lean: per-coordinate 1x1 layers without normalisation, and the gains of all the blocks of one
level from one projection of the pooled features. The paper's 512-channel embedding map between
the MLP and the gains is left out: two linear maps in a row are one linear map of the same rank
(at most emb_hidden), computed here at a quarter of the cost at full resolution.

Everything here is twice differentiable (training differentiates dE/dy again). Attention is an
explicit softmax: torch's scaled_dot_product_attention picks fused kernels (flash on CPU; flash or
memory-efficient on CUDA) whose backward has no derivative, so create_graph=True fails there.
GroupNorm and SiLU keep their native first backward and bring their second derivative written out
(a few lines of algebra each): torch's own versions become ~20 small operations each under
create_graph=True (docs/benchmarks.md). Those layers, and the 1x1 convolutions written as matrix
products, follow the UNet at the end of the file: they change how derivatives are computed, not
what the network is.
"""

import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import aebm
import covariances as cv
from covariances import S_MAX, S_MIN

# Presets are plain dicts (docs/method.md §3). `paper64` is the paper's 64x64 network; `small` is the
# CPU configuration used by the quickstart; `tiny` keeps tests fast.
CONFIGS = {
    "paper64": dict(channels=128, mults=(1, 2, 2, 2), blocks=4, attn=(16,), dropout=0.1,
                    emb_hidden=128, emb_blocks=4),
    "small": dict(channels=28, mults=(1, 2, 2), blocks=1, attn=(8,), dropout=0.0,
                  emb_hidden=16, emb_blocks=2),
    "tiny": dict(channels=8, mults=(1, 2), blocks=1, attn=(4,), dropout=0.0,
                 emb_hidden=8, emb_blocks=1),
}
N_FREQS = 6  # sinusoidal frequencies per log-variance
SPECTRAL_SCALE = 5.0  # log-variance deviations (up to ~20 in a spectrum) scaled to O(1) before gating


# -----------------------------------------------------------------------------
# The covariance embedding.

def mask_context(phi):
    """Each pixel's neighbourhood in the features phi (B, hidden, H, W) of a pixel-basis Sigma, relative to the
    pixel itself: the means over 3x3 and 7x7 windows (image pixels only at the borders) and over the whole image,
    minus phi. (B, 3 hidden, H, W), exactly zero for sigma^2 I, so the offsets built on it change nothing for
    an isotropic Sigma and it keeps the same energy in every basis."""
    local = [F.avg_pool2d(phi, k, stride=1, padding=k // 2, count_include_pad=False) for k in (3, 7)]
    return torch.cat([m - phi for m in local + [phi.mean(dim=(-2, -1), keepdim=True).expand_as(phi)]], 1)


def sinusoidal(log_s):
    """Per-coordinate features of the clamped log-variance: (B, C, H, W) -> (B, 2 N_FREQS C, H, W)."""
    lo, hi = math.log(S_MIN), math.log(S_MAX)
    u = (log_s.clamp(lo, hi) - (lo + hi) / 2) / ((hi - lo) / 2)  # in [-1, 1]
    f = (math.pi / 2) * 2.0 ** torch.arange(N_FREQS, device=log_s.device, dtype=log_s.dtype)
    angles = u.unsqueeze(2) * f.view(1, 1, -1, 1, 1)  # (B, C, N_FREQS, H, W)
    return torch.cat([angles.sin(), angles.cos()], dim=2).flatten(1, 2)


class EmbeddingNet(nn.Module):
    """Per-coordinate features of the log-variances: a residual MLP written with 1x1 convolutions,
    (B, in_ch, H, W) -> (B, hidden, H, W). No normalisation layers: the inputs are bounded sinusoids,
    and every layer here is differentiated twice by the dual loss."""

    def __init__(self, in_ch, hidden, n_blocks):
        super().__init__()
        self.inp = Conv1x1(in_ch, hidden)
        self.blocks = nn.ModuleList(nn.Sequential(SiLU(), Conv1x1(hidden, hidden),
                                                  SiLU(), Conv1x1(hidden, hidden)) for _ in range(n_blocks))
        self.act = SiLU()

    def forward(self, features):
        h = self.inp(features)
        for block in self.blocks:
            h = (h + block(h)) * math.sqrt(0.5)
        return self.act(h)


def frequency_coordinates(basis, H, W, ref):
    """Two channels telling the spectral branch where each coordinate sits: |frequency| along H and W,
    in [0, 1], laid out like the (fftshifted, for fft) variance map. (1, 2, H, W)."""
    def one(n):
        k = torch.arange(n, device=ref.device, dtype=ref.dtype)
        if basis == "fft":
            return torch.fft.fftshift(torch.minimum(k, n - k)) / max(1, n // 2)
        return k / max(1, n - 1)
    fh, fw = one(H), one(W)
    return torch.stack([fh[:, None].expand(H, W), fw[None, :].expand(H, W)])[None]


# -----------------------------------------------------------------------------
# UNet blocks.

def zero_init(module):
    nn.init.zeros_(module.weight)
    nn.init.zeros_(module.bias)
    return module


def group_norm(ch):
    return GroupNorm(num_groups=min(32, max(1, ch // 4)), num_channels=ch, eps=1e-6)


class Attention(nn.Module):
    """Self-attention over positions, explicit softmax (twice differentiable on every backend)."""

    def __init__(self, ch, head_dim=64):
        super().__init__()
        self.heads = max(1, ch // head_dim)
        self.norm = group_norm(ch)
        self.qkv = Conv1x1(ch, 3 * ch)
        self.proj = zero_init(Conv1x1(ch, ch))

    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W).unbind(1)
        w = torch.softmax(torch.einsum("bhcq,bhck->bhqk", q, k) / math.sqrt(C // self.heads), dim=-1)
        a = torch.einsum("bhqk,bhck->bhcq", w, v).reshape(B, C, H, W)
        return (x + self.proj(a)) * math.sqrt(0.5)


def spectral_modulation(h, g, basis):
    """U^H(g * U h): a block's features h (B, ch, h, w) multiplied frequency by frequency in the basis
    where a spectral Sigma is diagonal, the spectral counterpart of the spatial branch's per-pixel
    gains. g (B, ch, h, w) is laid out like U h (fft: unshifted). Network work, so it runs in the
    features' dtype (under autocast torch computes the FFT in float32)."""
    if basis == "dct":
        Dh, Dw = cv.dct_matrix(h.shape[-2], h.dtype, h.device), cv.dct_matrix(h.shape[-1], h.dtype, h.device)
        return Dh.T @ (g * (Dh @ h @ Dw.T)) @ Dw
    # fft: real part, a real linear map of h (exactly U^H(g U h) when g is conjugate-symmetric); torch's FFT
    # has no bf16 kernels, so half-precision features are transformed in float32
    hf = h.float() if h.dtype in (torch.bfloat16, torch.float16) else h
    return torch.fft.ifft2(g.to(hf.dtype) * torch.fft.fft2(hf, norm="ortho"), norm="ortho").real.to(h.dtype)


def frequency_crop(g, basis, h, w):
    """The gains of a spectral map at full size (B, ch, H, W) restricted to the lowest h x w frequencies,
    those a feature map down-sampled to h x w still carries; laid out like U of that map. For dct the
    lowest frequencies are the top-left corner; for fft, g is fftshifted (zero frequency at H//2, W//2)
    and the crop is centred there, then shifted back."""
    if basis == "dct":
        return g[..., :h, :w]
    H, W = g.shape[-2:]
    crop = g[..., H // 2 - h // 2: H // 2 - h // 2 + h, W // 2 - w // 2: W // 2 - w // 2 + w]
    return torch.fft.ifftshift(crop, dim=(-2, -1))


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, then the gain-modulated GroupNorm -> SiLU -> dropout -> conv,
    a skip connection, and optional attention (EDM's UNetBlock, with gains in place of the noise
    embedding's scale). The gains g come from the UNet's conditioning (one projection per level)."""

    def __init__(self, in_ch, out_ch, dropout, attention):
        super().__init__()
        self.out_ch = out_ch
        self.norm0, self.conv0 = group_norm(in_ch), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm1, self.dropout = group_norm(out_ch), nn.Dropout(dropout)
        self.act0, self.act1 = SiLU(), SiLU()
        self.conv1 = zero_init(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = Conv1x1(in_ch, out_ch) if in_ch != out_ch else nn.Identity()
        self.attn = Attention(out_ch) if attention else None

    def forward(self, x, g, g_freq=None, basis=None):
        h = self.conv0(self.act0(self.norm0(x)))
        h = self.norm1(h)
        m = h * (1 + g)  # g: (B, ch, h, w) for pixel-basis Sigma, (B, ch, 1, 1) otherwise
        if g_freq is not None:  # spectral Sigma: gains per frequency, applied where Sigma is diagonal
            m = m + spectral_modulation(h, g_freq, basis)
        h = self.conv1(self.dropout(self.act1(m)))
        x = (self.skip(x) + h) * math.sqrt(0.5)
        return self.attn(x) if self.attn is not None else x


# -----------------------------------------------------------------------------
# The UNet.

class UNet(nn.Module):
    """F_theta(x, Sigma): (B, C, H, W) -> (B, C, H, W). `attn` lists the resolutions (in pixels, at the
    training size img_size) that get self-attention. The network is convolutional: it runs on any
    H, W divisible by 2^(len(mults) - 1) (attention stays at the same levels)."""

    def __init__(self, img_size, in_channels, channels, mults, blocks, attn, dropout, emb_hidden, emb_blocks,
                 spectral="frequency", anchor="white"):
        super().__init__()
        if spectral not in ("frequency", "pooled"):
            raise ValueError(f"spectral conditioning {spectral!r}: use 'frequency' or 'pooled'")
        if anchor not in ("white", "spectral"):
            raise ValueError(f"anchor {anchor!r}: use 'white' or 'spectral'")
        self.spectral_mode = spectral
        self.factor = 2 ** (len(mults) - 1)
        if img_size % self.factor or img_size < self.factor:
            raise ValueError(f"image size {img_size} must be divisible by {self.factor} (the UNet halves it "
                             f"{len(mults) - 1} times); pick another --img-size or a config with fewer levels")
        self.img_size, self.in_channels = img_size, in_channels
        feat = 2 * N_FREQS * in_channels
        self.spatial = EmbeddingNet(feat, emb_hidden, emb_blocks)
        # With M3's spectral anchor (aebm.EnergyModel.anchor_var) sigma^2 I has one Gaussian part in the pixel
        # basis (white) and another in a spectral basis (the data's spectrum), so the learned term that completes
        # each to the same energy differs: the network must know which anchor it completes. A learned shift of
        # the log-variance features of spectral Sigma (zero-initialised) tells it; white-anchor models have none
        # and stay exactly basis-independent for sigma^2 I.
        self.anchor_shift = nn.Parameter(torch.zeros(1, feat, 1, 1)) if anchor == "spectral" else None
        self.spectral = EmbeddingNet(feat + 2, emb_hidden, emb_blocks)
        attn_levels = {level for level in range(len(mults)) if img_size >> level in attn}

        # Layers in order; every ResBlock remembers its level (resolution img / 2^level) for its gains.
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.enc, skips, ch, self.levels = nn.ModuleList(), [channels], channels, []
        for level, mult in enumerate(mults):
            if level > 0:
                self.enc.append(nn.AvgPool2d(2))  # down-sampling
                skips.append(ch)
            for _ in range(blocks):
                self.enc.append(ResBlock(ch, channels * mult, dropout, level in attn_levels))
                self.levels.append(level)
                ch = channels * mult
                skips.append(ch)
        self.mid = nn.ModuleList([ResBlock(ch, ch, dropout, True), ResBlock(ch, ch, dropout, False)])
        self.levels += [len(mults) - 1] * 2
        self.dec = nn.ModuleList()
        for level, mult in reversed(list(enumerate(mults))):
            for _ in range(blocks + 1):
                self.dec.append(ResBlock(ch + skips.pop(), channels * mult, dropout, level in attn_levels))
                self.levels.append(level)
                ch = channels * mult
            if level > 0:
                self.dec.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                              nn.Conv2d(ch, ch, 3, padding=1)))  # up-sampling
        self.out = nn.Sequential(group_norm(ch), SiLU(), zero_init(nn.Conv2d(ch, in_channels, 3, padding=1)))

        # Gain projections: one 1x1 conv per level gives the gains of all the blocks at that level at once
        # (fewer, larger operations: the dual loss differentiates this path twice).
        blocks_in_order = [m for m in list(self.enc) + list(self.mid) + list(self.dec) if isinstance(m, ResBlock)]
        width = [sum(b.out_ch for b, l in zip(blocks_in_order, self.levels) if l == level) for level in range(len(mults))]
        self.split = [[b.out_ch for b, l in zip(blocks_in_order, self.levels) if l == level] for level in range(len(mults))]
        self.gain_spatial = nn.ModuleList(Conv1x1(emb_hidden, w) for w in width)
        self.gain_spectral = nn.ModuleList(Conv1x1(emb_hidden, w, bias=False) for w in width)  # zero for sigma^2 I
        # The learned normalizing constant (docs/method.md, M3): a per-coordinate function of the
        # covariance alone, added to M3 as sum_k w_k b_k(Sigma). DSM cannot see it; A-CSM pins it. M3's
        # other terms can express a Sigma-dependent constant only through y (as |y~|^2), which DSM
        # penalises. Zero-initialised: a new model still starts at the Gaussian energy.
        self.offset = zero_init(Conv1x1(emb_hidden, in_channels))
        self.offset_spectral = Conv1x1(emb_hidden, in_channels, bias=False)
        nn.init.zeros_(self.offset_spectral.weight)
        if spectral == "frequency":  # features of each frequency's position for the separable constant
            self.frequency_features = EmbeddingNet(2, emb_hidden, 1)
        # A mask's constant depends on the arrangement of its variances, not only on each pixel's own: for a
        # correlated prior, scattered missing pixels are predicted from their neighbours and a box is not, so
        # log det(C + Sigma) differs between masks with the same variances in other places. Per-pixel offsets
        # b(s_k) give both the same constant; these add each pixel's neighbourhood (UNet.mask_context).
        self.offset_context = Conv1x1(3 * emb_hidden, in_channels, bias=False)
        nn.init.zeros_(self.offset_context.weight)

    def embed(self, cov):
        """The embeddings: spatial (B, hidden, H, W) for pixel-basis Sigma, or (B, hidden, 1, 1) with the
        spectral correction (B, hidden, 1, 1) for fft/dct Sigma (None for pixel); and the per-coordinate
        offsets b (B, C, H, W) of the learned normalizing constant, in cov's coordinates."""
        log_s = cov.log_s.to(self.conv_in.weight.dtype)
        if cov.basis == "pixel":
            spatial = self.spatial(sinusoidal(log_s))  # (B, hidden, H, W)
            return spatial, None, self.offset(spatial) + self.offset_context(mask_context(spatial))
        if cov.basis == "fft":
            log_s = torch.fft.fftshift(log_s, dim=(-2, -1))  # low frequencies in the middle of the map
        mean = log_s.mean(dim=(-2, -1), keepdim=True)  # (B, C, 1, 1): the isotropic part
        shift = 0 if self.anchor_shift is None else self.anchor_shift.to(log_s.dtype)
        iso = self.spatial(sinusoidal(mean) + shift)  # (B, hidden, 1, 1), identical to a constant full-size map
        coords = frequency_coordinates(cov.basis, *log_s.shape[-2:], log_s)
        aniso = self.spectral(torch.cat([sinusoidal(log_s), coords.expand(log_s.shape[0], -1, -1, -1)], 1))
        # gated by each frequency's log-variance above or below the mean: exactly zero for isotropic Sigma
        deviation = (log_s - mean).mean(1, keepdim=True) / SPECTRAL_SCALE  # (B, 1, H, W)
        if self.spectral_mode == "pooled":  # the paper's form: per-channel gains, a constant gated by the mean
            offset = self.offset(iso) + self.offset_spectral(aniso) * deviation
            spectral = (aniso * deviation).mean(dim=(-2, -1), keepdim=True)
        else:
            offset = self.separable_offset(log_s, coords, shift)
            spectral = aniso * deviation  # (B, hidden, H, W): gains per frequency (UNet.gains crops them per level)
        if cov.basis == "fft":
            offset = torch.fft.ifftshift(offset, dim=(-2, -1))  # back to the coordinates' layout
        return iso, spectral, offset.expand(cov.log_s.shape)

    def separable_offset(self, log_s, coords, shift=0):
        """b_k = T(s_k, k) for a spectral Sigma: each frequency's offset depends on its own variance and
        position only, so the constant sum_k w_k b_k is a sum over frequencies of one function, the form
        of a stationary Gaussian's exact constant 1/2 sum_k log((c_k + s_k) / (sigma_d^2 + s_k)). Written as
        the spatial branch's offset of s_k (what sigma^2 I gets in the pixel basis) plus a correction
        sum_j phi_j(s_k) beta_j(k) whose position features beta sum to zero over the frequencies, so
        sigma^2 I gets exactly the pixel basis' constant. tests/test_nets.py checks the swap identity
        C(a) + C(b) = C(a|b) + C(b|a) that every such sum satisfies."""
        phi = self.spatial(sinusoidal(log_s) + shift)  # (B, hidden, H, W), a function of s_k alone
        beta = self.frequency_features(coords)  # (1, hidden, H, W), a function of k alone
        beta = beta - beta.mean(dim=(-2, -1), keepdim=True)
        return self.offset(phi) + self.offset_spectral(phi * beta)

    def gains(self, spatial, spectral, basis, size):
        """(gains, frequency gains or None) of every ResBlock, in the order of the blocks, from the
        embeddings; size = (H, W) of the image."""
        per_level = []
        for level, (conv_sp, conv_spec) in enumerate(zip(self.gain_spatial, self.gain_spectral)):
            e = F.avg_pool2d(spatial, 2 ** level) if level > 0 and spatial.shape[-1] > 1 else spatial
            g = conv_sp(e)  # (B, width, h, w): all the blocks of this level
            g_freq = [None] * len(self.split[level])
            if spectral is not None and self.spectral_mode == "pooled":
                g = g + conv_spec(spectral)
            elif spectral is not None:  # the frequencies a map of this level carries, in its own layout
                g_freq = conv_spec(frequency_crop(spectral, basis, size[0] >> level, size[1] >> level))
                g_freq = torch.split(g_freq, self.split[level], dim=1)
            per_level.append(list(zip(torch.split(g, self.split[level], dim=1), g_freq)))
        return [per_level[level].pop(0) for level in self.levels]

    def forward(self, x, cov, with_offset=False):
        H, W = x.shape[-2:]
        if x.shape[1] != self.in_channels or H % self.factor or W % self.factor:
            raise ValueError(f"UNet takes ({self.in_channels}, H, W) images with H, W divisible by {self.factor}, "
                             f"got {tuple(x.shape[1:])}")
        spatial, spectral, offset = self.embed(cov)
        gains = iter(self.gains(spatial, spectral, cov.basis, (H, W)))
        h = self.conv_in(x)
        skips = [h]
        for layer in self.enc:
            h = layer(h, *next(gains), cov.basis) if isinstance(layer, ResBlock) else layer(h)
            skips.append(h)
        for block in self.mid:
            h = block(h, *next(gains), cov.basis)
        for layer in self.dec:
            if isinstance(layer, ResBlock):
                h = layer(torch.cat([h, skips.pop()], dim=1), *next(gains), cov.basis)
            else:
                h = layer(h)
        return (self.out(h), offset) if with_offset else self.out(h)


def build_unet(config, img_size, in_channels, dropout=None, spectral="frequency", anchor="white"):
    """The UNet of a named configuration (CONFIGS) for img_size x img_size images with in_channels;
    dropout overrides the configuration's rate; spectral is the conditioning on a spectral Sigma; anchor is
    M3's Gaussian part for a spectral Sigma (white or spectral: aebm.EnergyModel.anchor_var)."""
    if config not in CONFIGS:
        raise ValueError(f"unknown network config {config!r}: use one of {sorted(CONFIGS)}")
    kwargs = dict(CONFIGS[config], **({} if dropout is None else {"dropout": dropout}))
    return UNet(img_size=img_size, in_channels=in_channels, spectral=spectral, anchor=anchor, **kwargs)

def count_parameters(module):
    return sum(p.numel() for p in module.parameters())


# -----------------------------------------------------------------------------
# The model a checkpoint of train.py holds (train.py writes them; sample.py, bench.py and experiments/ read them).

# What a checkpoint must agree on to be resumed or sampled from with this code path.
ARCHITECTURE_KEYS = ("dataset", "img_size", "channels", "config", "dtype")


def load_checkpoint(path, device="cpu"):
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}: train one first (python train.py --out {os.path.dirname(path) or '.'})")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # truncated or foreign file
        raise ValueError(f"cannot read checkpoint {path} ({type(e).__name__}: {e}); it may be corrupt or not an aebm checkpoint") from None
    expected = ("model", "ema", "opt", "step", "config", "rng")
    missing = [k for k in expected if not isinstance(ckpt, dict) or k not in ckpt]
    if missing or not isinstance(ckpt.get("config"), dict) or not all(k in ckpt["config"] for k in ARCHITECTURE_KEYS):
        what = type(ckpt).__name__ if not isinstance(ckpt, dict) else f"a dict without {', '.join(missing) or 'a configuration'}"
        raise ValueError(f"{path} is not a checkpoint of train.py: it holds {what}; expected a dict with "
                         f"{', '.join(expected)} (written by `python train.py --out DIR`)")
    return ckpt


def build_energy(config, device="cpu"):
    """The energy model a checkpoint's config dict describes (its weights not loaded)."""
    # checkpoints from before the frequency-domain conditioning hold the pooled form
    net = build_unet(config["config"], config["img_size"], config["channels"], dropout=config.get("dropout"),
                     spectral=config.get("spectral", "pooled"), anchor="spectral" if config.get("anchor_spectrum") else "white")
    net = net.to(device=device, dtype=getattr(torch, config["dtype"]))
    return aebm.EnergyModel(net, config["data_mean"], config["data_var"], config.get("anchor_spectrum"),
                            config.get("learned_scale", "w"))


def load_energy(path, device="cpu", use_ema=True):
    """(energy model in eval mode with the EMA weights, config) from a checkpoint."""
    ckpt = load_checkpoint(path, device)
    if ckpt["config"].get("model", "energy") != "energy":
        raise ValueError(f"{path} holds a plain denoiser, not an energy (experiments/denoiser.py); "
                         f"measure it with python -m experiments.denoiser --ckpt {path}")
    energy = build_energy(ckpt["config"], device)
    try:
        # a checkpoint from before the learned constant lacks its zero-initialised heads: the same model
        missing, unexpected = energy.net.load_state_dict(ckpt["ema" if use_ema else "model"], strict=False)
        if unexpected or any(not k.startswith("offset") for k in missing):
            raise RuntimeError(f"missing {missing}, unexpected {unexpected}")
    except (RuntimeError, TypeError, AttributeError) as e:
        raise ValueError(f"checkpoint {path} does not fit this version's {ckpt['config']['config']!r} network "
                         f"({str(e).splitlines()[0]}); retrain it with this code") from None
    return energy.eval(), ckpt["config"]


# -----------------------------------------------------------------------------
# Plumbing: layers that are cheap to differentiate twice. Same values, parameters and state dicts as
# torch's nn.GroupNorm, F.silu and 1x1 nn.Conv2d; they differ only in how their derivatives are computed.
#
# GroupNorm and SiLU with explicit second derivatives.
#
# Training differentiates dE/dy again (create_graph=True). For that torch replaces GroupNorm's one
# native backward kernel by a composite of ~20 differentiable operations, and the second backward
# then differentiates every one of them. Here the first backward stays the native kernel, and its
# own derivative is written out below (tests/test_nets.py checks it against torch's composite with
# gradgradcheck). Per group of N = C/G * H * W values, with x^ = (x - mean) r, r = 1/sqrt(var + eps),
# P(v) = v - mean(v) - x^ mean(v x^) (a symmetric projection), h = weight * gy:
#
#   first backward:   gx = r P(h),   gweight = sum gy x^,   gbias = sum gy
#   its derivative, for upstream gradients a (of gx), a_w (of gweight), a_b (of gbias):
#     d/dgy     = weight r P(a) + a_w x^ + a_b
#     d/dweight = sum gy r P(a)
#     d/dx      = r P(q) - (r^2 / N) x^ sum(h P(a)),   q = a_w gy - r (mean(h x^) a + mean(a x^) h)
#   (from dx^ = r P(dx) and dr = -r^2 mean(x^ dx)). P is linear, so r P(q) = r P(a_w gy) - r mean(h x^) r P(a)
#   - r mean(a x^) gx, and both r P(.) of a full tensor are the native backward kernel again (r P(w g) is
#   what it computes for a weight w): d/dx = native(gy; weight a_w) - r (mean(h x^) rPa + mean(a x^) gx
#   + sum(rPa h) x^ / N), with rPa = native(a; no weight) and gx the first backward's own output.

class GroupNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, groups, eps):
        B, C = x.shape[:2]
        ctx.memory_format = dense_format(x)  # GroupNorm.forward made x dense; gy must be dense the same way
        y, mean, rstd = torch.native_group_norm(x, weight, bias, B, C, math.prod(x.shape[2:]), groups, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.groups = groups
        return y

    @staticmethod
    def backward(ctx, gy):
        x, weight, mean, rstd = ctx.saved_tensors
        gy = gy.contiguous(memory_format=ctx.memory_format)
        if not torch.is_grad_enabled():  # a first-order backward (no create_graph): the native kernel alone
            return (*GroupNormBackward.native(gy, x, weight, mean, rstd, ctx.groups), None, None)
        gx, gweight, gbias = GroupNormBackward.apply(gy, x, weight, mean, rstd, ctx.groups)
        return gx, gweight, gbias, None, None


class GroupNormBackward(torch.autograd.Function):
    """The first backward (native kernel) as a function of (gy, x, weight), with the derivative above."""

    @staticmethod
    def native(gy, x, weight, mean, rstd, groups, mask=(True, True, True)):
        """(r P(weight gy), sum gy x^, sum gy) per channel (weight None: r P(gy)); mask picks which are computed."""
        B, C = x.shape[:2]
        return torch.ops.aten.native_group_norm_backward(gy, x, mean, rstd, weight, B, C, math.prod(x.shape[2:]),
                                                         groups, list(mask))

    @staticmethod
    def forward(ctx, gy, x, weight, mean, rstd, groups):
        gx, gweight, gbias = GroupNormBackward.native(gy, x, weight, mean, rstd, groups)
        ctx.save_for_backward(gy, x, weight, mean, rstd, gx)  # gx kept: one native call less in the second backward
        ctx.groups = groups
        ctx.set_materialize_grads(False)  # gweight and gbias usually get no gradient: None, not zeros
        return gx, gweight, gbias

    @staticmethod
    def backward(ctx, a, a_w, a_b):
        gy, x, weight, mean, rstd, gx = ctx.saved_tensors
        B, C, H, W = x.shape
        G = ctx.groups
        shape = (B, G, C // G, H, W)  # each group's values along the last three dimensions
        N = C // G * H * W
        a = torch.zeros_like(x) if a is None else a.contiguous(memory_format=dense_format(x))

        def mean_g(t):  # per-group mean, kept broadcastable: (B, G, 1, 1, 1)
            return t.mean(dim=(2, 3, 4), keepdim=True)

        r = rstd.view(B, G, 1, 1, 1)
        xh = (x.reshape(shape) - mean.view(B, G, 1, 1, 1)) * r
        w = weight.view(1, G, C // G, 1, 1)
        gy5, h = gy.reshape(shape), w * gy.reshape(shape)
        rPa = GroupNormBackward.native(a, x, None, mean, rstd, G, (True, False, False))[0].reshape(shape)
        g_gy = w * rPa
        g_weight = (gy5 * rPa).sum(dim=(0, 3, 4))
        # d/dx without the a_w term: -r (mean(h x^) rPa + mean(a x^) gx + sum(rPa h) x^ / N)
        g_x = mean_g(h * xh) * rPa
        g_x = g_x.addcmul_(mean_g(a.reshape(shape) * xh), gx.reshape(shape))
        g_x = g_x.addcmul_((rPa * h).sum(dim=(2, 3, 4), keepdim=True) / N, xh).mul_(-r)
        if a_w is not None:
            g_gy = g_gy + a_w.view(1, G, C // G, 1, 1) * xh
            g_x = g_x + GroupNormBackward.native(gy, x, a_w, mean, rstd, G, (True, False, False))[0].reshape(shape)
        if a_b is not None:
            g_gy = g_gy + a_b.view(1, G, C // G, 1, 1)
        return g_gy.reshape(B, C, H, W), g_x.reshape(B, C, H, W), g_weight.reshape(C), None, None, None


def dense_format(x):
    """The layout the native GroupNorm kernels take x in: on the CPU, channels_last for a tensor laid out
    so; the default layout otherwise, and always on CUDA, whose kernels take no other (torch's own
    group_norm makes CUDA inputs contiguous the same way)."""
    if (x.device.type == "cpu" and x.dim() == 4 and not x.is_contiguous()
            and x.is_contiguous(memory_format=torch.channels_last)):
        return torch.channels_last
    return torch.contiguous_format


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm (same parameters, same state dict) through GroupNormFunction in training mode, with
    torch's dtypes: CUDA autocast runs group_norm in float32 (CPU autocast leaves it in the input's dtype).
    In eval mode, or with second_order = False, it is torch's own: a Function written in Python costs
    more per call than a native layer, and a sampler's evaluation only needs the first backward."""

    second_order = True

    def forward(self, x):
        if not (self.training and self.second_order):
            return super().forward(x)
        if x.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
            x = x.float()
        # The native kernels take dense tensors. Made dense here, outside the Function, so that autograd sees
        # the copy: the second derivative reaches x through the x the Function saves.
        x = x.contiguous(memory_format=dense_format(x))
        return GroupNormFunction.apply(x, self.weight, self.bias, self.num_groups, self.eps)


# SiLU the same way: with create_graph=True torch writes silu's backward as ~7 differentiable operations
# and differentiates each again. Here the first backward is the native kernel, gx = gy s'(x), and its
# derivative is explicit, with s(x) = x sigma(x), s'(x) = sigma (1 + x (1 - sigma)) and
#   s''(x) = sigma (1 - sigma) (2 + x (1 - 2 sigma)) = sigma (1 - sigma) (x + 2 - 2 s(x)):
#     d/dgy = a s'(x)   (the native kernel again),   d/dx = a gy s''(x)   (sigmoid_backward: w sigma (1 - sigma)).

class SiLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return F.silu(x)

    @staticmethod
    def backward(ctx, gy):
        (x,) = ctx.saved_tensors
        if not torch.is_grad_enabled():  # a first-order backward (no create_graph): the native kernel alone
            return torch.ops.aten.silu_backward(gy, x)
        return SiLUBackward.apply(gy, x)


class SiLUBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gy, x):
        ctx.save_for_backward(gy, x)
        return torch.ops.aten.silu_backward(gy, x)

    @staticmethod
    def backward(ctx, a):
        gy, x = ctx.saved_tensors
        sigma = torch.sigmoid(x)
        v = torch.addcmul(x + 2, x, sigma, value=-2)  # x + 2 - 2 s(x)
        return torch.ops.aten.silu_backward(a, x), torch.ops.aten.sigmoid_backward(a * gy * v, sigma)


def silu(x):
    return SiLUFunction.apply(x)


class SiLU(nn.Module):
    """SiLU through SiLUFunction in training mode, torch's F.silu otherwise (as GroupNorm above)."""

    second_order = True

    def forward(self, x):
        return silu(x) if self.training and self.second_order else F.silu(x)


def set_second_order(net, on):
    """Turn the explicit second derivatives of net's GroupNorm and SiLU layers on or off (off: a network
    that is never differentiated twice, such as bench.py's score model)."""
    for m in net.modules():
        if isinstance(m, (GroupNorm, SiLU)):
            m.second_order = on
    return net


# 1x1 convolutions as one batched matrix product. On the CPU, oneDNN's 1x1 convolution spends most of its time
# outside the arithmetic at the small config's sizes (a 16-channel map of 32x32 images), and the weight
# gradient of its double backward is a convolution with an image-sized kernel. W (out, in) @ x (B, in, H*W)
# is the same map, and its first and second derivatives are batched matrix products too: training steps
# and a sampler's evaluation run faster on 2 threads (docs/benchmarks.md). On CUDA, cuDNN's own convolution.

class Conv1x1(nn.Conv2d):
    """nn.Conv2d(in_ch, out_ch, 1) (same parameters, same state dict), computed on the CPU as bias + W x per image."""

    def __init__(self, in_ch, out_ch, bias=True):
        super().__init__(in_ch, out_ch, 1, bias=bias)

    def forward(self, x):
        if x.device.type != "cpu":
            return super().forward(x)
        B, C, H, W = x.shape
        w = self.weight.view(1, self.out_channels, C).expand(B, -1, -1)  # a view: no copy per image
        x = x.reshape(B, C, H * W)
        y = torch.bmm(w, x) if self.bias is None else torch.baddbmm(self.bias.view(1, -1, 1), w, x)
        return y.view(B, self.out_channels, H, W)


# -----------------------------------------------------------------------------
# Devices, and the memory of one evaluation (sample.py refuses images that would not fit).

def device_error(name):
    """None if the network can run on the device called `name` here, else why not (one line that names
    the devices that work): every entry point checks --device at parse time with it."""
    usable = ["cpu"] + ([f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else [])
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        return f"{name}: not a device torch knows; use one of {', '.join(usable)}"
    if device.type == "cuda" and not torch.cuda.is_available():
        return f"{name}: no CUDA device is available here; use --device cpu"
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        return f"{name}: there are {torch.cuda.device_count()} CUDA devices here; use one of {', '.join(usable)}"
    if device.type not in ("cpu", "cuda"):
        return f"{name}: aebm runs on CPU and CUDA devices; use one of {', '.join(usable)}"
    return None


def set_tf32(tf32, device):
    """TF32 matmuls and convolutions on CUDA exactly when tf32 is true (train.py and sample.py --tf32). Set
    both ways: cuDNN allows TF32 convolutions by default, so "off" must forbid them, or a float32 run would
    convolve with a 10-bit mantissa on a GPU. No effect on the CPU."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(tf32)


def evaluation_bytes(energy, shape, device):
    """Memory of one evaluation (E and dE/dz) at `shape`: the tensors autograd saves, measured at the
    network's training size (batch 1) and scaled by the number of pixels n, plus each self-attention
    layer's (n / 4^level)^2 weights (quadratic: they dominate for images much larger than the
    training size; the 1.3 is measured, at 256x256 for the small config)."""
    net = getattr(energy, "net", None)
    if net is None:
        return 0
    B, C, H, W = shape
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    cov = cv.isotropic(0.01, (1, C, net.img_size, net.img_size), dtype=energy.net.conv_in.weight.dtype, device=device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        aebm.energy_and_scores(energy, torch.zeros_like(cov.s), cov, need_log_s=False)
    n = H * W
    linear = total[0] / net.img_size ** 2 * n
    blocks = [m for m in list(net.enc) + list(net.mid) + list(net.dec) if isinstance(m, ResBlock)]
    attention = sum(1.3 * b.attn.heads * (n / 4 ** level) ** 2 * cov.s.element_size()
                    for b, level in zip(blocks, net.levels) if b.attn is not None)
    return B * (linear + attention)


def free_bytes(device):
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
    except (OSError, StopIteration):
        return None


def check_memory(energy, shape, device):
    need, free = evaluation_bytes(energy, shape, device), free_bytes(device)
    if free is not None and need > 0.8 * free:
        raise MemoryError(f"a {shape[-1]}x{shape[-2]} image needs about {need / 2 ** 30:.1f} GiB for one network "
                          f"evaluation and {free / 2 ** 30:.1f} GiB are free on {device}; crop or downscale it")

