"""Shipped network weights: ``Resources/Models/<name>.pt`` with ``manifest.json`` beside them.

Each weights file is a plain dict ``{"state_dict": {...}, "config": {...}}`` read with
``torch.load(..., weights_only=True)``; the manifest records for each file its sha256, size, the
exact command that trained it, the data it saw and when. A file whose sha256 differs from its
manifest entry is refused (it would be a model nobody can reproduce).
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from .errors import InputError

MODELS_DIR = Path(os.environ.get("RTREG_MODELS_DIR") or Path(__file__).resolve().parent.parent / "Resources" / "Models")
"""The shipped weights, or the folder ``$RTREG_MODELS_DIR`` names (e.g. weights fine-tuned on your pairs)."""
MANIFEST = "manifest.json"


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(models_dir: Path = MODELS_DIR) -> Dict[str, Dict]:
    path = Path(models_dir) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else {}


def load_weights(name: str, models_dir: Optional[Path] = None) -> Tuple[Dict[str, torch.Tensor], Dict]:
    """(state_dict, config) of ``<models_dir>/<name>``, after checking its sha256 against the manifest."""
    folder = Path(models_dir) if models_dir is not None else MODELS_DIR
    path = folder / name
    if not path.is_file():
        raise InputError(f"the network weights {path} are missing; reinstall the extension, or train them with "
                         f"`rtreg train {Path(name).stem}` (see the README)")
    entry = read_manifest(folder).get(name)
    if entry is None:
        raise InputError(f"{path} is not in {folder / MANIFEST}; weights without a manifest entry (sha256, "
                         "training command) are not used")
    digest = sha256_of(path)
    if digest != entry.get("sha256"):
        raise InputError(f"{path} has sha256 {digest[:12]}..., the manifest says {str(entry.get('sha256'))[:12]}...; "
                         "the file is damaged or was replaced: reinstall it or retrain it")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    return blob["state_dict"], dict(blob["config"])


def save_weights(name: str, state_dict: Dict[str, torch.Tensor], config: Dict, record: Dict,
                 models_dir: Optional[Path] = None) -> Path:
    """Write ``<models_dir>/<name>`` and its manifest entry (sha256, size, date and ``record``: the training
    command, data and final numbers)."""
    folder = Path(models_dir) if models_dir is not None else MODELS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    torch.save({"state_dict": {k: v.detach().cpu().contiguous() for k, v in state_dict.items()},
                "config": config}, path)
    manifest = read_manifest(folder)
    manifest[name] = dict(record, sha256=sha256_of(path), size_bytes=path.stat().st_size,
                          date=datetime.date.today().isoformat(), config=config)
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return path
