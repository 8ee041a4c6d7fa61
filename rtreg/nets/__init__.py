"""Network definitions shared by the methods (torch)."""
