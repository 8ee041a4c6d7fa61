"""QuizRigid: Rigid pre-alignment for large pose and field-of-view differences (CT vs CBCT, EBRT vs brachytherapy CT) by query-point matching.

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


class QuizRigid(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        describe_module(self.parent, "QuizRigid", "Rigid pre-alignment for large pose and field-of-view differences (CT vs CBCT, EBRT vs brachytherapy CT) by query-point matching.")


class QuizRigidWidget(RegistrationWidget):
    module_name = "QuizRigid"
    method = "quiz"
    MODES = [("Rigid (robust fit of the matched points)", "rigid"), ("Translation only (mean displacement)",
                                                                     "translation")]

    def setup(self):
        RegistrationWidget.setup(self)
        self.ui.prealignCombo.enabled = False     # QuizRigid is itself the pre-alignment
        self.ui.prealignCombo.toolTip = "QuizRigid is the pre-alignment; the other modules offer it as a choice"
        for label, mode in self.MODES:
            self.ui.quizModeCombo.addItem(label, mode)

    def inputs(self):
        return mrml.RegistrationInputs(self.ui.fixedVolumeSelector.currentNode(),
                                       self.ui.movingVolumeSelector.currentNode(),
                                       query_points=self.ui.queryPointsSelector.currentNode())

    def options(self):
        opts = RegistrationWidget.options(self)
        opts.pop("prealign")
        opts.update(quiz_mode=self.ui.quizModeCombo.currentData, refine=self.ui.refineCheckBox.checked)
        return opts

    def finishRun(self, out):
        RegistrationWidget.finishRun(self, out)
        self.log("The query points (fixed image) and the matched points (moving image, under the transform) are "
                 "markups; each point's description gives its confidence and displacement.")


class QuizRigidLogic(mrml.RegistrationLogic):
    """GUI-free: ``process(RegistrationInputs, options, outputs, progress)`` on nodes."""

    def __init__(self, scene=None, python=None):
        mrml.RegistrationLogic.__init__(self, "quiz", scene, python)


class QuizRigidTest(ScriptedLoadableModuleTest):
    def runTest(self):
        run_module_selftest(self, "quiz")
