"""Standard LLM evaluation through lm-evaluation-harness, on the model in memory.

:func:`lm_eval` wraps a (pruned) Hugging Face causal LM in lm-eval's ``HFLM`` without saving or
reloading it and runs ``simple_evaluate``, so the zero-shot tables of the SparseGPT / Wanda / ALPS
papers (``arc_easy``, ``hellaswag``, ``piqa``, ``winogrande``...) can be reproduced where their data
is reachable; tasks defined in local YAML files (``include_path``) run offline. Needs
``pip install "robop-lightning[eval]"`` (lm-eval 0.4.5 or newer)::

    from robop_lightning.robustness.harness import lm_eval
    scores = lm_eval(model, tokenizer, tasks=["arc_easy", "piqa"], batch_size=8)
    scores["arc_easy"]["acc,none"]
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robop_lightning.pipeline.targets import find_hf_model

__all__ = ["lm_eval"]

EVAL_EXTRA = 'pip install "robop-lightning[eval]"'


def lm_eval(
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[str],
    include_path: str | Path | None = None,
    num_fewshot: int | None = None,
    batch_size: int | str = 1,
    limit: int | float | None = None,
    device: str | torch.device | None = None,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Run lm-evaluation-harness tasks on ``model`` as it is in memory.

    Args:
        model: a Hugging Face causal LM (``PreTrainedModel``); a LightningModule holding one works
            too (the Hugging Face model inside is evaluated).
        tokenizer: its tokenizer (an object, or a hub id / path).
        tasks: lm-eval task names (``"arc_easy"``) or names of tasks defined under ``include_path``.
        include_path: a folder of task YAML files (local data, offline).
        num_fewshot: few-shot examples (``None``: each task's default, zero for the papers' tables).
        batch_size: lm-eval's batch size (``"auto"`` works).
        limit: evaluate only this many (or this share of) examples per task.
        device: where lm-eval runs the model (``None``: where its weights are).
        seed: lm-eval's random seeds (few-shot sampling).

    Returns:
        ``{task: {metric: value}}`` as lm-eval reports them (``"acc,none"``, ``"acc_norm,none"``,
        ``"acc_stderr,none"``...).

    Raises:
        ImportError: lm-eval is not installed (the message gives the extra to install).
        TypeError: ``model`` holds no Hugging Face causal LM.
    """
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise ImportError(f"robop_lightning.robustness.harness needs lm-evaluation-harness: {EVAL_EXTRA}") from err
    found = find_hf_model(model)
    hf = None if found is None else found[1]
    if hf is None:
        raise TypeError(f"lm_eval needs a Hugging Face causal LM, got {type(model).__name__} without one inside.")
    device = str(device) if device is not None else str(next(hf.parameters()).device)
    training = hf.training
    wrapped = HFLM(pretrained=hf.eval(), tokenizer=tokenizer, batch_size=batch_size, device=device)
    manager = TaskManager(include_path=None if include_path is None else str(include_path))
    try:
        out = simple_evaluate(model=wrapped, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                              task_manager=manager, log_samples=False, random_seed=seed, numpy_random_seed=seed,
                              torch_random_seed=seed, fewshot_random_seed=seed, bootstrap_iters=0)
    finally:
        hf.train(training)
    return {task: dict(metrics) for task, metrics in out["results"].items()}
