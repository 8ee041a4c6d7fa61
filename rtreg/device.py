"""Compute device choice and memory checks (CPU always works; CUDA when torch sees a GPU)."""
from __future__ import annotations

import os

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
