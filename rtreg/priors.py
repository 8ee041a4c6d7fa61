"""Clinical priors computed from the planning image and its structures.

For now: the body (foreground) mask used to focus similarity and metrics.
Arrays are (z, y, x) on the image grid.
"""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .image import Volume


def body_mask(volume: Volume, threshold_hu: float = -400.0) -> np.ndarray:
    """Body mask (uint8): CT above ``threshold_hu`` (other modalities: above the Otsu threshold),
    largest connected component, holes filled slice by slice (so lungs and bowel gas are inside)."""
    a = volume.array
    if volume.meta.get("modality", "").upper() == "CT" or volume.meta.get("units") == "HU":
        fg = a > threshold_hu
    else:
        img = sitk.Cast(volume.to_sitk(), sitk.sitkFloat32)
        otsu = sitk.OtsuThresholdImageFilter()
        otsu.SetInsideValue(0)
        otsu.SetOutsideValue(1)
        otsu.Execute(img)
        fg = a > otsu.GetThreshold()
    fg = ndimage.binary_opening(fg, iterations=1) if min(a.shape) > 4 else fg
    labels, n = ndimage.label(fg)
    if n == 0:
        return np.zeros(a.shape, np.uint8)
    sizes = ndimage.sum_labels(fg, labels, index=np.arange(1, n + 1))
    body = labels == (int(np.argmax(sizes)) + 1)
    for k in range(body.shape[0]):
        body[k] = ndimage.binary_fill_holes(body[k])
    return body.astype(np.uint8)
