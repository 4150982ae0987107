"""What the recipes share: their command line, their progress log and their report files.

The recipes import it as a sibling (``import _common``): ``python recipes/deit_cap.py`` puts
``recipes/`` first on ``sys.path``, and each recipe adds its own folder when it is imported some
other way (``tests/script_loader.py``, ``runpy``).

- :func:`config_parser`, :func:`apply_fast`, :func:`check_set_specs`, :func:`check_save_checkpoints`:
  a recipe's ``config`` dict of defaults becomes its command line (``--calibration-size 256``).
- :func:`start_run`, :class:`Progress`: threads, seed, output folder; one flushed line when a phase
  starts and one when it ends, with its time, so that a log file shows where a long run is.
- :func:`quiet_trainer`: a Lightning ``Trainer`` without loggers or automatic checkpoints.
- :func:`text_table`, :func:`markdown_table`, :func:`to_csv`, :func:`save_png`,
  :func:`write_results`, :func:`environment`: the report files, each written to a temporary name
  and renamed (never overwritten in place).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import logging
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from lightning.pytorch import Trainer, seed_everything

from robop_lightning.utils.files import atomic_write  # temporary sibling, fsync, rename
from robop_lightning.engine.sets import parse_set_spec

CHECKPOINT_CHOICES = ("best", "all", "none")


# ----------------------------------------------------------------------------- command line
def config_parser(
    doc: str | None,
    config: dict,
    *,
    types: dict[str, Callable] | None = None,
    helps: dict[str, str] | None = None,
    nargs: str = "*",
    fast_help: str | None = None,
) -> argparse.ArgumentParser:
    """One ``--flag`` per ``config`` key (``calibration_size`` -> ``--calibration-size``), its value the default.

    A bool becomes ``--flag / --no-flag``; a list takes ``nargs`` values of its first element's type;
    ``types`` names the type of a key whose default (``None``, a JSON dict) does not show it (``str``
    otherwise). ``fast_help`` adds ``--fast``.
    """
    types, helps = types or {}, helps or {}
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    for key, value in config.items():
        flag = "--" + key.replace("_", "-")
        extra = {"help": helps[key]} if key in helps else {}
        if isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value, **extra)
        elif isinstance(value, list):
            kind = types.get(key, type(value[0]) if value else str)
            parser.add_argument(flag, nargs=nargs, type=kind, default=value, **extra)
        elif key in types:
            parser.add_argument(flag, type=types[key], default=value, **extra)
        elif value is None:
            parser.add_argument(flag, type=str, default=None, **extra)
        else:
            parser.add_argument(flag, type=type(value), default=value, **extra)
    if fast_help is not None:
        parser.add_argument("--fast", action="store_true", help=fast_help)
    return parser


def apply_fast(args: argparse.Namespace, fast: dict, argv: Sequence[str] | None) -> None:
    """``--fast`` sets the values of ``fast`` unless the command line gave them explicitly."""
    if not args.fast:
        return
    given = {a.split("=")[0].lstrip("-").replace("-", "_") for a in (argv if argv is not None else sys.argv[1:])}
    for key, value in fast.items():
        if key not in given:
            setattr(args, key, value)


def check_set_specs(parser: argparse.ArgumentParser, flag: str, specs: Sequence[str], allow_auto: bool) -> None:
    """Refuse (``parser.error``) an uncertainty-set spec such as ``trace=abc`` before anything runs."""
    for spec in specs:
        try:
            parse_set_spec(spec, allow_auto=allow_auto)
        except ValueError as err:
            parser.error(f"{flag}: {err}")


def check_save_checkpoints(parser: argparse.ArgumentParser, value: str) -> None:
    if value not in CHECKPOINT_CHOICES:
        parser.error("--save-checkpoints is best, all or none.")


def count_or_fraction(value: str) -> int | float:
    """``"30"`` -> 30 batches, ``"0.25"`` -> a quarter of them (Lightning's ``limit_*_batches``)."""
    return float(value) if "." in value else int(value)


# ----------------------------------------------------------------------------- the run and its log
class Progress:
    """Flushed ``[recipe] ...`` lines: one when a phase starts, one when it ends with its time.

    A terminal progress bar says nothing in a log file (``python recipes/deit_cap.py > log.txt``);
    these lines do::

        [deit_cap] pruning robop-cap/trace 80 % (6/24) ...
        [deit_cap] pruning robop-cap/trace 80 % (6/24) done in 4.1 s: sparsity 0.800
    """

    def __init__(self, recipe: str) -> None:
        self.recipe = recipe
        self.start = time.perf_counter()
        self.timings: dict[str, float] = {}  # what results.json reports as "timings"

    def say(self, message: str) -> None:
        print(f"[{self.recipe}] {message}", flush=True)

    @contextlib.contextmanager
    def phase(self, what: str, timing: str | None = None) -> Iterator[Phase]:
        """``with progress.phase("evaluating dense") as p: ...``; ``p.note`` ends the closing line.

        ``timing`` names the entry of :attr:`timings` that gets the phase's seconds (added up when
        several phases name the same one).
        """
        self.say(f"{what} ...")
        phase = Phase()
        t0 = time.perf_counter()
        try:
            yield phase
        except BaseException:
            self.say(f"{what} failed after {time.perf_counter() - t0:.1f} s")
            raise
        phase.seconds = time.perf_counter() - t0
        if timing is not None:
            self.timings[timing] = self.timings.get(timing, 0.0) + phase.seconds
        self.say(f"{what} done in {phase.seconds:.1f} s" + (f": {phase.note}" if phase.note else ""))

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


class Phase:
    """What :meth:`Progress.phase` yields: ``seconds`` (set when the phase ends) and an optional ``note``."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.note = ""


def start_run(args: argparse.Namespace, recipe: str) -> tuple[Path, Progress]:
    """Threads, quiet Lightning, the seed and the output folder; returns that folder and the run's log."""
    progress = Progress(recipe)
    torch.set_num_threads(max(1, min(args.threads, os.cpu_count() or 1)))
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no "GPU available" banner per Trainer
    seed_everything(args.seed, verbose=False)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress.say(f"output to {out}, {torch.get_num_threads()} thread(s), seed {args.seed}")
    return out, progress


def quiet_trainer(**kwargs) -> Trainer:
    """A Trainer without loggers or automatic checkpoints (the recipe saves what it needs); ``kwargs`` override."""
    options = dict(accelerator="auto", devices=1, logger=False, enable_checkpointing=False, enable_model_summary=False)
    return Trainer(**(options | kwargs))


# ----------------------------------------------------------------------------- reports
def environment() -> dict:
    """The machine a run's numbers (and timings) come from, and the commit of the code (``None``
    outside a git checkout; ``+dirty`` when tracked files differ from it)."""
    gpu = "GPU " + torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return dict(
        machine=f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {gpu}",
        load_average=os.getloadavg() if hasattr(os, "getloadavg") else None,
        commit=git_commit(),
    )


def git_commit() -> str | None:
    """``git rev-parse HEAD`` of the checkout this file is in (``+dirty`` with uncommitted changes to
    tracked files), or ``None``."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0 or not head.stdout.strip():
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def text_table(header: list[str], lines: list[list[str]], left: int = 1) -> str:
    """Aligned columns for a terminal: the first ``left`` columns flush left, the others right."""
    widths = [max([len(h), *(len(c[i]) for c in lines)]) for i, h in enumerate(header)]

    def fmt(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *map(fmt, lines)])


def markdown_table(header: list[str], lines: list[list[str]]) -> str:
    """A markdown table, padded to line up as text: the first column left-aligned, the others right."""
    widths = [max([len(h), *(len(c[i]) for c in lines)]) for i, h in enumerate(header)]

    def fmt(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(cells)) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" if i else ":" + "-" * (w + 1) for i, w in enumerate(widths)) + "|"
    return "\n".join([fmt(header), rule, *map(fmt, lines)])


def to_csv(rows: list[dict]) -> str:
    """One CSV line per row; a dict of intervals ``{"clean": [est, low, high]}`` becomes three columns each."""
    nested = {k for r in rows for k, v in r.items() if isinstance(v, dict)}
    flat = [_flatten(r, nested) for r in rows]
    columns = list(dict.fromkeys(k for r in flat for k in r))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(flat)
    return buffer.getvalue()


def _flatten(row: dict, nested: set[str]) -> dict:
    """``vs_baseline: {"clean": [est, low, high]}`` -> ``vs_baseline/clean``, ``.../clean_low``, ``.../clean_high``."""
    flat = {}
    for key, value in row.items():
        if key not in nested:
            flat[key] = value
            continue
        for name, ci in (value or {}).items():
            estimate, low, high = ci if ci is not None else (None, None, None)
            flat |= {f"{key}/{name}": estimate, f"{key}/{name}_low": low, f"{key}/{name}_high": high}
    return flat


def save_png(fig, path: Path) -> None:
    """A matplotlib figure as PNG, written to a temporary name and renamed."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=130, bbox_inches="tight")
    atomic_write(path, buffer.getvalue())


def write_results(out: Path, results: dict, table: str) -> None:
    """``results.json`` (everything), ``results.csv`` (the rows) and ``table.txt``."""
    atomic_write(out / "results.json", json.dumps(results, indent=2, default=str) + "\n")
    atomic_write(out / "results.csv", to_csv(results["rows"]))
    atomic_write(out / "table.txt", table + "\n")


def timings_line(timings: dict[str, float]) -> str:
    return "timings: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
