"""Roles of the planning structures: the target (CTV, else GTV), the organs at risk and the body.

Structure names travel through files (``structures/<ROI>.nii.gz``), so a name is
matched by its file-safe form, case-insensitively: a Slicer segment "Lung L" is
the structure read back as "Lung_L".
"""
from __future__ import annotations

import re
from typing import List, Optional, Sequence, Tuple

from .errors import InputError

BODY_NAMES = ("body", "external", "outline", "skin", "patient")


def safe_name(name: str) -> str:
    """The ROI name with every run of characters unsafe in a file name replaced by ``_``."""
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", name).strip("_") or "ROI"


def same_name(a: str, b: str) -> bool:
    return safe_name(a).lower() == safe_name(b).lower()


def find(names: Sequence[str], wanted: str, role: str) -> str:
    """The one of ``names`` that is ``wanted`` (see :func:`same_name`); a clear error when none is."""
    for n in names:
        if same_name(n, wanted):
            return n
    raise InputError(f"the {role} {wanted!r} is not among the structures ({', '.join(names) or 'none given'}); "
                     f"check the name, or give the structures that hold it")


def guess_roles(names: Sequence[str]) -> Tuple[Optional[str], List[str], Optional[str]]:
    """(target, organs at risk, body) from structure names as a planner names them: the target is the first
    CTV (else GTV, else PTV); the body is BODY/External/Outline/Skin; every other structure is an organ at
    risk (planning volumes, markers and couch are left out)."""
    low = {n: n.lower() for n in names}
    def named(kind: str, n: str) -> bool:   # "CTV_High", or "HighRisk_CTV" but not "PTV_CTV"
        return low[n].startswith(kind) or (re.search(rf"[^a-z]{kind}", low[n]) is not None
                                           and not low[n].startswith(("ptv", "itv")))
    target = next((n for kind in ("ctv", "gtv") for n in names if named(kind, n)), None) or \
        next((n for n in names if low[n].startswith("ptv")), None)
    body = next((n for n in names if low[n] in BODY_NAMES), None)
    skip = ("ctv", "gtv", "ptv", "itv", "marker", "couch", "table", "bolus", "isocent", "beekley", "ring")
    oars = [n for n in names if n not in (target, body) and not any(k in low[n] for k in skip)
            and not re.fullmatch(r"m\d+", low[n])]
    return target, oars, body
