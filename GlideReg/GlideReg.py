"""GlideReg: Global-to-local deformable registration with learned global and MIND local features, convex optimisation and Adam refinement.

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


class GlideReg(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        describe_module(self.parent, "GlideReg", "Global-to-local deformable registration with learned global and MIND local features, convex optimisation and Adam refinement.")


class GlideRegWidget(RegistrationWidget):
    module_name = "GlideReg"
    method = "glide"
    FEATURES = [("Learned (shipped 3D encoder)", "learned"), ("SAM2 slices (your checkpoint)", "sam2"),
                ("None (local MIND-SSC only)", "none")]
    REDUCTIONS = [("VAE, optimised with the registration", "vae"), ("PCA", "pca")]

    def setup(self):
        RegistrationWidget.setup(self)
        for label, value in self.FEATURES:
            self.ui.globalFeaturesCombo.addItem(label, value)
        for label, value in self.REDUCTIONS:
            self.ui.reductionCombo.addItem(label, value)

    def inputs(self):
        return mrml.RegistrationInputs(self.ui.fixedVolumeSelector.currentNode(),
                                       self.ui.movingVolumeSelector.currentNode(),
                                       self.ui.segmentationSelector.currentNode())

    def options(self):
        opts = RegistrationWidget.options(self)
        opts.update(global_features=self.ui.globalFeaturesCombo.currentData,
                    sam2_checkpoint=self.ui.sam2CheckpointPathLineEdit.currentPath or None,
                    reduction=self.ui.reductionCombo.currentData,
                    inverse_consistency=self.ui.inverseConsistencyCheckBox.checked)
        return opts

    def finishRun(self, out):
        RegistrationWidget.finishRun(self, out)
        self.log("GlideReg's QA (feature SSD after pre-alignment, after the convex stage and after Adam) is in the "
                 "table; a fallback to local features, when one happened, is in the messages above.")

    def outputs(self):
        out = RegistrationWidget.outputs(self)
        out.segmentation = self.ui.outputSegmentationSelector.currentNode()
        return out


class GlideRegLogic(mrml.RegistrationLogic):
    """GUI-free: ``process(RegistrationInputs, options, outputs, progress)`` on nodes."""

    def __init__(self, scene=None, python=None):
        mrml.RegistrationLogic.__init__(self, "glide", scene, python)


class GlideRegTest(ScriptedLoadableModuleTest):
    def runTest(self):
        run_module_selftest(self, "glide")
