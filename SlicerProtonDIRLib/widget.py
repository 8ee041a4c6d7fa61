"""The panel behaviour the four modules share: inputs, device, Apply/Cancel, progress, outputs.

Only used inside the Slicer application (qt, ctk); the node-level work is in ``rtreg.mrml``.
"""
from __future__ import annotations

import qt
import slicer
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleWidget
from slicer.util import VTKObservationMixin

from rtreg import mrml

from .environment import ENGINE_REQUIREMENTS, gpu_listed, missing_requirements, python_executable

PREALIGN = [("Rigid (recommended)", "rigid"), ("Affine", "affine"), ("Centre of mass", "com"),
            ("Principal axes", "moments"), ("QuizRigid (large pose or field-of-view differences)", "quiz"),
            ("None (same scanner coordinates)", "none")]


class RegistrationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Subclasses set ``module_name`` and ``method`` (the engine method the panel runs) and may extend
    ``options()`` / ``inputs()``."""

    module_name = ""
    method = "io"

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.run = None
        self.timer = None

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        ui_widget = slicer.util.loadUI(self.resourcePath(f"UI/{self.module_name}.ui"))
        self.layout.addWidget(ui_widget)
        self.ui = slicer.util.childWidgetVariables(ui_widget)
        ui_widget.setMRMLScene(slicer.mrmlScene)
        for selector in slicer.util.findChildren(ui_widget, className="qMRMLNodeComboBox"):
            selector.setMRMLScene(slicer.mrmlScene)
        self.ui.deviceCombo.addItem("Auto", "auto")
        self.ui.deviceCombo.addItem("CPU", "cpu")
        if gpu_listed():
            self.ui.deviceCombo.addItem("GPU (CUDA)", "cuda")
        for label, value in PREALIGN:
            self.ui.prealignCombo.addItem(label, value)
        for selector in (self.ui.fixedVolumeSelector, self.ui.movingVolumeSelector):
            selector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateApplyButton)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.updateApplyButton()

    def cleanup(self):
        self.cancelRun()
        self.removeObservers()

    def updateApplyButton(self, *_):
        ready = bool(self.ui.fixedVolumeSelector.currentNode() and self.ui.movingVolumeSelector.currentNode())
        self.ui.applyButton.enabled = ready or self.run is not None
        self.ui.applyButton.toolTip = "Register the moving (repeat) image to the fixed (planning) image" if ready \
            else "Select a fixed and a moving volume"

    # -- what subclasses extend
    def inputs(self) -> mrml.RegistrationInputs:
        return mrml.RegistrationInputs(self.ui.fixedVolumeSelector.currentNode(),
                                       self.ui.movingVolumeSelector.currentNode())

    def options(self) -> dict:
        return {"device": self.ui.deviceCombo.currentData, "prealign": self.ui.prealignCombo.currentData}

    def outputs(self) -> mrml.RegistrationOutputs:
        return mrml.RegistrationOutputs(transform=self.ui.outputTransformSelector.currentNode(),
                                        warped=self.ui.outputVolumeSelector.currentNode())

    def startRun(self):
        """Start the engine on the panel's inputs; returns the running CliRun (subclasses may run another
        command, e.g. a 4D series)."""
        self._inputs, self._outputs = self.inputs(), self.outputs()
        return self.logic.start(self._inputs, self.options())

    def finishRun(self, out):
        """Load a finished run's outputs from the folder ``out`` and log what the engine said."""
        result = self.logic.load(out, self._inputs, self._outputs)
        self.ui.outputTransformSelector.setCurrentNode(result.transform)
        self.ui.outputVolumeSelector.setCurrentNode(result.warped)
        for message in result.messages:
            self.log(f"Note: {message}")
        for line in result.summary:
            self.log(line)
        self.log("Done. The transform holds the fixed->moving mapping (FromParent); the moving volume is "
                 "placed under it.")

    # -- running
    def onApplyButton(self):
        if self.run is not None:
            self.cancelRun()
            self.log("Cancelled.")
            return
        with slicer.util.tryWithErrorDisplay("Registration could not start.", waitCursor=True):
            if not self.ensureRequirements():
                return
            self.logic = mrml.RegistrationLogic(self.method, slicer.mrmlScene, python_executable())
            self.run = self.startRun()
            self.log("Running: " + " ".join(self.run.command))
            self.ui.applyButton.text = "Cancel"
            self.ui.progressBar.value = 0
            self.timer = qt.QTimer()
            self.timer.setInterval(200)
            self.timer.connect("timeout()", self.poll)
            self.timer.start()

    def poll(self):
        code = self.run.poll(self.onProgress)
        if code is None:
            return
        self.timer.stop()
        run, self.run = self.run, None
        self.ui.applyButton.text = "Apply"
        try:
            run.result()
            self.finishRun(run.out)
        except Exception as exc:  # noqa: BLE001 - RunFailed or a load error: shown, scene left as it was
            slicer.util.errorDisplay(f"Registration failed: {exc}")
            self.log(f"Failed: {exc}")
        finally:
            run.cleanup()
            self.updateApplyButton()

    def onProgress(self, fraction: float, message: str):
        self.ui.progressBar.value = int(100 * fraction)
        self.log(message)

    def cancelRun(self):
        if self.timer is not None:
            self.timer.stop()
        if self.run is not None:
            self.run.cancel()
            self.run = None
        if hasattr(self, "ui"):
            self.ui.applyButton.text = "Apply"
            self.updateApplyButton()

    def log(self, text: str):
        self.ui.statusLog.appendPlainText(text)

    def ensureRequirements(self) -> bool:
        """torch from the PyTorch extension, the rest with pip, each only after the user agrees."""
        missing = missing_requirements()
        if not missing:
            return True
        if not slicer.util.confirmOkCancelDisplay(
                f"Registration needs {', '.join(missing)}, which is not installed. Install now? "
                "(PyTorch comes from the PyTorch extension; this can take several minutes.)"):
            return False
        if "torch" in missing:
            try:
                import PyTorchUtils
            except ImportError:
                slicer.util.errorDisplay("Install the PyTorch extension from the Extensions Manager, restart "
                                         "Slicer, then press Apply again.")
                return False
            if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False) is None:
                return False
        others = [ENGINE_REQUIREMENTS[n] for n in missing if n in ENGINE_REQUIREMENTS]
        if others:
            slicer.util.pip_install(" ".join(others))
        return True
