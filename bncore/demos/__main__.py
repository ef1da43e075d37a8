"""``python -m bncore.demos ARGS`` is ``python -m bncore demo ARGS``."""
import sys

from . import main

sys.exit(main())
