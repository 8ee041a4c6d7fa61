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
    method = "io"
    pending_method = "GlideReg (global-to-local instance optimisation)"

    def inputs(self):
        return mrml.RegistrationInputs(self.ui.fixedVolumeSelector.currentNode(),
                                       self.ui.movingVolumeSelector.currentNode(),
                                       self.ui.segmentationSelector.currentNode())

    def outputs(self):
        out = RegistrationWidget.outputs(self)
        out.segmentation = self.ui.outputSegmentationSelector.currentNode()
        return out


class GlideRegLogic(mrml.RegistrationLogic):
    """GUI-free: ``process(RegistrationInputs, options, outputs, progress)`` on nodes."""

    def __init__(self, scene=None, python=None):
        mrml.RegistrationLogic.__init__(self, "io", scene, python)


class GlideRegTest(ScriptedLoadableModuleTest):
    def runTest(self):
        run_module_selftest(self)
