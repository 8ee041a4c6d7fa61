"""The MRML adapter: the only place where the engine meets Slicer, and the only place with RAS.

MRML nodes live in RAS millimetres; the engine in LPS. Positions and vectors
change sign in x and y here, and nowhere else. Works with the Slicer
application and with the ``slicer-core`` wheel (real MRML, no GUI).

Transform direction (DESIGN.md): a grid transform node holding the engine's
fixed->moving mapping as **FromParent** moves what is placed under it by about
-u: put the moving (repeat) volume under it to see it on the fixed (planning)
image. Contours on the fixed image go to the moving image through the inverse,
which is the same grid set as **ToParent**.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from .dicomrt import Structure
from .errors import InputError
from .image import Grid, Volume, resample

LPS_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
"""Flips x and y: maps LPS to RAS and back (its own inverse)."""

LABELMAP = "Binary labelmap"


def _matrix_to_numpy(m: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def _numpy_to_matrix(a: np.ndarray) -> vtk.vtkMatrix4x4:
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(a[r, c]))
    return m


def _image_data(array: np.ndarray) -> vtk.vtkImageData:
    """(z, y, x[, c]) array -> vtkImageData with origin 0, spacing 1 (x fastest)."""
    arr = np.ascontiguousarray(array)
    img = vtk.vtkImageData()
    img.SetDimensions(arr.shape[2], arr.shape[1], arr.shape[0])
    comps = arr.shape[3] if arr.ndim == 4 else 1
    flat = numpy_support.numpy_to_vtk(arr.reshape(-1, comps) if comps > 1 else arr.ravel(), deep=True)
    flat.SetNumberOfComponents(comps)
    img.GetPointData().SetScalars(flat)
    return img


def _array_of(img: vtk.vtkImageData) -> np.ndarray:
    nx, ny, nz = img.GetDimensions()
    scalars = img.GetPointData().GetScalars()
    a = numpy_support.vtk_to_numpy(scalars).copy()
    comps = scalars.GetNumberOfComponents()
    return a.reshape(nz, ny, nx, comps) if comps > 1 else a.reshape(nz, ny, nx)


# ---------------------------------------------------------------- volumes
def volume_from_node(node, with_parent_transform: bool = True) -> Volume:
    """A scalar volume node -> Volume (LPS). A linear parent transform is applied to the geometry; a
    non-linear one is an error (harden it, or remove it, first). ``with_parent_transform=False`` gives the
    volume as scanned, whatever it is placed under."""
    if node is None or node.GetImageData() is None:
        raise InputError("the volume node has no image data; load or select an image")
    ijk_to_ras = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(ijk_to_ras)
    affine_ras = _matrix_to_numpy(ijk_to_ras)
    parent = node.GetParentTransformNode() if with_parent_transform else None
    if parent is not None:
        if not parent.IsTransformToWorldLinear():
            raise InputError(f"{node.GetName()} is under a non-linear transform; harden it or take it out of "
                             "the transform first")
        to_world = vtk.vtkMatrix4x4()
        parent.GetMatrixTransformToWorld(to_world)
        affine_ras = _matrix_to_numpy(to_world) @ affine_ras
    meta = {"name": node.GetName(), "node_id": node.GetID()}
    modality = node.GetAttribute("DICOM.Modality")
    if modality:
        meta["modality"] = modality
    if node.GetAttribute("DicomRtImport.DoseVolume"):
        meta.update(modality="RTDOSE", units="Gy")
    return Volume(_array_of(node.GetImageData()), LPS_RAS @ affine_ras, meta)


def update_volume_node(node, volume: Volume):
    """Put a Volume's voxels and LPS geometry into an existing scalar volume node."""
    node.SetIJKToRASMatrix(_numpy_to_matrix(LPS_RAS @ volume.affine))
    node.SetAndObserveImageData(_image_data(volume.array))
    return node


def add_volume_node(scene, volume: Volume, name: str, class_name: str = "vtkMRMLScalarVolumeNode"):
    """A new volume node (with display node) holding ``volume``."""
    node = scene.AddNewNodeByClass(class_name, name)
    update_volume_node(node, volume)
    node.CreateDefaultDisplayNodes()
    return node


# ---------------------------------------------------------------- segmentations
def _ensure_converter_rules() -> None:
    """Register the core labelmap <-> closed surface rules when nobody has (slicer-core without the app;
    inside Slicer the Segmentations module has done it, and SlicerRT adds the planar-contour rules)."""
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    if len(factory.GetConverterRules()) == 0:
        factory.RegisterConverterRule(slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule())
        factory.RegisterConverterRule(slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule())


def _geometry_string(grid: Grid) -> str:
    ijk_to_ras = _numpy_to_matrix(LPS_RAS @ grid.affine)
    nz, ny, nx = grid.shape
    return slicer.vtkSegmentationConverter.SerializeImageGeometry(ijk_to_ras, [0, nx - 1, 0, ny - 1, 0, nz - 1])


def _source_name(segmentation) -> str:
    for getter in ("GetSourceRepresentationName", "GetMasterRepresentationName"):  # Slicer >= 5.4 / older
        if hasattr(segmentation, getter):
            return getattr(segmentation, getter)()
    return LABELMAP


def structures_from_segmentation(node, reference: Volume, segment_ids: Optional[Iterable[str]] = None
                                 ) -> List[Structure]:
    """Segments -> binary masks on the grid of ``reference`` (the fixed image). The node is not modified:
    planar-contour or closed-surface segmentations (RTSTRUCT through SlicerRT) are converted on a copy."""
    _ensure_converter_rules()
    seg = slicer.vtkSegmentation()
    seg.DeepCopy(node.GetSegmentation())
    if _source_name(seg) != LABELMAP or not seg.ContainsRepresentation(LABELMAP):
        seg.SetConversionParameter(slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName(),
                                   _geometry_string(reference.grid))
        if not seg.CreateRepresentation(LABELMAP):
            raise InputError(f"segmentation {node.GetName()} cannot be converted to a binary labelmap; "
                             "convert it in the Segmentations module first")
    ids = list(segment_ids) if segment_ids is not None else [seg.GetNthSegmentID(i)
                                                               for i in range(seg.GetNumberOfSegments())]
    out = []
    for n, sid in enumerate(ids, start=1):
        segment = seg.GetSegment(sid)
        if segment is None:
            raise InputError(f"segment {sid!r} is not in {node.GetName()}")
        labelmap = segment.GetRepresentation(LABELMAP)
        mask_vol = _oriented_image_to_volume(labelmap, segment.GetLabelValue())
        mask = resample(mask_vol, reference.grid, "mask").array if mask_vol is not None else \
            np.zeros(reference.array.shape, np.uint8)
        if not mask.any():
            raise InputError(f"segment {segment.GetName()!r} is empty on the fixed image; remove it or draw it")
        color = tuple(int(round(255 * c)) for c in segment.GetColor())
        out.append(Structure(segment.GetName(), n, color, mask))
    return out


def _oriented_image_to_volume(image, label_value: int) -> Optional[Volume]:
    if image is None:
        return None
    ext = image.GetExtent()
    if ext[1] < ext[0] or ext[3] < ext[2] or ext[5] < ext[4]:
        return None
    m = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(m)
    ijk_to_ras = _matrix_to_numpy(m)
    offset = np.eye(4)
    offset[:3, 3] = [ext[0], ext[2], ext[4]]
    arr = (_array_of(image) == label_value).astype(np.uint8)
    return Volume(arr, LPS_RAS @ ijk_to_ras @ offset)


def add_segmentation_node(scene, structures: Sequence[Structure], grid: Grid, name: str, node=None):
    """A segmentation node (binary labelmap source) with one segment a structure, on ``grid``."""
    _ensure_converter_rules()
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    seg = node.GetSegmentation()
    seg.RemoveAllSegments()
    ijk_to_ras = _numpy_to_matrix(LPS_RAS @ grid.affine)
    for s in structures:
        img = slicer.vtkOrientedImageData()
        img.ShallowCopy(_image_data(s.mask.astype(np.uint8)))
        img.SetImageToWorldMatrix(ijk_to_ras)
        segment = slicer.vtkSegment()
        segment.SetName(s.name)
        segment.SetColor(*[c / 255.0 for c in s.color])
        segment.AddRepresentation(LABELMAP, img)
        seg.AddSegment(segment)
    for setter in ("SetSourceRepresentationName", "SetMasterRepresentationName"):
        if hasattr(seg, setter):
            getattr(seg, setter)(LABELMAP)
            break
    node.CreateDefaultDisplayNodes()
    return node


# ---------------------------------------------------------------- transforms
def grid_transform(field: Volume) -> "slicer.vtkOrientedGridTransform":
    """A displacement field (LPS grid and vectors) -> vtkOrientedGridTransform in RAS."""
    if not field.is_vector or field.array.shape[-1] != 3:
        raise InputError("a grid transform needs a 3-component displacement field")
    ras = LPS_RAS @ field.affine
    spacing = np.linalg.norm(ras[:3, :3], axis=0)
    img = _image_data((field.array * np.array([-1.0, -1.0, 1.0])).astype(np.float64))
    img.SetOrigin(*ras[:3, 3])
    img.SetSpacing(*spacing)
    direction = np.eye(4)
    direction[:3, :3] = ras[:3, :3] / spacing
    gt = slicer.vtkOrientedGridTransform()
    gt.SetGridDirectionMatrix(_numpy_to_matrix(direction))
    gt.SetDisplacementGridData(img)
    gt.SetInterpolationModeToLinear()
    return gt


def set_grid_transform(node, field: Volume, from_parent: bool = True):
    """Hold the engine's fixed->moving mapping in a grid transform node (FromParent by default)."""
    gt = grid_transform(field)
    if from_parent:
        node.SetAndObserveTransformFromParent(gt)
    else:
        node.SetAndObserveTransformToParent(gt)
    return node


def field_from_grid_transform_node(node) -> Volume:
    """The FromParent displacement grid of a grid transform node -> LPS Volume (inverse of set_grid_transform)."""
    gt = node.GetTransformFromParent()
    if not isinstance(gt, slicer.vtkOrientedGridTransform):
        raise InputError(f"{node.GetName()} does not hold a grid transform FromParent")
    img = gt.GetDisplacementGrid()
    direction = _matrix_to_numpy(gt.GetGridDirectionMatrix())[:3, :3]
    affine_ras = np.eye(4)
    affine_ras[:3, :3] = direction @ np.diag(img.GetSpacing())
    affine_ras[:3, 3] = img.GetOrigin()
    vectors = _array_of(img).astype(np.float32) * np.array([-1.0, -1.0, 1.0], np.float32)
    return Volume(vectors, LPS_RAS @ affine_ras, {"units": "mm"})


# ---------------------------------------------------------------- points and tables
def points_from_markups(node) -> np.ndarray:
    """Control points of a markups node -> (N, 3) LPS mm (world, parent transforms applied)."""
    pts = []
    for i in range(node.GetNumberOfControlPoints()):
        p = [0.0, 0.0, 0.0]
        node.GetNthControlPointPositionWorld(i, p)
        pts.append(p)
    return (np.array(pts, float).reshape(-1, 3) * np.array([-1.0, -1.0, 1.0]))


def set_points(node, points_lps: np.ndarray, labels: Sequence[str], descriptions: Sequence[str]) -> None:
    """Replace the control points of a markups node by (N, 3) LPS mm points (stored in RAS), with labels and
    descriptions."""
    node.RemoveAllControlPoints()
    for p, label, text in zip(np.asarray(points_lps, float).reshape(-1, 3), labels, descriptions):
        k = node.AddControlPoint(float(-p[0]), float(-p[1]), float(p[2]))
        node.SetNthControlPointLabel(k, label)
        node.SetNthControlPointDescription(k, text)


def add_table_node(scene, rows: Dict[str, object], name: str, node=None):
    """A two-column (metric, value) table node."""
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    table = node.GetTable()
    table.Initialize()
    keys, values = vtk.vtkStringArray(), vtk.vtkStringArray()
    keys.SetName("metric")
    values.SetName("value")
    for k, v in rows.items():
        keys.InsertNextValue(str(k))
        values.InsertNextValue(f"{v:.4g}" if isinstance(v, float) else str(v))
    table.AddColumn(keys)
    table.AddColumn(values)
    node.Modified()
    return node


def place_in_study(scene, reference_node, nodes: Iterable) -> None:
    """Parent output nodes under the subject-hierarchy parent (study) of ``reference_node``."""
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if sh is None:
        return
    parent = sh.GetItemParent(sh.GetItemByDataNode(reference_node))
    for n in nodes:
        item = sh.GetItemByDataNode(n)
        if item and parent:
            sh.SetItemParent(item, parent)


# ---------------------------------------------------------------- the logic the four modules share
DOSE_ATTRIBUTE = "DicomRtImport.DoseVolume"


def segment_roles(node) -> Tuple[Optional[str], List[str], Optional[str]]:
    """(target, organs at risk, body) segment IDs of a segmentation node, guessed from the segment names as
    :func:`rtreg.roles.guess_roles` does (what the ProtonDIR panel prefills)."""
    from .roles import guess_roles
    seg = node.GetSegmentation()
    ids = [seg.GetNthSegmentID(i) for i in range(seg.GetNumberOfSegments())]
    by_name = {seg.GetSegment(sid).GetName(): sid for sid in ids}
    target, oars, body = guess_roles(list(by_name))
    return (by_name[target] if target else None, [by_name[n] for n in oars], by_name[body] if body else None)


class RegistrationInputs:
    """Input nodes of one registration; nothing here is ever modified (except that the moving volume is
    placed under the result transform, as Slicer users expect).

    ``segment_ids``: the segments to carry over (None: all); ``dose``: a dose volume on the fixed image;
    ``plan_text``: free text or the summary of an imported plan. Roles, as segment IDs:
    ``target_segment`` (the CTV), ``oar_segments`` (organs at risk; None: guessed from the names) and
    ``fixed_mask_segment`` (the body: where similarity counts). ``query_points``: a markups node with
    points on the fixed image for QuizRigid to match (None: chosen automatically).
    """

    def __init__(self, fixed, moving, segmentation=None, segment_ids=None, dose=None, plan_text: str = "",
                 fixed_mask_segment: Optional[str] = None, target_segment: Optional[str] = None,
                 oar_segments: Optional[List[str]] = None, query_points=None):
        if fixed is None or moving is None:
            raise InputError("select a fixed (planning) and a moving (repeat) volume")
        if fixed is moving:
            raise InputError("the fixed and the moving volume are the same node; select the repeat image")
        self.fixed, self.moving = fixed, moving
        self.segmentation, self.segment_ids, self.dose = segmentation, segment_ids, dose
        self.plan_text = plan_text
        self.fixed_mask_segment = fixed_mask_segment
        self.target_segment, self.oar_segments = target_segment, oar_segments
        self.query_points = query_points       # a markups node with points on the fixed image (QuizRigid)
        if query_points is not None and query_points.GetNumberOfControlPoints() == 0:
            raise InputError(f"the query-point list {query_points.GetName()!r} is empty; place points on the fixed "
                             "image, or select none to let QuizRigid choose them")
        roles = [r for r in [fixed_mask_segment, target_segment] + list(oar_segments or []) if r]
        if roles and segmentation is None:
            raise InputError("segment roles (target, organs at risk, body) need the structure set; select it")
        for sid in roles:
            if segmentation.GetSegmentation().GetSegment(sid) is None:
                raise InputError(f"segment {sid!r} is not in {segmentation.GetName()}; choose the roles again")
        if segment_ids is not None:
            missing = [r for r in [target_segment] + list(oar_segments or []) if r and r not in segment_ids]
            if missing:
                raise InputError(f"the segments {missing} have a role but are not among those to carry over")


class RegistrationOutputs:
    """Output nodes: pass existing ones to reuse them, leave None to create new ones."""

    def __init__(self, transform=None, warped=None, segmentation=None, dose=None, table=None, jacobian=None):
        self.transform, self.warped, self.segmentation = transform, warped, segmentation
        self.dose, self.table, self.jacobian = dose, table, jacobian
        self.maps: Dict[str, object] = {}  # a method's QA volumes by name (e.g. patch_mi_after); reused if given
        self.query_points = None        # QuizRigid: the query points (fixed image) and where they were found
        self.matched_points = None      # (moving image, under the transform); markups nodes, reused if given
        self.messages: List[str] = []   # after a run: what the engine left out or changed, and why
        self.summary: List[str] = []    # after a run: the method's own QA in words (method_summary)


def _flat_metrics(metrics: Dict) -> Dict[str, object]:
    rows: Dict[str, object] = {"method": metrics["method"], "device": metrics["device"]}
    for stage in ("similarity_before", "similarity_after_prealignment", "similarity_after"):
        for k, v in metrics[stage].items():
            rows[f"{k} ({stage.replace('similarity_', '').replace('_', ' ')})"] = v
    rows.update({f"{k.replace('_', ' ')}": v for k, v in metrics["jacobian"].items()})
    rows["inverse residual mean (mm)"] = metrics["inverse_residual_mm"]["mean"]
    target = (metrics.get("roles") or {}).get("target")
    if target:
        volumes = metrics["structure_volumes_cc"][target]
        rows["target"] = target
        rows[f"{target} volume planning (cc)"] = volumes["planning"]
        rows[f"{target} volume on moving (cc)"] = volumes["on_moving"]
    qa = metrics.get("method_qa") or {}
    for key in ("patch_mi_mean_before", "patch_mi_mean_after_prealignment", "patch_mi_mean_after"):
        if key in qa:
            rows[f"patch-wise MI mean ({key[len('patch_mi_mean_'):].replace('_', ' ')})"] = qa[key]
    for key, label in (("confident_inliers", "matched points: confident inliers"),
                       ("confidence_mean", "matched points: mean confidence"), ("rotation_deg", "rotation (deg)"),
                       ("overlap_fraction", "overlap fraction"), ("global_features", "global features"),
                       ("stages", "convex stages")):
        if key in qa:
            rows[label] = qa[key]
    rows["time (s)"] = metrics["timings_s"]["total"]
    return rows


class RegistrationLogic:
    """Writes input nodes to a temporary folder, runs ``rtreg register`` out of process, loads the outputs.

    ``method`` is the engine method; ``python`` the interpreter (PythonSlicer inside Slicer,
    ``sys.executable`` in tests).
    """

    def __init__(self, method: str = "io", scene=None, python: Optional[str] = None):
        self.method = method
        self.scene = scene if scene is not None else slicer.mrmlScene
        self.python = python

    def start(self, inputs: RegistrationInputs, options: Optional[Dict[str, object]] = None):
        """Write the inputs and start the engine; returns the running :class:`~rtreg.runner.CliRun`."""
        from .image import write_volume
        from .pipeline import structure_filename
        from .roles import safe_name
        from .runner import CliRun
        options = dict(options or {})
        run = CliRun([], python=self.python)
        try:
            folder = run.workdir / "in"
            fixed = volume_from_node(inputs.fixed)
            args = ["--method", self.method, "--fixed", str(write_volume(fixed, folder / "fixed.nrrd")),
                    "--moving", str(write_volume(_moving_as_scanned(inputs.moving), folder / "moving.nrrd"))]
            if inputs.segmentation is not None:
                structures = structures_from_segmentation(inputs.segmentation, fixed, inputs.segment_ids)
                for s in structures:
                    write_volume(fixed.with_array(s.mask), folder / "structures" / structure_filename(s.name))
                args += ["--fixed-structures", str(folder / "structures")]
                segments = inputs.segmentation.GetSegmentation()
                if inputs.target_segment:  # file-safe names: the engine matches them (rtreg.roles)
                    args += ["--target", safe_name(segments.GetSegment(inputs.target_segment).GetName())]
                if inputs.oar_segments is not None:
                    args += ["--oars", ",".join(safe_name(segments.GetSegment(sid).GetName())
                                                for sid in inputs.oar_segments)]
                if inputs.fixed_mask_segment:
                    body = structures_from_segmentation(inputs.segmentation, fixed, [inputs.fixed_mask_segment])[0]
                    args += ["--fixed-mask", str(write_volume(fixed.with_array(body.mask), folder / "mask.nrrd"))]
            if inputs.dose is not None:
                dose = volume_from_node(inputs.dose)
                args += ["--dose", str(write_volume(dose.with_array(dose.array.astype(np.float32)),
                                                    folder / "dose.nrrd"))]
            if inputs.plan_text.strip():
                (folder / "plan.txt").write_text(inputs.plan_text.strip() + "\n")
                args += ["--plan", str(folder / "plan.txt")]
            if inputs.query_points is not None:
                rows = ["x,y,z"] + [",".join(f"{v:.4f}" for v in p) for p in points_from_markups(inputs.query_points)]
                (folder / "query_points.csv").write_text("\n".join(rows) + "\n")
                args += ["--query-points", str(folder / "query_points.csv")]
            args += _option_args(options)
            run.command[4:4] = args
            return run.start()
        except Exception:
            run.cleanup()
            raise

    def process(self, inputs: RegistrationInputs, options: Optional[Dict[str, object]] = None,
                outputs: Optional[RegistrationOutputs] = None,
                progress=lambda fraction, message: None) -> RegistrationOutputs:
        """Register and load the outputs (blocking). On failure the scene is left as it was."""
        run = self.start(inputs, options)
        try:
            run.wait(progress)
            return self.load(run.out, inputs, outputs or RegistrationOutputs())
        finally:
            run.cleanup()

    # ------------------------------------------------------------ 4D series (a sequence of volumes)
    def start_series(self, sequence, reference: int, options: Optional[Dict[str, object]] = None):
        """Write the frames of ``sequence`` (a vtkMRMLSequenceNode of volumes on one grid) as a 4D image and
        start ``rtreg register-series`` with frame ``reference`` as the fixed image; returns the CliRun."""
        from .image import write_frames
        from .runner import CliRun
        n = sequence.GetNumberOfDataNodes()
        if n < 2:
            raise InputError(f"the sequence {sequence.GetName()!r} has {n} frame(s); motion correction needs at "
                             "least 2")
        if not 0 <= reference < n:
            raise InputError(f"reference frame {reference} does not exist; the sequence has frames 0 to {n - 1}")
        frames = [volume_from_node(sequence.GetNthDataNode(k)) for k in range(n)]
        if any(not f.grid.same_as(frames[0].grid) for f in frames):
            raise InputError(f"the frames of {sequence.GetName()!r} lie on different grids; resample them onto "
                             "one grid first")
        run = CliRun([], python=self.python, subcommand="register-series")
        try:
            path = write_frames(frames, run.workdir / "in" / "series.nii.gz")
            run.command[4:4] = ["--method", self.method, "--series", str(path), "--reference-frame",
                                str(reference)] + _option_args(dict(options or {}))
            return run.start()
        except Exception:
            run.cleanup()
            raise

    def load_series(self, out, sequence, output=None):
        """The motion-corrected frames as a sequence node (``output`` reused if given) with the input's index
        values, and a browser node to play it."""
        from pathlib import Path
        from .image import read_frames
        frames = read_frames(Path(out) / "warped_series.nii.gz")
        seq = output or self.scene.AddNewNodeByClass("vtkMRMLSequenceNode", f"{sequence.GetName()} motion-corrected")
        seq.RemoveAllDataNodes()
        seq.SetIndexName(sequence.GetIndexName())
        seq.SetIndexUnit(sequence.GetIndexUnit())
        for k, frame in enumerate(frames):
            node = update_volume_node(slicer.vtkMRMLScalarVolumeNode(), frame)
            node.SetName(f"{seq.GetName()} {k}")
            seq.SetDataNodeAtValue(node, sequence.GetNthIndexValue(k))
        if output is None and self.scene.IsNodeClassRegistered("vtkMRMLSequenceBrowserNode"):  # the Sequences
            browser = self.scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode", f"{seq.GetName()} browser")
            browser.SetAndObserveMasterSequenceNodeID(seq.GetID())                          # module's node
        return seq

    def process_series(self, sequence, reference: int = 0, options: Optional[Dict[str, object]] = None,
                       output=None, progress=lambda fraction, message: None):
        """Register every frame of ``sequence`` to frame ``reference`` (blocking); returns the corrected
        sequence node. On failure the scene is left as it was."""
        run = self.start_series(sequence, reference, options)
        try:
            run.wait(progress)
            return self.load_series(run.out, sequence, output)
        finally:
            run.cleanup()

    def load(self, out, inputs: RegistrationInputs, outputs: RegistrationOutputs) -> RegistrationOutputs:
        """Read every output file first (a failure leaves the scene untouched), then create/update nodes."""
        import json
        from pathlib import Path
        from .image import read_volume
        from .pipeline import structure_filename
        out = Path(out)
        metrics = json.loads((out / "metrics.json").read_text())
        field = read_volume(out / "displacement.mha")
        warped = read_volume(out / "warped_moving.nii.gz")
        jacobian = read_volume(out / "jacobian.nii.gz")
        colors = {}
        if inputs.segmentation is not None:
            seg = inputs.segmentation.GetSegmentation()
            for i in range(seg.GetNumberOfSegments()):
                s = seg.GetNthSegment(i)
                colors[s.GetName()] = tuple(int(round(255 * c)) for c in s.GetColor())
        structures = []
        for i, name in enumerate(metrics["structures_on_moving"], start=1):
            vol = read_volume(out / "structures_on_moving" / structure_filename(name))
            structures.append(Structure(name, i, colors.get(name, (255, 0, 0)), (vol.array > 0).astype(np.uint8)))
        moving_grid = _moving_as_scanned(inputs.moving).grid
        dose = read_volume(out / "dose_on_moving.nii.gz") if metrics["dose_mapped"] else None
        maps = {p.name[:-len(".nii.gz")]: read_volume(p) for p in sorted((out / "qa").glob("*.nii.gz"))}

        matched = _read_matched_points(out / metrics["matched_points"]) if metrics.get("matched_points") else None

        fixed_name, moving_name = inputs.fixed.GetName(), inputs.moving.GetName()
        linear = metrics.get("transform_kind") == "linear"
        name = f"{moving_name} to {fixed_name} ({self.method})"
        if linear:   # FromParent = A (fixed -> moving, RAS): the moving volume under it lands on the fixed one
            reuse = outputs.transform is not None and outputs.transform.IsA("vtkMRMLLinearTransformNode")
            t = outputs.transform if reuse else self.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", name)
            a = np.asarray(metrics["prealignment_matrix_lps"], float)
            t.SetMatrixTransformFromParent(_numpy_to_matrix(LPS_RAS @ a @ LPS_RAS))
        else:
            t = outputs.transform or self.scene.AddNewNodeByClass("vtkMRMLGridTransformNode", name)
            set_grid_transform(t, field, from_parent=True)
        t.SetNodeReferenceID("fixedVolume", inputs.fixed.GetID())
        t.SetNodeReferenceID("movingVolume", inputs.moving.GetID())
        t.SetAttribute("rtreg.direction", "FromParent maps fixed (planning) points to moving (repeat) points")
        inputs.moving.SetAndObserveTransformNodeID(t.GetID())
        result = RegistrationOutputs(transform=t)
        result.warped = _volume_into(self.scene, outputs.warped, warped, f"{moving_name} warped")
        result.jacobian = _volume_into(self.scene, outputs.jacobian, jacobian, f"{moving_name} Jacobian")
        if structures:
            result.segmentation = add_segmentation_node(self.scene, structures, moving_grid,
                                                        f"{inputs.segmentation.GetName()} on {moving_name}",
                                                        outputs.segmentation)
        if dose is not None:
            result.dose = _volume_into(self.scene, outputs.dose, dose, f"{inputs.dose.GetName()} on {moving_name}")
            for name in inputs.dose.GetAttributeNames() or ():
                result.dose.SetAttribute(name, inputs.dose.GetAttribute(name))
            src_display, dst_display = inputs.dose.GetDisplayNode(), result.dose.GetDisplayNode()
            if src_display is not None and dst_display is not None and src_display.GetColorNodeID():
                dst_display.SetAndObserveColorNodeID(src_display.GetColorNodeID())
        result.table = add_table_node(self.scene, _flat_metrics(metrics), f"{moving_name} registration QA",
                                      outputs.table)
        result.maps = {name: _volume_into(self.scene, outputs.maps.get(name), vol,
                                          f"{moving_name} {name.replace('_', ' ')}") for name, vol in maps.items()}
        if matched is not None:
            fixed_pts, moving_pts, texts = matched
            labels = [f"Q{k + 1}" for k in range(len(fixed_pts))]
            result.query_points = outputs.query_points or self.scene.AddNewNodeByClass(
                "vtkMRMLMarkupsFiducialNode", f"{moving_name} query points")
            set_points(result.query_points, fixed_pts, labels, texts)
            result.matched_points = outputs.matched_points or self.scene.AddNewNodeByClass(
                "vtkMRMLMarkupsFiducialNode", f"{moving_name} matched points")
            set_points(result.matched_points, moving_pts, labels, texts)
            result.matched_points.SetAndObserveTransformNodeID(t.GetID())   # they sit on the moving image
        place_in_study(self.scene, inputs.fixed, [n for n in (result.transform, result.warped, result.jacobian,
                                                              result.segmentation, result.dose, result.table,
                                                              result.query_points, result.matched_points,
                                                              *result.maps.values()) if n])
        result.messages = list(metrics.get("messages", []))
        result.summary = method_summary(metrics)
        return result


def _read_matched_points(path) -> Tuple[np.ndarray, np.ndarray, List[str]]:
    """(fixed (N, 3), moving (N, 3) LPS mm, a description per point) from ``matched_points.csv``."""
    import csv
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    fixed = np.array([[float(r[f"fixed_{a}"]) for a in "xyz"] for r in rows]).reshape(-1, 3)
    moving = np.array([[float(r[f"moving_{a}"]) for a in "xyz"] for r in rows]).reshape(-1, 3)
    texts = [f"confidence {float(r['confidence']):.2f}, {'inlier' if r['inlier'] == '1' else 'outlier'}, "
             f"displacement ({float(r['dx_mm']):.1f}, {float(r['dy_mm']):.1f}, {float(r['dz_mm']):.1f}) mm LPS"
             for r in rows]
    return fixed, moving, texts


def _option_args(options: Dict[str, object]) -> List[str]:
    """Command-line flags of a run's options (the panel's choices)."""
    args: List[str] = []
    for key, flag in (("device", "--device"), ("prealign", "--prealign"), ("time_budget", "--time-budget"),
                      ("iterations", "--iterations"), ("working_spacing", "--working-spacing"),
                      ("seed", "--seed"), ("similarity", "--similarity"), ("network", "--network"),
                      ("global_features", "--global-features"), ("sam2_checkpoint", "--sam2-checkpoint"),
                      ("sam2_config", "--sam2-config"), ("reduction", "--reduction"),
                      ("glide_stages", "--glide-stages"), ("prior_weight", "--prior-weight")):
        if options.get(key) is not None:
            args += [flag, str(options[key])]
    if options.get("same_frame"):
        args.append("--same-frame")
    if options.get("refine") is False:
        args.append("--no-refine")
    if options.get("adapt") is False:
        args.append("--no-adapt")
    if options.get("inverse_consistency"):
        args.append("--inverse-consistency")
    if options.get("quiz_mode") is not None:
        args += ["--quiz-mode", str(options["quiz_mode"])]
    if options.get("clinical_inputs") is not None:
        args += ["--clinical-inputs", ",".join(options["clinical_inputs"])]
    return args


def method_summary(metrics: Dict) -> List[str]:
    """Lines for the panel's log: what the method's own QA says (the patch-wise MI means, when computed; the
    clinical inputs ProtonDIR used)."""
    qa = metrics.get("method_qa") or {}
    lines = []
    if "patch_mi_mean_after" in qa:
        lines.append(f"patch-wise MI (mean, nats): before {qa['patch_mi_mean_before']:.3f}, after pre-alignment "
                     f"{qa['patch_mi_mean_after_prealignment']:.3f}, after {qa['patch_mi_mean_after']:.3f} "
                     "(volumes 'patch mi before/after')")
    if "confident_inliers" in qa:
        lines.append(f"query-point matching: {qa['confident_inliers']} confident inliers of {qa['query_points']} "
                     f"points (mean confidence {qa['confidence_mean']:.2f}); rotation {qa['rotation_deg']:.1f} deg, "
                     "translation (" + ", ".join(f"{v:.1f}" for v in qa["translation_mm"]) + ") mm LPS")
    if "global_features" in qa and "ssd_after" in qa:
        lines.append(f"GlideReg: {qa['stages']} with global features {qa['global_features']} "
                     f"({qa['reduction']}); feature SSD after pre-alignment / convex / Adam: "
                     + "; ".join(f"{k} {qa['ssd_after_prealignment'][k]:.4f} / {qa['ssd_after_convex'][k]:.4f} / "
                                 f"{v:.4f}" for k, v in qa["ssd_after"].items()))
    if "clinical_inputs_used" in qa:
        lines.append("ProtonDIR: clinical inputs used by the network: "
                     + (", ".join(qa["clinical_inputs_used"]) or "none")
                     + (f"; refinement prior weight {qa['refinement_prior_weight']:g}"
                        if qa.get("refinement_prior_weight") else ""))
    if "iterations" in qa and "stopped_by" in qa:
        lines.append(f"optimisation: {qa['iterations']} iterations, stopped by {qa['stopped_by']}")
    return lines


def _moving_as_scanned(node) -> Volume:
    """The moving volume without an earlier result transform of ours (so Apply can run again)."""
    parent = node.GetParentTransformNode()
    ours = parent is not None and parent.GetAttribute("rtreg.direction") is not None
    return volume_from_node(node, with_parent_transform=not ours)


def _volume_into(scene, node, volume: Volume, name: str):
    if node is None:
        return add_volume_node(scene, volume, name)
    update_volume_node(node, volume)
    return node
