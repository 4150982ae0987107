"""LLM-scale benchmark: time and peak memory of ``prune_model`` on decoder blocks of a real LLM shape.

    .venv/bin/python benchmarks/llm_scale.py --threads 1 --device cpu --scale 0.25   # CPU, 1/4 of the width
    .venv/bin/python benchmarks/llm_scale.py --device cuda --config llama3-8b --blocks 2 --tokens 128x2048
                                                                  # GPU: full Llama-3-8B blocks, 262k tokens
    .venv/bin/python benchmarks/llm_scale.py --config llama2-7b --pattern 2:4 --methods reference sparsegpt
    .venv/bin/python benchmarks/llm_scale.py --fast --out /tmp/ls    # seconds: tiny CPU run, every method

The model is ``transformers.LlamaForCausalLM`` with random weights, the named configuration
(``llama3-8b``: hidden 4096, MLP 14336, 32 heads, 8 KV heads; ``llama2-7b``: 4096, 11008, 32 / 32;
``gemma3-270m``: Gemma 3 270M's shapes, 640, 2048, 4 / 1 heads of 256, in Llama blocks)
cut to ``--blocks`` decoder layers and a 1024-token vocabulary (the embedding is not pruned), in
``--dtype`` (bfloat16 on CUDA, float32 on CPU). ``--scale s`` shrinks the width: the head size
stays 128 while at least one group of query heads fits (heads and KV heads then scale), below that
the head size shrinks; the MLP width stays a multiple of 4 (for ``2:4``). The calibration data is
``--tokens SxL``: ``S`` random sequences of ``L`` token ids (seed 0), ``--batch-size`` sequences a
batch, each batch ``{"input_ids": ...}``.

Per method, with the dense weights restored first (a CPU copy of the state dict):

* ``sparsegpt``, ``alps`` (Baseline set), ``alps+trace`` (ALPS, trace set), ``auto`` (ALPS, the set
  and radius chosen per layer): ``robop_lightning.pipeline.prune.prune_model`` on every linear of the blocks
  (``blocks="model.layers"`` given, so that ``--blocks 1`` is walked as a block too);
* ``reference``: the sequential structure of the SparseGPT paper's reference scripts, written here
  from the paper: a "Catcher" pre-hook records block 0's inputs; per block, forward hooks add each
  batch's inputs to one float32 Gram per linear on the device (running average), the block runs over
  all batches, every linear is pruned by Algorithm 1 (1 % damping, Cholesky factor of the inverse,
  blocks of 128 columns with the mask chosen per block by ``w^2 / d^2``, OBS update of the columns
  to the right), then the block runs again to give the next block its inputs. It is the time to beat.

Measured: wall seconds (``torch.cuda.synchronize`` on CUDA), the per-block breakdown
(``report.blocks``: ``forward`` propagation, ``capture`` forward with the Gram accumulation,
``solve``, ``io`` undo / resume copies; for ``reference`` its own phases), peak device memory
(``torch.cuda.max_memory_allocated``, model included), the host RSS peak above the start
(:class:`robop_lightning.utils.memory.PeakRSS`), the minutes projected for the whole model
(seconds per block x its layers), and the **floor**: the two forwards a block needs in the
sequential structure (one that feeds its linears' statistics, one of the pruned block that feeds the
next block; each timed as one dense forward of a block over all batches, before the methods) plus
the method's own solve seconds per block; ``vs floor`` is the method's seconds per block over the
floor (``prune_model`` skips the last block's second forward, so it can go slightly below). Ratios: ``prune_model(sparsegpt) / reference``,
``sparsegpt / floor``, ``alps+trace / sparsegpt`` and ``auto / alps+trace``.

Writes ``OUT.json`` (``{"command", "commit", "machine", "device", "config", "floor", "rows",
"ratios"}``) and ``OUT.md`` (the table, with the command line); ``--out`` defaults to
``benchmarks/results/llm_scale``.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys
import time

import torch
from torch import nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _real_layers as R  # noqa: E402

from robop_lightning.utils.memory import PeakRSS  # noqa: E402
from robop_lightning.pipeline.prune import prune_model  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]

# name: (hidden, intermediate, heads, kv heads, layers of the full model, vocabulary, rope theta, rms eps,
#        head size where it is not hidden / heads)
CONFIGS = {
    "llama3-8b": (4096, 14336, 32, 8, 32, 128256, 500000.0, 1e-5, None),
    "llama2-7b": (4096, 11008, 32, 32, 32, 32000, 10000.0, 1e-5, None),
    "gemma3-270m": (640, 2048, 4, 1, 18, 262144, 1000000.0, 1e-6, 256),  # its shapes in Llama blocks
}
# method: (solver, uncertainty) of prune_model; "reference" is this file's re-creation
METHODS = {
    "sparsegpt": ("sparsegpt", "baseline"),
    "alps": ("alps", "baseline"),
    "alps+trace": ("alps", "trace"),
    "auto": ("alps", "auto"),
    "reference": ("reference-sparsegpt", "baseline"),
}
DEFAULT_METHODS = ["reference", "sparsegpt", "alps", "alps+trace", "auto"]
VOCAB = 1024
FAST = ["--config", "llama3-8b", "--scale", "0.03", "--blocks", "2", "--tokens", "4x64", "--device", "cpu"]
BREAKDOWN = ("forward", "capture", "solve", "io")


# --------------------------------------------------------------------------- model and data
def scaled_shape(name: str, scale: float) -> dict:
    """Hidden / MLP width, heads, KV heads and head size of ``name`` shrunk by ``scale`` (a valid config)."""
    hidden, inter, heads, kv, layers, vocab, theta, eps, head_dim = CONFIGS[name]
    group = heads // kv
    head_dim = head_dim or hidden // heads
    common = {"full_layers": layers, "full_vocab": vocab, "rope_theta": theta, "rms_norm_eps": eps}
    if scale == 1:
        return {"hidden_size": hidden, "intermediate_size": inter, "num_attention_heads": heads,
                "num_key_value_heads": kv, "head_dim": head_dim, **common}
    target = hidden * scale
    if target >= head_dim * group:  # full-size heads: whole KV groups
        kv_s = max(1, round(target / (head_dim * group)))
        heads_s = kv_s * group
    else:  # fewer than one group of full heads: one group, smaller heads (a multiple of 4: rotary, 2:4)
        kv_s, heads_s = 1, group
        head_dim = max(4, 4 * round(target / heads_s / 4))
    inter_s = max(4, 4 * round(inter * scale / 4))
    return {"hidden_size": heads_s * head_dim, "intermediate_size": inter_s, "num_attention_heads": heads_s,
            "num_key_value_heads": kv_s, "head_dim": head_dim, **common}


def build_model(name: str, scale: float, blocks: int, seqlen: int, dtype: torch.dtype, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = scaled_shape(name, scale)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=shape["hidden_size"], intermediate_size=shape["intermediate_size"],
        num_hidden_layers=blocks, num_attention_heads=shape["num_attention_heads"],
        num_key_value_heads=shape["num_key_value_heads"], head_dim=shape["head_dim"],
        max_position_embeddings=max(seqlen, 2048), rms_norm_eps=shape["rms_norm_eps"],
        rope_theta=shape["rope_theta"], tie_word_embeddings=False, use_cache=False,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval(), shape


def token_batches(samples: int, seqlen: int, batch_size: int, device: torch.device) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (samples, seqlen), generator=g)
    return [{"input_ids": ids[i : i + batch_size].to(device)} for i in range(0, samples, batch_size)]


def parse_tokens(text: str) -> tuple[int, int]:
    try:
        samples, seqlen = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--tokens is SAMPLESxSEQLEN such as 128x2048, got {text!r}") from None
    if samples < 1 or seqlen < 1:
        raise argparse.ArgumentTypeError(f"--tokens needs positive sizes, got {text!r}")
    return samples, seqlen


# --------------------------------------------------------------------------- timing helpers
class Clock:
    """Accumulates synchronized wall seconds per phase: ``with clock("solve"): ...``."""

    def __init__(self, device: torch.device):
        self.device, self.seconds = device, {}

    def __call__(self, phase: str):
        clock = self

        class _Phase:
            def __enter__(self):
                R.sync(clock.device)
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                R.sync(clock.device)
                clock.seconds[phase] = clock.seconds.get(phase, 0.0) + time.perf_counter() - self.t

        return _Phase()


def _hidden(out):
    """A decoder layer returns its hidden states (transformers >= 5) or a tuple starting with them."""
    return out[0] if isinstance(out, (tuple, list)) else out


# --------------------------------------------------------------------------- the reference (SparseGPT paper)
class _Caught(Exception):
    pass


@torch.no_grad()
def catch_block_inputs(model, batches: list[dict]) -> list[tuple[torch.Tensor, dict]]:
    """Block 0's ``(hidden states, keyword arguments)`` per batch: a pre-hook records them and stops the forward."""
    layers = model.model.layers
    caught: list[tuple[torch.Tensor, dict]] = []

    def catcher(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        caught.append((hidden, dict(kwargs)))
        raise _Caught

    handle = layers[0].register_forward_pre_hook(catcher, with_kwargs=True)
    try:
        for batch in batches:
            try:
                model(**batch, use_cache=False)
            except _Caught:
                pass
    finally:
        handle.remove()
    return caught


class GramHook:
    """One linear's float32 Gram on the device, the reference scripts' running average
    ``H <- H n / (n + b) + (2 / (n + b)) X^T X`` over batches of ``b`` samples."""

    def __init__(self, linear: nn.Linear):
        cols = linear.in_features
        self.H = torch.zeros(cols, cols, dtype=torch.float32, device=linear.weight.device)
        self.n = 0

    def __call__(self, module, inputs, output):
        x = inputs[0]
        b = x.shape[0] if x.dim() > 2 else 1
        x = x.reshape(-1, x.shape[-1]).float()
        self.H.mul_(self.n / (self.n + b))
        self.n += b
        x = x * math.sqrt(2 / self.n)
        self.H.addmm_(x.t(), x)


def parse_nm(pattern: str) -> tuple[int, int] | None:
    if pattern == "unstructured":
        return None
    n, m = (int(x) for x in pattern.split(":"))
    return n, m


@torch.no_grad()
def sparsegpt_prune(weight: torch.Tensor, H: torch.Tensor, sparsity: float, nm: tuple[int, int] | None,
                    blocksize: int = 128, percdamp: float = 0.01) -> torch.Tensor:
    """SparseGPT Algorithm 1 on one weight (``(rows, cols)``) with its Gram ``H`` (float32); returns the pruned weight.

    Dead inputs (zero diagonal) get a unit diagonal and zero weights; ``percdamp`` of the mean diagonal
    is added; ``U`` is the upper Cholesky factor of ``H^-1``. Columns go in blocks of ``blocksize``: the
    block's mask removes the ``sparsity`` share of its entries with the smallest ``w^2 / U_jj^2``
    (``N:M``: the ``N`` smallest of every ``M`` columns, chosen when the sweep reaches them); each column
    is then quantised to its mask and its error ``(w - q) / U_jj`` updates the columns to its right
    (inside the block at once, the rest of the matrix after the block, lazily).
    """
    W = weight.float().clone()
    H = H.clone()
    rows, cols = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    idx = torch.arange(cols, device=H.device)
    H[idx, idx] += percdamp * torch.mean(torch.diag(H))
    L = torch.linalg.cholesky(H)
    U = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)  # H^-1 = U^T U
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        E1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        d = torch.diag(U1)
        prune = torch.zeros_like(W1, dtype=torch.bool)  # True where removed
        if nm is None:
            k = int(W1.numel() * sparsity)
            if k > 0:
                score = (W1 ** 2 / d.unsqueeze(0) ** 2).flatten()
                prune.view(-1)[torch.topk(score, k, largest=False).indices] = True
        for i in range(count):
            w = W1[:, i]
            if nm is not None and i % nm[1] == 0:
                score = W1[:, i : i + nm[1]] ** 2 / d[i : i + nm[1]].unsqueeze(0) ** 2
                prune.scatter_(1, i + torch.topk(score, nm[0], dim=1, largest=False).indices, True)
            q = torch.where(prune[:, i], torch.zeros_like(w), w)
            Q1[:, i] = q
            err = (w - q) / d[i]
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            E1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    return W.to(weight.dtype)


@torch.no_grad()
def reference_prune(model, batches: list[dict], sparsity: float, pattern: str, device: torch.device) -> dict:
    """The reference sequential pruning, block by block; returns its phase seconds and the zeros it made."""
    nm = parse_nm(pattern)
    clock = Clock(device)
    with clock("catch"):
        inputs = catch_block_inputs(model, batches)
    zeros = params = 0
    blocks = []
    for layer in model.model.layers:
        before = dict(clock.seconds)
        linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
        grams = {n: GramHook(m) for n, m in linears.items()}
        handles = [m.register_forward_hook(grams[n]) for n, m in linears.items()]
        try:
            with clock("capture"):
                for hidden, kwargs in inputs:
                    layer(hidden, **kwargs)
        finally:
            for h in handles:
                h.remove()
        with clock("solve"):
            for n, m in linears.items():
                m.weight.data = sparsegpt_prune(m.weight.data, grams[n].H, sparsity, nm)
                grams[n].H = None
        del grams
        for m in linears.values():
            zeros += int((m.weight == 0).sum())
            params += m.weight.numel()
        with clock("forward"):
            inputs = [(_hidden(layer(hidden, **kwargs)), kwargs) for hidden, kwargs in inputs]
        blocks.append({k: clock.seconds.get(k, 0.0) - before.get(k, 0.0) for k in ("capture", "solve", "forward")})
    return {"phases": clock.seconds, "blocks": blocks, "sparsity": zeros / params if params else 0.0}


# --------------------------------------------------------------------------- the floor
@torch.no_grad()
def dense_forward_seconds(model, batches: list[dict], device: torch.device) -> float:
    """Seconds of one dense forward of a block over all batches (mean over the blocks, second of two passes)."""
    inputs = catch_block_inputs(model, batches)
    layers = model.model.layers
    seconds = 0.0
    for layer in layers:
        layer(inputs[0][0], **inputs[0][1])  # warm-up
        R.sync(device)
        t = time.perf_counter()
        outputs = [(_hidden(layer(hidden, **kwargs)), kwargs) for hidden, kwargs in inputs]
        R.sync(device)
        seconds += time.perf_counter() - t
        inputs = outputs
    return seconds / len(layers)


# --------------------------------------------------------------------------- one method
def run_method(method: str, model, original: dict, batches: list[dict], args, device: torch.device):
    """One method from the dense weights: its row, and prune_model's report (``None`` for the reference)."""
    model.load_state_dict(original)  # the dense weights back
    solver, uncertainty = METHODS[method]
    blocks = len(model.model.layers)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    report = None
    R.sync(device)
    with PeakRSS() as peak:
        t = time.perf_counter()
        if method == "reference":
            ref = reference_prune(model, batches, args.sparsity, args.pattern, device)
        else:
            report = prune_model(model, batches, sparsity=args.sparsity, pattern=args.pattern, solver=solver,
                                 uncertainty=uncertainty, blocks="model.layers", device=device, progress=False)
        R.sync(device)
        seconds = time.perf_counter() - t
    row = {"method": method, "solver": solver, "uncertainty": uncertainty, "pattern": args.pattern,
           "seconds": seconds, "seconds_per_block": seconds / blocks,
           "peak_device_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
           "peak_host_extra_mib": peak.extra_mb}
    if method == "reference":
        row["sparsity"] = ref["sparsity"]
        row["solve_seconds"] = ref["phases"].get("solve", 0.0)
        row["breakdown"] = {k: ref["phases"].get(k, 0.0) / blocks for k in ("forward", "capture", "solve")}
        row["breakdown"]["io"] = 0.0
        row["catch_seconds"] = ref["phases"].get("catch", 0.0)
        row["blocks"] = ref["blocks"]
    else:
        totals = report.totals
        row["sparsity"] = totals["sparsity"]
        row["report_seconds"] = report.seconds
        row["solve_seconds"] = totals["solve_seconds"]
        row["nominal_error"] = totals["nominal_error"]
        per_block = getattr(report, "blocks", None)  # per-block timings, where prune_model reports them
        if per_block:
            row["blocks"] = [dict(b) for b in per_block]
            row["breakdown"] = {k: sum(b.get(k) or 0.0 for b in per_block) / len(per_block)
                                for k in BREAKDOWN if any(k in b for b in per_block)}
        peak_memory = getattr(report, "peak_memory", None)
        if peak_memory:
            row["report_peak_memory"] = dict(peak_memory)
    return row, report


# --------------------------------------------------------------------------- output
def _num(v, fmt: str = ".2f") -> str:
    return "-" if v is None else format(v, fmt)


def ratios_of(rows: dict[str, dict]) -> dict:
    def ratio(a: str, b: str, key: str = "seconds"):
        if a in rows and b in rows and rows[b][key]:
            return rows[a][key] / rows[b][key]
        return None

    out = {
        "sparsegpt_vs_reference": ratio("sparsegpt", "reference"),
        "sparsegpt_vs_floor": rows["sparsegpt"]["vs_floor"] if "sparsegpt" in rows else None,
        "alps+trace_vs_sparsegpt": ratio("alps+trace", "sparsegpt"),
        "auto_vs_alps+trace": ratio("auto", "alps+trace"),
    }
    return out


RATIO_LINES = {
    "sparsegpt_vs_reference": "prune_model(sparsegpt) / reference",
    "sparsegpt_vs_floor": "prune_model(sparsegpt) per block / floor (2 forwards + solves per block)",
    "alps+trace_vs_sparsegpt": "alps+trace / sparsegpt",
    "auto_vs_alps+trace": "auto / alps+trace",
}


def markdown(command: str, info: dict, setup: dict, rows: list[dict], ratios: dict) -> str:
    full = setup["full_layers"]
    lines = [f"Command: `{command}`", "", f"Machine: {R.machine_line(info)}", "",
             f"Model: {setup['config']} x {setup['scale']:g} (hidden {setup['hidden_size']}, MLP "
             f"{setup['intermediate_size']}, {setup['num_attention_heads']} heads / {setup['num_key_value_heads']} KV "
             f"of {setup['head_dim']}), {setup['blocks']} random-init blocks, {setup['dtype']} on {setup['device']}; "
             f"calibration {setup['samples']} x {setup['seqlen']} tokens in batches of {setup['batch_size']}; "
             f"{setup['sparsity']:g} {setup['pattern']}.", "",
             f"Floor forward (one dense block over all batches): {setup['forward_per_block']:.3f} s.", "",
             f"| method | solver / set | sparsity | s / block | forward | capture | solve | io | vs floor | "
             f"peak device GiB | peak host extra MiB | projected min ({full} layers) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b = r.get("breakdown") or {}
        lines.append(
            f"| {r['method']} | {r['solver']} / {r['uncertainty']} | {r['sparsity']:.3f} | "
            f"{r['seconds_per_block']:.3f} | "
            f"{_num(b.get('forward'), '.3f')} | {_num(b.get('capture'), '.3f')} | {_num(b.get('solve'), '.3f')} | "
            f"{_num(b.get('io'), '.3f')} | {_num(r['vs_floor'])} | {_num(r['peak_device_gib'])} | "
            f"{_num(r['peak_host_extra_mib'], '.0f')} | {r['projected_minutes']:.2f} |")
    lines += ["", "Ratios (seconds):", ""]
    lines += [f"- {RATIO_LINES[k]}: {_num(v, '.2f')}" for k, v in ratios.items()]
    lines += ["", "Breakdown columns: seconds per block of the propagation forward, the capture forward (Gram "
              "accumulation included), the solves and undo / resume copies (`-`: not reported by prune_model). "
              "Floor: two dense forwards (statistics, then propagation) plus the method's own solve seconds, per block."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=sorted(CONFIGS), default="llama3-8b")
    p.add_argument("--scale", type=float, default=1.0, help="width factor (hidden, MLP, heads)")
    p.add_argument("--blocks", type=int, default=2, help="decoder layers built and pruned")
    p.add_argument("--tokens", type=parse_tokens, default=(128, 2048), help="SAMPLESxSEQLEN, e.g. 128x2048")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per calibration batch")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=None,
                   help=f"default: {' '.join(DEFAULT_METHODS)}")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--pattern", default="unstructured", help="unstructured or N:M such as 2:4")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is; --fast: 1)")
    p.add_argument("--fast", action="store_true", help="tiny CPU run of every method: " + " ".join(FAST))
    p.add_argument("--out", default="benchmarks/results/llm_scale", help="writes OUT.json and OUT.md")
    args = R.parse_with_fast(p, argv, FAST)
    if args.fast:
        args.threads = args.threads or 1
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.pattern != "unstructured":
        try:
            n, m = parse_nm(args.pattern)
        except ValueError:
            p.error(f"--pattern is 'unstructured' or N:M (the reference implements those), got {args.pattern!r}")
        args.sparsity = n / m
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    methods = args.methods or DEFAULT_METHODS
    samples, seqlen = args.tokens

    model, shape = build_model(args.config, args.scale, args.blocks, seqlen, dtype, device)
    batches = token_batches(samples, seqlen, args.batch_size, device)
    original = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    if device.type == "cuda":  # lazy CUDA libraries load here, not in the first method
        torch.linalg.cholesky(torch.eye(8, device=device))
    forward = dense_forward_seconds(model, batches, device)
    setup = {"config": args.config, "scale": args.scale, "blocks": args.blocks, "samples": samples, "seqlen": seqlen,
             "batch_size": args.batch_size, "dtype": str(dtype).removeprefix("torch."), "device": str(device),
             "sparsity": args.sparsity, "pattern": args.pattern, "vocab": VOCAB, **shape,
             "forward_per_block": forward}

    rows = []
    for method in methods:
        print(f"[llm_scale] {method} ...", flush=True)
        row, report = run_method(method, model, original, batches, args, device)
        row["floor_per_block"] = 2 * forward + row["solve_seconds"] / args.blocks
        row["vs_floor"] = row["seconds_per_block"] / row["floor_per_block"]
        row["projected_minutes"] = row["seconds_per_block"] * shape["full_layers"] / 60
        rows.append(row)
        print(f"[llm_scale] {method} done in {row['seconds']:.1f} s: sparsity {row['sparsity']:.3f}, "
              f"{row['seconds_per_block']:.3f} s / block, breakdown {row.get('breakdown')}"
              + ("" if report is None or not getattr(report, "peak_memory", None)
                 else f", report.peak_memory {report.peak_memory}"), flush=True)
    model.load_state_dict(original)

    by_method = {r["method"]: r for r in rows}
    ratios = ratios_of(by_method)
    info = R.machine(device)
    command = R.command_line("benchmarks/llm_scale.py", argv)
    text = markdown(command, info, setup, rows, ratios)
    payload = {"command": command, "commit": R.git_commit(), "machine": info, "device": str(device), "config": setup,
               "floor": {"forward_per_block": forward}, "rows": rows, "ratios": ratios}
    R.publish(args.out, payload, text)
    return payload


if __name__ == "__main__":
    main()
