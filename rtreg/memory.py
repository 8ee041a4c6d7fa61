"""Memory estimates: refuse a registration that would not fit, and say which resolution would."""
from __future__ import annotations

from typing import Optional

import torch

from .device import available_memory_bytes
from .errors import InputError
from .image import Grid

# Bytes per working-grid voxel for one optimisation step (images, features, field, Adam state, autograd).
_WORK_BYTES_PER_VOXEL = 4 * 60
# Bytes per fixed-grid voxel for the outputs (float32 field, its float64 ITK copies, total field, Jacobian,
# warped images). Measured: 11.6 GB peak for the 512x512x177 DCPT phantom (46 M voxels), about 250 B/voxel.
_OUTPUT_BYTES_PER_VOXEL = 250


def estimate_bytes(grid: Grid, working_spacing_mm: float, channels: int = 1) -> dict:
    """Estimated peak bytes of the optimisation (on the device) and of the outputs (host)."""
    work = grid.with_spacing(working_spacing_mm).n_voxels
    return {"working": int(work * _WORK_BYTES_PER_VOXEL * (1 + channels / 4)),
            "outputs": int(grid.n_voxels * _OUTPUT_BYTES_PER_VOXEL)}


def check_memory(grid: Grid, working_spacing_mm: float, device: torch.device, channels: int = 1,
                 free_device: Optional[int] = None, free_host: Optional[int] = None) -> None:
    """Raise InputError naming a working resolution that fits when this one would not (free bytes measured
    unless given)."""
    need = estimate_bytes(grid, working_spacing_mm, channels)
    free_dev = free_device if free_device is not None else available_memory_bytes(device)
    free_host = free_host if free_host is not None else available_memory_bytes(torch.device("cpu"))
    if need["outputs"] > 0.8 * free_host:
        raise InputError(
            f"the fixed image ({'x'.join(map(str, grid.size_xyz))} voxels) needs about "
            f"{need['outputs'] / 2**30:.1f} GiB for the full-resolution outputs but {free_host / 2**30:.1f} GiB "
            "is free; resample the fixed image to a coarser grid (e.g. 1.5 mm) first")
    if need["working"] > 0.8 * free_dev:
        sp = working_spacing_mm
        while estimate_bytes(grid, sp, channels)["working"] > 0.8 * free_dev and sp < 64:
            sp *= 1.25
        raise InputError(
            f"registration at {working_spacing_mm:g} mm needs about {need['working'] / 2**30:.1f} GiB on "
            f"{device.type} but {free_dev / 2**30:.1f} GiB is free; use --working-spacing {sp:.1f} "
            "(or a device with more memory)")
