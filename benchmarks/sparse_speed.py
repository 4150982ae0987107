"""2:4 semi-structured sparse kernels against dense: per-layer and end-to-end tokens / s.

    .venv/bin/python benchmarks/sparse_speed.py                        # CUDA: Llama-3-8B layers and 2 blocks, bf16
    .venv/bin/python benchmarks/sparse_speed.py --tokens 2048 8192 --batch 8 --seqlen 2048 --repeats 50
    .venv/bin/python benchmarks/sparse_speed.py --fast --out /tmp/ss   # seconds: CPU smoke path, dense timings only

Per layer: the three linear shapes of Llama-3-8B (``4096x4096``: q / o projections, ``14336x4096``:
gate / up, ``4096x14336``: down; ``out x in``) with random ``--dtype`` weights pruned 2:4 by magnitude
(the 2 largest of every 4 consecutive inputs kept), fed ``--tokens`` rows of random inputs: the dense
``F.linear`` of the masked weight against the same layer after
:func:`robop_lightning.export.to_semi_structured`.

End to end: ``transformers.LlamaForCausalLM`` with random weights, Llama-3-8B-shaped blocks (hidden
4096, MLP 14336, 32 heads, 8 KV heads), ``--blocks`` of them and a 1024-token vocabulary, pruned 2:4
by ``prune_model(solver="magnitude", pattern="2:4")`` on every linear of the blocks; one forward
(prefill, no cache) of ``--batch`` sequences of ``--seqlen`` random tokens, before and after
``to_semi_structured``. Logits are compared (``max rel. error``: the largest absolute difference over
the largest dense logit).

Timings: ``--warmup`` calls, then the median of ``--repeats`` (``torch.cuda.synchronize`` around each
on CUDA); tokens / s is tokens over that median; speed-up is dense seconds over 2:4 seconds.

On a CPU (``--fast``, or no CUDA device) the shapes are tiny (1/64 of the width), only the dense side
is timed and the 2:4 kernel is reported unavailable, with the reason ``to_semi_structured`` gives.

Writes ``OUT.json`` (``{"command", "commit", "machine", "device", "dtype", "kernel", "config",
"rows"}``) and ``OUT.md`` (the table and the command line); ``--out`` defaults to
``benchmarks/results/sparse_speed``.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _real_layers as R  # noqa: E402

from robop_lightning.export import to_semi_structured  # noqa: E402
from robop_lightning.pipeline.prune import prune_model  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Llama-3-8B: hidden, MLP, heads, KV heads
FULL = {"hidden": 4096, "intermediate": 14336, "heads": 32, "kv_heads": 8}
TINY = {"hidden": 64, "intermediate": 224, "heads": 4, "kv_heads": 1}  # 1/64 of the width, head size 16
VOCAB = 1024
FAST = ["--device", "cpu", "--tokens", "64", "--batch", "2", "--seqlen", "32", "--warmup", "1", "--repeats", "3",
        "--threads", "1"]


def layer_shapes(shape: dict) -> list[tuple[str, int, int]]:
    """``(label, out_features, in_features)`` of the block's three distinct linear shapes."""
    h, m = shape["hidden"], shape["intermediate"]
    return [("q/o_proj", h, h), ("gate/up_proj", m, h), ("down_proj", h, m)]


def magnitude_24(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` with the 2 smallest-magnitude entries of every 4 consecutive inputs set to zero."""
    groups = weight.reshape(-1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, groups.abs().topk(2, dim=1).indices, True)
    return (groups * keep).reshape(weight.shape)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


def _row(kind: str, name: str, shape: str, tokens: int, dense_s: float) -> dict:
    return {"kind": kind, "name": name, "shape": shape, "tokens": tokens, "dense_seconds": dense_s,
            "dense_tokens_per_s": tokens / dense_s, "sparse_seconds": None, "sparse_tokens_per_s": None,
            "speedup": None, "max_rel_error": None, "status": "dense only"}


def _finish(row: dict, sparse_s: float, error: float) -> dict:
    row.update(sparse_seconds=sparse_s, sparse_tokens_per_s=row["tokens"] / sparse_s,
               speedup=row["dense_seconds"] / sparse_s, max_rel_error=error, status="ok")
    return row


def bench_layers(shape: dict, tokens_list: list[int], dtype, device, args, kernel: dict) -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(0)
    for label, out_f, in_f in layer_shapes(shape):
        layer = nn.Linear(in_f, out_f, bias=False)
        with torch.no_grad():
            layer.weight.copy_(magnitude_24(torch.randn(out_f, in_f, generator=g)))
        layer = layer.to(device=device, dtype=dtype).eval()
        dense_w = layer.weight.detach().clone()
        holder = nn.Sequential(layer)
        try:  # the reason is the same for every token count: swap once per shape
            to_semi_structured(holder)
        except RuntimeError as e:
            kernel.update(available=False, reason=kernel.get("reason") or str(e))
        for tokens in tokens_list:
            x = torch.randn(tokens, in_f, generator=g).to(device=device, dtype=dtype)
            row = _row("layer", label, f"{out_f}x{in_f}", tokens,
                       R.timed(lambda: F.linear(x, dense_w), device, args.warmup, args.repeats))
            if isinstance(layer.weight, torch.sparse.SparseSemiStructuredTensor):
                with torch.inference_mode():
                    error = _rel(layer(x), F.linear(x, dense_w))
                _finish(row, R.timed(lambda: layer(x), device, args.warmup, args.repeats), error)
            else:
                row["status"] = "2:4 kernel unavailable"
            rows.append(row)
            print(f"[sparse_speed] {label} {out_f}x{in_f}, {tokens} tokens: dense {row['dense_tokens_per_s']:,.0f} "
                  f"tok/s, 2:4 {_num(row['sparse_tokens_per_s'], ',.0f')} tok/s", flush=True)
    return rows


def build_llama(shape: dict, blocks: int, seqlen: int, dtype, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
                         num_hidden_layers=blocks, num_attention_heads=shape["heads"],
                         num_key_value_heads=shape["kv_heads"], head_dim=shape["hidden"] // shape["heads"],
                         max_position_embeddings=max(seqlen, 2048), rope_theta=500000.0, rms_norm_eps=1e-5,
                         tie_word_embeddings=False, use_cache=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval()


def bench_model(shape: dict, dtype, device, args, kernel: dict) -> dict:
    model = build_llama(shape, args.blocks, args.seqlen, dtype, device)
    ids = torch.randint(0, VOCAB, (args.batch, args.seqlen), generator=torch.Generator().manual_seed(1)).to(device)
    report = prune_model(model, [{"input_ids": ids[:1]}], sparsity=None, pattern="2:4", solver="magnitude",
                         uncertainty="baseline", blocks="model.layers", progress=False)
    tokens = args.batch * args.seqlen

    def forward(m):
        return m(input_ids=ids, use_cache=False).logits

    row = _row("model", f"LlamaForCausalLM, {args.blocks} blocks", f"{args.batch}x{args.seqlen}", tokens,
               R.timed(lambda: forward(model), device, args.warmup, args.repeats))
    row["pruned_layers"] = len(report.masks)
    with torch.inference_mode():
        reference = forward(model)
    sparse = model  # swapped in place: the dense timings are done
    try:
        row["swapped_layers"] = len(to_semi_structured(sparse))
    except RuntimeError as e:
        kernel.update(available=False, reason=kernel.get("reason") or str(e))
        row["status"] = "2:4 kernel unavailable"
        return row
    with torch.inference_mode():
        error = _rel(forward(sparse), reference)
    return _finish(row, R.timed(lambda: forward(sparse), device, args.warmup, args.repeats), error)


def _num(v, fmt: str, unit: str = "") -> str:
    return "-" if v is None else format(v, fmt) + unit


def markdown(command: str, info: dict, payload: dict) -> str:
    k = payload["kernel"]
    lines = [f"Command: `{command}`", "", f"Machine: {R.machine_line(info)}", "",
             f"Weights: {payload['dtype']} on {payload['device']}; 2:4 kernel: "
             + (f"{k['backend']}" if k["available"] else f"unavailable ({k['reason']})"), "",
             "| what | shape | tokens | dense tok/s | 2:4 tok/s | speed-up | max rel. error | status |",
             "|---|---|---|---|---|---|---|---|"]
    for r in payload["rows"]:
        lines.append(f"| {r['name']} | {r['shape']} | {r['tokens']} | {r['dense_tokens_per_s']:,.0f} | "
                     f"{_num(r['sparse_tokens_per_s'], ',.0f')} | {_num(r['speedup'], '.2f', 'x')} | "
                     f"{_num(r['max_rel_error'], '.1e')} | {r['status']} |")
    lines += ["", "Layers: `out x in`, a `tokens x in` input; model: `batch x seqlen` tokens, one prefill forward. "
              "Speed-up: dense seconds / 2:4 seconds (medians)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    p.add_argument("--tokens", type=int, nargs="+", default=[4096], help="input rows of the per-layer timings")
    p.add_argument("--blocks", type=int, default=2, help="decoder blocks of the end-to-end model")
    p.add_argument("--batch", type=int, default=4, help="sequences of the end-to-end forward")
    p.add_argument("--seqlen", type=int, default=1024, help="tokens per sequence of the end-to-end forward")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is; --fast: 1)")
    p.add_argument("--fast", action="store_true", help="CPU smoke path: " + " ".join(FAST))
    p.add_argument("--out", default="benchmarks/results/sparse_speed", help="writes OUT.json and OUT.md")
    args = R.parse_with_fast(p, argv, FAST)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype)
    shape = FULL if device.type == "cuda" and not args.fast else TINY
    kernel = {"available": True, "reason": None, "backend": None}
    if device.type == "cuda":
        cusparselt = getattr(torch.backends, "cusparselt", None)
        kernel["backend"] = "cusparselt" if cusparselt is not None and cusparselt.is_available() else "cutlass"

    rows = bench_layers(shape, args.tokens, dtype, device, args, kernel)
    rows.append(bench_model(shape, dtype, device, args, kernel))
    print(f"[sparse_speed] model: dense {rows[-1]['dense_tokens_per_s']:,.0f} tok/s, "
          f"2:4 {_num(rows[-1]['sparse_tokens_per_s'], ',.0f')} tok/s", flush=True)
    if not kernel["available"]:
        kernel["backend"] = None

    info = R.machine(device)
    command = R.command_line("benchmarks/sparse_speed.py", argv)
    payload = {"command": command, "commit": R.git_commit(), "machine": info, "device": str(device),
               "dtype": args.dtype, "kernel": kernel,
               "config": {**shape, "blocks": args.blocks, "vocab": VOCAB, "batch": args.batch, "seqlen": args.seqlen,
                          "tokens": args.tokens, "warmup": args.warmup, "repeats": args.repeats},
               "rows": rows}
    text = markdown(command, info, payload)
    R.publish(args.out, payload, text)
    return payload


if __name__ == "__main__":
    main()
