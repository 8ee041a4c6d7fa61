"""TTORegister's networks: a small 3D U-Net that predicts a dense displacement from a pair of images.

Input: fixed and moving (B, 1, z, y, x), each axis a multiple of 16, intensities in [0, 1]. Output: the
displacement (B, 3, z, y, x) in voxels of the input grid, components (i, j, k) (x fastest), such that
fixed(v) matches moving(v + u(v)).

Layout (both nets): one 3x3x3 convolution + LeakyReLU(0.2) per encoder level with 2x2x2 max pooling
between levels, a bottleneck at 1/16 resolution, a decoder that upsamples and concatenates the skip
of the same level, then full-resolution 16-channel convolutions and a 3-channel head initialised near
zero (an untrained net predicts the identity). Under mixed precision (``torch.autocast``) the head runs in
float32, so the displacement and its derivatives in the smoothness terms are not rounded to bfloat16's
8-bit mantissa (a 5-voxel displacement would move in steps of 0.03 voxels).

* teacher: encoder 16, 32, 32, 64; bottleneck 64; three full-resolution convolutions;
* student: encoder 16, 24, 24, 32; bottleneck 32; three full-resolution convolutions.
"""
from __future__ import annotations

from typing import Dict, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

TEACHER = {"encoder": [16, 32, 32, 64], "bottleneck": 64, "final": [16, 16, 16]}
STUDENT = {"encoder": [16, 24, 24, 32], "bottleneck": 32, "final": [16, 16, 16]}
MULTIPLE = 16                                   # input axes must be multiples of 2^4


def _conv(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(c_in, c_out, 3, padding=1), nn.LeakyReLU(0.2))


class RegUNet(nn.Module):
    """The U-Net above; ``encoder`` channels per level (full, 1/2, 1/4, 1/8 resolution), ``bottleneck`` at 1/16,
    ``final`` full-resolution channels after the decoder."""

    def __init__(self, encoder: Sequence[int], bottleneck: int, final: Sequence[int]):
        super().__init__()
        self.config = {"encoder": list(encoder), "bottleneck": int(bottleneck), "final": list(final)}
        chans = [2] + list(encoder)
        self.down = nn.ModuleList(_conv(chans[k], chans[k + 1]) for k in range(len(encoder)))
        self.bottom = _conv(encoder[-1], bottleneck)
        ups, below = [], bottleneck
        for c in reversed(encoder):
            ups.append(_conv(below + c, c))
            below = c
        self.up = nn.ModuleList(ups)
        fins = [encoder[0]] + list(final)
        self.final = nn.Sequential(*[_conv(fins[k], fins[k + 1]) for k in range(len(final))])
        for m in self.modules():              # He initialisation for LeakyReLU(0.2): activations keep their scale
            if isinstance(m, nn.Conv3d):         # through the ~14 layers (there is no normalisation layer)
                nn.init.kaiming_normal_(m.weight, a=0.2, nonlinearity="leaky_relu")
                nn.init.zeros_(m.bias)
        self.head = nn.Conv3d(fins[-1], 3, 3, padding=1)
        nn.init.normal_(self.head.weight, std=1e-5)
        nn.init.zeros_(self.head.bias)

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        for n in fixed.shape[2:]:
            if n % MULTIPLE:
                raise ValueError(f"input size {tuple(fixed.shape[2:])}: each axis must be a multiple of {MULTIPLE}")
        x = torch.cat([fixed, moving], 1)
        skips = []
        for k, block in enumerate(self.down):
            x = block(x if k == 0 else F.max_pool3d(x, 2))
            skips.append(x)
        x = self.bottom(F.max_pool3d(x, 2))
        for block, skip in zip(self.up, reversed(skips)):
            x = block(torch.cat([F.interpolate(x, size=skip.shape[2:], mode="trilinear", align_corners=False),
                                 skip], 1))
        x = self.final(x)
        with torch.autocast(x.device.type, enabled=False):
            return self.head(x.float())


def build(config: Dict) -> RegUNet:
    """A RegUNet from a config dict (``TEACHER``, ``STUDENT`` or a weights file's config)."""
    return RegUNet(config["encoder"], config["bottleneck"], config["final"])


def on_device(net: RegUNet, device: torch.device) -> RegUNet:
    """``net`` moved to ``device``; on a CPU with its convolution weights in the channels-last 3D layout, in
    which oneDNN ran a test-time iteration 1.2-1.5 times faster on an earlier machine and 1.0-1.05 times on
    the current one (``python3 bench/tto_network_speed.py``). The values are the default layout's up to
    float32 rounding; the output displacement is then channels-last too (``.contiguous()`` where a caller
    needs the default)."""
    net = net.to(device)
    return net.to(memory_format=torch.channels_last_3d) if device.type == "cpu" else net
