"""TTORegister: General deformable registration for any modality pair, by test-time optimisation of a distilled network, with a patch-wise mutual-information QA map.

Thin Slicer module: the widget collects nodes, the Logic (``rtreg.mrml.RegistrationLogic``) writes them to a
temporary folder, runs ``rtreg register`` out of process and loads the outputs. The Logic is importable with
the ``slicer-core`` wheel alone, so tests drive it on real MRML.
"""
import os
import sys


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


class TTORegister(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        describe_module(self.parent, "TTORegister", "General deformable registration for any modality pair, by test-time optimisation of a distilled network, with a patch-wise mutual-information QA map.")


class TTORegisterWidget(RegistrationWidget):
    module_name = "TTORegister"
    method = "tto"

    # modality pair -> similarity of the test-time optimisation (ncc: multi-axis MI + local NCC; mi: MI alone)
    PRESETS = [("CT to CT", "ncc"), ("MR to CT", "mi"), ("CBCT to CT", "mi"), ("PET to CT", "mi"),
               ("MR to MR, same contrast", "ncc"), ("DCE-MRI series (contrast changes)", "mi")]

    def setup(self):
        RegistrationWidget.setup(self)
        for label, similarity in self.PRESETS:
            self.ui.modalityPresetCombo.addItem(label, similarity)
        self.ui.seriesSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateApplyButton)

    def updateApplyButton(self, *_):
        RegistrationWidget.updateApplyButton(self)
        if self.ui.seriesSelector.currentNode() is not None and self.run is None:
            self.ui.applyButton.enabled = True
            self.ui.applyButton.toolTip = "Register every frame of the series to the reference frame"

    def inputs(self):
        return mrml.RegistrationInputs(self.ui.fixedVolumeSelector.currentNode(),
                                       self.ui.movingVolumeSelector.currentNode(),
                                       self.ui.segmentationSelector.currentNode())

    def options(self):
        opts = RegistrationWidget.options(self)
        opts.update(similarity=self.ui.modalityPresetCombo.currentData, time_budget=self.ui.timeBudgetSpinBox.value,
                    iterations=self.ui.iterationsSpinBox.value, adapt=self.ui.adaptCheckBox.checked)
        return opts

    def outputs(self):
        out = RegistrationWidget.outputs(self)
        out.segmentation = self.ui.outputSegmentationSelector.currentNode()
        return out

    def startRun(self):
        self._series = self.ui.seriesSelector.currentNode()
        if self._series is None:
            return RegistrationWidget.startRun(self)
        return self.logic.start_series(self._series, self.ui.referenceFrameSpinBox.value, self.options())

    def finishRun(self, out):
        if self._series is None:
            return RegistrationWidget.finishRun(self, out)
        corrected = self.logic.load_series(out, self._series)
        self.log(f"Done: {corrected.GetName()} holds every frame registered to frame "
                 f"{self.ui.referenceFrameSpinBox.value}.")


class TTORegisterLogic(mrml.RegistrationLogic):
    """GUI-free: ``process(RegistrationInputs, options, outputs, progress)`` on nodes, and
    ``process_series(sequence, reference, options)`` for a 4D series."""

    def __init__(self, scene=None, python=None):
        mrml.RegistrationLogic.__init__(self, "tto", scene, python)


class TTORegisterTest(ScriptedLoadableModuleTest):
    def runTest(self):
        run_module_selftest(self, "tto")
