"""GlideReg's networks: the dense global feature encoder and the small VAE that reduces its features.

* :class:`FeatureEncoder`: a small 3D U-Net (encoder to 1/8 resolution, decoder back to 1/2) that turns an
  image of any modality, scaled to [0, 1] inside the body and sampled at ``config["spacing_mm"]``, into
  unit-length feature vectors (``features`` channels) on a grid of half its resolution. Trained (see
  :mod:`rtreg.train.glide`) so that the same anatomy gets the same vector under any intensity mapping
  (contrast invariance) and deformation, and different anatomy a different one: the "global" features,
  where MIND-SSC gives the local ones. Instance normalisation makes it blind to global contrast and offset.
* :class:`FeatureVAE`: a voxel-wise variational autoencoder (per-voxel linear layers) from ``features`` channels
  to a ``latent``-channel mean and log-variance and back; its mean is the reduced feature. GlideReg fits it
  on the fixed and moving features of the case at hand and keeps updating it during the Adam refinement.

Shapes: images (B, 1, z, y, x); features (B, C, z', y', x') with z' = ceil(z / 2) and so on.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

DEFAULT: Dict[str, object] = {"channels": [16, 32, 48, 64], "features": 32, "spacing_mm": 3.0}


def _block(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(c_in, c_out, 3, stride, 1), nn.InstanceNorm3d(c_out, affine=True),
                         nn.LeakyReLU(0.2),
                         nn.Conv3d(c_out, c_out, 3, 1, 1), nn.InstanceNorm3d(c_out, affine=True), nn.LeakyReLU(0.2))


class FeatureEncoder(nn.Module):
    """(B, 1, z, y, x) image -> (B, features, ceil(z/2), ceil(y/2), ceil(x/2)) unit-length feature vectors."""

    def __init__(self, channels=(16, 32, 48, 64), features: int = 32, spacing_mm: float = 3.0):
        super().__init__()
        c0, c1, c2, c3 = channels
        self.spacing_mm = float(spacing_mm)
        self.level0 = _block(1, c0)
        self.level1 = _block(c0, c1, 2)
        self.level2 = _block(c1, c2, 2)
        self.level3 = _block(c2, c3, 2)
        self.up2 = _block(c3 + c2, c2)
        self.up1 = _block(c2 + c1, c1)
        self.head = nn.Conv3d(c1, features, 1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        shape = image.shape[2:]
        pad = [(-n) % 8 for n in shape]
        x = F.pad(image, (0, pad[2], 0, pad[1], 0, pad[0]), mode="replicate")
        h0 = self.level0(x)
        h1 = self.level1(h0)
        h2 = self.level2(h1)
        h3 = self.level3(h2)
        up = F.interpolate(h3, size=h2.shape[2:], mode="trilinear", align_corners=False)
        h2 = self.up2(torch.cat([up, h2], 1))
        up = F.interpolate(h2, size=h1.shape[2:], mode="trilinear", align_corners=False)
        h1 = self.up1(torch.cat([up, h1], 1))
        out = F.normalize(self.head(h1), dim=1)
        half = [(n + 1) // 2 for n in shape]
        return out[:, :, :half[0], :half[1], :half[2]]


def build_encoder(config: Dict) -> FeatureEncoder:
    return FeatureEncoder(tuple(config["channels"]), int(config["features"]), float(config["spacing_mm"]))


class FeatureVAE(nn.Module):
    """Voxel-wise VAE: (B, C, ...) features -> (mean, log-variance) of ``latent`` channels -> reconstruction.

    Per-voxel layers (linear over the channels; written with ``nn.Linear`` on channels-last views, which
    trains far faster on a CPU than 1x1x1 convolutions)."""

    def __init__(self, channels: int, latent: int = 12, hidden: int = 32):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(channels, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, 2 * latent))
        self.decoder = nn.Sequential(nn.Linear(latent, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, channels))
        self.latent = latent

    def encode(self, features: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(B, C, ...) -> (mean, log-variance), each (B, latent, ...)."""
        mean, log_var = self.encoder(features.movedim(1, -1)).movedim(-1, 1).split(self.latent, 1)
        return mean, log_var.clamp(-10.0, 10.0)

    def losses(self, features: torch.Tensor, generator: Optional[torch.Generator] = None
               ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction MSE, KL divergence to N(0, I) per latent channel) of feature vectors (B, C, ...),
        with one reparameterised sample (drawn from ``generator`` for reproducibility)."""
        mean, log_var = self.encode(features)
        if generator is None:
            noise = torch.randn_like(mean)
        else:
            noise = torch.randn(mean.shape, generator=generator, device=generator.device).to(mean.device)
        recon = self.decoder((mean + torch.exp(0.5 * log_var) * noise).movedim(1, -1)).movedim(-1, 1)
        kl = 0.5 * (mean ** 2 + log_var.exp() - 1.0 - log_var).mean()
        return F.mse_loss(recon, features), kl
