#!/usr/bin/env python
"""Fingerprint every pruning path, to prove a refactor keeps results bit-identical.

Runs a fixed grid of small, seeded, CPU-only pruning jobs and records per case a sha256 over the
resulting tensors (masks and weights, or the whole state_dict; names sorted, dtype, shape and raw
bytes) plus the per-layer errors rounded to 12 significant digits. A case that raises records the
exception type instead (some combinations raise ValueError by design).

Only the top-level names ``robop_lightning.prune_model``, ``robop_lightning.prune_layer`` and
``robop_lightning.LayerInputs`` are used, so the same script runs against the layout before and
after a reorganisation of the modules.

Usage::

    python scripts/fingerprint.py --out base.json            # record
    python scripts/fingerprint.py --check base.json          # recompute, list differing cases, exit 1 if any
    python scripts/fingerprint.py --src /other/checkout ...  # import robop_lightning from another checkout
    python scripts/fingerprint.py --only prune_layer/cap ... # only the cases whose name contains this

Run it single-threaded (``OMP_NUM_THREADS=1``); it calls ``torch.set_num_threads(1)`` itself.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from typing import Any

# imported lazily in main() after --src is applied: torch, nn, robop_lightning
torch: Any = None
nn: Any = None
RL: Any = None

ERROR_KEYS = ("nominal_error", "robust_error", "heldout_error", "srank")
SOLVERS = ("alps", "cap", "sparsegpt", "wanda", "magnitude")
SETS = ("baseline", "trace", "e", "cte")
PATTERNS = (("unstructured", 0.5), ("row", 0.5), ("2:4", None))


# ----------------------------------------------------------------------------- hashing
def _num(x: Any) -> Any:
    """Floats rounded to 12 significant digits (as strings: exact in JSON); containers recursively."""
    if isinstance(x, bool) or x is None or isinstance(x, (int, str)):
        return x
    if isinstance(x, float):
        return f"{x:.12g}"
    if isinstance(x, dict):
        return {str(k): _num(v) for k, v in sorted(x.items(), key=lambda kv: str(kv[0]))}
    if isinstance(x, (list, tuple)):
        return [_num(v) for v in x]
    if hasattr(x, "item") and getattr(x, "numel", lambda: 0)() == 1:
        return _num(x.item())
    return repr(x)


def tensor_sha(tensors: dict[str, Any]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def layer_fp(r: Any) -> dict[str, Any]:
    fp = {
        "sha256": tensor_sha({"weight": r.weight, "mask": r.mask}),
        "errors": {k: _num(getattr(r, k)) for k in ERROR_KEYS},
    }
    if getattr(r, "selection", None) is not None:
        sel = r.selection
        fp["selection"] = _num({k: sel.get(k) for k in ("chosen", "fold_errors", "screen_errors")})
    return fp


def model_fp(model: Any, report: Any) -> dict[str, Any]:
    tensors = {f"state/{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"mask/{k}": v for k, v in report.masks.items()})
    return {
        "sha256": tensor_sha(tensors),
        "errors": {row["name"]: _num([row.get(k) for k in ERROR_KEYS]) for row in report.layers},
    }


# ----------------------------------------------------------------------------- data and models
def seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # pragma: no cover
        pass


def layer_data(seed: int = 0, rows: int = 32, cols: int = 160, n: int = 384):
    """A random layer and anisotropic, correlated inputs (so the sets differ from the baseline)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    scale = torch.linspace(0.2, 3.0, cols)
    x = (torch.randn(n, cols, generator=g) @ mix) * scale
    held = (torch.randn(n // 4, cols, generator=g) @ mix) * scale * 1.1
    return w, x, held


def make_block_model(seed: int = 0, d: int = 48, hidden: int = 160, depth: int = 3, d_in: int = 16, classes: int = 4):
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm1 = nn.LayerNorm(d)
            self.qkv = nn.Linear(d, 3 * d)
            self.proj = nn.Linear(d, d)
            self.norm2 = nn.LayerNorm(d)
            self.fc1 = nn.Linear(d, hidden)
            self.fc2 = nn.Linear(hidden, d)

        def forward(self, x):
            q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
            att = torch.softmax(q @ k.transpose(-1, -2) / d**0.5, dim=-1)
            x = x + self.proj(att @ v)
            return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm2(x))))

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(d_in, d)
            self.blocks = nn.ModuleList([Block() for _ in range(depth)])
            self.norm = nn.LayerNorm(d)
            self.head = nn.Linear(d, classes)

        def forward(self, x):
            x = self.embed(x)
            for b in self.blocks:
                x = b(x)
            return self.head(self.norm(x).mean(1))

    seed_all(seed)
    return Tiny().eval()


def block_batches(seed: int = 1, batches: int = 4, size: int = 4, tokens: int = 8, d_in: int = 16):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, tokens, d_in, generator=g) for _ in range(batches)]


def labelled_batches(seed: int = 1, batches: int = 2, size: int = 16, tokens: int = 8, d_in: int = 16, classes: int = 4):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, tokens, d_in, generator=g), torch.randint(0, classes, (size,), generator=g))
            for _ in range(batches)]


def make_mlp(seed: int = 0):
    seed_all(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)).eval()


def mlp_batches(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 16, generator=g) for _ in range(4)]


def make_vit(seed: int = 0):
    import timm

    seed_all(seed)
    return timm.create_model(
        "deit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4, num_classes=5
    ).eval()


def vit_batches(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, 32, 32, generator=g) for _ in range(2)]


def make_llama(seed: int = 0, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    seed_all(seed)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64)
    return LlamaForCausalLM(config).eval()


def token_batches(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 64, (4, 12), generator=g)} for _ in range(2)]


def ce_loss(model, batch):
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y, reduction="none")


# ----------------------------------------------------------------------------- cases
Case = Callable[[], dict[str, Any]]


def layer_case(solver: str, uncertainty: str, pattern: str, sparsity: float | None, **kw: Any) -> Case:
    def run():
        opts = dict(kw)
        w, x, held = layer_data()
        if opts.pop("_heldout", False):
            opts["heldout"] = held
        if opts.pop("_layer_inputs", False):
            x = RL.LayerInputs(x.reshape(48, 8, -1))
        if opts.pop("_prior", False):
            g = torch.Generator().manual_seed(7)
            opts["prior_mask"] = torch.rand(w.shape, generator=g) > 0.25
        if opts.pop("_zero_inputs", False):
            x = torch.zeros_like(x)
        seed_all(1234)
        r = RL.prune_layer(w, x, sparsity=sparsity, pattern=pattern, solver=solver, uncertainty=uncertainty, **opts)
        return layer_fp(r)

    return run


def model_case(build: Callable[[], Any], data: Callable[[], list], **kw: Any) -> Case:
    def run():
        model, batches = build(), data()
        seed_all(1234)
        report = RL.prune_model(model, batches, progress=False, **kw)
        return model_fp(model, report)

    return run


def resume_case(**job: Any) -> Case:
    """Interrupted after the first block (KeyboardInterrupt from forward), then resumed; equals the uninterrupted run."""

    def run():
        batches = block_batches()
        reference = make_block_model()
        seed_all(1234)
        ref = model_fp(reference, RL.prune_model(reference, batches, progress=False, **job))
        calls = [0]
        limit = [len(batches)]  # the capture up to block 0; the next forward pass (block 1's arguments) raises

        def forward(model, batch):
            calls[0] += 1
            if limit[0] is not None and calls[0] > limit[0]:
                raise KeyboardInterrupt
            return model(batch)

        with tempfile.TemporaryDirectory() as tmp:
            resume_dir = os.path.join(tmp, "resume")
            model = make_block_model()
            dense = {k: v.clone() for k, v in model.state_dict().items()}
            seed_all(1234)
            try:
                RL.prune_model(model, batches, progress=False, forward=forward, resume_dir=resume_dir, **job)
                raise AssertionError("the interrupted run was not interrupted")
            except KeyboardInterrupt:
                pass
            after = model.state_dict()
            assert all(torch.equal(dense[k], after[k]) for k in dense), "the interrupted run left the model changed"
            files = sorted(f for f in os.listdir(resume_dir) if f.endswith(".safetensors"))
            assert files, "nothing was checkpointed before the interrupt"
            limit[0] = None
            seed_all(1234)
            report = RL.prune_model(model, batches, progress=False, forward=forward, resume_dir=resume_dir, **job)
            assert report.resumed, "the resumed run loaded nothing"
            fp = model_fp(model, report)
        assert fp == ref, f"resumed result differs from the uninterrupted one: {fp} != {ref}"
        fp["checkpoints_before_interrupt"] = len(files)
        fp["resumed_layers"] = len(report.resumed)
        return fp

    return run


def cases() -> dict[str, Case]:
    out: dict[str, Case] = {}
    # --- prune_layer: every solver x the authors' sets x patterns
    for solver in SOLVERS:
        for uset in SETS:
            for pattern, sparsity in PATTERNS:
                out[f"prune_layer/{solver}/{uset}/{pattern}"] = layer_case(solver, uset, pattern, sparsity)
    # --- prune_layer: the min-max extension
    for solver in ("alps", "sparsegpt", "cap"):
        for uset in ("minmax-trace", "minmax-e", "cvar"):
            out[f"prune_layer/{solver}/{uset}/unstructured"] = layer_case(solver, uset, "unstructured", 0.5)
    for uset in ("minmax-trace", "minmax-e", "cvar"):
        out[f"prune_layer/sparsegpt/{uset}/2:4"] = layer_case("sparsegpt", uset, "2:4", None)
        out[f"prune_layer/wanda/{uset}/unstructured"] = layer_case("wanda", uset, "unstructured", 0.5)
    out["prune_layer/sparsegpt/minmax-trace/uncoupled"] = layer_case("sparsegpt", "minmax-trace", "unstructured", 0.5,
                                                                    coupled=False)
    out["prune_layer/alps/minmax-e/uncoupled"] = layer_case("alps", "minmax-e", "row", 0.5, coupled=False)
    out["prune_layer/sparsegpt/minmax-trace/radius0.05/rounds1"] = layer_case(
        "sparsegpt", "minmax-trace", "unstructured", 0.5, radius=0.05, rounds=1)
    out["prune_layer/cap/cvar/radius0.2/rounds0"] = layer_case("cap", "cvar", "unstructured", 0.5, radius=0.2, rounds=0)
    out["prune_layer/sparsegpt/minmax-trace/coupled=True/error"] = layer_case(
        "sparsegpt", "trace", "unstructured", 0.5, coupled=True)  # the authors' sets refuse coupled=True
    # --- prune_layer: automatic choice
    for solver in ("alps", "cap", "sparsegpt"):
        out[f"prune_layer/{solver}/auto/unstructured"] = layer_case(solver, "auto", "unstructured", 0.5)
    out["prune_layer/sparsegpt/trace/radius=auto"] = layer_case("sparsegpt", "trace", "unstructured", 0.5, radius="auto")
    out["prune_layer/alps/e/radius=auto/2:4"] = layer_case("alps", "e", "2:4", None, radius="auto")
    out["prune_layer/cap/auto/worst/solver-scorer"] = layer_case(
        "cap", "auto", "unstructured", 0.5, auto={"select": "worst", "scorer": "solver", "folds": 3, "rows": None})
    out["prune_layer/magnitude/auto/error"] = layer_case("magnitude", "auto", "unstructured", 0.5)
    out["prune_layer/wanda/cte/radius=auto"] = layer_case("wanda", "cte", "unstructured", 0.5, radius="auto")
    # --- prune_layer: other options
    out["prune_layer/sparsegpt/trace/heldout"] = layer_case("sparsegpt", "trace", "unstructured", 0.5, _heldout=True)
    out["prune_layer/alps/cvar/heldout"] = layer_case("alps", "cvar", "unstructured", 0.5, _heldout=True)
    out["prune_layer/cap/e/LayerInputs"] = layer_case("cap", "e", "unstructured", 0.5, _layer_inputs=True)
    out["prune_layer/alps/baseline/LayerInputs/cvar"] = layer_case("alps", "cvar", "2:4", None, _layer_inputs=True)
    out["prune_layer/sparsegpt/trace/prior_mask"] = layer_case("sparsegpt", "trace", "unstructured", 0.5, _prior=True)
    out["prune_layer/alps/minmax-trace/prior_mask"] = layer_case("alps", "minmax-trace", "unstructured", 0.6,
                                                                 _prior=True)
    out["prune_layer/sparsegpt/baseline/zero_inputs"] = layer_case("sparsegpt", "baseline", "unstructured", 0.5,
                                                                  _zero_inputs=True)
    out["prune_layer/sparsegpt/baseline/4:8/damping0.1"] = layer_case("sparsegpt", "baseline", "4:8", None,
                                                                     damping=0.1)
    out["prune_layer/cap/trace/options"] = layer_case("cap", "trace", "unstructured", 0.7,
                                                      solver_options={"block_size": 8})
    out["prune_layer/alps/trace/options"] = layer_case("alps", "trace", "row", 0.5, solver_options={"max_iter": 20})
    out["prune_layer/cap/e/options-chunk"] = layer_case("cap", "e", "2:4", None, solver_options={
        "block_size": 32, "chunk_bytes": 1 << 14, "truncate": False})
    out["prune_layer/sparsegpt/cte/options-block"] = layer_case("sparsegpt", "cte", "row", 0.5,
                                                                solver_options={"block_size": 32})
    out["prune_layer/sparsegpt/baseline/sparsity1.0/error"] = layer_case("sparsegpt", "baseline", "unstructured", 1.0)
    out["prune_layer/sparsegpt/baseline/sparsity0"] = layer_case("sparsegpt", "baseline", "unstructured", 0.0)
    for uset in ("baseline", "trace", "cvar"):
        out[f"prune_layer/structured/{uset}"] = layer_case("alps", uset, "structured", 0.25, _heldout=True)
    out["prune_layer/structured/groups"] = layer_case(
        "alps", "trace", "structured", 0.5, solver_options={"groups": [list(range(i, i + 8)) for i in range(0, 160, 8)]})

    # --- prune_model on a tiny transformer-like model with repeated blocks
    M, B = make_block_model, block_batches
    for solver in ("alps", "cap", "sparsegpt", "wanda"):
        for uset in ("baseline", "trace"):
            out[f"prune_model/blocks/{solver}/{uset}/unstructured"] = model_case(M, B, solver=solver, uncertainty=uset)
    for solver, uset, pattern in (("sparsegpt", "e", "2:4"), ("alps", "cte", "2:4"), ("cap", "trace", "row"),
                                  ("magnitude", "baseline", "row"), ("sparsegpt", "cvar", "unstructured"),
                                  ("alps", "minmax-trace", "unstructured"), ("cap", "minmax-e", "2:4")):
        sparsity = None if ":" in pattern else 0.5
        out[f"prune_model/blocks/{solver}/{uset}/{pattern}"] = model_case(M, B, solver=solver, uncertainty=uset,
                                                                          pattern=pattern, sparsity=sparsity)
    out["prune_model/blocks/default-solver/trace"] = model_case(M, B)
    out["prune_model/blocks/sparsegpt/trace/heldout0.25"] = model_case(M, B, solver="sparsegpt", heldout_fraction=0.25)
    out["prune_model/blocks/cap/cvar/heldout0.25"] = model_case(M, B, solver="cap", uncertainty="cvar",
                                                                heldout_fraction=0.25)
    out["prune_model/blocks/sparsegpt/auto"] = model_case(M, B, solver="sparsegpt", uncertainty="auto",
                                                          auto={"folds": 2})
    out["prune_model/blocks/alps/trace/radius=auto"] = model_case(M, B, solver="alps", uncertainty="trace",
                                                                  radius="auto")
    out["prune_model/blocks/sparsegpt/trace/activation_budget"] = model_case(M, B, solver="sparsegpt",
                                                                             activation_budget="4KB")
    out["prune_model/blocks/alps/cvar/activation_budget"] = model_case(M, B, solver="alps", uncertainty="cvar",
                                                                       activation_budget=2048)
    out["prune_model/blocks/sparsegpt/trace/targets+outside"] = model_case(
        M, B, solver="sparsegpt", targets=["embed", "blocks", "head"])
    out["prune_model/blocks/cap/trace/ignore-fc2"] = model_case(M, B, solver="cap", ignore=["re:fc2"])
    out["prune_model/blocks/alps/trace/options"] = model_case(M, B, solver="alps", solver_options={"max_iter": 20},
                                                              rounds=1, damping=0.05)

    def prior_masks_case():
        g = torch.Generator().manual_seed(5)
        model = make_block_model()
        masks = {f"blocks.{i}.fc1": torch.rand(model.blocks[i].fc1.weight.shape, generator=g) > 0.2
                 for i in range(len(model.blocks))}
        seed_all(1234)
        report = RL.prune_model(model, block_batches(), sparsity=0.6, solver="sparsegpt", prior_masks=masks,
                                progress=False)
        return model_fp(model, report)

    out["prune_model/blocks/sparsegpt/trace/prior_masks"] = prior_masks_case
    out["prune_model/blocks/sparsegpt/bad-targets/error"] = model_case(M, B, solver="sparsegpt", targets=["nothing"])
    # --- no blocks
    out["prune_model/mlp/sparsegpt/trace"] = model_case(make_mlp, mlp_batches, solver="sparsegpt")
    out["prune_model/mlp/cap/cvar/heldout0.25"] = model_case(make_mlp, mlp_batches, solver="cap", uncertainty="cvar",
                                                             heldout_fraction=0.25)
    # --- a Hugging Face decoder (block arguments: attention mask, positions)
    out["prune_model/llama/alps/trace"] = model_case(make_llama, token_batches, solver="alps")
    out["prune_model/llama/sparsegpt/e/2:4"] = model_case(make_llama, token_batches, solver="sparsegpt",
                                                          uncertainty="e", pattern="2:4", sparsity=None)
    # --- structured
    for name, kw in (("vit/baseline/layer", dict(uncertainty="baseline")),
                     ("vit/trace/global-params", dict(uncertainty="trace", solver_options={"budget": "global"})),
                     ("vit/cvar/global-flops", dict(uncertainty="cvar",
                                                    solver_options={"budget": "global", "cost": "flops"})),
                     ("vit/e/heldout0.25", dict(uncertainty="e", heldout_fraction=0.25))):
        out[f"structured/{name}"] = model_case(make_vit, vit_batches, pattern="structured", sparsity=0.5, **kw)
    out["structured/llama/trace/layer"] = model_case(make_llama, token_batches, pattern="structured", sparsity=0.5,
                                                     uncertainty="trace")
    out["structured/llama/minmax-trace/activation_budget"] = model_case(
        make_llama, token_batches, pattern="structured", sparsity=0.4, uncertainty="minmax-trace",
        activation_budget="4KB")
    out["structured/mlp/error"] = model_case(make_mlp, mlp_batches, pattern="structured", sparsity=0.5)
    # --- Fisher (CAP's curvature)
    for uset in ("baseline", "trace"):
        for selection in ("global", "uniform"):
            out[f"fisher/{uset}/{selection}"] = model_case(
                make_block_model, labelled_batches, solver="cap", uncertainty=uset, curvature="fisher",
                loss_fn=ce_loss, fisher={"gradients": 32, "batch_size": 8, "selection": selection})
    out["fisher/e/2:4"] = model_case(make_block_model, labelled_batches, solver="cap", uncertainty="e",
                                     curvature="fisher", loss_fn=ce_loss, pattern="2:4", sparsity=None,
                                     fisher={"gradients": 16, "batch_size": 8, "block_size": 16})
    out["fisher/alps/error"] = model_case(make_block_model, labelled_batches, solver="alps", curvature="fisher",
                                          loss_fn=ce_loss)
    # --- resume after an interrupt
    out["resume/blocks/sparsegpt/trace"] = resume_case(sparsity=0.5, solver="sparsegpt", uncertainty="trace")
    out["resume/blocks/alps/cvar/heldout0.25"] = resume_case(sparsity=0.5, solver="alps", uncertainty="cvar",
                                                             heldout_fraction=0.25)
    return out


# ----------------------------------------------------------------------------- driver
def run_case(fn: Case) -> tuple[dict[str, Any], str | None]:
    """The case's fingerprint, and a note when it raised something other than ValueError."""
    seed_all(0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn(), None
    except AssertionError:
        raise
    except Exception as e:  # noqa: BLE001 - a case's exception type is its fingerprint
        note = None if isinstance(e, ValueError) else "".join(traceback.format_exception_only(type(e), e)).strip()
        return {"error": type(e).__name__}, note


def main(argv: list[str] | None = None) -> int:
    global torch, nn, RL
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="write {case: fingerprint} to this JSON file")
    p.add_argument("--check", help="compare with this JSON file; exit 1 if any case differs")
    p.add_argument("--src", help="import robop_lightning from this checkout (inserted at sys.path[0])")
    p.add_argument("--only", help="only the cases whose name contains this substring")
    p.add_argument("--list", action="store_true", help="list the case names and exit")
    p.add_argument("-v", "--verbose", action="store_true", help="one line per case with its time")
    args = p.parse_args(argv)
    if not (args.out or args.check or args.list):
        p.error("give --out FILE and/or --check FILE (or --list)")
    if args.src:
        sys.path.insert(0, os.path.abspath(args.src))
    import torch as _torch
    from torch import nn as _nn

    import robop_lightning as _rl

    torch, nn, RL = _torch, _nn, _rl
    torch.set_num_threads(1)
    src = os.path.dirname(os.path.dirname(os.path.abspath(RL.__file__)))
    if args.src and os.path.realpath(src) != os.path.realpath(args.src):
        print(f"error: robop_lightning was imported from {src}, not from --src {args.src}", file=sys.stderr)
        return 2

    all_cases = cases()
    selected = {k: v for k, v in all_cases.items() if not args.only or args.only in k}
    if args.list:
        print("\n".join(selected))
        return 0
    expected = None
    if args.check:
        with open(args.check) as f:
            expected = json.load(f)

    start = time.perf_counter()
    results: dict[str, Any] = {}
    notes: dict[str, str] = {}
    for name, fn in selected.items():
        t = time.perf_counter()
        results[name], note = run_case(fn)
        if note:
            notes[name] = note
        if args.verbose:
            print(f"{time.perf_counter() - t:7.2f}s  {name}", flush=True)
    seconds = time.perf_counter() - start
    for name, note in notes.items():
        print(f"note: {name} raised an unexpected {note}", file=sys.stderr)

    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1, sort_keys=True)
            f.write("\n")
    status = 0
    if expected is not None:
        differ = [n for n in selected if n in expected and expected[n] != results[n]]
        missing = [n for n in selected if n not in expected]
        gone = [n for n in expected if n not in selected and (not args.only or args.only in n)]
        for n in differ:
            print(f"DIFF {n}\n  expected {json.dumps(expected[n], sort_keys=True)}\n  got      "
                  f"{json.dumps(results[n], sort_keys=True)}")
        for n in missing:
            print(f"NEW  {n} (not in {args.check})")
        for n in gone:
            print(f"GONE {n} (in {args.check}, not run)")
        status = 1 if differ or gone else 0
        print(f"fingerprint: {len(selected)} cases from {src} in {seconds:.1f}s: {len(selected) - len(differ) - len(missing)} "
              f"identical, {len(differ)} differ, {len(missing)} not in {args.check}, {len(gone)} gone"
              f"{f', {len(notes)} unexpected errors' if notes else ''}")
    else:
        errors = sum(1 for v in results.values() if "error" in v)
        print(f"fingerprint: {len(selected)} cases from {src} in {seconds:.1f}s ({errors} raise by design"
              f"{f', {len(notes)} unexpected errors' if notes else ''}) -> {args.out}")
    return status


if __name__ == "__main__":
    sys.exit(main())
