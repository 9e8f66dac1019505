"""The canonical core is tested once, here; the copies in the folders are checked to be identical."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
