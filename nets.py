"""
The network F_theta of the energy (METHOD.md §5): an EDM-style "SongUNet" (DDPM++ family) whose
noise conditioning is an embedding of the whole covariance Sigma, applied as gains.

    energy = aebm.EnergyModel(UNet(**CONFIGS["small"], img_size=32, in_channels=3))

aebm.EnergyModel (M3) whitens y, calls `net(x, cov)` and turns the output F (same shape as x) into
a scalar energy; this file only has to produce F. Read covariances.py and aebm.py first.

Conditioning. The variance map log s (B, C, H, W) is embedded coordinate by coordinate
(sinusoidal features) and mapped by a small convolutional ResNet to an embedding map. Every
residual block projects it (1x1 conv) to per-channel gains g and modulates its features as

    h <- SiLU(GroupNorm(h) * (1 + g)).

Two branches, as in the paper:
  - spatial (pixel-basis Sigma): the embedding map is average-pooled to each block's resolution,
    so gains vary per pixel (a mask tells each location how noisy it is);
  - spectral (fft/dct Sigma): the embedding of the frequency map is averaged over frequencies,
    so gains are per channel.
An isotropic Sigma is the same matrix in every basis, so it must get the same conditioning in
every basis. We make that exact: the spatial ResNet pads by replication, so on a constant map it
gives a constant map, identical to its output on the 1x1 map of the mean log-variance. A spectral
Sigma is therefore conditioned as

    spatial(mean log s, as a 1x1 map)  +  mean_freq[ spectral(log s) - spectral(mean log s) ],

the isotropic part plus an anisotropic correction that is exactly zero for isotropic Sigma. The
result is smooth in log s and basis-independent for sigma^2 I (tests/test_nets.py checks it).

Everything here is twice differentiable (training differentiates dE/dy again). Attention is an
explicit softmax: torch's scaled_dot_product_attention picks fused kernels (flash on CPU; flash
or memory-efficient on CUDA) whose backward has no derivative, so create_graph=True fails there.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from covariances import S_MAX, S_MIN

# Presets are plain dicts (METHOD.md §5). `paper64` is the paper's 64x64 network; `small` is the
# CPU configuration used by the quickstart; `tiny` keeps tests fast.
CONFIGS = {
    "paper64": dict(channels=128, mults=(1, 2, 2, 2), blocks=4, attn=(16,), dropout=0.1,
                    emb_channels=512, emb_hidden=128, emb_blocks=4),
    "small": dict(channels=28, mults=(1, 2, 2), blocks=1, attn=(8,), dropout=0.0,
                  emb_channels=64, emb_hidden=16, emb_blocks=2),
    "tiny": dict(channels=8, mults=(1, 2), blocks=1, attn=(4,), dropout=0.0,
                 emb_channels=16, emb_hidden=8, emb_blocks=1),
}
N_FREQS = 6  # sinusoidal frequencies per log-variance


def group_norm(ch):
    return nn.GroupNorm(num_groups=min(32, max(1, ch // 4)), num_channels=ch, eps=1e-6)


def zero_init(module):
    nn.init.zeros_(module.weight)
    nn.init.zeros_(module.bias)
    return module


# -----------------------------------------------------------------------------
# The covariance embedding.

def sinusoidal(log_s):
    """Per-coordinate features of the clamped log-variance: (B, C, H, W) -> (B, 2 N_FREQS C, H, W)."""
    lo, hi = math.log(S_MIN), math.log(S_MAX)
    u = (log_s.clamp(lo, hi) - (lo + hi) / 2) / ((hi - lo) / 2)  # in [-1, 1]
    f = (math.pi / 2) * 2.0 ** torch.arange(N_FREQS, device=log_s.device, dtype=log_s.dtype)
    angles = u.unsqueeze(2) * f.view(1, 1, -1, 1, 1)  # (B, C, N_FREQS, H, W)
    return torch.cat([angles.sin(), angles.cos()], dim=2).flatten(1, 2)


class EmbeddingNet(nn.Module):
    """A small convolutional ResNet from per-coordinate features to an embedding map (B, emb, H, W).
    Replicate padding: a constant input map gives a constant output map (see the file docstring)."""

    def __init__(self, in_ch, hidden, out_ch, n_blocks):
        super().__init__()
        self.inp = nn.Conv2d(in_ch, hidden, 1)
        self.blocks = nn.ModuleList()
        for _ in range(n_blocks):
            self.blocks.append(nn.Sequential(
                group_norm(hidden), nn.SiLU(), nn.Conv2d(hidden, hidden, 3, padding=1, padding_mode="replicate"),
                group_norm(hidden), nn.SiLU(), nn.Conv2d(hidden, hidden, 3, padding=1, padding_mode="replicate")))
        self.out = nn.Sequential(group_norm(hidden), nn.SiLU(), nn.Conv2d(hidden, out_ch, 1))

    def forward(self, features):
        h = self.inp(features)
        for block in self.blocks:
            h = (h + block(h)) * math.sqrt(0.5)
        return self.out(h)


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

class Attention(nn.Module):
    """Self-attention over positions, explicit softmax (twice differentiable on every backend)."""

    def __init__(self, ch, head_dim=64):
        super().__init__()
        self.heads = max(1, ch // head_dim)
        self.norm = group_norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = zero_init(nn.Conv2d(ch, ch, 1))

    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W).unbind(1)
        w = torch.softmax(torch.einsum("bhcq,bhck->bhqk", q, k) / math.sqrt(C // self.heads), dim=-1)
        a = torch.einsum("bhqk,bhck->bhcq", w, v).reshape(B, C, H, W)
        return (x + self.proj(a)) * math.sqrt(0.5)


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, then the gain-modulated GroupNorm -> SiLU -> dropout -> conv,
    a skip connection, and optional attention (EDM's UNetBlock, with gains in place of the noise
    embedding's scale)."""

    def __init__(self, in_ch, out_ch, emb_ch, dropout, attention):
        super().__init__()
        self.norm0, self.conv0 = group_norm(in_ch), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.gain_spatial = nn.Conv2d(emb_ch, out_ch, 1)  # projections of the two embeddings to gains
        self.gain_spectral = nn.Conv2d(emb_ch, out_ch, 1, bias=False)  # linear: zero correction, zero gain
        self.norm1, self.dropout = group_norm(out_ch), nn.Dropout(dropout)
        self.conv1 = zero_init(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        self.attn = Attention(out_ch) if attention else None

    def forward(self, x, cond):
        h = self.conv0(F.silu(self.norm0(x)))
        res = x.shape[-1]
        g = self.gain_spatial(cond["spatial"][res])  # (B, ch, h, w), or (B, ch, 1, 1) for spectral Sigma
        if cond["spectral"] is not None:
            g = g + self.gain_spectral(cond["spectral"])  # (B, ch, 1, 1)
        h = F.silu(self.norm1(h) * (1 + g))
        h = self.conv1(self.dropout(h))
        x = (self.skip(x) + h) * math.sqrt(0.5)
        return self.attn(x) if self.attn is not None else x


# -----------------------------------------------------------------------------
# The UNet.

class UNet(nn.Module):
    """F_theta(x, Sigma): (B, C, H, W) -> (B, C, H, W). `attn` lists the resolutions (in pixels)
    that get self-attention; the image size must be divisible by 2^(len(mults) - 1)."""

    def __init__(self, img_size, in_channels, channels, mults, blocks, attn, dropout,
                 emb_channels, emb_hidden, emb_blocks):
        super().__init__()
        factor = 2 ** (len(mults) - 1)
        if img_size % factor or img_size < factor:
            raise ValueError(f"image size {img_size} must be divisible by {factor} (the UNet halves it "
                             f"{len(mults) - 1} times); pick another --img-size or a config with fewer levels")
        self.img_size, self.in_channels = img_size, in_channels
        feat = 2 * N_FREQS * in_channels
        self.spatial = EmbeddingNet(feat, emb_hidden, emb_channels, emb_blocks)
        self.spectral = EmbeddingNet(feat + 2, emb_hidden, emb_channels, emb_blocks)
        self.resolutions = [img_size >> level for level in range(len(mults))]

        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.enc, skips, ch = nn.ModuleList(), [channels], channels
        for level, mult in enumerate(mults):
            res = self.resolutions[level]
            if level > 0:
                self.enc.append(nn.AvgPool2d(2))  # down-sampling
                skips.append(ch)
            for _ in range(blocks):
                self.enc.append(ResBlock(ch, channels * mult, emb_channels, dropout, res in attn))
                ch = channels * mult
                skips.append(ch)
        self.mid = nn.ModuleList([ResBlock(ch, ch, emb_channels, dropout, True),
                                  ResBlock(ch, ch, emb_channels, dropout, False)])
        self.dec = nn.ModuleList()
        for level, mult in reversed(list(enumerate(mults))):
            res = self.resolutions[level]
            for _ in range(blocks + 1):
                self.dec.append(ResBlock(ch + skips.pop(), channels * mult, emb_channels, dropout, res in attn))
                ch = channels * mult
            if level > 0:
                self.dec.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                              nn.Conv2d(ch, ch, 3, padding=1)))  # up-sampling
        self.out = nn.Sequential(group_norm(ch), nn.SiLU(), zero_init(nn.Conv2d(ch, in_channels, 3, padding=1)))

    def condition(self, cov):
        """The two embeddings: {'spatial': {resolution: (B, emb, h, w)}, 'spectral': (B, emb, 1, 1) or None}."""
        log_s = cov.log_s.to(self.conv_in.weight.dtype)
        if cov.basis == "pixel":
            e = self.spatial(sinusoidal(log_s))  # (B, emb, H, W)
            return {"spatial": {r: F.avg_pool2d(e, self.img_size // r) if r < self.img_size else e
                                for r in self.resolutions}, "spectral": None}
        if cov.basis == "fft":
            log_s = torch.fft.fftshift(log_s, dim=(-2, -1))  # low frequencies in the middle of the map
        mean = log_s.mean(dim=(-2, -1), keepdim=True)  # (B, C, 1, 1): the isotropic part
        iso = self.spatial(sinusoidal(mean))  # (B, emb, 1, 1), identical to a constant full-size map
        coords = frequency_coordinates(cov.basis, *log_s.shape[-2:], log_s).expand(log_s.shape[0], -1, -1, -1)
        aniso = self.spectral(torch.cat([sinusoidal(log_s), coords], 1))
        aniso_at_mean = self.spectral(torch.cat([sinusoidal(mean.expand_as(log_s)), coords], 1))
        spectral = (aniso - aniso_at_mean).mean(dim=(-2, -1), keepdim=True)  # zero for isotropic Sigma
        return {"spatial": {r: iso for r in self.resolutions}, "spectral": spectral}

    def forward(self, x, cov):
        if x.shape[1:] != (self.in_channels, self.img_size, self.img_size):
            raise ValueError(f"UNet built for ({self.in_channels}, {self.img_size}, {self.img_size}) images, "
                             f"got {tuple(x.shape[1:])}")
        cond = self.condition(cov)
        h = self.conv_in(x)
        skips = [h]
        for layer in self.enc:
            h = layer(h, cond) if isinstance(layer, ResBlock) else layer(h)
            skips.append(h)
        for block in self.mid:
            h = block(h, cond)
        for layer in self.dec:
            if isinstance(layer, ResBlock):
                h = layer(torch.cat([h, skips.pop()], dim=1), cond)
            else:
                h = layer(h)
        return self.out(h)


def build_unet(config, img_size, in_channels):
    """The UNet of a named configuration (CONFIGS) for img_size x img_size images with in_channels."""
    if config not in CONFIGS:
        raise ValueError(f"unknown network config {config!r}: use one of {sorted(CONFIGS)}")
    return UNet(img_size=img_size, in_channels=in_channels, **CONFIGS[config])


def count_parameters(module):
    return sum(p.numel() for p in module.parameters())
