"""Shared pytest setup: make the test helpers (tests/analytic.py) importable."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
