"""ProtonDIR: Deformable registration of the planning CT (fixed) and a repeat CT (moving) for adaptive proton therapy; carries the CTV and organs to the repeat CT and maps the planned dose.

Thin Slicer module: the widget collects nodes, the Logic (``rtreg.mrml.RegistrationLogic``) writes them to a
temporary folder, runs ``rtreg register`` out of process and loads the outputs. The Logic is importable with
the ``slicer-core`` wheel alone, so tests drive it on real MRML.
"""
import os
import sys

import slicer

_SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isdir(os.path.join(_SOURCE_ROOT, "rtreg")) and _SOURCE_ROOT not in sys.path:
    sys.path.insert(0, _SOURCE_ROOT)  # modules loaded from a source checkout (installed: rtreg sits beside them)

from rtreg import mrml  # noqa: E402

try:  # the Slicer application
    from slicer.ScriptedLoadableModule import ScriptedLoadableModule, ScriptedLoadableModuleTest
    from SlicerProtonDIRLib import describe_module, run_module_selftest
    from SlicerProtonDIRLib.widget import RegistrationWidget
except ImportError:  # slicer-core without the application: only the Logic is usable
    ScriptedLoadableModule = ScriptedLoadableModuleTest = RegistrationWidget = object


class ProtonDIR(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        describe_module(self.parent, "ProtonDIR", "Deformable registration of the planning CT (fixed) and a repeat CT (moving) for adaptive proton therapy; carries the CTV and organs to the repeat CT and maps the planned dose.")


class ProtonDIRWidget(RegistrationWidget):
    module_name = "ProtonDIR"
    method = "protondir"

    def setup(self):
        RegistrationWidget.setup(self)
        self.ui.planTextEdit.setPlainText(plan_text_from_scene())
        self.ui.segmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.fillRoles)
        self.ui.refineCheckBox.connect("toggled(bool)", self.ui.priorWeightSpinBox.setEnabled)  # refinement only
        self.fillRoles()

    def fillRoles(self, *_):
        """Offer the segments of the selected structure set for each role, prefilled from their names."""
        import qt
        seg = self.ui.segmentationSelector.currentNode()
        for combo in (self.ui.targetSegmentCombo, self.ui.bodySegmentCombo):
            combo.clear()
            combo.addItem("(none)", "")
        self.ui.oarSegmentList.clear()
        if seg is None:
            return
        target, oars, body = mrml.segment_roles(seg)
        segments = seg.GetSegmentation()
        for i in range(segments.GetNumberOfSegments()):
            sid = segments.GetNthSegmentID(i)
            name = segments.GetSegment(sid).GetName()
            self.ui.targetSegmentCombo.addItem(name, sid)
            self.ui.bodySegmentCombo.addItem(name, sid)
            item = qt.QListWidgetItem(name)
            item.setData(qt.Qt.UserRole, sid)
            item.setFlags(item.flags() | qt.Qt.ItemIsUserCheckable)
            item.setCheckState(qt.Qt.Checked if sid in oars else qt.Qt.Unchecked)
            self.ui.oarSegmentList.addItem(item)
        self.ui.targetSegmentCombo.setCurrentIndex(max(self.ui.targetSegmentCombo.findData(target or ""), 0))
        self.ui.bodySegmentCombo.setCurrentIndex(max(self.ui.bodySegmentCombo.findData(body or ""), 0))

    def inputs(self):
        import qt
        seg = self.ui.segmentationSelector.currentNode()
        oars = None
        if seg is not None:
            items = [self.ui.oarSegmentList.item(i) for i in range(self.ui.oarSegmentList.count)]
            oars = [it.data(qt.Qt.UserRole) for it in items if it.checkState() == qt.Qt.Checked]
        return mrml.RegistrationInputs(
            self.ui.fixedVolumeSelector.currentNode(), self.ui.movingVolumeSelector.currentNode(), seg,
            dose=self.ui.doseSelector.currentNode(), plan_text=self.ui.planTextEdit.toPlainText(),
            fixed_mask_segment=(self.ui.bodySegmentCombo.currentData or None) if seg else None,
            target_segment=(self.ui.targetSegmentCombo.currentData or None) if seg else None,
            oar_segments=oars)

    def options(self):
        return dict(RegistrationWidget.options(self), refine=self.ui.refineCheckBox.checked,
                    prior_weight=self.ui.priorWeightSpinBox.value)

    def outputs(self):
        out = RegistrationWidget.outputs(self)
        out.segmentation = self.ui.outputSegmentationSelector.currentNode()
        out.dose = self.ui.outputDoseSelector.currentNode()
        return out


class ProtonDIRLogic(mrml.RegistrationLogic):
    """GUI-free: ``process(RegistrationInputs, options, outputs, progress)`` on nodes."""

    def __init__(self, scene=None, python=None):
        mrml.RegistrationLogic.__init__(self, "protondir", scene, python)


class ProtonDIRTest(ScriptedLoadableModuleTest):
    def runTest(self):
        run_module_selftest(self, "protondir")


def plan_text_from_scene() -> str:
    """The summary of RT plans imported into the scene (SlicerRT), read from their DICOM files."""
    from rtreg.dicomrt import read_rtplan
    texts = []
    sh = slicer.mrmlScene.GetSubjectHierarchyNode()
    for node in slicer.util.getNodesByClass("vtkMRMLRTPlanNode"):
        uid = sh.GetItemUID(sh.GetItemByDataNode(node), "DICOM")
        path = slicer.dicomDatabase.fileForInstance(uid) if uid and slicer.dicomDatabase else ""
        if path:
            texts.append(read_rtplan(path).text())
    return "\n".join(texts)
