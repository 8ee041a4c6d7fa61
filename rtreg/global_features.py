"""GlideReg's global features: where they come from and how they are reduced to 12 channels.

Sources (each gives (1, C, z', y', x') features of an image on a *feature grid*, a :class:`~rtreg.image.Grid`
in the image's frame, so that :func:`rtreg.spatial.resample_on_grid` puts them on any working grid):

* :func:`learned_features`: the shipped contrast-invariant 3D encoder (:mod:`rtreg.nets.glide`, trained by
  ``rtreg train glide``) on the image sampled at its training spacing (3 mm); features on a grid of half
  that resolution.
* :func:`slice_features`: a 2D foundation encoder (SAM2's image encoder, :func:`load_sam2`) applied to every
  axial slice, as the GLIDE-Reg paper does; features on a grid with the slice spacing along z and a coarser
  in-plane spacing. Needs the ``sam2`` package and a checkpoint (not shipped: its weights cannot be), and a GPU
  in practice (one 1024x1024 forward pass per slice).

Reduction (both fitted on the fixed and moving features of the case at hand, voxels inside the masks):

* :func:`fit_vae`: a small voxel-wise VAE (:class:`~rtreg.nets.glide.FeatureVAE`); its latent mean is the
  reduced feature. GlideReg keeps training it during the Adam refinement (joint optimisation).
* :func:`fit_pca`: the first 12 principal components (the ablation).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InputError
from .image import Grid, Volume
from .nets.glide import FeatureEncoder, FeatureVAE

SAM2_INPUT = 1024                           # SAM2's image size (pixels)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
Encode2D = Callable[[torch.Tensor], torch.Tensor]   # (N, 3, S, S) -> (N, C, s, s)


def half_resolution_grid(grid: Grid) -> Grid:
    """The grid of a stride-2 network's output on ``grid``: ceil(n / 2) voxels, voxel k centred on input index
    2k + 0.5 (the convention the encoder was trained with)."""
    step = np.diag([2.0, 2.0, 2.0, 1.0])
    step[:3, 3] = 0.5
    return Grid(tuple((n + 1) // 2 for n in grid.shape), grid.affine @ step)


@torch.no_grad()
def learned_features(image: Volume, net: FeatureEncoder, device: torch.device) -> Tuple[torch.Tensor, Grid]:
    """The encoder's (1, C, z', y', x') unit feature vectors of ``image`` (scaled to [0, 1] inside the body, on
    a grid at the encoder's spacing) and their grid."""
    x = torch.as_tensor(np.ascontiguousarray(image.array), dtype=torch.float32, device=device)[None, None]
    return net(x), half_resolution_grid(image.grid)


@torch.no_grad()
def slice_features(image: Volume, encode: Encode2D, input_size: int = SAM2_INPUT, batch: int = 4
                   ) -> Tuple[torch.Tensor, Grid]:
    """A 2D encoder's features of every axial (z) slice of ``image`` (scaled to [0, 1]): each slice is
    resized to ``input_size`` squared, repeated to 3 channels and ImageNet-normalised; ``encode`` returns
    (N, C, s, s). Features (1, C, z, s, s) on a grid with ``image``'s slices and s x s in-plane voxels over
    the slice's extent."""
    nz, ny, nx = image.grid.shape
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    out = []
    for k in range(0, nz, batch):
        slices = torch.as_tensor(np.ascontiguousarray(image.array[k:k + batch]), dtype=torch.float32)[:, None]
        x = F.interpolate(slices, size=(input_size, input_size), mode="bilinear", align_corners=False)
        x = (x.repeat(1, 3, 1, 1) - mean) / std
        out.append(encode(x).float().cpu())
    feats = torch.cat(out, 0)                                 # (z, C, s, s)
    if feats.ndim != 4 or feats.shape[2] != feats.shape[3]:
        raise InputError(f"the 2D feature encoder returned shape {tuple(feats.shape)}; it must return "
                         "(slices, channels, s, s) feature maps")
    s = feats.shape[-1]
    # the s x s feature map spans the slice: in-plane voxel c sits at input index (c + 0.5) * n / s - 0.5
    step = np.eye(4)
    step[0, 0], step[1, 1] = nx / s, ny / s
    step[0, 3], step[1, 3] = 0.5 * nx / s - 0.5, 0.5 * ny / s - 0.5
    grid = Grid((nz, s, s), image.grid.affine @ step)
    return feats.permute(1, 0, 2, 3)[None].contiguous(), grid


def load_sam2(checkpoint: str, config: str, device: torch.device) -> Encode2D:
    """SAM2's image encoder as ``encode(x) -> (N, 256, 64, 64)``, from the ``sam2`` package and a checkpoint.

    Raises :class:`InputError` naming the problem and the fix when the package is missing, the checkpoint
    does not exist, or the checkpoint does not match the model configuration."""
    path = Path(checkpoint)
    if not path.is_file():
        raise InputError(f"the SAM2 checkpoint {path} does not exist; give the path of a downloaded SAM2 "
                         "checkpoint (e.g. sam2.1_hiera_tiny.pt) or use the shipped learned global features")
    try:
        from sam2.build_sam import build_sam2
    except ImportError as exc:
        raise InputError("SAM2 global features need the sam2 package (pip install "
                         "git+https://github.com/facebookresearch/sam2); it is not installed "
                         f"({exc}); use the shipped learned global features instead") from exc
    try:
        model = build_sam2(config, str(path), device=str(device))
    except Exception as exc:    # a wrong file or a config that does not match: sam2 raises many kinds
        raise InputError(f"the SAM2 checkpoint {path} does not load with the configuration {config!r} ({exc}); "
                         "give the configuration that matches the checkpoint (e.g. "
                         "configs/sam2.1/sam2.1_hiera_t.yaml for sam2.1_hiera_tiny.pt)") from exc
    model.eval()

    def encode(x: torch.Tensor) -> torch.Tensor:
        return model.image_encoder(x.to(device))["vision_features"]
    return encode


def _voxels(fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
    """(C, N) feature vectors of every voxel of both images (1, C, ...)."""
    return torch.cat([fixed.flatten(2)[0], moving.flatten(2)[0]], 1)


def _draw(voxels: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """(1, C, n): ``n`` of the (C, N) ``voxels`` drawn at random."""
    pick = torch.randint(voxels.shape[1], (min(n, voxels.shape[1]),), generator=generator).to(voxels.device)
    return voxels[:, pick][None]


KL_WEIGHT = 1e-3       # weight of the VAE's KL term against its reconstruction MSE


def fit_vae(fixed: torch.Tensor, moving: torch.Tensor, latent: int, steps: int, seed: int,
            samples: int = 20_000) -> Tuple[FeatureVAE, Callable[[], torch.Tensor]]:
    """A VAE fitted on the concatenated fixed and moving features (1, C, ...) (``steps`` Adam steps, each on
    ``samples`` voxels drawn from both), and ``penalty()``: its loss (reconstruction MSE + KL_WEIGHT x KL) on
    a fresh draw, for the joint optimisation during the refinement."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    voxels = _voxels(fixed, moving)
    vae = FeatureVAE(fixed.shape[1], latent).to(fixed.device)
    opt = torch.optim.Adam(vae.parameters(), lr=1e-2)

    def penalty() -> torch.Tensor:
        recon, kl = vae.losses(_draw(voxels, samples, gen), gen)
        return recon + KL_WEIGHT * kl
    for _ in range(steps):
        opt.zero_grad()
        loss = penalty()
        loss.backward()
        opt.step()
    return vae, penalty


def fit_pca(fixed: torch.Tensor, moving: torch.Tensor, components: int, seed: int, samples: int = 50_000
            ) -> Callable[[torch.Tensor], torch.Tensor]:
    """Projection (1, C, ...) -> (1, components, ...) on the first principal components of the concatenated
    fixed and moving features (centred on their mean)."""
    x = _draw(_voxels(fixed, moving), samples, torch.Generator().manual_seed(seed))[0].T.double()
    mean = x.mean(0)
    _, _, vt = torch.linalg.svd(x - mean, full_matrices=False)
    basis = vt[:components].float()                                       # (k, C)
    offset = mean.float()

    def project(features: torch.Tensor) -> torch.Tensor:
        centred = features - offset.view(1, -1, *[1] * (features.ndim - 2))
        return torch.einsum("kc,bc...->bk...", basis, centred)
    return project
