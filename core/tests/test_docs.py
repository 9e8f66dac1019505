"""Every folder's README pair exists, documents each entry script's flags, and its generated flag tables
match the scripts' parsers (run `make docs` after changing a flag)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = ("ddpm", "ldm", "controlnet", "dit", "evaluation")


def entry_scripts(folder):
    """The folder's scripts with a flag table of their own (benchmarks are documented in prose)."""
    return sorted(
        path.name
        for path in (ROOT / folder).glob("*.py")
        if path.name != "bench.py" and "\ndef build_parser(" in path.read_text(encoding="utf-8")
    )


@pytest.mark.parametrize("folder", FOLDERS)
def test_every_entry_script_has_a_table_in_both_languages(folder):
    scripts = entry_scripts(folder)
    assert scripts, f"{folder} has no script with build_parser()"
    for name in ("README.md", "README_zh.md"):
        readme = ROOT / folder / name
        assert readme.is_file(), f"{readme} is missing"
        tables = set(re.findall(r"<!-- flags: ([\w./-]+) -->", readme.read_text(encoding="utf-8")))
        assert tables == set(scripts), f"{readme}: tables for {sorted(tables)}, scripts {scripts}"


@pytest.mark.parametrize("folder", FOLDERS)
def test_flag_tables_are_fresh(folder):
    readmes = [ROOT / folder / "README.md", ROOT / folder / "README_zh.md"]
    check = subprocess.run(
        [sys.executable, "-m", "core.flagdocs", "--check", *map(str, readmes)],
        cwd=ROOT / folder,
        capture_output=True,
        text=True,
        env={"HF_HUB_OFFLINE": "1", "PATH": ""},
        timeout=300,
    )
    assert check.returncode == 0, check.stderr[-3000:] + "\nrun `make docs` to regenerate the tables"


def test_a_changed_flag_makes_the_table_stale(tmp_path):
    """The check can fail: a README whose table lacks a flag is reported, and make docs repairs it."""
    folder = tmp_path / "tool"
    (folder / "core").mkdir(parents=True)
    for module in (ROOT / "core").glob("*.py"):
        (folder / "core" / module.name).write_bytes(module.read_bytes())
    (folder / "tool.py").write_text(
        "from core.cli import Parser\n\n\ndef build_parser():\n    parser = Parser()\n"
        "    parser.add_argument('--data_root', '--dataset_path', help='images')\n    return parser\n"
    )
    readme = folder / "README.md"
    readme.write_text("# tool\n<!-- flags: tool.py -->\n| old |\n<!-- /flags -->\n")
    run = [sys.executable, "-m", "core.flagdocs"]
    stale = subprocess.run([*run, "--check", "README.md"], cwd=folder, capture_output=True, text=True)
    assert stale.returncode == 1 and "stale in README.md" in stale.stderr
    subprocess.run([*run, "README.md"], cwd=folder, check=True)
    text = readme.read_text()
    assert "| `--data_root` | `--data-root` `--dataset_path` `--dataset-path` |  | images |" in text
    assert subprocess.run([*run, "--check", "README.md"], cwd=folder).returncode == 0
