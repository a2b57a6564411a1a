"""Regenerate README.md's headline table: the demo over 10 draws of 8 held-out phantoms (about a minute on 2 CPU
cores), written between the ``<!-- demo-headline:start -->`` and ``<!-- demo-headline:end -->`` markers.

Run from anywhere:  python scripts/demo_headline.py [--draws 10] [--cases 8] [--check]

``--check`` writes nothing and exits 1 when README.md differs from a fresh run (the numbers are deterministic on a
given platform: seeded phantoms, the shipped model).
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

from rankseg_monai.app import demo

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- demo-headline:start -->", "<!-- demo-headline:end -->"


def replace_block(text: str, table: str) -> str:
    """``text`` with the part between the markers replaced by ``table`` (the markers stay).

    >>> replace_block("a\\n<!-- demo-headline:start -->\\nold\\n<!-- demo-headline:end -->\\nb", "new")
    'a\\n<!-- demo-headline:start -->\\nnew\\n<!-- demo-headline:end -->\\nb'
    """
    pattern = re.compile(re.escape(START) + r"\n.*?" + re.escape(END), re.S)
    if len(pattern.findall(text)) != 1:
        raise SystemExit(f"README.md must hold the markers {START} ... {END} exactly once")
    return pattern.sub(lambda _: f"{START}\n{table.strip()}\n{END}", text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=10)
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--check", action="store_true", help="compare only; exit 1 when README.md is out of date")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        code = demo.main(["--draws", str(args.draws), "--cases", str(args.cases), "--output-dir", tmp, "--quiet"])
        if code:
            return code
        table = (Path(tmp) / demo.SPREAD_MD_NAME).read_text(encoding="utf-8")
    old = README.read_text(encoding="utf-8")
    new = replace_block(old, table)
    if args.check:
        print("README.md is up to date" if new == old else "README.md differs from this run", file=sys.stderr)
        return int(new != old)
    README.write_text(new, encoding="utf-8")
    print(f"wrote the headline table into {README}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
