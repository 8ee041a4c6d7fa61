"""QuizRigid's network: a shared 3D ResNet encoder and a transformer "quizzer" that answers, for query points
of the reference image, where they lie in the search image.

Inputs: the reference and search views, (B, 1, n, n, n) with n = ``config["size"]`` (a multiple of 16),
intensities in [0, 1], both sampled on cubes of the same side in millimetres whose axes are the world (LPS)
axes, so the two views differ only by the pose of the anatomy in them. Query points: (B, Q, 3) in the
reference view's normalised coordinates, components (x, y, z) in [-1, 1] as ``grid_sample`` reads them
(x fastest along the array's last axis).

* Encoder (shared weights, ResNet10-style): a stride-2 3x3x3 stem, a stride-2 max pool, then four stages of
  one basic residual block each (channels ``config["channels"]``; strides 1, 2, 2 and a dilated last
  stage), group normalisation. The 1/8 and 1/16 feature maps are fused (the coarse one upsampled) into
  ``dim`` channels at 1/8 resolution: (n/8)^3 tokens per view.
* Quizzer: the two views' tokens side by side (each with a Fourier encoding of its position and an
  embedding of which view it is) form the memory. Each query starts as the Fourier encoding of its position
  plus the reference feature sampled there; ``layers`` transformer decoder layers (self-attention among the
  queries, so the points can agree with one another, and cross-attention to the memory) refine it.
* Answers, per query: the position in the search view (normalised (x, y, z)) as the soft-argmax of the
  query's attention over the search tokens plus a small regressed offset, and a visibility logit (is the
  point inside the search image's field of view).
"""
from __future__ import annotations

import math
from typing import Dict, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

DEFAULT = {"size": 128, "channels": [16, 32, 64, 96], "dim": 96, "heads": 4, "layers": 3, "frequencies": 8}
MULTIPLE = 16


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, c // 4), c)


class BasicBlock(nn.Module):
    """Two 3x3x3 convolutions with a residual connection (projected when the shape changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        self.conv1 = nn.Conv3d(c_in, c_out, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.norm1 = _norm(c_out)
        self.conv2 = nn.Conv3d(c_out, c_out, 3, 1, padding=dilation, dilation=dilation, bias=False)
        self.norm2 = _norm(c_out)
        self.skip = (nn.Sequential(nn.Conv3d(c_in, c_out, 1, stride, bias=False), _norm(c_out))
                     if stride != 1 or c_in != c_out else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.norm1(self.conv1(x)))
        return F.relu(self.norm2(self.conv2(y)) + self.skip(x))


class Encoder(nn.Module):
    """ResNet10-style encoder: (B, 1, n, n, n) -> (B, dim, n/8, n/8, n/8)."""

    def __init__(self, channels: Sequence[int], dim: int):
        super().__init__()
        c = list(channels)
        self.stem = nn.Sequential(nn.Conv3d(1, c[0], 3, 2, padding=1, bias=False), _norm(c[0]), nn.ReLU(),
                                  nn.MaxPool3d(3, 2, padding=1))
        self.stage1 = BasicBlock(c[0], c[0])
        self.stage2 = BasicBlock(c[0], c[1], stride=2)
        self.stage3 = BasicBlock(c[1], c[2], stride=2)
        self.stage4 = BasicBlock(c[2], c[3], dilation=2)
        self.fine = nn.Conv3d(c[1], dim, 1)
        self.coarse = nn.Conv3d(c[2] + c[3], dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s2 = self.stage2(self.stage1(self.stem(x)))
        s3 = self.stage3(s2)
        s4 = self.stage4(s3)
        coarse = F.interpolate(self.coarse(torch.cat([s3, s4], 1)), size=s2.shape[2:], mode="trilinear",
                               align_corners=False)
        return self.fine(s2) + coarse


def fourier_encoding(xyz: torch.Tensor, frequencies: int) -> torch.Tensor:
    """(..., 3) normalised coordinates -> (..., 6 * frequencies) sines and cosines at octave frequencies."""
    scales = (2.0 ** torch.arange(frequencies, device=xyz.device, dtype=xyz.dtype)) * (math.pi / 2)
    angles = xyz[..., None] * scales                                  # (..., 3, F)
    return torch.cat([angles.sin(), angles.cos()], -1).flatten(-2)


def token_positions(shape: Sequence[int], device: torch.device) -> torch.Tensor:
    """(N, 3) normalised (x, y, z) centres of the voxels of a (z, y, x) grid, N = z * y * x in array order."""
    axes = [(torch.arange(n, device=device, dtype=torch.float32) + 0.5) / n * 2 - 1 for n in shape]
    z, y, x = torch.meshgrid(*axes, indexing="ij")
    return torch.stack([x, y, z], -1).reshape(-1, 3)


class QuizNet(nn.Module):
    """The encoder and the quizzer; see the module docstring."""

    def __init__(self, size: int, channels: Sequence[int], dim: int, heads: int, layers: int, frequencies: int):
        super().__init__()
        self.config = {"size": int(size), "channels": list(channels), "dim": int(dim), "heads": int(heads),
                       "layers": int(layers), "frequencies": int(frequencies)}
        self.encoder = Encoder(channels, dim)
        pe = 6 * frequencies
        self.position = nn.Linear(pe, dim)
        self.view = nn.Parameter(torch.zeros(2, dim))
        self.query_position = nn.Linear(pe, dim)
        self.decoder = nn.ModuleList(
            nn.TransformerDecoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
            for _ in range(layers))
        self.out_norm = nn.LayerNorm(dim)
        self.match_query = nn.Linear(dim, dim)
        self.match_key = nn.Linear(dim, dim)
        self.offset = nn.Linear(dim, 3)
        self.visible = nn.Linear(dim, 1)
        nn.init.zeros_(self.offset.weight)
        nn.init.zeros_(self.offset.bias)

    def features(self, views: torch.Tensor) -> torch.Tensor:
        """(B, 1, n, n, n) views -> (B, dim, n/8, n/8, n/8) encoder features."""
        n = views.shape[2:]
        if any(s % MULTIPLE for s in n):
            raise ValueError(f"view size {tuple(n)}: each axis must be a multiple of {MULTIPLE}")
        return self.encoder(views)

    def ask(self, ref_feat: torch.Tensor, search_feat: torch.Tensor, queries: torch.Tensor
            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Answers for ``queries`` (B, Q, 3) given both views' features: (positions (B, Q, 3) normalised in
        the search view, visibility logits (B, Q), matching logits (B, Q, N) over the N search tokens in
        array order, whose soft-argmax gives the positions before the regressed offset)."""
        b, d = ref_feat.shape[:2]
        pos = token_positions(ref_feat.shape[2:], ref_feat.device)                 # (N, 3)
        pe = self.position(fourier_encoding(pos, self.config["frequencies"]))       # (N, d)
        ref_tok = ref_feat.flatten(2).transpose(1, 2) + pe + self.view[0]
        search_tok = search_feat.flatten(2).transpose(1, 2) + pe + self.view[1]
        memory = torch.cat([ref_tok, search_tok], 1)                                # (B, 2N, d)
        sampled = F.grid_sample(ref_feat, queries[:, :, None, None, :], mode="bilinear", align_corners=False)
        q = sampled[:, :, :, 0, 0].transpose(1, 2) + self.query_position(
            fourier_encoding(queries, self.config["frequencies"]))
        for layer in self.decoder:
            q = layer(q, memory)
        q = self.out_norm(q)
        logits = self.match_query(q) @ self.match_key(search_tok).transpose(1, 2) / math.sqrt(d)  # (B, Q, N)
        position = logits.softmax(-1) @ pos + 0.1 * torch.tanh(self.offset(q))
        return position, self.visible(q)[..., 0], logits

    def forward(self, reference: torch.Tensor, search: torch.Tensor, queries: torch.Tensor
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`ask`'s answers for ``queries`` of ``reference``; both views go through the one encoder
        together."""
        feats = self.features(torch.cat([reference, search], 0))
        return self.ask(feats[: reference.shape[0]], feats[reference.shape[0]:], queries)


def build(config: Dict) -> QuizNet:
    """A QuizNet from a configuration dict (the one its weights were saved with)."""
    return QuizNet(**{k: config[k] for k in ("size", "channels", "dim", "heads", "layers", "frequencies")})
