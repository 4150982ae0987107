"""``robop-prune``: prune a Hugging Face causal LM from the command line and save it.

In the spirit of llm-compressor's ``oneshot``: a model id or folder, calibration text, a sparsity
and a solver in; a pruned checkpoint and its :class:`~robop_lightning.report.PruneReport` out::

    robop-prune --model embedded --calibration shakespeare --samples 32 --seqlen 128 \\
        --sparsity 0.5 --set trace --output gemma-50                # RobOP-ALPS (the default for LLMs)
    robop-prune --model meta-llama/Llama-3.1-8B --dtype bfloat16 --device cuda --pattern 2:4 \\
        --samples 128 --seqlen 2048 --output llama8b-24 --format compressed-tensors
    robop-prune --config recipe.yaml                                # the same options as YAML
    python -m robop_lightning --help

Options can come from a YAML file (``--config``, jsonargparse's convention, as in LightningCLI;
``--print_config`` writes the current ones); command-line options given after it win.
Calibration windows are ``--samples`` windows of ``--seqlen`` tokens (the model's BOS first when it
has one) drawn at random positions (``--seed``) from ``--calibration``: an embedded corpus
(``shakespeare``, ``brown``, ``python_docs``, ``fortunes``, ``pydoc_topics``), a ``.txt`` file or a
folder of them. The report is written beside the checkpoint (``robop_report.json``) and printed.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Literal

import torch

from robop_lightning.assets import require
from robop_lightning.data.text import _encode, _resolve_tokenizer, load_corpus
from robop_lightning.export import save_pruned
from robop_lightning.config import PruneConfig
from robop_lightning.pipeline.prune import run_job
from robop_lightning.report import PruneReport

__all__ = ["calibration_windows", "main", "parser"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def calibration_windows(tokenizer: Any, source: str, samples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``(samples, seqlen)`` token windows at random positions of ``source`` (BOS first when the tokenizer has one).

    Raises:
        ValueError: the text is shorter than one window.
    """
    ids = torch.tensor(_encode(tokenizer, "\n\n".join(load_corpus(source))), dtype=torch.long)
    bos = getattr(tokenizer, "bos_token_id", None)
    width = seqlen - (bos is not None)
    if ids.numel() <= width:
        raise ValueError(f"--calibration {source!r} has {ids.numel()} tokens, fewer than one window of {seqlen}; "
                         "pass more text or a smaller --seqlen.")
    starts = torch.randint(0, ids.numel() - width + 1, (samples,), generator=torch.Generator().manual_seed(seed))
    out = torch.stack([ids[s : s + width] for s in starts.tolist()])
    if bos is not None:
        out = torch.cat([torch.full((samples, 1), bos, dtype=torch.long), out], dim=1)
    return out


def parser():
    """The ``robop-prune`` argument parser (jsonargparse, with ``--config``)."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    p = ArgumentParser(prog="robop-prune", description=__doc__.split("\n\n")[0],
                       default_env=False, exit_on_error=True)
    p.add_argument("--config", action=ActionConfigFile, help="a YAML file with any of these options")
    p.add_argument("--model", type=str, required=True,
                   help="a Hugging Face hub id, a local folder, or 'embedded' (the cached Gemma 3 270M)")
    p.add_argument("--tokenizer", type=str | None, default=None, help="the tokenizer (default: the model's)")
    p.add_argument("--dtype", type=Literal["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="load and calibrate in this dtype ('auto': the checkpoint's); the checkpoint keeps it")
    p.add_argument("--device", type=str | None, default=None,
                   help="where blocks are calibrated and solved (e.g. cuda); the weights stay on the host")
    p.add_argument("--calibration", type=str, default="shakespeare",
                   help="an embedded corpus (shakespeare, brown, python_docs, fortunes, pydoc_topics), "
                        "a .txt file or a folder")
    p.add_argument("--samples", type=int, default=128, help="calibration windows")
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per window")
    p.add_argument("--batch_size", type=int, default=8, help="windows per forward")
    p.add_argument("--seed", type=int, default=0, help="where the windows are drawn")
    p.add_argument("--sparsity", type=float | None, default=0.5, help="fraction of zeros (None: from --pattern)")
    p.add_argument("--pattern", type=str, default="unstructured", help="unstructured, row or N:M such as 2:4")
    p.add_argument("--solver", type=Literal["alps", "cap", "sparsegpt", "wanda", "magnitude"] | None, default=None,
                   help="default: alps (RobOP-ALPS) for a causal LM")
    p.add_argument("--set", type=str, default="trace",
                   help="baseline, trace, e, cte (the authors' sets) or auto; the min-max extension's names work too")
    p.add_argument("--radius", type=float | Literal["auto"] | None, default=None, help="the set's gamma, or auto")
    p.add_argument("--targets", type=list[str] | None, default=None, help="module names or re:<regex> patterns")
    p.add_argument("--ignore", type=list[str] | None, default=None, help="names or patterns left dense")
    p.add_argument("--resume_dir", type=str | None, default=None, help="makes a long run resumable")
    p.add_argument("--output", type=str, required=True, help="a new directory for the pruned checkpoint")
    p.add_argument("--format", type=Literal["hf", "compressed-tensors"], default="hf",
                   help="hf (save_pretrained, sparsity in config.json) or compressed-tensors (sparse on disk)")
    p.add_argument("--overwrite", type=bool, default=False, help="replace an existing --output directory")
    p.add_argument("--threads", type=int | None, default=None, help="torch CPU threads")
    return p


def main(argv: list[str] | None = None) -> PruneReport:
    """Run ``robop-prune`` (``argv``: the arguments, default ``sys.argv[1:]``); the report."""
    from transformers import AutoModelForCausalLM

    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # every pruning option checked before the model is loaded
    config = PruneConfig(sparsity=args.sparsity, pattern=args.pattern, solver=args.solver, uncertainty=args.set,
                         radius=args.radius, targets=args.targets, ignore=args.ignore, resume_dir=args.resume_dir,
                         device=args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    output = Path(args.output)
    if output.exists() and any(output.iterdir()) and not args.overwrite:
        raise SystemExit(f"robop-prune: --output {output} exists and is not empty; pass a new directory "
                         "(or --overwrite true to replace it).")
    source = args.model
    if source == "embedded":
        source = str(require("gemma3-270m"))
    dtype = "auto" if args.dtype == "auto" else _DTYPES[args.dtype]
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype).eval()
    tokenizer = _resolve_tokenizer(args.tokenizer or source)
    data = calibration_windows(tokenizer, args.calibration, args.samples, args.seqlen, args.seed)
    batches = [{"input_ids": data[i : i + args.batch_size]} for i in range(0, len(data), args.batch_size)]
    report = run_job(model, batches, config)
    report.config.update({"model": args.model, "calibration": args.calibration, "samples": args.samples,
                          "seqlen": args.seqlen, "seed": args.seed})
    save_pruned(model, output, format=args.format, report=report, overwrite=args.overwrite)
    tokenizer.save_pretrained(output)
    report.to_json(output / "robop_report.json")
    print(report)
    print(f"saved to {output} ({args.format}); report: {output / 'robop_report.json'}")
    return report
