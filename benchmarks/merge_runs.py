"""Merge several ``recipes/llama_alps.py`` (or ``deit_cap.py``) runs into one results file.

A full-model grid on a CPU is long; running it one setting per invocation keeps every finished
part on disk. This script joins their ``results.json`` into one JSON (``rows``: one per model, the
dense row once, each row tagged with the command that made it) and a markdown table.

    .venv/bin/python benchmarks/merge_runs.py outputs/gemma_full_0_7 outputs/gemma_full_0_5 \\
        --out benchmarks/results/llama_alps_gemma_full

Only runs of the same protocol (model, data, evaluation sizes) may be merged: the script refuses
runs whose ``protocol`` differs, since their numbers would not be comparable.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

COLUMNS = [  # (row key, header, format)
    ("method", "method", "{}"),
    ("setting", "setting", "{}"),
    ("ppl", "ppl", "{:.2f}"),
    ("ood_ppl", "OOD ppl", "{:.2f}"),
    ("next_token_acc", "acc %", "{:.1%}"),
    ("ood_next_token_acc", "OOD acc %", "{:.1%}"),
    ("suffix_acc/tokens@0.2", "tokens@0.2 %", "{:.1%}"),
    ("suffix_acc/typos@0.2", "typos@0.2 %", "{:.1%}"),
    ("probe_acc@0.1", "probe 0.1 %", "{:.1%}"),
    ("prune_seconds", "prune s", "{:.0f}"),
]


def _command(config: dict) -> str:
    """The recipe command line that reproduces a run (its non-default options)."""
    skip = {"fast", "out"}
    parts = []
    for key, value in config.items():
        if key in skip or value is None:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, list):
            parts.append(f"{flag} {' '.join(str(v) for v in value)}" if value else flag)
        else:
            parts.append(f"{flag} {value}")
    return " ".join(parts)


def merge(paths: list[Path]) -> dict:
    runs, rows, protocol = [], [], None
    for path in paths:
        file = path / "results.json" if path.is_dir() else path
        data = json.loads(file.read_text())
        if protocol is None:
            protocol = data["protocol"]
        elif data["protocol"] != protocol:
            raise SystemExit(f"{file}: its protocol differs from the first run's; its numbers are not comparable.")
        command = _command(data["config"])
        runs.append(dict(source=str(file), options=command, environment=data["environment"], timings=data["timings"]))
        for row in data["rows"]:
            if row["method"] == "dense" and any(r["method"] == "dense" for r in rows):
                continue
            rows.append({**row, "run": len(runs) - 1})
    order = ["dense", "robop-alps", "robop-cap", "sparsegpt", "wanda", "magnitude"]

    def rank(row: dict) -> tuple:
        family = row["method"].split("/")[0]
        return (row["method"] != "dense", str(row["setting"]), order.index(family) if family in order else len(order),
                row["method"])  # fmt: skip

    rows.sort(key=rank)
    return dict(protocol=protocol, runs=runs, rows=rows)


def markdown(merged: dict) -> str:
    lines = ["| " + " | ".join(h for _, h, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in merged["rows"]:
        cells = []
        for key, _, fmt in COLUMNS:
            value = row.get(key)
            if value is None:
                cells.append("-")
            elif key.endswith("ppl") and value >= 1e5:
                cells.append(f"{value:.3g}")
            else:
                cells.append(fmt.format(value))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Runs (`python recipes/llama_alps.py` with these options; machine and timings in the JSON):", ""]
    for i, run in enumerate(merged["runs"]):
        lines.append(f"{i}. `{run['options']}` ({run['environment'].get('machine')}, "
                     f"{run['timings'].get('total_s', 0) / 60:.0f} min)")  # fmt: skip
    lines += ["", "Protocol:", ""] + [f"- {k}: {v}" for k, v in merged["protocol"].items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="output folders (or results.json files) of recipe runs")
    p.add_argument("--out", type=Path, required=True, help="writes <out>.json and <out>.md")
    args = p.parse_args(argv)
    merged = merge(args.runs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from robop_lightning.utils.files import atomic_write

    atomic_write(args.out.with_suffix(".json"), json.dumps(merged, indent=2, default=str) + "\n")
    atomic_write(args.out.with_suffix(".md"), markdown(merged))
    print(markdown(merged))
    return merged


if __name__ == "__main__":
    main()
