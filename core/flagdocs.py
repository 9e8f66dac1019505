"""Flag tables in a folder's README files, generated from the scripts' own parsers.

A README marks each table with the lines `<!-- flags: train.py -->` and `<!-- /flags -->`; the text
between them is `cli.flag_table(build_parser())` of that script. Run from the folder:
    python -m core.flagdocs README.md README_zh.md          rewrite the tables
    python -m core.flagdocs --check README.md README_zh.md  exit 1 when a table is stale
"""

import argparse
import importlib.util
import re
import sys
from pathlib import Path

from .cli import flag_table

BLOCK = re.compile(r"(<!-- flags: (?P<script>[\w./-]+) -->\n)(?P<body>.*?)(<!-- /flags -->)", re.S)


def parser_of(script):
    """The parser that script's build_parser() returns (importing a script runs nothing)."""
    path = Path(script).resolve()
    sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(f"_flagdocs_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_parser()


def render(text, folder):
    """text with every marked table regenerated from the scripts in folder."""
    tables = {}

    def table(match):
        script = match["script"]
        if script not in tables:
            tables[script] = flag_table(parser_of(Path(folder) / script))
        return match.group(1) + tables[script] + match.group(4)

    return BLOCK.sub(table, text)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("files", nargs="+", type=Path, help="README files of this folder")
    parser.add_argument("--check", action="store_true", help="only report stale tables (exit 1)")
    args = parser.parse_args(argv)
    stale = []
    for path in args.files:
        text = path.read_text(encoding="utf-8")
        fresh = render(text, path.parent)
        if fresh != text:
            stale.append(str(path))
            if not args.check:
                path.write_text(fresh, encoding="utf-8")
    if args.check and stale:
        print(f"error: flag tables are stale in {', '.join(stale)}: run make docs", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
