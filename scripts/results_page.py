"""Fill the generated regions of the docs from the results files, so that no table is copied by hand.

    .venv/bin/python scripts/results_page.py            # rewrite every region of docs/*.md
    .venv/bin/python scripts/results_page.py --check    # exit 1, naming the regions that differ

A region is the text between a start marker naming a results file and the end marker::

    <!-- generated from benchmarks/results/sets_whole.md by scripts/results_page.py -->
    ... the file's text, exactly (its command, its commit, its tables) ...
    <!-- end generated -->

Everything outside the regions (what the numbers say) is written by hand; the regions are written
only by this script, from files the benchmarks write. ``tests/repo/test_results_page.py`` runs the
check, so a results file regenerated without the page (or a table edited by hand) fails the suite.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REGION = re.compile(
    r"(?P<start><!-- generated from (?P<source>\S+) by scripts/results_page\.py -->\n)"
    r"(?P<body>.*?)"
    r"(?P<end><!-- end generated -->)",
    re.S,
)


def render(text: str, root: Path = ROOT) -> tuple[str, list[str]]:
    """``text`` with every region refilled from its source file, and the sources it read.

    Raises:
        FileNotFoundError: a region names a file that does not exist.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp()); _ = (d / "t.md").write_text("| a |\\n")
        >>> page = "x\\n<!-- generated from t.md by scripts/results_page.py -->\\nold\\n<!-- end generated -->\\n"
        >>> render(page, d)[0]
        'x\\n<!-- generated from t.md by scripts/results_page.py -->\\n| a |\\n<!-- end generated -->\\n'
    """
    sources: list[str] = []

    def fill(match: re.Match) -> str:
        path = root / match["source"]
        if not path.is_file():
            raise FileNotFoundError(f"{match['source']}: named by a generated region but missing; run its benchmark "
                                    "(the command is in docs/benchmarks.md) or remove the region")
        sources.append(match["source"])
        body = path.read_text()
        return match["start"] + body + ("" if body.endswith("\n") else "\n") + match["end"]

    return REGION.sub(fill, text), sources


def pages(root: Path = ROOT) -> list[Path]:
    """The markdown pages that hold generated regions."""
    return [p for p in sorted((root / "docs").glob("*.md")) if REGION.search(p.read_text())]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 when a region is stale")
    args = parser.parse_args(argv)
    stale = []
    for page in pages():
        text = page.read_text()
        new, sources = render(text)
        if new == text:
            continue
        stale.append(f"{page.relative_to(ROOT)} ({', '.join(sources)})")
        if not args.check:
            page.write_text(new)
    if args.check and stale:
        print("stale generated regions (run .venv/bin/python scripts/results_page.py): " + "; ".join(stale))
        return 1
    print(("rewrote " if stale else "up to date: ") + ", ".join(stale or [str(p.relative_to(ROOT)) for p in pages()]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
