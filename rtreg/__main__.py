"""``python -m rtreg`` is ``rtreg``."""
import sys

from .cli import main

sys.exit(main())
