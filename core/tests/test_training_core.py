"""The shared training pieces: checkpoints, RNG, EMA, split, guidance, flags, data sets, grids."""

import random
import signal
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core import checkpoints, cli, datasets, flagdocs, guidance, images, training
from core.errors import UserError


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    generator = torch.Generator().manual_seed(3)
    checkpoints.save({"rng": checkpoints.rng_state(generator)}, tmp_path / "c.pt")
    expected = (
        random.random(),
        np.random.rand(),
        torch.rand(1).item(),
        torch.rand(1, generator=generator).item(),
    )
    random.random(), np.random.rand(), torch.rand(1)
    state = checkpoints.load(tmp_path / "c.pt")["rng"]
    checkpoints.set_rng_state(state, generator)
    again = (
        random.random(),
        np.random.rand(),
        torch.rand(1).item(),
        torch.rand(1, generator=generator).item(),
    )
    assert again == expected


def test_set_rng_state_reads_the_older_list_encoding():
    name, keys, pos, has_gauss, cached = np.random.get_state()
    old = checkpoints.rng_state()
    old["numpy"] = [name, keys.tolist(), pos, has_gauss, cached]
    old["python"] = list(random.getstate())
    expected = np.random.rand()
    checkpoints.set_rng_state(old)
    assert np.random.rand() == expected


def test_prune_keeps_the_newest_by_number(tmp_path):
    for step in (5, 40, 300, 1000):
        (tmp_path / f"checkpoint_epoch_{step}.pt").write_bytes(b"x")
    removed = checkpoints.prune(tmp_path, "checkpoint_epoch_*.pt", 2)
    assert sorted(p.name for p in removed) == ["checkpoint_epoch_40.pt", "checkpoint_epoch_5.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint_epoch_1000.pt",
        "checkpoint_epoch_300.pt",
    ]
    assert checkpoints.prune(tmp_path, "checkpoint_epoch_*.pt", None) == []


def test_find_resume(tmp_path):
    (tmp_path / "0000010.pt").write_bytes(b"x")
    (tmp_path / "0000200.pt").write_bytes(b"x")
    assert checkpoints.find_resume(tmp_path, "latest.pt", "*.pt").name == "0000200.pt"
    (tmp_path / "latest.pt").write_bytes(b"x")
    assert checkpoints.find_resume(tmp_path, "latest.pt", "*.pt").name == "latest.pt"
    assert checkpoints.find_resume(tmp_path / "0000010.pt", "latest.pt") == tmp_path / "0000010.pt"
    with pytest.raises(UserError, match="does not exist"):
        checkpoints.find_resume(tmp_path / "missing", "latest.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no latest.pt"):
        checkpoints.find_resume(tmp_path / "empty", "latest.pt")


def test_plain_config_loads_weights_only(tmp_path):
    config = checkpoints.plain({"path": tmp_path, "sizes": (1, 2), "nested": {"a": None}})
    assert config == {"path": str(tmp_path), "sizes": [1, 2], "nested": {"a": None}}
    checkpoints.save(config, tmp_path / "c.pt")
    assert checkpoints.load(tmp_path / "c.pt") == config


def test_ema_follows_the_model_at_its_decay():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    ema = training.EMA(model, decay=0.75, start_step=2)
    start = ema.model[0].weight.clone()
    with torch.no_grad():
        model[0].weight.add_(4.0)
        model[1].running_mean.fill_(3.0)
    ema.update(model, step=0)  # warm-up: a plain copy
    assert torch.equal(ema.model[0].weight, model[0].weight)
    with torch.no_grad():
        model[0].weight.add_(4.0)
    ema.update(model, step=5)
    assert torch.allclose(ema.model[0].weight, 0.75 * (start + 4) + 0.25 * (start + 8))
    assert torch.equal(ema.model[1].running_mean, model[1].running_mean)
    assert set(ema.state_dict()) == set(model.state_dict())
    assert not any(p.requires_grad for p in ema.model.parameters())


def test_split_heldout_is_fixed_disjoint_and_never_empty():
    train, held = training.split_heldout(10, 0.2, seed=1)
    assert training.split_heldout(10, 0.2, seed=1) == (train, held)
    assert len(held) == 2 and sorted(train + held) == list(range(10))
    assert len(training.split_heldout(10, 0.01)[1]) == 1
    assert training.split_heldout(10, 0.0) == (list(range(10)), [])
    assert training.split_heldout(1, 0.5) == ([0], [])


def test_guidance_scales():
    calls = []

    def model(x, t, y):
        calls.append(len(x))
        return x * 0 + y[:, None].float()

    x, t = torch.zeros(3, 1), torch.zeros(3)
    labels, null = torch.tensor([2, 2, 2]), torch.tensor([0, 0, 0])
    assert torch.equal(guidance.guided(model, x, t, labels, null, 0.0), torch.zeros(3, 1))
    assert torch.equal(guidance.guided(model, x, t, labels, null, 1.0), torch.full((3, 1), 2.0))
    assert torch.equal(guidance.guided(model, x, t, labels, null, 3.0), torch.full((3, 1), 6.0))
    assert calls == [3, 3, 6]  # one half only at 0 and 1, both halves as one batch otherwise


def test_parser_accepts_both_spellings_and_aliases(capsys):
    parser = cli.Parser(prog="train.py")
    parser.add_argument("--data_root", "--dataset_path", "--data-path", default="d", help="data")
    parser.add_argument("--mixed_precision", "--precision", type=cli.mixed_precision, default="no", help="p")
    for argv in (["--data-root", "x"], ["--dataset-path", "x"], ["--data_path", "x"]):
        assert parser.parse_args(argv).data_root == "x"
    assert parser.parse_args(["--precision", "fp32"]).mixed_precision == "no"
    assert parser.parse_args(["--mixed-precision", "bf16"]).mixed_precision == "bf16"
    with pytest.raises(SystemExit) as stop:
        parser.parse_args(["--data", "x"])  # no abbreviations
    assert stop.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert cli.explicit_flags(parser, ["--data-path", "x"]) == {"data_root"}


def test_flag_table_lists_canonical_names_aliases_and_defaults():
    parser = cli.Parser(prog="p")
    parser.add_argument("--num_epochs", "--epochs", type=int, default=7, help="passes (default %(default)s)")
    table = cli.flag_table(parser)
    row = next(line for line in table.splitlines() if "num_epochs`" in line)
    assert row == "| `--num_epochs` | `--num-epochs` `--epochs` | `7` | passes (default 7) |"
    assert "--help" not in table


def test_help_shows_each_default_once_and_none_for_unset_flags():
    parser = cli.Parser(prog="p")
    parser.add_argument("--steps", type=int, default=50, help="sampling steps")
    parser.add_argument("--eta", type=float, default=0.0, help="noise (default: %(default)s)")
    parser.add_argument("--resume", default=None, help="checkpoint")
    parser.add_argument("--compile", action="store_true", help="torch.compile")
    parser.add_argument("--warmup", type=int, default=0, help="warm-up steps")
    parser.add_argument("--prefix", default="", help="file-name prefix")
    text = " ".join(parser.format_help().split())
    assert "sampling steps (default: 50)" in text
    assert "warm-up steps (default: 0)" in text  # a zero default is still shown
    assert "file-name prefix (default" not in text
    assert text.count("(default: 0.0)") == 1
    assert "checkpoint (default" not in text and "torch.compile (default" not in text
    table = cli.flag_table(parser)
    assert "| `--steps` | `--steps` |" not in table and "| `50` | sampling steps |" in table


def test_flagdocs_rewrites_and_checks_tables(tmp_path):
    (tmp_path / "tool.py").write_text(
        textwrap.dedent(
            """
            from core import cli

            def build_parser():
                parser = cli.Parser(prog="tool.py")
                parser.add_argument("--size", type=int, default=3, help="how big")
                return parser
            """
        )
    )
    readme = tmp_path / "README.md"
    readme.write_text("# Tool\n<!-- flags: tool.py -->\nold\n<!-- /flags -->\nend\n")
    assert flagdocs.main(["--check", str(readme)]) == 1
    assert flagdocs.main([str(readme)]) == 0
    assert "| `--size` |  | `3` | how big |" in readme.read_text()
    assert flagdocs.main(["--check", str(readme)]) == 0


def test_class_folders_and_errors(tmp_path):
    for name in ("b", "a"):
        (tmp_path / name).mkdir()
        Image.new("L", (4, 4)).save(tmp_path / name / "x.PNG")
    (tmp_path / ".hidden").mkdir()
    names, files, labels = datasets.class_folders(tmp_path)
    assert names == ["a", "b"] and labels == [0, 1] and files[0].name == "x.PNG"
    assert len(datasets.image_folder(tmp_path)) == 2
    (tmp_path / "c").mkdir()
    with pytest.raises(UserError, match="holds no images"):
        datasets.class_folders(tmp_path)
    with pytest.raises(UserError, match="is not a folder"):
        datasets.class_folders(tmp_path / "missing", flag="--data_path")


def test_grid_keeps_gray_and_the_bit_depth(tmp_path):
    samples = torch.rand(4, 1, 8, 8)
    rule = {"kind": "integer", "bit_depth": 16}
    grid = training.save_grid(samples, tmp_path / "grid.png", rule, nrow=2)
    assert grid.shape == (1, 22, 22)  # 2 x 8 px plus 2 px padding around each
    with Image.open(tmp_path / "grid.png") as saved:
        assert saved.mode == "I;16"
        assert images.scan([tmp_path / "grid.png"])["intensity"]["bit_depth"] == 16


def test_parameter_table_and_timing_line():
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    table = training.parameter_table({"unet": torch.nn.Linear(3, 3), "vae": frozen}).splitlines()
    assert table[1].split() == ["unet", "12", "12", "0"] and table[3].split() == ["total", "18", "12", "6"]
    line = training.timing_line(10, 50, 2, 5.0)
    assert line == "sampling: 10 images, 50 steps, 5.00 s total, 0.5000 s/image, 50.00 ms/step, 2.00 images/s"


def test_check_finite_halts_with_exit_1():
    training.check_finite(torch.tensor(1.0), "step 3")
    with pytest.raises(training.TrainingHalted, match="step 3") as halted:
        training.check_finite(torch.tensor(float("nan")), "step 3")
    assert halted.value.exit_code == 1


def test_stop_signal_records_and_a_cpu_accelerator_falls_back(capsys):
    stop = training.StopSignal()
    signal.raise_signal(signal.SIGTERM)
    assert stop.agreed() == signal.SIGTERM
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    accelerator = training.make_accelerator("bf16", device="cpu")
    assert accelerator.mixed_precision == "no" and accelerator.device.type == "cpu"
    assert "needs CUDA" in capsys.readouterr().err
    assert training.sum_across(accelerator, 2, 3.5) == [2.0, 3.5]
    assert training.sum_across(accelerator, torch.tensor(1.5), torch.tensor([0.25])) == [1.5, 0.25]


def test_sum_across_two_gloo_processes(tmp_path):
    script = tmp_path / "reduce.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys

            sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
            from core import training
            accelerator = training.make_accelerator("no")
            total = training.sum_across(accelerator, accelerator.process_index + 1)
            # one write per line: the two processes share the pipe, and print() writes in pieces
            rank, world = accelerator.process_index, accelerator.num_processes
            sys.stdout.write(f"rank {{rank}} of {{world}}: {{total[0]}}\\n")
            accelerator.end_training()
            """
        )
    )
    from core import testing

    result = testing.run(script, nproc=2, check=True)
    assert sorted(result.stdout.split("\n")) == ["", "rank 0 of 2: 3.0", "rank 1 of 2: 3.0"], result.stdout


def test_testing_helpers_check_a_user_error(tmp_path):
    script = tmp_path / "fails.py"
    script.write_text("import sys\nprint('error: no such folder x', file=sys.stderr)\nsys.exit(2)\n")
    from core import testing

    result = testing.run(script)
    assert testing.assert_user_error(result, "no such folder") == "error: no such folder x"
    with pytest.raises(AssertionError):
        testing.assert_user_error(result, "something else")
