"""rtreg: the registration engine of SlicerProtonDIR.

World coordinates are LPS millimetres everywhere in the engine (DICOM/ITK).
A displacement field lives on the fixed (planning) image grid and maps a fixed
point x to the moving (repeat) point x + u(x); see ``rtreg.field``.
"""
__version__ = "0.1.0"
