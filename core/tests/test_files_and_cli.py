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


def config_parser():
    parser = cli.Parser(prog="train.py")
    parser.add_argument("--config", help=cli.CONFIG_HELP)
    parser.add_argument("--learning_rate", "--lr", type=cli.positive_float, default=1e-4)
    parser.add_argument("--objective", default="ddpm", choices=("ddpm", "vp"))
    parser.add_argument("--hflip", action="store_true")
    parser.add_argument("--sizes", type=int, nargs="+")
    return parser


def test_config_file_sets_flags_and_typed_flags_override_it(tmp_path):
    path = tmp_path / "vp.yaml"
    path.write_text("objective: vp\nlearning-rate: 2.0e-4\nhflip: true\nsizes: [8, 16]\n")
    parser = config_parser()
    args = parser.parse_args(["--config", str(path)])
    assert (args.objective, args.learning_rate, args.hflip, args.sizes) == ("vp", 2e-4, True, [8, 16])
    args = parser.parse_args([f"--config={path}", "--lr", "3e-4"])
    assert args.learning_rate == 3e-4 and args.objective == "vp"
    # Keys of the file count as typed, so that a resumed run takes them over the checkpoint's values.
    assert {"objective", "learning_rate", "hflip"} <= cli.explicit_flags(parser, ["--config", str(path)])
    path.write_text("hflip: false\n")
    assert parser.parse_args(["--config", str(path)]).hflip is False


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("objective: [vp\n", "is not valid YAML"),
        ("- vp\n", "must be a mapping of flag names"),
        ("objectiv: vp\n", "'objectiv' is not a flag of train.py"),
        ("hflip: 1\n", "hflip is a switch, give it true or false"),
        ("objective: ve\n", "invalid choice: 've'"),
        ("learning_rate: -1\n", "must be a number > 0"),
        (None, "cannot be read"),
    ],
)
def test_bad_config_files_are_one_line(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    if text is not None:
        path.write_text(text)
    code = (
        "import sys\n"
        "from core.errors import run_cli\n"
        "from core.tests.test_files_and_cli import config_parser\n"
        "run_cli(lambda: config_parser().parse_args(sys.argv[1:]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, "--config", str(path)], cwd=ROOT, capture_output=True, text=True
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and message in lines[0]
