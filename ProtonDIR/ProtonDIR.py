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
    method = "io"
    pending_method = "ProtonDIR (the clinically informed learned method)"

    def setup(self):
        RegistrationWidget.setup(self)
        self.ui.planTextEdit.setPlainText(plan_text_from_scene())

    def inputs(self):
        seg = self.ui.segmentationSelector.currentNode()
        body = self.ui.bodySegmentEdit.text.strip() if seg else ""
        has_body = bool(seg and body and seg.GetSegmentation().GetSegmentIdBySegmentName(body))
        return mrml.RegistrationInputs(
            self.ui.fixedVolumeSelector.currentNode(), self.ui.movingVolumeSelector.currentNode(), seg,
            dose=self.ui.doseSelector.currentNode(), plan_text=self.ui.planTextEdit.toPlainText(),
            fixed_mask_segment=seg.GetSegmentation().GetSegmentIdBySegmentName(body) if has_body else None)

    def outputs(self):
        out = RegistrationWidget.outputs(self)
        out.segmentation = self.ui.outputSegmentationSelector.currentNode()
        out.dose = self.ui.outputDoseSelector.currentNode()
        return out


class ProtonDIRLogic(mrml.RegistrationLogic):
    """GUI-free: ``process(RegistrationInputs, options, outputs, progress)`` on nodes."""

    def __init__(self, scene=None, python=None):
        mrml.RegistrationLogic.__init__(self, "io", scene, python)


class ProtonDIRTest(ScriptedLoadableModuleTest):
    def runTest(self):
        run_module_selftest(self)


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
