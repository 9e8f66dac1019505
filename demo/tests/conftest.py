"""The demo's scripts import each other by plain name, as Python allows when they run as scripts."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
