"""Where the engine runs inside Slicer, and its Python dependencies (installed only with consent)."""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path
from typing import List

# Import name -> pip requirement. SimpleITK, numpy and pydicom come with Slicer and are never reinstalled.
ENGINE_REQUIREMENTS = {"scipy": "scipy", "matplotlib": "matplotlib"}


def python_executable() -> str:
    """PythonSlicer inside Slicer (the engine runs out of process), else this interpreter."""
    found = shutil.which("PythonSlicer")
    if found:
        return found
    candidate = Path(sys.executable).with_name("PythonSlicer" + (".exe" if os.name == "nt" else ""))
    return str(candidate) if candidate.exists() else sys.executable


def missing_requirements() -> List[str]:
    """Import names the engine needs that this Python cannot find (torch included), without importing them."""
    names = ["torch"] + list(ENGINE_REQUIREMENTS)
    return [n for n in names if importlib.util.find_spec(n) is None]


def gpu_listed() -> bool:
    """Whether to offer the GPU: an NVIDIA driver is present (torch itself is not imported here)."""
    return shutil.which("nvidia-smi") is not None
