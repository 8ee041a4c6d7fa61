"""Compute device choice and memory checks (CPU always works; CUDA when torch sees a GPU)."""
from __future__ import annotations

import os
from typing import Optional

import torch

from .errors import InputError


def resolve_device(choice: str = "auto") -> torch.device:
    """``auto`` -> CUDA if available else CPU; ``cuda`` without a GPU is an error naming the fix."""
    choice = (choice or "auto").lower()
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice in ("cuda", "gpu"):
        if not torch.cuda.is_available():
            raise InputError("--device cuda was asked for, but torch sees no GPU; use --device cpu (or auto)")
        return torch.device("cuda")
    if choice == "cpu":
        return torch.device("cpu")
    raise InputError(f"unknown device {choice!r}; use auto, cpu or cuda")


def available_memory_bytes(device: torch.device) -> int:
    """Free memory on ``device``: GPU free memory, or MemAvailable of the host."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


PRECISIONS = ("auto", "float32", "bfloat16")


def network_precision(device: torch.device, choice: Optional[str] = "auto") -> torch.dtype:
    """The dtype in which a network's passes run while its weights are optimised on a pair (the weights, the
    losses and the returned field stay float32): ``float32``, ``bfloat16`` (mixed precision), or ``auto``:
    bfloat16 on a CPU with AMX tiles (where a TTORegister iteration, the network's passes in bfloat16 and
    the losses in float32, takes 0.55 of its float32 time: ``python3 bench/tto_network_speed.py``), float32
    elsewhere (CPUs without them emulate bfloat16; on a GPU not measured yet)."""
    choice = (choice or "auto").lower()
    if choice not in PRECISIONS:
        raise InputError(f"unknown precision {choice!r}; use {', '.join(PRECISIONS)}")
    if choice == "bfloat16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise InputError("precision bfloat16 was asked for, but this GPU has no bfloat16; use float32 or auto")
        return torch.bfloat16
    if choice == "auto" and device.type == "cpu" and _cpu_has_amx():
        return torch.bfloat16
    return torch.float32


def _cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (torch >= 2.3 says; older torch: assume not)."""
    probe = getattr(getattr(torch, "cpu", None), "_is_amx_tile_supported", None)
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:
        return False


def autocast(device: torch.device, dtype: torch.dtype) -> torch.autocast:
    """A context in which the network's operations run in ``dtype`` (no-op for float32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16 if dtype == torch.float32 else dtype,
                          enabled=dtype != torch.float32)
