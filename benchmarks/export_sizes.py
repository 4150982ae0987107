"""Checkpoint sizes on disk of a pruned model, per format, and the round trip.

    .venv/bin/python benchmarks/export_sizes.py --threads 2          # Gemma 3 270M at 50 % and 2:4 (minutes)
    .venv/bin/python benchmarks/export_sizes.py --fast --out /tmp/es  # a tiny random Llama (seconds)

The embedded Gemma 3 270M (float32 as cached, and cast to bfloat16) is pruned with SparseGPT
(Baseline set; 32 Shakespeare windows of 128 tokens, BOS first) at 50 % unstructured and at 2:4,
then saved with :func:`robop_lightning.export.save_pruned` as ``hf`` and ``compressed-tensors``; each
row gives the bytes of the ``.safetensors`` files, the ratio to the dense ``hf`` checkpoint of the
same dtype, and whether :func:`robop_lightning.export.load_pruned` gives back the same weights.
Writes ``OUT.json`` / ``OUT.md`` (default ``benchmarks/results/export_sizes``).
"""

from __future__ import annotations

import argparse
import copy
import pathlib
import sys
import tempfile

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _real_layers as R  # noqa: E402

from robop_lightning.cli import calibration_windows  # noqa: E402
from robop_lightning.export import load_pruned, save_pruned  # noqa: E402
from robop_lightning.pipeline.prune import prune_model  # noqa: E402


def _bytes(folder: pathlib.Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def _model_and_windows(fast: bool):
    if fast:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2)
        return LlamaForCausalLM(cfg).eval(), torch.randint(0, 128, (8, 32)), "tiny random Llama (--fast)"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from robop_lightning.assets import require

    path = str(require("gemma3-270m"))
    tok = AutoTokenizer.from_pretrained(path)
    windows = calibration_windows(tok, "shakespeare", 32, 129, seed=0)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), windows, "gemma-3-270m"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fast", action="store_true")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/export_sizes")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    dense_model, windows, label = _model_and_windows(args.fast)
    batches = [{"input_ids": windows[i : i + 8]} for i in range(0, len(windows), 8)]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        for dtype in (torch.float32, torch.bfloat16):
            name = str(dtype).replace("torch.", "")
            dense = tmp / f"dense-{name}"
            save_pruned(dense_model.to(dtype), dense)
            rows.append({"dtype": name, "setting": "dense", "format": "hf", "bytes": _bytes(dense), "ratio": 1.0,
                         "round_trip": True})
            dense_model.float()
        for setting, kw in (("50%", dict(sparsity=0.5)), ("2:4", dict(pattern="2:4", sparsity=None))):
            model = copy.deepcopy(dense_model)
            report = prune_model(model, batches, solver="sparsegpt", uncertainty="baseline", progress=False, **kw)
            for dtype in (torch.float32, torch.bfloat16):
                name = str(dtype).replace("torch.", "")
                model = model.to(dtype)
                base = next(r["bytes"] for r in rows if r["dtype"] == name and r["setting"] == "dense")
                for fmt in ("hf", "compressed-tensors"):
                    folder = tmp / f"{setting.replace(':', '')}-{name}-{fmt}"
                    save_pruned(model, folder, format=fmt, report=report)
                    back = load_pruned(folder)
                    same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                                  back.state_dict().values()))
                    rows.append({"dtype": name, "setting": setting, "format": fmt, "bytes": _bytes(folder),
                                 "ratio": _bytes(folder) / base, "round_trip": same})
                    print(rows[-1], flush=True)
                model = model.float()
    commit = R.git_commit()
    command = " ".join([".venv/bin/python", "benchmarks/export_sizes.py", *(argv if argv is not None else sys.argv[1:])])
    payload = {"command": command, "commit": commit, "model": label, "rows": rows}
    lines = [f"Command: `{command}`", "", f"Commit: {commit}", "", f"Model: {label}; SparseGPT, Baseline set.", "",
             "| dtype | setting | format | bytes | x dense (same dtype) | load_pruned gives the same weights |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['dtype']} | {r['setting']} | {r['format']} | {r['bytes']:,} | {r['ratio']:.3f} | {r['round_trip']} |"
              for r in rows]
    R.publish(args.out, payload, "\n".join(lines) + "\n")
    return payload


if __name__ == "__main__":
    main()
