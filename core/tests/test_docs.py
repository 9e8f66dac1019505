"""Every folder's README pair exists and its generated flag tables match the scripts' --help."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = ("ddpm", "ldm", "controlnet", "dit", "evaluation")


@pytest.mark.parametrize("folder", FOLDERS)
def test_flag_tables_are_fresh(folder):
    readmes = [ROOT / folder / "README.md", ROOT / folder / "README_zh.md"]
    for readme in readmes:
        assert readme.is_file(), f"{readme} is missing"
        assert "<!-- flags: " in readme.read_text(encoding="utf-8"), f"{readme} has no generated flag table"
    check = subprocess.run(
        [sys.executable, "-m", "core.flagdocs", "--check", *map(str, readmes)],
        cwd=ROOT / folder,
        capture_output=True,
        text=True,
        env={"HF_HUB_OFFLINE": "1", "PATH": ""},
        timeout=300,
    )
    assert check.returncode == 0, check.stderr[-3000:] + "\nrun `make docs` to regenerate the tables"
