"""Command-line pieces: a parser whose errors are one line, both spellings of every flag, value checks
at parse time, output checks, and the flag table that the folders' READMEs are generated from."""

import argparse
import math
import os
import re
import sys
import tempfile
from pathlib import Path

from .errors import UserError


def spellings(names):
    """The option strings plus the --snake_case / --kebab-case twin of each multi-word one."""
    # Order matters: the names as given come first (argparse shows the first in usage and errors),
    # each followed by its twin; dict.fromkeys drops a twin that equals a given name.
    out = []
    for name in names:
        twins = [name]
        if name.startswith("--"):
            twins += [name.replace("_", "-"), "--" + name[2:].replace("-", "_")]
        out += [t for t in dict.fromkeys(twins) if t not in out]
    return out


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description as written and appends "(default: X)" to every flag that has a default,
    so each flag's definition fits on one line and --help still shows every default."""

    def _get_help_string(self, action):
        text = action.help or ""
        # "is", not "in (...)": 0 and 0.0 compare equal to False, yet they are defaults worth showing.
        # An empty-string default is shown as nothing, so it is left out too.
        default = action.default
        hidden = default is None or default is False or default is argparse.SUPPRESS or default == ""
        if "%(default)" in text or hidden or not text:
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one 'error: ...' line and exit code 2 (no usage block).

    Every flag is accepted as --snake_case and --kebab-case; the first name given is the canonical
    one (it gives the dest), the others are aliases, such as the seed's spellings:
    parser.add_argument("--data_root", "--dataset_path", help=...). --help shows every default.
    """

    def __init__(self, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        kwargs.setdefault("allow_abbrev", False)  # a typo never silently means another flag
        super().__init__(**kwargs)

    def add_argument(self, *names, **kwargs):
        names, kwargs = _both_spellings(names, kwargs)
        return super().add_argument(*names, **kwargs)

    def parse_args(self, args=None, namespace=None):
        return super().parse_args(self.expand_config(sys.argv[1:] if args is None else args), namespace)

    def expand_config(self, argv):
        """argv with the flags of its --config YAML file put in front, so typed flags override the file."""
        argv = list(argv)
        if "config" not in {action.dest for action in self._actions}:
            return argv
        path = _config_path(argv)
        return argv if path is None else config_file_argv(self, path) + argv

    def add_argument_group(self, *args, **kwargs):
        # Groups keep their own add_argument (argparse's containers do not share it): wrap that one too.
        group = super().add_argument_group(*args, **kwargs)
        add = group.add_argument

        def add_both(*names, **kwargs):
            names, kwargs = _both_spellings(names, kwargs)
            return add(*names, **kwargs)

        group.add_argument = add_both
        return group

    def error(self, message):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr, flush=True)
        sys.exit(2)


def _both_spellings(names, kwargs):
    """(option strings, kwargs) with every spelling added and the dest taken from the first name."""
    # Without an explicit dest argparse would name it after the first long option it sees, which the
    # added twins could change; the canonical name decides, so args.data_root is always the attribute.
    if names and names[0].startswith("--") and "dest" not in kwargs:
        kwargs = {**kwargs, "dest": names[0][2:].replace("-", "_")}
    return spellings(names), kwargs


CONFIG_HELP = "YAML file of flag values (keys: flag names); flags typed on the command line override it"


def _config_path(argv):
    """The value of the last --config in argv, or None."""
    path = None
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
    return path


def config_file_argv(parser, path):
    """The flags a YAML mapping of flag names to values stands for, as command-line tokens.

    Going through argv keeps one set of checks: a value in the file is parsed and refused exactly like
    the same value typed. true / false switch a flag on / off; a list gives a flag of several values.
    """
    import yaml

    try:
        with open(path, encoding="utf-8") as file:
            values = yaml.safe_load(file)
    except OSError as error:
        raise UserError(f"--config {path} cannot be read ({error.strerror or error})") from None
    except yaml.YAMLError as error:
        raise UserError(f"--config {path} is not valid YAML ({str(error).splitlines()[0]})") from None
    if values is None:
        return []
    if not isinstance(values, dict):
        raise UserError(f"--config {path} must be a mapping of flag names to values, e.g. objective: vp")
    actions = {}
    for action in parser._actions:
        for option in action.option_strings:
            actions[option[2:].replace("-", "_")] = action
    tokens = []
    for key, value in values.items():
        action = actions.get(str(key).replace("-", "_"))
        if action is None or action.dest in ("config", "help"):
            raise UserError(f"--config {path}: {key!r} is not a flag of {parser.prog} (see --help)")
        option = action.option_strings[0]
        if action.nargs == 0:  # a switch such as --hflip
            if not isinstance(value, bool):
                raise UserError(f"--config {path}: {key} is a switch, give it true or false, not {value!r}")
            tokens += [option] if value else []
        elif value is not None:
            items = value if isinstance(value, list) else [value]
            tokens += [
                option,
                *(str(item).lower() if isinstance(item, bool) else str(item) for item in items),
            ]
    return tokens


def explicit_flags(parser, argv):
    """Dests of the flags the user typed (or set in a --config file), so a resumed run can tell them
    from defaults."""
    argv = parser.expand_config(argv) if hasattr(parser, "expand_config") else argv
    # --flag=value and --flag value both count; abbreviations cannot occur (allow_abbrev=False).
    given = {arg.split("=", 1)[0] for arg in argv if arg.startswith("-")}
    return {a.dest for a in parser._actions if given.intersection(a.option_strings)}


def boolean(text):
    """An argparse type for yes/no values: true/false, yes/no, on/off, 1/0."""
    value = text.strip().lower()
    if value in ("true", "yes", "on", "1"):
        return True
    if value in ("false", "no", "off", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


# The one --mixed_precision vocabulary (accelerate's), and the older spellings it still accepts.
MIXED_PRECISION = ("no", "fp16", "bf16")
PRECISION_ALIASES = {"fp32": "no", "float32": "no", "float16": "fp16", "bfloat16": "bf16", "auto": "auto"}


def mixed_precision(text):
    """An argparse type: no / fp16 / bf16, also fp32 (= no) and auto (bf16 where CUDA has it)."""
    # auto is resolved later, by make_accelerator, where the device is known.
    value = PRECISION_ALIASES.get(text.strip().lower(), text.strip().lower())
    if value not in (*MIXED_PRECISION, "auto"):
        raise argparse.ArgumentTypeError(f"expected one of no, fp16, bf16 (or fp32, auto), got {text!r}")
    return value


def flag_table(parser):
    """A Markdown table of the parser's flags: name, aliases, default, help (for the READMEs)."""
    rows = ["| flag | also accepted | default | meaning |", "| --- | --- | --- | --- |"]
    formatter = argparse.HelpFormatter(parser.prog)  # the help text as written, no "(default: ...)" added
    for action in parser._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS or action.dest == "help":
            continue
        name, *aliases = action.option_strings
        default = action.default
        shown = "" if default is None or default is argparse.SUPPRESS else f"`{default}`"
        meaning = formatter._expand_help(action) if action.help else ""
        # The default has its own column, so a "(default: ...)" written into the help is cut off.
        if shown:
            meaning = re.sub(r" *\(default: [^()]*\)$", "", meaning)
        meaning = meaning.replace("|", "\\|").replace("\n", " ")
        if action.choices:
            meaning += f" (one of {', '.join(str(c) for c in action.choices)})"
        rows.append(f"| `{name}` | {' '.join(f'`{a}`' for a in aliases)} | {shown} | {meaning} |")
    return "\n".join(rows) + "\n"


def _number(kind, text):
    try:
        value = kind(text)
    except ValueError:
        wanted = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}") from None
    # float("nan") and float("inf") parse: a NaN learning rate would only show up as a NaN loss later.
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _checked(kind, test, wanted):
    """An argparse type: parse with kind, then require test(value)."""

    def parse(text):
        value = _number(kind, text)
        if not test(value):
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text}")
        return value

    # argparse names the type in its message ("invalid <name> value"): make that the plain-words rule.
    parse.__name__ = wanted
    return parse


finite_float = _checked(float, lambda v: True, "a finite number")
positive_float = _checked(float, lambda v: v > 0, "a number > 0")
nonnegative_float = _checked(float, lambda v: v >= 0, "a number >= 0")
positive_int = _checked(int, lambda v: v > 0, "an integer >= 1")
nonnegative_int = _checked(int, lambda v: v >= 0, "an integer >= 0")
fraction = _checked(float, lambda v: 0 <= v < 1, "a fraction in [0, 1)")
unit_interval = _checked(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")
bit_depth = _checked(int, lambda v: 1 <= v <= 32, "a bit depth from 1 to 32")


def ensure_writable_dir(path, flag):
    """Create folder path if needed and prove it is writable; else one UserError naming the flag."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file, not a folder: pass a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        # os.access misjudges network and read-only mounts: a real file proves the folder is writable
        # before hours of training, not at the first checkpoint.
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as error:
        raise UserError(
            f"{flag} {path} is not writable ({error.strerror or error}): pass another folder"
        ) from None
    return path


def _nearest_existing(path):
    """path itself or its nearest ancestor that exists."""
    existing = Path(path).absolute()
    while not existing.exists():
        existing = existing.parent
    return existing


def check_creatable_dir(path, flag):
    """Fail now, with one UserError naming the flag, if folder path could not be made and written.

    Creates nothing, so a run that then fails on its input leaves no empty output folders behind.
    """
    path = Path(path)
    # The nearest folder that exists is the one whose permissions decide whether path can be made.
    existing = _nearest_existing(path)
    if existing != path.absolute() and not existing.is_dir():
        raise UserError(f"{flag} {path} is under the file {existing}: pass a folder path")
    ensure_writable_dir(existing, flag)
    return path


def ensure_writable_file(path, flag):
    """Check that file path can be written (its folder is created if needed) without touching the file."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder: pass a file path")
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise UserError(f"{flag} {path} cannot be written: {parent} is a file, not a folder")
    ensure_writable_dir(path.parent, flag)
    if path.exists() and not os.access(path, os.W_OK):
        raise UserError(f"{flag} {path} is not writable: pass another file")
    return path
