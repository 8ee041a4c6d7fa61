"""Synthetic label-map image pairs with a known deformation, generated on the fly (torch, any device).

In the manner of SynthMorph (Hoffmann et al. 2022): a random label map (the argmax of smooth random
noise at a random scale) is deformed by a random smooth field; each of the two label maps is then
rendered into an image with its own random intensity per label, noise, blur, bias field and gamma.
The two images share anatomy but not contrast, so a network trained on them learns to match shapes
whatever the modalities. Everything is drawn from one ``torch.Generator`` (reproducible for a seed).

Shapes: images (1, 1, z, y, x) in [0, 1]; the true displacement (1, 3, z, y, x) is in voxels with
components (i, j, k) (x fastest), such that fixed(v) matches moving(v + u(v)).
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F

from .spatial import identity_index, sample_at_index, smooth


def _uniform(gen: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=gen))


def smooth_noise(channels: int, shape_zyx: Sequence[int], scale_vox: float, gen: torch.Generator,
                 device: torch.device) -> torch.Tensor:
    """(1, channels, z, y, x) standard normal noise drawn every ``scale_vox`` voxels, upsampled trilinearly."""
    coarse = [max(2, int(round(n / scale_vox)) + 1) for n in shape_zyx]
    noise = torch.randn(1, channels, *coarse, generator=gen).to(device)
    return F.interpolate(noise, size=tuple(shape_zyx), mode="trilinear", align_corners=True)


def random_label_map(shape_zyx: Sequence[int], n_labels: int, gen: torch.Generator,
                     device: torch.device) -> torch.Tensor:
    """(1, n_labels, z, y, x) one-hot map: the argmax of smooth noise, blobs of a random size (4-16 voxels)."""
    logits = smooth_noise(n_labels, shape_zyx, _uniform(gen, 4.0, 16.0), gen, device)
    return F.one_hot(logits.argmax(1), n_labels).permute(0, 4, 1, 2, 3).float()


def random_displacement(shape_zyx: Sequence[int], max_vox: float, gen: torch.Generator,
                        device: torch.device) -> torch.Tensor:
    """(1, 3, z, y, x) smooth displacement in voxels whose largest component is uniform in
    [``max_vox`` / 3, ``max_vox``]."""
    u = smooth(smooth_noise(3, shape_zyx, _uniform(gen, 8.0, 24.0), gen, device))
    return u * (_uniform(gen, max_vox / 3, max_vox) / u.abs().amax().clamp_min(1e-6))


def render(one_hot: torch.Tensor, gen: torch.Generator, means: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(1, L, z, y, x) soft one-hot labels -> (1, 1, z, y, x) image in [0, 1]: an intensity per label (``means``,
    or random), Gaussian noise, blur, a multiplicative bias field and a gamma change (all random)."""
    n_labels, shape, device = one_hot.shape[1], one_hot.shape[2:], one_hot.device
    means = (torch.rand(n_labels, generator=gen) if means is None else means).to(device)
    img = (one_hot * means[None, :, None, None, None]).sum(1, keepdim=True)
    img = img + _uniform(gen, 0.0, 0.06) * torch.randn(img.shape, generator=gen).to(device)
    img = smooth(img, passes=int(torch.randint(0, 3, (), generator=gen)))
    img = img * torch.exp(_uniform(gen, 0.0, 0.3) * smooth_noise(1, shape, 24.0, gen, device))
    img = (img - img.amin()) / (img.amax() - img.amin()).clamp_min(1e-6)
    return img.clamp_min(0) ** float(torch.exp(0.25 * torch.randn((), generator=gen)))


def label_map_pair(shape_zyx: Sequence[int], gen: torch.Generator, device: torch.device, n_labels: int = 16,
                   max_displacement_vox: float = 6.0, same_contrast: bool = False) -> Dict[str, torch.Tensor]:
    """A synthetic pair: ``fixed``, ``moving`` (1, 1, z, y, x) images, ``u_true`` (1, 3, z, y, x) voxels and the
    label maps ``fixed_labels``, ``moving_labels`` (1, L, z, y, x) with fixed(v) ~ moving(v + u_true(v)).

    ``same_contrast``: both images share the intensity of each label (noise, blur, bias and gamma still
    differ), as two scans of one modality do; otherwise each image has its own (two modalities)."""
    moving_labels = random_label_map(shape_zyx, n_labels, gen, device)
    u = random_displacement(shape_zyx, max_displacement_vox, gen, device)
    idx = identity_index(shape_zyx, device) + u.permute(0, 2, 3, 4, 1)
    fixed_labels = sample_at_index(moving_labels, idx)
    means = torch.rand(n_labels, generator=gen) if same_contrast else None
    return {"fixed": render(fixed_labels, gen, means), "moving": render(moving_labels, gen, means), "u_true": u,
            "fixed_labels": fixed_labels, "moving_labels": moving_labels}
