"""The results the docs and the README show come from the results files, of code in this history.

- Every generated region of ``docs/*.md`` equals the results file it names
  (``scripts/results_page.py --check``).
- Every decimal number in the README's "Results" section appears, at the README's precision, in a
  results file that the section cites, and each cited file records the commit it ran on (or the
  section names it), a commit of this repository's history.
"""

from __future__ import annotations

import glob
import re
import subprocess
from pathlib import Path

import pytest

from tests.script_loader import load_script

ROOT = Path(__file__).resolve().parents[2]
# a decimal in prose or a table; not part of a version (2.14.1), a path or a word
NUMBER = re.compile(r"(?<![\w.])[-+]?\d+\.\d+(?![\w.])")
# settings, not results: "gamma 0.01", "trace=0.003", "torch 2.14"
SETTING = re.compile(r"(gamma|γ|torch|=|radius)\s*$")
COMMIT = re.compile(r"`([0-9a-f]{7,40})`")


def _results_section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("\n## Results")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


def _cited_files(section: str) -> list[Path]:
    files: list[Path] = []
    for ref in dict.fromkeys(re.findall(r"benchmarks/results/[\w.\-*]+", section)):
        ref = ref.rstrip(".")
        matches = sorted(glob.glob(str(ROOT / ref))) or sorted(glob.glob(str(ROOT / (ref + ".*"))))
        assert matches, f"README cites {ref}, which matches no file"
        files += [Path(m) for m in matches if Path(m).suffix in (".md", ".txt", ".json")]
    return files


def _numbers(text: str) -> list[float]:
    return [float(m) for m in re.findall(r"[-+]?\d+\.\d+(?:[eE][-+]?\d+)?", text)]


def test_generated_regions_equal_their_results_files():
    script = load_script("scripts/results_page.py")
    pages = script.pages()
    assert pages, "no docs page has a generated region"
    for page in pages:
        text = page.read_text()
        rendered, sources = script.render(text)
        assert sources, page
        assert rendered == text, f"{page.name}: a generated region differs from {sources}; run scripts/results_page.py"


def test_readme_results_come_from_cited_results_files_of_this_history():
    section = _results_section()
    files = _cited_files(section)
    assert files, "the README's Results section cites no results file"
    texts = {f: f.read_text() for f in files}
    found = [abs(x) for t in texts.values() for x in _numbers(t)]  # prose says "loses 29.6 points"
    missing = []
    for match in NUMBER.finditer(section):
        if SETTING.search(section[max(0, match.start() - 8) : match.start()]):
            continue
        value, places = abs(float(match[0])), len(match[0].split(".")[1])
        if not any(abs(round(x, places) - value) < 0.5 * 10**-places + 1e-12 for x in found):
            missing.append(match[0])
    assert not missing, f"README numbers in no cited results file: {missing}"
    commits = set(COMMIT.findall(section))
    for f, text in texts.items():
        recorded = re.findall(r'"commit": "([0-9a-f]{7,40})', text) + re.findall(r"Commit[^`\n]*`([0-9a-f]{7,40})", text)
        assert recorded or commits, f"{f.name} records no commit and the README names none"
        commits.update(recorded)
    inside = subprocess.run(["git", "rev-parse", "--is-inside-work-tree"], cwd=ROOT, capture_output=True, text=True)
    if inside.returncode != 0:
        pytest.skip("not a git checkout: the commits cannot be checked")
    for commit in commits:
        known = subprocess.run(["git", "merge-base", "--is-ancestor", commit, "HEAD"], cwd=ROOT, capture_output=True)
        assert known.returncode == 0, f"{commit} (a results commit) is not in this repository's history"
