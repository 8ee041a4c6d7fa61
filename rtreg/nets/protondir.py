"""ProtonDIR's network: shared CNN encoder, Swin-transformer decoder, prior gates and text FiLM.

Inputs are on one isotropic working grid: the planning CT (fixed) and the repeat
CT already moved by the rigid pre-alignment (moving), each (B, 1, z, y, x) with
intensities normalised to about [0, 1]; the clinical prior (B, 1, z, y, x) in
[0, 1] (:func:`rtreg.priors.clinical_prior`; zeros when unknown); and a text
embedding (B, E) (zeros when no text is used). The output is the displacement
(B, 3, z, y, x) in working-grid voxels, components (x, y, z): the fixed voxel
at index i maps to the moving voxel at i + u(i) (``rtreg.spatial`` order).

Architecture (as the ProtonDIR paper describes it): five encoder stages of two
3x3x3 convolutions with instance normalisation and LeakyReLU, average pooling
between stages, applied with the same weights to both images; at every level,
coarsest first, the moving features are warped by the current field, fused with
the fixed features, gated by the prior and modulated by the text (FiLM), passed
through a Swin-transformer stage (window attention, then shifted windows), and
a head adds a residual displacement; the field is upsampled to the next level.
The prior gate and the FiLM adapter are zero-initialised: a missing prior or
text changes nothing, and an untrained gate or adapter is the identity.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..spatial import warp_voxels

CHANNELS = (8, 16, 32, 48, 64)
TEXT_DIM = 384          # all-MiniLM-L6-v2 sentence embeddings


class ConvStage(nn.Module):
    """Two 3x3x3 convolutions, each with instance normalisation and LeakyReLU(0.2)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv3d(c_in, c_out, 3, padding=1), nn.InstanceNorm3d(c_out, affine=True), nn.LeakyReLU(0.2),
            nn.Conv3d(c_out, c_out, 3, padding=1), nn.InstanceNorm3d(c_out, affine=True), nn.LeakyReLU(0.2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Encoder(nn.Module):
    """Five stages; stage k sees the image at 1 / 2^k of the working resolution."""

    def __init__(self, channels: Sequence[int] = CHANNELS):
        super().__init__()
        ins = [1] + list(channels[:-1])
        self.stages = nn.ModuleList(ConvStage(a, b) for a, b in zip(ins, channels))

    def forward(self, image: torch.Tensor) -> List[torch.Tensor]:
        feats, x = [], image
        for k, stage in enumerate(self.stages):
            if k:
                x = F.avg_pool3d(x, 2)
            x = stage(x)
            feats.append(x)
        return feats


class WindowAttention3D(nn.Module):
    """Multi-head self-attention inside cubic windows of ``window``^3 tokens, with a learned relative-position
    bias per head (Swin)."""

    def __init__(self, dim: int, heads: int, window: int):
        super().__init__()
        self.heads, self.window = heads, window
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.bias = nn.Parameter(torch.zeros((2 * window - 1) ** 3, heads))
        r = torch.arange(window)
        coords = torch.stack(torch.meshgrid(r, r, r, indexing="ij")).reshape(3, -1)       # (3, w^3)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + window - 1     # (w^3, w^3, 3)
        index = (rel[..., 0] * (2 * window - 1) + rel[..., 1]) * (2 * window - 1) + rel[..., 2]
        self.register_buffer("bias_index", index, persistent=False)

    def forward(self, tokens: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """tokens (windows, w^3, dim); mask (windows, w^3, w^3) additive or None."""
        n_win, n, dim = tokens.shape
        qkv = self.qkv(tokens).reshape(n_win, n, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        bias = self.bias[self.bias_index].permute(2, 0, 1)[None]                          # (1, heads, n, n)
        attn_mask = bias if mask is None else bias + mask[:, None]
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=attn_mask)
        return self.proj(out.transpose(1, 2).reshape(n_win, n, dim))


class SwinBlock3D(nn.Module):
    """LayerNorm, (shifted-)window attention, LayerNorm, MLP; both residual."""

    def __init__(self, dim: int, heads: int, window: int, shift: int, chunk: int = 2048):
        super().__init__()
        self.window, self.shift, self.chunk = window, shift, chunk
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = WindowAttention3D(dim, heads, window)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, z, y, x) -> same shape."""
        b, c, *size = x.shape
        w = self.window
        pad = [(-n) % w for n in size]
        h = F.pad(x, (0, pad[2], 0, pad[1], 0, pad[0]))
        padded = h.shape[2:]
        valid = torch.zeros(1, 1, *padded, device=x.device)
        valid[:, :, :size[0], :size[1], :size[2]] = 1
        if self.shift:
            h = torch.roll(h, (-self.shift,) * 3, dims=(2, 3, 4))
            valid = torch.roll(valid, (-self.shift,) * 3, dims=(2, 3, 4))
        tokens = _to_windows(h.permute(0, 2, 3, 4, 1), w).reshape(b, -1, w ** 3, c)        # (B, nW, w^3, C)
        keep = _to_windows(valid.permute(0, 2, 3, 4, 1), w)[..., 0]                        # (nW, w^3)
        region = (_to_windows(_window_regions(padded, w, self.shift, x.device).permute(0, 2, 3, 4, 1), w)[..., 0]
                  if self.shift else None)
        out = torch.empty_like(tokens)
        for start in range(0, tokens.shape[1], self.chunk):       # bounded memory on large grids
            sl = slice(start, start + self.chunk)
            mask = _attention_mask(keep[sl], None if region is None else region[sl])
            for k in range(b):
                t = tokens[k, sl]
                t = t + self.attn(self.norm1(t), mask)
                out[k, sl] = t + self.mlp(self.norm2(t))
        tokens = out.reshape(-1, w ** 3, c)
        h = _from_windows(tokens, w, b, padded).permute(0, 4, 1, 2, 3)
        if self.shift:
            h = torch.roll(h, (self.shift,) * 3, dims=(2, 3, 4))
        return h[:, :, :size[0], :size[1], :size[2]]


def _attention_mask(keep: torch.Tensor, region: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """(windows, n, n) additive mask: no attention to padding, nor across the regions a shift joined; None
    when nothing is masked. Queries on padding (discarded later) attend everywhere."""
    blocked = (keep[:, None, :] == 0).expand(-1, keep.shape[1], -1)
    if region is not None:
        blocked = blocked | (region[:, :, None] != region[:, None, :])
    if not blocked.any():
        return None
    blocked = blocked & ~blocked.all(-1, keepdim=True)
    return torch.zeros(blocked.shape, device=keep.device).masked_fill(blocked, float("-inf"))


def _to_windows(x: torch.Tensor, w: int) -> torch.Tensor:
    """(B, Z, Y, X, C) with sizes divisible by w -> (B * windows, w^3, C)."""
    b, z, y, xx, c = x.shape
    x = x.reshape(b, z // w, w, y // w, w, xx // w, w, c).permute(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(-1, w ** 3, c)


def _from_windows(tokens: torch.Tensor, w: int, b: int, size) -> torch.Tensor:
    z, y, x = size
    t = tokens.reshape(b, z // w, y // w, x // w, w, w, w, -1).permute(0, 1, 4, 2, 5, 3, 6, 7)
    return t.reshape(b, z, y, x, -1)


def _window_regions(size, w: int, shift: int, device) -> torch.Tensor:
    """(1, 1, z, y, x) labels of the regions a cyclic shift brings together, so attention stays within one."""
    label = torch.zeros(1, 1, *size, device=device)
    count = 0
    cuts = [(slice(0, -w), slice(-w, -shift), slice(-shift, None)) for _ in range(3)]
    for a in cuts[0]:
        for bb in cuts[1]:
            for c in cuts[2]:
                label[:, :, a, bb, c] = count
                count += 1
    return label


class PriorGate(nn.Module):
    """feat * (1 + g), g = 2 sigmoid(conv(prior)) - 1: zero for a zero prior or untrained (zero) weights."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv3d(1, channels, 3, padding=1, bias=False)
        nn.init.zeros_(self.conv.weight)

    def forward(self, feat: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        prior = F.interpolate(prior, size=feat.shape[2:], mode="trilinear", align_corners=False)
        return feat * (2 * torch.sigmoid(self.conv(prior)))


class TextFiLM(nn.Module):
    """Scale and shift per channel from a text embedding; zero-initialised, so the identity until trained."""

    def __init__(self, text_dim: int, channels: int):
        super().__init__()
        self.linear = nn.Linear(text_dim, 2 * channels)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, feat: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.linear(text).chunk(2, dim=1)
        return feat * (1 + gamma[:, :, None, None, None]) + beta[:, :, None, None, None]


class ProtonDIRNet(nn.Module):
    """See the module docstring. ``forward(fixed, moving, prior, text) -> (B, 3, z, y, x)`` voxels."""

    def __init__(self, channels: Sequence[int] = CHANNELS, text_dim: int = TEXT_DIM, window: int = 4,
                 heads: int = 2):
        super().__init__()
        self.levels = len(channels)
        self.encoder = Encoder(channels)
        self.fuse = nn.ModuleList(nn.Conv3d(2 * c, c, 1) for c in channels)
        self.gates = nn.ModuleList(PriorGate(c) for c in channels)
        self.films = nn.ModuleList(TextFiLM(text_dim, c) for c in channels)
        self.swin = nn.ModuleList(nn.Sequential(SwinBlock3D(c, heads, window, 0),
                                                SwinBlock3D(c, heads, window, window // 2)) for c in channels)
        self.heads = nn.ModuleList(nn.Conv3d(c, 3, 3, padding=1) for c in channels)
        for head in self.heads:     # start from no motion
            nn.init.normal_(head.weight, std=1e-5)
            nn.init.zeros_(head.bias)

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor, prior: Optional[torch.Tensor] = None,
                text: Optional[torch.Tensor] = None) -> torch.Tensor:
        b = fixed.shape[0]
        smallest = 2 ** self.levels
        if min(fixed.shape[2:]) < smallest:
            raise ValueError(f"the working grid {tuple(fixed.shape[2:])} is too small for {self.levels} levels: "
                             f"every axis needs at least {smallest} voxels")
        prior = torch.zeros_like(fixed) if prior is None else prior
        text = torch.zeros(b, self.films[0].linear.in_features, device=fixed.device) if text is None else text
        f_feats, m_feats = self.encoder(fixed), self.encoder(moving)
        u = None
        for level in reversed(range(self.levels)):
            f, m = f_feats[level], m_feats[level]
            if u is None:
                u = torch.zeros(b, 3, *f.shape[2:], device=f.device)
            else:   # twice the voxels per unit of displacement on the finer level
                u = 2.0 * F.interpolate(u, size=f.shape[2:], mode="trilinear", align_corners=False)
            warped = warp_voxels(m, u)
            h = self.fuse[level](torch.cat([f, warped], 1))
            h = self.films[level](self.gates[level](h, prior), text)
            h = self.swin[level](h)
            u = u + self.heads[level](h)
        return u

