"""Slicer-side helpers shared by the four SlicerProtonDIR modules (the engine stays in ``rtreg``)."""


def describe_module(parent, title: str, help_text: str) -> None:
    """Fill a scripted module's description (title, category, contributors, help)."""
    parent.title = title
    parent.categories = ["Registration.SlicerProtonDIR"]
    parent.contributors = ["SlicerProtonDIR developers"]
    parent.helpText = (f"{help_text} The output transform holds the fixed->moving mapping as FromParent; the "
                       "moving volume is placed under it. See the extension README.")
    parent.acknowledgementText = "Engine: rtreg (SimpleITK, PyTorch, pydicom)."


def run_module_selftest(test, method: str = "io") -> None:
    """A module's self-test: clear the scene and register a generated phantom through the Logic."""
    import slicer

    from .selftest import run_phantom_selftest
    slicer.mrmlScene.Clear()
    run_phantom_selftest(slicer.mrmlScene, method, test.delayDisplay)
