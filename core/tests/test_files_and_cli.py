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
    torch.save({"model": Evil()}, evil)  # a real torch file whose pickle would call os.system
    os.chdir(tmp_path)
    with pytest.raises(UserError, match="cannot load weights .* safely: it holds a pickled posix.system"):
        files.load_weights_only(evil, "weights")
    for name, content in [
        ("garbage.pt", b"not a checkpoint"),
        ("evil4.pt", pickle.dumps(Evil(), protocol=4)),
    ]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(UserError, match="it is not a PyTorch file"):
            files.load_weights_only(tmp_path / name, "weights")
    assert not (tmp_path / "pwned").exists()


def test_atomic_save_and_stale_temporaries(tmp_path):
    files.atomic_save({"a": torch.ones(2)}, tmp_path / "x.pt")
    assert files.load_weights_only(tmp_path / "x.pt")["a"].sum() == 2
    (tmp_path / ".x.pt.tmp-123").write_bytes(b"partial")
    (tmp_path / ".x.pt.tmp456").write_bytes(b"partial, older spelling")
    assert files.clean_temporaries(tmp_path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.pt"]


def test_writable_checks(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        cli.ensure_writable_dir(tmp_path / "file", "--output_dir")
    with pytest.raises(UserError, match="not writable"):
        cli.ensure_writable_dir(tmp_path / "file" / "sub", "--output_dir")
    assert cli.ensure_writable_dir(tmp_path / "new" / "deep", "--output_dir").is_dir()
    with pytest.raises(UserError, match="--json .*out.json cannot be written: .*file is a file"):
        cli.ensure_writable_file(tmp_path / "file" / "out.json", "--json")
    with pytest.raises(UserError, match="is a folder"):
        cli.ensure_writable_file(tmp_path / "new", "--json")
    assert cli.ensure_writable_file(tmp_path / "a" / "b.json", "--json").parent.is_dir()


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
