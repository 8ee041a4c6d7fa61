"""The one contract every method uses: ``register(case, options, progress) -> RegistrationResult``."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import numpy as np

from .dicomrt import PlanSummary, Structure
from . import roles
from .errors import InputError
from .field import SpatialTransform
from .image import Volume, check_finite

Progress = Callable[[float, str], None]
"""progress(fraction in [0, 1], message)."""


def no_progress(fraction: float, message: str) -> None:
    """A Progress that ignores reports."""


@dataclass
class RegistrationCase:
    """Inputs of one registration. Fixed = planning image, moving = repeat image.

    ``structures`` and ``fixed_mask`` are on the fixed grid; ``dose`` (Gy) is on
    its own grid in the fixed image's frame; ``query_points`` are (N, 3) LPS mm
    in the fixed image. ``same_frame``: True/False overrides the DICOM
    frame-of-reference check; None trusts the UIDs. ``target`` and ``oars``
    name structures by role (matched as :mod:`rtreg.roles` says); ``validate``
    replaces them by the structures' own names.
    """

    fixed: Volume
    moving: Volume
    fixed_mask: Optional[Volume] = None
    structures: List[Structure] = field(default_factory=list)
    dose: Optional[Volume] = None
    plan: Optional[PlanSummary] = None
    plan_text: str = ""
    query_points: Optional[np.ndarray] = None
    same_frame: Optional[bool] = None
    target: Optional[str] = None                        # the CTV (or GTV) among ``structures``
    oars: List[str] = field(default_factory=list)       # organs at risk among ``structures``
    notes: List[str] = field(default_factory=list)      # inputs left out while reading, and why

    def validate(self, prealign: str) -> None:
        """Raise InputError for input that would give a wrong result (see the README's bad-input list)."""
        for role, vol in (("fixed", self.fixed), ("moving", self.moving)):
            if vol.is_vector:
                raise InputError(f"the {role} image has {vol.array.shape[-1]} components per voxel; "
                                 "give a scalar (grey-level) 3D image")
            if min(vol.array.shape) < 4:
                raise InputError(f"the {role} image is too small ({vol.array.shape}); it needs at least 4 voxels "
                                 "along every axis")
            check_finite(vol, role)
        if self.dose is not None:
            check_finite(self.dose, "dose")
            if self.dose.meta.get("units", "Gy") not in ("Gy", ""):
                raise InputError(f"the dose is in {self.dose.meta.get('units')!r}, not Gy; export absolute dose")
        if self.fixed_mask is not None and self.fixed_mask.array.shape != self.fixed.array.shape:
            raise InputError(f"the fixed-image mask has shape {self.fixed_mask.array.shape}, the fixed image "
                             f"{self.fixed.array.shape}; resample the mask onto the fixed image (the CLI does this)")
        if self.fixed_mask is not None and not np.any(self.fixed_mask.array):
            raise InputError("the fixed-image mask is empty; give a mask with the region to register, or none")
        for s in self.structures:
            if s.mask.shape != self.fixed.array.shape:
                raise InputError(f"structure {s.name!r} is not on the fixed image grid; rasterise it on the "
                                 "planning CT")
        names = [st.name for st in self.structures]
        if self.target:
            self.target = roles.find(names, self.target, "target")
        self.oars = [roles.find(names, o, "organ at risk") for o in self.oars]
        if self.target in self.oars:
            raise InputError(f"{self.target!r} is named both the target and an organ at risk; give it one role")
        fa = self.fixed.meta.get("frame_of_reference", "")
        fb = self.moving.meta.get("frame_of_reference", "")
        if self.frames_differ and prealign == "none":
            raise InputError(
                f"the fixed and moving images are in different frames of reference ({fa} vs {fb}), so their "
                "coordinates are unrelated and registration without pre-alignment would be wrong; use "
                "--prealign rigid (or com/affine), or --same-frame if you know the scanners share coordinates")

    @property
    def frames_differ(self) -> bool:
        """True when the images' coordinates are unrelated (DICOM frame-of-reference UIDs, or the override)."""
        fa = self.fixed.meta.get("frame_of_reference", "")
        fb = self.moving.meta.get("frame_of_reference", "")
        return bool(fa and fb and fa != fb) if self.same_frame is None else not self.same_frame


@dataclass
class RegisterOptions:
    """Options shared by all methods; method-specific ones go in ``extra``.

    time_budget_s: wall-clock budget for the optimisation (None: iterations decide).
    prealign: none | com | rigid | affine. similarity: auto | ncc | mind | mi.
    regularization: diffusion | bending. working_spacing_mm: finest working grid.
    """

    device: str = "auto"
    seed: int = 0
    time_budget_s: Optional[float] = None
    iterations: Optional[int] = None
    prealign: str = "rigid"
    similarity: str = "auto"
    regularization: str = "diffusion"
    regularization_weight: Optional[float] = None
    working_spacing_mm: float = 2.0
    extra: Dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Refuse the shared numbers no method can use (each method checks its own budget and ``extra``)."""
        self.working_spacing_mm = option_number("the working spacing (--working-spacing)", self.working_spacing_mm,
                                                lambda s: s > 0, "a spacing in mm above 0, e.g. 2")
        if self.regularization_weight is not None:
            self.regularization_weight = option_number(
                "the regularization weight (--regularization-weight)", self.regularization_weight, lambda w: w >= 0,
                "a number >= 0, or leave it out for the method's default")


def option_number(name: str, value: object, valid: Callable[[float], bool], expected: str) -> float:
    """``value`` of the option ``name`` as a float, or InputError("``name`` is ``value``; give ``expected``")
    when it is not a finite number for which ``valid`` holds."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not np.isfinite(number) or not valid(number):
        raise InputError(f"{name} is {value!r}; give {expected}")
    return number


def folding_weight_option(method: str, options: RegisterOptions, default: float) -> float:
    """``options.extra["folding_weight"]`` (``default`` when absent) of ``method``, the weight of
    :func:`rtreg.losses.folding_penalty` in its optimisation: a finite number >= 0 (0 leaves the penalty out)."""
    return option_number(f"{method} option folding_weight", options.extra.get("folding_weight", default),
                         lambda w: w >= 0, f"a number >= 0, e.g. {default:g} (the default) or 0 to leave the "
                         "folding penalty out")


@dataclass
class MatchedPoints:
    """Point correspondences a method found: ``fixed`` (N, 3) and ``moving`` (N, 3) LPS mm, a confidence in
    [0, 1] per point, and whether each point was an inlier of the fitted transform."""

    fixed: np.ndarray
    moving: np.ndarray
    confidence: np.ndarray
    inliers: np.ndarray

    def rows(self) -> List[Dict[str, float]]:
        """One dict per point (for CSV and tables): positions, displacement (mm), confidence, inlier."""
        out = []
        for k, (p, q) in enumerate(zip(self.fixed, self.moving)):
            d = q - p
            out.append({"point": k + 1, "fixed_x": p[0], "fixed_y": p[1], "fixed_z": p[2],
                        "moving_x": q[0], "moving_y": q[1], "moving_z": q[2], "dx_mm": d[0], "dy_mm": d[1],
                        "dz_mm": d[2], "confidence": float(self.confidence[k]), "inlier": int(self.inliers[k])})
        return out


@dataclass
class RegistrationResult:
    """What a method returns: the fixed->moving transform (pre-alignment + field on the fixed grid) and QA."""

    method: str
    transform: SpatialTransform
    prealignment: np.ndarray
    device: str
    timings: Dict[str, float] = field(default_factory=dict)
    qa: Dict[str, object] = field(default_factory=dict)
    messages: List[str] = field(default_factory=list)
    maps: Dict[str, Volume] = field(default_factory=dict)   # method QA volumes, written to qa/<name>.nii.gz
    matched_points: Optional[MatchedPoints] = None        # correspondences (QuizRigid), written to matched_points.csv
