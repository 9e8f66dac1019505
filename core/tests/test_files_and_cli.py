"""Atomic writes, safe loading and one-line command-line errors."""

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core import cli, files
from core.errors import UserError

ROOT = Path(__file__).resolve().parents[2]


class Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_load_weights_only_refuses_pickled_code(tmp_path):
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps(Evil()))
    os.chdir(tmp_path)
    with pytest.raises(UserError, match="cannot load weights"):
        files.load_weights_only(evil, "weights")
    assert not (tmp_path / "pwned").exists()


def test_atomic_save_and_stale_temporaries(tmp_path):
    files.atomic_save({"a": torch.ones(2)}, tmp_path / "x.pt")
    assert files.load_weights_only(tmp_path / "x.pt")["a"].sum() == 2
    (tmp_path / ".x.pt.tmp-123").write_bytes(b"partial")
    assert files.clean_temporaries(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.pt"]


def test_writable_checks(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        cli.ensure_writable_dir(tmp_path / "file", "--output_dir")
    with pytest.raises(UserError, match="not writable"):
        cli.ensure_writable_dir(tmp_path / "file" / "sub", "--output_dir")
    assert cli.ensure_writable_dir(tmp_path / "new" / "deep", "--output_dir").is_dir()


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--lr", "-1", "must be a number > 0"),
        ("--lr", "nan", "finite"),
        ("--steps", "0", "an integer >= 1"),
        ("--steps", "2.5", "expected an integer"),
        ("--fraction", "1", "[0, 1)"),
    ],
)
def test_parse_time_checks_are_one_line(flag, value, message):
    code = (
        "from core import cli\n"
        "p = cli.Parser(prog='x')\n"
        "p.add_argument('--lr', type=cli.positive_float)\n"
        "p.add_argument('--steps', type=cli.positive_int)\n"
        "p.add_argument('--fraction', type=cli.fraction)\n"
        "import sys; p.parse_args(sys.argv[1:])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, flag, value], cwd=ROOT, capture_output=True, text=True
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and message in lines[0]
